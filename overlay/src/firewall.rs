//! shoal's nftables table (`inet shoal`): isolation between overlay
//! networks, NAT for their egress, virtual IPs, and the routing mesh for
//! published ports. The whole table is replaced in one
//! `nft -f` transaction each time the set of networks changes, so packets
//! never see a half-written rule set, and removing it is one command. It
//! uses only its own table: a host's Docker or firewall rules are neither
//! read nor changed.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::OverlayError;

pub const TABLE: &str = "shoal";

/// One overlay network as the firewall sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NetRule {
    /// The network's bridge on this node.
    pub bridge: String,
    /// `a.b.c.d/len`
    pub subnet: String,
    /// No egress beyond the overlay.
    pub internal: bool,
    /// The routing mesh's network: clients from outside the cluster reach
    /// its tasks through published ports.
    pub ingress: bool,
}

/// A published port on this node and the task addresses it forwards to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PublishRule {
    /// The service that publishes it (its counter's comment).
    pub service: String,
    pub port: u16,
    pub udp: bool,
    pub backends: Vec<(std::net::Ipv4Addr, u16)>,
}

/// conntrack mark of a connection this node's routing mesh forwarded.
pub const MARK_INGRESS: u32 = 0x5348_0001;
/// conntrack mark (and, on its replies, packet mark) of a connection
/// another node's routing mesh forwarded here: its replies are routed back
/// through the tunnel (policy routing on this mark), to that node.
pub const MARK_MESH_REPLY: u32 = 0x5348_0002;

/// What the table is made of.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    pub nets: Vec<NetRule>,
    pub vips: Vec<VipRule>,
    pub publish: Vec<PublishRule>,
    /// The cluster's address pool (`a.b.c.d/len`), once known: sources
    /// outside it that come through the tunnel are mesh clients.
    pub pool: Option<String>,
}

/// A service's virtual IP on one network and the tasks behind it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct VipRule {
    pub vip: std::net::Ipv4Addr,
    pub backends: Vec<std::net::Ipv4Addr>,
}

