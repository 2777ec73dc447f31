//! The Linux container runtime: namespaces, overlayfs rootfs, pivot_root,
//! minimal /dev and /proc, cgroups, least privilege, and the minimal init
//! that runs as the container's pid 1.
//!
//! A container is started by [`Runtime::start`] from a single-threaded
//! process (`shoal run` or the per-container supervisor): it clones a child
//! into new pid, mount, uts, ipc and network namespaces. The child mounts
//! the rootfs inside its own mount namespace (so no mount of it ever exists
//! on the host, and nothing is left behind if it dies), pivots into it,
//! waits until the parent has put it into the container's cgroup, and then
//! becomes init: it forks the workload, which drops privileges and execs.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::stat::{Mode, SFlag, makedev, mknod, umask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Gid, Pid, Uid};

use crate::cgroup::{self, Cgroup, CgroupBackend, CgroupError};
use crate::security::{self, Policy, SecurityError};
use crate::paths::{resolve_in_root, DEFAULT_PATH};
use crate::spec::{ContainerSpec, Mount};
use crate::sys::{self, Forked};

/// Errors of the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("container runtime must be started from a single-threaded process")]
    MultiThreaded,
    #[error("invalid container id {0:?}: use 1-64 of [A-Za-z0-9_.-], not starting with . or -")]
    InvalidId(String),
    #[error("container {id} already exists")]
    Exists { id: String },
    #[error("container {id}: no command to run (the image has no Cmd or Entrypoint)")]
    NoCommand { id: String },
    #[error("container {id}: {path}: {source}")]
    Io { id: String, path: PathBuf, source: io::Error },
    #[error("container {id}: {step}: {source}")]
    Sys { id: String, step: &'static str, source: nix::Error },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Security(#[from] SecurityError),
    #[error("container {id} failed to start: {message}")]
    Start { id: String, code: i32, message: String },
}

impl RuntimeError {
    /// The exit code `shoal run` reports for this error, as Docker does:
    /// 126 command cannot be invoked, 127 command not found, 125 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            RuntimeError::Start { code, .. } => *code,
            _ => 125,
        }
    }
}

/// How a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitStatus {
    /// The exit code, 128+N when killed by signal N (as a shell reports it).
    pub code: i32,
    /// The signal that killed the container's init, if any.
    pub signal: Option<i32>,
    /// The memory limit killed a process of the container.
    pub oom_killed: bool,
}

/// Where the container's stdio goes.
pub enum Stdio {
    /// The caller's own stdin/stdout/stderr (`shoal run` in the foreground).
    Inherit,
    /// Given descriptors (the supervisor's log pipes).
    Fds { stdin: OwnedFd, stdout: OwnedFd, stderr: OwnedFd },
}

/// Options for one start.
pub struct StartOptions {
    pub stdio: Stdio,
    /// Kill the container when the starting process dies (foreground
    /// `shoal run`); a supervisor leaves this off.
    pub die_with_parent: bool,
    /// Block the signals [`Running::wait_forwarding`] forwards before the
    /// clone, so none is lost between start and wait.
    pub forward_signals: bool,
}

/// Signals a waiting `shoal run` or supervisor passes on to the container.
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

fn forwarded_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// The runtime of one host: the data dir and the cgroup backend.
pub struct Runtime {
    data_dir: PathBuf,
    cgroups: Box<dyn CgroupBackend>,
}

/// The cgroup parent of every container (`/sys/fs/cgroup/<ctl>/shoal/<id>`).
pub const CGROUP_PARENT: &str = "shoal";

/// Clone flags: a new pid, mount, uts, ipc and network namespace.
const NAMESPACES: libc::c_int =
    libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET;

impl Runtime {
    /// Opens the runtime with the host's cgroup hierarchy.
    pub fn new(data_dir: &Path) -> Result<Self, RuntimeError> {
        let cgroups = cgroup::detect(Path::new("/sys/fs/cgroup"), CGROUP_PARENT)?;
        Ok(Self::with_cgroups(data_dir, cgroups))
    }

    /// Opens the runtime with a given cgroup backend.
    pub fn with_cgroups(data_dir: &Path, cgroups: Box<dyn CgroupBackend>) -> Self {
        Runtime { data_dir: data_dir.to_path_buf(), cgroups }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn cgroup_version(&self) -> &'static str {
        self.cgroups.version()
    }

    /// CPU time container `id` has used so far, in nanoseconds.
    pub fn cpu_usage_ns(&self, id: &str) -> Result<Option<u64>, CgroupError> {
        self.cgroups.open(id).cpu_usage_ns()
    }

