//! The multi-host test harness: each host is a network namespace on a
//! private bridge, with an address in 198.18.0.0/15, running a real
//! `shoal daemon` started with `nsenter --net=`. Everything a cluster makes
//! (namespaces, veths, bridge, data dirs, processes) carries a unique prefix
//! and is removed when the [`Cluster`] is dropped, also when a test panics,
//! on SIGINT, SIGTERM or SIGHUP (nextest's end for a test that runs too
//! long), and — in a program that called [`cleanup_on_signals`] — on a
//! panic on any thread (see [`cleanup`]).

pub mod cleanup;
pub mod linearizability;
pub mod netns;
pub mod sim;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

pub use cleanup::cleanup_on_signals;

pub const GRPC_PORT: u16 = 7700;

/// The `shoal` binary under test: `$SHOAL_BIN`, or `target/<profile>/shoal`
/// next to the running test executable.
pub fn shoal_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_BIN") {
        return PathBuf::from(p);
    }
    // A test runs from target/<profile>/deps/, a benchmark binary from
    // target/<profile>/: the shoal binary sits in target/<profile>/.
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let here = dir.join("shoal");
    if here.exists() {
        return here;
    }
    dir.parent().map(|d| d.join("shoal")).unwrap_or(here)
}

/// Runs `cmd` and fails with its stderr when it exits non-zero.
pub fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A unique short id for this test's objects (interface names have 15
/// bytes at most).
pub fn unique_id() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{:x}", std::process::id() & 0xfffff, n)
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with `what`
/// and the last value seen.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> anyhow::Result<Option<T>>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub struct Host {
    pub index: usize,
    pub name: String,
    pub netns: String,
    pub veth: String,
    pub ip: Ipv4Addr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub process: Option<Child>,
}

impl Host {
    pub fn addr(&self) -> String {
        format!("{}:{GRPC_PORT}", self.ip)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }
}

/// Options for starting a daemon.
#[derive(Clone, Default)]
pub struct DaemonOpts {
    pub extra: Vec<String>,
}

pub struct Cluster {
    pub id: String,
    pub bridge: String,
    pub dir: PathBuf,
    pub hosts: Vec<Host>,
    /// Everything this cluster made, in the process-wide registry of
    /// [`cleanup`]; dropping it (with the cluster) removes all of it.
    resources: cleanup::Registration,
}

impl Cluster {
    /// Makes `n` hosts (namespaces on one bridge); starts no daemons.
    pub fn hosts(n: usize) -> anyhow::Result<Self> {
        let id = unique_id();
        let dir = std::env::temp_dir().join(format!("shoal-test-{id}"));
        let bridge = format!("shb{id}");
        // Recorded before anything is made, so that a failure or a signal
        // from here on finds all of it.
        let resources = cleanup::register(cleanup::Resources {
            label: format!("cluster {id}"),
            bridge: Some(bridge.clone()),
            dir: Some(dir.clone()),
            ..Default::default()
        });
        let mut c = Cluster { id, bridge, dir, hosts: Vec::new(), resources };
        c.resources.update(|r| -> anyhow::Result<()> {
            std::fs::create_dir_all(c.tmp_dir())?;
            sh("ip", &["link", "add", &c.bridge, "type", "bridge"])?;
            sh("ip", &["link", "set", &c.bridge, "up"])?;
            r.forward_rule = netns::allow_bridge_forwarding(&c.bridge);
            Ok(())
        })?;
        for _ in 0..n {
            c.add_host()?;
        }
        Ok(c)
    }

