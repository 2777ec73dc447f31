//! One compose service → one `ServiceSpec`, converted the way docker/cli's
//! `compose/convert/service.go` builds a Swarm service spec.

use std::collections::BTreeMap;

use shoal_proto::control::{Mount, Port, Resources, RestartPolicy, ServiceSpec, Ulimit, UpdateConfig};

use crate::error::{At, ComposeError};
use crate::read::{self, at, child, entries, index, invalid, items, key_at, string, unknown, unsupported, wrong};
use crate::yaml::{Entry, Key, Node, Value};
use crate::{envfile, units, Cx, Tops, NAMESPACE_LABEL};

/// Keys `docker stack deploy` ignores with "Ignoring unsupported options"
/// (docker/cli `compose/types.UnsupportedProperties`), and keys for
/// container details shoal doesn't offer that an application runs without
/// (sysctls, logging drivers, …): one warning each.
const IGNORED: &[&str] = &[
    "annotations",
    "build",
    "cgroup_parent",
    "cgroupns_mode",
    "credential_spec",
    "depends_on",
    "devices",
    "domainname",
    "external_links",
    "init",
    "ipc",
    "isolation",
    "links",
    "logging",
    "mac_address",
    "network_mode",
    "oom_kill_disable",
    "oom_score_adj",
    "pid",
    "platform",
    "privileged",
    "profiles",
    "pull_policy",
    "restart",
    "runtime",
    "shm_size",
    "stdin_open",
    "stop_signal",
    "storage_opt",
    "sysctls",
    "tmpfs",
    "tty",
    "userns_mode",
];

/// docker/cli `compose/types.DeprecatedProperties`.
const DEPRECATED: &[(&str, &str)] = &[
    ("container_name", "Setting the container name is not supported."),
    ("expose", "Exposing ports is unnecessary - services on the same network can access each other's containers on any port."),
];

/// Keys that would change what the application sees if dropped: refused,
/// with what to do instead (docker/cli `ForbiddenProperties` among them).
const REFUSED: &[(&str, &str)] = &[
    ("extends", "`extends` is not implemented; merge files with several -c instead"),
    ("volume_driver", "define the volume under the top-level `volumes:` with its driver"),
    ("volumes_from", "declare the volume under the top-level `volumes:` and mount it in each service that shares it"),
    ("cpu_quota", "set resource limits with deploy.resources"),
    ("cpu_shares", "set resource limits with deploy.resources"),
    ("cpu_period", "set resource limits with deploy.resources"),
    ("cpu_count", "set resource limits with deploy.resources"),
    ("cpu_percent", "set resource limits with deploy.resources"),
    ("cpus", "set resource limits with deploy.resources"),
    ("cpuset", "set resource limits with deploy.resources"),
    ("mem_limit", "set resource limits with deploy.resources"),
    ("mem_reservation", "set resource reservations with deploy.resources"),
    ("memswap_limit", "set resource limits with deploy.resources"),
    ("pids_limit", "set a pids limit with deploy.resources.limits.pids"),
    ("scale", "set the replica count with deploy.replicas"),
    ("hostname", "a task's hostname is set by shoal"),
    ("dns", "tasks resolve names through shoal's DNS on their networks"),
    ("dns_search", "tasks resolve names through shoal's DNS on their networks"),
    ("dns_opt", "tasks resolve names through shoal's DNS on their networks"),
    ("extra_hosts", "shoal does not write /etc/hosts entries"),
    ("gpus", "devices are not supported"),
    ("group_add", "supplementary groups come from the image's /etc/group"),
];

