//! Forgetting the kernel's connection-tracking entries for addresses that
//! are gone, through ctnetlink (`netlink-packet-netfilter`).
//!
//! The routing mesh and the virtual IPs DNAT a connection's first packet
//! to one task; conntrack keeps every later packet of that 4-tuple on the
//! same task. When the task's node dies, an entry that never got a reply
//! (a SYN to the dead node) lives on for two minutes. A client that
//! reuses the source port (the kernel hands out ports freed by a failed
//! connect again) then follows the stale entry to the dead node instead of
//! meeting the new rules: its connection times out, or is refused as
//! unreachable once the node's routes are gone. kube-proxy deletes such
//! entries for the same reason.

use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_netfilter::conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, Tuple};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("{what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error("the kernel's conntrack answer did not parse: {0}")]
    Decode(String),
    #[error("the kernel refused to {what}: {source}")]
    Refused { what: &'static str, source: std::io::Error },
}

/// Whether `a` lies in `net/len`.
fn within(a: Ipv4Addr, (net, len): (Ipv4Addr, u8)) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
    u32::from(a) & mask == u32::from(net) & mask
}

/// The IPv4 source address of a conntrack tuple.
fn source_of(tuple: &[Tuple]) -> Option<Ipv4Addr> {
    tuple.iter().find_map(|t| match t {
        Tuple::Ip(ips) => ips.iter().find_map(|ip| match ip {
            IPTuple::SourceAddress(IpAddr::V4(a)) => Some(*a),
            _ => None,
        }),
        _ => None,
    })
}

/// Of one dumped entry: its original tuple, if its replies come from an
/// address in `nets` (the task a DNAT picked, or the far end of a direct
/// connection).
pub fn stale_entry(attrs: &[ConntrackAttribute], nets: &[(Ipv4Addr, u8)]) -> Option<Vec<Tuple>> {
    let reply_from = attrs.iter().find_map(|a| match a {
        ConntrackAttribute::CtaTupleReply(t) => source_of(t),
        _ => None,
    })?;
    if !nets.iter().any(|n| within(reply_from, *n)) {
        return None;
    }
    attrs.iter().find_map(|a| match a {
        ConntrackAttribute::CtaTupleOrig(t) => Some(t.clone()),
        _ => None,
    })
}

fn request(inner: ConntrackMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(NetfilterMessage::new(NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0), inner)),
    );
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// Calls `each` with every netlink message in the datagrams that answer
/// request `seq`, until the kernel says it is done (a dump) or answers
/// (an acknowledged request).
fn read_answers(sock: &Socket, seq: u32, what: &'static str, mut each: impl FnMut(ConntrackMessage)) -> Result<(), ConntrackError> {
    loop {
        let (buf, _) = sock.recv_from_full().map_err(|source| ConntrackError::Io { what: "reading the kernel's conntrack answer", source })?;
        let mut at = 0;
        while at < buf.len() {
            let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[at..]).map_err(|e| ConntrackError::Decode(e.to_string()))?;
            let len = msg.header.length as usize;
            if len == 0 {
                return Err(ConntrackError::Decode("a message of length 0".into()));
            }
            at += (len + 3) & !3;
            if msg.header.sequence_number != seq {
                continue;
            }
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        // An acknowledgement.
                        None => Ok(()),
                        Some(code) => Err(ConntrackError::Refused { what, source: std::io::Error::from_raw_os_error(-code.get()) }),
                    };
                }
                NetlinkPayload::InnerMessage(NetfilterMessage { inner: NetfilterMessageInner::Conntrack(ct), .. }) => each(ct),
                _ => {}
            }
        }
    }
}

/// Deletes the IPv4 conntrack entries of this network namespace whose
/// replies come from an address in `nets`; returns how many it deleted.
/// Blocking: a dump of the whole table, then one request per entry.
pub fn forget_replies_from(nets: &[(Ipv4Addr, u8)]) -> Result<usize, ConntrackError> {
    if nets.is_empty() {
        return Ok(0);
    }
    let mut sock = Socket::new(NETLINK_NETFILTER).map_err(|source| ConntrackError::Io { what: "opening a netfilter netlink socket", source })?;
    sock.bind_auto().map_err(|source| ConntrackError::Io { what: "binding the netfilter netlink socket", source })?;
    let send = |buf: &[u8]| sock.send(buf, 0).map(|_| ()).map_err(|source| ConntrackError::Io { what: "asking the kernel's conntrack", source });
    send(&request(ConntrackMessage::Get(Vec::new()), NLM_F_REQUEST | NLM_F_DUMP, 1))?;
    let mut stale = Vec::new();
    read_answers(&sock, 1, "list its connections", |ct| {
        if let ConntrackMessage::New(attrs) = ct
            && let Some(orig) = stale_entry(&attrs, nets)
        {
            stale.push(orig);
        }
    })?;
    let mut deleted = 0;
    for (i, orig) in stale.into_iter().enumerate() {
        let seq = 2 + i as u32;
        send(&request(ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(orig)]), NLM_F_REQUEST | NLM_F_ACK, seq))?;
        match read_answers(&sock, seq, "delete a connection", |_| {}) {
            Ok(()) => deleted += 1,
            // Ended meanwhile.
            Err(ConntrackError::Refused { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_netfilter::conntrack::{ProtoTuple, Protocol};

    fn tuple(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<Tuple> {
        vec![
            Tuple::Ip(vec![IPTuple::SourceAddress(IpAddr::V4(src.into())), IPTuple::DestinationAddress(IpAddr::V4(dst.into()))]),
            Tuple::Proto(vec![ProtoTuple::Protocol(Protocol::Tcp), ProtoTuple::SourcePort(sport), ProtoTuple::DestinationPort(dport)]),
        ]
    }

    #[test]
    fn an_entry_is_stale_when_its_replies_come_from_a_gone_slice() {
        let gone = [(Ipv4Addr::new(100, 64, 0, 64), 26)];
        // A client's connection to a published port, DNATed to a task
        // in the gone slice.
        let orig = tuple([198, 18, 0, 1], [198, 18, 0, 10], 54124, 8080);
        let attrs = vec![ConntrackAttribute::CtaTupleOrig(orig.clone()), ConntrackAttribute::CtaTupleReply(tuple([100, 64, 0, 66], [198, 18, 0, 1], 80, 54124))];
        assert_eq!(stale_entry(&attrs, &gone), Some(orig));
        // The same to a task elsewhere stays.
        let attrs = vec![
            ConntrackAttribute::CtaTupleOrig(tuple([198, 18, 0, 1], [198, 18, 0, 10], 54126, 8080)),
            ConntrackAttribute::CtaTupleReply(tuple([100, 64, 0, 130], [198, 18, 0, 1], 80, 54126)),
        ];
        assert_eq!(stale_entry(&attrs, &gone), None);
        // No reply tuple, or no slices: nothing.
        assert_eq!(stale_entry(&[ConntrackAttribute::CtaTupleOrig(tuple([1, 1, 1, 1], [100, 64, 0, 66], 1, 2))], &gone), None);
        assert_eq!(stale_entry(&attrs, &[]), None);
        assert!(within(Ipv4Addr::new(100, 64, 0, 127), gone[0]) && !within(Ipv4Addr::new(100, 64, 0, 128), gone[0]));
        assert!(within(Ipv4Addr::new(8, 8, 8, 8), (Ipv4Addr::UNSPECIFIED, 0)));
    }
}
