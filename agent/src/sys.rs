//! The few raw syscalls that neither `nix` nor `std` wrap safely. Everything
//! else in the crate is `#![deny(unsafe_code)]`; each block here says why it
//! is sound.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Which side of a fork or clone the caller is on.
pub enum Forked {
    /// The caller: carries the child's pid (in the caller's pid namespace).
    Parent(i32),
    /// The new process.
    Child,
}

/// True when the calling process has exactly one thread. A clone or fork
/// from a multi-threaded process may copy a lock (malloc's, a logger's) in
/// its held state, and `unshare(CLONE_NEWNS)` refuses to run there at all.
pub fn single_threaded() -> bool {
    match std::fs::read_dir("/proc/self/task") {
        Ok(entries) => entries.count() == 1,
        Err(_) => false,
    }
}

/// `clone(2)` with namespace flags and no new stack: like `fork`, the child
/// goes on from here on a copy of the caller's stack.
pub fn clone_fork(flags: libc::c_int) -> io::Result<Forked> {
    // SAFETY: with a NULL stack pointer the kernel gives the child a
    // copy-on-write copy of the caller's stack, exactly as fork does, so the
    // child may return from this function. The runtime only calls this from
    // single-threaded processes (see `single_threaded`), so no lock owned by
    // another thread can be copied in a held state. The extra arguments
    // (parent_tid, child_tid, tls) are unused without the matching flags.
    let ret = unsafe {
        libc::syscall(libc::SYS_clone, (flags | libc::SIGCHLD) as libc::c_ulong, 0usize, 0usize, 0usize, 0usize)
    };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid as i32)),
    }
}

/// Plain `fork(2)`, used by the container's init to start the workload.
pub fn fork() -> io::Result<Forked> {
    clone_fork(0)
}

/// Ends the calling process at once, without running atexit handlers or
/// flushing std's buffers that belong to the parent's copy of them.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` takes no pointers and never returns.
    unsafe { libc::_exit(code) }
}

/// `lsetxattr(2)`: used to mark overlayfs opaque directories.
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let n = CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"))?;
    // SAFETY: both strings are valid NUL-terminated C strings that outlive the
    // call; `value` is a valid slice and its length is passed with it.
    let ret = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// `pidfd_open(2)`: a descriptor that becomes readable when `pid` exits, so
/// a reattached agent can wait on a process that is not its child.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes plain integers and returns a new descriptor or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

