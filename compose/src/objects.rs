//! The top-level `networks:`, `volumes:`, `secrets:` and `configs:`.

use std::collections::HashMap;

use shoal_proto::control::{CreateDataRequest, CreateNetworkRequest, CreateVolumeRequest};

use crate::error::ComposeError;
use crate::read::{self, at, child, entries, key_at, string, unknown, unsupported};
use crate::yaml::{Entry, Node, Value};
use crate::{Cx, NAMESPACE_LABEL};

/// One object declared at the top level, before we know whether a service
/// uses it.
pub struct Declared<R> {
    pub key: String,
    /// The cluster object's name: `STACK_key`, `name:`, or for an
    /// external one `name:` or the key.
    pub name: String,
    pub external: bool,
    pub req: R,
    pub used: bool,
}

/// `external: true`, or the legacy `external: {name: NAME}` (Docker still
/// reads it); the name is Some only in the legacy form.
fn external(n: &Node, path: &str) -> Result<(bool, Option<String>), ComposeError> {
    match &n.value {
        Value::Map(m) => {
            let mut name = None;
            for e in m {
                match e.key.name.as_str() {
                    "name" => name = Some(string(&e.value, &child(path, "name"))?),
                    _ => return Err(unknown(e, &child(path, &e.key.name))),
                }
            }
            Ok((true, name))
        }
        _ => Ok((read::boolean(n, path)?, None)),
    }
}

/// The fields every kind shares (name, external, labels) and the ones
/// each kind reads itself.
struct Common<'a> {
    name: Option<(String, &'a Node)>,
    external: bool,
    legacy_name: Option<String>,
    labels: HashMap<String, String>,
    /// Kind-specific keys, to be read by the caller.
    rest: Vec<&'a Entry>,
}

fn common<'a>(e: &'a Entry, path: &str) -> Result<Common<'a>, ComposeError> {
    let mut c = Common { name: None, external: false, legacy_name: None, labels: HashMap::new(), rest: Vec::new() };
    for f in entries(&e.value, path)? {
        let p = child(path, &f.key.name);
        match f.key.name.as_str() {
            "name" => c.name = Some((string(&f.value, &p)?, &f.value)),
            "external" => (c.external, c.legacy_name) = external(&f.value, &p)?,
            "labels" => {
                for (k, v, _) in read::key_values(&f.value, &p)? {
                    c.labels.insert(k, v.unwrap_or_default());
                }
            }
            k if k.starts_with("x-") => {}
            _ => c.rest.push(f),
        }
    }
    Ok(c)
}

/// Names the object and refuses kind-specific keys on an external one.
fn declare<R>(cx: &Cx, kind: &'static str, e: &Entry, path: &str, c: &mut Common, req: impl FnOnce(String, HashMap<String, String>) -> R) -> Result<Declared<R>, ComposeError> {
    let name = if c.external {
        if let Some(f) = c.rest.first() {
            return Err(ComposeError::Invalid {
                at: key_at(&f.key, &child(path, &f.key.name)),
                reason: format!("an external {kind} exists already: it takes only `name`, not `{}`", f.key.name),
            });
        }
        if !c.labels.is_empty() {
            return Err(ComposeError::Invalid { at: key_at(&e.key, path), reason: format!("an external {kind} exists already: it takes no labels") });
        }
        match (&c.legacy_name, &c.name) {
            (Some(a), Some((b, n))) if a != b => {
                return Err(read::invalid(n, &child(path, "name"), format!("conflicts with external.name {a:?}")));
            }
            (Some(a), _) => a.clone(),
            (None, Some((b, _))) => b.clone(),
            (None, None) => e.key.name.clone(),
        }
    } else {
        match &c.name {
            Some((n, _)) => n.clone(),
            None => format!("{}_{}", cx.stack, e.key.name),
        }
    };
    if !read::valid_name(&name) {
        let where_ = match &c.name {
            Some((_, n)) => at(n, &child(path, "name")),
            None => key_at(&e.key, path),
        };
        return Err(ComposeError::Invalid { at: where_, reason: format!("{kind} name {name:?} is invalid: must be {}", read::NAME_RULE) });
    }
    let mut labels = std::mem::take(&mut c.labels);
    if !c.external {
        labels.insert(NAMESPACE_LABEL.to_string(), cx.stack.to_string());
    }
    Ok(Declared { key: e.key.name.clone(), name: name.clone(), external: c.external, req: req(name, labels), used: false })
}

pub fn networks(cx: &mut Cx, n: &Node) -> Result<Vec<Declared<CreateNetworkRequest>>, ComposeError> {
    let mut out = Vec::new();
    for e in entries(n, "networks")? {
        let path = child("networks", &e.key.name);
        let mut c = common(e, &path)?;
        let mut d = declare(cx, "network", e, &path, &mut c, |name, labels| CreateNetworkRequest { name, labels, ..Default::default() })?;
        for f in &c.rest {
            let p = child(&path, &f.key.name);
            let v = &f.value;
            match f.key.name.as_str() {
                "driver" => {
                    let driver = string(v, &p)?;
                    if driver != "overlay" {
                        return Err(unsupported(v, &p, format!("network driver {driver:?}: shoal networks are overlays (driver: overlay, or leave it out)")));
                    }
                }
                "internal" => d.req.internal = read::boolean(v, &p)?,
                "attachable" => {
                    read::boolean(v, &p)?;
                    cx.warnings.ignore("attachable");
                }
                "enable_ipv6" => {
                    if read::boolean(v, &p)? {
                        return Err(unsupported(v, &p, "IPv6: shoal networks are IPv4"));
                    }
                }
                "ipam" => d.req.subnet = ipam(v, &p)?,
                "driver_opts" => return Err(unsupported(v, &p, "network driver options")),
                _ => return Err(unknown(f, &p)),
            }
        }
        out.push(d);
    }
    Ok(out)
}