    /// The directory that holds a container's state, upper dir and logs.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("containers").join(id)
    }

    /// Makes the container's directory and writes its spec there.
    pub fn create(&self, spec: &ContainerSpec) -> Result<PathBuf, RuntimeError> {
        validate_id(&spec.id)?;
        if spec.args.is_empty() {
            return Err(RuntimeError::NoCommand { id: spec.id.clone() });
        }
        let dir = self.container_dir(&spec.id);
        let ioe = |path: &Path| {
            let id = spec.id.clone();
            let path = path.to_path_buf();
            move |source| RuntimeError::Io { id, path, source }
        };
        let parent = self.data_dir.join("containers");
        fs::create_dir_all(&parent).map_err(ioe(&parent))?;
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::Exists { id: spec.id.clone() });
            }
            Err(e) => return Err(ioe(&dir)(e)),
        }
        for sub in ["upper", "work", "rootfs"] {
            let p = dir.join(sub);
            fs::DirBuilder::new().mode(0o755).create(&p).map_err(ioe(&p))?;
        }
        let cfg = dir.join("config.json");
        let json = serde_json::to_vec_pretty(spec).map_err(|e| ioe(&cfg)(io::Error::other(e)))?;
        fs::write(&cfg, json).map_err(ioe(&cfg))?;
        Ok(dir)
    }

    /// Reads back the spec that `create` wrote.
    pub fn load_spec(&self, id: &str) -> Result<ContainerSpec, RuntimeError> {
        validate_id(id)?;
        let cfg = self.container_dir(id).join("config.json");
        let ioe = |source| RuntimeError::Io { id: id.to_string(), path: cfg.clone(), source };
        let bytes = fs::read(&cfg).map_err(ioe)?;
        serde_json::from_slice(&bytes).map_err(|e| ioe(io::Error::other(e)))
    }

    /// Marks the container as run in the foreground by this process
    /// (`shoal run` without a supervisor), so [`Runtime::reap_orphans`] can
    /// clean up after it if it is killed.
    /// `remove`: whether the container is to be removed when it exits.
    pub fn mark_foreground(&self, id: &str, remove: bool) -> Result<(), RuntimeError> {
        let p = self.container_dir(id).join("run.pid");
        fs::write(&p, format!("{} {}", std::process::id(), if remove { "rm" } else { "keep" }))
            .map_err(|source| RuntimeError::Io { id: id.to_string(), path: p, source })
    }

    /// Removes foreground containers whose `shoal run` died without
    /// cleaning up (SIGKILL): their init died with it (parent-death signal),
    /// but the directory (with `--rm`) and cgroup remain. Returns the ids
    /// cleaned up.
    pub fn reap_orphans(&self) -> Vec<String> {
        let mut removed = Vec::new();
        let Ok(rd) = fs::read_dir(self.data_dir.join("containers")) else { return removed };
        for e in rd.flatten() {
            let Some(id) = e.file_name().to_str().map(str::to_string) else { continue };
            let Ok(mark) = fs::read_to_string(e.path().join("run.pid")) else { continue };
            let (pid, how) = mark.trim().split_once(' ').unwrap_or((mark.trim(), "rm"));
            // Alive and still a `shoal run` naming this container: not orphaned.
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let alive = !cmdline.is_empty() && cmdline.split(|b| *b == 0).any(|a| a == b"run");
            if alive || validate_id(&id).is_err() {
                continue;
            }
            // Init may still be exiting: its cgroup must be empty first.
            let busy = self
                .cgroups
                .open(&id)
                .paths()
                .iter()
                .any(|p| fs::read_to_string(p.join("cgroup.procs")).map(|s| !s.trim().is_empty()).unwrap_or(false));
            if busy {
                continue;
            }
            let done = if how == "rm" {
                self.remove(&id).is_ok()
            } else {
                self.cgroups.open(&id).destroy().is_ok() && fs::remove_file(e.path().join("run.pid")).is_ok()
            };
            if done {
                tracing::info!(container = %id, "cleaned up after a killed shoal run");
                removed.push(id);
            }
        }
        removed
    }

    /// Removes everything `create` and `start` made for the container: its
    /// cgroup (if a crash left one) and its directory with the upper dir.
    pub fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        validate_id(id)?;
        self.cgroups.open(id).destroy()?;
        let dir = self.container_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RuntimeError::Io { id: id.to_string(), path: dir, source }),
        }
    }

    /// Starts the container created with `create`. The caller must be
    /// single-threaded. Returns once the workload has exec'd (or failed to).
    pub fn start(&self, spec: &ContainerSpec, opts: StartOptions) -> Result<Running, RuntimeError> {
        if !sys::single_threaded() {
            return Err(RuntimeError::MultiThreaded);
        }
        let id = spec.id.clone();
        let sys_err = |step: &'static str| {
            let id = id.clone();
            move |source| RuntimeError::Sys { id, step, source }
        };
        let dir = self.container_dir(&spec.id);
        // Built before the clone so the child only has to install it.
        let policy = security::Policy::new(&spec.security)?;
        let userns = match spec.userns {
            Some(map) => Some(crate::userns::create(map).map_err(|e| RuntimeError::Io {
                id: spec.id.clone(),
                path: PathBuf::from("/proc/self/ns/user"),
                source: e,
            })?),
            None => None,
        };
        let cgroup = self.cgroups.create(&spec.id, &spec.limits)?;
        let cgroup = CgroupGuard(Some(cgroup));
        if opts.forward_signals {
            forwarded_set().thread_block().map_err(sys_err("block signals"))?;
        }
        let (sync_r, sync_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys_err("pipe"))?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys_err("pipe"))?;

        // A container on overlay networks joins the namespace the overlay
        // wired for it; others get a new one of their own.
        let (flags, netns) = match &spec.netns {
            Some(path) => {
                let f = fs::File::open(path).map_err(|e| sys_err("open netns")(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))))?;
                (NAMESPACES & !libc::CLONE_NEWNET, Some(f))
            }
            None => (NAMESPACES, None),
        };
        match sys::clone_fork(flags)
            .map_err(|e| sys_err("clone")(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))))?
        {
            Forked::Child => {
                drop(sync_w);
                drop(err_r);
                if let Some(ns) = &netns
                    && let Err(e) = nix::sched::setns(std::os::fd::AsFd::as_fd(ns), CloneFlags::CLONE_NEWNET)
                {
                    let mut w = fs::File::from(err_w);
                    let _ = write!(w, "125\tjoining the task's network namespace: {e}");
                    sys::exit_now(125);
                }
                let child = Child {
                    spec,
                    dir: &dir,
                    policy: &policy,
                    userns: userns.as_ref(),
                    sync: sync_r,
                    err: std::cell::Cell::new(Some(err_w)),
                    no_devices: !cgroup.get().is_some_and(|g| g.limits_devices()),
                };
                child.run(opts)
            }
            Forked::Parent(pid) => {
                drop(sync_r);
                drop(err_w);
                let pid_t = Pid::from_raw(pid);
                let joined = cgroup.0.as_deref().map_or(Ok(()), |g| g.add_process(pid));
                if let Err(e) = joined {
                    let _ = kill(pid_t, Signal::SIGKILL);
                    let _ = waitpid(pid_t, None);
                    return Err(e.into());
                }
                let mut sync_w = fs::File::from(sync_w);
                let _ = sync_w.write_all(b"1");
                drop(sync_w);
                // The write end closes in the workload on exec (CLOEXEC) and
                // in init right after fork: EOF means the workload is running.
                let mut msg = String::new();
                let _ = fs::File::from(err_r).read_to_string(&mut msg);
                if !msg.is_empty() {
                    let (code, message) = match msg.split_once('\t') {
                        Some((c, m)) => (c.parse().unwrap_or(125), m.to_string()),
                        None => (125, msg),
                    };
                    let _ = kill(pid_t, Signal::SIGKILL);
                    let _ = waitpid(pid_t, None);
                    return Err(RuntimeError::Start { id: spec.id.clone(), code, message });
                }
                Ok(Running { id: spec.id.clone(), pid, cgroup })
            }
        }
    }

    /// The cgroup of a container (to check OOM or clean up after a crash).
    pub fn cgroup(&self, id: &str) -> Box<dyn Cgroup> {
        self.cgroups.open(id)
    }

    /// Runs `args` in running container `id` (whose init is `init_pid`) the
    /// way its workload runs: charged to its cgroup, in its namespaces and
    /// root, as its user, with Docker's capabilities, no_new_privs and
    /// seccomp. Stdio is inherited. Must be called from a single-threaded
    /// process (`shoal internal-exec`): it changes this process's
    /// namespaces and root, then forks into the container's pid namespace.
    pub fn exec(&self, id: &str, init_pid: i32, args: &[String]) -> Result<ExitStatus, RuntimeError> {
        validate_id(id)?;
        if args.is_empty() {
            return Err(RuntimeError::NoCommand { id: id.to_string() });
        }
        if !sys::single_threaded() {
            return Err(RuntimeError::MultiThreaded);
        }
        let mut spec = self.load_spec(id)?;
        spec.args = args.to_vec();
        let policy = security::Policy::new(&spec.security)?;
        let proc_dir = PathBuf::from(format!("/proc/{init_pid}"));
        let io = |what: &str, e: io::Error| RuntimeError::Io { id: id.to_string(), path: proc_dir.join(what), source: e };
        let sys_err = |step: &'static str| move |source: nix::Error| RuntimeError::Sys { id: id.to_string(), step, source };
        // Open everything first: once in the mount namespace, /proc/<pid>
        // of the host is out of reach.
        let root = fs::File::open(proc_dir.join("root")).map_err(|e| io("root", e))?;
        let userns = match spec.userns {
            Some(_) => Some(OwnedFd::from(fs::File::open(proc_dir.join("ns/user")).map_err(|e| io("ns/user", e))?)),
            None => None,
        };
        let mut namespaces = Vec::new();
        for (name, flag) in [
            ("ipc", CloneFlags::CLONE_NEWIPC),
            ("uts", CloneFlags::CLONE_NEWUTS),
            ("net", CloneFlags::CLONE_NEWNET),
            ("pid", CloneFlags::CLONE_NEWPID),
            ("mnt", CloneFlags::CLONE_NEWNS),
        ] {
            let f = fs::File::open(proc_dir.join("ns").join(name)).map_err(|e| io(name, e))?;
            namespaces.push((name, f, flag));
        }
        // The pid was read from a file: make sure, now that its files are
        // open, that it is still this container's (not a reused pid).
        let needle = format!("shoal/{id}");
        let ours = fs::read_to_string(proc_dir.join("cgroup")).is_ok_and(|c| c.lines().any(|l| l.ends_with(&needle)));
        if !ours {
            return Err(io("cgroup", io::Error::new(io::ErrorKind::NotFound, "the container's init has exited")));
        }
        self.cgroups.open(id).add_process(std::process::id() as i32)?;
        for (name, f, flag) in &namespaces {
            nix::sched::setns(f, *flag).map_err(|e| io(&format!("ns/{name}"), e.into()))?;
        }
        nix::unistd::fchdir(&root).map_err(sys_err("enter the container's root"))?;
        nix::unistd::chroot(".").map_err(sys_err("enter the container's root"))?;
        if let Some(ns) = &userns {
            crate::userns::enter(ns).map_err(sys_err("join the container's user namespace"))?;
        }
        match sys::fork().map_err(|e| io("fork", e))? {
            Forked::Child => {
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
                let e = match exec_as_workload(&spec, &policy) {
                    Ok(never) => match never {},
                    Err(e) => e,
                };
                let _ = writeln!(io::stderr(), "shoal exec: {}", e.message);
                sys::exit_now(e.code)
            }
            Forked::Parent(pid) => loop {
                match waitpid(Pid::from_raw(pid), None) {
                    Ok(WaitStatus::Exited(_, c)) => return Ok(ExitStatus { code: c, signal: None, oom_killed: false }),
                    Ok(WaitStatus::Signaled(_, sig, _)) => {
                        return Ok(ExitStatus { code: 128 + sig as i32, signal: Some(sig as i32), oom_killed: false });
                    }
                    Ok(_) | Err(nix::Error::EINTR) => continue,
                    Err(e) => return Err(sys_err("wait for the command")(e)),
                }
            },
        }
    }
}

