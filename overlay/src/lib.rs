//! The overlay network that links containers across hosts: a userspace
//! WireGuard data plane (boringtun over TUN), a bridge per network on each
//! node, a network namespace per task with a veth on each of its networks,
//! routes to the other nodes' slices through the WireGuard device, and
//! nftables rules that keep networks apart and NAT their egress.
//!
//! A library the agent drives: the agent learns peers and addresses from
//! its session with the managers and hands them here; nothing in this crate
//! talks to a manager.

pub mod conntrack;
pub mod dataplane;
pub mod dns;
pub mod firewall;
pub mod keys;
pub mod link;
pub mod meshflow;
pub mod netns;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{watch, Mutex};

pub use dataplane::{DataPlane, PeerConfig};
use link::Netlink;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what}: {source}")]
    Netlink { what: String, source: rtnetlink::Error },
    #[error("no link named {0}")]
    NoSuchLink(String),
    #[error("overlay key {path}: {why}")]
    BadKey { path: String, why: String },
    #[error("nft refused shoal's rules: {0}")]
    Nft(String),
    #[error("invalid network attachment: {0}")]
    BadAttachment(String),
    #[error(transparent)]
    Conntrack(#[from] conntrack::ConntrackError),
}

/// The WireGuard device's name.
pub const TUN_NAME: &str = "shoal0";
/// Bridges are `shn` + 12 characters of the network's id.
pub const BRIDGE_PREFIX: &str = "shn";
/// The MTU of container interfaces: what fits through the tunnel.
pub const CONTAINER_MTU: u32 = dataplane::MTU as u32;

pub struct OverlayConfig {
    pub data_dir: PathBuf,
    /// UDP port of the WireGuard socket.
    pub port: u16,
    /// The address peers reach this node's port at (its underlay IP).
    pub endpoint_ip: Ipv4Addr,
    /// Where the tasks' DNS server sends names that are not services
    /// (None: the first non-loopback nameserver of `/etc/resolv.conf`).
    pub dns_upstream: Option<std::net::SocketAddr>,
}

/// One of a task's networks, with the task's address on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub network: String,
    pub network_id: String,
    pub subnet: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub internal: bool,
}

impl Attachment {
    /// From the assignment's strings; refuses what a real manager never
    /// sends (bad addresses, ids that could name other interfaces).
    pub fn parse(network: &str, id: &str, subnet: &str, address: &str, gateway: &str, internal: bool) -> Result<Self, OverlayError> {
        let bad = |what: &str| OverlayError::BadAttachment(format!("network {network:?}: {what}"));
        if id.len() < 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(&format!("id {id:?} is not hex")));
        }
        let (ip, prefix) = address.split_once('/').ok_or_else(|| bad(&format!("address {address:?} has no prefix")))?;
        let address: Ipv4Addr = ip.parse().map_err(|_| bad(&format!("address {ip:?}")))?;
        let prefix: u8 = prefix.parse().ok().filter(|p| (8..=30).contains(p)).ok_or_else(|| bad(&format!("prefix in {address}")))?;
        let gateway: Ipv4Addr = gateway.parse().map_err(|_| bad(&format!("gateway {gateway:?}")))?;
        let (net, len) = subnet.split_once('/').ok_or_else(|| bad(&format!("subnet {subnet:?}")))?;
        let net: Ipv4Addr = net.parse().map_err(|_| bad(&format!("subnet {subnet:?}")))?;
        let len: u8 = len.parse().ok().filter(|l| (8..=30).contains(l)).ok_or_else(|| bad(&format!("subnet {subnet:?}")))?;
        let mask = u32::MAX << (32 - u32::from(len));
        if u32::from(address) & mask != u32::from(net) || u32::from(gateway) & mask != u32::from(net) {
            return Err(bad(&format!("address {address} or gateway {gateway} outside {subnet}")));
        }
        Ok(Attachment { network: network.into(), network_id: id.into(), subnet: subnet.into(), address, prefix, gateway, internal })
    }

    fn subnet_parts(&self) -> (Ipv4Addr, u8) {
        let (n, l) = self.subnet.split_once('/').unwrap_or((&self.subnet, "32"));
        (n.parse().unwrap_or(Ipv4Addr::UNSPECIFIED), l.parse().unwrap_or(32))
    }

    fn bridge(&self) -> String {
        format!("{BRIDGE_PREFIX}{}", &self.network_id[..12])
    }
}