    /// Adds one more host namespace to the bridge.
    pub fn add_host(&mut self) -> anyhow::Result<usize> {
        let i = self.hosts.len();
        let netns = format!("sh{}-h{i}", self.id);
        let veth = format!("sh{}h{i}", self.id);
        let ip = Ipv4Addr::new(198, 18, 0, 10 + i as u8);
        self.resources.update(|r| -> anyhow::Result<()> {
            r.netns.push(netns.clone());
            r.veths.push(veth.clone());
            sh("ip", &["netns", "add", &netns])?;
            sh("ip", &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
            Ok(())
        })?;
        let host = Host {
            index: i,
            name: format!("n{i}"),
            netns: netns.clone(),
            veth: veth.clone(),
            ip,
            data_dir: self.dir.join(format!("n{i}")),
            log: self.dir.join(format!("n{i}.log")),
            process: None,
        };
        self.hosts.push(host);
        sh("ip", &["link", "set", &veth, "master", &self.bridge, "up"])?;
        let ns = |args: &[&str]| -> anyhow::Result<String> {
            let mut a = vec!["-n", netns.as_str()];
            a.extend_from_slice(args);
            sh("ip", &a)
        };
        ns(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns(&["link", "set", "eth0", "up"])?;
        ns(&["link", "set", "lo", "up"])?;
        Ok(i)
    }

    fn spawn(&mut self, i: usize, args: Vec<String>) -> anyhow::Result<()> {
        let h = &mut self.hosts[i];
        std::fs::create_dir_all(&h.data_dir)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&h.log)?;
        let mut cmd = Command::new("nsenter");
        {
            use std::os::unix::process::CommandExt;
            #[allow(unsafe_code)]
            // SAFETY: the closure runs in the forked child before exec and
            // only makes one async-signal-safe syscall (prctl).
            unsafe {
                cmd.pre_exec(|| {
                    // If the test process dies (killed on a timeout), its
                    // daemons die with it instead of running on.
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
                });
            }
        }
        cmd.arg(format!("--net=/run/netns/{}", h.netns))
            .arg(shoal_bin())
            .args(&args)
            // SHOAL_TEST_LOG widens the daemons' logs when chasing a failure.
            .env("SHOAL_LOG", std::env::var("SHOAL_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Started and recorded in one step: no cleanup can run between.
        let child = self.resources.update(|r| -> anyhow::Result<Child> {
            let child = cmd.spawn().context("starting shoal daemon")?;
            r.pids.push(child.id());
            if !r.data_dirs.contains(&h.data_dir) {
                r.data_dirs.push(h.data_dir.clone());
            }
            Ok(child)
        })?;
        h.process = Some(child);
        Ok(())
    }

    /// The CLI's TMPDIR: a CLI call ended by the cleanup (a signal) leaves
    /// its staging dirs here, inside the cluster's dir, not in /tmp.
    fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// Forgets a daemon this cluster has reaped (its PID may be reused).
    fn reaped(&self, pid: u32) {
        self.resources.update(|r| r.pids.retain(|p| *p != pid));
    }

    fn daemon_args(&self, i: usize) -> Vec<String> {
        let h = &self.hosts[i];
        vec![
            "daemon".into(),
            "--data-dir".into(),
            h.data_dir.display().to_string(),
            "--listen".into(),
            h.addr(),
            "--node-name".into(),
            h.name.clone(),
        ]
    }

    /// Starts host 0 with `--init`.
    pub fn init(&mut self, i: usize, opts: &DaemonOpts) -> anyhow::Result<()> {
        let mut args = self.daemon_args(i);
        args.push("--init".into());
        args.extend(opts.extra.iter().cloned());
        self.spawn(i, args)?;
        let addr = self.hosts[i].addr();
        wait_for(Duration::from_secs(30), "the first manager to answer", || {
            Ok(self.cli_ok(i, &["cluster", "status", "--format", "json"]).ok().filter(|v| v["leader"] != "").map(|_| ()))
        })
        .with_context(|| format!("init on {addr}: {}", self.log_tail(i)))
    }

    /// Starts host `i` with `--init` and `opts`, without waiting for it.
    pub fn spawn_init(&mut self, i: usize, opts: &DaemonOpts) -> anyhow::Result<()> {
        let mut args = self.daemon_args(i);
        args.push("--init".into());
        args.extend(opts.extra.iter().cloned());
        self.spawn(i, args)
    }

    /// Waits up to `timeout` for host `i`'s daemon to exit on its own.
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let child = self.hosts[i].process.as_mut().context("no daemon started")?;
        let pid = child.id();
        let status = wait_for(timeout, "the daemon to exit", || Ok(child.try_wait()?))?;
        self.hosts[i].process = None;
        self.reaped(pid);
        Ok(status)
    }

    /// Starts host `i` joining via host `via` with a token of `role`.
    pub fn join(&mut self, i: usize, via: usize, role: &str, opts: &DaemonOpts) -> anyhow::Result<()> {
        let token = self.cli_ok(via, &["join-token", role, "--format", "json"])?["token"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut args = self.daemon_args(i);
        args.extend(["--join".into(), self.hosts[via].addr(), "--token".into(), token]);
        args.extend(opts.extra.iter().cloned());
        self.spawn(i, args)
    }

    /// Restarts host `i` from its data dir (no --init/--join needed).
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let args = self.daemon_args(i);
        self.spawn(i, args)
    }

    /// `kill -9` the daemon of host `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.hosts[i].process.take() {
            let _ = c.kill();
            let _ = c.wait();
            self.reaped(c.id());
        }
    }

