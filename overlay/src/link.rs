//! Links, addresses and routes through rtnetlink, in the network namespace
//! of the thread that opened the connection.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::OverlayError;

const EEXIST: i32 = 17;
const ENODEV: i32 = 19;
const ESRCH: i32 = 3;
const ENOENT: i32 = 2;

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().raw_os_error(),
        _ => None,
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> OverlayError {
    let what = what.into();
    move |source| OverlayError::Netlink { what, source }
}

/// Ignores "already exists": the calls below are made idempotent.
fn exists_ok(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
        r => r,
    }
}

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a connection; must run inside a tokio runtime.
    pub fn open() -> Result<Netlink, OverlayError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| OverlayError::Io { what: "netlink socket".into(), source })?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub async fn index(&self, name: &str) -> Result<Option<u32>, OverlayError> {
        let mut s = self.handle.link().get().match_name(name).execute();
        match s.try_next().await {
            Ok(m) => Ok(m.map(|m| m.header.index)),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(nl(format!("looking up {name}"))(e)),
        }
    }

    async fn must_index(&self, name: &str) -> Result<u32, OverlayError> {
        self.index(name).await?.ok_or_else(|| OverlayError::NoSuchLink(name.to_string()))
    }

    /// A bridge named `name`, up; made if missing. Returns its index.
    pub async fn ensure_bridge(&self, name: &str) -> Result<u32, OverlayError> {
        if let Some(i) = self.index(name).await? {
            return Ok(i);
        }
        exists_ok(self.handle.link().add(LinkBridge::new(name).build()).execute().await).map_err(nl(format!("creating bridge {name}")))?;
        let i = self.must_index(name).await?;
        self.up(i).await?;
        Ok(i)
    }

    pub async fn up(&self, index: u32) -> Result<(), OverlayError> {
        self.handle.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await.map_err(nl(format!("setting link {index} up")))
    }

    pub async fn add_address(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), OverlayError> {
        exists_ok(self.handle.address().add(index, ip.into(), prefix).execute().await).map_err(nl(format!("adding {ip}/{prefix}")))
    }

    /// A veth pair `host` ↔ `peer`, `peer` moved into the namespace pinned
    /// at `netns`, `host` attached to bridge `bridge` and up.
    pub async fn veth_into(&self, host: &str, peer: &str, netns: &std::path::Path, bridge: u32) -> Result<(), OverlayError> {
        if let Some(old) = self.index(host).await? {
            // Left from an earlier try: start over.
            self.delete(old).await?;
        }
        self.handle.link().add(LinkVeth::new(host, peer).build()).execute().await.map_err(nl(format!("creating veth {host}")))?;
        let p = self.must_index(peer).await?;
        let ns = std::fs::File::open(netns).map_err(|source| OverlayError::Io { what: format!("opening {}", netns.display()), source })?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(p).setns_by_fd(ns.as_raw_fd()).build())
            .execute()
            .await
            .map_err(nl(format!("moving {peer} into {}", netns.display())))?;
        let h = self.must_index(host).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(h).controller(bridge).up().build())
            .execute()
            .await
            .map_err(nl(format!("attaching {host} to its bridge")))
    }

    /// Renames link `old` to `new` (it must be down) and brings it up.
    pub async fn rename_up(&self, old: &str, new: &str) -> Result<u32, OverlayError> {
        let i = self.must_index(old).await?;
        self.handle.link().set(LinkUnspec::new_with_index(i).name(new).build()).execute().await.map_err(nl(format!("renaming {old} to {new}")))?;
        self.up(i).await?;
        Ok(i)
    }

    pub async fn delete(&self, index: u32) -> Result<(), OverlayError> {
        match self.handle.link().del(index).execute().await {
            Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
            r => r.map_err(nl(format!("deleting link {index}"))),
        }
    }

    pub async fn delete_named(&self, name: &str) -> Result<(), OverlayError> {
        match self.index(name).await? {
            Some(i) => self.delete(i).await,
            None => Ok(()),
        }
    }

    /// Every link whose name starts with `prefix`: (name, index, whether
    /// any other link has it as its master, i.e. a bridge with ports).
    pub async fn links_with_prefix(&self, prefix: &str) -> Result<Vec<(String, u32, bool)>, OverlayError> {
        use rtnetlink::packet_route::link::LinkAttribute;
        let mut s = self.handle.link().get().execute();
        let mut named = Vec::new();
        let mut masters = std::collections::BTreeSet::new();
        while let Some(m) = s.try_next().await.map_err(nl("listing links"))? {
            for a in &m.attributes {
                match a {
                    LinkAttribute::IfName(n) if n.starts_with(prefix) => named.push((n.clone(), m.header.index)),
                    LinkAttribute::Controller(master) => {
                        masters.insert(*master);
                    }
                    _ => {}
                }
            }
        }
        Ok(named.into_iter().map(|(n, i)| (n, i, masters.contains(&i))).collect())
    }

    /// `dst/prefix dev index`, scope link.
    pub async fn add_route_dev(&self, dst: Ipv4Addr, prefix: u8, index: u32) -> Result<(), OverlayError> {
        let r = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, prefix).output_interface(index).scope(RouteScope::Link).build();
        exists_ok(self.handle.route().add(r).execute().await).map_err(nl(format!("adding route {dst}/{prefix}")))
    }

    pub async fn del_route_dev(&self, dst: Ipv4Addr, prefix: u8, index: u32) -> Result<(), OverlayError> {
        let r = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, prefix).output_interface(index).scope(RouteScope::Link).build();
        match self.handle.route().del(r).execute().await {
            Err(e) if errno(&e) == Some(ESRCH) => Ok(()),
            r => r.map_err(nl(format!("deleting route {dst}/{prefix}"))),
        }
    }

    /// `dst/prefix via gateway`.
    pub async fn add_route_via(&self, dst: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> Result<(), OverlayError> {
        let r = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, prefix).gateway(gateway).build();
        exists_ok(self.handle.route().add(r).execute().await).map_err(nl(format!("adding route {dst}/{prefix} via {gateway}")))
    }

    pub async fn add_default_route(&self, gateway: Ipv4Addr) -> Result<(), OverlayError> {
        let r = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gateway).build();
        exists_ok(self.handle.route().add(r).execute().await).map_err(nl(format!("adding default route via {gateway}")))
    }
}