/// Destroys the cgroup unless the container took it over.
struct CgroupGuard(Option<Box<dyn Cgroup>>);

impl CgroupGuard {
    fn get(&self) -> Option<&dyn Cgroup> {
        self.0.as_deref()
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(g) = self.0.take()
            && let Err(e) = g.destroy()
        {
            tracing::warn!(error = %e, "removing cgroup");
        }
    }
}

/// A started container whose init is a child of this process.
pub struct Running {
    id: String,
    pid: i32,
    cgroup: CgroupGuard,
}

impl Running {
    /// The host pid of the container's init.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Non-blocking: the exit status if init has exited (then the cgroup is
    /// removed).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, RuntimeError> {
        let st = waitpid(Pid::from_raw(self.pid), Some(WaitPidFlag::WNOHANG)).map_err(|source| RuntimeError::Sys {
            id: self.id.clone(),
            step: "waitpid",
            source,
        })?;
        self.finish(st)
    }

    /// Blocks until init exits; then removes the cgroup.
    pub fn wait(mut self) -> Result<ExitStatus, RuntimeError> {
        loop {
            let st = match waitpid(Pid::from_raw(self.pid), None) {
                Err(nix::Error::EINTR) => continue,
                r => r.map_err(|source| RuntimeError::Sys { id: self.id.clone(), step: "waitpid", source })?,
            };
            if let Some(s) = self.finish(st)? {
                return Ok(s);
            }
        }
    }

    fn finish(&mut self, st: WaitStatus) -> Result<Option<ExitStatus>, RuntimeError> {
        let (code, signal) = match st {
            WaitStatus::Exited(_, c) => (c, None),
            WaitStatus::Signaled(_, s, _) => (128 + s as i32, Some(s as i32)),
            _ => return Ok(None),
        };
        let oom_killed = self.cgroup.get().is_some_and(|g| g.oom_killed().unwrap_or(false));
        if let Some(g) = self.cgroup.0.take() {
            g.destroy()?;
        }
        Ok(Some(ExitStatus { code, signal, oom_killed }))
    }

    /// Blocks until init exits, passing [`FORWARDED`] signals on to it.
    /// Needs `forward_signals` at start.
    pub fn wait_forwarding(mut self) -> Result<ExitStatus, RuntimeError> {
        let set = forwarded_set();
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(st);
            }
            let sig =
                set.wait().map_err(|source| RuntimeError::Sys { id: self.id.clone(), step: "sigwait", source })?;
            if sig != Signal::SIGCHLD {
                let _ = self.signal(sig);
            }
        }
    }

    /// Sends `sig` to the container's init, which forwards it.
    pub fn signal(&self, sig: Signal) -> Result<(), RuntimeError> {
        kill(Pid::from_raw(self.pid), sig).map_err(|source| RuntimeError::Sys {
            id: self.id.clone(),
            step: "kill",
            source,
        })
    }
}

