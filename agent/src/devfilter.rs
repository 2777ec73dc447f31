//! cgroup v2 device control: a `BPF_PROG_TYPE_CGROUP_DEVICE` program built
//! from the same allow list v1 writes to `devices.allow`
//! ([`crate::cgroup::DEVICE_RULES`]), as runc and crun do. v2 has no
//! devices controller; the kernel asks this program on every open and
//! mknod of a device node by a process in the cgroup.
//!
//! The program is assembled here from a handful of eBPF instructions (no
//! compiler, no ELF): for each rule, compare the device type, the access
//! bits, the major and the minor, and allow on a full match; deny when no
//! rule matched.

use std::os::fd::AsFd;
use std::path::Path;

use crate::cgroup::DEVICE_RULES;

/// Errors loading or attaching the program.
#[derive(Debug, thiserror::Error)]
pub enum DevFilterError {
    #[error("device rule {0:?} is malformed")]
    Rule(String),
    #[error("open cgroup {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("load the device filter: {0}")]
    Load(std::io::Error),
    #[error("attach the device filter to {path}: {source}")]
    Attach { path: String, source: std::io::Error },
}

/// One `devices.allow` line: type (`None` = any), major and minor (`None` =
/// `*`), and the access bits allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    kind: Option<u32>,
    major: Option<u32>,
    minor: Option<u32>,
    access: u32,
}

// linux/bpf.h
const DEV_BLOCK: u32 = 1;
const DEV_CHAR: u32 = 2;
const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;

impl Rule {
    /// Parses `c 1:3 rwm`, `b *:* m`, `a`.
    pub fn parse(s: &str) -> Result<Rule, DevFilterError> {
        let bad = || DevFilterError::Rule(s.to_string());
        let mut f = s.split_whitespace();
        let kind = match f.next() {
            Some("a") => return Ok(Rule { kind: None, major: None, minor: None, access: 7 }),
            Some("b") => DEV_BLOCK,
            Some("c") => DEV_CHAR,
            _ => return Err(bad()),
        };
        let (ma, mi) = f.next().and_then(|n| n.split_once(':')).ok_or_else(bad)?;
        let num = |x: &str| if x == "*" { Ok(None) } else { x.parse().map(Some).map_err(|_| bad()) };
        let mut access = 0;
        for c in f.next().ok_or_else(bad)?.chars() {
            access |= match c {
                'r' => ACC_READ,
                'w' => ACC_WRITE,
                'm' => ACC_MKNOD,
                _ => return Err(bad()),
            };
        }
        if f.next().is_some() {
            return Err(bad());
        }
        Ok(Rule { kind: Some(kind), major: num(ma)?, minor: num(mi)?, access })
    }

    /// Whether this rule allows `access` on device `kind major:minor`; the
    /// reference the program is tested against.
    pub fn allows(&self, kind: u32, major: u32, minor: u32, access: u32) -> bool {
        self.kind.is_none_or(|k| k == kind)
            && access & !self.access == 0
            && self.major.is_none_or(|m| m == major)
            && self.minor.is_none_or(|m| m == minor)
    }
}

/// The rules every container gets.
pub fn default_rules() -> Result<Vec<Rule>, DevFilterError> {
    DEVICE_RULES.iter().map(|r| Rule::parse(r)).collect()
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst in the low nibble, src in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: (src << 4) | (dst & 0xf), off, imm }
}

// Opcodes (linux/bpf_common.h, linux/bpf.h).
const LDX_MEM_W: u8 = 0x61; // dst = *(u32 *)(src + off)
const ALU32_AND_K: u8 = 0x54; // dst &= imm
const ALU32_RSH_K: u8 = 0x74; // dst >>= imm
const ALU32_MOV_X: u8 = 0xbc; // dst = src
const ALU64_MOV_K: u8 = 0xb7; // dst = imm
const JNE_K: u8 = 0x55; // if dst != imm goto pc + off
const EXIT: u8 = 0x95;

