//! Scaling benchmarks (BENCHMARKS.md, issue 4) on 5 hosts in network
//! namespaces (3 managers + 2 workers), real busybox `httpd` containers:
//! - `scale web=10` from 1 until all 10 run (as the managers see it);
//! - `scale web=50` from 1 until all 50 run;
//! - `scale web=1` from 10 until the 9 containers are gone.
//!
//! Run: `cargo build --release -p shoal-cli -p shoal-bench && target/release/scale [--trials N]`

use shoal_bench::arg;
use std::time::{Duration, Instant};

use shoal_proto::control::{ListTasksRequest, ScaleItem, ScaleRequest};
use shoal_tests::{netns::in_netns, Cluster};

const FINAL: [&str; 5] = ["complete", "shutdown", "failed", "rejected", "orphaned"];

fn main() -> anyhow::Result<()> {
    // First, before any thread starts: SIGINT/SIGTERM remove the cluster.
    shoal_tests::cleanup_on_signals()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let trials = arg("--trials", 5);
    let c = Cluster::start(3, 2)?;
    c.import_busybox(0, "bb:1")?;
    c.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "1", "bb:1", "httpd", "-f", "-p", "80", "-h", "/www"])?;
    let leader = c.leader(0)?;
    let (addr, certs, ns) = (c.hosts[leader].addr(), c.cert_dir(), c.hosts[leader].netns.clone());
    let results = in_netns(&ns, move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(async move {
            let mut client = shoal_tests::control_client(&addr, &certs).await?;
            // (running, alive): tasks running with desired running; tasks
            // whose container may still exist.
            async fn counts(
                client: &mut shoal_proto::control::control_client::ControlClient<tonic::transport::Channel>,
            ) -> anyhow::Result<(usize, usize)> {
                let ts = client
                    .list_tasks(ListTasksRequest { service: "web".into(), all: false })
                    .await?
                    .into_inner()
                    .tasks;
                let running = ts.iter().filter(|t| t.state == "running" && t.desired_state == "running").count();
                let alive = ts.iter().filter(|t| !FINAL.contains(&t.state.as_str())).count();
                Ok((running, alive))
            }
            async fn scale_to(
                client: &mut shoal_proto::control::control_client::ControlClient<tonic::transport::Channel>,
                n: u64,
            ) -> anyhow::Result<Duration> {
                let t = Instant::now();
                client.scale_services(ScaleRequest { items: vec![ScaleItem { service: "web".into(), replicas: n }] }).await?;
                let deadline = t + Duration::from_secs(120);
                loop {
                    let (running, alive) = counts(client).await?;
                    if running == n as usize && alive == n as usize {
                        return Ok(t.elapsed());
                    }
                    if Instant::now() > deadline {
                        anyhow::bail!("scale to {n} did not converge: {running} running, {alive} alive");
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            let mut up10 = Vec::new();
            let mut up50 = Vec::new();
            let mut down = Vec::new();
            for _ in 0..trials {
                scale_to(&mut client, 1).await?;
                up10.push(scale_to(&mut client, 10).await?);
                down.push(scale_to(&mut client, 1).await?);
                up50.push(scale_to(&mut client, 50).await?);
            }
            scale_to(&mut client, 0).await?;
            anyhow::Ok((up10, up50, down))
        })
    })?;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64()
    };
    let (up10, up50, down) = results;
    println!("scale 1 -> 10 until all running:  median {:.3} s over {trials} trials (all: {:?})", median(up10.clone()), up10);
    println!("scale 1 -> 50 until all running:  median {:.3} s over {trials} trials (all: {:?})", median(up50.clone()), up50);
    println!("scale 10 -> 1 until containers gone: median {:.3} s over {trials} trials (all: {:?})", median(down.clone()), down);
    Ok(())
}