/// Checks a container id: it becomes a path component and a cgroup name.
pub fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with(['.', '-'])
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok { Ok(()) } else { Err(RuntimeError::InvalidId(id.to_string())) }
}

/// A setup step that failed inside the container, sent to the parent as
/// "CODE\tmessage" over the error pipe.
struct ChildError {
    code: i32,
    message: String,
}

impl ChildError {
    fn new(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Self {
        ChildError { code: 125, message: format!("{what}: {e}") }
    }
}

type ChildResult<T> = Result<T, ChildError>;

trait Ctx<T> {
    fn ctx(self, what: impl std::fmt::Display) -> ChildResult<T>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: impl std::fmt::Display) -> ChildResult<T> {
        self.map_err(|e| ChildError::new(what, e))
    }
}

/// The cloned child: pid 1 of the new namespaces.
struct Child<'a> {
    spec: &'a ContainerSpec,
    dir: &'a Path,
    policy: &'a Policy,
    /// The user namespace to join last (`--userns-remap`).
    userns: Option<&'a OwnedFd>,
    sync: OwnedFd,
    err: std::cell::Cell<Option<OwnedFd>>,
    /// No devices cgroup (cgroup v2): CAP_MKNOD could make a node for a
    /// host disk, so every writable mount but /dev gets `nodev` and /dev
    /// is made read-only once its nodes exist.
    no_devices: bool,
}

