//! Least privilege for the container's processes: Docker's default
//! capability set, no_new_privs and a default seccomp filter.

use std::collections::BTreeMap;

use caps::{CapSet, Capability, CapsHashSet};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// Errors while dropping privileges.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("capabilities ({what}): {source}")]
    Caps { what: &'static str, source: caps::errors::CapsError },
    #[error("no_new_privs: {0}")]
    NoNewPrivs(nix::Error),
    #[error("seccomp filter: {0}")]
    Seccomp(#[from] seccompiler::Error),
    #[error("seccomp filter: {0}")]
    SeccompBackend(#[from] seccompiler::BackendError),
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

/// Syscalls the default filter refuses with EPERM: the calls Docker's
/// default profile leaves out that exist on x86_64 and aarch64 (kernel
/// modules, clocks, mounts, namespaces, keyrings, tracing, bpf, reboot).
const DENIED: &[i64] = &[
    libc::SYS_acct,
    libc::SYS_add_key,
    libc::SYS_bpf,
    libc::SYS_clock_adjtime,
    libc::SYS_clock_settime,
    libc::SYS_delete_module,
    libc::SYS_finit_module,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fsopen,
    libc::SYS_fspick,
    libc::SYS_get_mempolicy,
    libc::SYS_init_module,
    libc::SYS_kcmp,
    libc::SYS_kexec_file_load,
    libc::SYS_kexec_load,
    libc::SYS_keyctl,
    libc::SYS_lookup_dcookie,
    libc::SYS_mbind,
    libc::SYS_mount,
    libc::SYS_mount_setattr,
    libc::SYS_move_mount,
    libc::SYS_move_pages,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_open_tree,
    libc::SYS_perf_event_open,
    libc::SYS_pivot_root,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_ptrace,
    libc::SYS_quotactl,
    libc::SYS_reboot,
    libc::SYS_request_key,
    libc::SYS_set_mempolicy,
    libc::SYS_setns,
    libc::SYS_settimeofday,
    libc::SYS_swapoff,
    libc::SYS_swapon,
    libc::SYS_umount2,
    libc::SYS_unshare,
    libc::SYS_userfaultfd,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_nfsservctl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_sysfs,
    #[cfg(target_arch = "x86_64")]
    libc::SYS__sysctl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_uselib,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ustat,
];

/// The programs of one seccomp policy, installed in order (seccomp takes
/// the most restrictive answer among the installed programs).
pub struct SeccompPolicy(Vec<BpfProgram>);

/// Builds the default seccomp policy: allow everything but [`DENIED`]
/// (EPERM), and answer clone3 with ENOSYS so libc falls back to clone
/// (whose namespace flags need capabilities the container lacks).
pub fn default_seccomp() -> Result<SeccompPolicy, SecurityError> {
    let arch = if cfg!(target_arch = "aarch64") { TargetArch::aarch64 } else { TargetArch::x86_64 };
    let rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|n| (*n, vec![])).collect();
    let deny = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    Ok(SeccompPolicy(vec![deny.try_into()?, clone3.try_into()?]))
}

/// Installs `policy` on the calling thread. Needs no_new_privs first.
pub fn apply_seccomp(policy: &SeccompPolicy) -> Result<(), SecurityError> {
    for p in &policy.0 {
        seccompiler::apply_filter(p)?;
    }
    Ok(())
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
    fn default_seccomp_compiles() {
        let p = default_seccomp().unwrap();
        assert_eq!(p.0.len(), 2);
        assert!(p.0[0].len() > DENIED.len());
    }
}
