//! The node's DNS server for its tasks: it answers on each of its
//! gateways (port 53) from the managers' service view, and only with what
//! the asking task may reach: a service's name resolves on the networks
//! the asker shares with it, to its virtual IP there (or, in dnsrr mode,
//! to its tasks); `tasks.NAME` to every running task. Other names go to
//! the node's own resolver. Messages are parsed and written by
//! hickory-proto.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::{OverlayError, ServiceEntry};

/// How long answers may be cached: short, the view moves with the tasks.
const TTL: u32 = 5;

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

impl DnsView {
    pub fn new(upstream: Option<SocketAddr>) -> Self {
        DnsView { inner: RwLock::default(), upstream }
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

    /// The answer to `query` from `src`, or None to say nothing (garbage).
    async fn answer(&self, query: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
        let req = Message::from_vec(query).ok()?;
        if req.metadata.message_type != MessageType::Query {
            return None;
        }
        let asker = match src.ip() {
            std::net::IpAddr::V4(ip) => ip,
            std::net::IpAddr::V6(_) => return None,
        };
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.add_queries(req.queries.clone());
        let Some(q) = req.queries.first() else {
            resp.metadata.response_code = ResponseCode::FormErr;
            return resp.to_vec().ok();
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
            Lookup::Elsewhere => match self.upstream {
                Some(up) => return forward(query, up).await,
                None => resp.metadata.response_code = ResponseCode::NXDomain,
            },
        }
        resp.to_vec().ok()
    }
}

/// Relays `query` to the node's resolver and returns its answer as is.
async fn forward(query: &[u8], upstream: SocketAddr) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await.ok()?;
    sock.send_to(query, upstream).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await.ok()?.ok()?;
    buf.truncate(n);
    Some(buf)
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

/// Answers DNS on `addr:53` until `shutdown`.
pub async fn serve(view: Arc<DnsView>, addr: Ipv4Addr, mut shutdown: watch::Receiver<bool>) -> Result<(), OverlayError> {
    let sock = UdpSocket::bind(SocketAddr::from((addr, 53)))
        .await
        .map_err(|source| OverlayError::Io { what: format!("binding DNS on {addr}:53"), source })?;
    let sock = Arc::new(sock);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
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
            let (view, sock, query) = (view.clone(), sock.clone(), buf[..n].to_vec());
            // Forwarded queries may take a while: answer each on its own.
            tokio::spawn(async move {
                if let Some(reply) = view.answer(&query, src).await
                    && let Err(e) = sock.send_to(&reply, src).await
                {
                    tracing::debug!(to = %src, error = %e, "DNS reply failed");
                }
            });
        }
    });
    Ok(())
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
