//! Capability names and a container's set, with Docker's rules for
//! `--cap-add` and `--cap-drop`.

use crate::Error;

/// Every capability Linux defines, by number (0 to 40).
pub const ALL: [&str; 41] = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN",
    "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
];

/// Docker's default set (moby `oci/caps/defaults.go`).
pub const DOCKER_DEFAULT: [&str; 14] = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// `net_admin`, `NET_ADMIN` or `CAP_NET_ADMIN` → `CAP_NET_ADMIN`; `all` →
/// `ALL`. Anything else is an error naming it.
pub fn normalize(name: &str) -> Result<&'static str, Error> {
    let up = name.trim().to_ascii_uppercase();
    if up == "ALL" {
        return Ok("ALL");
    }
    let full = if up.starts_with("CAP_") { up } else { format!("CAP_{up}") };
    ALL.iter().copied().find(|c| *c == full).ok_or_else(|| Error::Cap(name.to_string()))
}

/// The number of a capability (its bit in `CapEff`).
pub fn number(name: &str) -> Option<u32> {
    ALL.iter().position(|c| *c == name).map(|i| i as u32)
}

/// The set a container gets: Docker's default, then `add`, then `drop`;
/// `ALL` in `drop` starts from nothing, `ALL` in `add` from everything, so
/// `--cap-drop ALL --cap-add NET_BIND_SERVICE` keeps only that one.
pub fn resolve(add: &[String], drop: &[String]) -> Result<Vec<&'static str>, Error> {
    let add: Vec<&'static str> = add.iter().map(|c| normalize(c)).collect::<Result<_, _>>()?;
    let drop: Vec<&'static str> = drop.iter().map(|c| normalize(c)).collect::<Result<_, _>>()?;
    let mut set: Vec<&'static str> = if add.contains(&"ALL") {
        ALL.to_vec()
    } else if drop.contains(&"ALL") {
        Vec::new()
    } else {
        DOCKER_DEFAULT.to_vec()
    };
    for c in &add {
        if *c != "ALL" && !set.contains(c) {
            set.push(c);
        }
    }
    set.retain(|c| !drop.contains(c));
    set.sort_by_key(|c| number(c));
    Ok(set)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn docker_rules() {
        assert_eq!(resolve(&[], &[]).unwrap().len(), 14);
        let r = resolve(&s(&["net_admin"]), &s(&["CAP_NET_RAW", "mknod"])).unwrap();
        assert!(r.contains(&"CAP_NET_ADMIN") && !r.contains(&"CAP_NET_RAW") && !r.contains(&"CAP_MKNOD"));
        assert_eq!(r.len(), 13);
        assert_eq!(resolve(&s(&["NET_BIND_SERVICE"]), &s(&["ALL"])).unwrap(), ["CAP_NET_BIND_SERVICE"]);
        let all = resolve(&s(&["ALL"]), &s(&["SYS_ADMIN"])).unwrap();
        assert_eq!(all.len(), 40);
        assert!(!all.contains(&"CAP_SYS_ADMIN"));
        assert!(resolve(&s(&["CAP_FLY"]), &[]).unwrap_err().to_string().contains("CAP_FLY"));
        assert_eq!(number("CAP_SYS_ADMIN"), Some(21));
    }
}
