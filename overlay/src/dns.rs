//! The node's DNS server for its tasks: it answers on each of its
//! gateways (port 53, UDP and TCP) from the managers' service view, and
//! only with what the asking task may reach: a service's name resolves on
//! the networks the asker shares with it, to its virtual IP there (or, in
//! dnsrr mode, to its tasks); `tasks.NAME` to every running task. Other
//! names go to the node's resolver (`--dns-upstream`, else the node's
//! `/etc/resolv.conf`). Messages are parsed and written by hickory-proto.
//!
//! An answer that does not fit the asker's UDP size (512 bytes, or its
//! EDNS size) carries as many whole records as fit and the TC flag; the
//! asker then asks again over TCP, where every record fits. Forwarded
//! queries go out with a random id from a fresh port, and only a reply
//! from the upstream address with that id and the same question is taken;
//! at most [`MAX_FORWARDS`] are in flight, more are answered SERVFAIL.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};

use crate::{OverlayError, ServiceEntry};

/// How long answers may be cached: short, the view moves with the tasks.
const TTL: u32 = 5;
/// Queries forwarded to the upstream at once, per node. A forward holds a
/// socket and a task for up to [`FORWARD_TIMEOUT`]: past this many, a
/// flood of queries for outside names gets SERVFAIL at once instead of
/// piling up sockets and tasks.
pub const MAX_FORWARDS: usize = 128;
/// How long the upstream has to answer a forwarded query.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest UDP answer we send (and the EDNS size we advertise): what
/// fits a container interface's MTU-sized datagrams without much
/// fragmentation risk is smaller, but the asker's own EDNS size rules.
const UDP_MAX: usize = 4096;
/// Plain DNS over UDP without EDNS (RFC 1035).
const UDP_PLAIN: usize = 512;
/// TCP connections served at once per gateway; more are closed.
const MAX_TCP_CONNECTIONS: usize = 64;
/// A TCP connection with no query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Inner {
    /// Lower-case service name → its records (one per network).
    services: HashMap<String, Vec<ServiceEntry>>,
    /// A local task's address → (task, the networks that task is on).
    askers: HashMap<Ipv4Addr, (String, Vec<String>)>,
}

pub struct DnsView {
    inner: RwLock<Inner>,
    upstream: Option<SocketAddr>,
    /// Permits for forwarded queries in flight.
    forwards: Arc<Semaphore>,
}

/// What a name is for the asker.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Not one of ours (or not on a network the asker shares): ask the
    /// node's resolver.
    Elsewhere,
    /// The asker is no task of this node.
    Refused,
    Found(Vec<Ipv4Addr>),
}

/// How a query came, which bounds the answer's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// What to do with one query.
#[derive(Debug)]
enum Outcome {
    /// Send this answer.
    Reply(Vec<u8>),
    /// Not ours: ask the upstream (the request, parsed).
    Forward(Message),
    /// Garbage or a response: say nothing.
    Ignore,
}

impl DnsView {
    pub fn new(upstream: Option<SocketAddr>) -> Self {
        Self::with_forward_limit(upstream, MAX_FORWARDS)
    }

    /// As [`DnsView::new`], forwarding at most `limit` queries at once.
    pub fn with_forward_limit(upstream: Option<SocketAddr>, limit: usize) -> Self {
        DnsView { inner: RwLock::default(), upstream, forwards: Arc::new(Semaphore::new(limit)) }
    }

    /// Where names that are not ours go.
    pub fn upstream(&self) -> Option<SocketAddr> {
        self.upstream
    }

    pub fn set_services(&self, entries: Vec<ServiceEntry>) {
        let mut services: HashMap<String, Vec<ServiceEntry>> = HashMap::new();
        for e in entries {
            for a in &e.aliases {
                let a = a.to_ascii_lowercase();
                if a != e.service.to_ascii_lowercase() {
                    services.entry(a).or_default().push(e.clone());
                }
            }
            services.entry(e.service.to_ascii_lowercase()).or_default().push(e);
        }
        self.inner.write().unwrap_or_else(|e| e.into_inner()).services = services;
    }

