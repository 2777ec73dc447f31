//! A container's confinement as data, shared by the CLI (which checks what
//! an operator asks for), the managers (which check what a client sends)
//! and the runtime (which applies it): capability sets ([`caps`]), rlimits
//! ([`ulimit`]), and seccomp.
//!
//! seccomp: the profile format (OCI runtime-spec
//! `linux.seccomp`, plus Docker's `archMap` and `includes`/`excludes`),
//! Docker's default profile ([`docker::default_profile`]), and a compiler
//! from a profile to a classic-BPF program ([`compile`]).
//!
//! The compiler writes the program itself rather than going through
//! libseccomp (C) or seccompiler (one architecture per filter, and a
//! process of a foreign architecture is killed): a container on x86_64
//! must answer i386 and x32 system calls by their own numbers, as Docker
//! does. Numbers come from [`tables`], generated from the kernel headers.
//!
//! Semantics, as runc applies a Docker profile: a rule applies when all of
//! its `includes` hold (every listed capability is in the container's set,
//! the host's architecture is listed, the kernel is at least `minKernel`)
//! and none of its `excludes` does. Names unknown on an architecture are
//! skipped there (profiles list calls of every architecture). For one
//! system call, rules with argument conditions are tried first, in profile
//! order; the first whose conditions all hold gives the answer; then a rule
//! without conditions; else the default action.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod bpf;
pub mod caps;
pub mod docker;
pub mod ulimit;
#[rustfmt::skip]
mod tables;

pub use bpf::{Insn, MAX_INSNS};

/// Errors reading or compiling a profile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("seccomp profile is not valid JSON for a profile: {0}")]
    Json(#[from] serde_json::Error),
    #[error("seccomp profile: unknown action {0:?} (want SCMP_ACT_ALLOW, _ERRNO, _KILL, _KILL_PROCESS, _KILL_THREAD, _TRAP, _TRACE or _LOG)")]
    Action(String),
    #[error("seccomp profile: SCMP_ACT_NOTIFY needs a seccomp agent, which shoal doesn't run")]
    Notify,
    #[error("seccomp profile: unknown comparison {0:?} (want SCMP_CMP_EQ, _NE, _LT, _LE, _GT, _GE or _MASKED_EQ)")]
    Op(String),
    #[error("seccomp profile: unknown architecture {0:?}")]
    Arch(String),
    #[error("seccomp profile: argument index {0} (a system call has arguments 0 to 5)")]
    ArgIndex(u32),
    #[error("seccomp profile: a rule names no system call")]
    NoNames,
    #[error("seccomp profile: minKernel {0:?} is not a version like 4.8")]
    Kernel(String),
    #[error("seccomp profile: unsupported flag {0:?}")]
    Flag(String),
    #[error("seccomp filter is {0} instructions, more than the kernel's {MAX_INSNS}")]
    TooLong(usize),
    #[error("seccomp filter: a jump of {0} instructions does not fit (internal error)")]
    Jump(usize),
    #[error("unknown capability {0:?} (names like NET_ADMIN or CAP_NET_ADMIN, or ALL)")]
    Cap(String),
    #[error("invalid ulimit {0:?}: {1}")]
    Ulimit(String, &'static str),
    #[error("seccomp: no system call table for this machine's architecture")]
    NoNativeArch,
}

/// An action, as the kernel returns it (`SECCOMP_RET_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Errno(u16),
    KillProcess,
    KillThread,
    Trap,
    Trace(u16),
    Log,
}

impl Action {
    /// The 32-bit value a seccomp program returns.
    pub fn ret(self) -> u32 {
        match self {
            Action::Allow => 0x7fff_0000,
            Action::Errno(e) => 0x0005_0000 | u32::from(e),
            Action::KillProcess => 0x8000_0000,
            Action::KillThread => 0,
            Action::Trap => 0x0003_0000,
            Action::Trace(d) => 0x7ff0_0000 | u32::from(d),
            Action::Log => 0x7ffc_0000,
        }
    }

    fn parse(name: &str, errno: Option<u32>) -> Result<Action, Error> {
        let e = errno.unwrap_or(1).min(u32::from(u16::MAX)) as u16;
        Ok(match name {
            "SCMP_ACT_ALLOW" => Action::Allow,
            "SCMP_ACT_ERRNO" => Action::Errno(e),
            "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => Action::KillThread,
            "SCMP_ACT_KILL_PROCESS" => Action::KillProcess,
            "SCMP_ACT_TRAP" => Action::Trap,
            "SCMP_ACT_TRACE" => Action::Trace(e),
            "SCMP_ACT_LOG" => Action::Log,
            "SCMP_ACT_NOTIFY" => return Err(Error::Notify),
            other => return Err(Error::Action(other.to_string())),
        })
    }
}

