//! Least privilege for the container's processes: Docker's default
//! capability set (or the one asked for), no_new_privs, Docker's seccomp
//! profile (or the one asked for, compiled by `shoal-confine`), rlimits.

use caps::{CapSet, Capability, CapsHashSet};
use seccompiler::{BpfProgram, sock_filter};

use crate::spec::Security;

/// Errors while dropping privileges.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("capabilities ({what}): {source}")]
    Caps { what: &'static str, source: caps::errors::CapsError },
    #[error("no_new_privs: {0}")]
    NoNewPrivs(nix::Error),
    #[error("install the seccomp filter: {0}")]
    Seccomp(#[from] seccompiler::Error),
    #[error(transparent)]
    Confine(#[from] shoal_confine::Error),
    #[error("set rlimit {0:?}: {1}")]
    Rlimit(nix::sys::resource::Resource, nix::Error),
}

/// Docker's default capabilities (moby `oci/caps/defaults.go`).
pub const DEFAULT_CAPS: [Capability; 14] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

/// The default set as the bitmask /proc/PID/status prints (`CapEff`).
pub fn default_caps_mask() -> u64 {
    DEFAULT_CAPS.iter().fold(0u64, |m, c| m | c.bitmask())
}

fn caps_err(what: &'static str) -> impl FnOnce(caps::errors::CapsError) -> SecurityError {
    move |source| SecurityError::Caps { what, source }
}

/// Cuts the bounding set to `keep` and clears the ambient set. Must run
/// while the process still has CAP_SETPCAP, i.e. before changing uid.
pub fn limit_bounding(keep: &[Capability]) -> Result<(), SecurityError> {
    for c in caps::all() {
        if !keep.contains(&c) {
            // Capabilities the running kernel doesn't know fail with EINVAL:
            // they are not in the bounding set anyway.
            if caps::has_cap(None, CapSet::Bounding, c).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, c).map_err(caps_err("bounding"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err("ambient"))
}

/// Sets effective and permitted to `keep` and inheritable to nothing (as
/// Docker does since CVE-2022-24769).
pub fn set_process_caps(keep: &[Capability]) -> Result<(), SecurityError> {
    let set: CapsHashSet = keep.iter().copied().collect();
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(caps_err("inheritable"))?;
    caps::set(None, CapSet::Effective, &set).map_err(caps_err("effective"))?;
    caps::set(None, CapSet::Permitted, &set).map_err(caps_err("permitted"))
}

/// Sets no_new_privs: exec can't gain privileges (setuid bits, file caps).
pub fn no_new_privs() -> Result<(), SecurityError> {
    nix::sys::prctl::set_no_new_privs().map_err(SecurityError::NoNewPrivs)
}

/// What the workload gets, worked out before the clone so the child only
/// has to install it: its capabilities, its seccomp program (none when
/// unconfined), its rlimits.
pub struct Policy {
    pub caps: Vec<Capability>,
    seccomp: Option<BpfProgram>,
    rlimits: Vec<(nix::sys::resource::Resource, u64, u64)>,
}

/// Docker's name of an rlimit to the kernel's.
fn resource(name: &str) -> Option<nix::sys::resource::Resource> {
    use nix::sys::resource::Resource as R;
    Some(match name {
        "core" => R::RLIMIT_CORE,
        "cpu" => R::RLIMIT_CPU,
        "data" => R::RLIMIT_DATA,
        "fsize" => R::RLIMIT_FSIZE,
        "locks" => R::RLIMIT_LOCKS,
        "memlock" => R::RLIMIT_MEMLOCK,
        "msgqueue" => R::RLIMIT_MSGQUEUE,
        "nice" => R::RLIMIT_NICE,
        "nofile" => R::RLIMIT_NOFILE,
        "nproc" => R::RLIMIT_NPROC,
        "rss" => R::RLIMIT_RSS,
        "rtprio" => R::RLIMIT_RTPRIO,
        "rttime" => R::RLIMIT_RTTIME,
        "sigpending" => R::RLIMIT_SIGPENDING,
        "stack" => R::RLIMIT_STACK,
        _ => return None,
    })
}

impl Policy {
    /// The policy `sec` asks for: Docker's capabilities adjusted by
    /// cap-add/cap-drop, Docker's seccomp profile (or the given one, or
    /// none), resolved against those capabilities and this kernel.
    pub fn new(sec: &Security) -> Result<Policy, SecurityError> {
        let names = shoal_confine::caps::resolve(&sec.cap_add, &sec.cap_drop)?;
        let caps = names
            .iter()
            .map(|n| n.parse::<Capability>().map_err(|_| SecurityError::Confine(shoal_confine::Error::Cap(n.to_string()))))
            .collect::<Result<Vec<_>, _>>()?;
        let profile = match sec.seccomp.as_str() {
            "" => Some(shoal_confine::docker::default_profile()),
            "unconfined" => None,
            json => Some(shoal_confine::Profile::from_json(json)?),
        };
        let seccomp = match profile {
            None => None,
            Some(p) => {
                let ctx = shoal_confine::Context::new(names.iter().map(|n| n.to_string()).collect());
                let insns = shoal_confine::compile(&p, &ctx)?;
                Some(insns.iter().map(|i| sock_filter { code: i.code, jt: i.jt, jf: i.jf, k: i.k }).collect())
            }
        };
        let mut rlimits = Vec::new();
        for (name, soft, hard) in &sec.ulimits {
            let u = shoal_confine::ulimit::Ulimit { name: name.clone(), soft: *soft, hard: *hard };
            shoal_confine::ulimit::check(&u)?;
            let r = resource(name).ok_or_else(|| SecurityError::Confine(shoal_confine::Error::Ulimit(name.clone(), "unknown name")))?;
            let lim = |v: i64| if v < 0 { nix::sys::resource::RLIM_INFINITY } else { v as u64 };
            rlimits.push((r, lim(*soft), lim(*hard)));
        }
        Ok(Policy { caps, seccomp, rlimits })
    }

    /// Sets the rlimits on the calling process (before it drops
    /// CAP_SYS_RESOURCE, which raising a hard limit needs).
    pub fn apply_rlimits(&self) -> Result<(), SecurityError> {
        for (r, soft, hard) in &self.rlimits {
            nix::sys::resource::setrlimit(*r, *soft, *hard).map_err(|e| SecurityError::Rlimit(*r, e))?;
        }
        Ok(())
    }

    /// Installs the seccomp program on the calling thread. Needs
    /// no_new_privs first.
    pub fn apply_seccomp(&self) -> Result<(), SecurityError> {
        if let Some(p) = &self.seccomp {
            seccompiler::apply_filter(p)?;
        }
        Ok(())
    }

    /// The program's length (instructions), 0 when unconfined.
    pub fn seccomp_len(&self) -> usize {
        self.seccomp.as_ref().map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn default_caps_match_docker_mask() {
        // CapEff of a root process in `docker run busybox`.
        assert_eq!(default_caps_mask(), 0x00000000a80425fb);
    }

    #[test]
    fn policies_follow_the_spec() {
        let p = Policy::new(&Security::default()).unwrap();
        assert_eq!(p.caps.len(), 14);
        assert!(p.seccomp_len() > 100);
        let sec = Security {
            cap_add: vec!["NET_ADMIN".into()],
            cap_drop: vec!["ALL".into()],
            seccomp: "unconfined".into(),
            ulimits: vec![("nofile".into(), 100, 200)],
        };
        let p = Policy::new(&sec).unwrap();
        assert_eq!(p.caps, vec![Capability::CAP_NET_ADMIN]);
        assert_eq!(p.seccomp_len(), 0);
        assert_eq!(p.rlimits.len(), 1);
        for bad in [
            Security { cap_add: vec!["FLY".into()], ..Security::default() },
            Security { seccomp: "{".into(), ..Security::default() },
            Security { ulimits: vec![("files".into(), 1, 1)], ..Security::default() },
        ] {
            assert!(Policy::new(&bad).is_err(), "{bad:?}");
        }
    }
}
