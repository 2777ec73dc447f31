//! A benchmark stopped with SIGTERM mid-run leaves nothing behind. Its
//! cluster used to be removed only in `Drop`, which a signal skips: the
//! stopped `agents` benchmark left three network namespaces, its bridge and
//! three tmpfs mounts. Here the benchmark brings up its 3-manager cluster
//! and 20 simulated agents, is sent SIGTERM, and afterwards none of its
//! namespaces, veths, bridge, forwarding rule, mounts, daemons or directory
//! remain.
//!
//! Needs root and the `shoal` binary (`cargo build -p shoal-cli`).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use shoal_tests::cleanup::{mounts_under, processes_naming, Resources};
use shoal_tests::{sh, shoal_bin, wait_for};

const HOSTS: usize = 3;

/// The names the harness gives a cluster with this id (tests/src/lib.rs).
#[derive(Clone, Debug)]
struct Names {
    id: String,
    bridge: String,
    netns: Vec<String>,
    veths: Vec<String>,
    dir: PathBuf,
}

impl Names {
    fn new(id: &str) -> Self {
        Names {
            id: id.to_string(),
            bridge: format!("shb{id}"),
            netns: (0..HOSTS).map(|i| format!("sh{id}-h{i}")).collect(),
            veths: (0..HOSTS).map(|i| format!("sh{id}h{i}")).collect(),
            dir: std::env::temp_dir().join(format!("shoal-test-{id}")),
        }
    }

    /// Every trace of the cluster on this machine, one line each.
    fn present(&self) -> anyhow::Result<Vec<String>> {
        let mut found = Vec::new();
        let prefix = format!("sh{}-", self.id);
        for line in sh("ip", &["netns", "list"])?.lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name.starts_with(&prefix) {
                found.push(format!("netns {name}"));
            }
        }
        // `7: shb1a2b0: <BROADCAST,…` and `8: sh1a2b0h0@if2: <…`
        for line in sh("ip", &["-o", "link", "show"])?.lines() {
            let name = line.split(": ").nth(1).and_then(|f| f.split('@').next()).unwrap_or_default();
            if name == self.bridge || self.veths.iter().any(|v| v == name) {
                found.push(format!("link {name}"));
            }
        }
        if let Ok(out) = Command::new("nft").args(["list", "chain", "ip", "filter", "FORWARD"]).output()
            && String::from_utf8_lossy(&out.stdout).contains(&format!("shoal-test-{}", self.bridge))
        {
            found.push(format!("nft forward rule for {}", self.bridge));
        }
        for m in mounts_under(&self.dir) {
            found.push(format!("mount {}", m.display()));
        }
        for pid in processes_naming(&self.dir) {
            found.push(format!("process {pid}: {}", cmdline(pid).join(" ")));
        }
        if self.dir.exists() {
            found.push(format!("dir {}", self.dir.display()));
        }
        Ok(found)
    }
}

fn cmdline(pid: i32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// Whether `pid` is (still) a process with an argument under `dir`.
fn names_dir(pid: i32, dir: &Path) -> bool {
    cmdline(pid).iter().any(|a| Path::new(a).starts_with(dir))
}

/// The `shoal daemon` children of `parent` that run for `dir`.
fn daemons_of(parent: u32, dir: &Path) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return found };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // Fields after the command's closing parenthesis: state, ppid, …
        let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
        let ppid = stat.rsplit(')').next().and_then(|f| f.split_whitespace().nth(1)).and_then(|f| f.parse::<u32>().ok());
        if ppid == Some(parent) && cmdline(pid).iter().any(|a| a == "daemon") && names_dir(pid, dir) {
            found.push(pid);
        }
    }
    found.sort();
    found
}

/// Removes whatever the benchmark left, also when the test fails: kills
/// the benchmark if it still runs, then its daemons (by the PIDs seen
/// before it was stopped, if they still run for its dir), then the rest
/// with the harness's own cleanup.
struct Guard {
    bench: Option<Child>,
    clusters: Vec<Names>,
    daemons: Vec<i32>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut b) = self.bench.take() {
            let _ = b.kill();
            let _ = b.wait();
        }
        for n in &self.clusters {
            for pid in &self.daemons {
                if names_dir(*pid, &n.dir) {
                    let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
                }
            }
            let left = Resources {
                label: format!("leftovers of cluster {}", n.id),
                data_dirs: (0..HOSTS).map(|i| n.dir.join(format!("n{i}"))).filter(|d| d.exists()).collect(),
                veths: n.veths.clone(),
                netns: n.netns.clone(),
                bridge: Some(n.bridge.clone()),
                forward_rule: true,
                dir: Some(n.dir.clone()),
                ..Default::default()
            };
            let done = left.clean();
            if !done.is_empty() {
                eprintln!("test cleanup, cluster {}: {}", n.id, done.join(", "));
            }
        }
    }
}