    /// Task `task` asks from these addresses, each on its network.
    pub fn add_asker(&self, task: &str, addresses: Vec<(Ipv4Addr, String)>) {
        let networks: Vec<String> = addresses.iter().map(|(_, n)| n.clone()).collect();
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for (ip, _) in addresses {
            inner.askers.insert(ip, (task.to_string(), networks.clone()));
        }
    }

    pub fn remove_asker(&self, task: &str) {
        self.inner.write().unwrap_or_else(|e| e.into_inner()).askers.retain(|_, (t, _)| t != task);
    }

    /// Whether any service's record still lists one of `addresses`.
    pub fn lists(&self, addresses: &[Ipv4Addr]) -> bool {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.services.values().flatten().any(|e| e.addresses.iter().any(|a| addresses.contains(a)))
    }

    pub fn lookup(&self, asker: Ipv4Addr, name: &str) -> Lookup {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let Some((_, networks)) = inner.askers.get(&asker) else { return Lookup::Refused };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let (service, all_tasks) = match name.strip_prefix("tasks.") {
            Some(s) => (s.to_string(), true),
            None => (name, false),
        };
        let Some(entries) = inner.services.get(&service) else { return Lookup::Elsewhere };
        // The routing mesh's network carries published ports, not names
        // (as in Swarm): sharing it is no reason to resolve a service.
        let shared: Vec<&ServiceEntry> =
            entries.iter().filter(|e| networks.contains(&e.network) && e.network != crate::INGRESS_NETWORK).collect();
        if shared.is_empty() {
            return Lookup::Elsewhere;
        }
        let mut ips: Vec<Ipv4Addr> = shared
            .iter()
            .flat_map(|e| match (all_tasks, e.vip) {
                (false, Some(vip)) => vec![vip],
                _ => e.addresses.clone(),
            })
            .collect();
        ips.dedup();
        Lookup::Found(ips)
    }

    /// What to do with `query` from `asker`.
    fn respond(&self, query: &[u8], asker: IpAddr, transport: Transport) -> Outcome {
        let Ok(req) = Message::from_vec(query) else { return Outcome::Ignore };
        if req.metadata.message_type != MessageType::Query {
            return Outcome::Ignore;
        }
        let IpAddr::V4(asker) = asker else { return Outcome::Ignore };
        let mut resp = response_to(&req);
        let Some(q) = req.queries.first() else {
            resp.metadata.response_code = ResponseCode::FormErr;
            return reply(resp, &req, transport);
        };
        match self.lookup(asker, &q.name().to_ascii()) {
            Lookup::Refused => resp.metadata.response_code = ResponseCode::Refused,
            Lookup::Found(ips) => {
                resp.metadata.authoritative = true;
                if q.query_type() == RecordType::A || q.query_type() == RecordType::ANY {
                    for ip in ips {
                        resp.add_answer(Record::from_rdata(q.name().clone(), TTL, RData::A(hickory_proto::rr::rdata::A(ip))));
                    }
                }
            }
            Lookup::Elsewhere if self.upstream.is_some() => return Outcome::Forward(req),
            Lookup::Elsewhere => resp.metadata.response_code = ResponseCode::NXDomain,
        }
        reply(resp, &req, transport)
    }

    /// Answers `query` from `asker`: from the view, or through the
    /// upstream (holding a forward permit; over the cap, SERVFAIL). None:
    /// say nothing.
    async fn answer(&self, query: &[u8], asker: IpAddr, transport: Transport) -> Option<Vec<u8>> {
        match self.respond(query, asker, transport) {
            Outcome::Reply(r) => Some(r),
            Outcome::Ignore => None,
            Outcome::Forward(req) => {
                let upstream = self.upstream?;
                let Ok(_permit) = self.forwards.try_acquire() else {
                    tracing::debug!(%asker, "too many DNS queries forwarded at once: SERVFAIL");
                    return Some(servfail(&req, transport));
                };
                Some(forward(&req, query, upstream, transport).await)
            }
        }
    }
}

/// An empty answer to `req`: its id, op code, question and EDNS.
fn response_to(req: &Message) -> Message {
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.add_queries(req.queries.clone());
    if req.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_MAX as u16);
        resp.set_edns(edns);
    }
    resp
}