/// What the service reads from the environment and files as it is built.
pub fn service(cx: &mut Cx, key: &Key, node: &Node, tops: &mut Tops) -> Result<ServiceSpec, ComposeError> {
    let path = child("services", &key.name);
    let name = format!("{}_{}", cx.stack, key.name);
    if !read::valid_name(&name) || !read::valid_name(&key.name) {
        return Err(ComposeError::Invalid {
            at: key_at(key, &path),
            reason: format!("service name {name:?} is invalid: the key and the full name must be {}", read::NAME_RULE),
        });
    }
    if matches!(node.value, Value::Null) {
        return Err(invalid(node, &path, "a service needs at least an `image:`"));
    }
    let mut spec = ServiceSpec {
        name,
        mode: "replicated".into(),
        replicas: 1,
        limits: Some(Resources::default()),
        reservations: Some(Resources::default()),
        // Swarm's defaults, as `shoal service create` sets them.
        restart: Some(RestartPolicy { condition: "any".into(), delay_ms: Some(5000), ..Default::default() }),
        update: Some(UpdateConfig { parallelism: 1, failure_action: "pause".into(), ..Default::default() }),
        ..Default::default()
    };
    let mut env_files: Option<&Node> = None;
    let mut environment: Option<&Node> = None;
    let mut networks: Option<&Node> = None;
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    let mut deploy: Option<&Node> = None;
    let mut image_seen = false;
    for e in entries(node, &path)? {
        let p = child(&path, &e.key.name);
        let v = &e.value;
        match e.key.name.as_str() {
            "image" => {
                spec.image = string(v, &p)?;
                image_seen = true;
            }
            "command" => spec.args = command(v, &p)?,
            "entrypoint" => spec.entrypoint = command(v, &p)?,
            "environment" => environment = Some(v),
            "env_file" => env_files = Some(v),
            "ports" => spec.ports = ports(v, &p)?,
            "networks" => networks = Some(v),
            "volumes" => spec.mounts = mounts(v, &p, tops)?,
            "secrets" => file_refs(v, &p, FileKind::Secret, tops, &mut spec)?,
            "configs" => file_refs(v, &p, FileKind::Config, tops, &mut spec)?,
            "healthcheck" => healthcheck(v, &p, &mut spec)?,
            "user" => spec.user = string(v, &p)?,
            "working_dir" => spec.workdir = string(v, &p)?,
            "read_only" => spec.read_only = read::boolean(v, &p)?,
            "cap_add" => spec.cap_add = capabilities(v, &p)?,
            "cap_drop" => spec.cap_drop = capabilities(v, &p)?,
            "ulimits" => spec.ulimits = ulimits(v, &p)?,
            "security_opt" => security_opt(v, &p, &mut spec)?,
            "stop_grace_period" => spec.stop_grace_period_ms = read::duration_ms(v, &p)?,
            "labels" => {
                for (k, val, _) in read::key_values(v, &p)? {
                    labels.insert(k, val.unwrap_or_default());
                }
            }
            "deploy" => deploy = Some(v),
            k if k.starts_with("x-") => {}
            k if IGNORED.contains(&k) => cx.warnings.ignore(k),
            k => {
                if let Some((_, why)) = DEPRECATED.iter().find(|(d, _)| *d == k) {
                    cx.warnings.deprecated(k, why);
                } else if let Some((_, why)) = REFUSED.iter().find(|(r, _)| *r == k) {
                    return Err(ComposeError::Unsupported { at: key_at(&e.key, &p), reason: (*why).into() });
                } else {
                    return Err(unknown(e, &p));
                }
            }
        }
    }
    if !image_seen || spec.image.is_empty() {
        return Err(ComposeError::Invalid {
            at: key_at(key, &path),
            reason: "`image:` is required: a stack runs images already in the cluster (`shoal image import|load`)".into(),
        });
    }
    if let Some(d) = deploy {
        deploy_section(d, &child(&path, "deploy"), &mut spec, &mut labels)?;
    }
    spec.env = environment_of(cx, env_files, environment, &path)?;
    networks_of(networks, &path, &key.name, tops, &mut spec)?;
    labels.insert(NAMESPACE_LABEL.into(), cx.stack.into());
    spec.labels = labels.into_iter().collect();
    Ok(spec)
}

/// `cap_add:`/`cap_drop:`: capability names (NET_ADMIN, CAP_NET_ADMIN, ALL).
fn capabilities(n: &Node, path: &str) -> Result<Vec<String>, ComposeError> {
    let mut out = Vec::new();
    for (i, item) in items(n, path)?.iter().enumerate() {
        let p = index(path, i);
        let name = string(item, &p)?;
        let c = shoal_confine::caps::normalize(&name).map_err(|e| invalid(item, &p, e.to_string()))?;
        out.push(c.to_string());
    }
    Ok(out)
}

/// `ulimits:` as compose writes them: `nproc: 65535` or
/// `nofile: {soft: 20000, hard: 40000}`.
fn ulimits(n: &Node, path: &str) -> Result<Vec<Ulimit>, ComposeError> {
    let mut out = Vec::new();
    for e in entries(n, path)? {
        let p = child(path, &e.key.name);
        let num = |v: &Node, p: &str| -> Result<i64, ComposeError> {
            string(v, p)?.trim().parse::<i64>().map_err(|_| wrong(v, p, "a whole number (-1: unlimited)"))
        };
        let (soft, hard) = match &e.value.value {
            Value::Map(_) => {
                let (mut soft, mut hard) = (None, None);
                for f in entries(&e.value, &p)? {
                    let fp = child(&p, &f.key.name);
                    match f.key.name.as_str() {
                        "soft" => soft = Some(num(&f.value, &fp)?),
                        "hard" => hard = Some(num(&f.value, &fp)?),
                        _ => return Err(unknown(f, &fp)),
                    }
                }
                match (soft, hard) {
                    (Some(s), Some(h)) => (s, h),
                    _ => return Err(invalid(&e.value, &p, "needs both `soft:` and `hard:`")),
                }
            }
            _ => {
                let v = num(&e.value, &p)?;
                (v, v)
            }
        };
        let u = Ulimit { name: e.key.name.clone(), soft, hard };
        let check = shoal_confine::ulimit::Ulimit { name: u.name.clone(), soft, hard };
        shoal_confine::ulimit::check(&check).map_err(|err| invalid(&e.value, &p, err.to_string()))?;
        out.push(u);
    }
    Ok(out)
}

/// `security_opt:`: `seccomp:unconfined`, `seccomp:PROFILE.json` (read
/// now, relative to the compose file), `no-new-privileges[:true]` (shoal
/// always sets it). Anything else would be dropped silently: refused.
fn security_opt(n: &Node, path: &str, spec: &mut ServiceSpec) -> Result<(), ComposeError> {
    for (i, item) in items(n, path)?.iter().enumerate() {
        let p = index(path, i);
        let o = string(item, &p)?;
        let (k, v) = o.split_once([':', '=']).unwrap_or((o.as_str(), ""));
        match (k, v) {
            ("seccomp", "unconfined") => spec.seccomp = "unconfined".into(),
            ("seccomp", "") => return Err(invalid(item, &p, "expected seccomp:unconfined or seccomp:PROFILE.json")),
            ("seccomp", file) => {
                let fp = read::file_path(item, &p, file)?;
                let json = std::fs::read_to_string(&fp)
                    .map_err(|source| ComposeError::ReadReferenced { at: at(item, &p), path: fp.clone(), source })?;
                shoal_confine::Profile::from_json(&json).map_err(|e| invalid(item, &p, format!("{}: {e}", fp.display())))?;
                spec.seccomp = json;
            }
            ("no-new-privileges", "" | "true") => {}
            _ => {
                return Err(unsupported(item, &p, format!("{o:?}: shoal takes seccomp:unconfined|PROFILE.json and no-new-privileges")));
            }
        }
    }
    Ok(())
}