/// `ipam: {config: [{subnet: CIDR}]}`: the network's one subnet.
fn ipam(n: &Node, path: &str) -> Result<String, ComposeError> {
    let mut subnet = String::new();
    for e in entries(n, path)? {
        let p = child(path, &e.key.name);
        match e.key.name.as_str() {
            "driver" => {
                let d = string(&e.value, &p)?;
                if d != "default" {
                    return Err(unsupported(&e.value, &p, format!("IPAM driver {d:?}: shoal assigns addresses itself")));
                }
            }
            "config" => {
                let pools = read::items(&e.value, &p)?;
                if pools.len() > 1 {
                    return Err(unsupported(&e.value, &p, "more than one subnet: a shoal network has one"));
                }
                for (i, pool) in pools.iter().enumerate() {
                    let pp = read::index(&p, i);
                    for f in entries(pool, &pp)? {
                        let fp = child(&pp, &f.key.name);
                        match f.key.name.as_str() {
                            "subnet" => {
                                let s = string(&f.value, &fp)?;
                                if !valid_subnet(&s) {
                                    return Err(read::invalid(&f.value, &fp, format!("{s:?}: expected an IPv4 network such as 100.64.3.0/24 (prefix 8-29, no host bits set)")));
                                }
                                subnet = s;
                            }
                            "gateway" | "ip_range" | "aux_addresses" => {
                                return Err(unsupported(&f.value, &fp, "the first address of a network's slice on each node is its gateway; shoal assigns the rest"));
                            }
                            _ => return Err(unknown(f, &fp)),
                        }
                    }
                }
            }
            "options" => return Err(unsupported(&e.value, &p, "IPAM options")),
            _ => return Err(unknown(e, &p)),
        }
    }
    Ok(subnet)
}

fn valid_subnet(s: &str) -> bool {
    let Some((addr, len)) = s.split_once('/') else { return false };
    let (Ok(addr), Ok(len)) = (addr.parse::<std::net::Ipv4Addr>(), len.parse::<u8>()) else { return false };
    (8..=29).contains(&len) && u32::from(addr) & !(u32::MAX << (32 - len)) == 0
}

pub fn volumes(cx: &mut Cx, n: &Node) -> Result<Vec<Declared<CreateVolumeRequest>>, ComposeError> {
    let mut out = Vec::new();
    for e in entries(n, "volumes")? {
        let path = child("volumes", &e.key.name);
        let mut c = common(e, &path)?;
        let mut d = declare(cx, "volume", e, &path, &mut c, |name, labels| CreateVolumeRequest { name, labels, driver: "local".into(), ..Default::default() })?;
        for f in &c.rest {
            let p = child(&path, &f.key.name);
            let v = &f.value;
            match f.key.name.as_str() {
                "driver" => {
                    let driver = string(v, &p)?;
                    if driver != "local" {
                        return Err(unsupported(v, &p, format!("volume driver {driver:?}: shoal has the local driver only")));
                    }
                    d.req.driver = driver;
                }
                "driver_opts" => {
                    for (k, val, kat) in read::key_values(v, &p)? {
                        if !["type", "device", "o"].contains(&k.as_str()) {
                            return Err(ComposeError::Unsupported { at: kat, reason: format!("volume option {k:?}: the local driver takes type, device and o") });
                        }
                        d.req.options.insert(k, val.unwrap_or_default());
                    }
                    if d.req.options.contains_key("type") != d.req.options.contains_key("device") {
                        return Err(read::invalid(v, &p, "type and device go together (e.g. type: tmpfs, device: tmpfs)"));
                    }
                }
                _ => return Err(unknown(f, &p)),
            }
        }
        out.push(d);
    }
    Ok(out)
}

/// Secrets (`kind` "secret") or configs ("config"): data read from `file:`
/// now, so a missing file fails before anything is created.
pub fn data(cx: &mut Cx, kind: &'static str, n: &Node) -> Result<Vec<Declared<CreateDataRequest>>, ComposeError> {
    let section = if kind == "secret" { "secrets" } else { "configs" };
    let mut out = Vec::new();
    for e in entries(n, section)? {
        let path = child(section, &e.key.name);
        let mut c = common(e, &path)?;
        let mut d = declare(cx, kind, e, &path, &mut c, |name, labels| CreateDataRequest { kind: kind.into(), name, labels, ..Default::default() })?;
        let mut file = false;
        for f in &c.rest {
            let p = child(&path, &f.key.name);
            let v = &f.value;
            match f.key.name.as_str() {
                "file" => {
                    let rel = string(v, &p)?;
                    let fp = read::file_path(v, &p, &rel)?;
                    d.req.data = std::fs::read(&fp).map_err(|source| ComposeError::ReadReferenced { at: at(v, &p), path: fp, source })?;
                    file = true;
                }
                "environment" | "content" | "driver" | "template_driver" | "driver_opts" => {
                    return Err(unsupported(v, &p, format!("a {kind}'s data comes from `file:`")));
                }
                _ => return Err(unknown(f, &p)),
            }
        }
        if !d.external && !file {
            return Err(ComposeError::Invalid { at: key_at(&e.key, &path), reason: format!("a {kind} needs `file:` (or `external: true` for one that exists)") });
        }
        out.push(d);
    }
    Ok(out)
}
