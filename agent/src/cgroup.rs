//! Resource limits through cgroups: one trait, a v1 and a v2 backend, chosen
//! at start by [`detect`]. Both take their root as a path so unit tests run
//! them on a tempdir tree.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors of the cgroup backends.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy under {root}: need cgroup2 or v1 memory, cpu and pids")]
    NoHierarchy { root: PathBuf },
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("can't apply the {limit} limit: the cgroup2 hierarchy at {root} has no {controller} controller (on a hybrid host it is bound to cgroup v1)")]
    NoController { limit: &'static str, controller: &'static str, root: PathBuf },
    #[error("cgroup {path} still busy after {waited:?}")]
    Busy { path: PathBuf, waited: Duration },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.to_path_buf(), source }
}

/// The limits of one container.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Memory limit in bytes (swap included: no swap beyond it).
    pub memory_bytes: Option<u64>,
    /// CPU quota in millionths of a CPU per period (0.5 CPU = 500_000).
    pub cpu_micros: Option<u64>,
    /// Maximum number of processes and threads.
    pub pids: Option<u64>,
}

/// The CFS period the CPU quota is expressed against (the kernel default).
pub const CPU_PERIOD_US: u64 = 100_000;

impl Limits {
    fn cpu_quota_us(&self) -> Option<u64> {
        // At least 1ms: the kernel refuses smaller quotas.
        self.cpu_micros.map(|m| (m * CPU_PERIOD_US / 1_000_000).max(1_000))
    }
}

/// A cgroup hierarchy able to make one group per container.
pub trait CgroupBackend: Send + Sync {
    /// Creates the group `id` with `limits` applied.
    fn create(&self, id: &str, limits: &Limits) -> Result<Box<dyn Cgroup>, CgroupError>;
    /// Opens an existing group (for a reattaching supervisor or cleanup).
    fn open(&self, id: &str) -> Box<dyn Cgroup>;
    /// "v1" or "v2".
    fn version(&self) -> &'static str;
}

/// One container's group.
pub trait Cgroup: Send {
    /// Moves `pid` into the group.
    fn add_process(&self, pid: i32) -> Result<(), CgroupError>;
    /// Whether the memory limit has killed a process in this group.
    fn oom_killed(&self) -> Result<bool, CgroupError>;
    /// Directories that make up this group.
    fn paths(&self) -> Vec<PathBuf>;
    /// CPU time the group's processes used, in nanoseconds (None where the
    /// host does not account it).
    fn cpu_usage_ns(&self) -> Result<Option<u64>, CgroupError>;
    /// Whether the group restricts which devices can be opened (v1's
    /// devices controller). Without it the runtime keeps device nodes out
    /// of every writable mount instead.
    fn limits_devices(&self) -> bool {
        false
    }
    /// Removes the group; waits a little for exiting processes to leave it.
    /// The shared parent (`shoal/`) goes too once it is empty, so a host
    /// with no containers has no shoal cgroups.
    fn destroy(&self) -> Result<(), CgroupError> {
        for p in self.paths() {
            remove_group_dir(&p)?;
            if let Some(parent) = p.parent() {
                // Fails (EBUSY/ENOTEMPTY) while other containers use it.
                let _ = fs::remove_dir(parent);
            }
        }
        Ok(())
    }
}

/// How long `destroy` waits for a group whose last process is still exiting.
const DESTROY_WAIT: Duration = Duration::from_secs(2);

fn remove_group_dir(path: &Path) -> Result<(), CgroupError> {
    let start = Instant::now();
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                if start.elapsed() > DESTROY_WAIT {
                    return Err(CgroupError::Busy { path: path.to_path_buf(), waited: start.elapsed() });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(CgroupError::Io { path: path.to_path_buf(), source: e }),
        }
    }
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    // The parent may vanish under us: the last container's `destroy`
    // removes the shared parent. Make it again and retry.
    for _ in 0..3 {
        match fs::create_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent() {
                    let _ = fs::create_dir(parent);
                }
            }
            Err(e) => return Err(CgroupError::Io { path: path.to_path_buf(), source: e }),
        }
    }
    fs::create_dir(path).or_else(|e| if e.kind() == io::ErrorKind::AlreadyExists { Ok(()) } else { Err(e) }).map_err(io_err(path))
}

