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