impl Child<'_> {
    fn run(self, opts: StartOptions) -> ! {
        let code = match self.setup(opts) {
            Ok(never) => match never {},
            Err(e) => {
                if let Some(fd) = self.err.take() {
                    let mut f = fs::File::from(fd);
                    let _ = write!(f, "{}\t{}", e.code, e.message);
                }
                e.code
            }
        };
        sys::exit_now(code)
    }

    fn setup(&self, opts: StartOptions) -> ChildResult<std::convert::Infallible> {
        if opts.die_with_parent {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).ctx("set parent-death signal")?;
        }
        match opts.stdio {
            Stdio::Inherit => {}
            Stdio::Fds { stdin, stdout, stderr } => {
                nix::unistd::dup2_stdin(&stdin).ctx("stdin")?;
                nix::unistd::dup2_stdout(&stdout).ctx("stdout")?;
                nix::unistd::dup2_stderr(&stderr).ctx("stderr")?;
            }
        }
        if self.userns.is_some() {
            // The network namespace stays the host user namespace's: let
            // container root bind low ports and ping in it anyway.
            for (k, v) in [("ip_unprivileged_port_start", "0"), ("ping_group_range", "0 2147483647")] {
                fs::write(format!("/proc/sys/net/ipv4/{k}"), v).ctx(format!("set net.ipv4.{k} for the remapped container"))?;
            }
        }
        umask(Mode::empty());
        let root = self.dir.join("rootfs");
        self.mount_rootfs(&root)?;
        pivot(&root)?;
        mask_proc_and_sys()?;
        nix::unistd::sethostname(&self.spec.hostname).ctx("sethostname")?;
        umask(Mode::from_bits_truncate(0o022));
        // Wait until the parent has put us into the cgroup: everything the
        // workload does must be charged to it.
        let mut b = [0u8; 1];
        let _ = fs::File::from(self.sync.try_clone().ctx("sync pipe")?).read(&mut b);
        if let Some(ns) = self.userns {
            crate::userns::enter(ns).ctx("join the container's user namespace")?;
        }
        if !self.spec.init {
            return self.exec_workload();
        }
        let all = SigSet::all();
        all.thread_block().ctx("block signals")?;
        match sys::fork().ctx("fork workload")? {
            Forked::Child => self.exec_workload(),
            Forked::Parent(pid) => {
                // Our copy of the error pipe must close, or the parent would
                // wait for EOF until the workload exits.
                drop(self.err.take());
                init_loop(pid, self.policy)
            }
        }
    }

    fn mount_rootfs(&self, root: &Path) -> ChildResult<()> {
        // Nothing we mount may propagate back to the host.
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
            .ctx("make / private")?;
        // Not `volatile`: it saves the sync of the upper filesystem at
        // unmount, but measured slower here under load (the unmount is then
        // deferred and the removal of the upper dir waits for it).
        let mut lower: Vec<String> = self.spec.layers.iter().rev().map(|p| p.display().to_string()).collect();
        if let (Some(ns), Some(map)) = (self.userns, self.spec.userns) {
            // Each layer idmapped into the container's range: shared as
            // unpacked, owned by the container's ids inside.
            for (i, l) in lower.iter_mut().enumerate() {
                let at = self.dir.join("idmap").join(format!("l{i}"));
                fs::create_dir_all(&at).ctx("create idmap dir")?;
                sys::idmapped_bind(Path::new(l.as_str()), &at, std::os::fd::AsFd::as_fd(ns))
                    .ctx(format!("idmap layer {l} (user namespaces need Linux 5.19+ and a filesystem with idmapped mounts)"))?;
                *l = at.display().to_string();
            }
            let upper = self.dir.join("upper");
            nix::unistd::chown(&upper, Some(Uid::from_raw(map.uid)), Some(Gid::from_raw(map.gid))).ctx("chown upper dir")?;
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            self.dir.join("upper").display(),
            self.dir.join("work").display()
        );
        // The rootfs is always nodev (the container's devices live on its
        // own /dev tmpfs, so a node shipped in an image layer never opens)
        // and nosuid (no_new_privs makes setuid bits moot anyway).
        mount(Some("overlay"), root, Some("overlay"), MsFlags::MS_NODEV | MsFlags::MS_NOSUID, Some(opts.as_str()))
            .ctx("mount overlay rootfs")?;
        let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        let proc_dir = mkdir_in(root, "/proc")?;
        mount(Some("proc"), &proc_dir, Some("proc"), nosuid_nodev_noexec, None::<&str>).ctx("mount /proc")?;
        let sys_dir = mkdir_in(root, "/sys")?;
        mount(Some("sysfs"), &sys_dir, Some("sysfs"), nosuid_nodev_noexec | MsFlags::MS_RDONLY, None::<&str>)
            .ctx("mount /sys")?;
        let dev = mkdir_in(root, "/dev")?;
        // Remapped, /dev belongs to container root, as it does in Docker.
        let owner = self.spec.userns.map(|m| format!(",uid={},gid={}", m.uid, m.gid)).unwrap_or_default();
        mount(
            Some("tmpfs"),
            &dev,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
            Some(format!("mode=755,size=65536k{owner}").as_str()),
        )
        .ctx("mount /dev")?;
        make_dev(&dev)?;
        if self.no_devices {
            mount(
                None::<&str>,
                &dev,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
                Some("mode=755,size=65536k"),
            )
            .ctx("make /dev read-only")?;
        }
        for (i, m) in self.spec.mounts.iter().enumerate() {
            self.mount_one(root, i, m)?;
        }
        if self.spec.read_only {
            restrict_mount(root, false, sys::MOUNT_ATTR_RDONLY).ctx("make rootfs read-only")?;
        }
        Ok(())
    }

    fn mount_one(&self, root: &Path, index: usize, m: &Mount) -> ChildResult<()> {
        match m {
            Mount::Bind { source, destination, read_only, seed } => {
                let is_dir = fs::metadata(source).ctx(format!("bind source {}", source.display()))?.is_dir();
                // Remapped: the source is idmapped first (at a staging
                // point in the container's dir), so its files keep their
                // owners as the container sees them, and seeding writes
                // through the same mapping.
                let source: PathBuf = match self.userns {
                    Some(ns) => {
                        let at = self.dir.join("idmap").join(format!("m{index}"));
                        if is_dir {
                            fs::create_dir_all(&at).ctx("create idmap dir")?;
                        } else {
                            fs::create_dir_all(self.dir.join("idmap")).ctx("create idmap dir")?;
                            fs::File::create(&at).ctx("create idmap file")?;
                        }
                        sys::idmapped_bind(source, &at, std::os::fd::AsFd::as_fd(ns))
                            .ctx(format!("idmap {} (user namespaces need a filesystem with idmapped mounts)", source.display()))?;
                        at
                    }
                    None => source.clone(),
                };
                let source = &source;
                if *seed {
                    // The image's files at the mount point seed an empty
                    // volume, owners and modes kept.
                    let from = resolve_in_root(root, destination).ctx(format!("resolve {destination}"))?;
                    if from.is_dir() && crate::volume::is_empty_dir(source).ctx(format!("read volume {}", source.display()))? {
                        crate::volume::copy_tree(&from, source).ctx(format!("copy the image's {destination} into its volume"))?;
                    }
                }
                let target = if is_dir {
                    mkdir_in(root, destination)?
                } else {
                    let t = resolve_in_root(root, destination).ctx(format!("resolve {destination}"))?;
                    if let Some(parent) = t.parent() {
                        fs::create_dir_all(parent).ctx(format!("create {destination}"))?;
                    }
                    if !t.exists() {
                        fs::File::create(&t).ctx(format!("create {destination}"))?;
                    }
                    t
                };
                mount(Some(source.as_path()), &target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                    .ctx(format!("bind {} to {destination}", source.display()))?;
                let mut attrs = 0;
                if *read_only {
                    attrs |= sys::MOUNT_ATTR_RDONLY;
                }
                if self.no_devices {
                    attrs |= sys::MOUNT_ATTR_NODEV;
                }
                if attrs != 0 {
                    // Recursive: a read-only bind of a tree with mounts in it
                    // makes those read-only too.
                    restrict_mount(&target, true, attrs).ctx(format!("remount {destination}"))?;
                }
            }
            Mount::Tmpfs { destination, size_bytes, mode, read_only } => {
                let target = mkdir_in(root, destination)?;
                let mode = mode.unwrap_or(0o1777);
                let mut opts = match size_bytes {
                    Some(s) => format!("mode={mode:o},size={s}"),
                    None => format!("mode={mode:o}"),
                };
                if let Some(map) = self.spec.userns {
                    opts.push_str(&format!(",uid={},gid={}", map.uid, map.gid));
                }
                let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
                if *read_only {
                    flags |= MsFlags::MS_RDONLY;
                }
                mount(Some("tmpfs"), &target, Some("tmpfs"), flags, Some(opts.as_str()))
                .ctx(format!("mount tmpfs on {destination}"))?;
            }
        }
        Ok(())
    }

    /// The workload: drop privileges, then exec. Never returns on success.
    fn exec_workload(&self) -> ChildResult<std::convert::Infallible> {
        exec_as_workload(self.spec, self.policy)
    }
}