    /// SIGTERM and wait (a clean stop).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.hosts[i].process.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut exited = false;
            while !exited && Instant::now() < deadline {
                exited = matches!(c.try_wait(), Ok(Some(_)));
                if !exited {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            if !exited {
                let _ = c.kill();
                let _ = c.wait();
            }
            self.reaped(c.id());
        }
    }

    /// Cuts host `i` off the network (its veth down) or heals it.
    pub fn set_link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        sh("ip", &["link", "set", &self.hosts[i].veth, if up { "up" } else { "down" }])?;
        Ok(())
    }

    /// Starts a cluster of `managers` managers and `workers` workers and
    /// waits until every node is ready and every manager is a voter.
    pub fn start(managers: usize, workers: usize) -> anyhow::Result<Self> {
        let mut c = Cluster::hosts(managers + workers)?;
        let opts = DaemonOpts::default();
        c.init(0, &opts)?;
        for i in 1..managers {
            c.join(i, 0, "manager", &opts)?;
        }
        for i in managers..managers + workers {
            c.join(i, 0, "worker", &opts)?;
        }
        c.wait_converged(0, managers, managers + workers)?;
        Ok(c)
    }

    /// Waits until `voters` managers are reachable voters and `nodes` nodes
    /// are ready, as seen through host `via`.
    pub fn wait_converged(&self, via: usize, voters: usize, nodes: usize) -> anyhow::Result<()> {
        wait_for(Duration::from_secs(60), "the cluster to converge", || {
            let st = self.cli_ok(via, &["cluster", "status", "--format", "json"])?;
            let members = st["members"].as_array().cloned().unwrap_or_default();
            let ok_voters = members.iter().filter(|m| m["voter"] == true && m["reachable"] == true).count();
            let ns = self.cli_ok(via, &["node", "ls", "--format", "json"])?;
            // A node is listed ready from the moment the managers admit it,
            // before its daemon has saved its certificate and key; the
            // resources its first heartbeat reports show it is running.
            let ready = ns
                .as_array()
                .map(|a| a.iter().filter(|n| n["status"] == "ready" && n["memory_bytes"].as_u64().unwrap_or(0) > 0).count())
                .unwrap_or(0);
            Ok((ok_voters == voters && ready == nodes && st["leader"] != "").then_some(()))
        })
        .with_context(|| self.log_tails())
    }

    pub fn cert_dir(&self) -> PathBuf {
        self.hosts[0].data_dir.join("client")
    }

    /// Runs the CLI inside host `i`'s namespace against that host's daemon.
    pub fn cli(&self, i: usize, args: &[&str]) -> Output {
        self.cli_with(i, &self.hosts[i].addr(), &self.cert_dir(), args)
    }

    pub fn cli_with(&self, i: usize, host: &str, cert_dir: &Path, args: &[&str]) -> Output {
        // A CLI call that hangs must fail the test, not stall the suite:
        // coreutils `timeout` bounds it (the cluster's cleanup then runs).
        let mut cmd = Command::new("timeout");
        cmd.args(["--kill-after=5", "150", "nsenter"])
            .arg(format!("--net=/run/netns/{}", self.hosts[i].netns))
            .arg(shoal_bin())
            .arg("--host")
            .arg(host)
            .arg("--cert-dir")
            .arg(cert_dir)
            .args(args)
            .env("TMPDIR", self.tmp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Started under the registry's lock: once a signal's cleanup has
        // begun, no new call starts against the cluster it is removing
        // (calls already running name the cluster's dir: it ends them).
        let out = self.resources.update(|_| cmd.spawn()).and_then(Child::wait_with_output);
        spawned(out)
    }

    /// Runs the CLI and parses its stdout as JSON; fails on a non-zero exit.
    pub fn cli_ok(&self, i: usize, args: &[&str]) -> anyhow::Result<Value> {
        cli_json(args, self.cli(i, args))
    }

    /// The current leader's host index, as seen through host `via`.
    pub fn leader(&self, via: usize) -> anyhow::Result<usize> {
        let st = self.cli_ok(via, &["cluster", "status", "--format", "json"])?;
        let name = st["leader"].as_str().unwrap_or_default();
        self.hosts
            .iter()
            .position(|h| h.name == name)
            .ok_or_else(|| anyhow::anyhow!("no leader yet (status: {st})"))
    }

    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.hosts[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Every node's log lines stamped between `from` and `to` (seconds
    /// since the epoch, UTC as the daemons log): what the nodes did around
    /// a failure, beyond the last lines `log_tails` shows.
    pub fn logs_between(&self, from: f64, to: f64) -> String {
        let (a, b) = (log_stamp(from), log_stamp(to));
        self.hosts
            .iter()
            .map(|h| {
                let text = std::fs::read_to_string(&h.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().filter(|l| l.get(..23).is_some_and(|t| t >= a.as_str() && t <= b.as_str())).collect();
                format!("--- {} log, {a} to {b}:\n{}", h.name, lines.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn log_tails(&self) -> String {
        (0..self.hosts.len()).map(|i| format!("--- {} log:\n{}", self.hosts[i].name, self.log_tail(i))).collect::<Vec<_>>().join("\n")
    }
}

/// A command's output, or one that says why it could not start (exit 127).
pub fn spawned(out: std::io::Result<Output>) -> Output {
    out.unwrap_or_else(|e| Output {
        status: std::os::unix::process::ExitStatusExt::from_raw(127 << 8),
        stdout: Vec::new(),
        stderr: e.to_string().into_bytes(),
    })
}

/// A CLI run's stdout as JSON (a plain string if it is not JSON, null if
/// empty); an error with its stderr when it exited non-zero.
pub fn cli_json(args: &[&str], out: Output) -> anyhow::Result<Value> {
    if !out.status.success() {
        bail!("shoal {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::String(text.trim().to_string())))
}

/// Stops and removes every container under `data_dir` (their supervisors
/// outlive the daemon by design, so killing the daemon is not enough), ends
/// any supervisor of that data dir that is still there, and unmounts what
/// the agent mounted under it (the tmpfs for task secrets, the pinned
/// network namespaces of its tasks, volumes: all outlive a killed daemon).
/// Returns what it removed, one phrase each.
pub fn remove_containers(data_dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    if let Ok(exec) = shoal_agent::executor::LinuxExecutor::new(data_dir, &shoal_bin()) {
        use shoal_agent::executor::{ContainerState, Executor};
        for id in exec.list().unwrap_or_default() {
            if let Ok(ContainerState::Running) = exec.state(&id) {
                let _ = exec.shutdown(&id, Duration::from_millis(200));
            }
            if exec.remove(&id).is_ok() {
                done.push(format!("removed container {id}"));
            }
        }
    }
    // Supervisors this test's daemons started: their command line names the
    // test's own data dir.
    let needle = format!("internal-supervise --data-dir {}", data_dir.display());
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&needle)
                && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).is_ok()
            {
                done.push(format!("killed supervisor {pid}"));
            }
        }
    }
    for m in cleanup::unmount_under(data_dir) {
        done.push(format!("unmounted {}", m.display()));
    }
    done
}

/// A gRPC Control API client for bulk work (benchmarks, the compaction
/// test), made with the cluster's client credentials. Use it inside
/// [`netns::in_netns`].
pub async fn control_client(
    addr: &str,
    cert_dir: &Path,
) -> anyhow::Result<shoal_proto::control::control_client::ControlClient<tonic::transport::Channel>> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |f: &str| std::fs::read_to_string(cert_dir.join(f)).with_context(|| format!("reading {f}"));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(read("cert.pem")?, read("key.pem")?))
        .domain_name("manager.shoal.cluster");
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(shoal_proto::control::control_client::ControlClient::new(channel))
}

/// The test's own address on a cluster's bridge: the routing mesh's client
/// (tests that use it run one at a time, in nextest's `cluster` group).
pub const CLIENT_IP: &str = "198.18.0.1";

/// Gives the test's namespace [`CLIENT_IP`] on the cluster's bridge.
pub fn client_address(c: &Cluster) {
    if let Err(e) = sh("ip", &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", &c.bridge]) {
        panic!("adding the client address: {e:#}");
    }
}

/// Host `i`'s underlay address with `port`.
pub fn node_addr(c: &Cluster, i: usize, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(c.hosts[i].ip.into(), port)
}

/// One HTTP/1.0 GET of `path`; the body of a 200 answer, or why there was
/// none.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| format!("connect {addr}: {e}"))?;
    http_get_on(&mut s, path).map_err(|e| format!("{addr}{path}: {e}"))
}

/// One HTTP/1.0 GET of `path` on an open connection; the body of a 200
/// answer, or why there was none.
pub fn http_get_on(s: &mut std::net::TcpStream, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).map_err(|e| format!("send: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| format!("read: {e}"))?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") => Ok(body.trim().to_string()),
        _ => Err(format!("answered {:?}", text.lines().next().unwrap_or(""))),
    }
}