/// Reads `key N` out of a flat keyed file (memory.events, memory.oom_control).
fn keyed_value(path: &Path, key: &str) -> Result<u64, CgroupError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(CgroupError::Io { path: path.to_path_buf(), source: e }),
    };
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0))
}

/// Picks the backend for the hierarchy mounted at `root` (normally
/// /sys/fs/cgroup). A pure cgroup2 mount at `root` means v2; otherwise v1
/// controllers must be there. A hybrid host (v1 controllers plus a cgroup2
/// at root/unified with no useful controllers) uses v1.
pub fn detect(root: &Path, parent: &str) -> Result<Box<dyn CgroupBackend>, CgroupError> {
    if root.join("cgroup.controllers").exists() {
        return Ok(Box::new(V2::new(root, parent)));
    }
    if V1::CONTROLLERS.iter().all(|c| root.join(c).is_dir()) {
        return Ok(Box::new(V1::new(root, parent)));
    }
    Err(CgroupError::NoHierarchy { root: root.to_path_buf() })
}

/// cgroup v1: one directory per controller, root/<controller>/<parent>/<id>.
pub struct V1 {
    root: PathBuf,
    parent: String,
}

impl V1 {
    const CONTROLLERS: [&'static str; 3] = ["memory", "cpu", "pids"];

    pub fn new(root: &Path, parent: &str) -> Self {
        V1 { root: root.to_path_buf(), parent: parent.to_string() }
    }

    fn group(&self, id: &str) -> V1Group {
        let dir = |c: &str| self.root.join(c).join(&self.parent).join(id);
        // The devices controller is optional: used when mounted.
        let devices = self.root.join("devices").is_dir().then(|| dir("devices"));
        // CPU accounting (for the autoscaler): its own hierarchy where it is
        // not mounted together with cpu (`cpu,cpuacct`).
        let cpuacct = match (fs::canonicalize(self.root.join("cpuacct")), fs::canonicalize(self.root.join("cpu"))) {
            (Ok(acct), Ok(cpu)) if acct != cpu => Some(dir("cpuacct")),
            _ => None,
        };
        V1Group { memory: dir("memory"), cpu: dir("cpu"), pids: dir("pids"), devices, cpuacct }
    }
}

impl CgroupBackend for V1 {
    fn create(&self, id: &str, limits: &Limits) -> Result<Box<dyn Cgroup>, CgroupError> {
        for c in Self::CONTROLLERS {
            mkdir(&self.root.join(c).join(&self.parent))?;
        }
        let g = self.group(id);
        for d in g.devices.iter().chain(&g.cpuacct) {
            mkdir(d.parent().unwrap_or(d))?;
        }
        let made = CreatedGuard(g.paths());
        for p in &made.0 {
            mkdir(p)?;
        }
        if let Some(m) = limits.memory_bytes {
            write_file(&g.memory.join("memory.limit_in_bytes"), &m.to_string())?;
            // Without this the limit only covers RAM and a host with swap
            // would page the container out instead of OOM-killing it.
            let memsw = g.memory.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write_file(&memsw, &m.to_string())?;
            }
        }
        if let Some(q) = limits.cpu_quota_us() {
            write_file(&g.cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write_file(&g.cpu.join("cpu.cfs_quota_us"), &q.to_string())?;
        }
        if let Some(n) = limits.pids {
            write_file(&g.pids.join("pids.max"), &n.to_string())?;
        }
        if let Some(d) = &g.devices {
            write_file(&d.join("devices.deny"), "a")?;
            for rule in DEVICE_RULES {
                write_file(&d.join("devices.allow"), rule)?;
            }
        }
        std::mem::forget(made);
        Ok(Box::new(g))
    }

    fn open(&self, id: &str) -> Box<dyn Cgroup> {
        Box::new(self.group(id))
    }

    fn version(&self) -> &'static str {
        "v1"
    }
}

/// Removes half-made groups when `create` fails part way.
struct CreatedGuard(Vec<PathBuf>);

impl Drop for CreatedGuard {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_dir(p);
        }
    }
}

struct V1Group {
    memory: PathBuf,
    cpu: PathBuf,
    pids: PathBuf,
    devices: Option<PathBuf>,
    cpuacct: Option<PathBuf>,
}

