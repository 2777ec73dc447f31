//! Removing what a test cluster made, whichever way its process ends.
//!
//! A [`Cluster`](crate::Cluster) records each thing it makes — daemon
//! processes, network namespaces, veths, its bridge and forwarding rule, its
//! directory — in a process-wide registry, under the registry's lock and in
//! the same step as it makes it. One function, [`Resources::clean`], removes
//! what a record names. It runs:
//! - when the cluster is dropped (the test or benchmark ended, or panicked
//!   on the thread that owns the cluster);
//! - on SIGINT, SIGTERM or SIGHUP, for every registered record: the first
//!   [`register`] installs a handler (Drop does not run when a signal ends
//!   a process, e.g. nextest's SIGTERM to a test that ran too long);
//! - from the panic hook [`cleanup_on_signals`] installs (benchmarks), for
//!   a panic on any other thread, whose unwinding never drops the cluster.
//!
//! The lock serialises all of these: whoever cleans holds it from start to
//! end (the signal path until the process exits), so nothing is made behind
//! a cleanup's back and no two paths reap the same process.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::{netns, remove_containers, sh};

/// What one cluster (or one benchmark's scratch directory) made that would
/// outlive its process.
#[derive(Debug, Default)]
pub struct Resources {
    /// What messages call it: `cluster 1a2b0`.
    pub label: String,
    /// Daemons this process started and has not reaped yet (their PIDs can
    /// not have been reused).
    pub pids: Vec<u32>,
    /// The daemons' data dirs: their containers' supervisors outlive them.
    pub data_dirs: Vec<PathBuf>,
    pub veths: Vec<String>,
    pub netns: Vec<String>,
    pub bridge: Option<String>,
    /// Whether an nft accept rule for `bridge` was added
    /// ([`netns::allow_bridge_forwarding`]).
    pub forward_rule: bool,
    /// The directory the rest lives in: processes that name it are ended,
    /// mounts under it unmounted, then it is removed (kept, unmounted, with
    /// `SHOAL_KEEP_TEST_DIRS` set).
    pub dir: Option<PathBuf>,
}

impl Resources {
    /// Removes everything recorded, in dependency order, and says what it
    /// removed (one phrase each). Never fails: what is already gone is
    /// skipped.
    pub fn clean(self) -> Vec<String> {
        let mut done = Vec::new();
        // Daemons first: a live one would restart what is removed next.
        let killed: Vec<String> = self.pids.iter().filter(|p| kill_child(**p)).map(u32::to_string).collect();
        if !killed.is_empty() {
            done.push(format!("killed daemon {}", killed.join(" ")));
        }
        for d in &self.data_dirs {
            done.extend(remove_containers(d));
        }
        if let Some(dir) = &self.dir {
            // Whatever still runs with this directory in its arguments was
            // started for it: CLI calls in flight, a supervisor.
            let left = kill_naming(dir);
            if !left.is_empty() {
                done.push(format!("killed process {}", left.iter().map(i32::to_string).collect::<Vec<_>>().join(" ")));
            }
            for m in unmount_under(dir) {
                done.push(format!("unmounted {}", m.display()));
            }
        }
        for v in &self.veths {
            if sh("ip", &["link", "del", v]).is_ok() {
                done.push(format!("deleted veth {v}"));
            }
        }
        for n in &self.netns {
            if sh("ip", &["netns", "del", n]).is_ok() {
                done.push(format!("deleted netns {n}"));
            }
        }
        if let Some(bridge) = &self.bridge {
            if self.forward_rule && netns::remove_bridge_forwarding(bridge) {
                done.push(format!("removed the forward rule for {bridge}"));
            }
            if sh("ip", &["link", "del", bridge]).is_ok() {
                done.push(format!("deleted bridge {bridge}"));
            }
        }
        if let Some(dir) = &self.dir
            && std::env::var_os("SHOAL_KEEP_TEST_DIRS").is_none()
            && dir.exists()
        {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => done.push(format!("removed {}", dir.display())),
                Err(e) => done.push(format!("could not remove {}: {e}", dir.display())),
            }
        }
        done
    }
}

/// Cleans `res` and says on stderr what was removed.
fn clean_and_report(res: Resources) {
    let label = if res.label.is_empty() { "test resources".to_string() } else { res.label.clone() };
    let done = res.clean();
    if done.is_empty() {
        eprintln!("shoal-tests: {label}: nothing left to remove");
    } else {
        eprintln!("shoal-tests: {label}: {}", done.join(", "));
    }
}

