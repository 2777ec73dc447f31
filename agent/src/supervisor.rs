//! The per-container supervisor: a small process (`shoal internal-supervise`)
//! that starts one container, owns its stdout/stderr (written to a log file
//! with size-based rotation), reaps it and records how it ended. It runs in
//! its own session, so it outlives the agent or `shoal run` that spawned it;
//! a new agent finds it again by the files it keeps in the container's
//! directory:
//!
//! ```text
//! DATA/containers/<id>/supervisor.pid   the supervisor
//! DATA/containers/<id>/init.pid         the container's init (host pid)
//! DATA/containers/<id>/container.log    output; container.log.1 after rotation
//! DATA/containers/<id>/exit.json        how it ended (written last, atomically)
//! ```

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::runtime::{ExitStatus, Runtime, RuntimeError, StartOptions, Stdio};
use crate::sys;

/// Errors of the supervisor and of attaching to one.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("container {id}: {path}: {source}")]
    Io { id: String, path: PathBuf, source: io::Error },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("container {id}: supervisor exited without recording a status")]
    Lost { id: String },
    #[error("container {id} failed to start: {message}")]
    Start { id: String, code: i32, message: String },
    #[error("container {id}: supervisor did not report within {0:?}", .waited)]
    Timeout { id: String, waited: Duration },
    #[error("no such container: {id}")]
    NotFound { id: String },
}

/// What `exit.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitRecord {
    pub status: ExitStatus,
    /// Set when the container never started; then `status.code` is 125-127.
    pub error: Option<String>,
    /// Seconds since the epoch.
    pub finished_at: u64,
}

/// Size at which `container.log` is rotated to `container.log.1`.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 10 << 20;

/// How long `spawn` waits for the supervisor to report the container
/// started: pulling nothing, it only mounts and execs.
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Writes `bytes` to `path` atomically (temp file + rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

/// The log file with size-based rotation (one old file kept).
pub struct LogWriter {
    path: PathBuf,
    file: fs::File,
    size: u64,
    max: u64,
}

impl LogWriter {
    pub fn open(path: &Path, max: u64) -> io::Result<Self> {
        let file = crate::runtime::open_append(path)?;
        let size = file.metadata()?.len();
        Ok(LogWriter { path: path.to_path_buf(), file, size, max })
    }

    pub fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + buf.len() as u64 > self.max {
            let old = self.path.with_extension("log.1");
            fs::rename(&self.path, &old)?;
            self.file = crate::runtime::open_append(&self.path)?;
            self.size = 0;
        }
        self.file.write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }
}

/// Paths of one container's supervisor files.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(rt_data_dir: &Path, id: &str) -> Self {
        Paths { dir: rt_data_dir.join("containers").join(id) }
    }
    pub fn supervisor_pid(&self) -> PathBuf {
        self.dir.join("supervisor.pid")
    }
    pub fn init_pid(&self) -> PathBuf {
        self.dir.join("init.pid")
    }
    pub fn exit(&self) -> PathBuf {
        self.dir.join("exit.json")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("container.log")
    }
}

