//! The agent's session with the managers: register and heartbeat, follow the
//! leader, fail over to another manager when one goes away.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shoal_security::identity::{self, Identity, Role};
use shoal_security::Trust;
use shoal_proto::dispatcher::dispatcher_client::DispatcherClient;
use shoal_overlay::{Overlay, PeerConfig};
use shoal_proto::dispatcher::{HeartbeatRequest, HeartbeatResponse, Peer, Resources, ServiceRate, TaskUsage};

pub(crate) struct Session {
    pub data_dir: PathBuf,
    pub node_id: u64,
    pub tls: Arc<Trust>,
    pub advertise: String,
    pub managers: Vec<String>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Publishes the manager this session currently talks to (the leader
    /// when it can be reached), for the task runner.
    pub current: tokio::sync::watch::Sender<Option<String>>,
    /// The role this node's components run as; when the managers say
    /// otherwise (with a new certificate), the session records it and
    /// raises `role_changed`.
    pub role: Role,
    pub role_changed: tokio::sync::watch::Sender<Option<Role>>,
    /// This node's load, sent with each heartbeat.
    pub load: Arc<crate::load::LoadMeter>,
    /// The node's overlay: its identity goes out with each heartbeat, and
    /// the peers come back when they change.
    pub overlay: Option<Arc<Overlay>>,
    /// The node's named volumes: reported with their sizes every
    /// VOLUME_REPORT, and deleted when the managers say they are gone.
    pub volumes: Arc<crate::volume::Volumes>,
    /// The peer set version the service view says the managers have: when
    /// it is not the one applied, the next heartbeat comes early (no sooner
    /// than the managers' `soonest_ms`), so a node that joins or comes back
    /// is a peer everywhere in well under a period.
    pub peers_wanted: tokio::sync::watch::Receiver<u64>,
}

/// How often the volumes' sizes are measured and sent.
const VOLUME_REPORT: Duration = Duration::from_secs(5);

fn resources() -> Resources {
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    Resources { nano_cpus: cpus * 1_000_000_000, memory_bytes: mem_kb * 1024 }
}

pub(crate) async fn run(mut s: Session) {
    let res = resources();
    let mut period = Duration::from_millis(500);
    let mut soonest = Duration::from_millis(500);
    let mut last_ok = tokio::time::Instant::now();
    let mut idx = 0usize;
    let mut preferred: Option<String> = None;
    // The peer set applied to the overlay (0: none yet), as the managers
    // sent it (this node included): deltas apply to it.
    let mut peers_version = 0u64;
    let mut peers: std::collections::BTreeMap<u64, Peer> = std::collections::BTreeMap::new();
    // The manager list in `s.managers` as the managers versioned it (0: not
    // from them yet); they send the list only when it changed.
    let mut managers_version = 0u64;
    let mut jitter = Jitter::new(s.node_id);
    let mut volumes_at: Option<std::time::Instant> = None;
    loop {
        let target = preferred.clone().or_else(|| s.managers.get(idx % s.managers.len().max(1)).cloned());
        let mut ok = false;
        if let Some(addr) = target.clone() {
            let load = s.load.sample(s.overlay.as_deref()).await;
            let volumes = if volumes_at.is_none_or(|t| t.elapsed() >= VOLUME_REPORT) {
                let v = s.volumes.clone();
                tokio::task::spawn_blocking(move || v.list()).await.ok()
            } else {
                None
            };
            let volumes_sent = volumes.is_some();
            // One connection per manager for heartbeats, reports and streams
            // (a TLS handshake per heartbeat was most of a big cluster's
            // leader CPU), kept through errors and timeouts: dropping it on
            // a slow answer made every agent handshake again just when the
            // leader was busiest. A new certificate or CA bundle starts a
            // new one.
            let channel = s.tls.shared_channel(&addr).map_err(|e| HbError::Other(e.to_string()));
            let result = match channel {
                Ok(channel) => {
                    heartbeat(&s, channel, &addr, &res, (peers_version, managers_version), load, volumes).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(r) => {
                    ok = true;
                    if !r.remove_volumes.is_empty() {
                        let (v, ids) = (s.volumes.clone(), r.remove_volumes.clone());
                        if let Err(e) = tokio::task::spawn_blocking(move || v.remove_ids(&ids)).await {
                            tracing::warn!(error = %e, "deleting removed volumes failed");
                        }
                    }
                    if volumes_sent {
                        volumes_at = Some(std::time::Instant::now());
                    }
                    period = Duration::from_millis(r.period_ms.clamp(100, 10_000));
                    soonest = Duration::from_millis(r.soonest_ms.clamp(100, 10_000)).min(period);
                    last_ok = tokio::time::Instant::now();
                    let (managers, role, cert) = (r.managers, Role::parse(&r.role), r.cert_pem);
                    if r.peers_changed
                        && let Some(o) = &s.overlay
                    {
                        let pool = r.address_pool.split_once('/').and_then(|(n, l)| Some((n.parse().ok()?, l.parse::<u8>().ok().filter(|l| *l <= 32)?)));
                        if pool.is_none() && !r.address_pool.is_empty() {
                            tracing::warn!(pool = %r.address_pool, "the managers sent an address pool that is no IPv4 CIDR: routing-mesh clients are refused");
                        }
                        tracing::debug!(delta = r.peers_delta, sent = r.peers.len(), removed = r.peers_removed.len(), "overlay peers changed");
                        let next = apply_peers(&peers, r.peers_delta, r.peers, &r.peers_removed);
                        let list: Vec<Peer> = next.values().cloned().collect();
                        match o.set_peers(peer_configs(s.node_id, &list), pool).await {
                            Ok(()) => (peers_version, peers) = (r.peers_version, next),
                            Err(e) => tracing::warn!(error = %e, "could not apply the overlay peers; retrying"),
                        }
                    }
                    if r.revoked_changed {
                        tracing::info!(revoked = r.revoked.len(), "certificate revocation list updated");
                        s.tls.set_revoked(r.revoked_version, r.revoked);
                    }
                    if !r.ca_pem.is_empty() {
                        trust_bundle(&s, &r.ca_pem);
                    }
                    if !cert.is_empty() && role == Some(s.role) {
                        renew(&s, &cert);
                    }
                    if let Some(new_role) = role.filter(|r| *r != s.role && !cert.is_empty()) {
                        match identity::apply_role_change(&s.data_dir, new_role, &cert) {
                            Ok(()) => {
                                tracing::info!(role = new_role.as_str(), "the managers changed this node's role");
                                let _ = s.role_changed.send(Some(new_role));
                                return;
                            }
                            Err(e) => tracing::warn!(error = %e, "could not record the new role"),
                        }
                    }
                    if !managers.is_empty() {
                        managers_version = r.managers_version;
                        if managers != s.managers {
                            s.managers = managers;
                            remember_managers(&s);
                        }
                    }
                    s.current.send_if_modified(|c| {
                        let changed = c.as_deref() != Some(addr.as_str());
                        *c = Some(addr.clone());
                        changed
                    });
                    preferred = Some(addr);
                }
                Err(HbError::Redirect(leader)) => {
                    preferred = Some(leader);
                    continue;
                }
                Err(HbError::Other(e)) => {
                    tracing::debug!(manager = %addr, error = %e, "heartbeat failed; trying another manager");
                    preferred = None;
                    idx += 1;
                }
            }
        }
        // Jittered, so that a cluster's agents spread over the period
        // instead of arriving together (after a leader change, say).
        let wait = if ok { jitter.within(period) } else { Duration::from_millis(200) };
        let mut wanted = s.peers_wanted.clone();
        let stale_peers = async {
            // Peers newer than ours exist: fetch them once the managers
            // allow another heartbeat.
            if wanted.wait_for(|v| *v != 0 && *v != peers_version).await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep_until(last_ok + soonest).await;
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stale_peers, if ok && s.overlay.is_some() => tracing::debug!("the service view says the overlay peers changed: heartbeating early"),
            _ = s.shutdown.changed() => return,
        }
    }
}

/// Trusts the CA bundle the managers sent (a CA rotation: both CAs, then
/// only the new one).
fn trust_bundle(s: &Session, ca_pem: &str) {
    let mut files = s.tls.files();
    files.ca_pem = ca_pem.to_string();
    if install(s, files, "tls/ca.pem", ca_pem, "CA bundle") {
        tracing::info!(cas = ?shoal_security::pki::pem_common_names(ca_pem), "trusting the cluster's CA bundle");
    }
}

/// Switches to the renewed certificate the managers sent (same key, same
/// role): new connections present it, and it is on disk for a restart.
fn renew(s: &Session, cert_pem: &str) {
    let mut files = s.tls.files();
    if files.cert_pem == cert_pem {
        return;
    }
    files.cert_pem = cert_pem.to_string();
    if install(s, files, "tls/node.pem", cert_pem, "certificate") {
        let me = s.tls.me();
        tracing::info!(serial = %me.serial, expires_at_ms = me.not_after_ms, "node certificate renewed");
    }
}

/// Puts `files` in use and `contents` (what changed) on disk at `file`;
/// false when the material is unusable (the current one stays).
fn install(s: &Session, files: shoal_security::NodeTls, file: &str, contents: &str, what: &str) -> bool {
    if let Err(e) = s.tls.install(files) {
        tracing::warn!(error = %e, "the managers sent a {what} this node can't use; keeping the current one");
        return false;
    }
    if let Err(e) = identity::write_file(&s.data_dir.join(file), contents, false) {
        tracing::warn!(error = %e, "could not save the new {what}; it is in use until the next restart");
    }
    true
}

enum HbError {
    Redirect(String),
    Other(String),
}

async fn heartbeat(
    s: &Session,
    channel: tonic::transport::Channel,
    addr: &str,
    res: &Resources,
    (peers_version, managers_version): (u64, u64),
    (usage, rates): (Vec<TaskUsage>, Vec<ServiceRate>),
    volumes: Option<Vec<crate::volume::LocalVolume>>,
) -> Result<HeartbeatResponse, HbError> {
    let mut client = DispatcherClient::new(channel);
    let call = client.heartbeat(HeartbeatRequest {
        node_id: s.node_id,
        resources: Some(*res),
        address: s.advertise.clone(),
        overlay_key: s.overlay.as_ref().map(|o| o.public_key().to_string()).unwrap_or_default(),
        overlay_endpoint: s.overlay.as_ref().map(|o| o.endpoint().to_string()).unwrap_or_default(),
        peers_version,
        accepts_peer_deltas: s.overlay.is_some(),
        managers_version,
        usage,
        rates,
        volumes_sent: volumes.is_some(),
        revoked_version: s.tls.revoked_version(),
        ca_digest: shoal_security::pki::bundle_digest(&s.tls.files().ca_pem),
        volumes: volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| shoal_proto::dispatcher::LocalVolume { name: v.name, id: v.id, size: v.size })
            .collect(),
    });
    match tokio::time::timeout(Duration::from_secs(2), call).await {
        Err(_) => Err(HbError::Other("timed out".into())),
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(st)) => match st.metadata().get("shoal-leader").and_then(|v| v.to_str().ok()) {
            Some(l) if !l.is_empty() && l != addr => Err(HbError::Redirect(l.to_string())),
            _ => Err(HbError::Other(st.message().to_string())),
        },
    }
}

