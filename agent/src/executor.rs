//! The seam between the agent and what runs its tasks (swarmkit's
//! `exec.Controller`): prepare, start, wait, shutdown, remove.
//! [`LinuxExecutor`] runs real containers, each under its own supervisor
//! process, so they outlive an agent restart; [`SimExecutor`] runs none,
//! for scale tests and deterministic cluster tests.
//!
//! The trait is synchronous: the agent calls it from blocking threads
//! (`spawn_blocking`). Nothing here forks the agent itself: the Linux
//! executor re-executes the `shoal` binary for every container, because the
//! runtime must start containers from a single-threaded process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::image::{ImageError, ImageStore};
use crate::runtime::{ExitStatus, Runtime, RuntimeError};
use crate::spec::{RunRequest, SpecError};
use crate::supervisor::{State, Supervised, SupervisorError};

/// Errors of an executor, classified so the agent knows whether to retry.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error("no such container: {id}")]
    NotFound { id: String },
    #[error("container {id} is {state}, cannot {action}")]
    InvalidState { id: String, state: &'static str, action: &'static str },
    #[error("simulated failure of container {id}")]
    Simulated { id: String },
}

impl ExecutorError {
    /// A temporary error may go away on retry (a busy cgroup, a full disk);
    /// a fatal one won't (a missing image, a bad archive, a bad command).
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            ExecutorError::Image(ImageError::Io { .. })
                | ExecutorError::Runtime(RuntimeError::Io { .. } | RuntimeError::Cgroup(_))
                | ExecutorError::Supervisor(SupervisorError::Io { .. } | SupervisorError::Timeout { .. })
        )
    }
}

/// What a container is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    /// Prepared (rootfs, spec) but not started.
    Created,
    Running,
    Exited(ExitStatus),
}

/// The executor of one node.
pub trait Executor: Send + Sync {
    /// Resolves the image and creates the container (not started).
    fn prepare(&self, req: &RunRequest) -> Result<(), ExecutorError>;
    /// Starts a prepared container; returns once it runs.
    fn start(&self, id: &str) -> Result<(), ExecutorError>;
    fn state(&self, id: &str) -> Result<ContainerState, ExecutorError>;
    /// Waits up to `timeout` (forever if None) for the container to exit.
    fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<Option<ExitStatus>, ExecutorError>;
    /// SIGTERM, then SIGKILL after `grace`.
    fn shutdown(&self, id: &str, grace: Duration) -> Result<ExitStatus, ExecutorError>;
    /// Removes an exited or never-started container and all it holds.
    fn remove(&self, id: &str) -> Result<(), ExecutorError>;
    /// Every container this node holds, e.g. to reattach after a restart.
    fn list(&self) -> Result<Vec<String>, ExecutorError>;
    /// CPU time the container has used so far, in nanoseconds; None where
    /// it is not accounted (or the container is gone).
    fn cpu_usage_ns(&self, _id: &str) -> Option<u64> {
        None
    }
}

/// Real containers through the runtime and per-container supervisors.
pub struct LinuxExecutor {
    data_dir: PathBuf,
    shoal_bin: PathBuf,
    images: ImageStore,
    runtime: Runtime,
}

impl LinuxExecutor {
    /// `shoal_bin` is re-executed as `shoal internal-supervise`.
    pub fn new(data_dir: &Path, shoal_bin: &Path) -> Result<Self, ExecutorError> {
        Ok(LinuxExecutor {
            data_dir: data_dir.to_path_buf(),
            shoal_bin: shoal_bin.to_path_buf(),
            images: ImageStore::open(data_dir)?,
            runtime: Runtime::new(data_dir)?,
        })
    }

    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// The same executor with these image size limits.
    pub fn with_image_limits(self, limits: crate::image::SizeLimits) -> Self {
        LinuxExecutor { images: self.images.with_limits(limits), ..self }
    }

    fn supervised(&self, id: &str) -> Result<Option<Supervised>, ExecutorError> {
        let dir = self.runtime.container_dir(id);
        if !dir.is_dir() {
            return Err(ExecutorError::NotFound { id: id.to_string() });
        }
        if !dir.join("supervisor.pid").exists() && !dir.join("exit.json").exists() {
            return Ok(None);
        }
        Ok(Some(Supervised::attach(&self.data_dir, id)?))
    }
}

impl Executor for LinuxExecutor {
    fn prepare(&self, req: &RunRequest) -> Result<(), ExecutorError> {
        let image = self.images.resolve(&req.image)?;
        let spec = req.to_spec(&image)?;
        self.runtime.create(&spec)?;
        Ok(())
    }

