//! Routing-mesh flows on the node that runs the task.
//!
//! The mesh keeps the client's address: a connection another node forwards
//! here arrives through the tunnel as (client ip:port → task ip:port). One
//! client may use the same source port toward two nodes at once (Linux
//! picks ports per destination), and both nodes may pick the same task:
//! the task would see one 4-tuple for two connections, and the second
//! SYN would reset the first. So each flow is keyed by the peer it came
//! through as well, and where its 4-tuple is already taken here its source
//! port is rewritten to a free one (the client's address is kept); the
//! task's replies get the original port back and go to that peer.
//!
//! Rewritten ports come from [`ALIAS_PORTS`]; connections this node's own
//! mesh sends to a task here are source-NATed by the kernel into the ports
//! below it (`firewall`), so the two kinds never share a 4-tuple either.
//! A flow's 4-tuple stays reserved until the flow has been idle for
//! [`FLOW_IDLE_SECS`], well past the task's TIME_WAIT.

use std::collections::HashMap;
use std::net::SocketAddr;

/// Ports a tunnelled mesh flow may be given here; the kernel's SNAT for
/// this node's own mesh uses the ports below.
pub const ALIAS_PORTS: std::ops::RangeInclusive<u16> = 32768..=65535;
/// Flows remembered at most; past that a new flow's packets are dropped
/// (the client retries) rather than evicting live ones.
pub const MAX_FLOWS: usize = 1 << 18;
/// A flow with no packet for this long is forgotten (seconds).
pub const FLOW_IDLE_SECS: u64 = 600;

/// A TCP or UDP packet's addresses over IPv4, and where its ports and
/// checksum sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: u32,
    pub sport: u16,
    pub dst: u32,
    pub dport: u16,
    pub proto: u8,
    /// Offset of the transport header.
    l4: usize,
}

/// The packet's 5-tuple; None for anything but TCP or UDP over IPv4, and
/// for fragments after the first (they carry no ports).
pub fn tuple(pkt: &[u8]) -> Option<Tuple> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let proto = pkt[9];
    let frag_offset = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff;
    let min = if proto == 6 { 18 } else { 8 };
    if (proto != 6 && proto != 17) || frag_offset != 0 || ihl < 20 || pkt.len() < ihl + min {
        return None;
    }
    Some(Tuple {
        src: u32::from_be_bytes([pkt[12], pkt[13], pkt[14], pkt[15]]),
        sport: u16::from_be_bytes([pkt[ihl], pkt[ihl + 1]]),
        dst: u32::from_be_bytes([pkt[16], pkt[17], pkt[18], pkt[19]]),
        dport: u16::from_be_bytes([pkt[ihl + 2], pkt[ihl + 3]]),
        proto,
        l4: ihl,
    })
}

/// Writes `port` as the source (`source`) or destination port of the
/// packet `t` was read from, and updates its transport checksum (RFC 1624:
/// HC' = ~(~HC + ~m + m')).
pub fn set_port(pkt: &mut [u8], t: &Tuple, source: bool, port: u16) {
    let at = t.l4 + if source { 0 } else { 2 };
    let old = u16::from_be_bytes([pkt[at], pkt[at + 1]]);
    if old == port {
        return;
    }
    pkt[at..at + 2].copy_from_slice(&port.to_be_bytes());
    let csum_at = t.l4 + if t.proto == 6 { 16 } else { 6 };
    let hc = u16::from_be_bytes([pkt[csum_at], pkt[csum_at + 1]]);
    // A UDP checksum of zero means none was computed.
    if t.proto == 17 && hc == 0 {
        return;
    }
    let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(port);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut new = !(sum as u16);
    if t.proto == 17 && new == 0 {
        new = 0xffff;
    }
    pkt[csum_at..csum_at + 2].copy_from_slice(&new.to_be_bytes());
}

/// A flow as it came through the tunnel: (peer, client, client port,
/// task, task port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct InKey {
    peer: SocketAddr,
    client: u32,
    client_port: u16,
    task: u32,
    task_port: u16,
    proto: u8,
}

/// A flow as the task sees it: (client, port as the task sees it, task,
/// task port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct TaskKey {
    client: u32,
    port: u16,
    task: u32,
    task_port: u16,
    proto: u8,
}

#[derive(Clone, Copy, Debug)]
struct Flow {
    peer: SocketAddr,
    /// The client's own port.
    client_port: u16,
    /// When a packet last went either way (seconds, the data plane's clock).
    seen: u64,
}

