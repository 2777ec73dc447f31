//! Scale (BENCHMARKS.md, issue 14): N simulated agents in this one process
//! (`shoal_tests::sim`: each a real node to the managers — it joins with the
//! worker token, heartbeats with the period and jitter it is given, follows
//! its assignment stream and reports its tasks running at once, without
//! containers) on 3 managers. Measures: join → all ready; T tasks (services
//! of at most 50,000 replicas) create → all running; the managers' CPU and
//! RSS at steady state; then one agent dies and the time until it is marked
//! down.
//!
//! Run: `cargo build --release -p shoal-cli -p shoal-bench && target/release/agents [--agents 1000] [--tasks N] [--seconds 20] [--deaths 1] [--overlay deltas|whole]`
//!
//! `--overlay`: the agents present overlay identities (a key and an
//! endpoint each, no data plane), so the managers send them peers as they
//! do real agents; `deltas` accepts peer deltas, `whole` takes whole lists
//! (as agents before deltas did). It prints the peer bytes received.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_bench::arg;
use shoal_tests::{Cluster, netns::in_netns, sim};

/// (utime + stime in clock ticks, RSS in KiB) of `pid`.
/// This process's CPU ticks: its own threads, and its reaped children's
/// (the CLI runs it polls with).
fn own_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<u64> = stat.rsplit(')').next().unwrap_or("").split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    (at(11) + at(12), at(13) + at(14))
}

fn usage(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (ticks, rss)
}

/// Polls `f` every 250 ms until it answers (a listing of thousands of nodes
/// is real work for the leader: the 100 ms of the tests' `wait_for` would
/// weigh on what is measured).
fn poll<T>(timeout: Duration, what: &str, f: impl FnMut() -> anyhow::Result<Option<T>>) -> anyhow::Result<T> {
    poll_every(Duration::from_millis(250), timeout, what, f)
}

fn poll_every<T>(every: Duration, timeout: Duration, what: &str, mut f: impl FnMut() -> anyhow::Result<Option<T>>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(v)) = f() {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(every);
    }
}

