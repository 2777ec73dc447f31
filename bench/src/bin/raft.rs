//! Cluster-foundation benchmarks (BENCHMARKS.md, issue 2), on a real
//! 3-manager cluster of hosts in network namespaces:
//! - commit latency, one client writing sequentially to the leader;
//! - write throughput, many concurrent clients;
//! - leader failover: `kill -9` the leader → a survivor commits a write;
//! - (issue 12) read latency, linearizable and local, on the leader and on
//!   a follower;
//! - (issue 12) `service create --replicas N` that can go nowhere: the time
//!   until every task exists, and an unrelated write's latency meanwhile.
//!
//! Run: `cargo build --release -p shoal-cli -p shoal-bench && target/release/raft`
//! Options: `--writes N` (latency samples, default 2000), `--throughput-writes N`
//! (default 50000), `--clients N` (default 256), `--trials N` (failover,
//! default 5), `--big N` (replicas of the big service, default 100000).

use shoal_bench::arg;
use std::time::{Duration, Instant};

use anyhow::Context;
use shoal_proto::control::{CreateServiceRequest, ListTasksRequest, NodeRef, ServiceSpec, UpdateNodeRequest};
use shoal_tests::{netns::in_netns, wait_for, Cluster};

/// The smallest real write: a label on node n0. It goes through Raft like
/// any other change, and with no services it gives the orchestrator and
/// scheduler nothing to do, so the figure is the replicated log's own.
fn write(i: u64) -> UpdateNodeRequest {
    UpdateNodeRequest { node: "n0".into(), label_add: [("bench".to_string(), i.to_string())].into(), ..Default::default() }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn main() -> anyhow::Result<()> {
    // First, before any thread starts: SIGINT/SIGTERM remove the cluster.
    shoal_tests::cleanup_on_signals()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let samples = arg("--writes", 2000);
    let total = arg("--throughput-writes", 50_000);
    let clients = arg("--clients", 256);
    let trials = arg("--trials", 5);

    let mut c = Cluster::start(3, 0)?;
    let leader = c.leader(0)?;
    let addr = c.hosts[leader].addr();
    let certs = c.cert_dir();
    let ns = c.hosts[leader].netns.clone();
    c.import_busybox(leader, "bb:1")?;

    // Commit latency: one client, one write at a time, to the leader.
    let lat = {
        let (addr, certs) = (addr.clone(), certs.clone());
        in_netns(&ns, move || {
            rt()?.block_on(async move {
                let mut client = shoal_tests::control_client(&addr, &certs).await?;
                for i in 0..100 {
                    client.update_node(write(i)).await?; // warm up
                }
                let mut lat = Vec::with_capacity(samples as usize);
                for i in 0..samples {
                    let t = Instant::now();
                    client.update_node(write(i)).await?;
                    lat.push(t.elapsed());
                }
                lat.sort();
                anyhow::Ok(lat)
            })
        })?
    };
    println!(
        "commit latency, 1 client, 3 managers: p50 {:.2} ms, p99 {:.2} ms ({} writes)",
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        samples
    );

    // Reads: `inspect n0`, linearizable (a quorum round on the leader; a
    // ReadIndex from the leader on a follower) and local.
    let follower = (leader + 1) % 3;
    for (who, i) in [("leader", leader), ("follower", follower)] {
        let (addr, certs, ns) = (c.hosts[i].addr(), certs.clone(), c.hosts[i].netns.clone());
        let (lin, local) = in_netns(&ns, move || {
            rt()?.block_on(async move {
                let mut client = shoal_tests::control_client(&addr, &certs).await?;
                let mut out = [Vec::new(), Vec::new()];
                for (k, consistency) in ["linearizable", "local"].into_iter().enumerate() {
                    for n in 0..(samples + 100) {
                        let mut req = tonic::Request::new(NodeRef { node: "n0".into() });
                        req.metadata_mut().insert("shoal-consistency", consistency.parse()?);
                        let t = Instant::now();
                        client.inspect_node(req).await?;
                        if n >= 100 {
                            out[k].push(t.elapsed());
                        }
                    }
                    out[k].sort();
                }
                let [lin, local] = out;
                anyhow::Ok((lin, local))
            })
        })?;
        println!(
            "read on the {who}: linearizable p50 {:.2} ms, p99 {:.2} ms; local p50 {:.2} ms, p99 {:.2} ms ({samples} reads each)",
            percentile(&lin, 0.5).as_secs_f64() * 1e3,
            percentile(&lin, 0.99).as_secs_f64() * 1e3,
            percentile(&local, 0.5).as_secs_f64() * 1e3,
            percentile(&local, 0.99).as_secs_f64() * 1e3,
        );
    }

    // Throughput: many clients over a few connections. The load comes from
    // two single-threaded runtimes (one per core, half of the clients and
    // connections each): the same calls, without cross-thread wakeups in the
    // load generator, which shares the 2 cores with the managers.
    let (elapsed, done) = {
        let per = total / clients;
        let start = std::sync::Arc::new(std::sync::Barrier::new(2));
        let mut threads = Vec::new();
        for half in 0..2u64 {
            let (addr, certs, ns, start) = (addr.clone(), certs.clone(), ns.clone(), start.clone());
            threads.push(std::thread::spawn(move || {
                in_netns(&ns, move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    rt.block_on(async move {
                        let mut conns = Vec::new();
                        for _ in 0..4 {
                            conns.push(shoal_tests::control_client(&addr, &certs).await?);
                        }
                        start.wait();
                        let t = Instant::now();
                        let mut tasks = tokio::task::JoinSet::new();
                        for w in (half..clients).step_by(2) {
                            let mut client = conns[(w / 2 % 4) as usize].clone();
                            tasks.spawn(async move {
                                for i in 0..per {
                                    client.update_node(write(w * per + i)).await?;
                                }
                                anyhow::Ok(per)
                            });
                        }
                        let mut done = 0;
                        while let Some(r) = tasks.join_next().await {
                            done += r??;
                        }
                        anyhow::Ok((t.elapsed(), done))
                    })
                })
            }));
        }
        let mut elapsed = Duration::ZERO;
        let mut done = 0;
        for t in threads {
            let (e, d) = t.join().map_err(|_| anyhow::anyhow!("load thread panicked"))??;
            elapsed = elapsed.max(e);
            done += d;
        }
        (elapsed, done)
    };
    println!(
        "write throughput, {clients} clients, 3 managers: {:.0} writes/s ({done} writes in {:.2} s)",
        done as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );

    failover(&mut c, &certs, trials, "")?;
    let leader = c.leader(0).or_else(|_| c.leader(1))?;
    let (addr, ns) = (c.hosts[leader].addr(), c.hosts[leader].netns.clone());
    // A service of `--big` tasks that can go nowhere: until every task
    // exists (pending), while one client writes a label every 20 ms.
    let big = arg("--big", 100_000);
    {
        let (addr, certs) = (addr.clone(), certs.clone());
        let (took, lat) = in_netns(&ns, move || {
            rt()?.block_on(async move {
                let mut client = shoal_tests::control_client(&addr, &certs).await?;
                let mut writer = client.clone();
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let stop2 = stop.clone();
                let writes = tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut i = 0;
                    while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                        let t = Instant::now();
                        writer.update_node(write(1_000_000 + i)).await?;
                        lat.push(t.elapsed());
                        i += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    anyhow::Ok(lat)
                });
                let spec = ServiceSpec {
                    name: "big".into(),
                    image: "bb:1".into(),
                    mode: "replicated".into(),
                    replicas: big,
                    constraints: vec!["node.labels.nope==x".into()],
                    args: vec!["sleep".into(), "1".into()],
                    ..Default::default()
                };
                let t = Instant::now();
                client.create_service(CreateServiceRequest { spec: Some(spec) }).await?;
                let mut client = client.max_decoding_message_size(512 << 20);
                loop {
                    let tasks = client.list_tasks(ListTasksRequest { service: "big".into(), all: false }).await?.into_inner().tasks;
                    if tasks.len() as u64 == big && tasks.iter().all(|t| t.state == "pending") {
                        break;
                    }
                    anyhow::ensure!(t.elapsed() < Duration::from_secs(600), "{} of {big} tasks after 10 min", tasks.len());
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                let took = t.elapsed();
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let mut lat = writes.await??;
                lat.sort();
                anyhow::Ok((took, lat))
            })
        })?;
        println!(
            "service create --replicas {big} (pending): every task exists after {:.1} s; an unrelated write meanwhile: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} writes)",
            took.as_secs_f64(),
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            lat.last().map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0),
            lat.len()
        );
    }

    // And again with those tasks in the state (every manager holds them;
    // a new leader's first passes go over them).
    failover(&mut c, &certs, 3.min(trials), &format!(" with {big} tasks in the state"))?;
    Ok(())
}