/// The rule set, as `nft -f` input.
pub fn ruleset(r: &Rules, tun: &str, bridge_prefix: &str) -> String {
    let (nets, vips) = (&r.nets, &r.vips);
    let mut s = format!("add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    // The routing mesh keeps the client's address as the source, so a
    // task's reply to it must go back through the node the connection
    // came in at, not out of this node's own underlay: mark connections
    // that arrive through the tunnel from outside the pool, and their
    // replies, which a policy route sends into the tunnel.
    s.push_str("  chain mesh_mark {\n    type filter hook prerouting priority mangle; policy accept;\n");
    if let Some(pool) = &r.pool {
        s.push_str(&format!("    iifname \"{tun}\" ip saddr != {pool} ct state new ct mark set {MARK_MESH_REPLY:#x}\n"));
        s.push_str(&format!("    iifname \"{bridge_prefix}*\" ct mark {MARK_MESH_REPLY:#x} meta mark set {MARK_MESH_REPLY:#x}\n"));
    }
    s.push_str("  }\n");
    // Virtual IPs: each new connection goes to one of the service's tasks,
    // picked at random; conntrack keeps a connection on its task, so
    // replacing the map never moves open connections.
    s.push_str("  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n");
    for v in vips.iter().filter(|v| !v.backends.is_empty()) {
        let map: Vec<String> = v.backends.iter().enumerate().map(|(i, b)| format!("{i} : {b}")).collect();
        s.push_str(&format!("    ip daddr {} dnat ip to numgen random mod {} map {{ {} }}\n", v.vip, v.backends.len(), map.join(", ")));
    }
    // Published ports: any address of this node, balanced the same way
    // over the tasks wherever they run (the tunnel takes it there).
    let publish = |s: &mut String, extra: &str| {
        for p in r.publish.iter().filter(|p| !p.backends.is_empty()) {
            let map: Vec<String> = p.backends.iter().enumerate().map(|(i, (a, port))| format!("{i} : {a} . {port}")).collect();
            // The counter sees the first packet of each connection (a nat
            // chain): the autoscaler's requests per second.
            s.push_str(&format!(
                "    fib daddr type local {extra}{} dport {} counter ct mark set {MARK_INGRESS:#x} dnat ip to numgen random mod {} map {{ {} }} comment \"{COUNTER_PREFIX}{}\"\n",
                if p.udp { "udp" } else { "tcp" },
                p.port,
                p.backends.len(),
                map.join(", "),
                p.service
            ));
        }
    };
    publish(&mut s, "");
    s.push_str("  }\n");
    // The node's own processes reach published ports on its addresses too
    // (loopback excepted: a DNAT'd packet can't leave with 127.0.0.1).
    s.push_str("  chain local_out {\n    type nat hook output priority -100; policy accept;\n");
    publish(&mut s, "ip daddr != 127.0.0.0/8 ");
    s.push_str("  }\n");
    s.push_str("  chain input {\n    type filter hook input priority filter - 5; policy accept;\n");
    if let Some(pool) = &r.pool {
        // Mesh clients come through the tunnel only to reach tasks.
        s.push_str(&format!("    iifname \"{tun}\" ip saddr != {pool} drop\n"));
    }
    s.push_str("  }\n");
    s.push_str("  chain forward {\n    type filter hook forward priority filter - 5; policy accept;\n");
    s.push_str("    ct state established,related accept\n");
    // A connection this node's mesh forwarded (to a task here or through
    // the tunnel); its DNAT picked a task of the published service.
    s.push_str(&format!("    ct mark {MARK_INGRESS:#x} accept\n"));
    let set = |f: &dyn Fn(&NetRule) -> bool| {
        let items: Vec<&str> = nets.iter().filter(|n| f(n)).map(|n| n.subnet.as_str()).collect();
        (!items.is_empty()).then(|| format!("{{ {} }}", items.join(", ")))
    };
    if let Some(pool) = &r.pool {
        // A connection another node's mesh sent here: only into the mesh's
        // network; nothing else from outside the pool comes through the
        // tunnel.
        if let Some(ingress) = set(&|n| n.ingress) {
            s.push_str(&format!("    iifname \"{tun}\" ct mark {MARK_MESH_REPLY:#x} ip daddr {ingress} accept\n"));
        }
        s.push_str(&format!("    iifname \"{tun}\" ip saddr != {pool} drop\n"));
    }
    // A virtual IP with no task behind it: refused at once, never routed on.
    let idle: Vec<String> = vips.iter().filter(|v| v.backends.is_empty()).map(|v| v.vip.to_string()).collect();
    if !idle.is_empty() {
        s.push_str(&format!("    ip daddr {{ {} }} reject\n", idle.join(", ")));
    }
    // A task speaks only from its own network: a spoofed source never
    // gets past its bridge.
    for n in nets {
        s.push_str(&format!("    iifname \"{}\" ip saddr != {} drop\n", n.bridge, n.subnet));
    }
    // Within one network: allowed, on this host and across hosts.
    for n in nets {
        s.push_str(&format!("    ip saddr {0} ip daddr {0} accept\n", n.subnet));
    }
    // Into a network from anywhere else (another network, the underlay):
    // refused unless it answers a connection the network opened.
    if let Some(all) = set(&|_| true) {
        s.push_str(&format!("    ip daddr {all} drop\n"));
        // Overlay traffic never leaves in the clear: a slice with no route
        // through the tunnel (yet) is unreachable, not sent to the underlay.
        s.push_str(&format!("    oifname != \"{tun}\" oifname != \"{bridge_prefix}*\" ip daddr {all} drop\n"));
    }
    if let Some(internal) = set(&|n| n.internal) {
        s.push_str(&format!("    ip saddr {internal} drop\n"));
    }
    s.push_str("  }\n");
    s.push_str("  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n");
    // A connection this node's mesh hands to a task here keeps the
    // client's address, with a source port below the ones the data plane
    // gives flows tunnelled in from other nodes (`meshflow`): one client
    // port through this node and another can't meet as one 4-tuple at the
    // task.
    s.push_str(&format!(
        "    ct mark {MARK_INGRESS:#x} oifname \"{bridge_prefix}*\" meta l4proto {{ tcp, udp }} snat ip to ip saddr : 1024-{}\n",
        crate::meshflow::ALIAS_PORTS.start() - 1
    ));
    if let Some(egress) = set(&|n| !n.internal) {
        s.push_str(&format!("    ip saddr {egress} oifname != \"{tun}\" oifname != \"{bridge_prefix}*\" masquerade\n"));
    }
    s.push_str("  }\n}\n");
    s
}

/// Marks the routing mesh's counters in rule comments.
const COUNTER_PREFIX: &str = "mesh ";

/// Connections the routing mesh forwarded per service since the table was
/// last written, from `nft list table` output.
pub fn parse_counters(listing: &str) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for line in listing.lines() {
        let Some(at) = line.find(&format!("comment \"{COUNTER_PREFIX}")) else { continue };
        let service = line[at + 9 + COUNTER_PREFIX.len()..].trim_end().trim_end_matches('"').to_string();
        let packets = line
            .split_once("counter packets ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(n) = packets {
            *out.entry(service).or_default() += n;
        }
    }
    out
}

