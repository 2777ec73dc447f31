//! Network namespaces for tasks: made by the agent before the container
//! starts (the container joins it), kept alive by a bind mount on a file,
//! configured from a thread that enters it. Every unsafe-free: nix wraps
//! unshare, setns and mount.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::OverlayError;

fn sys(what: String) -> impl FnOnce(nix::Error) -> OverlayError {
    move |e| OverlayError::Io { what, source: e.into() }
}

/// Makes a new network namespace and pins it at `path` (a file).
pub fn create(path: &Path) -> Result<(), OverlayError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| OverlayError::Io { what: format!("creating {}", dir.display()), source })?;
    }
    std::fs::File::create(path).map_err(|source| OverlayError::Io { what: format!("creating {}", path.display()), source })?;
    let target = path.to_path_buf();
    // unshare moves the calling thread: do it on a thread of its own that
    // ends right after, so no runtime thread changes namespace.
    let made = std::thread::spawn(move || -> Result<(), OverlayError> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(sys("unshare(CLONE_NEWNET)".into()))?;
        let own = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
        mount(Some(own.as_str()), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(sys(format!("pinning the namespace at {}", target.display())))
    })
    .join()
    .map_err(|_| OverlayError::Io { what: "netns thread".into(), source: std::io::Error::other("panicked") })?;
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Unpins and removes the namespace at `path` (nothing if it is gone).
pub fn remove(path: &Path) -> Result<(), OverlayError> {
    if !path.exists() {
        return Ok(());
    }
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) => {}
        Err(e) => return Err(sys(format!("unmounting {}", path.display()))(e)),
    }
    std::fs::remove_file(path).map_err(|source| OverlayError::Io { what: format!("removing {}", path.display()), source })
}

/// Runs `f` on a thread inside the namespace at `path`, with a
/// current-thread tokio runtime of its own (a netlink socket belongs to
/// the namespace of the thread that opens it).
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, OverlayError>>>> + Send + 'static,
) -> Result<T, OverlayError> {
    let path: PathBuf = path.to_path_buf();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).map_err(|source| OverlayError::Io { what: format!("opening {}", path.display()), source })?;
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(sys(format!("entering {}", path.display())))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| OverlayError::Io { what: "netns runtime".into(), source })?;
        rt.block_on(f())
    })
    .join()
    .map_err(|_| OverlayError::Io { what: "netns thread".into(), source: std::io::Error::other("panicked") })?
}