/// How an argument is compared (`SCMP_CMP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Ne,
    Lt,
    Le,
    Eq,
    Ge,
    Gt,
    /// `(arg & value) == value_two`.
    MaskedEq,
}

impl Op {
    fn parse(s: &str) -> Result<Op, Error> {
        Ok(match s {
            "SCMP_CMP_NE" => Op::Ne,
            "SCMP_CMP_LT" => Op::Lt,
            "SCMP_CMP_LE" => Op::Le,
            "SCMP_CMP_EQ" => Op::Eq,
            "SCMP_CMP_GE" => Op::Ge,
            "SCMP_CMP_GT" => Op::Gt,
            "SCMP_CMP_MASKED_EQ" => Op::MaskedEq,
            other => return Err(Error::Op(other.to_string())),
        })
    }
}

/// An architecture the compiler has a table for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Arch {
    X86_64,
    X86,
    X32,
    Aarch64,
}

impl Arch {
    /// The `AUDIT_ARCH_*` value in `seccomp_data.arch`.
    fn audit(self) -> u32 {
        match self {
            Arch::X86_64 | Arch::X32 => 0xc000_003e,
            Arch::X86 => 0x4000_0003,
            Arch::Aarch64 => 0xc000_00b7,
        }
    }

    fn table(self) -> &'static [(&'static str, u32)] {
        match self {
            Arch::X86_64 => tables::X86_64,
            Arch::X86 => tables::X86,
            Arch::X32 => tables::X32,
            Arch::Aarch64 => tables::AARCH64,
        }
    }

    /// The number of `name` on this architecture.
    pub fn syscall(self, name: &str) -> Option<u32> {
        let t = self.table();
        t.binary_search_by(|(n, _)| (*n).cmp(name)).ok().map(|i| t[i].1)
    }

    /// The machine this binary runs on, with Go's name for it (what a
    /// profile's `includes.arches` lists).
    pub fn native() -> Option<(Arch, &'static str)> {
        if cfg!(target_arch = "x86_64") {
            Some((Arch::X86_64, "amd64"))
        } else if cfg!(target_arch = "aarch64") {
            Some((Arch::Aarch64, "arm64"))
        } else {
            None
        }
    }

    /// `SCMP_ARCH_*` to an architecture we have a table for (`Ok(None)`:
    /// a real architecture, but not one that can run on this machine's
    /// family, or one we have no table for: ARM on aarch64).
    fn parse(s: &str) -> Result<Option<Arch>, Error> {
        Ok(match s {
            "SCMP_ARCH_X86_64" => Some(Arch::X86_64),
            "SCMP_ARCH_X86" => Some(Arch::X86),
            "SCMP_ARCH_X32" => Some(Arch::X32),
            "SCMP_ARCH_AARCH64" => Some(Arch::Aarch64),
            "SCMP_ARCH_ARM" | "SCMP_ARCH_MIPS" | "SCMP_ARCH_MIPS64" | "SCMP_ARCH_MIPS64N32" | "SCMP_ARCH_MIPSEL"
            | "SCMP_ARCH_MIPSEL64" | "SCMP_ARCH_MIPSEL64N32" | "SCMP_ARCH_PPC" | "SCMP_ARCH_PPC64"
            | "SCMP_ARCH_PPC64LE" | "SCMP_ARCH_S390" | "SCMP_ARCH_S390X" | "SCMP_ARCH_PARISC"
            | "SCMP_ARCH_PARISC64" | "SCMP_ARCH_RISCV64" | "SCMP_ARCH_LOONGARCH64" | "SCMP_ARCH_M68K"
            | "SCMP_ARCH_SH" | "SCMP_ARCH_SHEB" => None,
            other => return Err(Error::Arch(other.to_string())),
        })
    }

    /// Whether a process of this architecture can run on `native`.
    fn runs_on(self, native: Arch) -> bool {
        match native {
            Arch::X86_64 => matches!(self, Arch::X86_64 | Arch::X86 | Arch::X32),
            other => self == other,
        }
    }
}