/// Adds the `MOUNT_ATTR_*` bits `attrs` to the mount at `path` (every mount
/// below it too when `recursive`) and keeps the flags it already has: a
/// plain `MS_REMOUNT` would silently drop its `nosuid`/`nodev`/`noexec`.
/// Kernels before 5.12 lack mount_setattr: there the mount is remounted
/// with its flags read back (statvfs), and only the top mount changes.
fn restrict_mount(path: &Path, recursive: bool, attrs: u64) -> std::io::Result<()> {
    match sys::mount_setattr(path, recursive, attrs) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {}
        other => return other,
    }
    use nix::sys::statvfs::FsFlags;
    let have = nix::sys::statvfs::statvfs(path)?.flags();
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND;
    for (st, ms) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if have.contains(st) {
            flags |= ms;
        }
    }
    for (a, ms) in [
        (sys::MOUNT_ATTR_RDONLY, MsFlags::MS_RDONLY),
        (sys::MOUNT_ATTR_NOSUID, MsFlags::MS_NOSUID),
        (sys::MOUNT_ATTR_NODEV, MsFlags::MS_NODEV),
        (sys::MOUNT_ATTR_NOEXEC, MsFlags::MS_NOEXEC),
    ] {
        if attrs & a != 0 {
            flags |= ms;
        }
    }
    mount(None::<&str>, path, None::<&str>, flags, None::<&str>)?;
    Ok(())
}