/// The mesh flows this node's tasks serve.
#[derive(Default)]
pub struct MeshFlows {
    inbound: HashMap<InKey, u16>,
    by_task: HashMap<TaskKey, Flow>,
    next_alias: u16,
}

impl MeshFlows {
    /// A packet from `peer` of a flow toward a task here: the source port
    /// the task must see (the client's own unless that 4-tuple is taken by
    /// another flow here). None when no port is free or the table is full:
    /// the packet is dropped.
    pub fn inbound(&mut self, t: &Tuple, peer: SocketAddr, now: u64) -> Option<u16> {
        let key = InKey { peer, client: t.src, client_port: t.sport, task: t.dst, task_port: t.dport, proto: t.proto };
        let task_key = |port| TaskKey { client: t.src, port, task: t.dst, task_port: t.dport, proto: t.proto };
        if let Some(&alias) = self.inbound.get(&key)
            && let Some(f) = self.by_task.get_mut(&task_key(alias))
            && f.peer == peer
            && f.client_port == t.sport
        {
            f.seen = now;
            return Some(alias);
        }
        if self.by_task.len() >= MAX_FLOWS {
            return None;
        }
        let free = |s: &Self, port: u16| !s.by_task.contains_key(&task_key(port));
        let alias = if ALIAS_PORTS.contains(&t.sport) && free(self, t.sport) {
            t.sport
        } else {
            let span = u32::from(ALIAS_PORTS.end() - ALIAS_PORTS.start()) + 1;
            let start = self.next_alias.max(*ALIAS_PORTS.start());
            let found = (0..span)
                .map(|i| (*ALIAS_PORTS.start() as u32 + (u32::from(start - ALIAS_PORTS.start()) + i) % span) as u16)
                .find(|p| free(self, *p))?;
            self.next_alias = found.checked_add(1).unwrap_or(*ALIAS_PORTS.start());
            found
        };
        self.inbound.insert(key, alias);
        self.by_task.insert(task_key(alias), Flow { peer, client_port: t.sport, seen: now });
        Some(alias)
    }

    /// A task's packet toward a mesh client: the peer it goes back through
    /// and the client's own port.
    pub fn reply(&mut self, t: &Tuple, now: u64) -> Option<(SocketAddr, u16)> {
        let f = self.by_task.get_mut(&TaskKey { client: t.dst, port: t.dport, task: t.src, task_port: t.sport, proto: t.proto })?;
        f.seen = now;
        Some((f.peer, f.client_port))
    }

    /// Forgets flows idle for [`FLOW_IDLE_SECS`].
    pub fn sweep(&mut self, now: u64) {
        self.by_task.retain(|_, f| now.saturating_sub(f.seen) < FLOW_IDLE_SECS);
        let by_task = &self.by_task;
        self.inbound.retain(|k, alias| {
            by_task
                .get(&TaskKey { client: k.client, port: *alias, task: k.task, task_port: k.task_port, proto: k.proto })
                .is_some_and(|f| f.peer == k.peer && f.client_port == k.client_port)
        });
    }