/// One service on one network, as the managers' service view says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub service: String,
    pub network: String,
    /// None in dnsrr mode.
    pub vip: Option<Ipv4Addr>,
    /// Tasks that run and are to keep running.
    pub addresses: Vec<Ipv4Addr>,
    /// On the ingress network: the ports the service publishes.
    pub ports: Vec<PublishedPort>,
    /// More names the service answers to (a stack service's short name).
    pub aliases: Vec<String>,
}

/// A port a service publishes, forwarded to `target` on its tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PublishedPort {
    pub published: u16,
    pub target: u16,
    pub udp: bool,
    /// Only nodes that run a task accept it, for their own tasks.
    pub host_mode: bool,
}

/// The routing mesh's network (the managers make it).
pub const INGRESS_NETWORK: &str = "ingress";
/// The routing table that sends replies to mesh clients back into the
/// tunnel, and the priority of the rule that picks it.
const MESH_TABLE: u32 = 0x5348;
const MESH_RULE_PRIORITY: u32 = 5348;
/// The tunnel's own address (link-local, never routed).
const TUN_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 83, 72);

/// The first 10 characters of a task id, for interface names (15 bytes at
/// most: `shv` + 10 + the index).
fn short_id(task: &str) -> String {
    task.chars().filter(char::is_ascii_alphanumeric).take(10).collect()
}

/// The netmask of a prefix length, as an integer.
pub(crate) fn prefix_mask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) }
}

/// One DNAT rule per service virtual IP.
fn vip_rules(services: &[ServiceEntry]) -> Vec<firewall::VipRule> {
    let mut vips: Vec<firewall::VipRule> = services
        .iter()
        .filter_map(|e| {
            let mut backends = e.addresses.clone();
            backends.sort();
            Some(firewall::VipRule { vip: e.vip?, backends })
        })
        .collect();
    vips.sort();
    vips
}

/// The routing mesh on this node: each published port forwards to every
/// running task of its service (ingress mode) or to those on this node
/// (host mode; `here` holds this node's task addresses).
fn publish_rules(services: &[ServiceEntry], here: &BTreeSet<Ipv4Addr>) -> Vec<firewall::PublishRule> {
    let mut out: Vec<firewall::PublishRule> = services
        .iter()
        .filter(|e| e.network == INGRESS_NETWORK)
        .flat_map(|e| {
            e.ports.iter().filter_map(|p| {
                let mut backends: Vec<(Ipv4Addr, u16)> =
                    e.addresses.iter().filter(|a| !p.host_mode || here.contains(a)).map(|a| (*a, p.target)).collect();
                backends.sort();
                // Host mode binds only where a task runs.
                (!p.host_mode || !backends.is_empty()).then_some(firewall::PublishRule { service: e.service.clone(), port: p.published, udp: p.udp, backends })
            })
        })
        .collect();
    out.sort();
    out
}

/// Runs `f` (an `nft` process, a thread that enters a namespace, mount
/// calls: work that waits on the kernel or a child) on tokio's blocking
/// pool, so it never holds up a runtime worker: the daemon runs two.
async fn blocking<T: Send + 'static>(what: &str, f: impl FnOnce() -> Result<T, OverlayError> + Send + 'static) -> Result<T, OverlayError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| OverlayError::Io { what: what.into(), source: std::io::Error::other(e.to_string()) })?
}

async fn ensure_host_accepts() -> Result<Vec<firewall::HostChain>, OverlayError> {
    blocking("checking the host's forward chains", || firewall::ensure_host_accepts(TUN_NAME, BRIDGE_PREFIX)).await
}