/// SIGKILLs and reaps `pid` if it is a child of this process not yet
/// reaped; returns whether it was still running.
fn kill_child(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else { return false };
    let pid = Pid::from_raw(raw);
    // WNOWAIT leaves a zombie in place: only a child nobody has reaped is
    // ours for sure (ECHILD: reaped, its PID may be someone else's now).
    let alive = match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT) {
        Ok(WaitStatus::StillAlive) => true,
        Ok(_) => false,
        Err(_) => return false,
    };
    if alive {
        let _ = kill(pid, Signal::SIGKILL);
    }
    // A process stuck in the kernel (D state) must not hang the cleanup.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Ok(WaitStatus::StillAlive) = waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        if Instant::now() > deadline {
            eprintln!("shoal-tests: daemon {pid} did not die within 10 s of SIGKILL");
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    alive
}

/// SIGKILLs every other process with an argument at or under `dir` (a
/// path-component match: `/tmp/x-1` does not name `/tmp/x-10`); returns
/// their PIDs.
pub fn kill_naming(dir: &Path) -> Vec<i32> {
    let me = std::process::id();
    let mut killed = Vec::new();
    for pid in processes_naming(dir) {
        if pid as u32 != me && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            killed.push(pid);
        }
    }
    killed
}

/// The processes with an argument at or under `dir`.
pub fn processes_naming(dir: &Path) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return found };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|arg| Path::new(&*String::from_utf8_lossy(arg)).starts_with(dir)) {
            found.push(pid);
        }
    }
    found
}

/// The mount points at or under `dir` in this thread's mount namespace,
/// deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    // thread-self, not self: /proc/self is the main thread, which may sit
    // in another mount namespace (run_latency makes itself a private one).
    let info = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape(m)))
        .filter(|m| m.starts_with(&dir))
        .collect();
    found.sort_by(|a, b| b.components().count().cmp(&a.components().count()).then_with(|| a.cmp(b)));
    found.dedup();
    found
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> String {
    field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// Lazily unmounts everything at or under `dir`, deepest first; returns the
/// mount points it unmounted.
pub fn unmount_under(dir: &Path) -> Vec<PathBuf> {
    let mut done: Vec<PathBuf> = Vec::new();
    // Mounts stacked on one point come off one per pass.
    for _ in 0..16 {
        let mut progress = false;
        for m in mounts_under(dir) {
            if nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).is_ok() {
                progress = true;
                if !done.contains(&m) {
                    done.push(m);
                }
            }
        }
        if !progress {
            break;
        }
    }
    done
}

struct Registry {
    next: u64,
    live: BTreeMap<u64, Resources>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { next: 0, live: BTreeMap::new() });

thread_local! {
    /// Whether this thread holds the registry's lock: a panic while it does
    /// must not make the panic hook wait for it.
    static HOLDING: Cell<bool> = const { Cell::new(false) };
}

/// The registry, locked; a panic in an earlier holder left plain data.
struct Locked(MutexGuard<'static, Registry>);

fn lock() -> Locked {
    let guard = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
    HOLDING.set(true);
    Locked(guard)
}

impl Drop for Locked {
    fn drop(&mut self) {
        HOLDING.set(false);
    }
}

/// One record in the registry. Dropping it cleans and forgets what it
/// names.
#[derive(Debug)]
pub struct Registration(u64);

/// Records `res` (usually still empty: add to it with
/// [`Registration::update`] as things are made).
pub fn register(res: Resources) -> Registration {
    if let Err(e) = clean_on_signals() {
        eprintln!("shoal-tests: {e:#}: a signal will not clean up {}", res.label);
    }
    let mut reg = lock();
    let id = reg.0.next;
    reg.0.next += 1;
    reg.0.live.insert(id, res);
    Registration(id)
}

impl Registration {
    /// Runs `f` on this record with the registry locked. Make a resource
    /// and record it inside one `f`, recording first where the name is
    /// known beforehand (removing what does not exist yet is harmless): then
    /// no cleanup runs between the two, and none misses it.
    pub fn update<T>(&self, f: impl FnOnce(&mut Resources) -> T) -> T {
        let mut reg = lock();
        f(reg.0.live.entry(self.0).or_default())
    }

    /// Removes what this record names (saying so on stderr) and forgets
    /// it; does nothing if a signal or panic path already did.
    pub fn clean(&self) {
        let mut reg = lock();
        if let Some(res) = reg.0.live.remove(&self.0) {
            clean_and_report(res);
        }
        drop(reg);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.clean();
    }
}

/// Cleans every record (the lock is held by the caller, `reg`); returns
/// how many there were.
fn clean_all(reg: &mut Locked) -> usize {
    let all = std::mem::take(&mut reg.0.live);
    let n = all.len();
    for res in all.into_values() {
        clean_and_report(res);
    }
    n
}

/// The write end of the pipe the signal handler tells the cleanup thread
/// through (-1 until [`clean_on_signals`] has run).
static SIGNAL_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// The signal handler: only async-signal-safe work, one `write` of the
/// signal's number to the cleanup thread.
extern "C" fn on_signal(sig: nix::libc::c_int) {
    let fd = SIGNAL_PIPE.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: the pipe's write end stays open for the process's life
        // (it is never closed once stored).
        #[allow(unsafe_code)]
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let _ = nix::unistd::write(fd, &[sig as u8]);
    }
}