    pub fn len(&self) -> usize {
        self.by_task.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_task.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP SYN (IPv4, no options) with a correct checksum.
    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[24..28].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x02;
        p[34..36].copy_from_slice(&64240u16.to_be_bytes());
        let c = l4_checksum(&p);
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// The transport checksum computed from scratch (pseudo-header
    /// included), with the checksum field taken as zero.
    fn l4_checksum(p: &[u8]) -> u16 {
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let l4 = &p[ihl..];
        let csum_at = if p[9] == 6 { 16 } else { 6 };
        let mut sum = 0u32;
        for w in p[12..20].chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        sum += u32::from(p[9]) + l4.len() as u32;
        for (i, w) in l4.chunks(2).enumerate() {
            if i * 2 == csum_at {
                continue;
            }
            sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn peer(n: u8) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, n], 51820))
    }

    #[test]
    fn one_client_port_through_two_nodes_to_one_task_becomes_two_tuples() {
        let mut f = MeshFlows::default();
        let syn = tcp([203, 0, 113, 7], 51644, [100, 64, 0, 5], 80);
        let t = tuple(&syn).unwrap();
        // Through node A: the client's own port.
        assert_eq!(f.inbound(&t, peer(1), 0), Some(51644));
        // The same tuple through node B at the same time: another port.
        let b = f.inbound(&t, peer(2), 0).unwrap();
        assert_ne!(b, 51644);
        assert!(ALIAS_PORTS.contains(&b));
        // Each keeps its own port on every later packet.
        assert_eq!(f.inbound(&t, peer(1), 1), Some(51644));
        assert_eq!(f.inbound(&t, peer(2), 1), Some(b));
        // The task's replies go back through the node each came in at, to
        // the client's own port.
        let reply = |port| tuple(&tcp([100, 64, 0, 5], 80, [203, 0, 113, 7], port)).unwrap();
        assert_eq!(f.reply(&reply(51644), 2), Some((peer(1), 51644)));
        assert_eq!(f.reply(&reply(b), 2), Some((peer(2), 51644)));
        // Unknown flows have no way back.
        assert_eq!(f.reply(&reply(40000), 2), None);
    }

    #[test]
    fn ports_below_the_alias_range_are_always_rewritten() {
        // Those are the kernel's, for this node's own mesh.
        let mut f = MeshFlows::default();
        let t = tuple(&tcp([203, 0, 113, 7], 1500, [100, 64, 0, 5], 80)).unwrap();
        let a = f.inbound(&t, peer(1), 0).unwrap();
        assert!(ALIAS_PORTS.contains(&a));
        assert_eq!(f.inbound(&t, peer(1), 0), Some(a));
    }

    #[test]
    fn a_tuple_stays_reserved_until_its_flow_is_idle_long_enough() {
        let mut f = MeshFlows::default();
        let t = tuple(&tcp([203, 0, 113, 7], 40000, [100, 64, 0, 5], 80)).unwrap();
        assert_eq!(f.inbound(&t, peer(1), 0), Some(40000));
        // Past TIME_WAIT but not idle long enough: B still gets another port.
        f.sweep(120);
        assert_ne!(f.inbound(&t, peer(2), 120), Some(40000));
        // Both idle for the whole period: forgotten, the port is free again.
        f.sweep(120 + FLOW_IDLE_SECS);
        assert!(f.is_empty());
        assert_eq!(f.inbound(&t, peer(2), 120 + FLOW_IDLE_SECS), Some(40000));
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn a_rewritten_port_keeps_the_checksum_right() {
        for (port, to) in [(51644u16, 32768u16), (1, 65535), (65535, 0), (40000, 40000)] {
            let mut p = tcp([203, 0, 113, 7], port, [100, 64, 0, 5], 80);
            let t = tuple(&p).unwrap();
            set_port(&mut p, &t, true, to);
            assert_eq!(tuple(&p).unwrap().sport, to);
            assert_eq!(u16::from_be_bytes([p[36], p[37]]), l4_checksum(&p), "{port} -> {to}");
            set_port(&mut p, &t, false, 8080);
            assert_eq!(tuple(&p).unwrap().dport, 8080);
            assert_eq!(u16::from_be_bytes([p[36], p[37]]), l4_checksum(&p));
        }
        // UDP without a checksum stays without one.
        let mut u = tcp([203, 0, 113, 7], 5353, [100, 64, 0, 5], 53);
        u[9] = 17;
        u.truncate(28);
        u[26] = 0;
        u[27] = 0;
        let t = tuple(&u).unwrap();
        set_port(&mut u, &t, true, 40001);
        assert_eq!((u[26], u[27]), (0, 0));
    }

    #[test]
    fn fragments_and_other_protocols_have_no_tuple() {
        let mut p = tcp([203, 0, 113, 7], 40000, [100, 64, 0, 5], 80);
        assert!(tuple(&p).is_some());
        p[7] = 10; // fragment offset 80 bytes
        assert!(tuple(&p).is_none());
        p[7] = 0;
        p[9] = 1; // ICMP
        assert!(tuple(&p).is_none());
        assert!(tuple(&p[..30]).is_none());
    }

    #[test]
    fn the_alias_range_runs_out_cleanly() {
        let mut f = MeshFlows::default();
        let span = usize::from(ALIAS_PORTS.end() - ALIAS_PORTS.start()) + 1;
        let t = tuple(&tcp([203, 0, 113, 7], 40000, [100, 64, 0, 5], 80)).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..span {
            let ep = SocketAddr::from(([198, 51, (i >> 8) as u8, i as u8], 51820));
            seen.insert(f.inbound(&t, ep, 0).unwrap());
        }
        assert_eq!(seen.len(), span);
        assert_eq!(f.inbound(&t, SocketAddr::from(([192, 0, 2, 1], 51820)), 0), None, "every port of the range is taken");
    }
}