impl Netlink {
    /// Forgets what the neighbour table of link `index` holds for `ip`: a
    /// task address handed out again belongs to a new veth (a new MAC),
    /// and a cached entry would send its traffic to the old one until it
    /// timed out (seconds under load).
    pub async fn forget_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<(), OverlayError> {
        use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
        let mut m = NeighbourMessage::default();
        m.header.family = rtnetlink::packet_route::AddressFamily::Inet;
        m.header.ifindex = index;
        m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        match self.handle.neighbours().del(m).execute().await {
            Err(e) if errno(&e) == Some(ENOENT) => Ok(()),
            r => r.map_err(nl(format!("forgetting the neighbour {ip}"))),
        }
    }

    /// `ip rule add fwmark MARK lookup TABLE priority PRIORITY` (kept if
    /// it is there).
    pub async fn add_fwmark_rule(&self, mark: u32, table: u32, priority: u32) -> Result<(), OverlayError> {
        let req = self
            .handle
            .rule()
            .add()
            .v4()
            .fw_mark(mark)
            .table_id(table)
            .priority(priority)
            .action(rtnetlink::packet_route::rule::RuleAction::ToTable);
        exists_ok(req.execute().await).map_err(nl(format!("adding the policy rule for mark {mark:#x}")))
    }

    /// Removes the rules that look up `table`.
    pub async fn del_rules_for_table(&self, table: u32) -> Result<(), OverlayError> {
        use rtnetlink::packet_route::rule::RuleAttribute;
        let rules: Vec<_> = self
            .handle
            .rule()
            .get(rtnetlink::IpVersion::V4)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing policy rules"))?;
        for r in rules {
            let mine = r.attributes.iter().any(|a| matches!(a, RuleAttribute::Table(t) if *t == table));
            if mine {
                self.handle.rule().del(r).execute().await.map_err(nl(format!("deleting the policy rule for table {table}")))?;
            }
        }
        Ok(())
    }

    /// `default dev INDEX table TABLE`.
    pub async fn add_default_dev_in_table(&self, index: u32, table: u32) -> Result<(), OverlayError> {
        let r = RouteMessageBuilder::<Ipv4Addr>::new().output_interface(index).scope(RouteScope::Link).table_id(table).build();
        exists_ok(self.handle.route().add(r).execute().await).map_err(nl(format!("adding the default route of table {table}")))
    }

    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), OverlayError> {
        self.handle.link().set(LinkUnspec::new_with_index(index).mtu(mtu).build()).execute().await.map_err(nl(format!("setting MTU of link {index}")))
    }
}