/// A number in a file (cpuacct.usage), None if the file is not there.
fn number_in(path: &Path) -> Result<Option<u64>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(t.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CgroupError::Io { path: path.to_path_buf(), source: e }),
    }
}

/// Devices a container may use (moby's default allow list): any device
/// node may be created (`m`), but only these opened.
pub const DEVICE_RULES: [&str; 11] = [
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",   // null
    "c 1:5 rwm",   // zero
    "c 1:7 rwm",   // full
    "c 1:8 rwm",   // random
    "c 1:9 rwm",   // urandom
    "c 5:0 rwm",   // tty
    "c 5:1 rwm",   // console
    "c 5:2 rwm",   // ptmx
    "c 136:* rwm", // pts
];

impl Cgroup for V1Group {
    fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        for p in self.paths() {
            write_file(&p.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn oom_killed(&self) -> Result<bool, CgroupError> {
        Ok(keyed_value(&self.memory.join("memory.oom_control"), "oom_kill")? > 0)
    }

    fn paths(&self) -> Vec<PathBuf> {
        let mut p = vec![self.memory.clone(), self.cpu.clone(), self.pids.clone()];
        p.extend(self.devices.clone());
        p.extend(self.cpuacct.clone());
        p
    }

    fn cpu_usage_ns(&self) -> Result<Option<u64>, CgroupError> {
        number_in(&self.cpuacct.as_ref().unwrap_or(&self.cpu).join("cpuacct.usage"))
    }

    fn limits_devices(&self) -> bool {
        self.devices.is_some()
    }
}

/// cgroup v2: one unified tree, root/<parent>/<id>.
pub struct V2 {
    root: PathBuf,
    parent: String,
}

impl V2 {
    pub fn new(root: &Path, parent: &str) -> Self {
        V2 { root: root.to_path_buf(), parent: parent.to_string() }
    }
}

impl CgroupBackend for V2 {
    fn create(&self, id: &str, limits: &Limits) -> Result<Box<dyn Cgroup>, CgroupError> {
        let parent = self.root.join(&self.parent);
        mkdir(&parent)?;
        // Controllers must be enabled in every ancestor's subtree_control
        // for the leaf to get their files; enable those the host has.
        let have_path = self.root.join("cgroup.controllers");
        let have = fs::read_to_string(&have_path).map_err(io_err(&have_path))?;
        let enable: Vec<String> = ["memory", "pids", "cpu"]
            .into_iter()
            .filter(|c| have.split_whitespace().any(|h| h == *c))
            .map(|c| format!("+{c}"))
            .collect();
        for (asked, limit, controller) in [
            (limits.memory_bytes.is_some(), "memory", "memory"),
            (limits.cpu_quota_us().is_some(), "cpu", "cpu"),
            (limits.pids.is_some(), "pids", "pids"),
        ] {
            if asked && !have.split_whitespace().any(|h| h == controller) {
                return Err(CgroupError::NoController { limit, controller, root: self.root.clone() });
            }
        }
        let enable = enable.join(" ");
        if !enable.is_empty() {
            write_file(&self.root.join("cgroup.subtree_control"), &enable)?;
            write_file(&parent.join("cgroup.subtree_control"), &enable)?;
        }
        let dir = parent.join(id);
        let made = CreatedGuard(vec![dir.clone()]);
        mkdir(&dir)?;
        if let Some(m) = limits.memory_bytes {
            write_file(&dir.join("memory.max"), &m.to_string())?;
            let swap = dir.join("memory.swap.max");
            if swap.exists() {
                write_file(&swap, "0")?;
            }
        }
        if let Some(q) = limits.cpu_quota_us() {
            write_file(&dir.join("cpu.max"), &format!("{q} {CPU_PERIOD_US}"))?;
        }
        if let Some(n) = limits.pids {
            write_file(&dir.join("pids.max"), &n.to_string())?;
        }
        // v2 has no devices controller: an eBPF program does its job. Where
        // the kernel refuses it (no CONFIG_CGROUP_BPF, bpf() denied to us),
        // the runtime falls back to nodev mounts, which keep image and
        // mknod'ed nodes unopenable but can't stop a bind-mounted one.
        let devices = match crate::devfilter::default_rules().and_then(|r| crate::devfilter::attach(&dir, &r)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(cgroup = %dir.display(), error = %e, "no device filter for this container; device nodes are kept out by nodev mounts only");
                false
            }
        };
        std::mem::forget(made);
        Ok(Box::new(V2Group { dir, devices }))
    }

    fn open(&self, id: &str) -> Box<dyn Cgroup> {
        Box::new(V2Group { dir: self.root.join(&self.parent).join(id), devices: false })
    }

    fn version(&self) -> &'static str {
        "v2"
    }
}

