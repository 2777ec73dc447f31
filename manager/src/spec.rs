//! Validation of what operators send: names, resources, constraints, ports.
//! The CLI uses the parsers to build requests; the managers run `validate_*`
//! again on every request, because not every client is our CLI.

use shoal_proto::control::ServiceSpec;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid { what: &'static str, value: String, reason: &'static str },
    /// A seccomp profile or ulimit the confinement crate refused (its
    /// message names the value).
    #[error("{0}")]
    Confinement(String),
}

fn invalid(what: &'static str, value: impl Into<String>, reason: &'static str) -> SpecError {
    SpecError::Invalid { what, value: value.into(), reason }
}

/// DNS-label rules: 1–63 of `a-z 0-9 -`, starting and ending alphanumeric.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), SpecError> {
    const REASON: &str = "must be 1-63 lowercase letters, digits, '-' or '_', starting and ending with a letter or digit";
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !name.starts_with(['-', '_'])
        && !name.ends_with(['-', '_']);
    if ok { Ok(()) } else { Err(invalid(what, name, REASON)) }
}

/// An IPv4 network: base address and prefix length.
pub type Cidr = (std::net::Ipv4Addr, u8);

/// `"100.64.3.0/24"` → (100.64.3.0, 24). The address must be the network's
/// own (no host bits), the prefix 8–29: room for a gateway and tasks.
pub fn parse_cidr(s: &str) -> Result<Cidr, SpecError> {
    const REASON: &str = "expected an IPv4 network such as 100.64.3.0/24 (prefix 8-29, no host bits set)";
    let (addr, len) = s.split_once('/').ok_or_else(|| invalid("subnet", s, REASON))?;
    let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| invalid("subnet", s, REASON))?;
    let len: u8 = len.parse().map_err(|_| invalid("subnet", s, REASON))?;
    if !(8..=29).contains(&len) {
        return Err(invalid("subnet", s, REASON));
    }
    let mask = u32::MAX << (32 - len);
    if u32::from(addr) & !mask != 0 {
        return Err(invalid("subnet", s, REASON));
    }
    Ok((addr, len))
}

pub fn cidrs_overlap(a: Cidr, b: Cidr) -> bool {
    let len = a.1.min(b.1);
    let mask = u32::MAX << (32 - len);
    u32::from(a.0) & mask == u32::from(b.0) & mask
}

/// The first host address of a network: its gateway.
pub fn first_host(c: Cidr) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(c.0) + 1)
}

/// `"64M"`, `"1.5G"`, `"512k"`, `"1048576"` → bytes (powers of 1024).
pub fn parse_memory(s: &str) -> Result<u64, SpecError> {
    const REASON: &str = "expected a positive size such as 64M, 512k, 1.5G or a byte count";
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return Err(invalid("memory", s, REASON)),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let v: f64 = num.parse().map_err(|_| invalid("memory", s, REASON))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(invalid("memory", s, REASON));
    }
    let bytes = v * mult as f64;
    if bytes > u64::MAX as f64 || bytes < 1.0 {
        return Err(invalid("memory", s, REASON));
    }
    Ok(bytes as u64)
}

/// `"0.5"` → 500_000_000 nano-CPUs.
pub fn parse_cpus(s: &str) -> Result<u64, SpecError> {
    const REASON: &str = "expected a positive number of CPUs such as 0.5 or 2";
    let v: f64 = s.trim().parse().map_err(|_| invalid("cpus", s, REASON))?;
    if !v.is_finite() || v <= 0.0 || v > 1e6 {
        return Err(invalid("cpus", s, REASON));
    }
    let nano = (v * 1e9).round() as u64;
    if nano < 1_000_000 {
        return Err(invalid("cpus", s, "must be at least 0.001"));
    }
    Ok(nano)
}

/// `"web=10"` → ("web", 10), with errors that name the bad part.
/// The most replicas one service may ask for. Swarm has no limit; here each
/// task is an object in the replicated state (and a copy of its spec), and
/// a service this size is created in runs of Raft entries while the
/// cluster keeps answering. Past it, an operator wants a clear error, not
/// a cluster busy for minutes.
pub const MAX_REPLICAS: u64 = 100_000;

/// Checks a replica count against [`MAX_REPLICAS`].
pub fn validate_replicas(n: u64) -> Result<(), SpecError> {
    if n > MAX_REPLICAS {
        return Err(invalid("replicas", n.to_string(), "at most 100000 per service"));
    }
    Ok(())
}