    fn start(&self, id: &str) -> Result<(), ExecutorError> {
        if self.supervised(id)?.is_some() {
            return Err(ExecutorError::InvalidState { id: id.into(), state: "started", action: "start" });
        }
        Supervised::spawn(&self.shoal_bin, &self.data_dir, id, false)?;
        Ok(())
    }

    fn state(&self, id: &str) -> Result<ContainerState, ExecutorError> {
        match self.supervised(id)? {
            None => Ok(ContainerState::Created),
            Some(s) => match s.state() {
                Ok(State::Running { .. }) => Ok(ContainerState::Running),
                Ok(State::Exited(rec)) => Ok(ContainerState::Exited(rec.status)),
                // Its supervisor was killed: the container can't be
                // followed any more; end it and report it killed.
                Err(SupervisorError::Lost { .. }) => Ok(ContainerState::Exited(s.recover_lost()?.status)),
                Err(e) => Err(e.into()),
            },
        }
    }

    fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<Option<ExitStatus>, ExecutorError> {
        match self.supervised(id)? {
            None => Err(ExecutorError::InvalidState { id: id.into(), state: "created", action: "wait" }),
            Some(s) => match s.wait(timeout) {
                Err(SupervisorError::Lost { .. }) => Ok(Some(s.recover_lost()?.status)),
                r => Ok(r?.map(|r| r.status)),
            },
        }
    }

    fn shutdown(&self, id: &str, grace: Duration) -> Result<ExitStatus, ExecutorError> {
        match self.supervised(id)? {
            None => Err(ExecutorError::InvalidState { id: id.into(), state: "created", action: "shut down" }),
            Some(s) => match s.stop(grace) {
                Err(SupervisorError::Lost { .. }) => Ok(s.recover_lost()?.status),
                r => Ok(r?.status),
            },
        }
    }

    fn remove(&self, id: &str) -> Result<(), ExecutorError> {
        if let ContainerState::Running = self.state(id)? {
            return Err(ExecutorError::InvalidState { id: id.into(), state: "running", action: "remove" });
        }
        self.runtime.remove(id)?;
        Ok(())
    }

    fn list(&self) -> Result<Vec<String>, ExecutorError> {
        Ok(Supervised::list(&self.data_dir))
    }

    fn cpu_usage_ns(&self, id: &str) -> Option<u64> {
        self.runtime.cpu_usage_ns(id).ok().flatten()
    }
}

/// How a simulated container behaves, chosen by its command: `exit CODE`
/// exits at once with CODE, `fail` fails to start, anything else runs until
/// shut down.
#[derive(Debug, Clone)]
struct SimContainer {
    command: Vec<String>,
    state: ContainerState,
    started: Option<Instant>,
}

/// An executor with no containers: state in memory, no syscalls. Thousands
/// of these run in one test process.
#[derive(Default)]
pub struct SimExecutor {
    containers: Mutex<HashMap<String, SimContainer>>,
    changed: Condvar,
}