struct V2Group {
    dir: PathBuf,
    /// Whether the device filter is attached.
    devices: bool,
}

impl Cgroup for V2Group {
    fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        write_file(&self.dir.join("cgroup.procs"), &pid.to_string())
    }

    fn oom_killed(&self) -> Result<bool, CgroupError> {
        Ok(keyed_value(&self.dir.join("memory.events"), "oom_kill")? > 0)
    }

    fn paths(&self) -> Vec<PathBuf> {
        vec![self.dir.clone()]
    }

    fn cpu_usage_ns(&self) -> Result<Option<u64>, CgroupError> {
        let stat = self.dir.join("cpu.stat");
        if !stat.exists() {
            return Ok(None);
        }
        Ok(Some(keyed_value(&stat, "usage_usec")?.saturating_mul(1000)))
    }

    fn limits_devices(&self) -> bool {
        self.devices
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn clear_files(dir: &Path) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                fs::remove_file(e.path()).unwrap();
            }
        }
    }

    fn limits() -> Limits {
        Limits { memory_bytes: Some(32 << 20), cpu_micros: Some(500_000), pids: Some(64) }
    }

    #[test]
    fn detect_picks_v1_on_hybrid_and_v2_on_unified() {
        let t = tempfile::tempdir().unwrap();
        for c in ["memory", "cpu", "pids", "unified"] {
            fs::create_dir(t.path().join(c)).unwrap();
        }
        assert_eq!(detect(t.path(), "shoal").unwrap().version(), "v1");
        let u = tempfile::tempdir().unwrap();
        fs::write(u.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        assert_eq!(detect(u.path(), "shoal").unwrap().version(), "v2");
        let e = tempfile::tempdir().unwrap();
        assert!(matches!(detect(e.path(), "shoal"), Err(CgroupError::NoHierarchy { .. })));
    }

    #[test]
    fn v1_writes_limits_per_controller() {
        let t = tempfile::tempdir().unwrap();
        for c in ["memory", "cpu", "pids", "devices"] {
            fs::create_dir(t.path().join(c)).unwrap();
        }
        fs::create_dir_all(t.path().join("memory/shoal")).unwrap();
        let b = V1::new(t.path(), "shoal");
        let g = b.create("c1", &limits()).unwrap();
        let read = |p: &str| fs::read_to_string(t.path().join(p)).unwrap();
        assert_eq!(read("memory/shoal/c1/memory.limit_in_bytes"), (32u64 << 20).to_string());
        assert_eq!(read("cpu/shoal/c1/cpu.cfs_quota_us"), "50000");
        assert_eq!(read("cpu/shoal/c1/cpu.cfs_period_us"), "100000");
        assert_eq!(read("pids/shoal/c1/pids.max"), "64");
        g.add_process(42).unwrap();
        assert_eq!(read("pids/shoal/c1/cgroup.procs"), "42");
        // devices is mounted in this tree: deny all, then the allow list
        // (a plain file keeps only the last write).
        assert_eq!(read("devices/shoal/c1/devices.deny"), "a");
        assert_eq!(read("devices/shoal/c1/devices.allow"), "c 136:* rwm");
        assert_eq!(read("memory/shoal/c1/cgroup.procs"), "42");
        assert!(!g.oom_killed().unwrap());
        fs::write(t.path().join("memory/shoal/c1/memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
            .unwrap();
        assert!(g.oom_killed().unwrap());
        for p in g.paths() {
            clear_files(&p);
        }
        g.destroy().unwrap();
        assert!(!t.path().join("memory/shoal/c1").exists());
        assert!(!t.path().join("pids/shoal/c1").exists());
        assert!(!t.path().join("devices/shoal/c1").exists());
    }

    #[test]
    fn v2_enables_controllers_and_writes_limits() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let b = V2::new(t.path(), "shoal");
        let g = b.create("c2", &limits()).unwrap();
        let read = |p: &str| fs::read_to_string(t.path().join(p)).unwrap();
        assert_eq!(read("shoal/cgroup.subtree_control"), "+memory +pids +cpu");
        assert_eq!(read("cgroup.subtree_control"), "+memory +pids +cpu");
        assert_eq!(read("shoal/c2/memory.max"), (32u64 << 20).to_string());
        assert_eq!(read("shoal/c2/cpu.max"), "50000 100000");
        assert_eq!(read("shoal/c2/pids.max"), "64");
        g.add_process(7).unwrap();
        assert_eq!(read("shoal/c2/cgroup.procs"), "7");
        fs::write(t.path().join("shoal/c2/memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n").unwrap();
        assert!(!g.oom_killed().unwrap());
        fs::write(t.path().join("shoal/c2/memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n").unwrap();
        assert!(g.oom_killed().unwrap());
        clear_files(&t.path().join("shoal/c2"));
        g.destroy().unwrap();
        assert!(!t.path().join("shoal/c2").exists());
    }

    #[test]
    fn v2_enables_only_the_controllers_the_host_has() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "memory pids io\n").unwrap();
        let g = V2::new(t.path(), "shoal").create("c4", &Limits { pids: Some(5), ..Limits::default() }).unwrap();
        assert_eq!(fs::read_to_string(t.path().join("shoal/cgroup.subtree_control")).unwrap(), "+memory +pids");
        clear_files(&t.path().join("shoal/c4"));
        g.destroy().unwrap();
        // A limit the hierarchy can't enforce is refused, not ignored.
        let e = V2::new(t.path(), "shoal")
            .create("c5", &Limits { cpu_micros: Some(500_000), ..Limits::default() })
            .err()
            .unwrap();
        assert!(e.to_string().contains("no cpu controller"), "{e}");
        assert!(!t.path().join("shoal/c5").exists());
    }

    #[test]
    fn failed_create_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "").unwrap();
        // A file where the parent directory should be makes mkdir fail.
        fs::write(t.path().join("shoal"), "").unwrap();
        assert!(V2::new(t.path(), "shoal").create("c3", &limits()).is_err());
        assert!(!t.path().join("shoal/c3").exists());
    }

    /// The v2 backend against the real kernel: this hybrid host's cgroup2
    /// mount has no memory/cpu/pids controllers, but creating a group,
    /// moving a process in, reading memory.events and removing it are real.
    #[test]
    fn v2_on_the_real_unified_mount() {
        let root = Path::new("/sys/fs/cgroup/unified");
        if !root.join("cgroup.controllers").exists() || !nix::unistd::Uid::effective().is_root() {
            eprintln!("no cgroup2 mount at {} (or not root): nothing to check", root.display());
            return;
        }
        let id = format!("unit-{}", std::process::id());
        let parent = format!("shoal-test-{}", std::process::id());
        // Removes the test's groups even if an assertion fails.
        struct Cleanup(PathBuf, PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = fs::remove_dir(&self.0);
                let _ = fs::remove_dir(&self.1);
            }
        }
        let _cleanup = Cleanup(root.join(&parent).join(&id), root.join(&parent));
        let b = V2::new(root, &parent);
        let g = b.create(&id, &Limits::default()).unwrap();
        let mut child = std::process::Command::new("sleep").arg("100").spawn().unwrap();
        struct Kill<'a>(&'a mut std::process::Child);
        impl Drop for Kill<'_> {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        g.add_process(child.id() as i32).unwrap();
        let procs = fs::read_to_string(root.join(&parent).join(&id).join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), child.id().to_string());
        assert!(!g.oom_killed().unwrap());
        drop(Kill(&mut child));
        g.destroy().unwrap();
        assert!(!root.join(&parent).join(&id).exists());
    }

    #[test]
    fn cpu_quota_has_a_floor() {
        let l = Limits { cpu_micros: Some(1), ..Limits::default() };
        assert_eq!(l.cpu_quota_us(), Some(1_000));
    }
}
