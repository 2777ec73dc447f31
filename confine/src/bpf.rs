//! The classic-BPF assembler for a resolved profile.
//!
//! Layout: load `arch` and jump to that architecture's section (an unknown
//! architecture is killed, as libseccomp does). A section loads the call
//! number and finds its answer by binary search over ranges of numbers
//! that share one answer: about ten comparisons for any call, where a
//! linear list of ~400 allowed calls would cost hundreds. Calls with
//! argument conditions jump to a handler that tests each rule in turn.
//! Conditional jumps reach at most 255 instructions ahead, so anything
//! farther goes through `ja` (32-bit offset).

use std::collections::BTreeMap;

use crate::{Action, Arch, Cond, Error, Op, Resolved};

/// The kernel's limit (BPF_MAXINSNS).
pub const MAX_INSNS: usize = 4096;

/// One `struct sock_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

const LD_W_ABS: u16 = 0x20;
const ALU_AND_K: u16 = 0x54;
const JA: u16 = 0x05;
const JEQ_K: u16 = 0x15;
const JGT_K: u16 = 0x25;
const JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;

// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
fn arg_lo(i: u8) -> u32 {
    16 + 8 * u32::from(i)
}
fn arg_hi(i: u8) -> u32 {
    arg_lo(i) + 4
}

/// A jump target while assembling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum To {
    Next,
    Label(usize),
}

#[derive(Debug, Clone, Copy)]
enum Item {
    Plain(Insn),
    Cond { code: u16, k: u32, jt: To, jf: To },
    Ja(usize),
    Mark(usize),
}

#[derive(Default)]
struct Asm {
    items: Vec<Item>,
    labels: usize,
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels += 1;
        self.labels - 1
    }
    fn mark(&mut self, l: usize) {
        self.items.push(Item::Mark(l));
    }
    fn ld(&mut self, off: u32) {
        self.items.push(Item::Plain(Insn { code: LD_W_ABS, jt: 0, jf: 0, k: off }));
    }
    fn and(&mut self, k: u32) {
        self.items.push(Item::Plain(Insn { code: ALU_AND_K, jt: 0, jf: 0, k }));
    }
    fn ret(&mut self, a: Action) {
        self.items.push(Item::Plain(Insn { code: RET_K, jt: 0, jf: 0, k: a.ret() }));
    }
    fn cond(&mut self, code: u16, k: u32, jt: To, jf: To) {
        self.items.push(Item::Cond { code, k, jt, jf });
    }
    fn ja(&mut self, l: usize) {
        self.items.push(Item::Ja(l));
    }
    /// `if A <code> k goto far` for a target that may be out of reach of a
    /// conditional jump: the test skips a `ja` when false.
    fn far(&mut self, code: u16, k: u32, far: usize) {
        let skip = self.label();
        self.cond(code, k, To::Next, To::Label(skip));
        self.ja(far);
        self.mark(skip);
    }

    fn finish(self) -> Result<Vec<Insn>, Error> {
        let mut pos = vec![0usize; self.labels];
        let mut n = 0;
        for it in &self.items {
            match it {
                Item::Mark(l) => pos[*l] = n,
                _ => n += 1,
            }
        }
        if n > MAX_INSNS {
            return Err(Error::TooLong(n));
        }
        let mut out = Vec::with_capacity(n);
        for it in &self.items {
            let here = out.len();
            let rel = |t: To| -> Result<u8, Error> {
                match t {
                    To::Next => Ok(0),
                    To::Label(l) => {
                        let d = pos[l].checked_sub(here + 1).ok_or(Error::Jump(0))?;
                        u8::try_from(d).map_err(|_| Error::Jump(d))
                    }
                }
            };
            match *it {
                Item::Mark(_) => {}
                Item::Plain(i) => out.push(i),
                Item::Cond { code, k, jt, jf } => out.push(Insn { code, jt: rel(jt)?, jf: rel(jf)?, k }),
                Item::Ja(l) => {
                    let d = pos[l].checked_sub(here + 1).ok_or(Error::Jump(0))?;
                    out.push(Insn { code: JA, jt: 0, jf: 0, k: d as u32 });
                }
            }
        }
        Ok(out)
    }
}

/// What a range of call numbers leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Ret(Action),
    /// Index into the handlers (calls with argument conditions).
    Handler(usize),
}