/// Puts every signal's disposition back to the default. Rust's runtime
/// ignores SIGPIPE at start, and an ignored disposition survives execve:
/// without this, `yes | head` in a container would never stop.
pub fn reset_signal_dispositions() {
    for sig in nix::sys::signal::Signal::iterator() {
        if matches!(sig, nix::sys::signal::Signal::SIGKILL | nix::sys::signal::Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: SIG_DFL installs no handler code, so no Rust function can
        // run in signal context; errors (signals that can't be changed) are
        // harmless and ignored.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
    }
}

/// `MOUNT_ATTR_*` bits for [`mount_setattr`].
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;
pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` of linux/mount.h (size 32, version 0).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `mount_setattr(2)`: sets the `set` attributes on the mount at `path`
/// (and every mount below it when `recursive`), leaving the others as they
/// are. Unlike `MS_REMOUNT`, it can't drop `nosuid`/`nodev`/`noexec` by
/// leaving them out. ENOSYS before Linux 5.12.
pub fn mount_setattr(path: &Path, recursive: bool, set: u64) -> io::Result<()> {
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let p = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let attr = MountAttr { attr_set: set, attr_clr: 0, propagation: 0, userns_fd: 0 };
    let flags: libc::c_uint = if recursive { AT_RECURSIVE } else { 0 };
    raw_mount_setattr(libc::AT_FDCWD, &p, flags, &attr)
}

fn raw_mount_setattr(dirfd: libc::c_int, p: &CString, flags: libc::c_uint, attr: &MountAttr) -> io::Result<()> {
    // SAFETY: `p` is a valid NUL-terminated string and `attr` a valid
    // `struct mount_attr` whose size is passed with it; both outlive the call,
    // and the kernel only reads them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            p.as_ptr(),
            flags,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Mounts at `target` an idmapped copy of `source` (a directory or a file,
/// recursively for a directory): files owned by `n` on disk appear owned
/// by what `n` maps to in the user namespace `userns`, and the other way
/// round for what is written through it. `open_tree(OPEN_TREE_CLONE)`,
/// `mount_setattr(MOUNT_ATTR_IDMAP)`, `move_mount`: Linux 5.12, and a
/// filesystem that supports idmapped mounts (ext4, xfs, btrfs, tmpfs 6.3).
pub fn idmapped_bind(source: &Path, target: &Path, userns: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    const AT_EMPTY_PATH: libc::c_uint = 0x1000;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    let cstr = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
    };
    let (src, dst, empty) = (cstr(source)?, cstr(target)?, CString::default());
    // SAFETY: `src` is a valid NUL-terminated path for the call; open_tree
    // returns a new descriptor (a detached copy of the mount tree) or -1.
    let tree = unsafe {
        libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, src.as_ptr(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)
    };
    if tree < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let attr = MountAttr { attr_set: MOUNT_ATTR_IDMAP, attr_clr: 0, propagation: 0, userns_fd: userns.as_raw_fd() as u64 };
    raw_mount_setattr(tree.as_raw_fd(), &empty, AT_EMPTY_PATH | AT_RECURSIVE, &attr)?;
    // SAFETY: `tree` is a detached mount we own, `dst` a valid path; the
    // call only reads them.
    let ret = unsafe {
        libc::syscall(libc::SYS_move_mount, tree.as_raw_fd(), empty.as_ptr(), libc::AT_FDCWD, dst.as_ptr(), MOVE_MOUNT_F_EMPTY_PATH)
    };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// `bpf(BPF_PROG_LOAD)` of a `BPF_PROG_TYPE_CGROUP_DEVICE` program.
pub fn bpf_load_device_filter(insns: &[crate::devfilter::Insn]) -> io::Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
    const BPF_CGROUP_DEVICE: u32 = 6;
    // The head of `union bpf_attr` for BPF_PROG_LOAD; the kernel requires
    // every byte past the fields it knows to be zero, hence the padding.
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
        pad: [u64; 8],
    }
    // `struct bpf_insn` is 8 bytes: code, dst:4|src:4, off, imm.
    let raw: Vec<u64> = insns
        .iter()
        .map(|i| {
            u64::from_ne_bytes({
                let mut b = [0u8; 8];
                b[0] = i.code;
                b[1] = i.regs;
                b[2..4].copy_from_slice(&i.off.to_ne_bytes());
                b[4..8].copy_from_slice(&i.imm.to_ne_bytes());
                b
            })
        })
        .collect();
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..13].copy_from_slice(b"shoal_devices");
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: raw.len() as u32,
        insns: raw.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: BPF_CGROUP_DEVICE,
        pad: [0; 8],
    };
    // SAFETY: `attr` is a fully initialised `bpf_attr` prefix whose pointers
    // (`raw`, `license`) are valid for the whole call; the kernel copies
    // what it needs and returns a new descriptor or -1.
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, &attr as *const ProgLoad, std::mem::size_of::<ProgLoad>())
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

/// `bpf(BPF_PROG_ATTACH)` of a device program to a cgroup directory, with
/// `BPF_F_ALLOW_MULTI` (an ancestor's programs run too; all must allow).
pub fn bpf_attach_device_filter(cgroup: std::os::fd::BorrowedFd<'_>, prog: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const BPF_PROG_ATTACH: libc::c_long = 8;
    const BPF_CGROUP_DEVICE: u32 = 6;
    const BPF_F_ALLOW_MULTI: u32 = 2;
    #[repr(C)]
    struct ProgAttach {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
        replace_bpf_fd: u32,
        pad: [u32; 11],
    }
    let attr = ProgAttach {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
        pad: [0; 11],
    };
    // SAFETY: `attr` is a fully initialised `bpf_attr` prefix holding two
    // descriptors borrowed for the call; the kernel only reads it.
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_ATTACH, &attr as *const ProgAttach, std::mem::size_of::<ProgAttach>())
    };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Caps glibc's malloc at `arenas` arenas for the rest of the process's
/// life (glibc's default is 8 per core). A manager allocates a task's
/// objects on the Raft apply thread and frees them from RPC and planning
/// threads; with an arena per thread the freed memory stays spread over
/// many arenas and the process keeps far more than it uses (at 250,000
/// tasks: 2.5 KB of leader RSS per task with the default, 1.45 KB with 2).
/// An operator's own `MALLOC_ARENA_MAX` wins. False when malloc refused.
#[cfg(target_env = "gnu")]
pub fn limit_malloc_arenas(arenas: i32) -> bool {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return true;
    }
    // SAFETY: mallopt only sets one of malloc's tunables, takes no pointers
    // and is thread-safe; M_ARENA_MAX bounds the arenas created from now on.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) == 1 }
}

/// Other C libraries have no arenas to cap.
#[cfg(not(target_env = "gnu"))]
pub fn limit_malloc_arenas(_arenas: i32) -> bool {
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn malloc_takes_the_arena_cap() {
        assert!(super::limit_malloc_arenas(2));
        // Memory still comes and goes afterwards.
        let v = vec![7u8; 1 << 20];
        assert_eq!(v.iter().map(|b| u64::from(*b)).sum::<u64>(), 7 << 20);
    }
}
