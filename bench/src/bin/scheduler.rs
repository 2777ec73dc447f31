//! Scheduler benchmark (BENCHMARKS.md, issue 4): the scheduler's decision
//! alone — `shoal_manager::scheduler::schedule`, a pure function of the
//! store's state, no Raft, no network — placing 100,000 new tasks onto
//! 1,000 ready nodes held in memory.
//!
//! Two workloads, each timed 5 times (median reported):
//! - `one service`: one service with 100,000 replicas;
//! - `mixed`: 100 services × 1,000 replicas, every one with a memory and
//!   cpu reservation, a tenth with a constraint (`node.labels.zone!=c`) and
//!   a tenth with `spread=node.labels.zone`; nodes in 3 zones, and 1,000
//!   tasks already running to spread around.
//!
//! Then the orchestrator's decision (`reconcile`) at the same size, for
//! context: a scale from 0 to 100,000 replicas, a pass over 100,000
//! running tasks with nothing to do, and a scale down to 50,000.
//!
//! Run: `cargo run --release -p shoal-bench --bin scheduler`
//! Options: `--nodes N` (default 1000), `--tasks N` (default 100000), `--runs N` (default 5).

use shoal_bench::arg;
use std::time::{Duration, Instant};

use shoal_manager::orchestrator::{OrchestratorConfig, Scope, reconcile};
use shoal_manager::scheduler::{SchedulerConfig, schedule};
use shoal_manager::store::task::TaskUpdate;
use shoal_manager::store::objects::{NodeObj, Role, ServiceObj};
use shoal_manager::store::task::{TaskObj, TaskState};
use shoal_manager::store::{Command, State};
use shoal_proto::control::{Resources, ServiceSpec};

struct Builder {
    state: State,
    index: u64,
}

impl Builder {
    fn apply(&mut self, cmd: Command) -> anyhow::Result<()> {
        self.index += 1;
        self.state.apply(self.index, 1_000, cmd, &mut Vec::new())?;
        Ok(())
    }
}

fn task(svc: &ServiceObj, slot: u64, n: u64) -> TaskObj {
    TaskObj { id: format!("{}-{slot:06}-{n}", svc.spec.name), spec_version: 1, ..TaskObj::new(svc, slot, None, 0, "") }
}

/// `services` services sharing `tasks` new tasks over `nodes` nodes.
fn build(nodes: u64, services: u64, tasks: u64, mixed: bool) -> anyhow::Result<State> {
    let mut b = Builder { state: State::default(), index: 0 };
    for i in 0..nodes {
        let zone = ["a", "b", "c"][(i % 3) as usize];
        b.apply(Command::AddNode {
            node: NodeObj {
                labels: [("zone".to_string(), zone.to_string())].into(),
                nano_cpus: 64_000_000_000,
                memory_bytes: 256 << 30,
                ..NodeObj::new(i + 1, &format!("node-{i:04}"), if i < 3 { Role::Manager } else { Role::Worker }, "")
            },
        })?;
    }
    let per = tasks / services;
    for s in 0..services {
        let mut spec = ServiceSpec {
            name: format!("svc{s:03}"),
            image: "bb:1".into(),
            mode: "replicated".into(),
            replicas: per,
            ..Default::default()
        };
        if mixed {
            spec.reservations = Some(Resources { nano_cpus: 10_000_000, memory_bytes: 16 << 20, pids: 0 });
            if s % 10 == 1 {
                spec.constraints.push("node.labels.zone!=c".into());
            }
            if s % 10 == 2 {
                spec.placement_prefs.push("spread=node.labels.zone".into());
            }
        }
        let svc = ServiceObj { version: 1, ..ServiceObj::new(format!("id{s:03}"), spec) };
        b.apply(Command::CreateService { service: Box::new(svc.clone()) })?;
        let new: Vec<TaskObj> = (1..=per).map(|slot| task(&svc, slot, 0)).collect();
        b.apply(Command::CreateTasks { tasks: new })?;
    }
    if mixed {
        // Work already running, unevenly: the first tenth of the nodes.
        let svc = ServiceObj {
            version: 1,
            ..ServiceObj::new(
                "existing".into(),
                ServiceSpec { name: "existing".into(), image: "bb:1".into(), mode: "replicated".into(), replicas: nodes, ..Default::default() },
            )
        };
        b.apply(Command::CreateService { service: Box::new(svc.clone()) })?;
        let running: Vec<TaskObj> = (1..=nodes)
            .map(|slot| {
                let mut t = task(&svc, slot, 0);
                t.state = TaskState::Running;
                t.node_id = Some(1 + slot % (nodes / 10).max(1));
                t
            })
            .collect();
        b.apply(Command::CreateTasks { tasks: running })?;
    }
    Ok(b.state)
}