pub fn parse_scale(s: &str) -> Result<(String, u64), SpecError> {
    let Some((name, n)) = s.split_once('=') else {
        return Err(invalid("scale", s, "expected SERVICE=REPLICAS"));
    };
    if name.is_empty() {
        return Err(invalid("scale", s, "expected SERVICE=REPLICAS"));
    }
    let replicas = n
        .parse::<u64>()
        .map_err(|_| invalid("replicas", n, "must be a whole number >= 0"))?;
    validate_replicas(replicas)?;
    Ok((name.to_string(), replicas))
}

/// A placement constraint: `node.(id|name|role|hostname|labels.K) (==|!=) V`.
pub fn validate_constraint(c: &str) -> Result<(), SpecError> {
    const REASON: &str = "expected node.labels.KEY==VALUE, node.labels.KEY!=VALUE, node.role==manager, node.name==NAME or node.id==ID";
    let (lhs, rhs) = if let Some((l, r)) = c.split_once("==") {
        (l, r)
    } else if let Some((l, r)) = c.split_once("!=") {
        (l, r)
    } else {
        return Err(invalid("constraint", c, REASON));
    };
    let lhs = lhs.trim();
    let rhs = rhs.trim();
    if rhs.is_empty() || rhs.contains("==") || rhs.contains("!=") {
        return Err(invalid("constraint", c, REASON));
    }
    let key_ok = match lhs {
        "node.id" | "node.name" | "node.hostname" => true,
        "node.role" => rhs == "manager" || rhs == "worker",
        _ => lhs.strip_prefix("node.labels.").is_some_and(|k| !k.is_empty()),
    };
    if key_ok { Ok(()) } else { Err(invalid("constraint", c, REASON)) }
}

/// A placement preference: `spread=node.labels.KEY`.
pub fn validate_placement_pref(p: &str) -> Result<(), SpecError> {
    match p.strip_prefix("spread=").and_then(|k| k.strip_prefix("node.labels.")) {
        Some(k) if !k.is_empty() => Ok(()),
        _ => Err(invalid("placement preference", p, "expected spread=node.labels.KEY")),
    }
}

/// An image reference: `name[:tag]` or `name@sha256:…`, registry-style path.
pub fn validate_image(image: &str) -> Result<(), SpecError> {
    const REASON: &str = "expected NAME[:TAG] of letters, digits, '.', '_', '-', '/', ':' or '@'";
    let ok = !image.is_empty()
        && image.len() <= 255
        && image
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
        && !image.starts_with(['-', '/', ':', '.']);
    if ok { Ok(()) } else { Err(invalid("image", image, REASON)) }
}

/// The routing mesh's network: shoal creates it when a service first
/// publishes a port, and every service that publishes ports is on it.
pub const INGRESS_NETWORK: &str = "ingress";

/// Whether `p` is published through the routing mesh (every node).
pub fn is_ingress(p: &shoal_proto::control::Port) -> bool {
    p.mode != "host"
}

/// An absolute path without `.`/`..` components, empty components or NULs.
pub fn clean_absolute(p: &str) -> bool {
    p.starts_with('/') && !p.contains('\0') && (p == "/" || p[1..].split('/').all(|c| !c.is_empty() && c != "." && c != ".."))
}

/// One `--mount`: a named volume, a bind of an absolute host path, or a
/// tmpfs; every option belongs to its type.
pub fn validate_mount(m: &shoal_proto::control::Mount) -> Result<(), SpecError> {
    if !clean_absolute(&m.target) || m.target == "/" {
        return Err(invalid("mount target", &m.target, "must be a clean absolute path other than /"));
    }
    match m.r#type.as_str() {
        "volume" => {
            if m.source.is_empty() {
                return Err(invalid("mount source", "", "a volume mount needs src=NAME (anonymous volumes are not supported)"));
            }
            validate_name("volume name", &m.source)?;
        }
        "bind" => {
            if !m.source.starts_with('/') {
                return Err(invalid("bind source", &m.source, "must be an absolute host path"));
            }
            if !clean_absolute(&m.source) {
                return Err(invalid("bind source", &m.source, "must be a clean absolute path (no '.', '..' or empty components)"));
            }
        }
        "tmpfs" => {
            if !m.source.is_empty() {
                return Err(invalid("mount source", &m.source, "a tmpfs mount takes no source"));
            }
            if m.tmpfs_mode > 0o7777 {
                return Err(invalid("tmpfs mode", format!("{:o}", m.tmpfs_mode), "must be octal permission bits (at most 7777)"));
            }
        }
        other => return Err(invalid("mount type", other, "expected volume, bind or tmpfs")),
    }
    if m.r#type != "volume" && (m.volume_nocopy || !m.volume_labels.is_empty()) {
        return Err(invalid("mount option", "volume-nocopy/volume-label", "applies to volume mounts only"));
    }
    if m.r#type != "tmpfs" && (m.tmpfs_size != 0 || m.tmpfs_mode != 0) {
        return Err(invalid("mount option", "tmpfs-size/tmpfs-mode", "applies to tmpfs mounts only"));
    }
    Ok(())
}