/// Assembles the program for `f`.
pub(crate) fn assemble(f: &Resolved) -> Result<Vec<Insn>, Error> {
    let mut a = Asm::default();
    let kill = Action::KillProcess;
    let sections: Vec<(Arch, usize)> = f.arches.keys().map(|arch| (*arch, a.label())).collect();
    a.ld(ARCH);
    // x86_64 and x32 share an audit arch: one test leads to both.
    let mut tested = Vec::new();
    for (arch, l) in &sections {
        if *arch == Arch::X32 && f.arches.contains_key(&Arch::X86_64) {
            continue;
        }
        if !tested.contains(&arch.audit()) {
            tested.push(arch.audit());
            a.far(JEQ_K, arch.audit(), *l);
        }
    }
    a.ret(kill);
    let x32 = sections.iter().find(|(arch, _)| *arch == Arch::X32).map(|(_, l)| *l);
    for (arch, label) in &sections {
        a.mark(*label);
        a.ld(NR);
        if *arch == Arch::X86_64 {
            // x32 calls carry bit 30 (__X32_SYSCALL_BIT).
            match x32 {
                Some(l) => a.far(JGE_K, 0x4000_0000, l),
                None => {
                    let skip = a.label();
                    a.cond(JGE_K, 0x4000_0000, To::Next, To::Label(skip));
                    a.ret(f.default);
                    a.mark(skip);
                }
            }
        }
        section(&mut a, &f.arches[arch], f.default)?;
    }
    a.finish()
}

/// One architecture: binary search over ranges, then the handlers.
fn section(a: &mut Asm, calls: &BTreeMap<u32, Vec<(Vec<Cond>, Action)>>, default: Action) -> Result<(), Error> {
    let mut handlers: Vec<&Vec<(Vec<Cond>, Action)>> = Vec::new();
    // (first number, answer) for each range; the ranges cover 0..=u32::MAX.
    let mut ranges: Vec<(u32, Answer)> = vec![(0, Answer::Ret(default))];
    let push = |ranges: &mut Vec<(u32, Answer)>, from: u32, ans: Answer| {
        if ranges.last().map(|(_, a)| a) != Some(&ans) {
            ranges.push((from, ans));
        }
    };
    for (nr, rules) in calls {
        let ans = match rules.first() {
            Some((c, act)) if c.is_empty() => Answer::Ret(*act),
            Some(_) => {
                handlers.push(rules);
                Answer::Handler(handlers.len() - 1)
            }
            None => Answer::Ret(default),
        };
        if ranges.last().is_some_and(|(start, _)| *start == *nr) {
            ranges.pop();
        }
        push(&mut ranges, *nr, ans);
        if let Some(next) = nr.checked_add(1)
            && !calls.contains_key(&next)
        {
            push(&mut ranges, next, Answer::Ret(default));
        }
    }
    let handler_labels: Vec<usize> = handlers.iter().map(|_| a.label()).collect();
    tree(a, &ranges, &handler_labels);
    for (rules, label) in handlers.iter().zip(&handler_labels) {
        a.mark(*label);
        handler(a, rules, default);
    }
    Ok(())
}

/// Binary search over `ranges` (A holds the call number).
fn tree(a: &mut Asm, ranges: &[(u32, Answer)], handlers: &[usize]) {
    if let [(_, ans)] = ranges {
        match ans {
            Answer::Ret(act) => a.ret(*act),
            Answer::Handler(h) => a.ja(handlers[*h]),
        }
        return;
    }
    let mid = ranges.len() / 2;
    let right = a.label();
    a.far(JGE_K, ranges[mid].0, right);
    tree(a, &ranges[..mid], handlers);
    a.mark(right);
    tree(a, &ranges[mid..], handlers);
}

/// Tests each rule of one call in turn; the first that holds answers.
fn handler(a: &mut Asm, rules: &[(Vec<Cond>, Action)], default: Action) {
    for (conds, act) in rules {
        let fail = a.label();
        for c in conds {
            cond(a, c, fail);
        }
        a.ret(*act);
        a.mark(fail);
        if conds.is_empty() {
            return;
        }
    }
    a.ret(default);
}