/// Becomes `spec`'s workload: its user, working directory and environment,
/// Docker's capabilities, no_new_privs and seccomp, then exec. Runs inside
/// the container (after pivot_root, or after entering its namespaces for
/// `exec`). Never returns on success.
fn exec_as_workload(spec: &ContainerSpec, policy: &Policy) -> ChildResult<std::convert::Infallible> {
    SigSet::empty().thread_set_mask().ctx("unblock signals")?;
    sys::reset_signal_dispositions();
    let user = resolve_user(spec.user.as_deref())?;
    let cwd = if spec.cwd.is_empty() { "/" } else { spec.cwd.as_str() };
    if fs::metadata(cwd).is_err() {
        fs::create_dir_all(cwd).ctx(format!("create working directory {cwd}"))?;
        let _ = nix::unistd::chown(cwd, Some(Uid::from_raw(user.uid)), Some(Gid::from_raw(user.gid)));
    }
    nix::unistd::chdir(cwd).ctx(format!("chdir {cwd}"))?;
    let mut env: Vec<String> = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={}", spec.hostname));
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home));
    }
    let path_var = env.iter().find_map(|e| e.strip_prefix("PATH=")).unwrap_or("");
    let prog = find_program(&spec.args[0], path_var).ok_or_else(|| ChildError {
        code: 127,
        message: format!("exec {:?}: executable file not found in $PATH", spec.args[0]),
    })?;
    let cstr = |s: &str| CString::new(s).ctx("argument contains NUL");
    let argv: Vec<CString> = spec.args.iter().map(|a| cstr(a)).collect::<ChildResult<_>>()?;
    let envp: Vec<CString> = env.iter().map(|a| cstr(a)).collect::<ChildResult<_>>()?;
    let prog_c = cstr(&prog)?;

    let gids: Vec<Gid> = user.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    nix::unistd::setgroups(&gids).ctx("setgroups")?;
    policy.apply_rlimits().ctx("ulimit")?;
    security::limit_bounding(&policy.caps).ctx("drop capabilities")?;
    nix::unistd::setgid(Gid::from_raw(user.gid)).ctx("setgid")?;
    nix::unistd::setuid(Uid::from_raw(user.uid)).ctx("setuid")?;
    if user.uid == 0 {
        security::set_process_caps(&policy.caps).ctx("set capabilities")?;
    }
    security::no_new_privs().ctx("no_new_privs")?;
    policy.apply_seccomp().ctx("seccomp")?;
    let e = nix::unistd::execve(&prog_c, &argv, &envp).map_or_else(|e| e, |never| match never {});
    let code = if e == nix::Error::ENOENT { 127 } else { 126 };
    Err(ChildError { code, message: format!("exec {prog}: {e}") })
}

/// pid 1: forward signals to the workload, reap every zombie, and exit with
/// the workload's status once it is gone (the kernel then kills whatever
/// else is left in the pid namespace).
fn init_loop(workload: i32, policy: &Policy) -> ChildResult<std::convert::Infallible> {
    // Init keeps only what it needs to signal the workload.
    security::limit_bounding(&[caps::Capability::CAP_KILL]).ctx("init: drop capabilities")?;
    security::set_process_caps(&[caps::Capability::CAP_KILL]).ctx("init: set capabilities")?;
    security::no_new_privs().ctx("no_new_privs")?;
    policy.apply_seccomp().ctx("seccomp")?;
    let all = SigSet::all();
    loop {
        let sig = all.wait().ctx("sigwait")?;
        if sig == Signal::SIGCHLD {
            loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(p, c)) if p.as_raw() == workload => sys::exit_now(c),
                    Ok(WaitStatus::Signaled(p, s, _)) if p.as_raw() == workload => sys::exit_now(128 + s as i32),
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        } else {
            let _ = kill(Pid::from_raw(workload), sig);
        }
    }
}