/// A seccomp profile as JSON carries it: OCI's `linux.seccomp`, or a
/// Docker profile file (`archMap`, `includes`, `excludes`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    pub default_action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_errno_ret: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch_map: Option<Vec<ArchMap>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syscalls: Option<Vec<Rule>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArchMap {
    pub architecture: String,
    #[serde(default)]
    pub sub_architectures: Option<Vec<String>>,
}

/// One entry of `syscalls`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub names: Option<Vec<String>>,
    /// Old Docker profiles name one call per rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno_ret: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<Arg>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub includes: Option<Filter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excludes: Option<Filter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// `includes` / `excludes` of a Docker profile rule.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    #[serde(default)]
    pub caps: Option<Vec<String>>,
    #[serde(default)]
    pub arches: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_kernel: Option<String>,
}

/// An argument condition.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Arg {
    pub index: u32,
    pub value: u64,
    #[serde(default)]
    pub value_two: u64,
    pub op: String,
}

/// What the rules are resolved against: the container's capabilities
/// (`CAP_*` names) and the host's kernel version.
#[derive(Debug, Clone)]
pub struct Context {
    pub caps: Vec<String>,
    pub kernel: (u32, u32),
}

impl Context {
    /// `caps` on the running kernel (from `uname -r`).
    pub fn new(caps: Vec<String>) -> Context {
        Context { caps, kernel: kernel_version() }
    }
}

/// The running kernel's major.minor (0.0 when unreadable: no `minKernel`
/// rule then applies, the stricter answer).
pub fn kernel_version() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().and_then(|s| parse_version(&s)).unwrap_or((0, 0))
}

fn parse_version(s: &str) -> Option<(u32, u32)> {
    let mut it = s.trim().split(['.', '-']);
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// A condition on one argument, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cond {
    pub index: u8,
    pub op: Op,
    pub value: u64,
    pub value_two: u64,
}

/// A profile resolved for one machine and container: per architecture,
/// per system call number, the rules in the order they are tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub default: Action,
    pub arches: BTreeMap<Arch, BTreeMap<u32, Vec<(Vec<Cond>, Action)>>>,
}

impl Profile {
    /// Parses a profile (JSON), checking every action, comparison and
    /// architecture name.
    pub fn from_json(json: &str) -> Result<Profile, Error> {
        let p: Profile = serde_json::from_str(json)?;
        p.check()?;
        Ok(p)
    }

    /// Checks what JSON alone can't: names of actions, comparisons,
    /// architectures, argument indexes, flags.
    pub fn check(&self) -> Result<(), Error> {
        Action::parse(&self.default_action, self.default_errno_ret)?;
        for a in self.architectures.iter().flatten() {
            Arch::parse(a)?;
        }
        for m in self.arch_map.iter().flatten() {
            Arch::parse(&m.architecture)?;
            for a in m.sub_architectures.iter().flatten() {
                Arch::parse(a)?;
            }
        }
        for f in self.flags.iter().flatten() {
            // The kernel's flags that change nothing about which calls pass.
            if !matches!(f.as_str(), "SECCOMP_FILTER_FLAG_LOG" | "SECCOMP_FILTER_FLAG_SPEC_ALLOW" | "SECCOMP_FILTER_FLAG_TSYNC") {
                return Err(Error::Flag(f.clone()));
            }
        }
        for r in self.syscalls.iter().flatten() {
            if r.names.iter().flatten().next().is_none() && r.name.is_none() {
                return Err(Error::NoNames);
            }
            Action::parse(&r.action, r.errno_ret)?;
            for a in r.args.iter().flatten() {
                if a.index > 5 {
                    return Err(Error::ArgIndex(a.index));
                }
                Op::parse(&a.op)?;
            }
            for f in r.includes.iter().chain(&r.excludes) {
                if let Some(k) = &f.min_kernel
                    && parse_version(k).is_none()
                {
                    return Err(Error::Kernel(k.clone()));
                }
            }
        }
        Ok(())
    }