/// Falls through when condition `c` holds, jumps to `fail` when not. The
/// 64-bit argument is compared as two 32-bit words, high first.
fn cond(a: &mut Asm, c: &Cond, fail: usize) {
    let (hi, lo) = ((c.value >> 32) as u32, c.value as u32);
    let pass = a.label();
    let f = To::Label(fail);
    let p = To::Label(pass);
    a.ld(arg_hi(c.index));
    match c.op {
        Op::Eq => {
            a.cond(JEQ_K, hi, To::Next, f);
            a.ld(arg_lo(c.index));
            a.cond(JEQ_K, lo, p, f);
        }
        Op::Ne => {
            a.cond(JEQ_K, hi, To::Next, p);
            a.ld(arg_lo(c.index));
            a.cond(JEQ_K, lo, f, p);
        }
        Op::MaskedEq => {
            let (mhi, mlo) = ((c.value >> 32) as u32, c.value as u32);
            let (whi, wlo) = ((c.value_two >> 32) as u32, c.value_two as u32);
            a.and(mhi);
            a.cond(JEQ_K, whi, To::Next, f);
            a.ld(arg_lo(c.index));
            a.and(mlo);
            a.cond(JEQ_K, wlo, p, f);
        }
        Op::Gt | Op::Ge => {
            a.cond(JGT_K, hi, p, To::Next);
            a.cond(JEQ_K, hi, To::Next, f);
            a.ld(arg_lo(c.index));
            a.cond(if c.op == Op::Gt { JGT_K } else { JGE_K }, lo, p, f);
        }
        Op::Lt | Op::Le => {
            a.cond(JGT_K, hi, f, To::Next);
            a.cond(JEQ_K, hi, To::Next, p);
            a.ld(arg_lo(c.index));
            // lo < v  <=>  !(lo >= v);  lo <= v  <=>  !(lo > v)
            a.cond(if c.op == Op::Lt { JGE_K } else { JGT_K }, lo, f, p);
        }
    }
    a.mark(pass);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{Context, Profile, docker::default_profile};

    /// Runs a program the way the kernel does, on one `seccomp_data`.
    pub(crate) fn run(p: &[Insn], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let word = |off: u32| -> u32 {
            match off {
                0 => nr,
                4 => arch,
                o if o >= 16 => {
                    let i = ((o - 16) / 8) as usize;
                    if (o - 16) % 8 == 0 { args[i] as u32 } else { (args[i] >> 32) as u32 }
                }
                o => panic!("load at {o}"),
            }
        };
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = p[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => acc = word(i.k),
                ALU_AND_K => acc &= i.k,
                JA => pc += i.k as usize,
                JEQ_K | JGT_K | JGE_K => {
                    let t = match i.code {
                        JEQ_K => acc == i.k,
                        JGT_K => acc > i.k,
                        _ => acc >= i.k,
                    };
                    pc += usize::from(if t { i.jt } else { i.jf });
                }
                RET_K => return i.k,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    const X86_64: u32 = 0xc000_003e;
    const I386: u32 = 0x4000_0003;
    const ALLOW: u32 = 0x7fff_0000;
    const EPERM: u32 = 0x0005_0001;
    const ENOSYS: u32 = 0x0005_0026;

    fn docker(caps: &[&str]) -> Vec<Insn> {
        let ctx = Context { caps: caps.iter().map(|c| c.to_string()).collect(), kernel: (6, 1) };
        crate::compile(&default_profile(), &ctx).unwrap()
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn docker_default_on_x86_64() {
        let p = docker(&["CAP_CHOWN"]);
        assert!(p.len() < MAX_INSNS, "{}", p.len());
        let nr = |n: &str| Arch::X86_64.syscall(n).unwrap();
        let none = [0u64; 6];
        for ok in ["read", "write", "openat", "execve", "exit_group", "rt_sigreturn", "mseal", "ptrace"] {
            assert_eq!(run(&p, X86_64, nr(ok), none), ALLOW, "{ok}");
        }
        // io_uring left Docker's list in 2023 (moby #46762).
        for denied in ["io_uring_setup", "io_uring_enter", "kexec_load", "bpf", "mount", "unshare", "setns", "reboot", "init_module", "open_by_handle_at", "add_key"] {
            assert_eq!(run(&p, X86_64, nr(denied), none), EPERM, "{denied}");
        }
        // clone: threads and forks yes, namespaces no; clone3: ENOSYS.
        let clone = nr("clone");
        assert_eq!(run(&p, X86_64, clone, [0x3d0f00, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(run(&p, X86_64, clone, [0x1000_0000 | 17, 0, 0, 0, 0, 0]), EPERM); // CLONE_NEWUSER
        assert_eq!(run(&p, X86_64, nr("clone3"), none), ENOSYS);
        // socket: AF_INET yes, AF_ALG (38) and AF_VSOCK (40) no, AF_KCM-ish 41 yes.
        let socket = nr("socket");
        for (domain, want) in [(2, ALLOW), (38, EPERM), (39, ALLOW), (40, EPERM), (41, ALLOW)] {
            assert_eq!(run(&p, X86_64, socket, [domain, 1, 0, 0, 0, 0]), want, "domain {domain}");
        }
        // A high word set makes it a different value: not 2.
        assert_eq!(run(&p, X86_64, socket, [(1 << 32) | 40, 1, 0, 0, 0, 0]), ALLOW);
        let pers = nr("personality");
        assert_eq!(run(&p, X86_64, pers, [0xffff_ffff, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(run(&p, X86_64, pers, [0x0040000, 0, 0, 0, 0, 0]), EPERM); // ADDR_NO_RANDOMIZE
        // Unknown numbers and x32 numbers of denied calls.
        assert_eq!(run(&p, X86_64, 9999, none), EPERM);
        assert_eq!(run(&p, X86_64, Arch::X32.syscall("read").unwrap(), none), ALLOW);
        assert_eq!(run(&p, X86_64, Arch::X32.syscall("kexec_load").unwrap(), none), EPERM);
        // i386 by its own numbers: write is 4, kexec_load 283.
        assert_eq!(run(&p, I386, 4, none), ALLOW);
        assert_eq!(run(&p, I386, 283, none), EPERM);
        assert_eq!(run(&p, I386, Arch::X86.syscall("socketcall").unwrap(), none), ALLOW);
        // Any other architecture is killed.
        assert_eq!(run(&p, 0xc000_00b7, 63, none), 0x8000_0000);
        // Capabilities unlock their calls; CAP_SYS_ADMIN lifts the clone rule.
        let admin = docker(&["CAP_SYS_ADMIN"]);
        assert_eq!(run(&admin, X86_64, nr("mount"), none), ALLOW);
        assert_eq!(run(&admin, X86_64, clone, [0x1000_0000 | 17, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(run(&admin, X86_64, nr("clone3"), none), ALLOW);
        // minKernel: ptrace needs 4.8 without CAP_SYS_PTRACE.
        let old = crate::compile(&default_profile(), &Context { caps: vec![], kernel: (4, 4) }).unwrap();
        assert_eq!(run(&old, X86_64, nr("ptrace"), none), EPERM);
    }

    /// Every comparison, against a direct evaluation, on values around the
    /// 32-bit boundary.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn comparisons_match_64_bit_semantics() {
        let values = [0u64, 1, 5, 0xffff_ffff, 0x1_0000_0000, 0x1_0000_0005, u64::MAX];
        for op in ["SCMP_CMP_EQ", "SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_GT", "SCMP_CMP_GE", "SCMP_CMP_MASKED_EQ"] {
            for v in values {
                let json = format!(
                    r#"{{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{{"names":["getpid"],"action":"SCMP_ACT_ALLOW","args":[{{"index":2,"value":{v},"valueTwo":5,"op":"{op}"}}]}}]}}"#
                );
                let prof = Profile::from_json(&json).unwrap();
                let p = crate::compile(&prof, &Context { caps: vec![], kernel: (6, 1) }).unwrap();
                for x in values {
                    let want = match op {
                        "SCMP_CMP_EQ" => x == v,
                        "SCMP_CMP_NE" => x != v,
                        "SCMP_CMP_LT" => x < v,
                        "SCMP_CMP_LE" => x <= v,
                        "SCMP_CMP_GT" => x > v,
                        "SCMP_CMP_GE" => x >= v,
                        _ => x & v == 5,
                    };
                    let got = run(&p, X86_64, 39, [0, 0, x, 0, 0, 0]) == ALLOW;
                    assert_eq!(got, want, "{op} value {v:#x} arg {x:#x}");
                }
            }
        }
    }

    /// The OCI form another runtime would take compiles to the same program.
    #[test]
    fn oci_form_is_the_same_filter() {
        for caps in [vec![], vec!["CAP_SYS_ADMIN".to_string()]] {
            let ctx = Context { caps, kernel: (6, 1) };
            let p = default_profile();
            let oci = p.to_oci(&ctx).unwrap();
            assert!(oci.syscalls.iter().flatten().all(|r| r.includes.is_none() && r.excludes.is_none()));
            let json = serde_json::to_string(&oci).unwrap();
            let back = Profile::from_json(&json).unwrap();
            assert_eq!(crate::compile(&back, &ctx).unwrap(), crate::compile(&p, &ctx).unwrap());
        }
    }

    #[test]
    fn bad_profiles_are_refused() {
        for (json, want) in [
            ("{", "not valid JSON"),
            (r#"{"defaultAction":"SCMP_ACT_MAYBE"}"#, "unknown action"),
            (r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_Z80"]}"#, "unknown architecture"),
            (r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":6,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#, "argument index 6"),
            (r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":1,"op":"SCMP_CMP_ABOUT"}]}]}"#, "unknown comparison"),
            (r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":[],"action":"SCMP_ACT_ERRNO"}]}"#, "names no system call"),
            (r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_NOTIFY"}]}"#, "seccomp agent"),
        ] {
            let e = Profile::from_json(json).err().unwrap().to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn tables_are_sorted_and_plausible() {
        for arch in [Arch::X86_64, Arch::X86, Arch::X32, Arch::Aarch64] {
            assert!(arch.table().windows(2).all(|w| w[0].0 < w[1].0), "{arch:?}");
        }
        assert_eq!(Arch::X86_64.syscall("read"), Some(0));
        assert_eq!(Arch::X86.syscall("exit"), Some(1));
        assert_eq!(Arch::X32.syscall("read"), Some(0x4000_0000));
        assert_eq!(Arch::Aarch64.syscall("openat"), Some(56));
        assert_eq!(Arch::X86_64.syscall("io_uring_setup"), Some(425));
    }
}
