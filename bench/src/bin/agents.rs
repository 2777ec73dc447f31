//! Many agents on 3 managers (BENCHMARKS.md, issue 4): N simulated agents in
//! this one process, each a real node — it joins with the worker token
//! (CSR, certificate), heartbeats, follows its assignment stream and reports
//! its tasks running at once (no containers: the `SimExecutor` idea at the
//! session level). Then one service with one task per agent is scheduled
//! onto them, and the managers' CPU and RSS are sampled at steady state.
//!
//! Run: `cargo build --release -p shoal-cli -p shoal-bench && target/release/agents [--agents 1000] [--seconds 20]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_bench::arg;
use shoal_security::pki;
use shoal_security::tls::NodeTls;
use shoal_proto::dispatcher::dispatcher_client::DispatcherClient;
use shoal_proto::dispatcher::{AssignmentsRequest, HeartbeatRequest, Resources, TaskStatus, TaskStatusBatch};
use shoal_proto::join::join_client::JoinClient;
use shoal_proto::join::JoinRequest;
use shoal_tests::{netns::in_netns, wait_for, Cluster};

/// Joins as a worker and returns the node's id and TLS material.
async fn join(manager: &str, token: &str, ca_pem: &str, i: u64) -> anyhow::Result<(u64, NodeTls)> {
    let (csr, key_pem) = pki::new_csr()?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .domain_name(pki::CLUSTER_DNS_NAME);
    let channel = shoal_security::tls::endpoint(manager)?.tls_config(tls)?.connect().await?;
    let resp = JoinClient::new(channel)
        .join(JoinRequest {
            token: token.to_string(),
            csr_pem: csr,
            node_name: format!("sim-{i}"),
            advertise_addr: format!("198.18.1.1:{}", 10000 + i),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok((resp.node_id, NodeTls { ca_pem: resp.ca_pem, cert_pem: resp.cert_pem, key_pem }))
}

/// One simulated agent: heartbeats and runs whatever it is assigned.
async fn agent(manager: String, node_id: u64, tls: NodeTls) -> anyhow::Result<()> {
    let channel = shoal_security::Trust::new(tls)?.channel(&manager)?;
    let mut hb = DispatcherClient::new(channel.clone());
    let mut reports = DispatcherClient::new(channel.clone());
    let res = Resources { nano_cpus: 2_000_000_000, memory_bytes: 1 << 30 };
    tokio::spawn(async move {
        loop {
            let _ = hb
                .heartbeat(HeartbeatRequest { node_id, resources: Some(res), ..Default::default() })
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let mut stream = DispatcherClient::new(channel).assignments(AssignmentsRequest { node_id, ..Default::default() }).await?.into_inner();
    while let Some(msg) = stream.message().await? {
        let mut statuses = Vec::new();
        for a in msg.updated {
            let state = if a.desired_state == "running" { "running" } else { "shutdown" };
            if a.state != state {
                statuses.push(TaskStatus { task_id: a.task_id, state: state.into(), ..Default::default() });
            }
        }
        if !statuses.is_empty() {
            reports.update_task_status(TaskStatusBatch { node_id, statuses }).await?;
        }
    }
    Ok(())
}

/// (utime + stime in clock ticks, RSS in KiB) of `pid`.
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

fn main() -> anyhow::Result<()> {
    // First, before any thread starts: SIGINT/SIGTERM remove the cluster.
    shoal_tests::cleanup_on_signals()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n = arg("--agents", 1000);
    let seconds = arg("--seconds", 20);
    let c = Cluster::start(3, 0)?;
    println!("cluster {} ready: 3 managers, bridge {}, dir {}", c.id, c.bridge, c.dir.display());
    c.import_busybox(0, "bb:1")?;
    let token = c.cli_ok(0, &["join-token", "worker", "--format", "json"])?["token"].as_str().unwrap_or_default().to_string();
    let leader = c.leader(0)?;
    let manager = c.hosts[leader].addr();
    let ns = c.hosts[leader].netns.clone();
    let ca = std::fs::read_to_string(c.cert_dir().join("ca.pem"))?;
    let t0 = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    // The agents live on a thread inside a host's namespace for the whole run.
    let agents = std::thread::spawn(move || {
        in_netns(&ns, move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(async move {
                let sem = Arc::new(tokio::sync::Semaphore::new(16));
                let mut joins = Vec::new();
                for i in 0..n {
                    let (m, t, ca, sem) = (manager.clone(), token.clone(), ca.clone(), sem.clone());
                    joins.push(tokio::spawn(async move {
                        let _p = sem.acquire().await?;
                        join(&m, &t, &ca, i).await
                    }));
                }
                for j in joins {
                    let (id, tls) = j.await??;
                    tokio::spawn(agent(manager.clone(), id, tls));
                }
                // Run until the measurement is done.
                tokio::task::spawn_blocking(move || rx.recv()).await?.ok();
                anyhow::Ok(())
            })
        })
    });
    wait_for(Duration::from_secs(600), "every simulated agent ready", || {
        let nodes = c.cli_ok(0, &["node", "ls", "--format", "json"])?;
        let ready = nodes.as_array().map(|a| a.iter().filter(|n| n["status"] == "ready").count()).unwrap_or(0);
        Ok((ready == n as usize + 3).then_some(()))
    })?;
    println!("{n} agents joined and ready in {:.1} s", t0.elapsed().as_secs_f64());
    let t1 = Instant::now();
    let replicas = n.to_string();
    c.cli_ok(0, &["service", "create", "--detach", "--name", "sim", "--replicas", &replicas, "--constraint", "node.role==worker", "bb:1", "sleep", "3600"])?;
    wait_for(Duration::from_secs(600), "every task running", || {
        let s = c.cli_ok(0, &["service", "inspect", "sim", "--format", "json"])?;
        Ok((s["replicas_running"].as_u64() == Some(n)).then_some(()))
    })?;
    println!("{n} tasks on {n} agents running {:.2} s after create", t1.elapsed().as_secs_f64());
    let pids: Vec<u32> = (0..3).filter_map(|i| c.hosts[i].pid()).collect();
    let before: Vec<(u64, u64)> = pids.iter().map(|p| usage(*p)).collect();
    std::thread::sleep(Duration::from_secs(seconds));
    let after: Vec<(u64, u64)> = pids.iter().map(|p| usage(*p)).collect();
    let hz = 100.0; // USER_HZ
    for (i, ((b, _), (a, rss))) in before.iter().zip(&after).enumerate() {
        let role = if i == leader { "leader" } else { "follower" };
        println!(
            "manager n{i} ({role}): {:.1}% of a core, RSS {:.1} MiB, steady state over {seconds} s with {n} agents heartbeating every 500 ms",
            (a - b) as f64 / hz / seconds as f64 * 100.0,
            *rss as f64 / 1024.0
        );
    }
    let _ = tx.send(());
    let _ = agents.join();
    Ok(())
}