    /// The architectures the filter covers on this machine: those listed
    /// (with their `archMap` sub-architectures) that can run here, and
    /// always the native one.
    fn arches(&self, native: Arch) -> Result<Vec<Arch>, Error> {
        let mut out = vec![native];
        let mut add = |s: &str| -> Result<(), Error> {
            if let Some(a) = Arch::parse(s)?
                && a.runs_on(native)
                && !out.contains(&a)
            {
                out.push(a);
            }
            Ok(())
        };
        for a in self.architectures.iter().flatten() {
            add(a)?;
        }
        for m in self.arch_map.iter().flatten() {
            if Arch::parse(&m.architecture)? == Some(native) {
                add(&m.architecture)?;
                for s in m.sub_architectures.iter().flatten() {
                    add(s)?;
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Resolves the profile for this machine and `ctx`.
    pub fn resolve(&self, ctx: &Context) -> Result<Resolved, Error> {
        self.check()?;
        let (native, goarch) = Arch::native().ok_or(Error::NoNativeArch)?;
        let arches = self.arches(native)?;
        let default = Action::parse(&self.default_action, self.default_errno_ret)?;
        let mut out: BTreeMap<Arch, BTreeMap<u32, Vec<(Vec<Cond>, Action)>>> =
            arches.iter().map(|a| (*a, BTreeMap::new())).collect();
        for r in self.syscalls.iter().flatten() {
            if !r.applies(ctx, goarch) {
                continue;
            }
            let action = Action::parse(&r.action, r.errno_ret)?;
            let conds: Vec<Cond> = r
                .args
                .iter()
                .flatten()
                .map(|a| {
                    Ok(Cond { index: a.index as u8, op: Op::parse(&a.op)?, value: a.value, value_two: a.value_two })
                })
                .collect::<Result<_, Error>>()?;
            for name in r.names.iter().flatten().chain(&r.name) {
                for (arch, calls) in out.iter_mut() {
                    if let Some(nr) = arch.syscall(name) {
                        calls.entry(nr).or_default().push((conds.clone(), action));
                    }
                }
            }
        }
        // Rules with conditions first (in profile order), then the others.
        for calls in out.values_mut() {
            for rules in calls.values_mut() {
                rules.sort_by_key(|(c, _)| c.is_empty());
            }
        }
        Ok(Resolved { default, arches: out })
    }
}

impl Rule {
    /// Whether the rule's `includes` all hold and none of its `excludes`
    /// does, for `ctx` on the machine Go calls `goarch`.
    fn applies(&self, ctx: &Context, goarch: &str) -> bool {
        let has_cap = |c: &String| ctx.caps.iter().any(|h| h.eq_ignore_ascii_case(c));
        if let Some(inc) = &self.includes {
            if !inc.caps.iter().flatten().all(has_cap) {
                return false;
            }
            if let Some(list) = &inc.arches
                && !list.is_empty()
                && !list.iter().any(|a| a == goarch)
            {
                return false;
            }
            if let Some(k) = &inc.min_kernel
                && parse_version(k).is_some_and(|v| ctx.kernel < v)
            {
                return false;
            }
        }
        if let Some(exc) = &self.excludes {
            if exc.caps.iter().flatten().any(has_cap) || exc.arches.iter().flatten().any(|a| a == goarch) {
                return false;
            }
        }
        true
    }
}

impl Profile {
    /// The profile as a plain OCI `linux.seccomp` for this machine and
    /// `ctx`: the rules that apply, without `includes`/`excludes`, and the
    /// architectures listed. What another runtime (crun, runc) would need
    /// to apply the same filter.
    pub fn to_oci(&self, ctx: &Context) -> Result<Profile, Error> {
        self.check()?;
        let (native, goarch) = Arch::native().ok_or(Error::NoNativeArch)?;
        let arches = self
            .arches(native)?
            .into_iter()
            .map(|a| match a {
                Arch::X86_64 => "SCMP_ARCH_X86_64",
                Arch::X86 => "SCMP_ARCH_X86",
                Arch::X32 => "SCMP_ARCH_X32",
                Arch::Aarch64 => "SCMP_ARCH_AARCH64",
            })
            .map(str::to_string)
            .collect();
        let syscalls = self
            .syscalls
            .iter()
            .flatten()
            .filter(|r| r.applies(ctx, goarch))
            .map(|r| Rule { includes: None, excludes: None, comment: None, ..r.clone() })
            .collect();
        Ok(Profile {
            default_action: self.default_action.clone(),
            default_errno_ret: self.default_errno_ret,
            architectures: Some(arches),
            syscalls: Some(syscalls),
            ..Profile::default()
        })
    }
}

/// Compiles `profile` for this machine and `ctx` into a seccomp program.
pub fn compile(profile: &Profile, ctx: &Context) -> Result<Vec<Insn>, Error> {
    bpf::assemble(&profile.resolve(ctx)?)
}