fn servfail(req: &Message, transport: Transport) -> Vec<u8> {
    let mut resp = response_to(req);
    resp.metadata.response_code = ResponseCode::ServFail;
    match reply(resp, req, transport) {
        Outcome::Reply(r) => r,
        _ => Vec::new(),
    }
}

/// How large an answer to `req` may be.
fn size_limit(req: &Message, transport: Transport) -> usize {
    match transport {
        Transport::Tcp => usize::from(u16::MAX),
        // `max_payload` is 512 without EDNS, and never less.
        Transport::Udp => usize::from(req.max_payload()).clamp(UDP_PLAIN, UDP_MAX),
    }
}

fn reply(resp: Message, req: &Message, transport: Transport) -> Outcome {
    match encode_within(resp, size_limit(req, transport)) {
        Some(r) => Outcome::Reply(r),
        None => Outcome::Ignore,
    }
}

/// `resp` encoded in at most `limit` bytes: if all of it does not fit,
/// the most answer records that do (whole records, in order), with the TC
/// flag, so the asker knows to ask again over TCP (RFC 2181 9).
fn encode_within(mut resp: Message, limit: usize) -> Option<Vec<u8>> {
    let whole = resp.to_vec().ok()?;
    if whole.len() <= limit {
        return Some(whole);
    }
    resp.metadata.truncation = true;
    let answers = std::mem::take(&mut resp.answers);
    resp.authorities.clear();
    resp.additionals.clear();
    // The largest prefix of the answers that fits: the size grows with
    // each record, so a binary search finds it.
    let (mut lo, mut hi) = (0, answers.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        resp.answers = answers[..mid].to_vec();
        if resp.to_vec().ok()?.len() <= limit {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    resp.answers = answers[..lo].to_vec();
    let out = resp.to_vec().ok()?;
    // Not even the question fits (a huge name in a 512-byte answer):
    // header only, still truncated.
    if out.len() > limit {
        resp.queries.clear();
        resp.answers.clear();
        return resp.to_vec().ok();
    }
    Some(out)
}

/// A random id for a forwarded query: the upstream's answer must carry it,
/// so a spoofer has to guess it as well as our port.
fn random_id() -> u16 {
    use rand_core::RngCore;
    (rand_core::OsRng.next_u32() & 0xffff) as u16
}

/// Relays `query` (parsed as `req`) to `upstream` (over the transport it
/// came by) and returns the upstream's answer with the asker's id, or
/// SERVFAIL when none came that answers it.
async fn forward(req: &Message, query: &[u8], upstream: SocketAddr, transport: Transport) -> Vec<u8> {
    let id = random_id();
    let mut out = query.to_vec();
    out[..2].copy_from_slice(&id.to_be_bytes());
    let got = match transport {
        Transport::Udp => tokio::time::timeout(FORWARD_TIMEOUT, forward_udp(&out, req, id, upstream)).await,
        Transport::Tcp => tokio::time::timeout(FORWARD_TIMEOUT, forward_tcp(&out, req, id, upstream)).await,
    };
    match got {
        Ok(Ok(mut answer)) => {
            answer[..2].copy_from_slice(&req.metadata.id.to_be_bytes());
            answer
        }
        Ok(Err(e)) => {
            tracing::debug!(%upstream, error = %e, "forwarding a DNS query failed: SERVFAIL");
            servfail(req, transport)
        }
        Err(_) => {
            tracing::debug!(%upstream, "the upstream resolver did not answer in time: SERVFAIL");
            servfail(req, transport)
        }
    }
}

/// Whether `answer` answers `req` sent with `id`: a response, that id,
/// the same question.
fn answers(answer: &[u8], req: &Message, id: u16) -> bool {
    if answer.len() < 12 || u16::from_be_bytes([answer[0], answer[1]]) != id {
        return false;
    }
    Message::from_vec(answer).is_ok_and(|m| m.metadata.message_type == MessageType::Response && m.queries == req.queries)
}

async fn forward_udp(query: &[u8], req: &Message, id: u16, upstream: SocketAddr) -> std::io::Result<Vec<u8>> {
    let sock = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await?;
    sock.send_to(query, upstream).await?;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        if from != upstream {
            tracing::debug!(%from, %upstream, "dropped a DNS answer that did not come from the upstream");
            continue;
        }
        if !answers(&buf[..n], req, id) {
            tracing::debug!(%upstream, "dropped a DNS answer that does not answer the forwarded query");
            continue;
        }
        buf.truncate(n);
        return Ok(buf);
    }
}

async fn forward_tcp(query: &[u8], req: &Message, id: u16, upstream: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut conn = TcpStream::connect(upstream).await?;
    write_frame(&mut conn, query).await?;
    loop {
        let answer = read_frame(&mut conn).await?;
        if answers(&answer, req, id) {
            return Ok(answer);
        }
        tracing::debug!(%upstream, "dropped a DNS answer over TCP that does not answer the forwarded query");
    }
}

/// One DNS message over TCP: a 2-byte length, then the message.
async fn read_frame(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = conn.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    conn.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame(conn: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| std::io::Error::other("DNS message over 64 KiB"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    conn.write_all(&out).await
}

/// The first IPv4 nameserver of the node's `/etc/resolv.conf`, unless it
/// is on loopback (the node's loopback is not the tasks').
pub fn upstream_from_resolv_conf() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .find(|ip| !ip.is_loopback())
        .map(|ip| SocketAddr::from((ip, 53)))
}

/// Answers DNS on `addr:53`, UDP and TCP, until `shutdown`.
pub async fn serve(view: Arc<DnsView>, addr: Ipv4Addr, shutdown: watch::Receiver<bool>) -> Result<(), OverlayError> {
    serve_at(view, SocketAddr::from((addr, 53)), shutdown).await.map(|_| ())
}

/// Answers DNS on `addr` (UDP, and TCP on the same port) until
/// `shutdown`; returns the address bound (port 0 picks one).
pub async fn serve_at(view: Arc<DnsView>, addr: SocketAddr, shutdown: watch::Receiver<bool>) -> Result<SocketAddr, OverlayError> {
    let sock = UdpSocket::bind(addr).await.map_err(|source| OverlayError::Io { what: format!("binding DNS on {addr} (UDP)"), source })?;
    let bound = sock.local_addr().map_err(|source| OverlayError::Io { what: format!("DNS socket on {addr}"), source })?;
    let tcp = TcpListener::bind(bound).await.map_err(|source| OverlayError::Io { what: format!("binding DNS on {bound} (TCP)"), source })?;
    tokio::spawn(serve_udp(view.clone(), Arc::new(sock), bound, shutdown.clone()));
    tokio::spawn(serve_tcp(view, tcp, bound, shutdown));
    Ok(bound)
}

async fn serve_udp(view: Arc<DnsView>, sock: Arc<UdpSocket>, addr: SocketAddr, mut shutdown: watch::Receiver<bool>) {
    let mut buf = vec![0u8; UDP_MAX];
    loop {
        let (n, src) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(address = %addr, error = %e, "DNS receive failed");
                    continue;
                }
            },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        // Answers from the view go out at once; only forwards wait, each
        // on its own task, and at most MAX_FORWARDS of them.
        let reply = match view.respond(&buf[..n], src.ip(), Transport::Udp) {
            Outcome::Reply(r) => r,
            Outcome::Ignore => continue,
            Outcome::Forward(req) => {
                let (Some(upstream), Ok(permit)) = (view.upstream, view.forwards.clone().try_acquire_owned()) else {
                    tracing::debug!(asker = %src, "too many DNS queries forwarded at once: SERVFAIL");
                    send_udp(&sock, &servfail(&req, Transport::Udp), src).await;
                    continue;
                };
                let (sock, query) = (sock.clone(), buf[..n].to_vec());
                tokio::spawn(async move {
                    let reply = forward(&req, &query, upstream, Transport::Udp).await;
                    drop(permit);
                    send_udp(&sock, &reply, src).await;
                });
                continue;
            }
        };
        send_udp(&sock, &reply, src).await;
    }
}

