//! shoal's nftables table (`inet shoal`): isolation between overlay
//! networks and NAT for their egress. The whole table is replaced in one
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
}

/// A service's virtual IP on one network and the tasks behind it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct VipRule {
    pub vip: std::net::Ipv4Addr,
    pub backends: Vec<std::net::Ipv4Addr>,
}

/// The rule set for `nets`, as `nft -f` input.
pub fn ruleset(nets: &[NetRule], vips: &[VipRule], tun: &str, bridge_prefix: &str) -> String {
    let mut s = format!("add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    // Virtual IPs: each new connection goes to one of the service's tasks,
    // picked at random; conntrack keeps a connection on its task, so
    // replacing the map never moves open connections.
    s.push_str("  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n");
    for v in vips.iter().filter(|v| !v.backends.is_empty()) {
        let map: Vec<String> = v.backends.iter().enumerate().map(|(i, b)| format!("{i} : {b}")).collect();
        s.push_str(&format!("    ip daddr {} dnat ip to numgen random mod {} map {{ {} }}\n", v.vip, v.backends.len(), map.join(", ")));
    }
    s.push_str("  }\n");
    s.push_str("  chain forward {\n    type filter hook forward priority filter - 5; policy accept;\n");
    s.push_str("    ct state established,related accept\n");
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
    let set = |f: &dyn Fn(&NetRule) -> bool| {
        let items: Vec<&str> = nets.iter().filter(|n| f(n)).map(|n| n.subnet.as_str()).collect();
        (!items.is_empty()).then(|| format!("{{ {} }}", items.join(", ")))
    };
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
    if let Some(egress) = set(&|n| !n.internal) {
        s.push_str(&format!("    ip saddr {egress} oifname != \"{tun}\" oifname != \"{bridge_prefix}*\" masquerade\n"));
    }
    s.push_str("  }\n}\n");
    s
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
pub fn apply(nets: &[NetRule], vips: &[VipRule], tun: &str, bridge_prefix: &str) -> Result<(), OverlayError> {
    nft(&ruleset(nets, vips, tun, bridge_prefix))
}

/// Removes the table, if it is there.
pub fn remove() -> Result<(), OverlayError> {
    nft(&format!("add table inet {TABLE}\ndelete table inet {TABLE}\n"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rules_isolate_networks_and_nat_only_egress() {
        let nets = [
            NetRule { bridge: "shn000000000001".into(), subnet: "100.64.0.0/20".into(), internal: false },
            NetRule { bridge: "shn000000000002".into(), subnet: "100.64.16.0/20".into(), internal: true },
        ];
        let vips = [
            VipRule { vip: "100.64.15.193".parse().unwrap(), backends: vec!["100.64.0.2".parse().unwrap(), "100.64.0.66".parse().unwrap()] },
            VipRule { vip: "100.64.15.194".parse().unwrap(), backends: vec![] },
        ];
        let r = ruleset(&nets, &vips, "shoal0", "shn");
        assert!(r.contains("ip daddr 100.64.15.193 dnat ip to numgen random mod 2 map { 0 : 100.64.0.2, 1 : 100.64.0.66 }"), "{r}");
        assert!(r.contains("ip daddr { 100.64.15.194 } reject"));
        assert!(r.contains("ip saddr 100.64.0.0/20 ip daddr 100.64.0.0/20 accept"));
        assert!(r.contains("iifname \"shn000000000001\" ip saddr != 100.64.0.0/20 drop"));
        assert!(r.contains("ip daddr { 100.64.0.0/20, 100.64.16.0/20 } drop"));
        assert!(r.contains("ip saddr { 100.64.16.0/20 } drop"));
        assert!(r.contains("ip saddr { 100.64.0.0/20 } oifname != \"shoal0\" oifname != \"shn*\" masquerade"));
        // No networks: a valid, empty table.
        let empty = ruleset(&[], &[], "shoal0", "shn");
        assert!(!empty.contains("{  }") && !empty.contains("drop"));
    }
}