/// Reads the routing mesh's counters.
pub fn counters() -> Result<std::collections::BTreeMap<String, u64>, OverlayError> {
    let err = |source| OverlayError::Io { what: "running nft".into(), source };
    let out = Command::new("nft").args(["list", "table", "inet", TABLE]).stderr(Stdio::piped()).output().map_err(err)?;
    if !out.status.success() {
        return Err(OverlayError::Nft(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(parse_counters(&String::from_utf8_lossy(&out.stdout)))
}

fn nft(input: &str) -> Result<(), OverlayError> {
    let err = |source| OverlayError::Io { what: "running nft".into(), source };
    let mut child = Command::new("nft")
        .arg("-f")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(err)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(err)?;
    }
    let out = child.wait_with_output().map_err(err)?;
    if !out.status.success() {
        return Err(OverlayError::Nft(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

/// Installs (or replaces) the table.
pub fn apply(rules: &Rules, tun: &str, bridge_prefix: &str) -> Result<(), OverlayError> {
    nft(&ruleset(rules, tun, bridge_prefix))
}

/// Removes the table, if it is there, and the accept rules shoal put in
/// the host's forward chains.
pub fn remove() -> Result<(), OverlayError> {
    remove_host_accepts()?;
    nft(&format!("add table inet {TABLE}\ndelete table inet {TABLE}\n"))
}

// A packet passes a netfilter hook only if every base chain on it accepts
// (an accept ends one chain, not the hook): a host whose own forward chain
// drops by default (Docker sets `ip filter FORWARD` to policy drop) drops
// what `inet shoal` let through. As Docker does for its bridges, shoal puts
// accept rules for its own interfaces at the top of each such chain, marked
// with a comment; its own chain (at a lower priority, so first) has already
// dropped what it must, and nothing else of the host's rules changes.

/// The comment that marks the rules shoal adds to the host's chains.
pub const HOST_RULE_COMMENT: &str = "shoal overlay";

/// A base chain of another table on the forward hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostChain {
    pub family: String,
    pub table: String,
    pub chain: String,
}

impl std::fmt::Display for HostChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.family, self.table, self.chain)
    }
}

/// The IPv4 base chains on the forward hook in `nft list chains` output,
/// shoal's own table excepted.
pub fn forward_chains(listing: &str) -> Vec<HostChain> {
    let (mut table, mut chain): (Option<(String, String)>, Option<String>) = (None, None);
    let mut out = Vec::new();
    for line in listing.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["table", family, name, "{"] => table = Some((family.to_string(), name.to_string())),
            ["chain", name, "{", ..] => chain = Some(name.to_string()),
            _ if line.starts_with("type ") && words.windows(2).any(|w| w == ["hook", "forward"]) => {
                if let (Some((family, t)), Some(c)) = (&table, &chain)
                    && (family == "ip" || family == "inet")
                    && !(family == "inet" && t == TABLE)
                {
                    out.push(HostChain { family: family.clone(), table: t.clone(), chain: c.clone() });
                }
            }
            _ => {}
        }
    }
    out
}

/// Handles of shoal's rules in a `nft -a list chain` listing.
fn marked_handles(listing: &str) -> Vec<u64> {
    listing
        .lines()
        .filter(|l| l.contains(&format!("comment \"{HOST_RULE_COMMENT}\"")))
        .filter_map(|l| l.rsplit_once("# handle ").and_then(|(_, h)| h.trim().parse().ok()))
        .collect()
}

/// What shoal needs every forward chain to accept: its bridges and its
/// tunnel, both ways.
fn host_accepts(tun: &str, bridge_prefix: &str) -> Vec<String> {
    let ifs = [format!("{bridge_prefix}*"), tun.to_string()];
    ifs.iter()
        .flat_map(|i| ["iifname", "oifname"].map(|dir| format!("{dir} \"{i}\" accept comment \"{HOST_RULE_COMMENT}\"")))
        .collect()
}

/// The `nft -f` script that puts shoal's accepts at the top of each chain
/// (dropping an incomplete earlier set) or, with `install` false, only
/// removes them. Chains that already hold the whole set are left alone.
fn host_accepts_script(chains: &[(HostChain, Vec<u64>)], tun: &str, bridge_prefix: &str, install: bool) -> String {
    let rules = host_accepts(tun, bridge_prefix);
    let mut s = String::new();
    for (c, handles) in chains {
        if install && handles.len() == rules.len() {
            continue;
        }
        for h in handles {
            s.push_str(&format!("delete rule {} {} {} handle {h}\n", c.family, c.table, c.chain));
        }
        if install {
            // Each insert goes to the top: the last one ends up first.
            for r in rules.iter().rev() {
                s.push_str(&format!("insert rule {} {} {} {r}\n", c.family, c.table, c.chain));
            }
        }
    }
    s
}