fn run(label: &str, state: &State, expect: usize, runs: u64) -> anyhow::Result<f64> {
    let config = SchedulerConfig::default();
    let mut times: Vec<Duration> = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let d = schedule(state, &config);
        let took = started.elapsed();
        anyhow::ensure!(d.assigned.len() == expect, "{label}: placed {} of {expect}", d.assigned.len());
        times.push(took);
        drop(d);
    }
    times.sort();
    let median = times[times.len() / 2];
    let rate = expect as f64 / median.as_secs_f64();
    println!(
        "{label:>12}: {expect} tasks in {:>7.1} ms (median of {runs}; min {:.1} ms, max {:.1} ms) = {rate:>10.0} placements/s",
        median.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
    );
    Ok(rate)
}

fn main() -> anyhow::Result<()> {
    let nodes = arg("--nodes", 1000);
    let tasks = arg("--tasks", 100_000);
    let runs = arg("--runs", 5).max(1);
    println!("scheduler: {tasks} new tasks onto {nodes} nodes, pure decision (no Raft), {runs} runs");
    let state = build(nodes, 1, tasks, false)?;
    run("one service", &state, tasks as usize, runs)?;
    let services = 100.min(tasks).max(1);
    let state = build(nodes, services, tasks, true)?;
    let placed = (tasks / services * services) as usize;
    run("mixed", &state, placed, runs)?;
    orchestrator(nodes, tasks, runs)?;
    Ok(())
}

fn median_ms(runs: u64, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        f()?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2].as_secs_f64() * 1e3)
}

fn orchestrator(nodes: u64, tasks: u64, runs: u64) -> anyhow::Result<()> {
    let config = OrchestratorConfig::default();
    // The service without tasks: a scale from 0.
    let mut state = build(nodes, 1, tasks, false)?;
    let ids: Vec<String> = state.tasks.keys().cloned().collect();
    let mut b = Builder { state: std::mem::take(&mut state), index: 1_000_000 };
    b.apply(Command::RemoveTasks { ids })?;
    let now = 10_000;
    let ms = median_ms(runs, || {
        let plan = reconcile(&b.state, &Scope::All, now, &config);
        anyhow::ensure!(plan.create.len() == tasks as usize, "scale up planned {}", plan.create.len());
        Ok(())
    })?;
    println!("orchestrator: scale 0 -> {tasks}: {ms:.1} ms (median of {runs})");

    // Create, place and run them all, then a pass with nothing to do.
    let mut plan = reconcile(&b.state, &Scope::All, now, &config);
    for (i, t) in plan.create.iter_mut().enumerate() {
        t.id = format!("t{i:08}");
    }
    b.apply(Command::CreateTasks { tasks: std::mem::take(&mut plan.create) })?;
    let d = schedule(&b.state, &SchedulerConfig::default());
    b.apply(Command::UpdateTasks { from_node: None, updates: d.into_updates() })?;
    let mut by_node: std::collections::BTreeMap<u64, Vec<TaskUpdate>> = Default::default();
    for t in b.state.tasks.values() {
        if let Some(n) = t.node_id {
            by_node.entry(n).or_default().push(TaskUpdate { id: t.id.clone(), state: Some(TaskState::Running), ..Default::default() });
        }
    }
    for (n, updates) in by_node {
        b.apply(Command::UpdateTasks { from_node: Some(n), updates })?;
    }
    let ms = median_ms(runs, || {
        let plan = reconcile(&b.state, &Scope::All, now, &config);
        anyhow::ensure!(plan.is_empty(), "steady state planned {} creates, {} updates", plan.create.len(), plan.update.len());
        Ok(())
    })?;
    println!("orchestrator: pass over {tasks} running tasks, nothing to do: {ms:.1} ms (median of {runs})");

    b.apply(Command::ScaleServices { items: vec![("svc000".into(), tasks / 2)] })?;
    let ms = median_ms(runs, || {
        let plan = reconcile(&b.state, &Scope::All, now, &config);
        anyhow::ensure!(plan.update.len() == (tasks - tasks / 2) as usize, "scale down retired {}", plan.update.len());
        Ok(())
    })?;
    println!("orchestrator: scale {tasks} -> {}: {ms:.1} ms (median of {runs})", tasks / 2);
    Ok(())
}