/// Assembles the program for `rules`. The context (`struct
/// bpf_cgroup_dev_ctx`) is { u32 access_type (access << 16 | type), u32
/// major, u32 minor } in r1.
pub fn assemble(rules: &[Rule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0), // r2 = access_type
        insn(ALU32_MOV_X, 3, 2, 0, 0),
        insn(ALU32_AND_K, 3, 0, 0, 0xffff), // r3 = type
        insn(ALU32_RSH_K, 2, 0, 0, 16),     // r2 = access
        insn(LDX_MEM_W, 4, 1, 4, 0),        // r4 = major
        insn(LDX_MEM_W, 5, 1, 8, 0),        // r5 = minor
    ];
    for r in rules {
        // Each test jumps past the end of this rule's block when it fails;
        // offsets are patched once the block's length is known.
        let mut block: Vec<Insn> = Vec::new();
        if let Some(k) = r.kind {
            block.push(insn(JNE_K, 3, 0, 0, k as i32));
        }
        if r.access != 7 {
            block.push(insn(ALU32_MOV_X, 6, 2, 0, 0));
            block.push(insn(ALU32_AND_K, 6, 0, 0, !r.access as i32 & 7));
            block.push(insn(JNE_K, 6, 0, 0, 0));
        }
        if let Some(m) = r.major {
            block.push(insn(JNE_K, 4, 0, 0, m as i32));
        }
        if let Some(m) = r.minor {
            block.push(insn(JNE_K, 5, 0, 0, m as i32));
        }
        block.push(insn(ALU64_MOV_K, 0, 0, 0, 1));
        block.push(insn(EXIT, 0, 0, 0, 0));
        let len = block.len();
        for (i, ins) in block.iter_mut().enumerate() {
            if ins.code == JNE_K {
                ins.off = (len - i - 1) as i16;
            }
        }
        p.extend(block);
    }
    p.push(insn(ALU64_MOV_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// Loads the program for `rules` and attaches it to the cgroup v2
/// directory `cgroup`. The attachment keeps the program alive as long as
/// the cgroup exists; our descriptors close on return.
pub fn attach(cgroup: &Path, rules: &[Rule]) -> Result<(), DevFilterError> {
    let path = cgroup.display().to_string();
    let dir = std::fs::File::open(cgroup).map_err(|source| DevFilterError::Open { path: path.clone(), source })?;
    let prog = crate::sys::bpf_load_device_filter(&assemble(rules)).map_err(DevFilterError::Load)?;
    crate::sys::bpf_attach_device_filter(dir.as_fd(), prog.as_fd())
        .map_err(|source| DevFilterError::Attach { path, source })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A tiny interpreter for the instructions `assemble` emits, so the
    /// program's answers can be checked against the rules without a kernel.
    fn run(p: &[Insn], ctx: [u32; 3]) -> u64 {
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let (d, s) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_MEM_W => r[d] = ctx[i.off as usize / 4] as u64,
                ALU32_AND_K => r[d] = (r[d] as u32 & i.imm as u32) as u64,
                ALU32_RSH_K => r[d] = ((r[d] as u32) >> i.imm) as u64,
                ALU32_MOV_X => r[d] = r[s] as u32 as u64,
                ALU64_MOV_K => r[d] = i.imm as i64 as u64,
                JNE_K => {
                    if r[d] != i.imm as i64 as u64 {
                        pc += i.off as usize;
                    }
                }
                EXIT => return r[0],
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn program_agrees_with_the_rules() {
        let rules = default_rules().unwrap();
        let p = assemble(&rules);
        for kind in [DEV_BLOCK, DEV_CHAR] {
            for (major, minor) in [(1, 3), (1, 5), (1, 4), (5, 0), (5, 2), (136, 7), (8, 0), (10, 200), (0, 0)] {
                for access in 1..8 {
                    let want = rules.iter().any(|r| r.allows(kind, major, minor, access));
                    let got = run(&p, [(access << 16) | kind, major, minor]) == 1;
                    assert_eq!(got, want, "{kind} {major}:{minor} access {access}");
                }
            }
        }
        // Spot checks: mknod of anything, read a disk never, /dev/null yes.
        assert_eq!(run(&p, [(ACC_MKNOD << 16) | DEV_BLOCK, 8, 0]), 1);
        assert_eq!(run(&p, [(ACC_READ << 16) | DEV_BLOCK, 8, 0]), 0);
        assert_eq!(run(&p, [((ACC_READ | ACC_WRITE) << 16) | DEV_CHAR, 1, 3]), 1);
        assert_eq!(run(&p, [(ACC_READ << 16) | DEV_CHAR, 1, 1]), 0);
    }

    #[test]
    fn rules_parse_and_bad_ones_are_refused() {
        assert_eq!(
            Rule::parse("c 136:* rwm").unwrap(),
            Rule { kind: Some(DEV_CHAR), major: Some(136), minor: None, access: 7 }
        );
        for bad in ["", "x 1:3 r", "c 1 r", "c 1:3 rx", "c a:3 r", "c 1:3 r extra"] {
            assert!(Rule::parse(bad).is_err(), "{bad:?}");
        }
    }
}