fn nft_output(args: &[&str]) -> Result<String, OverlayError> {
    let err = |source| OverlayError::Io { what: "running nft".into(), source };
    let out = Command::new("nft").args(args).stderr(Stdio::piped()).output().map_err(err)?;
    if !out.status.success() {
        return Err(OverlayError::Nft(format!("nft {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The host's forward chains with the handles of shoal's rules in each.
fn host_chains() -> Result<Vec<(HostChain, Vec<u64>)>, OverlayError> {
    let mut out = Vec::new();
    for c in forward_chains(&nft_output(&["list", "chains"])?) {
        let listing = nft_output(&["-a", "list", "chain", &c.family, &c.table, &c.chain])?;
        out.push((c, marked_handles(&listing)));
    }
    Ok(out)
}

/// Makes every other base chain on the forward hook accept shoal's
/// interfaces; returns the chains it had to change (none when all were
/// in place).
pub fn ensure_host_accepts(tun: &str, bridge_prefix: &str) -> Result<Vec<HostChain>, OverlayError> {
    let chains = host_chains()?;
    let script = host_accepts_script(&chains, tun, bridge_prefix, true);
    if script.is_empty() {
        return Ok(Vec::new());
    }
    nft(&script)?;
    let n = host_accepts(tun, bridge_prefix).len();
    Ok(chains.into_iter().filter(|(_, h)| h.len() != n).map(|(c, _)| c).collect())
}

/// Removes the rules [`ensure_host_accepts`] added; returns the chains it
/// removed them from.
pub fn remove_host_accepts() -> Result<Vec<HostChain>, OverlayError> {
    let chains: Vec<(HostChain, Vec<u64>)> = host_chains()?.into_iter().filter(|(_, h)| !h.is_empty()).collect();
    if chains.is_empty() {
        return Ok(Vec::new());
    }
    nft(&host_accepts_script(&chains, "", "", false))?;
    Ok(chains.into_iter().map(|(c, _)| c).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rules_isolate_networks_and_nat_only_egress() {
        let nets = vec![
            NetRule { bridge: "shn000000000001".into(), subnet: "100.64.0.0/20".into(), internal: false, ingress: false },
            NetRule { bridge: "shn000000000002".into(), subnet: "100.64.16.0/20".into(), internal: true, ingress: false },
        ];
        let vips = vec![
            VipRule { vip: "100.64.15.193".parse().unwrap(), backends: vec!["100.64.0.2".parse().unwrap(), "100.64.0.66".parse().unwrap()] },
            VipRule { vip: "100.64.15.194".parse().unwrap(), backends: vec![] },
        ];
        let r = ruleset(&Rules { nets, vips, ..Default::default() }, "shoal0", "shn");
        assert!(r.contains("ip daddr 100.64.15.193 dnat ip to numgen random mod 2 map { 0 : 100.64.0.2, 1 : 100.64.0.66 }"), "{r}");
        assert!(r.contains("ip daddr { 100.64.15.194 } reject"));
        assert!(r.contains("ip saddr 100.64.0.0/20 ip daddr 100.64.0.0/20 accept"));
        assert!(r.contains("iifname \"shn000000000001\" ip saddr != 100.64.0.0/20 drop"));
        assert!(r.contains("ip daddr { 100.64.0.0/20, 100.64.16.0/20 } drop"));
        assert!(r.contains("ip saddr { 100.64.16.0/20 } drop"));
        assert!(r.contains("ip saddr { 100.64.0.0/20 } oifname != \"shoal0\" oifname != \"shn*\" masquerade"));
        // No networks: a valid, empty table.
        let empty = ruleset(&Rules::default(), "shoal0", "shn");
        assert!(!empty.contains("{  }") && !empty.contains("drop"));
    }

    #[test]
    fn published_ports_forward_from_every_address_and_mark_their_replies() {
        let nets = vec![NetRule { bridge: "shn1e5500000000".into(), subnet: "100.64.0.0/20".into(), internal: false, ingress: true }];
        let publish = vec![
            PublishRule { service: "web".into(), port: 8080, udp: false, backends: vec![("100.64.0.2".parse().unwrap(), 80), ("100.64.0.66".parse().unwrap(), 80)] },
            PublishRule { service: "dns".into(), port: 5353, udp: true, backends: vec![] },
        ];
        let r = ruleset(&Rules { nets, publish, pool: Some("100.64.0.0/10".into()), ..Default::default() }, "shoal0", "shn");
        assert!(
            r.contains("fib daddr type local tcp dport 8080 counter ct mark set 0x53480001 dnat ip to numgen random mod 2 map { 0 : 100.64.0.2 . 80, 1 : 100.64.0.66 . 80 } comment \"mesh web\""),
            "{r}"
        );
        assert!(r.contains("fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 8080"));
        // A port with no task behind it is not forwarded anywhere.
        assert!(!r.contains("dport 5353"));
        assert!(r.contains("iifname \"shoal0\" ip saddr != 100.64.0.0/10 ct state new ct mark set 0x53480002"));
        assert!(r.contains("iifname \"shn*\" ct mark 0x53480002 meta mark set 0x53480002"));
        assert!(r.contains("iifname \"shoal0\" ct mark 0x53480002 ip daddr { 100.64.0.0/20 } accept"));
        // To a task here: the client's address, a port below the data
        // plane's (see meshflow).
        assert!(r.contains("ct mark 0x53480001 oifname \"shn*\" meta l4proto { tcp, udp } snat ip to ip saddr : 1024-32767"), "{r}");
        let forward = &r[r.find("chain forward").unwrap()..];
        // Mesh traffic is let in before isolation drops what is left.
        assert!(forward.find("ct mark 0x53480001 accept").unwrap() < forward.find("ip daddr { 100.64.0.0/20 } drop").unwrap());
    }

    #[test]
    fn host_forward_chains_get_accepts_for_shoals_interfaces_only() {
        let listing = "table ip filter {\n\tchain FORWARD {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n\tchain DOCKER-USER {\n\t}\n\tchain INPUT {\n\t\ttype filter hook input priority filter; policy accept;\n\t}\n}\n\
                       table inet shoal {\n\tchain forward {\n\t\ttype filter hook forward priority filter - 5; policy accept;\n\t}\n}\n\
                       table inet fw {\n\tchain forwarding {\n\t\ttype filter hook forward priority filter + 10; policy accept;\n\t}\n}\n\
                       table ip6 filter {\n\tchain FORWARD {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n}\n\
                       table bridge filter {\n\tchain FORWARD {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n}\n";
        let chains = forward_chains(listing);
        let names: Vec<String> = chains.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["ip filter FORWARD", "inet fw forwarding"]);
        let chain = "table ip filter {\n\tchain FORWARD { # handle 1\n\t\ttype filter hook forward priority filter; policy drop;\n\
                     \t\tiifname \"shn*\" accept comment \"shoal overlay\" # handle 7\n\t\tiifname \"docker0\" accept # handle 3\n\t}\n}\n";
        assert_eq!(marked_handles(chain), vec![7]);
        // An incomplete set is replaced, a complete one left alone.
        let with = vec![(chains[0].clone(), vec![7]), (chains[1].clone(), vec![1, 2, 3, 4])];
        let script = host_accepts_script(&with, "shoal0", "shn", true);
        assert_eq!(
            script,
            "delete rule ip filter FORWARD handle 7\n\
             insert rule ip filter FORWARD oifname \"shoal0\" accept comment \"shoal overlay\"\n\
             insert rule ip filter FORWARD iifname \"shoal0\" accept comment \"shoal overlay\"\n\
             insert rule ip filter FORWARD oifname \"shn*\" accept comment \"shoal overlay\"\n\
             insert rule ip filter FORWARD iifname \"shn*\" accept comment \"shoal overlay\"\n"
        );
        // Removal deletes only shoal's rules.
        assert_eq!(
            host_accepts_script(&with, "", "", false),
            "delete rule ip filter FORWARD handle 7\ndelete rule inet fw forwarding handle 1\ndelete rule inet fw forwarding handle 2\n\
             delete rule inet fw forwarding handle 3\ndelete rule inet fw forwarding handle 4\n"
        );
    }

    #[test]
    fn counters_are_read_per_service() {
        let listing = "\t\tfib daddr type local tcp dport 8080 counter packets 12 bytes 720 ct mark set 0x53480001 dnat ip to numgen random mod 1 map { 0 : 100.64.0.2 . 80 } comment \"mesh web\"\n\
                       \t\tfib daddr type local ip daddr != 127.0.0.0/8 tcp dport 8080 counter packets 3 bytes 180 ct mark set 0x53480001 dnat ip to numgen random mod 1 map { 0 : 100.64.0.2 . 80 } comment \"mesh web\"\n\
                       \t\tip daddr 100.64.15.193 dnat ip to 100.64.0.2\n";
        assert_eq!(parse_counters(listing), std::collections::BTreeMap::from([("web".to_string(), 15)]));
    }
}