fn main() -> anyhow::Result<()> {
    // First, before any thread starts: SIGINT/SIGTERM remove the cluster.
    shoal_tests::cleanup_on_signals()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n = arg("--agents", 1000);
    let total = arg("--tasks", n);
    let seconds = arg("--seconds", 20);
    let deaths = arg("--deaths", 1);
    let args: Vec<String> = std::env::args().collect();
    let overlay = match args.iter().position(|a| a == "--overlay").map(|i| args.get(i + 1).map(String::as_str)) {
        None => None,
        Some(Some("deltas")) => Some(true),
        Some(Some("whole")) => Some(false),
        Some(other) => anyhow::bail!("--overlay takes deltas or whole, not {other:?}"),
    };
    let c = Cluster::start(3, 0)?;
    println!("cluster {} ready: 3 managers, bridge {}, dir {}", c.id, c.bridge, c.dir.display());
    c.import_busybox(0, "bb:1")?;
    let token = c.cli_ok(0, &["join-token", "worker", "--format", "json"])?["token"].as_str().unwrap_or_default().to_string();
    let leader = c.leader(0)?;
    let manager = c.hosts[leader].addr();
    let ns = c.hosts[leader].netns.clone();
    let ca = std::fs::read_to_string(c.cert_dir().join("ca.pem"))?;
    let pids: Vec<u32> = (0..3).filter_map(|i| c.hosts[i].pid()).collect();
    let idle: Vec<(u64, u64)> = pids.iter().map(|p| usage(*p)).collect();
    let own_idle = own_cpu();
    let t0 = Instant::now();
    // When the last join RPC was answered (ms after t0).
    let joins_done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let joins_done_w = joins_done.clone();
    let (kill_tx, mut kill_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (killed_tx, killed_rx) = std::sync::mpsc::channel::<String>();
    // The agents live on a thread inside a host's namespace for the whole run.
    let agents = std::thread::spawn(move || {
        in_netns(&ns, move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(async move {
                let sem = Arc::new(tokio::sync::Semaphore::new(64));
                let mut joins = Vec::new();
                for i in 0..n {
                    let (m, t, ca, sem) = (manager.clone(), token.clone(), ca.clone(), sem.clone());
                    joins.push(tokio::spawn(async move {
                        let _p = sem.acquire().await?;
                        let mut node = sim::join(&m, &t, &ca, i).await?;
                        node.overlay = overlay;
                        // Each runs as soon as it has joined.
                        anyhow::Ok(tokio::spawn(sim::run(node)))
                    }));
                }
                let mut running = Vec::new();
                for j in joins {
                    running.push(j.await??);
                }
                joins_done_w.store(t0.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
                // An agent dies each time one is asked for (the last to
                // join first: sim-{n-1}, sim-{n-2}, ...); the run ends when
                // the sender is dropped.
                while kill_rx.recv().await.is_some() {
                    if let Some(h) = running.pop() {
                        h.abort();
                        let _ = killed_tx.send(format!("sim-{}", running.len()));
                    }
                }
                anyhow::Ok(())
            })
        })
    });
    poll(Duration::from_secs(900), "every simulated agent ready", || {
        let nodes = c.cli_ok(0, &["node", "ls", "--format", "json"])?;
        let ready = nodes.as_array().map(|a| a.iter().filter(|n| n["status"] == "ready" && n["memory_bytes"].as_u64().unwrap_or(0) > 0).count()).unwrap_or(0);
        Ok((ready == n as usize + 3).then_some(()))
    })?;
    println!("{n} agents joined and ready in {:.1} s", t0.elapsed().as_secs_f64());
    if let Some(deltas) = overlay {
        let bytes = sim::PEER_BYTES.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "peers ({}): {:.1} MB received by the {n} agents while joining, {:.1} KB per agent",
            if deltas { "deltas" } else { "whole lists" },
            bytes as f64 / 1e6,
            bytes as f64 / 1e3 / n.max(1) as f64
        );
    }
    let joined: Vec<(u64, u64)> = pids.iter().map(|p| usage(*p)).collect();
    // Where the join's CPU went: the machine had 2 cores × the join's time.
    let cpu = |ticks: u64| ticks as f64 / 100.0;
    let managers: Vec<String> = (0..pids.len())
        .map(|i| format!("n{i}{} {:.1} s", if i == leader { " (leader)" } else { "" }, cpu(joined[i].0.saturating_sub(idle[i].0))))
        .collect();
    println!(
        "join: the last join RPC answered at {:.1} s; CPU spent meanwhile: {}, the simulator {:.1} s, its CLI polls {:.1} s",
        joins_done.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1000.0,
        managers.join(", "),
        cpu(own_cpu().0.saturating_sub(own_idle.0)),
        cpu(own_cpu().1.saturating_sub(own_idle.1))
    );
    let t1 = Instant::now();
    let per_service = 50_000u64;
    let mut left = total;
    let mut k = 0;
    while left > 0 {
        let r = left.min(per_service);
        let name = format!("sim{k}");
        c.cli_ok(0, &["service", "create", "--detach", "--name", &name, "--replicas", &r.to_string(), "--constraint", "node.role==worker", "bb:1", "sleep", "1d"])?;
        left -= r;
        k += 1;
    }
    poll(Duration::from_secs(1800), "every task running", || {
        let ls = c.cli_ok(0, &["service", "ls", "--format", "json"])?;
        let running: u64 = ls.as_array().into_iter().flatten().map(|s| s["replicas_running"].as_u64().unwrap_or(0)).sum();
        Ok((running == total).then_some(()))
    })?;
    println!("{total} tasks ({k} services) on {n} agents running {:.2} s after the first create", t1.elapsed().as_secs_f64());
    let before: Vec<(u64, u64)> = pids.iter().map(|p| usage(*p)).collect();
    std::thread::sleep(Duration::from_secs(seconds));
    let after: Vec<(u64, u64)> = pids.iter().map(|p| usage(*p)).collect();
    let hz = 100.0; // USER_HZ
    for (i, ((b, _), (a, rss))) in before.iter().zip(&after).enumerate() {
        let role = if i == leader { "leader" } else { "follower" };
        let (idle_rss, joined_rss) = (idle[i].1, joined[i].1);
        println!(
            "manager n{i} ({role}): {:.1}% of a core, RSS {:.1} MiB (idle {:.1}, with the agents {:.1}: {:.0} bytes per task) over {seconds} s with {n} agents and {total} tasks",
            (a - b) as f64 / hz / seconds as f64 * 100.0,
            *rss as f64 / 1024.0,
            idle_rss as f64 / 1024.0,
            joined_rss as f64 / 1024.0,
            (rss.saturating_sub(joined_rss) * 1024) as f64 / total.max(1) as f64,
        );
    }
    // Agents die one at a time: how long until the leader marks each down.
    let period = c.cli_ok(0, &["cluster", "status", "--format", "json"])?;
    let mut downs = Vec::new();
    let peer_bytes = || sim::PEER_BYTES.load(std::sync::atomic::Ordering::Relaxed);
    let peer_bytes_before = peer_bytes();
    for _ in 0..deaths.min(n) {
        let _ = kill_tx.send(());
        let name = killed_rx.recv_timeout(Duration::from_secs(60))?;
        let t2 = Instant::now();
        poll_every(Duration::from_millis(100), Duration::from_secs(300), "the dead agent marked down", || {
            let nodes = c.cli_ok(0, &["node", "ls", "--format", "json"])?;
            let down = nodes.as_array().into_iter().flatten().any(|x| x["name"] == name.as_str() && x["status"] == "down");
            Ok(down.then_some(()))
        })?;
        let took = t2.elapsed().as_secs_f64();
        println!("{name} marked down {took:.2} s after it stopped");
        downs.push(took);
    }
    downs.sort_by(f64::total_cmp);
    if let (Some(min), Some(max)) = (downs.first(), downs.last()) {
        println!(
            "marked down after {:.2} s (median of {}; min {min:.2}, max {max:.2}) with a heartbeat period of {} ms at {} nodes",
            downs[downs.len() / 2],
            downs.len(),
            period["heartbeat_period_ms"].as_u64().unwrap_or(0),
            n + 3
        );
    }
    if let Some(deltas) = overlay {
        // Every agent hears of the last death within a period (early, on
        // the service view's word); two periods for the stragglers.
        std::thread::sleep(Duration::from_millis(2 * period["heartbeat_period_ms"].as_u64().unwrap_or(500)));
        let bytes = peer_bytes() - peer_bytes_before;
        let deaths = deaths.min(n).max(1);
        println!(
            "peers ({}): {:.2} MB received by the agents for {deaths} deaths, {:.2} KB per agent per death",
            if deltas { "deltas" } else { "whole lists" },
            bytes as f64 / 1e6,
            bytes as f64 / 1e3 / (n.max(1) * deaths) as f64
        );
    }
    drop(kill_tx);
    let _ = agents.join();
    Ok(())
}
