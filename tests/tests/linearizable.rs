//! Linearizability under faults, checked: concurrent clients write and read
//! one register (a node label) through every manager while the leader is
//! killed and a manager is partitioned; the history they record must be
//! linearizable (Wing–Gong with Lowe's memoization, `shoal_tests::
//! linearizability`). The same checker must reject the history of a
//! deliberately broken mode that serves reads without the read barrier.

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_tests::linearizability::{check, Operation, Register, RegisterOp, RegisterOut, PENDING};
use shoal_tests::{wait_for, Cluster, DaemonOpts};

type History = Vec<Operation<RegisterOp, RegisterOut>>;

/// How a client reaches one manager: the CLI in that host's namespace.
#[derive(Clone)]
struct Client {
    netns: String,
    addr: String,
    cert_dir: std::path::PathBuf,
}

impl Client {
    fn of(c: &Cluster, i: usize) -> Client {
        Client { netns: c.hosts[i].netns.clone(), addr: c.hosts[i].addr(), cert_dir: c.cert_dir() }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["--kill-after=2", "20", "nsenter"])
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(shoal_tests::shoal_bin())
            .args(["--host", &self.addr, "--cert-dir"])
            .arg(&self.cert_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running the CLI: {e}"))
    }

    fn write(&self, v: u64) -> bool {
        self.run(&["node", "update", "--label-add", &format!("lin={v}"), "n0"]).status.success()
    }

    /// The register's value, None when the read failed.
    fn read(&self) -> Option<u64> {
        let out = self.run(&["node", "inspect", "n0", "--format", "json"]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(v["labels"]["lin"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0))
    }
}

/// Records operations against one clock.
struct Recorder {
    start: Instant,
    history: Mutex<History>,
    ok: AtomicUsize,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn write(&self, client: usize, c: &Client, v: u64) -> bool {
        let call = self.now();
        let ok = c.write(v);
        // A failed write may still have been applied: it may take effect
        // any time after its call, or never.
        let (output, ret) = if ok { (RegisterOut::Ok, self.now()) } else { (RegisterOut::Unknown, PENDING) };
        self.push(Operation { client, input: RegisterOp::Write(v), call, output, ret });
        ok
    }

    fn read(&self, client: usize, c: &Client) -> Option<u64> {
        let call = self.now();
        let got = c.read();
        // A failed read tells nothing: left out.
        if let Some(v) = got {
            self.push(Operation { client, input: RegisterOp::Read, call, output: RegisterOut::Value(v), ret: self.now() });
        }
        got
    }

    fn push(&self, op: Operation<RegisterOp, RegisterOut>) {
        if op.ret != PENDING {
            self.ok.fetch_add(1, Ordering::Relaxed);
        }
        self.history.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }
}

fn cluster(extra: &[&str]) -> anyhow::Result<Cluster> {
    let mut c = Cluster::hosts(3)?;
    let opts = DaemonOpts { extra: extra.iter().map(|s| s.to_string()).collect() };
    c.init(0, &opts)?;
    for i in 1..3 {
        c.join(i, 0, "manager", &opts)?;
    }
    c.wait_converged(0, 3, 3)?;
    Ok(c)
}

/// Waits until `n` more operations than now have completed.
fn wait_ops(r: &Recorder, n: usize, what: &str) -> anyhow::Result<()> {
    let target = r.ok.load(Ordering::Relaxed) + n;
    wait_for(Duration::from_secs(60), what, || Ok((r.ok.load(Ordering::Relaxed) >= target).then_some(())))
}

#[test]
fn reads_and_writes_stay_linearizable_while_leaders_die_and_managers_are_cut_off() -> anyhow::Result<()> {
    let mut c = cluster(&[])?;
    let clients: Vec<Client> = (0..3).map(|i| Client::of(&c, i)).collect();
    let rec = Arc::new(Recorder { start: Instant::now(), history: Mutex::new(Vec::new()), ok: AtomicUsize::new(0) });
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = clients
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, client)| {
            let (rec, stop) = (rec.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let ok = if x % 2 == 0 {
                        seq += 1;
                        rec.write(i, &client, (i as u64 + 1) * 1_000_000 + seq)
                    } else {
                        rec.read(i, &client).is_some()
                    };
                    if !ok {
                        // Pace a client whose manager can't answer (it is
                        // down or cut off): few unknown outcomes.
                        std::thread::sleep(Duration::from_millis(300));
                    }
                }
            })
        })
        .collect();

    wait_ops(&rec, 40, "the first operations")?;
    // The leader dies, and later comes back.
    let leader = c.leader(0)?;
    c.kill(leader);
    let other = (0..3).find(|i| *i != leader).unwrap_or(0);
    wait_for(Duration::from_secs(30), "a new leader", || Ok(c.leader(other).ok().filter(|l| *l != leader)))?;
    wait_ops(&rec, 40, "operations under the new leader")?;
    c.restart(leader)?;
    c.wait_converged(other, 3, 3)?;
    // A follower is cut off from the others (its client still reaches it).
    let leader = c.leader(other)?;
    let cut = (0..3).find(|i| *i != leader).unwrap_or(0);
    c.set_link(cut, false)?;
    wait_ops(&rec, 40, "operations while a manager is cut off")?;
    c.set_link(cut, true)?;
    c.wait_converged(leader, 3, 3)?;
    wait_ops(&rec, 20, "operations after healing")?;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("a client panicked"))?;
    }

    let history = std::mem::take(&mut *rec.history.lock().unwrap_or_else(|e| e.into_inner()));
    let reads = history.iter().filter(|o| matches!(o.input, RegisterOp::Read)).count();
    let pending = history.iter().filter(|o| o.ret == PENDING).count();
    eprintln!("history: {} operations, {reads} reads, {pending} writes with unknown outcome", history.len());
    assert!(reads >= 10 && history.len() - reads >= 10, "too few operations to mean anything");
    check(&Register { init: 0 }, &history).map_err(|e| anyhow::anyhow!("not linearizable:\n{e}"))?;
    Ok(())
}

#[test]
fn the_checker_catches_reads_served_without_the_read_barrier() -> anyhow::Result<()> {
    for stale in [false, true] {
        let c = cluster(if stale { &["--fault-stale-reads"] } else { &[] })?;
        let leader = c.leader(0)?;
        let cut = (0..3).find(|i| *i != leader).unwrap_or(0);
        let (at_leader, at_cut) = (Client::of(&c, leader), Client::of(&c, cut));
        let rec = Recorder { start: Instant::now(), history: Mutex::new(Vec::new()), ok: AtomicUsize::new(0) };
        assert!(rec.write(0, &at_leader, 1), "first write");
        wait_for(Duration::from_secs(10), "the write to reach the follower", || {
            let out = at_cut.run(&["--consistency", "local", "node", "inspect", "n0", "--format", "json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            Ok((v["labels"]["lin"] == "1").then_some(()))
        })?;
        c.set_link(cut, false)?;
        assert!(rec.write(0, &at_leader, 2), "second write, with the follower cut off");
        let got = rec.read(1, &at_cut);
        c.set_link(cut, true)?;
        let history = std::mem::take(&mut *rec.history.lock().unwrap_or_else(|e| e.into_inner()));
        let verdict = check(&Register { init: 0 }, &history);
        if stale {
            assert_eq!(got, Some(1), "the broken mode answers from the cut-off follower's old state");
            assert!(verdict.is_err(), "the checker accepted a stale read: {history:?}");
        } else {
            assert_eq!(got, None, "a cut-off follower must refuse a linearizable read");
            verdict.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    Ok(())
}