/// The body of `shoal internal-supervise`: start the container created
/// under `data_dir` as `id`, log its output, wait, record its exit.
/// Returns the container's exit code. Must be called single-threaded.
pub fn supervise(data_dir: &Path, id: &str, log_max: u64, remove_on_exit: bool) -> Result<i32, SupervisorError> {
    // Our own session: the terminal's or agent's signals and hangups are
    // not ours; the agent stops containers through init.pid.
    let _ = nix::unistd::setsid();
    let rt = Runtime::new(data_dir)?;
    let spec = rt.load_spec(id)?;
    let paths = Paths::new(data_dir, id);
    let ioe = |path: PathBuf| {
        let id = id.to_string();
        move |source| SupervisorError::Io { id, path, source }
    };
    write_atomic(&paths.supervisor_pid(), std::process::id().to_string().as_bytes())
        .map_err(ioe(paths.supervisor_pid()))?;
    let log = Arc::new(Mutex::new(LogWriter::open(&paths.log(), log_max).map_err(ioe(paths.log()))?));
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| ioe(paths.dir.clone())(e.into()));
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let devnull = fs::File::open("/dev/null").map_err(ioe("/dev/null".into()))?;
    let started = rt.start(
        &spec,
        StartOptions {
            stdio: Stdio::Fds { stdin: devnull.into(), stdout: out_w, stderr: err_w },
            die_with_parent: false,
            forward_signals: true,
        },
    );
    let running = match started {
        Ok(r) => r,
        Err(e) => {
            let code = e.exit_code();
            let rec = ExitRecord {
                status: ExitStatus { code, signal: None, oom_killed: false },
                error: Some(e.to_string()),
                finished_at: now_secs(),
            };
            let json = serde_json::to_vec(&rec).unwrap_or_default();
            write_atomic(&paths.exit(), &json).map_err(ioe(paths.exit()))?;
            return Ok(code);
        }
    };
    write_atomic(&paths.init_pid(), running.pid().to_string().as_bytes()).map_err(ioe(paths.init_pid()))?;
    // The container has been cloned: threads are safe from here on.
    let copiers: Vec<_> = [out_r, err_r]
        .into_iter()
        .map(|fd| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut f = fs::File::from(fd);
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    match f.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if let Ok(mut l) = log.lock()
                                && let Err(e) = l.write(&buf[..n])
                            {
                                tracing::warn!(error = %e, "writing container log");
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    let status = running.wait_forwarding()?;
    for c in copiers {
        let _ = c.join();
    }
    let rec = ExitRecord { status, error: None, finished_at: now_secs() };
    let json = serde_json::to_vec(&rec).unwrap_or_default();
    write_atomic(&paths.exit(), &json).map_err(ioe(paths.exit()))?;
    if remove_on_exit {
        rt.remove(id)?;
    }
    Ok(status.code)
}

/// Where a supervised container is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Still running; the host pid of its init.
    Running {
        init_pid: i32,
    },
    Exited(ExitRecord),
}

/// A container run by a supervisor: spawned by us or found again.
pub struct Supervised {
    id: String,
    paths: Paths,
    supervisor_pid: i32,
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_exit(path: &Path) -> Option<ExitRecord> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Whether `pid` is alive and is the supervisor of `id` (not a reused pid).
fn is_supervisor(pid: i32, id: &str) -> bool {
    match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.iter().any(|a| *a == b"internal-supervise") && args.contains(&id.as_bytes())
        }
        Err(_) => false,
    }
}

impl Supervised {
    /// Starts `shoal internal-supervise` for a container already created
    /// with [`Runtime::create`] and waits until it has started (or failed).
    pub fn spawn(
        shoal_bin: &Path,
        data_dir: &Path,
        id: &str,
        remove_on_exit: bool,
    ) -> Result<Supervised, SupervisorError> {
        let paths = Paths::new(data_dir, id);
        let mut cmd = Command::new(shoal_bin);
        cmd.arg("internal-supervise").arg("--data-dir").arg(data_dir);
        if remove_on_exit {
            cmd.arg("--rm");
        }
        cmd.arg(id)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().map_err(|source| SupervisorError::Io {
            id: id.to_string(),
            path: shoal_bin.to_path_buf(),
            source,
        })?;
        let pid = child.id() as i32;
        let start = Instant::now();
        loop {
            if paths.init_pid().exists() {
                break;
            }
            if let Some(rec) = read_exit(&paths.exit()) {
                let _ = child.wait();
                return match rec.error {
                    Some(message) => Err(SupervisorError::Start { id: id.to_string(), code: rec.status.code, message }),
                    None => Ok(Supervised { id: id.to_string(), paths, supervisor_pid: pid }),
                };
            }
            if let Ok(Some(_)) = child.try_wait() {
                if read_exit(&paths.exit()).is_some() || paths.init_pid().exists() {
                    continue;
                }
                return Err(SupervisorError::Lost { id: id.to_string() });
            }
            if start.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SupervisorError::Timeout { id: id.to_string(), waited: start.elapsed() });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Reap the supervisor when it ends, whoever waits on the container;
        // if we exit first it is re-parented and reaped by init.
        std::thread::spawn(move || child.wait());
        Ok(Supervised { id: id.to_string(), paths, supervisor_pid: pid })
    }