/// How often the host's forward chains are checked for shoal's accepts (a
/// firewall reload, `systemctl restart docker`, drops them).
const HOST_RULES_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// Puts shoal's accepts back into the host's forward chains when they go,
/// until `shutdown`.
async fn keep_host_accepts(released: Arc<Mutex<bool>>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HOST_RULES_CHECK) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        // Held across the check: `release_if_idle` can't remove the rules
        // while they are being put back.
        let released = released.lock().await;
        if *released {
            return;
        }
        match ensure_host_accepts().await {
            Ok(added) if !added.is_empty() => {
                let chains: Vec<String> = added.iter().map(ToString::to_string).collect();
                tracing::warn!(chains = %chains.join(", "), "shoal's accept rules were missing from the host's forward chains: added again");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not check the host's forward chains"),
        }
    }
}

#[derive(Default)]
struct State {
    /// Networks with a bridge on this node, by bridge name.
    bridges: BTreeMap<String, (u32, firewall::NetRule)>,
    /// Bridge name → the local tasks attached to it (a bridge with none
    /// may be retired when another network takes its subnet).
    members: BTreeMap<String, BTreeSet<String>>,
    /// Routes to peers' slices through the TUN.
    routes: BTreeSet<(Ipv4Addr, u8)>,
    /// Of `routes`, those of peers on their way out: their tasks are no
    /// longer in the rules.
    leaving: BTreeSet<(Ipv4Addr, u8)>,
    /// The managers' service view, last received.
    services: Vec<ServiceEntry>,
    /// The addresses of the tasks attached on this node.
    local: BTreeMap<String, Vec<Ipv4Addr>>,
    /// The cluster's address pool, once the managers said it.
    pool: Option<(Ipv4Addr, u8)>,
    rules_applied: Option<firewall::Rules>,
    /// Gateways the DNS server listens on. A server stays when its bridge
    /// goes: its sockets, bound to the address, answer again when a new
    /// bridge brings the address back (stopping it would race that
    /// bridge's new server for the port).
    dns_listening: BTreeSet<Ipv4Addr>,
}

pub struct Overlay {
    dp: DataPlane,
    nl: Netlink,
    tun_index: u32,
    public_key: String,
    endpoint: String,
    netns_dir: PathBuf,
    state: Mutex<State>,
    dns: Arc<dns::DnsView>,
    shutdown: watch::Receiver<bool>,
    /// Whether `release_if_idle` took shoal's rules out of the host (the
    /// 10 s check then stops putting them back).
    host_rules_released: Arc<Mutex<bool>>,
}