impl SimExecutor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes a running container exit with `code` (a crash, an OOM kill).
    pub fn exit(&self, id: &str, code: i32) -> Result<(), ExecutorError> {
        let mut m = self.lock();
        let c = m.get_mut(id).ok_or_else(|| ExecutorError::NotFound { id: id.into() })?;
        c.state = ContainerState::Exited(ExitStatus { code, signal: None, oom_killed: false });
        self.changed.notify_all();
        Ok(())
    }

    /// How many containers are running.
    pub fn running(&self) -> usize {
        self.lock().values().filter(|c| c.state == ContainerState::Running).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SimContainer>> {
        // A panic while holding the lock leaves plain data; keep going.
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Executor for SimExecutor {
    fn prepare(&self, req: &RunRequest) -> Result<(), ExecutorError> {
        crate::runtime::validate_id(&req.id)?;
        let mut m = self.lock();
        if m.contains_key(&req.id) {
            return Err(RuntimeError::Exists { id: req.id.clone() }.into());
        }
        m.insert(
            req.id.clone(),
            SimContainer { command: req.command.clone(), state: ContainerState::Created, started: None },
        );
        Ok(())
    }

    fn start(&self, id: &str) -> Result<(), ExecutorError> {
        let mut m = self.lock();
        let c = m.get_mut(id).ok_or_else(|| ExecutorError::NotFound { id: id.into() })?;
        if c.state != ContainerState::Created {
            return Err(ExecutorError::InvalidState { id: id.into(), state: "started", action: "start" });
        }
        match c.command.first().map(String::as_str) {
            Some("fail") => return Err(ExecutorError::Simulated { id: id.into() }),
            Some("exit") => {
                let code = c.command.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                c.state = ContainerState::Exited(ExitStatus { code, signal: None, oom_killed: false });
            }
            _ => c.state = ContainerState::Running,
        }
        c.started = Some(Instant::now());
        self.changed.notify_all();
        Ok(())
    }

    fn state(&self, id: &str) -> Result<ContainerState, ExecutorError> {
        self.lock().get(id).map(|c| c.state.clone()).ok_or_else(|| ExecutorError::NotFound { id: id.into() })
    }

    fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<Option<ExitStatus>, ExecutorError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut m = self.lock();
        loop {
            match m.get(id).map(|c| c.state.clone()) {
                None => return Err(ExecutorError::NotFound { id: id.into() }),
                Some(ContainerState::Exited(s)) => return Ok(Some(s)),
                Some(ContainerState::Created) => {
                    return Err(ExecutorError::InvalidState { id: id.into(), state: "created", action: "wait" });
                }
                Some(ContainerState::Running) => {}
            }
            m = match deadline {
                None => self.changed.wait(m).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(None);
                    }
                    self.changed.wait_timeout(m, d - now).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
    }

    fn shutdown(&self, id: &str, _grace: Duration) -> Result<ExitStatus, ExecutorError> {
        let mut m = self.lock();
        let c = m.get_mut(id).ok_or_else(|| ExecutorError::NotFound { id: id.into() })?;
        let status = match &c.state {
            ContainerState::Exited(s) => *s,
            _ => ExitStatus { code: 143, signal: Some(15), oom_killed: false },
        };
        c.state = ContainerState::Exited(status);
        self.changed.notify_all();
        Ok(status)
    }

    fn remove(&self, id: &str) -> Result<(), ExecutorError> {
        let mut m = self.lock();
        if let Some(ContainerState::Running) = m.get(id).map(|c| c.state.clone()) {
            return Err(ExecutorError::InvalidState { id: id.into(), state: "running", action: "remove" });
        }
        m.remove(id);
        Ok(())
    }

    fn list(&self) -> Result<Vec<String>, ExecutorError> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req(id: &str, cmd: &[&str]) -> RunRequest {
        RunRequest {
            id: id.into(),
            image: "sim".into(),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn sim_lifecycle() {
        let e = SimExecutor::new();
        e.prepare(&req("a", &["serve"])).unwrap();
        assert_eq!(e.state("a").unwrap(), ContainerState::Created);
        e.start("a").unwrap();
        assert_eq!(e.running(), 1);
        assert_eq!(e.wait("a", Some(Duration::from_millis(1))).unwrap(), None);
        assert!(e.remove("a").is_err());
        let s = e.shutdown("a", Duration::from_secs(1)).unwrap();
        assert_eq!(s.code, 143);
        e.remove("a").unwrap();
        assert!(matches!(e.state("a"), Err(ExecutorError::NotFound { .. })));
    }

    #[test]
    fn sim_exit_and_failures() {
        let e = SimExecutor::new();
        e.prepare(&req("x", &["exit", "3"])).unwrap();
        e.start("x").unwrap();
        assert_eq!(e.wait("x", None).unwrap().unwrap().code, 3);
        e.prepare(&req("f", &["fail"])).unwrap();
        assert!(e.start("f").is_err());
        assert!(e.prepare(&req("x", &[])).is_err(), "duplicate id");
        e.prepare(&req("c", &["serve"])).unwrap();
        e.start("c").unwrap();
        e.exit("c", 137).unwrap();
        assert_eq!(e.wait("c", None).unwrap().unwrap().code, 137);
    }

    #[test]
    fn sim_scales_to_thousands() {
        let e = SimExecutor::new();
        for i in 0..5000 {
            let id = format!("t{i}");
            e.prepare(&req(&id, &["serve"])).unwrap();
            e.start(&id).unwrap();
        }
        assert_eq!(e.running(), 5000);
        assert_eq!(e.list().unwrap().len(), 5000);
    }

    #[test]
    fn errors_are_classified() {
        assert!(!ExecutorError::NotFound { id: "x".into() }.is_temporary());
        assert!(!ExecutorError::Image(ImageError::NotFound("x".into())).is_temporary());
        let io = ImageError::Io { path: "/x".into(), source: std::io::Error::other("disk full") };
        assert!(ExecutorError::Image(io).is_temporary());
    }
}