/// `command:`/`entrypoint:` as a list, or a string split like a shell does.
fn command(n: &Node, path: &str) -> Result<Vec<String>, ComposeError> {
    match &n.value {
        Value::Scalar(s) => units::split_words(s).map_err(|why| invalid(n, path, format!("{s:?}: {why}"))),
        Value::Seq(_) => read::strings(n, path),
        Value::Null => Ok(Vec::new()),
        Value::Map(_) => Err(wrong(n, path, "a string or a list of strings")),
    }
}

/// `env_file:` first (in order), then `environment:` over it; `KEY` alone
/// takes the value from the environment and is left out when it isn't set
/// there. Sorted by key, as Docker does.
fn environment_of(cx: &Cx, env_files: Option<&Node>, environment: Option<&Node>, path: &str) -> Result<Vec<String>, ComposeError> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut set = |k: String, v: Option<String>| {
        if let Some(v) = v.or_else(|| cx.vars.get(&k).cloned()) {
            env.insert(k, v);
        }
    };
    if let Some(n) = env_files {
        let p = child(path, "env_file");
        let list: Vec<(Node, String)> = match &n.value {
            Value::Seq(items) => items.iter().enumerate().map(|(i, item)| (item.clone(), index(&p, i))).collect(),
            _ => vec![(n.clone(), p.clone())],
        };
        for (item, ip) in list {
            // `- path` or `- {path: P, required: false}` (compose spec).
            let (file, required) = match &item.value {
                Value::Map(_) => {
                    let mut file = None;
                    let mut required = true;
                    for f in entries(&item, &ip)? {
                        let fp = child(&ip, &f.key.name);
                        match f.key.name.as_str() {
                            "path" => file = Some(string(&f.value, &fp)?),
                            "required" => required = read::boolean(&f.value, &fp)?,
                            "format" => return Err(unsupported(&f.value, &fp, "env file formats other than the default")),
                            _ => return Err(unknown(f, &fp)),
                        }
                    }
                    (file.ok_or_else(|| invalid(&item, &ip, "needs `path:`"))?, required)
                }
                _ => (string(&item, &ip).map_err(|_| wrong(&item, &ip, "a path or a list of paths"))?, true),
            };
            let fp = read::file_path(&item, &ip, &file)?;
            let text = match std::fs::read_to_string(&fp) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => continue,
                Err(source) => return Err(ComposeError::ReadReferenced { at: at(&item, &ip), path: fp, source }),
            };
            for (k, v) in envfile::parse(&fp.display().to_string(), &text)? {
                set(k, v);
            }
        }
    }
    if let Some(n) = environment {
        for (k, v, kat) in read::key_values(n, &child(path, "environment"))? {
            if k.contains(char::is_whitespace) {
                return Err(ComposeError::Invalid { at: kat, reason: format!("{k:?}: a variable name cannot contain whitespace") });
            }
            set(k, v);
        }
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// A port number, or a range `A-B`.
fn port_range(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u32 = a.parse().ok()?;
    let b: u32 = b.parse().ok()?;
    ((1..=65535).contains(&a) && (a..=65535).contains(&b)).then_some((a, b))
}

const PORT_FORMS: &str = "expected TARGET, PUBLISHED:TARGET or ranges such as 8080-8081:80-81, optionally with /tcp or /udp";

fn ports(n: &Node, path: &str) -> Result<Vec<Port>, ComposeError> {
    let mut out = Vec::new();
    for (i, item) in items(n, path)?.iter().enumerate() {
        let p = index(path, i);
        match &item.value {
            Value::Scalar(s) => out.extend(short_port(item, &p, s)?),
            Value::Map(_) => out.push(long_port(item, &p)?),
            _ => return Err(wrong(item, &p, "a port such as \"8080:80\" or a mapping with target and published")),
        }
    }
    Ok(out)
}

fn protocol(n: &Node, path: &str, proto: &str) -> Result<String, ComposeError> {
    match proto {
        "tcp" | "udp" => Ok(proto.to_string()),
        "sctp" => Err(unsupported(n, path, "SCTP ports")),
        other => Err(invalid(n, path, format!("protocol {other:?}: expected tcp or udp"))),
    }
}

/// `80`, `8080:80`, `8080:80/udp`, `8080-8081:80-81`. A bare target is
/// published on the same port: Swarm would pick a free one from
/// 30000-32767, but shoal has no port allocator.
fn short_port(n: &Node, path: &str, s: &str) -> Result<Vec<Port>, ComposeError> {
    let (body, proto) = s.rsplit_once('/').unwrap_or((s, "tcp"));
    let proto = protocol(n, path, proto)?;
    let parts: Vec<&str> = body.split(':').collect();
    let (published, target) = match parts.as_slice() {
        [t] => (*t, *t),
        [p, t] => (*p, *t),
        _ if body.starts_with('[') || parts.len() == 3 => {
            return Err(unsupported(n, path, format!("{s:?}: a host IP: published ports listen on every node's addresses (the routing mesh)")));
        }
        _ => return Err(invalid(n, path, format!("{s:?}: {PORT_FORMS}"))),
    };
    let (Some(pr), Some(tr)) = (port_range(published), port_range(target)) else {
        return Err(invalid(n, path, format!("{s:?}: {PORT_FORMS} (ports 1-65535)")));
    };
    if pr.1 - pr.0 != tr.1 - tr.0 {
        return Err(invalid(n, path, format!("{s:?}: the published and target ranges must be the same length")));
    }
    Ok((0..=tr.1 - tr.0)
        .map(|k| Port { published: pr.0 + k, target: tr.0 + k, protocol: proto.clone(), mode: "ingress".into() })
        .collect())
}

fn long_port(n: &Node, path: &str) -> Result<Port, ComposeError> {
    let mut port = Port { protocol: "tcp".into(), mode: "ingress".into(), ..Default::default() };
    let num = |v: &Node, p: &str| -> Result<u32, ComposeError> {
        match read::uint(v, p)? {
            x @ 1..=65535 => Ok(x as u32),
            _ => Err(invalid(v, p, "must be 1-65535")),
        }
    };
    for e in entries(n, path)? {
        let p = child(path, &e.key.name);
        let v = &e.value;
        match e.key.name.as_str() {
            "target" => port.target = num(v, &p)?,
            "published" => port.published = num(v, &p)?,
            "protocol" => port.protocol = protocol(v, &p, &string(v, &p)?)?,
            "mode" => {
                port.mode = string(v, &p)?;
                if port.mode != "ingress" && port.mode != "host" {
                    return Err(invalid(v, &p, format!("{:?}: expected ingress or host", port.mode)));
                }
            }
            "host_ip" => return Err(unsupported(v, &p, "a host IP: published ports listen on every node's addresses (the routing mesh)")),
            // Descriptive only.
            "name" | "app_protocol" => {}
            k if k.starts_with("x-") => {}
            _ => return Err(unknown(e, &p)),
        }
    }
    if port.target == 0 {
        return Err(invalid(n, path, "a port needs `target:`"));
    }
    if port.published == 0 {
        return Err(invalid(n, path, "a port needs `published:` (shoal has no port allocator to pick one)"));
    }
    Ok(port)
}

fn volume_ref(tops: &mut Tops, n: &Node, path: &str, key: &str) -> Result<String, ComposeError> {
    match tops.volumes.iter_mut().find(|d| d.key == key) {
        Some(d) => {
            d.used = true;
            Ok(d.name.clone())
        }
        None => Err(ComposeError::Undefined { at: at(n, path), kind: "volume", name: key.to_string() }),
    }
}

/// A bind mount's source: absolute, or relative to the compose file.
fn bind_source(n: &Node, path: &str, src: &str) -> Result<String, ComposeError> {
    let p = read::file_path(n, path, src)?;
    let s = p.to_str().ok_or_else(|| invalid(n, path, format!("{src:?}: the path is not UTF-8")))?.to_string();
    if !read::clean_absolute(&s) {
        return Err(invalid(n, path, format!("{src:?}: must be a clean absolute path (no '.', '..' or empty components), or one relative to the compose file")));
    }
    Ok(s)
}

fn mounts(n: &Node, path: &str, tops: &mut Tops) -> Result<Vec<Mount>, ComposeError> {
    let mut out: Vec<Mount> = Vec::new();
    for (i, item) in items(n, path)?.iter().enumerate() {
        let p = index(path, i);
        let m = match &item.value {
            Value::Scalar(s) => short_mount(item, &p, s, tops)?,
            Value::Map(_) => long_mount(item, &p, tops)?,
            _ => return Err(wrong(item, &p, "a volume such as \"data:/data\" or a mapping with type, source and target")),
        };
        if !read::clean_absolute(&m.target) || m.target == "/" {
            return Err(invalid(item, &p, format!("target {:?} must be a clean absolute path other than /", m.target)));
        }
        if out.iter().any(|o| o.target == m.target) {
            return Err(invalid(item, &p, format!("{:?} is mounted twice", m.target)));
        }
        out.push(m);
    }
    Ok(out)
}

/// `NAME:/dst[:ro]`, `/abs:/dst[:ro]`, `./rel:/dst[:ro]`.
fn short_mount(n: &Node, path: &str, s: &str, tops: &mut Tops) -> Result<Mount, ComposeError> {
    let parts: Vec<&str> = s.split(':').collect();
    let (source, target, opts) = match parts.as_slice() {
        [_] | [_, "ro" | "rw"] => {
            return Err(unsupported(n, path, format!("{s:?}: anonymous volumes; name one (NAME:/dst) and declare it under the top-level `volumes:`")));
        }
        [src, dst] => (*src, *dst, ""),
        [src, dst, opts] => (*src, *dst, *opts),
        _ => return Err(invalid(n, path, format!("{s:?}: expected SOURCE:TARGET[:ro]"))),
    };
    if source.is_empty() {
        return Err(invalid(n, path, format!("{s:?}: empty source")));
    }
    let is_path = source.starts_with(['/', '.', '~']);
    let mut m = Mount { target: target.to_string(), ..Default::default() };
    if is_path {
        m.r#type = "bind".into();
        m.source = bind_source(n, path, source)?;
    } else {
        m.r#type = "volume".into();
        m.source = volume_ref(tops, n, path, source)?;
    }
    for opt in opts.split(',').filter(|o| !o.is_empty()) {
        match opt {
            "ro" => m.read_only = true,
            "rw" => m.read_only = false,
            "nocopy" if m.r#type == "volume" => m.volume_nocopy = true,
            "z" | "Z" => return Err(unsupported(n, path, format!("{s:?}: SELinux relabelling ({opt})"))),
            "shared" | "rshared" | "slave" | "rslave" | "private" | "rprivate" => {
                return Err(unsupported(n, path, format!("{s:?}: mount propagation ({opt}); binds are private")));
            }
            _ => return Err(invalid(n, path, format!("{s:?}: unknown option {opt:?} (expected ro, rw or nocopy)"))),
        }
    }
    Ok(m)
}

fn long_mount(n: &Node, path: &str, tops: &mut Tops) -> Result<Mount, ComposeError> {
    let mut m = Mount::default();
    let mut source: Option<(String, &Node, String)> = None;
    let mut sub: Vec<&Entry> = Vec::new();
    for e in entries(n, path)? {
        let p = child(path, &e.key.name);
        let v = &e.value;
        match e.key.name.as_str() {
            "type" => {
                m.r#type = string(v, &p)?;
                if !["volume", "bind", "tmpfs"].contains(&m.r#type.as_str()) {
                    return Err(unsupported(v, &p, format!("mount type {:?}: expected volume, bind or tmpfs", m.r#type)));
                }
            }
            "source" => source = Some((string(v, &p)?, v, p)),
            "target" => m.target = string(v, &p)?,
            "read_only" => m.read_only = read::boolean(v, &p)?,
            "volume" | "bind" | "tmpfs" => sub.push(e),
            // Docker Desktop's file sharing mode: nothing to do on Linux.
            "consistency" => {}
            k if k.starts_with("x-") => {}
            _ => return Err(unknown(e, &p)),
        }
    }
    if m.r#type.is_empty() {
        return Err(invalid(n, path, "a mount needs `type:` (volume, bind or tmpfs)"));
    }
    if m.target.is_empty() {
        return Err(invalid(n, path, "a mount needs `target:`"));
    }
    match (m.r#type.as_str(), source) {
        ("volume", Some((s, v, p))) => m.source = volume_ref(tops, v, &p, &s)?,
        ("volume", None) => return Err(unsupported(n, path, "anonymous volumes; give `source:` a volume declared under the top-level `volumes:`")),
        ("bind", Some((s, v, p))) => m.source = bind_source(v, &p, &s)?,
        ("bind", None) => return Err(invalid(n, path, "a bind mount needs `source:`")),
        ("tmpfs", Some((_, v, p))) => return Err(invalid(v, &p, "a tmpfs mount takes no source")),
        _ => {}
    }
    for e in sub {
        let p = child(path, &e.key.name);
        if e.key.name != m.r#type {
            return Err(invalid(&e.value, &p, format!("`{}` options on a {} mount", e.key.name, m.r#type)));
        }
        for f in entries(&e.value, &p)? {
            let fp = child(&p, &f.key.name);
            let v = &f.value;
            match (e.key.name.as_str(), f.key.name.as_str()) {
                ("volume", "nocopy") => m.volume_nocopy = read::boolean(v, &fp)?,
                ("volume", "subpath") => return Err(unsupported(v, &fp, "mounting part of a volume")),
                ("bind", "propagation") => return Err(unsupported(v, &fp, "mount propagation; binds are private")),
                ("bind", "create_host_path") => {
                    if !read::boolean(v, &fp)? {
                        return Err(unsupported(v, &fp, "create_host_path: false; a missing bind source is an error on the node anyway"));
                    }
                }
                ("bind", "selinux") => return Err(unsupported(v, &fp, "SELinux relabelling")),
                ("tmpfs", "size") => m.tmpfs_size = read::size(v, &fp)?,
                ("tmpfs", "mode") => m.tmpfs_mode = octal_mode(v, &fp)?,
                _ => return Err(unknown(f, &fp)),
            }
        }
    }
    Ok(m)
}

/// Permission bits, always read as octal like chmod's: `1777`, `0755`,
/// `0o755` (a YAML number 1777 is the chmod mode 1777, not 0o3361).
fn octal_mode(n: &Node, path: &str) -> Result<u32, ComposeError> {
    let s = string(n, path)?;
    let digits = s.strip_prefix("0o").unwrap_or(&s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 && !digits.is_empty() => Ok(m),
        _ => Err(wrong(n, path, "octal permission bits such as 1777 or 0755")),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Secret,
    Config,
}

/// A service's `secrets:` or `configs:`: `- KEY` or `- {source: KEY,
/// target: T}`. The object is `STACK_KEY` (or its `name:`); it is mounted
/// at /run/secrets/KEY (secrets) or /KEY (configs) unless `target:` says.
fn file_refs(n: &Node, path: &str, kind: FileKind, tops: &mut Tops, spec: &mut ServiceSpec) -> Result<(), ComposeError> {
    let what = if kind == FileKind::Secret { "secret" } else { "config" };
    for (i, item) in items(n, path)?.iter().enumerate() {
        let p = index(path, i);
        let (source, target, src_at) = match &item.value {
            Value::Scalar(s) => (s.clone(), None, at(item, &p)),
            Value::Map(_) => {
                let (mut source, mut target) = (None, None);
                for e in entries(item, &p)? {
                    let fp = child(&p, &e.key.name);
                    match e.key.name.as_str() {
                        "source" => source = Some((string(&e.value, &fp)?, at(&e.value, &fp))),
                        "target" => target = Some((string(&e.value, &fp)?, &e.value, fp)),
                        "uid" | "gid" | "mode" => {
                            return Err(unsupported(&e.value, &fp, format!("{what} file owner and mode: shoal mounts them read-only, owned by root, mode 0444")));
                        }
                        k if k.starts_with("x-") => {}
                        _ => return Err(unknown(e, &fp)),
                    }
                }
                let (s, a) = source.ok_or_else(|| invalid(item, &p, format!("a {what} reference needs `source:`")))?;
                (s, target, a)
            }
            _ => return Err(wrong(item, &p, "a name or a mapping with source and target")),
        };
        let list = if kind == FileKind::Secret { &mut tops.secrets } else { &mut tops.configs };
        let d = list
            .iter_mut()
            .find(|d| d.key == source)
            .ok_or_else(|| ComposeError::Undefined { at: src_at.clone(), kind: what, name: source.clone() })?;
        d.used = true;
        let name = d.name.clone();
        let (names, targets) = match kind {
            FileKind::Secret => (&mut spec.secrets, &mut spec.secret_targets),
            FileKind::Config => (&mut spec.configs, &mut spec.config_targets),
        };
        if names.contains(&name) {
            return Err(ComposeError::Invalid { at: src_at, reason: format!("{what} {source:?} is listed twice") });
        }
        let target = match (kind, target) {
            (FileKind::Secret, None) => source.clone(),
            (FileKind::Config, None) => format!("/{source}"),
            (FileKind::Secret, Some((t, v, fp))) => {
                let ok = if t.starts_with('/') { read::clean_absolute(&t) } else { !t.is_empty() && !t.contains('/') && t != "." && t != ".." };
                if !ok {
                    return Err(invalid(v, &fp, format!("{t:?}: expected a file name (under /run/secrets) or a clean absolute path")));
                }
                t
            }
            (FileKind::Config, Some((t, v, fp))) => {
                if !read::clean_absolute(&t) || t == "/" {
                    return Err(invalid(v, &fp, format!("{t:?}: expected a clean absolute path")));
                }
                t
            }
        };
        names.push(name.clone());
        targets.insert(name, target);
    }
    Ok(())
}

/// `healthcheck:` → `health_cmd` (which shoal runs with `sh -c`) and its
/// timings. `test` is a string (a shell command), `[CMD, prog, args…]`,
/// `[CMD-SHELL, command]` or `[NONE]`.
fn healthcheck(n: &Node, path: &str, spec: &mut ServiceSpec) -> Result<(), ComposeError> {
    let mut test: Option<(Option<String>, &Node, String)> = None;
    let mut disable: Option<(bool, At)> = None;
    let mut timing = false;
    for e in entries(n, path)? {
        let p = child(path, &e.key.name);
        let v = &e.value;
        match e.key.name.as_str() {
            "test" => {
                let cmd = match &v.value {
                    Value::Scalar(s) => Some(s.clone()),
                    Value::Seq(_) => {
                        let words = read::strings(v, &p)?;
                        match words.split_first() {
                            Some((first, rest)) if first == "CMD" && !rest.is_empty() => {
                                Some(rest.iter().map(|w| units::shell_quote(w)).collect::<Vec<_>>().join(" "))
                            }
                            Some((first, rest)) if first == "CMD-SHELL" && !rest.is_empty() => Some(rest.join(" ")),
                            Some((first, rest)) if first == "NONE" && rest.is_empty() => None,
                            _ => return Err(invalid(v, &p, "expected [CMD, program, args...], [CMD-SHELL, command], [NONE] or a command string")),
                        }
                    }
                    _ => return Err(wrong(v, &p, "a command string or a list")),
                };
                if cmd.as_deref() == Some("") {
                    return Err(invalid(v, &p, "empty command"));
                }
                test = Some((cmd, v, p));
            }
            "disable" => disable = Some((read::boolean(v, &p)?, at(v, &p))),
            "interval" => {
                spec.health_interval_ms = read::duration_ms(v, &p)?;
                if spec.health_interval_ms < 100 {
                    return Err(invalid(v, &p, "must be at least 100ms"));
                }
                timing = true;
            }
            "timeout" => {
                spec.health_timeout_ms = read::duration_ms(v, &p)?;
                timing = true;
            }
            "start_period" => {
                spec.health_start_period_ms = read::duration_ms(v, &p)?;
                timing = true;
            }
            "retries" => {
                spec.health_retries = u32::try_from(read::uint(v, &p)?).map_err(|_| invalid(v, &p, "too large"))?;
                timing = true;
            }
            "start_interval" => return Err(unsupported(v, &p, "a separate check interval during the start period")),
            k if k.starts_with("x-") => {}
            _ => return Err(unknown(e, &p)),
        }
    }
    match (disable, test) {
        (Some((true, at)), Some((Some(_), _, _))) => {
            Err(ComposeError::Invalid { at, reason: "test and disable can't be set at the same time".into() })
        }
        (Some((true, _)), _) | (_, Some((None, _, _))) => {
            spec.health_cmd.clear();
            spec.health_interval_ms = 0;
            spec.health_timeout_ms = 0;
            spec.health_retries = 0;
            spec.health_start_period_ms = 0;
            Ok(())
        }
        (_, Some((Some(cmd), _, _))) => {
            spec.health_cmd = cmd;
            Ok(())
        }
        (_, None) if timing => Err(invalid(n, path, "a health check needs `test:` (shoal doesn't run an image's own HEALTHCHECK)")),
        (_, None) => Ok(()),
    }
}

/// A service's networks (`- KEY` or `KEY: {aliases: […]}`), `default`
/// when it names none; the service's own key and the aliases become DNS
/// names on every network it joins.
fn networks_of(n: Option<&Node>, path: &str, short: &str, tops: &mut Tops, spec: &mut ServiceSpec) -> Result<(), ComposeError> {
    let p = child(path, "networks");
    let mut wanted: Vec<(String, At)> = Vec::new();
    let mut aliases: Vec<String> = vec![short.to_string()];
    match n.map(|n| (&n.value, n)) {
        None | Some((Value::Null, _)) => wanted.push(("default".into(), At { file: String::new(), line: 0, key: p.clone() })),
        Some((Value::Seq(list), _)) => {
            for (i, item) in list.iter().enumerate() {
                let ip = index(&p, i);
                wanted.push((string(item, &ip)?, at(item, &ip)));
            }
        }
        Some((Value::Map(entries_), _)) => {
            for e in entries_ {
                let ep = child(&p, &e.key.name);
                wanted.push((e.key.name.clone(), key_at(&e.key, &ep)));
                for f in entries(&e.value, &ep)? {
                    let fp = child(&ep, &f.key.name);
                    match f.key.name.as_str() {
                        "aliases" => {
                            for (j, a) in items(&f.value, &fp)?.iter().enumerate() {
                                let ap = index(&fp, j);
                                let alias = string(a, &ap)?;
                                if !read::valid_name(&alias) {
                                    return Err(invalid(a, &ap, format!("alias {alias:?} is invalid: must be {}", read::NAME_RULE)));
                                }
                                if !aliases.contains(&alias) {
                                    aliases.push(alias);
                                }
                            }
                        }
                        "ipv4_address" | "ipv6_address" | "link_local_ips" | "mac_address" => {
                            return Err(unsupported(&f.value, &fp, "fixed addresses: shoal assigns each task's address"));
                        }
                        "priority" | "gw_priority" => return Err(unsupported(&f.value, &fp, "network priorities")),
                        "driver_opts" => return Err(unsupported(&f.value, &fp, "network driver options")),
                        k if k.starts_with("x-") => {}
                        _ => return Err(unknown(f, &fp)),
                    }
                }
            }
        }
        Some((_, n)) => return Err(wrong(n, &p, "a list of network names or a mapping")),
    }
    for (key, at) in wanted {
        let name = match tops.networks.iter_mut().find(|d| d.key == key) {
            Some(d) => {
                d.used = true;
                d.name.clone()
            }
            None if key == "default" => {
                tops.default_used = true;
                tops.default_name.clone()
            }
            None => return Err(ComposeError::Undefined { at, kind: "network", name: key }),
        };
        if spec.networks.contains(&name) {
            return Err(ComposeError::Invalid { at, reason: format!("network {key:?} is listed twice") });
        }
        spec.networks.push(name);
    }
    spec.aliases = aliases;
    Ok(())
}

fn deploy_section(n: &Node, path: &str, spec: &mut ServiceSpec, labels: &mut BTreeMap<String, String>) -> Result<(), ComposeError> {
    let mut replicas: Option<(u64, &Node, String)> = None;
    for e in entries(n, path)? {
        let p = child(path, &e.key.name);
        let v = &e.value;
        match e.key.name.as_str() {
            "mode" => {
                let mode = string(v, &p)?;
                match mode.as_str() {
                    "replicated" | "global" => spec.mode = mode,
                    "replicated-job" | "global-job" => return Err(unsupported(v, &p, "jobs: services run until removed")),
                    _ => return Err(invalid(v, &p, format!("{mode:?}: expected replicated or global"))),
                }
            }
            "replicas" => replicas = Some((read::uint(v, &p)?, v, p)),
            "labels" => {
                for (k, val, _) in read::key_values(v, &p)? {
                    labels.insert(k, val.unwrap_or_default());
                }
            }
            "endpoint_mode" => {
                let m = string(v, &p)?;
                if m != "vip" && m != "dnsrr" {
                    return Err(invalid(v, &p, format!("{m:?}: expected vip or dnsrr")));
                }
                spec.endpoint_mode = m;
            }
            "resources" => resources(v, &p, spec)?,
            "restart_policy" => spec.restart = Some(restart_policy(v, &p)?),
            "placement" => placement(v, &p, spec)?,
            "update_config" => spec.update = Some(update_config(v, &p, false)?),
            "rollback_config" => spec.rollback = Some(update_config(v, &p, true)?),
            k if k.starts_with("x-") => {}
            _ => return Err(unknown(e, &p)),
        }
    }
    match (spec.mode.as_str(), replicas) {
        ("global", Some((_, v, p))) => return Err(invalid(v, &p, "replicas can only be used with replicated mode")),
        ("global", None) => spec.replicas = 0,
        (_, Some((r, _, _))) => spec.replicas = r,
        (_, None) => {}
    }
    Ok(())
}

fn resources(n: &Node, path: &str, spec: &mut ServiceSpec) -> Result<(), ComposeError> {
    for e in entries(n, path)? {
        let p = child(path, &e.key.name);
        let limit = match e.key.name.as_str() {
            "limits" => true,
            "reservations" => false,
            k if k.starts_with("x-") => continue,
            _ => return Err(unknown(e, &p)),
        };
        let mut r = Resources::default();
        for f in entries(&e.value, &p)? {
            let fp = child(&p, &f.key.name);
            let v = &f.value;
            match f.key.name.as_str() {
                "cpus" => r.nano_cpus = read::cpus(v, &fp)?,
                "memory" => r.memory_bytes = read::size(v, &fp)?,
                "pids" if limit => {
                    let s = read::string(v, &fp)?;
                    r.pids = s.trim().parse::<i64>().ok().filter(|n| *n > 0 || *n == -1).ok_or_else(|| invalid(v, &fp, format!("{s:?}: expected a positive count, or -1")))?;
                }
                "generic_resources" | "devices" if !limit => return Err(unsupported(v, &fp, "generic resources and devices")),
                k if k.starts_with("x-") => {}
                _ => return Err(unknown(f, &fp)),
            }
        }
        if limit {
            if r.memory_bytes != 0 && r.memory_bytes < 4 << 20 {
                return Err(invalid(&e.value, &p, "a memory limit must be at least 4M"));
            }
            spec.limits = Some(r);
        } else {
            spec.reservations = Some(r);
        }
    }
    Ok(())
}

fn restart_policy(n: &Node, path: &str) -> Result<RestartPolicy, ComposeError> {
    let mut r = RestartPolicy { condition: "any".into(), delay_ms: Some(5000), ..Default::default() };
    for e in entries(n, path)? {
        let p = child(path, &e.key.name);
        let v = &e.value;
        match e.key.name.as_str() {
            "condition" => {
                r.condition = string(v, &p)?;
                if !["none", "on-failure", "any"].contains(&r.condition.as_str()) {
                    return Err(invalid(v, &p, format!("{:?}: expected none, on-failure or any", r.condition)));
                }
            }
            "delay" => r.delay_ms = Some(read::duration_ms(v, &p)?),
            "max_attempts" => r.max_attempts = read::uint(v, &p)?,
            "window" => r.window_ms = read::duration_ms(v, &p)?,
            k if k.starts_with("x-") => {}
            _ => return Err(unknown(e, &p)),
        }
    }
    Ok(r)
}

/// A placement constraint: `node.(id|name|hostname|role|labels.K) (==|!=) V`,
/// as the managers accept them.
fn valid_constraint(c: &str) -> bool {
    let Some((lhs, rhs)) = c.split_once("==").or_else(|| c.split_once("!=")) else { return false };
    let (lhs, rhs) = (lhs.trim(), rhs.trim());
    if rhs.is_empty() || rhs.contains("==") || rhs.contains("!=") {
        return false;
    }
    match lhs {
        "node.id" | "node.name" | "node.hostname" => true,
        "node.role" => rhs == "manager" || rhs == "worker",
        _ => lhs.strip_prefix("node.labels.").is_some_and(|k| !k.is_empty()),
    }
}

fn placement(n: &Node, path: &str, spec: &mut ServiceSpec) -> Result<(), ComposeError> {
    for e in entries(n, path)? {
        let p = child(path, &e.key.name);
        let v = &e.value;
        match e.key.name.as_str() {
            "constraints" => {
                spec.constraints.clear();
                for (i, item) in items(v, &p)?.iter().enumerate() {
                    let ip = index(&p, i);
                    let c = string(item, &ip)?;
                    if !valid_constraint(&c) {
                        return Err(invalid(item, &ip, format!("{c:?}: expected node.labels.KEY==VALUE, node.labels.KEY!=VALUE, node.role==manager, node.name==NAME or node.id==ID")));
                    }
                    spec.constraints.push(c);
                }
            }
            "preferences" => {
                spec.placement_prefs.clear();
                for (i, item) in items(v, &p)?.iter().enumerate() {
                    let ip = index(&p, i);
                    let mut spread = None;
                    for f in entries(item, &ip)? {
                        let fp = child(&ip, &f.key.name);
                        match f.key.name.as_str() {
                            "spread" => {
                                let s = string(&f.value, &fp)?;
                                if s.strip_prefix("node.labels.").is_none_or(str::is_empty) {
                                    return Err(invalid(&f.value, &fp, format!("{s:?}: expected node.labels.KEY")));
                                }
                                spread = Some(s);
                            }
                            _ => return Err(unknown(f, &fp)),
                        }
                    }
                    let s = spread.ok_or_else(|| invalid(item, &ip, "expected `spread: node.labels.KEY`"))?;
                    spec.placement_prefs.push(format!("spread={s}"));
                }
            }
            "max_replicas_per_node" => return Err(unsupported(v, &p, "a cap on replicas per node")),
            k if k.starts_with("x-") => {}
            _ => return Err(unknown(e, &p)),
        }
    }
    Ok(())
}

/// `update_config:` / `rollback_config:`. As in docker/cli, parallelism is
/// 1 unless given.
fn update_config(n: &Node, path: &str, rollback: bool) -> Result<UpdateConfig, ComposeError> {
    let mut u = UpdateConfig { parallelism: 1, failure_action: "pause".into(), ..Default::default() };
    for e in entries(n, path)? {
        let p = child(path, &e.key.name);
        let v = &e.value;
        match e.key.name.as_str() {
            "parallelism" => u.parallelism = read::uint(v, &p)?,
            "delay" => u.delay_ms = read::duration_ms(v, &p)?,
            "failure_action" => {
                let a = string(v, &p)?;
                match (rollback, a.as_str()) {
                    (false, "pause" | "rollback") | (true, "pause" | "continue") => u.failure_action = a,
                    (false, "continue") => return Err(unsupported(v, &p, "failure_action continue: an update that fails pauses or rolls back")),
                    (false, _) => return Err(invalid(v, &p, format!("{a:?}: expected pause or rollback"))),
                    (true, _) => return Err(invalid(v, &p, format!("{a:?}: expected pause or continue"))),
                }
            }
            "order" => {
                let o = string(v, &p)?;
                if o != "stop-first" && o != "start-first" {
                    return Err(invalid(v, &p, format!("{o:?}: expected stop-first or start-first")));
                }
                u.order = o;
            }
            "monitor" => u.monitor_ms = read::duration_ms(v, &p)?,
            "max_failure_ratio" => {
                let s = string(v, &p)?;
                u.max_failure_ratio = s
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| invalid(v, &p, format!("{s:?}: expected a number between 0 and 1")))?;
            }
            k if k.starts_with("x-") => {}
            _ => return Err(unknown(e, &p)),
        }
    }
    Ok(u)
}
