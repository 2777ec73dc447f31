//! Scale (issue 14), CI-sized: hundreds of simulated agents (real nodes to
//! the managers, tasks in a `SimExecutor`: `shoal_tests::sim`) and thousands of tasks
//! converge, and a leader kill loses and duplicates none of them. Speed is
//! measured by the `agents` benchmark, not asserted here.

use std::collections::BTreeSet;
use std::time::Duration;

use shoal_tests::{Cluster, netns::in_netns, sim, wait_for};

const AGENTS: u64 = 300;
const TASKS: u64 = 3000;

/// The service's running tasks (state and desired state running) as slots;
/// an error names what is wrong: a slot run twice, or a slot missing.
fn exact(c: &Cluster, via: usize, service: &str, n: u64) -> anyhow::Result<Option<()>> {
    let ps = c.cli_ok(via, &["service", "ps", service, "--format", "json"])?;
    let mut slots = BTreeSet::new();
    let mut twice = Vec::new();
    for t in ps.as_array().into_iter().flatten() {
        if t["state"] == "running" && t["desired_state"] == "running" {
            let slot = t["slot"].as_u64().unwrap_or(0);
            if !slots.insert(slot) {
                twice.push(slot);
            }
        }
    }
    anyhow::ensure!(twice.is_empty(), "slots running twice: {twice:?}");
    Ok((slots.len() as u64 == n && slots.iter().copied().eq(1..=n)).then_some(()))
}

#[test]
fn hundreds_of_agents_run_thousands_of_tasks_and_a_leader_kill_loses_none() -> anyhow::Result<()> {
    let mut c = Cluster::start(3, 0)?;
    c.import_busybox(0, "bb:1")?;
    let token = c.cli_ok(0, &["join-token", "worker", "--format", "json"])?["token"].as_str().unwrap_or_default().to_string();
    let leader = c.leader(0)?;
    let manager = c.hosts[leader].addr();
    let ca = std::fs::read_to_string(c.cert_dir().join("ca.pem"))?;
    let ns = c.hosts[(leader + 1) % 3].netns.clone();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    // The agents live on a thread inside a host's namespace for the test.
    let agents = std::thread::spawn(move || {
        in_netns(&ns, move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(async move {
                let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
                let mut joins = Vec::new();
                for i in 0..AGENTS {
                    let (m, t, ca, sem) = (manager.clone(), token.clone(), ca.clone(), sem.clone());
                    joins.push(tokio::spawn(async move {
                        let _p = sem.acquire().await?;
                        sim::join(&m, &t, &ca, i).await
                    }));
                }
                for j in joins {
                    tokio::spawn(sim::run(j.await??));
                }
                tokio::task::spawn_blocking(move || stopped.recv()).await?.ok();
                anyhow::Ok(())
            })
        })
    });
    let nodes = AGENTS as usize + 3;
    wait_for(Duration::from_secs(120), "every simulated agent ready", || {
        let ns = c.cli_ok(0, &["node", "ls", "--format", "json"])?;
        let ready = ns.as_array().map(|a| a.iter().filter(|n| n["status"] == "ready" && n["memory_bytes"].as_u64().unwrap_or(0) > 0).count()).unwrap_or(0);
        Ok((ready == nodes).then_some(()))
    })
    .map_err(|e| e.context(c.log_tails()))?;
    let replicas = TASKS.to_string();
    c.cli_ok(0, &["service", "create", "--detach", "--name", "sim", "--replicas", &replicas, "--constraint", "node.role==worker", "bb:1", "sleep", "1d"])?;
    wait_for(Duration::from_secs(150), "every task running, each slot once", || exact(&c, 0, "sim", TASKS))
        .map_err(|e| e.context(c.log_tails()))?;
    // Every agent gets its share: spread is even within one. Under load a
    // node may miss heartbeats and lose tasks to others; the orchestrator
    // then moves tasks back a few per pass, so this converges too.
    wait_for(Duration::from_secs(120), "every agent with its share of the tasks (spread within one)", || {
        let ps = c.cli_ok(0, &["service", "ps", "sim", "--format", "json"])?;
        let mut per_node = std::collections::HashMap::new();
        for t in ps.as_array().into_iter().flatten().filter(|t| t["desired_state"] == "running") {
            *per_node.entry(t["node"].as_str().unwrap_or_default().to_string()).or_insert(0u64) += 1;
        }
        let (min, max) = (per_node.values().min().copied().unwrap_or(0), per_node.values().max().copied().unwrap_or(0));
        Ok((per_node.len() as u64 == AGENTS && max - min <= 1).then_some(()))
    })
    .map_err(|e| e.context(c.log_tails()))?;
    wait_for(Duration::from_secs(60), "every task running, each slot once, after the rebalance", || exact(&c, 0, "sim", TASKS))
        .map_err(|e| e.context(c.log_tails()))?;

    // The agents run tasks through the agent's executor seam (SimExecutor):
    // a command that exits is reported failed with its code, and the
    // orchestrator replaces it.
    c.cli_ok(0, &["service", "create", "--detach", "--name", "crash", "--replicas", "3", "--constraint", "node.role==worker", "bb:1", "exit", "3"])?;
    // `ps` shows each slot's latest task (`attempt` counts the ones before
    // it), and a replacement may be on its way: every slot is seen failed
    // with the code after a replacement, over the polls.
    let mut seen = BTreeSet::new();
    wait_for(Duration::from_secs(60), "crashing tasks reported failed with their exit code, and replaced", || {
        let ps = c.cli_ok(0, &["service", "ps", "crash", "--format", "json"])?;
        for t in ps.as_array().into_iter().flatten() {
            if t["state"] == "failed" && t["exit_code"] == 3 && t["attempt"].as_u64().unwrap_or(0) >= 1 {
                seen.insert(t["slot"].as_u64().unwrap_or(0));
            }
        }
        Ok((seen.len() == 3).then_some(()))
    })
    .map_err(|e| e.context(c.log_tails()))?;
    c.cli_ok(0, &["service", "rm", "crash"])?;

    // The leader dies: another takes over, and every task is still
    // accounted for, none lost and none twice.
    c.kill(leader);
    let via = (leader + 1) % 3;
    wait_for(Duration::from_secs(60), "a new leader", || Ok(c.leader(via).ok().filter(|l| *l != leader)))?;
    wait_for(Duration::from_secs(120), "every task running after the failover, each slot once", || exact(&c, via, "sim", TASKS))
        .map_err(|e| e.context(c.log_tails()))?;
    let s = c.cli_ok(via, &["service", "inspect", "sim", "--format", "json"])?;
    assert_eq!(s["replicas_running"].as_u64(), Some(TASKS), "{s}");
    // The old leader comes back as a follower and agrees.
    c.restart(leader)?;
    wait_for(Duration::from_secs(60), "the old leader back", || {
        let st = c.cli_ok(leader, &["cluster", "status", "--format", "json"]).ok();
        Ok(st.filter(|s| s["leader"] != "").map(|_| ()))
    })?;
    wait_for(Duration::from_secs(60), "the old leader's view: every task once", || exact(&c, leader, "sim", TASKS))?;
    let _ = stop.send(());
    agents.join().map_err(|_| anyhow::anyhow!("the agents' thread panicked"))??;
    Ok(())
}