#[test]
fn agents_benchmark_stopped_with_sigterm_leaves_nothing_behind() -> anyhow::Result<()> {
    let shoal = shoal_bin();
    ensure!(shoal.exists(), "no shoal binary at {} (run `cargo build -p shoal-cli` first)", shoal.display());
    let mut bench = Command::new(env!("CARGO_BIN_EXE_agents"))
        .args(["--agents", "20", "--seconds", "600"])
        .env("SHOAL_BIN", &shoal)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the agents benchmark")?;
    let pid = bench.id();
    let (stdout, stderr) = (bench.stdout.take(), bench.stderr.take());
    // Until it names its cluster: the id its first cluster gets
    // (`unique_id`: its PID's low 20 bits, then a counter from 0).
    let mut guard = Guard { bench: Some(bench), clusters: vec![Names::new(&format!("{:x}0", pid & 0xfffff))], daemons: Vec::new() };

    let (tx, lines) = mpsc::channel();
    let stdout = stdout.context("no stdout pipe")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err_text = Arc::new(Mutex::new(String::new()));
    let mut stderr = stderr.context("no stderr pipe")?;
    let err_reader = {
        let err_text = err_text.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                err_text.lock().unwrap_or_else(|e| e.into_inner()).push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let stderr_now = || err_text.lock().unwrap_or_else(|e| e.into_inner()).clone();

    // Mid-run: the cluster is up and all 20 simulated agents are ready.
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut id = None;
    loop {
        let line = match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(e) => bail!("the benchmark did not report its agents ready ({e}); its stderr:\n{}", stderr_now()),
        };
        println!("agents: {line}");
        if let Some(rest) = line.strip_prefix("cluster ") {
            id = rest.split_whitespace().next().map(str::to_string);
        }
        if line.contains("agents joined and ready") {
            break;
        }
    }
    let id = id.context("the benchmark never named its cluster")?;
    let names = Names::new(&id);
    if guard.clusters.iter().all(|c| c.id != id) {
        guard.clusters.push(names.clone());
    }

    let daemons = daemons_of(pid, &names.dir);
    guard.daemons = daemons.clone();
    ensure!(daemons.len() == HOSTS, "expected {HOSTS} daemons under the benchmark, found {daemons:?}");
    // Each daemon's worker mounts a tmpfs for task secrets as it starts.
    let tmpfs = wait_for(Duration::from_secs(30), "a tmpfs on every host's taskdata", || {
        let m: Vec<PathBuf> = mounts_under(&names.dir).into_iter().filter(|m| m.ends_with("taskdata")).collect();
        Ok((m.len() == HOSTS).then_some(m))
    })?;
    let before = names.present()?;
    println!("before SIGTERM: {before:#?}");
    // What the check below looks for is really there to be found.
    for want in names.netns.iter().map(|n| format!("netns {n}")).chain(
        names.veths.iter().chain([&names.bridge]).map(|l| format!("link {l}")),
    ) {
        ensure!(before.contains(&want), "{want} missing before SIGTERM: {before:#?}");
    }
    for m in &tmpfs {
        ensure!(before.contains(&format!("mount {}", m.display())), "{} not seen as a mount", m.display());
    }
    for d in &daemons {
        ensure!(before.iter().any(|l| l.starts_with(&format!("process {d}:"))), "daemon {d} not seen as a process");
    }
    ensure!(before.contains(&format!("dir {}", names.dir.display())));

    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).context("sending SIGTERM")?;
    let status = {
        let bench = guard.bench.as_mut().context("the benchmark is gone")?;
        wait_for(Duration::from_secs(60), "the benchmark to exit after SIGTERM", || Ok(bench.try_wait()?))?
    };
    guard.bench = None;
    wait_for(Duration::from_secs(10), "the benchmark's stderr to close", || Ok(err_reader.is_finished().then_some(())))?;
    let _ = err_reader.join();
    let err = stderr_now();
    println!("agents stderr:\n{err}");

    let left = names.present()?;
    let daemons_left: Vec<i32> = daemons.iter().copied().filter(|d| names_dir(*d, &names.dir)).collect();
    ensure!(left.is_empty(), "left behind after SIGTERM: {left:#?}");
    ensure!(daemons_left.is_empty(), "daemons still running after SIGTERM: {daemons_left:?}");
    ensure!(status.code() == Some(128 + Signal::SIGTERM as i32), "the benchmark exited with {status}, not 143");
    ensure!(
        err.contains(&format!("cluster {id}: killed daemon")),
        "the benchmark did not say it removed cluster {id}; its stderr:\n{err}"
    );
    Ok(())
}