impl Overlay {
    /// The node's key (made on first start), IP forwarding, the data plane
    /// and shoal's nftables table. Runs until `shutdown`.
    pub async fn start(cfg: OverlayConfig, shutdown: watch::Receiver<bool>) -> Result<Overlay, OverlayError> {
        let secret = keys::load_or_create(&cfg.data_dir.join("overlay.key"))?;
        let public_key = keys::public_key(&secret);
        // Forward between bridges and the tunnel; never tell a task to go
        // around its gateway (tasks have /32 addresses: every packet, even
        // to a neighbour, passes the node, its isolation and its VIPs).
        for (path, value) in [
            ("/proc/sys/net/ipv4/ip_forward", "1"),
            ("/proc/sys/net/ipv4/conf/all/send_redirects", "0"),
            ("/proc/sys/net/ipv4/conf/default/send_redirects", "0"),
        ] {
            std::fs::write(path, value).map_err(|source| OverlayError::Io { what: format!("setting {path}"), source })?;
        }
        let dp = DataPlane::start(dataplane::DataPlaneConfig { tun_name: TUN_NAME.into(), port: cfg.port, secret }, shutdown.clone()).await?;
        let nl = Netlink::open()?;
        let tun_index = nl.index(TUN_NAME).await?.ok_or_else(|| OverlayError::NoSuchLink(TUN_NAME.into()))?;
        // Routing mesh: replies to a client another node forwarded here go
        // back into the tunnel (the firewall marks them); the client's
        // packets arrive through the tunnel from an address routed
        // elsewhere, which strict reverse-path filtering would drop.
        nl.add_fwmark_rule(firewall::MARK_MESH_REPLY, MESH_TABLE, MESH_RULE_PRIORITY).await?;
        nl.add_default_dev_in_table(tun_index, MESH_TABLE).await?;
        // The kernel's loose check also fails on a device without an
        // address: give the tunnel a link-local one of its own.
        nl.add_address(tun_index, TUN_ADDRESS, 32).await?;
        let rp = format!("/proc/sys/net/ipv4/conf/{TUN_NAME}/rp_filter");
        std::fs::write(&rp, "0").map_err(|source| OverlayError::Io { what: format!("setting {rp}"), source })?;
        if std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").is_ok_and(|v| v.trim() == "1") {
            tracing::warn!(
                "net.ipv4.conf.all.rp_filter is 1 (strict): routing-mesh connections forwarded from other nodes are dropped here; set it to 2 (loose)"
            );
        }
        let dns_upstream = cfg.dns_upstream.or_else(dns::upstream_from_resolv_conf);
        match dns_upstream {
            Some(up) => tracing::info!(upstream = %up, "tasks' DNS forwards other names to {up}"),
            None => tracing::warn!("no DNS upstream (--dns-upstream, or a non-loopback nameserver in /etc/resolv.conf): tasks resolve only service names"),
        }
        let overlay = Overlay {
            dp,
            nl,
            tun_index,
            public_key,
            endpoint: format!("{}:{}", cfg.endpoint_ip, cfg.port),
            netns_dir: cfg.data_dir.join("netns"),
            state: Mutex::new(State::default()),
            dns: Arc::new(dns::DnsView::new(dns_upstream)),
            shutdown,
            host_rules_released: Arc::new(Mutex::new(false)),
        };
        overlay.apply_rules(&mut *overlay.state.lock().await).await?;
        // A host firewall that drops forwarded packets (Docker's FORWARD
        // policy) would drop the overlay's too: accept shoal's interfaces
        // there, now and again whenever the host's rules are reloaded.
        let added = ensure_host_accepts().await?;
        if !added.is_empty() {
            let chains: Vec<String> = added.iter().map(ToString::to_string).collect();
            tracing::info!(chains = %chains.join(", "), "the host's forward chains now accept shoal's bridges and tunnel");
        }
        tokio::spawn(keep_host_accepts(overlay.host_rules_released.clone(), overlay.shutdown.clone()));
        Ok(overlay)
    }

    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn data_plane(&self) -> &DataPlane {
        &self.dp
    }

    /// Where task `task`'s network namespace is pinned.
    pub fn netns_path(&self, task: &str) -> PathBuf {
        self.netns_dir.join(task)
    }

    /// The peers and the routes to their slices, and the cluster's
    /// address pool (None: unchanged).
    pub async fn set_peers(&self, peers: Vec<PeerConfig>, pool: Option<(Ipv4Addr, u8)>) -> Result<(), OverlayError> {
        let want: BTreeSet<(Ipv4Addr, u8)> = peers.iter().flat_map(|p| p.allowed.iter().copied()).collect();
        let mut st = self.state.lock().await;
        let mut changed = false;
        if let Some((net, len)) = pool
            && st.pool != pool
        {
            self.dp.set_pool(net, len);
            st.pool = pool;
            changed = true;
        }
        // A peer that goes (down or removed) leaves in this order: its
        // tasks out of the rules, the connections to them out of conntrack
        // (a client reusing a port would follow its stale entry there),
        // then its tunnel and routes. New connections meet live tasks
        // all the while, never a missing route.
        let leaving: BTreeSet<(Ipv4Addr, u8)> = st.routes.difference(&want).copied().collect();
        if !leaving.is_empty() {
            st.leaving = leaving.clone();
            self.apply_rules(&mut st).await?;
            let nets: Vec<(Ipv4Addr, u8)> = leaving.iter().copied().collect();
            match blocking("forgetting connections to leaving peers", move || conntrack::forget_replies_from(&nets).map_err(OverlayError::from)).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(connections = n, slices = ?leaving, "connections to a leaving peer's tasks forgotten"),
                // Not fatal: such a connection's SYN goes unanswered, and
                // the client's next connection from another port works.
                Err(e) => tracing::warn!(error = %e, slices = ?leaving, "could not forget the connections to a leaving peer's tasks"),
            }
        }
        self.dp.set_peers(peers);
        for (net, len) in &leaving {
            self.nl.del_route_dev(*net, *len, self.tun_index).await?;
        }
        for (net, len) in want.difference(&st.routes) {
            self.nl.add_route_dev(*net, *len, self.tun_index).await?;
        }
        st.leaving.clear();
        if st.routes != want {
            // Tasks on slices that just became reachable join the rotation.
            st.routes = want;
            changed = true;
        }
        if changed {
            self.apply_rules(&mut st).await?;
        }
        Ok(())
    }

    /// Writes the rule set `st` calls for, if it changed. The caller holds
    /// the state lock across the write, so rule sets land in order.
    async fn apply_rules(&self, st: &mut State) -> Result<(), OverlayError> {
        let nets: Vec<firewall::NetRule> = st.bridges.values().map(|(_, r)| r.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        // A task on a slice this node has no route to yet (its node's new
        // slice reaches us with the next peer update, the service view may
        // come first) takes no connections here until it does: they would
        // be dropped, and the client would wait for a SYN retransmit.
        let here: BTreeSet<Ipv4Addr> = st.local.values().flatten().copied().collect();
        let routable = |a: &Ipv4Addr| {
            here.contains(a)
                || st.routes.difference(&st.leaving).any(|(net, len)| u32::from(*a) & prefix_mask(*len) == u32::from(*net) & prefix_mask(*len))
        };
        let services: Vec<ServiceEntry> = st
            .services
            .iter()
            .map(|e| ServiceEntry { addresses: e.addresses.iter().copied().filter(|a| routable(a)).collect(), ..e.clone() })
            .collect();
        let want = firewall::Rules {
            nets,
            vips: vip_rules(&services),
            publish: publish_rules(&services, &here),
            pool: st.pool.map(|(n, l)| format!("{n}/{l}")),
        };
        if st.rules_applied.as_ref() != Some(&want) {
            let rules = want.clone();
            blocking("writing shoal's nftables table", move || firewall::apply(&rules, TUN_NAME, BRIDGE_PREFIX)).await?;
            // For chasing a refused or lost connection: what each published
            // port was balanced over from here on.
            tracing::debug!(
                publish = ?want.publish.iter().map(|p| (p.service.as_str(), p.port, p.backends.len())).collect::<Vec<_>>(),
                vips = want.vips.len(),
                "nftables table written"
            );
            st.rules_applied = Some(want);
        }
        Ok(())
    }

    /// The managers' service view: DNS answers, virtual IPs and published
    /// ports follow it.
    pub async fn set_services(&self, entries: Vec<ServiceEntry>) -> Result<(), OverlayError> {
        self.dns.set_services(entries.clone());
        let mut st = self.state.lock().await;
        st.services = entries;
        self.apply_rules(&mut st).await
    }

    /// Waits (at most `max`) until the service view no longer lists any of
    /// `addresses`: a task told to stop is out of DNS and the virtual IPs
    /// on this node before it is signalled. The other nodes got the same
    /// view from the same leader; `margin` is their time to apply it.
    pub async fn wait_out_of_view(&self, addresses: &[Ipv4Addr], max: std::time::Duration, margin: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + max;
        while self.dns.lists(addresses) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tokio::time::sleep(margin).await;
    }

    /// Reads `read` in task `task`'s namespace every `every` until `done`
    /// says so or `max` has passed; the last reading, None when it could
    /// not be read.
    async fn poll_netns<T: Send + 'static>(
        &self,
        task: &str,
        max: std::time::Duration,
        every: std::time::Duration,
        read: fn(&Path) -> Result<T, OverlayError>,
        done: impl Fn(&T) -> bool,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + max;
        let path = self.netns_path(task);
        loop {
            let p = path.clone();
            let got = match tokio::task::spawn_blocking(move || read(&p)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    tracing::debug!(task = %task, error = %e, "could not read the task's TCP sockets");
                    return None;
                }
                Err(_) => return None,
            };
            if done(&got) || tokio::time::Instant::now() >= deadline {
                return Some(got);
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Waits (at most `max`) until something in task `task` listens on
    /// every TCP port of `ports`: a published port's task joins the
    /// rotation once it can take connections, not when its process
    /// started. Returns the ports still closed.
    pub async fn wait_listening(&self, task: &str, ports: &[u16], max: std::time::Duration) -> Vec<u16> {
        let all_open = |open: &BTreeSet<u16>| ports.iter().all(|p| open.contains(p));
        match self.poll_netns(task, max, std::time::Duration::from_millis(5), netns::listening_ports, all_open).await {
            Some(open) => ports.iter().copied().filter(|p| !open.contains(p)).collect(),
            None => Vec::new(),
        }
    }

    /// Waits (at most `max`) until task `task` has no connection still
    /// carrying a request and has taken no new one for `quiet`: a task out
    /// of rotation finishes what it serves before it is signalled, and a
    /// node that applies the view late (a loaded host) still sends it
    /// connections, which push the signal back. Returns how many were
    /// still open.
    pub async fn drain(&self, task: &str, max: std::time::Duration, quiet: std::time::Duration) -> usize {
        // The accept count last read, and since when nothing was open or new.
        let last = std::cell::Cell::new(None::<u64>);
        let quiet_since = std::cell::Cell::new(tokio::time::Instant::now());
        let done = move |&(open, accepted): &(usize, u64)| {
            let now = tokio::time::Instant::now();
            if open > 0 || last.get().is_some_and(|l| l != accepted) {
                quiet_since.set(now);
            }
            last.set(Some(accepted));
            open == 0 && now.duration_since(quiet_since.get()) >= quiet
        };
        self.poll_netns(task, max, std::time::Duration::from_millis(50), netns::served, done).await.map_or(0, |(open, _)| open)
    }

    /// Connections this node's routing mesh forwarded per service, counted
    /// since the rule set was last written (a smaller number than before
    /// means it was rewritten meanwhile).
    pub async fn mesh_counters(&self) -> Result<BTreeMap<String, u64>, OverlayError> {
        if self.state.lock().await.rules_applied.as_ref().is_none_or(|r| r.publish.is_empty()) {
            return Ok(BTreeMap::new());
        }
        tokio::task::spawn_blocking(firewall::counters)
            .await
            .map_err(|e| OverlayError::Io { what: "reading the mesh counters".into(), source: std::io::Error::other(e.to_string()) })?
    }

    /// What a task's `/etc/resolv.conf` says: this node's DNS server on
    /// the task's first network.
    pub fn resolv_conf(atts: &[Attachment]) -> Option<String> {
        atts.first().map(|a| format!("nameserver {}\noptions ndots:0\n", a.gateway))
    }

    /// Gives task `task` a network namespace with an interface on each of
    /// its networks (`eth0`, `eth1`, … in order; the default route via the
    /// first), `lo` up. Idempotent: a namespace already there (a container
    /// that outlived its agent) is kept as it is. Returns its path.
    pub async fn attach(&self, task: &str, atts: &[Attachment]) -> Result<PathBuf, OverlayError> {
        let path = self.netns_path(task);
        let mut st = self.state.lock().await;
        let mut bridges = Vec::new();
        for a in atts {
            let name = a.bridge();
            let index = match st.bridges.get(&name) {
                Some((i, _)) => *i,
                None => {
                    self.retire_stale_bridges(&mut st, &name, &a.subnet).await?;
                    self.nl.ensure_bridge(&name).await?
                }
            };
            // The node's address in the task's slice: the task's gateway.
            self.nl.add_address(index, a.gateway, a.prefix).await?;
            let rule = firewall::NetRule { bridge: name.clone(), subnet: a.subnet.clone(), internal: a.internal, ingress: a.network == INGRESS_NETWORK };
            st.members.entry(name.clone()).or_default().insert(task.to_string());
            st.bridges.insert(name, (index, rule));
            bridges.push(index);
            if st.dns_listening.insert(a.gateway) {
                match dns::serve(self.dns.clone(), a.gateway, self.shutdown.clone()).await {
                    Ok(()) => tracing::info!(network = %a.network, address = %a.gateway, "DNS answering tasks"),
                    Err(e) => {
                        st.dns_listening.remove(&a.gateway);
                        return Err(e);
                    }
                }
            }
        }
        st.local.insert(task.to_string(), atts.iter().map(|a| a.address).collect());
        self.apply_rules(&mut st).await?;
        drop(st);
        self.dns.add_asker(task, atts.iter().map(|a| (a.address, a.network.clone())).collect());
        let (p, t) = (path.clone(), task.to_string());
        let made = blocking("making the task's namespace", move || {
            if p.exists() {
                if netns::is_pinned(&p)? {
                    return Ok(false);
                }
                // The file outlived its mount (a reboot): make the namespace again.
                tracing::warn!(task = %t, path = %p.display(), "the task's namespace file is not a live namespace: made again");
                netns::remove(&p)?;
            }
            netns::create(&p).map(|()| true)
        })
        .await?;
        if !made {
            return Ok(path);
        }
        let made = self.wire(task, atts, &bridges, &path).await;
        if let Err(e) = made {
            let _ = self.detach(task, atts.len()).await;
            return Err(e);
        }
        Ok(path)
    }

    async fn wire(&self, task: &str, atts: &[Attachment], bridges: &[u32], path: &Path) -> Result<(), OverlayError> {
        let short = short_id(task);
        for (a, bridge) in atts.iter().zip(bridges) {
            self.nl.forget_neighbour(*bridge, a.address).await?;
        }
        for (i, bridge) in bridges.iter().enumerate() {
            self.nl.veth_into(&format!("shv{short}{i}"), &format!("shp{short}{i}"), path, *bridge).await?;
            if let Some(h) = self.nl.index(&format!("shv{short}{i}")).await? {
                self.nl.set_mtu(h, CONTAINER_MTU).await?;
            }
        }
        let (atts, path) = (atts.to_vec(), path.to_path_buf());
        // A thread that enters the namespace, joined: off the workers.
        blocking("wiring the task's namespace", move || netns::run_in(&path, move || {
            Box::pin(async move {
                let nl = Netlink::open()?;
                if let Some(lo) = nl.index("lo").await? {
                    nl.up(lo).await?;
                }
                for (i, a) in atts.iter().enumerate() {
                    let idx = nl.rename_up(&format!("shp{short}{i}"), &format!("eth{i}")).await?;
                    nl.set_mtu(idx, CONTAINER_MTU).await?;
                    // A /32 behind the node's gateway: even a neighbour on
                    // the same bridge is reached through the node.
                    nl.add_address(idx, a.address, 32).await?;
                    nl.add_route_dev(a.gateway, 32, idx).await?;
                    // The whole network through this interface's gateway:
                    // a task on two networks talks to each on its own.
                    let (net, len) = a.subnet_parts();
                    nl.add_route_via(net, len, a.gateway).await?;
                }
                if let Some(first) = atts.first() {
                    nl.add_default_route(first.gateway).await?;
                }
                Ok(())
            })
        }))
        .await
    }

    /// Removes task `task`'s interfaces (its `count` veths) and namespace.
    pub async fn detach(&self, task: &str, count: usize) -> Result<(), OverlayError> {
        self.dns.remove_asker(task);
        let short = short_id(task);
        {
            // Under the state lock: a task that attaches meanwhile either
            // joined the bridge's members first (the bridge stays) or
            // comes after its removal (and makes it again).
            let mut st = self.state.lock().await;
            let emptied: Vec<String> =
                st.members.iter_mut().filter_map(|(bridge, tasks)| (tasks.remove(task) && tasks.is_empty()).then(|| bridge.clone())).collect();
            let mut changed = st.local.remove(task).is_some();
            for bridge in emptied {
                // Not fatal: the task's own interfaces and namespace still go.
                match self.remove_bridge(&mut st, &bridge).await {
                    Ok(()) => changed = true,
                    Err(e) => tracing::warn!(task = %task, bridge = %bridge, error = %e, "could not remove the network's bridge: kept"),
                }
            }
            if changed {
                self.apply_rules(&mut st).await?;
            }
        }
        for i in 0..count.max(1) {
            self.nl.delete_named(&format!("shv{short}{i}")).await?;
        }
        let path = self.netns_path(task);
        blocking("removing the task's namespace", move || netns::remove(&path)).await
    }

    /// Deletes the bridge `bridge` (its last local task went): its gateway
    /// addresses go with it, and the caller's next rule set no longer
    /// names it.
    async fn remove_bridge(&self, st: &mut State, bridge: &str) -> Result<(), OverlayError> {
        if let Some((index, rule)) = st.bridges.get(bridge).cloned() {
            self.nl.delete(index).await?;
            st.bridges.remove(bridge);
            tracing::info!(bridge = %bridge, subnet = %rule.subnet, "the network's last task here is gone: its bridge removed");
        }
        st.members.remove(bridge);
        Ok(())
    }

    /// On a clean stop: when no task here has a network namespace (none
    /// attached, none pinned under the data dir), takes shoal's pieces out
    /// of the host's firewall and routing: its nftables table, its accepts
    /// in the host's forward chains, the mesh's policy rule. Tasks that
    /// outlive the daemon (they do, by design) keep them. Returns whether
    /// it removed them.
    pub async fn release_if_idle(&self) -> Result<bool, OverlayError> {
        let mut st = self.state.lock().await;
        let dir = self.netns_dir.clone();
        let pinned = blocking("listing the tasks' namespaces", move || match std::fs::read_dir(&dir) {
            Ok(mut entries) => Ok(entries.next().is_some()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(OverlayError::Io { what: format!("listing {}", dir.display()), source }),
        })
        .await?;
        if !st.local.is_empty() || pinned {
            return Ok(false);
        }
        let mut released = self.host_rules_released.lock().await;
        *released = true;
        blocking("removing shoal's nftables table", firewall::remove).await?;
        st.rules_applied = None;
        self.nl.del_rules_for_table(MESH_TABLE).await?;
        Ok(true)
    }

    /// Before a network gets its bridge here: the bridge of a network that
    /// had the same subnet and was removed (a network made again gets its
    /// subnet back) goes, once no local task uses it, so two bridges never
    /// hold one gateway address.
    async fn retire_stale_bridges(&self, st: &mut State, name: &str, subnet: &str) -> Result<(), OverlayError> {
        let stale: Vec<String> = st.bridges.iter().filter(|(b, (_, r))| b.as_str() != name && r.subnet == subnet).map(|(b, _)| b.clone()).collect();
        for bridge in stale {
            if st.members.get(&bridge).is_some_and(|m| !m.is_empty()) {
                tracing::warn!(bridge = %bridge, subnet, "a removed network's bridge still has tasks here: its gateway address clashes until they stop");
                continue;
            }
            if let Some((index, _)) = st.bridges.remove(&bridge) {
                st.members.remove(&bridge);
                self.nl.delete(index).await?;
                tracing::info!(bridge = %bridge, subnet, "bridge of a removed network deleted: its subnet is in use again");
            }
        }
        Ok(())
    }

    /// Bridges of networks no task here uses any more, left from before a
    /// restart: no port on them and not wired since.
    async fn remove_stray_bridges(&self) -> Result<(), OverlayError> {
        let st = self.state.lock().await;
        for (name, index, has_ports) in self.nl.links_with_prefix(BRIDGE_PREFIX).await? {
            if has_ports || st.bridges.contains_key(&name) {
                continue;
            }
            self.nl.delete(index).await?;
            tracing::info!(bridge = %name, "stray network bridge removed");
        }
        Ok(())
    }

    /// Namespaces of tasks this node no longer runs (`keep` are the ones
    /// it does).
    pub async fn remove_strays(&self, keep: &[String]) {
        let Ok(rd) = std::fs::read_dir(&self.netns_dir) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if keep.contains(&name) {
                continue;
            }
            if let Err(e) = self.detach(&name, 4).await {
                tracing::warn!(task = %name, error = %e, "could not remove a stray task namespace");
            }
        }
        if let Err(e) = self.remove_stray_bridges().await {
            tracing::warn!(error = %e, "could not remove stray network bridges");
        }
    }
}