/// Checks a whole service spec as the managers receive it.
pub fn validate_service_spec(spec: &ServiceSpec) -> Result<(), SpecError> {
    validate_name("service name", &spec.name)?;
    validate_image(&spec.image)?;
    if (1..100).contains(&spec.health_interval_ms) {
        return Err(invalid("health interval", format!("{}ms", spec.health_interval_ms), "must be at least 100ms"));
    }
    validate_replicas(spec.replicas)?;
    if let Some(a) = &spec.autoscale {
        validate_replicas(a.max)?;
    }
    match spec.mode.as_str() {
        "replicated" => {}
        "global" if spec.replicas == 0 => {}
        "global" => return Err(invalid("replicas", spec.replicas.to_string(), "a global service takes no replica count")),
        other => return Err(invalid("mode", other, "expected replicated or global")),
    }
    for e in &spec.env {
        match e.split_once('=') {
            Some((k, _)) if !k.is_empty() => {}
            _ => return Err(invalid("env", e, "expected KEY=VALUE")),
        }
    }
    let mut published = Vec::new();
    for p in &spec.ports {
        if p.target == 0 || p.target > 65535 {
            return Err(invalid("port", p.target.to_string(), "must be 1-65535"));
        }
        if p.published == 0 || p.published > 65535 {
            return Err(invalid("published port", p.published.to_string(), "must be 1-65535"));
        }
        if p.protocol != "tcp" && p.protocol != "udp" {
            return Err(invalid("protocol", &p.protocol, "expected tcp or udp"));
        }
        if !["", "ingress", "host"].contains(&p.mode.as_str()) {
            return Err(invalid("publish mode", &p.mode, "expected ingress or host"));
        }
        if published.contains(&(p.published, &p.protocol)) {
            return Err(invalid("port", p.published.to_string(), "published twice"));
        }
        published.push((p.published, &p.protocol));
    }
    if let Some(u) = &spec.update {
        match u.order.as_str() {
            "" | "stop-first" => {}
            "start-first" if spec.mode == "global" => {
                return Err(invalid("update order", "start-first", "a global service runs one task per node: its updates are stop-first"));
            }
            "start-first" => {}
            other => return Err(invalid("update order", other, "expected stop-first or start-first")),
        }
    }
    if let Some(a) = &spec.autoscale {
        if spec.mode == "global" {
            return Err(invalid("autoscale", spec.name.clone(), "a global service runs one task per node: it can't be autoscaled"));
        }
        if a.min > a.max {
            return Err(invalid("autoscale --min", format!("{} (--max {})", a.min, a.max), "must not be more than --max"));
        }
        if a.max == 0 {
            return Err(invalid("autoscale --max", "0", "must be at least 1"));
        }
        if a.target_cpu_pct == 0 && a.target_rps == 0 {
            return Err(invalid("autoscale", spec.name.clone(), "needs a target: --target-cpu PCT or --target-rps N"));
        }
        if a.stable_window_ms != 0 && a.stable_window_ms < 2_000 {
            return Err(invalid("autoscale stable window", format!("{}ms", a.stable_window_ms), "must be at least 2s"));
        }
    }
    if spec.networks.iter().any(|n| n == INGRESS_NETWORK) && spec.ports.is_empty() {
        return Err(invalid(
            "network",
            INGRESS_NETWORK,
            "the routing mesh's network is managed by shoal: a service joins it by publishing a port (--publish)",
        ));
    }
    if !["", "vip", "dnsrr"].contains(&spec.endpoint_mode.as_str()) {
        return Err(invalid("endpoint mode", spec.endpoint_mode.clone(), "expected vip or dnsrr"));
    }
    for (i, n) in spec.networks.iter().enumerate() {
        if n == "host" || n == "none" || n == "bridge" {
            return Err(invalid(
                "network",
                n.clone(),
                "Docker's built-in networks are not supported: every task has its own network namespace; create an overlay network and name it",
            ));
        }
        validate_name("network name", n)?;
        if spec.networks[..i].contains(n) {
            return Err(invalid("network", n.clone(), "named twice"));
        }
    }
    for c in &spec.constraints {
        validate_constraint(c)?;
    }
    for p in &spec.placement_prefs {
        validate_placement_pref(p)?;
    }
    if let (Some(l), Some(r)) = (&spec.limits, &spec.reservations) {
        if l.memory_bytes != 0 && r.memory_bytes > l.memory_bytes {
            return Err(invalid("memory reservation", r.memory_bytes.to_string(), "exceeds the memory limit"));
        }
        if l.nano_cpus != 0 && r.nano_cpus > l.nano_cpus {
            return Err(invalid("cpu reservation", r.nano_cpus.to_string(), "exceeds the cpu limit"));
        }
    }
    if let Some(r) = &spec.reservations
        && r.pids != 0
    {
        return Err(invalid("pids reservation", r.pids.to_string(), "a pids count can be limited, not reserved"));
    }
    if let Some(l) = &spec.limits
        && l.pids < -1
    {
        return Err(invalid("pids limit", l.pids.to_string(), "expected a positive count, or -1 for unlimited"));
    }
    if let Some(l) = &spec.limits {
        if l.memory_bytes != 0 && l.memory_bytes < 4 << 20 {
            return Err(invalid("memory limit", l.memory_bytes.to_string(), "must be at least 4M"));
        }
    }
    if let Some(r) = &spec.restart {
        if !["", "none", "on-failure", "any"].contains(&r.condition.as_str()) {
            return Err(invalid("restart condition", &r.condition, "expected none, on-failure or any"));
        }
    }
    if let Some(u) = &spec.update {
        if !["", "pause", "rollback"].contains(&u.failure_action.as_str()) {
            return Err(invalid("update failure action", &u.failure_action, "expected pause or rollback"));
        }
    }
    for (what, u) in [("update", &spec.update), ("rollback", &spec.rollback)] {
        if let Some(u) = u
            && !(0.0..=1.0).contains(&u.max_failure_ratio)
        {
            return Err(invalid(
                if what == "update" { "update max failure ratio" } else { "rollback max failure ratio" },
                u.max_failure_ratio.to_string(),
                "must be between 0 and 1",
            ));
        }
    }
    if let Some(u) = &spec.rollback {
        if !["", "pause", "continue"].contains(&u.failure_action.as_str()) {
            return Err(invalid("rollback failure action", &u.failure_action, "expected pause or continue"));
        }
        if !["", "stop-first", "start-first"].contains(&u.order.as_str()) {
            return Err(invalid("rollback order", &u.order, "expected stop-first or start-first"));
        }
    }
    for (i, m) in spec.mounts.iter().enumerate() {
        validate_mount(m)?;
        if spec.mounts[..i].iter().any(|o| o.target == m.target) {
            return Err(invalid("mount target", &m.target, "is mounted twice"));
        }
    }
    for c in &spec.configs {
        validate_name("config name", c)?;
    }
    for s in &spec.secrets {
        validate_name("secret name", s)?;
    }
    for (name, target) in &spec.secret_targets {
        if !spec.secrets.contains(name) {
            return Err(invalid("secret target", name.clone(), "names a secret the service does not use"));
        }
        let ok = if target.starts_with('/') {
            clean_absolute(target)
        } else {
            !target.is_empty() && !target.contains('/') && target != "." && target != ".."
        };
        if !ok {
            return Err(invalid("secret target", target.clone(), "expected a file name (under /run/secrets) or a clean absolute path"));
        }
    }
    for (name, target) in &spec.config_targets {
        if !spec.configs.contains(name) {
            return Err(invalid("config target", name.clone(), "names a config the service does not use"));
        }
        if !clean_absolute(target) || target == "/" {
            return Err(invalid("config target", target.clone(), "expected a clean absolute path"));
        }
    }
    for a in &spec.aliases {
        validate_name("alias", a)?;
    }
    for c in spec.cap_add.iter().chain(&spec.cap_drop) {
        if shoal_confine::caps::normalize(c).is_err() {
            return Err(invalid("capability", c.clone(), "expected a name like NET_ADMIN or CAP_NET_ADMIN, or ALL"));
        }
    }
    match spec.seccomp.as_str() {
        "" | "unconfined" => {}
        json => {
            if let Err(e) = shoal_confine::Profile::from_json(json) {
                return Err(SpecError::Confinement(e.to_string()));
            }
        }
    }
    for (i, u) in spec.ulimits.iter().enumerate() {
        let ul = shoal_confine::ulimit::Ulimit { name: u.name.clone(), soft: u.soft, hard: u.hard };
        if let Err(e) = shoal_confine::ulimit::check(&ul) {
            return Err(SpecError::Confinement(e.to_string()));
        }
        if spec.ulimits[..i].iter().any(|o| o.name == u.name) {
            return Err(invalid("ulimit", u.name.clone(), "set twice"));
        }
    }
    if !spec.user.is_empty() && !valid_user(&spec.user) {
        return Err(invalid("user", &spec.user, "expected UID[:GID] or a user name"));
    }
    if !spec.workdir.is_empty() && !spec.workdir.starts_with('/') {
        return Err(invalid("workdir", &spec.workdir, "must be an absolute path"));
    }
    Ok(())
}