    /// Finds the supervisor of `id` again (after an agent restart).
    pub fn attach(data_dir: &Path, id: &str) -> Result<Supervised, SupervisorError> {
        crate::runtime::validate_id(id)?;
        let paths = Paths::new(data_dir, id);
        if !paths.dir.is_dir() {
            return Err(SupervisorError::NotFound { id: id.to_string() });
        }
        let supervisor_pid = read_pid(&paths.supervisor_pid()).unwrap_or(0);
        Ok(Supervised { id: id.to_string(), paths, supervisor_pid })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn log_path(&self) -> PathBuf {
        self.paths.log()
    }

    /// Running or exited; `Lost` when the supervisor died without a record.
    pub fn state(&self) -> Result<State, SupervisorError> {
        if let Some(rec) = read_exit(&self.paths.exit()) {
            return Ok(State::Exited(rec));
        }
        if self.supervisor_pid > 0 && is_supervisor(self.supervisor_pid, &self.id) {
            let init_pid = read_pid(&self.paths.init_pid()).unwrap_or(0);
            return Ok(State::Running { init_pid });
        }
        // The record may have landed between the two checks.
        match read_exit(&self.paths.exit()) {
            Some(rec) => Ok(State::Exited(rec)),
            None => Err(SupervisorError::Lost { id: self.id.clone() }),
        }
    }

    /// For a container whose supervisor died without a record (killed):
    /// kills what is left of it (its init, if it is still in the
    /// container's cgroup) and records it as killed, so it can be removed.
    pub fn recover_lost(&self) -> Result<ExitRecord, SupervisorError> {
        let needle = format!("shoal/{}", self.id);
        if let Some(init) = read_pid(&self.paths.init_pid()) {
            let ours = |pid: i32| {
                fs::read_to_string(format!("/proc/{pid}/cgroup"))
                    .map(|c| c.lines().any(|l| l.ends_with(&needle)))
                    .unwrap_or(false)
            };
            if ours(init) {
                let _ = kill(Pid::from_raw(init), Signal::SIGKILL);
                let start = Instant::now();
                // init is not our child: wait for it to leave the cgroup.
                while ours(init) && start.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        // A supervisor killed while starting the container has not written
        // init.pid: kill whatever is in the container's cgroup.
        self.kill_cgroup();
        let rec = ExitRecord {
            status: ExitStatus { code: 137, signal: Some(9), oom_killed: false },
            error: Some("the supervisor died; the container was killed".into()),
            finished_at: now_secs(),
        };
        let json = serde_json::to_vec(&rec).unwrap_or_default();
        write_atomic(&self.paths.exit(), &json).map_err(|source| SupervisorError::Io {
            id: self.id.clone(),
            path: self.paths.exit(),
            source,
        })?;
        Ok(rec)
    }

    /// SIGKILLs every process in the container's cgroup until it is empty
    /// (at most 10 s).
    fn kill_cgroup(&self) {
        let Some(data_dir) = self.paths.dir.parent().and_then(Path::parent) else { return };
        let Ok(rt) = Runtime::new(data_dir) else { return };
        let paths = rt.cgroup(&self.id).paths();
        let start = Instant::now();
        loop {
            let pids: Vec<i32> = paths
                .iter()
                .filter_map(|p| fs::read_to_string(p.join("cgroup.procs")).ok())
                .flat_map(|procs| procs.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<i32>>())
                .collect();
            if pids.is_empty() || start.elapsed() > Duration::from_secs(10) {
                return;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits up to `timeout` (forever if None) for the container to exit.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<Option<ExitRecord>, SupervisorError> {
        let start = Instant::now();
        let pidfd = sys::pidfd_open(self.supervisor_pid).ok();
        loop {
            if let State::Exited(rec) = self.state()? {
                return Ok(Some(rec));
            }
            let left = match timeout {
                // One reading of the clock: it moves between two.
                Some(t) => match t.checked_sub(start.elapsed()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return Ok(None),
                },
                None => Duration::from_secs(3600),
            };
            let ms = left.as_millis().min(1000) as u16;
            match &pidfd {
                Some(fd) => {
                    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(ms));
                }
                None => std::thread::sleep(Duration::from_millis(u64::from(ms).min(20))),
            }
        }
    }

    /// Stops the container: SIGTERM to its init (which forwards it), then
    /// SIGKILL once `grace` has passed. A container whose supervisor is
    /// still starting it (its init not known yet) is waited for; if its
    /// init is still unknown after `grace` plus the start timeout, the
    /// supervisor itself is killed and the container recovered as lost.
    pub fn stop(&self, grace: Duration) -> Result<ExitRecord, SupervisorError> {
        self.stop_within(grace, START_TIMEOUT)
    }

    /// [`Supervised::stop`], giving a container that is still starting
    /// `start_timeout` (beyond `grace`) to show its init.
    pub fn stop_within(&self, grace: Duration, start_timeout: Duration) -> Result<ExitRecord, SupervisorError> {
        let start = Instant::now();
        // The grace period runs from SIGTERM, not from the call: a
        // container still starting gets all of it once its init is known.
        let mut termed_at: Option<Instant> = None;
        loop {
            match self.state()? {
                State::Exited(rec) => return Ok(rec),
                State::Running { init_pid } if init_pid > 0 && self.owns(init_pid) => match termed_at {
                    None => {
                        let _ = kill(Pid::from_raw(init_pid), Signal::SIGTERM);
                        termed_at = Some(Instant::now());
                    }
                    Some(t) if t.elapsed() >= grace => {
                        let _ = kill(Pid::from_raw(init_pid), Signal::SIGKILL);
                    }
                    Some(_) => {}
                },
                State::Running { .. } if termed_at.is_none() && start.elapsed() >= grace + start_timeout => {
                    let _ = kill(Pid::from_raw(self.supervisor_pid), Signal::SIGKILL);
                    return Err(SupervisorError::Lost { id: self.id.clone() });
                }
                State::Running { .. } => {}
            }
            let step = termed_at.map_or(Duration::ZERO, |t| grace.saturating_sub(t.elapsed()));
            if let Some(rec) = self.wait(Some(step.clamp(Duration::from_millis(20), Duration::from_millis(500))))? {
                return Ok(rec);
            }
        }
    }

    /// Whether `init_pid` is still our container's init (its parent is our
    /// supervisor), so we never signal a reused pid.
    fn owns(&self, init_pid: i32) -> bool {
        let Ok(stat) = fs::read_to_string(format!("/proc/{init_pid}/stat")) else { return false };
        // Field 4 (ppid) follows the parenthesised command name.
        stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|p| p.parse::<i32>().ok())
            == Some(self.supervisor_pid)
    }

    /// Every container directory under `data_dir` (for reattach on start).
    pub fn list(data_dir: &Path) -> Vec<String> {
        let mut ids: Vec<String> = fs::read_dir(data_dir.join("containers"))
            .map(|rd| rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn log_rotates_at_size() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("container.log");
        let mut w = LogWriter::open(&p, 10).unwrap();
        w.write(b"12345678").unwrap();
        w.write(b"abcdef").unwrap();
        assert_eq!(fs::read(t.path().join("container.log.1")).unwrap(), b"12345678");
        assert_eq!(fs::read(&p).unwrap(), b"abcdef");
    }
}