async fn send_udp(sock: &UdpSocket, reply: &[u8], to: SocketAddr) {
    if let Err(e) = sock.send_to(reply, to).await {
        tracing::debug!(%to, error = %e, "DNS reply failed");
    }
}

async fn serve_tcp(view: Arc<DnsView>, listener: TcpListener, addr: SocketAddr, mut shutdown: watch::Receiver<bool>) {
    let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let (conn, src) = match accepted {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(address = %addr, error = %e, "DNS accept failed");
                // Out of descriptors, say: don't spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!(asker = %src, "too many DNS connections: closed");
            continue;
        };
        let (view, mut shutdown) = (view.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = serve_conn(&view, conn, src) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
            drop(permit);
        });
    }
}

/// Queries on one TCP connection, answered in turn, until it closes or
/// idles.
async fn serve_conn(view: &DnsView, mut conn: TcpStream, src: SocketAddr) {
    loop {
        let query = match tokio::time::timeout(TCP_IDLE, read_frame(&mut conn)).await {
            Ok(Ok(q)) => q,
            _ => return,
        };
        let Some(reply) = view.answer(&query, src.ip(), Transport::Tcp).await else { return };
        if let Err(e) = write_frame(&mut conn, &reply).await {
            tracing::debug!(to = %src, error = %e, "DNS reply over TCP failed");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(service: &str, network: &str, vip: Option<&str>, tasks: &[&str]) -> ServiceEntry {
        ServiceEntry {
            service: service.into(),
            network: network.into(),
            vip: vip.map(|v| v.parse().unwrap()),
            addresses: tasks.iter().map(|t| t.parse().unwrap()).collect(),
            ports: vec![],
            aliases: vec![],
        }
    }

    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    const ASKER: Ipv4Addr = Ipv4Addr::LOCALHOST;

    fn query(id: u16, name: &str, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn a_records(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    /// A view where `tasks.big` has `n` tasks, asked from loopback.
    fn big_view(n: u32, upstream: Option<SocketAddr>, limit: usize) -> Arc<DnsView> {
        let v = DnsView::with_forward_limit(upstream, limit);
        let tasks: Vec<String> = (0..n).map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 2)) + i).to_string()).collect();
        let tasks: Vec<&str> = tasks.iter().map(String::as_str).collect();
        v.set_services(vec![entry("big", "n", Some("100.64.15.193"), &tasks)]);
        v.add_asker("t", vec![(ASKER, "n".into())]);
        Arc::new(v)
    }

    fn reply_of(o: Outcome) -> Vec<u8> {
        match o {
            Outcome::Reply(r) => r,
            o => panic!("expected a reply, got {o:?}"),
        }
    }

    #[test]
    fn answers_too_large_for_udp_are_truncated_to_whole_records() {
        let v = big_view(100, None, 4);
        let asker = IpAddr::V4(ASKER);
        // Plain UDP: 512 bytes at most, as many records as fit, TC set.
        let r = reply_of(v.respond(&query(7, "tasks.big.", None), asker, Transport::Udp));
        assert!(r.len() <= 512, "{} bytes", r.len());
        let m = Message::from_vec(&r).unwrap();
        assert!(m.metadata.truncation);
        assert_eq!(m.metadata.id, 7);
        let n512 = a_records(&m).len();
        assert!(n512 > 20 && n512 < 100, "{n512} records in 512 bytes");
        // One more record would not have fit.
        assert!(r.len() + 16 > 512);
        // The asker's EDNS size is honoured: more records, still TC.
        let r = reply_of(v.respond(&query(8, "tasks.big.", Some(1232)), asker, Transport::Udp));
        assert!(r.len() <= 1232);
        let m = Message::from_vec(&r).unwrap();
        assert!(m.metadata.truncation && a_records(&m).len() > n512 && m.edns.is_some());
        // Over TCP: every record, no TC.
        let r = reply_of(v.respond(&query(9, "tasks.big.", None), asker, Transport::Tcp));
        let m = Message::from_vec(&r).unwrap();
        assert!(!m.metadata.truncation);
        assert_eq!(a_records(&m).len(), 100);
        // A small answer is untouched.
        let r = reply_of(v.respond(&query(10, "big.", None), asker, Transport::Udp));
        let m = Message::from_vec(&r).unwrap();
        assert!(!m.metadata.truncation);
        assert_eq!(a_records(&m), vec![Ipv4Addr::new(100, 64, 15, 193)]);
    }

    async fn ask_udp(server: SocketAddr, q: &[u8]) -> Message {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(q, server).await.unwrap();
        let mut buf = vec![0u8; 65535];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf)).await.unwrap().unwrap();
        Message::from_vec(&buf[..n]).unwrap()
    }

    async fn ask_tcp(server: SocketAddr, q: &[u8]) -> Message {
        let mut conn = TcpStream::connect(server).await.unwrap();
        write_frame(&mut conn, q).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut conn)).await.unwrap().unwrap();
        Message::from_vec(&r).unwrap()
    }

    #[tokio::test]
    async fn large_answers_come_whole_over_tcp() {
        let (_stop, rx) = watch::channel(false);
        let at = serve_at(big_view(300, None, 4), "127.0.0.1:0".parse().unwrap(), rx).await.unwrap();
        let udp = ask_udp(at, &query(1, "tasks.big.", None)).await;
        assert!(udp.metadata.truncation);
        let tcp = ask_tcp(at, &query(2, "tasks.big.", None)).await;
        assert_eq!((tcp.metadata.id, tcp.metadata.truncation, a_records(&tcp).len()), (2, false, 300));
    }

    /// The answer a fake upstream gives: `ip` for the question of `q`,
    /// with id `id`.
    fn upstream_answer(q: &[u8], id: u16, ip: Ipv4Addr) -> Vec<u8> {
        let req = Message::from_vec(q).unwrap();
        let mut m = Message::response(id, req.metadata.op_code);
        m.add_queries(req.queries.clone());
        let name = req.queries[0].name().clone();
        m.add_answer(Record::from_rdata(name, 60, RData::A(hickory_proto::rr::rdata::A(ip))));
        m.to_vec().unwrap()
    }

    #[tokio::test]
    async fn forwarded_answers_must_come_from_the_upstream_with_our_id() {
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        let (_stop, rx) = watch::channel(false);
        let at = serve_at(big_view(1, Some(up_addr), 4), "127.0.0.1:0".parse().unwrap(), rx).await.unwrap();
        let client = tokio::spawn(async move { ask_udp(at, &query(4242, "example.test.", None)).await });
        let mut buf = vec![0u8; 4096];
        let (n, from) = upstream.recv_from(&mut buf).await.unwrap();
        let q = buf[..n].to_vec();
        let id = u16::from_be_bytes([q[0], q[1]]);
        // Another port with the right id: not the upstream, dropped.
        let spoofer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        spoofer.send_to(&upstream_answer(&q, id, Ipv4Addr::new(203, 0, 113, 66)), from).await.unwrap();
        // The upstream's address with another id: dropped.
        upstream.send_to(&upstream_answer(&q, id ^ 1, Ipv4Addr::new(203, 0, 113, 67)), from).await.unwrap();
        // The real answer.
        upstream.send_to(&upstream_answer(&q, id, Ipv4Addr::new(203, 0, 113, 5)), from).await.unwrap();
        let got = client.await.unwrap();
        assert_eq!(got.metadata.id, 4242, "the asker gets its own id back");
        assert_eq!(got.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a_records(&got), vec![Ipv4Addr::new(203, 0, 113, 5)]);
    }

    #[tokio::test]
    async fn forwards_over_tcp_when_asked_over_tcp() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = upstream.accept().await.unwrap();
            let q = read_frame(&mut conn).await.unwrap();
            let id = u16::from_be_bytes([q[0], q[1]]);
            write_frame(&mut conn, &upstream_answer(&q, id, Ipv4Addr::new(203, 0, 113, 9))).await.unwrap();
        });
        let (_stop, rx) = watch::channel(false);
        let at = serve_at(big_view(1, Some(up_addr), 4), "127.0.0.1:0".parse().unwrap(), rx).await.unwrap();
        let got = ask_tcp(at, &query(77, "example.test.", None)).await;
        assert_eq!((got.metadata.id, a_records(&got)), (77, vec![Ipv4Addr::new(203, 0, 113, 9)]));
    }

    #[tokio::test]
    async fn forwards_over_the_cap_get_servfail_at_once() {
        // An upstream that never answers holds the only permit.
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (_stop, rx) = watch::channel(false);
        let at = serve_at(big_view(1, Some(upstream.local_addr().unwrap()), 1), "127.0.0.1:0".parse().unwrap(), rx).await.unwrap();
        let first = tokio::spawn(async move { ask_udp(at, &query(1, "one.example.", None)).await });
        let mut buf = vec![0u8; 4096];
        upstream.recv_from(&mut buf).await.unwrap();
        let started = std::time::Instant::now();
        let second = ask_udp(at, &query(2, "two.example.", None)).await;
        assert_eq!((second.metadata.id, second.metadata.response_code), (2, ResponseCode::ServFail));
        assert!(started.elapsed() < FORWARD_TIMEOUT, "refused at once, not after a timeout");
        // The first one times out: SERVFAIL too, and its permit is back.
        let first = first.await.unwrap();
        assert_eq!((first.metadata.id, first.metadata.response_code), (1, ResponseCode::ServFail));
        let third = tokio::spawn(async move { ask_udp(at, &query(3, "three.example.", None)).await });
        let (n, from) = upstream.recv_from(&mut buf).await.unwrap();
        let q = buf[..n].to_vec();
        upstream.send_to(&upstream_answer(&q, u16::from_be_bytes([q[0], q[1]]), Ipv4Addr::new(203, 0, 113, 3)), from).await.unwrap();
        assert_eq!(a_records(&third.await.unwrap()), vec![Ipv4Addr::new(203, 0, 113, 3)]);
    }

    #[test]
    fn aliases_resolve_like_the_name() {
        let v = DnsView::new(None);
        let mut e = entry("shop_db", "shop_back", Some("100.64.31.193"), &["100.64.16.2"]);
        e.aliases = vec!["db".into()];
        v.set_services(vec![e]);
        let asker: Ipv4Addr = "100.64.16.9".parse().unwrap();
        v.add_asker("t", vec![(asker, "shop_back".into())]);
        let vip = Lookup::Found(vec!["100.64.31.193".parse().unwrap()]);
        assert_eq!(v.lookup(asker, "db"), vip);
        assert_eq!(v.lookup(asker, "shop_db"), vip);
        assert_eq!(v.lookup(asker, "tasks.db"), Lookup::Found(vec!["100.64.16.2".parse().unwrap()]));
    }

    #[test]
    fn names_resolve_only_on_shared_networks() {
        let v = DnsView::new(None);
        v.set_services(vec![
            entry("backend", "front", Some("100.64.15.193"), &["100.64.0.2", "100.64.0.66"]),
            entry("backend", "back", Some("100.64.31.193"), &["100.64.16.2"]),
            entry("db", "back", None, &["100.64.16.3"]),
        ]);
        let front_task: Ipv4Addr = "100.64.0.9".parse().unwrap();
        v.add_asker("t-front", vec![(front_task, "front".into())]);
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(v.lookup(front_task, "backend."), Lookup::Found(vec![ip("100.64.15.193")]));
        assert_eq!(v.lookup(front_task, "tasks.backend"), Lookup::Found(vec![ip("100.64.0.2"), ip("100.64.0.66")]));
        assert_eq!(v.lookup(front_task, "db"), Lookup::Elsewhere, "db is not on front");
        assert_eq!(v.lookup(front_task, "example.org"), Lookup::Elsewhere);
        assert_eq!(v.lookup(ip("198.18.0.1"), "backend"), Lookup::Refused);
        // dnsrr: the name resolves to the tasks themselves.
        let back_task: Ipv4Addr = "100.64.16.9".parse().unwrap();
        v.add_asker("t-back", vec![(back_task, "back".into())]);
        assert_eq!(v.lookup(back_task, "db"), Lookup::Found(vec![ip("100.64.16.3")]));
        v.remove_asker("t-front");
        assert_eq!(v.lookup(front_task, "backend"), Lookup::Refused);
    }
}