fn valid_user(u: &str) -> bool {
    let part = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match u.split_once(':') {
        Some((a, b)) => part(a) && part(b),
        None => part(u),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("n", "web").is_ok());
        assert!(validate_name("n", "web-1").is_ok());
        assert!(validate_name("n", "shop_web").is_ok(), "stacks name their objects STACK_NAME");
        for bad in ["", "-web", "web-", "_web", "web_", "Web", "a.b", &"x".repeat(64)] {
            assert!(validate_name("n", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mounts() {
        use shoal_proto::control::Mount;
        let m = |t: &str, src: &str, dst: &str| Mount { r#type: t.into(), source: src.into(), target: dst.into(), ..Default::default() };
        assert!(validate_mount(&m("volume", "db", "/data")).is_ok());
        assert!(validate_mount(&m("bind", "/srv/x", "/x")).is_ok());
        assert!(validate_mount(&m("tmpfs", "", "/t")).is_ok());
        for bad in [
            m("volume", "", "/data"),
            m("volume", "Db", "/data"),
            m("volume", "db", "data"),
            m("volume", "db", "/"),
            m("volume", "db", "/a/../b"),
            m("bind", "rel", "/x"),
            m("bind", "/a/../etc", "/x"),
            m("bind", "/a//b", "/x"),
            m("tmpfs", "src", "/x"),
            m("nfs", "x", "/x"),
            Mount { volume_nocopy: true, ..m("bind", "/a", "/x") },
            Mount { tmpfs_size: 1, ..m("volume", "v", "/x") },
            Mount { tmpfs_mode: 0o17777, ..m("tmpfs", "", "/x") },
        ] {
            assert!(validate_mount(&bad).is_err(), "{bad:?}");
        }
        let mut spec = ServiceSpec { name: "s".into(), image: "bb".into(), mode: "replicated".into(), ..Default::default() };
        spec.mounts = vec![m("volume", "a", "/x"), m("tmpfs", "", "/x")];
        assert!(validate_service_spec(&spec).is_err(), "one target mounted twice");
        spec.mounts.clear();
        spec.secrets = vec!["pw".into()];
        spec.secret_targets.insert("pw".into(), "db_password".into());
        assert!(validate_service_spec(&spec).is_ok());
        spec.secret_targets.insert("pw".into(), "../x".into());
        assert!(validate_service_spec(&spec).is_err());
        spec.secret_targets.clear();
        spec.secret_targets.insert("other".into(), "x".into());
        assert!(validate_service_spec(&spec).is_err(), "a target for a secret the service doesn't use");
    }

    #[test]
    fn memory() {
        assert_eq!(parse_memory("64M"), Ok(64 << 20));
        assert_eq!(parse_memory("1.5g"), Ok(3 << 29));
        assert_eq!(parse_memory("512k"), Ok(512 << 10));
        assert_eq!(parse_memory("4096"), Ok(4096));
        for bad in ["", "M", "-1M", "12Q", "abc", "0"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("0.5"), Ok(500_000_000));
        assert_eq!(parse_cpus("2"), Ok(2_000_000_000));
        for bad in ["", "-1", "0", "x", "NaN"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scale() {
        assert_eq!(parse_scale("web=10"), Ok(("web".into(), 10)));
        for bad in ["web", "=3", "web=-1", "web=x", "web=1.5"] {
            assert!(parse_scale(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn constraints() {
        for ok in ["node.labels.zone==a", "node.labels.zone != b", "node.role==manager", "node.name==n1"] {
            assert!(validate_constraint(ok).is_ok(), "{ok}");
        }
        for bad in ["zone==a", "node.labels.==a", "node.labels.zone=a", "node.role==boss", "node.labels.zone=="] {
            assert!(validate_constraint(bad).is_err(), "{bad}");
        }
    }
}
