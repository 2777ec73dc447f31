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

/// Whether `path` pins a live namespace: an nsfs bind mount. A file the
/// namespace was pinned on outlives the mount (the data dir survives a
/// reboot, mounts don't): such a file is no namespace, and joining it
/// would fail or, worse, wire nothing.
pub fn is_pinned(path: &Path) -> Result<bool, OverlayError> {
    use nix::sys::statfs::{statfs, NSFS_MAGIC};
    match statfs(path) {
        Ok(fs) => Ok(fs.filesystem_type() == NSFS_MAGIC),
        Err(nix::Error::ENOENT) => Ok(false),
        Err(e) => Err(sys(format!("checking {}", path.display()))(e)),
    }
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

/// TCP ports something listens on in the namespace at `path`.
pub fn listening_ports(path: &Path) -> Result<std::collections::BTreeSet<u16>, OverlayError> {
    Ok(parse_listening(&read_tcp_tables(path)?))
}

fn parse_listening(tables: &str) -> std::collections::BTreeSet<u16> {
    tables
        .lines()
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let local = cols.nth(1)?;
            let state = cols.nth(1)?;
            (state == "0A").then(|| u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()).flatten()
        })
        .collect()
}

/// `/proc/net/tcp` and `tcp6` as seen inside the namespace at `path`.
fn read_tcp_tables(path: &Path) -> Result<String, OverlayError> {
    read_in_netns(path, &["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"])
}

/// The contents of `files` (a missing one reads as empty), read from a
/// thread inside the namespace at `path`, one after the other.
fn read_in_netns(path: &Path, files: &'static [&'static str]) -> Result<String, OverlayError> {
    let path: PathBuf = path.to_path_buf();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).map_err(|source| OverlayError::Io { what: format!("opening {}", path.display()), source })?;
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(sys(format!("entering {}", path.display())))?;
        let mut text = String::new();
        for file in files {
            match std::fs::read_to_string(file) {
                Ok(t) => text.push_str(&t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(OverlayError::Io { what: format!("reading {file}"), source }),
            }
        }
        Ok(text)
    })
    .join()
    .map_err(|_| OverlayError::Io { what: "netns thread".into(), source: std::io::Error::other("panicked") })?
}

/// The TCP connections the namespace at `path` serves (on a port it
/// listens on) that still carry a request or its answer (established,
/// being set up, or closing with data not yet acknowledged; connections
/// the task opened itself, TIME_WAIT and FIN_WAIT2 don't count), and how
/// many it has accepted so far (TCP `PassiveOpens`, which counts those too
/// short to be seen open).
pub fn served(path: &Path) -> Result<(usize, u64), OverlayError> {
    let text = read_in_netns(path, &["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6", "/proc/thread-self/net/snmp"])?;
    Ok((count_served(&text), passive_opens(&text).unwrap_or(0)))
}

/// `PassiveOpens` from the `Tcp:` lines of `/proc/net/snmp` (a header
/// line of names, then one of values).
fn passive_opens(snmp: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let at = names.split_whitespace().position(|n| n == "PassiveOpens")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Counts the busy served sockets in `/proc/net/tcp` tables: the 2nd
/// column is the local address (hex ip:port), the 4th the state (hex).
fn count_served(tables: &str) -> usize {
    // ESTABLISHED, SYN_RECV, FIN_WAIT1, CLOSE_WAIT, LAST_ACK, CLOSING
    const BUSY: [&str; 6] = ["01", "03", "04", "08", "09", "0B"];
    const LISTEN: &str = "0A";
    let rows: Vec<(&str, &str)> = tables
        .lines()
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let local = cols.nth(1)?;
            let state = cols.nth(1)?;
            Some((local.rsplit_once(':')?.1, state))
        })
        .collect();
    let listening: Vec<&str> = rows.iter().filter(|(_, st)| *st == LISTEN).map(|(port, _)| *port).collect();
    rows.iter().filter(|(port, st)| BUSY.contains(st) && listening.contains(port)).count()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_a_live_mount_counts_as_a_pinned_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task");
        assert!(!is_pinned(&path).unwrap(), "no file");
        // A file left from before a reboot: not a namespace.
        std::fs::write(&path, "").unwrap();
        assert!(!is_pinned(&path).unwrap(), "a plain file");
        // The kernel's own handle to a namespace is one.
        assert!(is_pinned(Path::new("/proc/self/ns/net")).unwrap());
        // Pinned by create (needs root, as the overlay does): live; gone
        // after remove.
        if nix::unistd::geteuid().is_root() {
            create(&path).unwrap();
            assert!(is_pinned(&path).unwrap());
            remove(&path).unwrap();
            assert!(!is_pinned(&path).unwrap() && !path.exists());
        }
    }

    #[test]
    fn served_connections_are_counted_the_rest_is_not() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 02004064:0050 0B0012C6:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n\
   2: 02004064:0050 0B0012C6:C351 06 00000000:00000000 03:00000F9E 00000000     0        0 0 3 0\n\
   3: 02004064:0050 0B0012C6:C352 08 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1\n\
   4: 02004064:D431 0B0012C6:1538 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1\n";
        // The two on port 80 (0x50) that are still busy; not TIME_WAIT, not
        // the task's own outgoing connection.
        assert_eq!(count_served(table), 2);
        assert_eq!(parse_listening(table), std::collections::BTreeSet::from([80]));
    }

    #[test]
    fn passive_opens_come_from_the_tcp_lines_of_snmp() {
        let snmp = "Udp: InDatagrams NoPorts\nUdp: 5 0\n\
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails\n\
Tcp: 1 200 120000 -1 164606 581 49\n";
        assert_eq!(passive_opens(snmp), Some(581));
        assert_eq!(passive_opens("Tcp: A B\n"), None, "no values line");
        // The real thing, in this process's namespace.
        let here = std::fs::read_to_string("/proc/self/net/snmp").unwrap();
        assert!(passive_opens(&here).is_some(), "{here}");
    }
}