/// Failover: kill -9 the leader; how long until a survivor commits?
fn failover(c: &mut Cluster, certs: &std::path::Path, trials: u64, what: &str) -> anyhow::Result<()> {
    let certs = certs.to_path_buf();
    let mut times = Vec::new();
    for trial in 0..trials {
        let old = c.leader(0).or_else(|_| c.leader(1))?;
        let survivor = (old + 1) % 3;
        let (addr, certs, ns) = (c.hosts[survivor].addr(), certs.clone(), c.hosts[survivor].netns.clone());
        let (tx, rx) = std::sync::mpsc::channel::<Instant>();
        let writer = std::thread::spawn(move || {
            in_netns(&ns, move || {
                rt()?.block_on(async move {
                    let mut client = shoal_tests::control_client(&addr, &certs).await?;
                    let killed = rx.recv().context("no kill time")?;
                    let mut i = 0;
                    loop {
                        i += 1;
                        let call = client.update_node(write(i));
                        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), call).await {
                            return anyhow::Ok(killed.elapsed());
                        }
                        if killed.elapsed() > Duration::from_secs(30) {
                            anyhow::bail!("no write committed within 30 s of the kill");
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
        });
        let t = Instant::now();
        c.kill(old);
        tx.send(t)?;
        let took = writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        println!("failover trial {trial}: {:.0} ms from kill -9 to a committed write", took.as_secs_f64() * 1e3);
        times.push(took);
        c.restart(old)?;
        c.wait_converged(survivor, 3, 3)?;
        wait_for(Duration::from_secs(30), "the cluster to settle", || Ok(c.leader(survivor).ok()))?;
    }
    times.sort();
    println!(
        "leader failover{what} (kill -9 → new leader commits): median {:.0} ms, max {:.0} ms over {trials} trials",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        times.last().map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0)
    );
    Ok(())
}