pub mod inprocess;
pub mod runtime_support;

/// A busybox rootfs tarball (Debian's busybox-static), built once per test
/// process by `deploy/busybox-rootfs`.
pub fn busybox_rootfs() -> anyhow::Result<PathBuf> {
    static PATH: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        // One shared file: built in a private dir, then renamed into place,
        // so parallel test processes never see half a tarball. The dir (the
        // script's TMPDIR too) is registered: a signal mid-build ends the
        // script and removes it.
        let out = std::env::temp_dir().join("shoal-test-busybox.tar");
        let work = std::env::temp_dir().join(format!("shoal-test-busybox-{}", unique_id()));
        let build = cleanup::register(cleanup::Resources {
            label: format!("busybox rootfs build in {}", work.display()),
            dir: Some(work.clone()),
            ..Default::default()
        });
        let tmp = work.join("busybox.tar");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/busybox-rootfs");
        let mut cmd = Command::new(&script);
        cmd.arg(&tmp).env("TMPDIR", &work).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let built = build
            .update(|_| std::fs::create_dir_all(&work).and_then(|()| cmd.spawn()))
            .and_then(Child::wait_with_output)
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !built.status.success() {
            return Err(format!("{}: {}", script.display(), String::from_utf8_lossy(&built.stderr).trim()));
        }
        std::fs::rename(&tmp, &out).map_err(|e| e.to_string())?;
        Ok(out)
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

impl Cluster {
    /// Imports the busybox image into the cluster as `reference`.
    pub fn import_busybox(&self, via: usize, reference: &str) -> anyhow::Result<()> {
        let tar = busybox_rootfs()?;
        let tar = tar.display().to_string();
        self.cli_ok(via, &["image", "import", &tar, reference])?;
        Ok(())
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmm` (UTC) for `secs` since the epoch: how the
/// daemons' log lines begin, to pick the lines around a moment.
pub fn log_stamp(secs: f64) -> String {
    let ms = (secs * 1000.0) as i64;
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}", rem / 3_600_000, rem / 60_000 % 60, rem / 1000 % 60, rem % 1000)
}

#[cfg(test)]
mod log_stamp_tests {
    #[test]
    fn log_stamps_match_the_daemons_clock_format() {
        assert_eq!(super::log_stamp(0.0), "1970-01-01T00:00:00.000");
        assert_eq!(super::log_stamp(1_796_320_575.110), "2026-12-03T17:56:15.110");
        assert_eq!(super::log_stamp(951_782_400.5), "2000-02-29T00:00:00.500");
    }
}