/// The peer set after a heartbeat's answer: `sent` replaces `had`, or,
/// as a delta, adds or replaces the peers in it and drops `removed`.
fn apply_peers(had: &std::collections::BTreeMap<u64, Peer>, delta: bool, sent: Vec<Peer>, removed: &[u64]) -> std::collections::BTreeMap<u64, Peer> {
    let mut next = if delta { had.clone() } else { std::collections::BTreeMap::new() };
    for id in removed {
        next.remove(id);
    }
    next.extend(sent.into_iter().map(|p| (p.node_id, p)));
    next
}

/// The managers' peers as the data plane takes them; a peer the managers
/// describe badly is left out (and said so), never half-applied.
fn peer_configs(me: u64, peers: &[Peer]) -> Vec<PeerConfig> {
    peers
        .iter()
        .filter(|p| p.node_id != me)
        .filter_map(|p| {
            let parsed = (|| {
                let public_key = shoal_overlay::keys::decode_key(&p.public_key)?;
                let endpoint = p.endpoint.parse().map_err(|_| format!("endpoint {:?}", p.endpoint))?;
                let allowed = p
                    .allowed_ips
                    .iter()
                    .map(|c| {
                        let (a, l) = c.split_once('/').ok_or_else(|| format!("allowed ip {c:?}"))?;
                        let a = a.parse().map_err(|_| format!("allowed ip {c:?}"))?;
                        let l = l.parse::<u8>().ok().filter(|l| *l <= 32).ok_or_else(|| format!("allowed ip {c:?}"))?;
                        Ok::<_, String>((a, l))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, String>(PeerConfig { node_id: p.node_id, name: p.name.clone(), public_key, endpoint, allowed })
            })();
            parsed.map_err(|why| tracing::warn!(peer = %p.name, why = %why, "overlay peer left out")).ok()
        })
        .collect()
}

fn remember_managers(s: &Session) {
    let saved = Identity::load(&s.data_dir).and_then(|mut id| {
        id.managers = s.managers.clone();
        id.save(&s.data_dir)
    });
    if let Err(e) = saved {
        tracing::warn!(error = %e, "could not record the manager list");
    }
}

/// Heartbeat waits between 3/4 of the period and all of it (xorshift, seeded
/// by the node and the clock: no two agents in step).
struct Jitter(u64);

impl Jitter {
    fn new(node: u64) -> Self {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Jitter((node ^ t.rotate_left(17)) | 1)
    }

    fn within(&mut self, period: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let quarter = period / 4;
        period - quarter.mul_f64((self.0 % 1024) as f64 / 1024.0)
    }
}

#[cfg(test)]
mod peer_tests {
    use super::*;

    fn peer(id: u64, endpoint: &str) -> Peer {
        Peer { node_id: id, name: format!("n{id}"), public_key: String::new(), endpoint: endpoint.into(), allowed_ips: Vec::new() }
    }

    #[test]
    fn whole_lists_replace_and_deltas_patch() {
        let had: std::collections::BTreeMap<u64, Peer> = (1..=3).map(|i| (i, peer(i, "a"))).collect();
        let whole = apply_peers(&had, false, vec![peer(7, "a")], &[]);
        assert_eq!(whole.keys().copied().collect::<Vec<_>>(), vec![7]);
        let patched = apply_peers(&had, true, vec![peer(2, "b"), peer(4, "a")], &[1]);
        assert_eq!(patched.keys().copied().collect::<Vec<_>>(), vec![2, 3, 4]);
        assert_eq!(patched[&2].endpoint, "b");
    }
}