/// Makes SIGINT, SIGTERM and SIGHUP remove every registered record before
/// the process exits (with 128 + the signal's number), whichever thread
/// the signal lands on: a handler hands it to one dedicated thread, which
/// takes the registry's lock, removes every record and exits. Every
/// [`register`] calls it, so a test that nextest ends for running too long
/// (SIGTERM) leaves nothing behind either. Calling it again does nothing.
fn clean_on_signals() -> anyhow::Result<()> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("making the signal pipe")?;
    let waiter = std::thread::Builder::new().name("shoal-cleanup".into()).spawn(move || {
        let mut byte = [0u8; 1];
        let sig = loop {
            match nix::unistd::read(&read, &mut byte) {
                Ok(1) => break Signal::try_from(i32::from(byte[0])).unwrap_or(Signal::SIGTERM),
                Err(nix::errno::Errno::EINTR) => continue,
                other => {
                    eprintln!("shoal-tests: the signal pipe failed ({other:?}): signals no longer clean up");
                    return;
                }
            }
        };
        // Held until exit: a Drop racing us waits here, and whatever
        // another thread would make next is never made.
        let mut reg = lock();
        eprintln!("shoal-tests: {sig}: cleaning up {} registered cluster(s)/scratch dir(s) before exiting", reg.0.live.len());
        // Exit even if a cleanup step panics.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| clean_all(&mut reg)));
        std::process::exit(128 + sig as i32);
    });
    waiter.context("starting the signal thread")?;
    SIGNAL_PIPE.store(std::os::fd::IntoRawFd::into_raw_fd(write), std::sync::atomic::Ordering::Relaxed);
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only loads an atomic and calls write(2),
        // both async-signal-safe.
        #[allow(unsafe_code)]
        let installed = unsafe { sigaction(s, &action) };
        installed.with_context(|| format!("handling {s}"))?;
    }
    let _ = INSTALLED.set(());
    Ok(())
}

/// What [`register`] installs for signals, plus a panic hook: a panic on
/// any thread removes every registered record. For benchmarks, whose
/// cluster lives on other threads than the one that panics.
///
/// The panic hook removes every record and then runs the previous hook;
/// if it removed anything it exits with 101, as the run cannot go on
/// without its cluster. A panic on a thread that holds the registry (one
/// that is making or cleaning a cluster) is left to that cluster's Drop.
/// (Tests don't install it: a failing assertion unwinds and drops its own
/// cluster, and must not end other tests' clusters in the same process.)
///
/// Calling it again does nothing.
pub fn cleanup_on_signals() -> anyhow::Result<()> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    clean_on_signals()?;
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if HOLDING.get() {
            previous(info);
            return;
        }
        let mut reg = lock();
        let n = reg.0.live.len();
        if n > 0 {
            eprintln!("shoal-tests: panic: cleaning up {n} registered cluster(s)/scratch dir(s)");
        }
        clean_all(&mut reg);
        previous(info);
        if n > 0 {
            std::process::exit(101);
        }
    }));
    let _ = INSTALLED.set(());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape("/a\\040b\\134c"), "/a b\\c");
    }

    #[test]
    fn mounts_under_match_whole_components() {
        let all = mounts_under(Path::new("/"));
        assert!(all.iter().any(|m| m == Path::new("/")));
        assert!(all.iter().any(|m| m == Path::new("/proc")));
        // Deepest first: "/" comes last.
        assert_eq!(all.last().map(PathBuf::as_path), Some(Path::new("/")));
        assert!(mounts_under(Path::new("/pro")).is_empty());
    }

    #[test]
    fn a_record_is_cleaned_once() {
        let dir = std::env::temp_dir().join(format!("shoal-cleanup-{}", crate::unique_id()));
        std::fs::create_dir_all(dir.join("sub")).expect("making a scratch dir");
        let r = register(Resources { label: "scratch".into(), ..Default::default() });
        r.update(|res| res.dir = Some(dir.clone()));
        r.clean();
        assert!(!dir.exists());
        // The record is gone: a second clean (and the drop) find nothing.
        std::fs::create_dir_all(&dir).expect("making it again");
        r.clean();
        drop(r);
        assert!(dir.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