/// A user resolved against the container's /etc/passwd and /etc/group.
struct User {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    home: String,
}

fn resolve_user(spec: Option<&str>) -> ChildResult<User> {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    let spec = spec.unwrap_or("0");
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    // name:x:uid:gid:gecos:home:shell
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && (f[0] == u || (u.parse::<u32>().is_ok() && f[2] == u)));
    let uid: u32 = match (u.parse::<u32>(), &entry) {
        (Ok(n), _) => n,
        (Err(_), Some(f)) => f[2].parse().ctx(format!("bad uid for user {u} in /etc/passwd"))?,
        (Err(_), None) => {
            return Err(ChildError {
                code: 125,
                message: format!("unable to find user {u}: no matching entries in passwd file"),
            });
        }
    };
    let gid: u32 = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| ChildError { code: 125, message: format!("unable to find group {g}") })?,
        },
        None => entry.as_ref().and_then(|f| f[3].parse().ok()).unwrap_or(0),
    };
    let name = entry.as_ref().map(|f| f[0]);
    let home = entry.as_ref().and_then(|f| f.get(5)).map(|s| s.to_string()).unwrap_or_else(|| "/".into());
    let mut groups: Vec<u32> = Vec::new();
    if let (Some(name), None) = (name, g) {
        for f in group.lines().map(|l| l.split(':').collect::<Vec<_>>()) {
            if f.len() >= 4
                && f[3].split(',').any(|m| m == name)
                && let Ok(n) = f[2].parse()
                && !groups.contains(&n)
            {
                groups.push(n);
            }
        }
    }
    Ok(User { uid, gid, groups, home })
}

fn find_program(arg0: &str, path: &str) -> Option<String> {
    if arg0.contains('/') {
        return Some(arg0.to_string());
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{d}/{arg0}"))
        .find(|p| fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}


fn mkdir_in(root: &Path, path: &str) -> ChildResult<PathBuf> {
    let p = resolve_in_root(root, path).ctx(format!("resolve {path}"))?;
    fs::create_dir_all(&p).ctx(format!("create {path}"))?;
    Ok(p)
}

/// The minimal /dev: device nodes, pts, shm and the usual symlinks.
fn make_dev(dev: &Path) -> ChildResult<()> {
    for (name, major, minor) in
        [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)]
    {
        let p = dev.join(name);
        mknod(&p, SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), makedev(major, minor))
            .ctx(format!("mknod /dev/{name}"))?;
    }
    let pts = dev.join("pts");
    fs::DirBuilder::new().mode(0o755).create(&pts).ctx("create /dev/pts")?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .ctx("mount /dev/pts")?;
    let shm = dev.join("shm");
    fs::DirBuilder::new().mode(0o1777).create(&shm).ctx("create /dev/shm")?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .ctx("mount /dev/shm")?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link)).ctx(format!("symlink /dev/{link}"))?;
    }
    Ok(())
}

/// Makes `root` the new `/` and detaches the old root entirely.
fn pivot(root: &Path) -> ChildResult<()> {
    nix::unistd::chdir(root).ctx("chdir rootfs")?;
    // pivot_root(".", ".") stacks the old root on top of the new one; the
    // lazy unmount then drops it without needing a directory for it.
    nix::unistd::pivot_root(".", ".").ctx("pivot_root")?;
    umount2(".", MntFlags::MNT_DETACH).ctx("detach old root")?;
    nix::unistd::chdir("/").ctx("chdir /")?;
    Ok(())
}

/// Paths Docker hides from containers (moby `oci/defaults.go`).
const MASKED: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths Docker makes read-only.
const READ_ONLY: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

fn mask_proc_and_sys() -> ChildResult<()> {
    for p in MASKED {
        match fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => {
                mount(Some("tmpfs"), *p, Some("tmpfs"), MsFlags::MS_RDONLY, None::<&str>).ctx(format!("mask {p}"))?;
            }
            Ok(_) => {
                mount(Some("/dev/null"), *p, None::<&str>, MsFlags::MS_BIND, None::<&str>).ctx(format!("mask {p}"))?;
            }
            // This kernel has no such file: nothing to hide.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).ctx(format!("mask {p}")),
        }
    }
    for p in READ_ONLY {
        match fs::symlink_metadata(p) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).ctx(format!("make {p} read-only")),
        }
        mount(Some(*p), *p, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>).ctx(format!("bind {p}"))?;
        mount(
            None::<&str>,
            *p,
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .ctx(format!("make {p} read-only"))?;
    }
    Ok(())
}

/// Opens `path` for append, creating it 0640.
pub(crate) fn open_append(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new().create(true).append(true).mode(0o640).open(path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;


    #[test]
    fn ids_are_checked() {
        assert!(validate_id("web.1_a-b").is_ok());
        for bad in ["", "..", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }
}
