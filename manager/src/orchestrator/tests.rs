//! Orchestrator unit tests: plain data, no cluster.

use super::reconcile::{Plan, Restart, Scope, reconcile, restart_decision};
use super::testkit::*;
use crate::store::Command;
use crate::store::objects::{Availability, NodeStatus};
use crate::store::task::{TaskObj, TaskState, TaskUpdate};

fn slots(tasks: &[&TaskObj]) -> Vec<u64> {
    let mut s: Vec<u64> = tasks.iter().map(|t| t.slot).collect();
    s.sort();
    s
}

#[test]
fn a_big_scale_up_is_created_in_bounded_steps() {
    use super::reconcile::MAX_CREATE_PER_PASS;
    let mut sim = Sim::default();
    sim.nodes(&["w1"]);
    let web = sim.service(spec("web", (2 * MAX_CREATE_PER_PASS + 7) as u64));
    let plan = sim.orchestrate();
    assert_eq!(plan.create.len(), MAX_CREATE_PER_PASS);
    // The orchestrator looks at `web` again next pass, changes or not.
    assert_eq!(plan.unfinished, vec![web.clone()]);
    let left = format!("service web: scaling up to {}: {} tasks left for the next passes", 2 * MAX_CREATE_PER_PASS + 7, MAX_CREATE_PER_PASS + 7);
    assert!(plan.notes.iter().any(|n| *n == left), "{:?}", plan.notes);
    assert_eq!(sim.orchestrate().create.len(), MAX_CREATE_PER_PASS);
    let last = sim.orchestrate();
    assert_eq!((last.create.len(), last.unfinished.len()), (7, 0));
    assert!(sim.orchestrate().is_empty());
    let mut got = slots(&sim.live("web"));
    got.dedup();
    assert_eq!(got, (1..=(2 * MAX_CREATE_PER_PASS as u64 + 7)).collect::<Vec<_>>());
}

#[test]
fn scale_up_creates_the_missing_slots_in_state_new() {
    let mut sim = Sim::default();
    sim.nodes(&["w1", "w2"]);
    sim.service(spec("web", 3));
    let plan = sim.orchestrate();
    assert_eq!(plan.create.len(), 3);
    assert!(plan.create.iter().all(|t| t.state == TaskState::New && t.desired_state == TaskState::Running && t.node_id.is_none() && t.attempt == 0));
    assert_eq!(slots(&sim.live("web")), vec![1, 2, 3]);
    assert!(plan.notes.iter().any(|n| n == "service web: scaled up to 3: 3 tasks created"), "{:?}", plan.notes);
    // Idempotent: a second pass changes nothing.
    assert!(sim.orchestrate().is_empty());
    sim.settle();
    assert_eq!(sim.running("web").len(), 3);
    sim.scale("web", 5);
    sim.settle();
    assert_eq!(slots(&sim.running("web")), vec![1, 2, 3, 4, 5]);
}

#[test]
fn scale_down_retires_tasks_on_the_busiest_nodes_first() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b", "c"]);
    sim.service(spec("web", 5));
    // Only a takes tasks for a while: 3 land there.
    sim.set_availability("b", Availability::Pause);
    sim.set_availability("c", Availability::Pause);
    sim.scale("web", 3);
    sim.settle();
    sim.set_availability("b", Availability::Active);
    sim.set_availability("c", Availability::Active);
    sim.config.rebalance = false;
    sim.scale("web", 5);
    sim.settle();
    assert_eq!(sim.spread("web").values().copied().collect::<Vec<_>>(), vec![3, 1, 1]);

    sim.scale("web", 3);
    let plan = sim.orchestrate();
    let retired: Vec<String> = plan
        .update
        .iter()
        .filter(|u| u.desired_state == Some(TaskState::Shutdown))
        .map(|u| sim.node_name(&sim.state.tasks[&u.id]))
        .collect();
    assert_eq!(retired, vec!["a", "a"]);
    sim.settle();
    assert_eq!(sim.spread("web").values().copied().collect::<Vec<_>>(), vec![1, 1, 1]);
    assert!(plan.notes.iter().any(|n| n == "service web: scaled down: 2 tasks retired"), "{:?}", plan.notes);
}

#[test]
fn scale_down_drops_tasks_without_a_node_before_running_ones() {
    let mut sim = Sim::default();
    sim.nodes(&["a"]);
    sim.service(with_memory(spec("web", 3), 2 * GIB));
    sim.settle();
    // 4 GiB: two fit, the third waits.
    assert_eq!(sim.running("web").len(), 2);
    let waiting: Vec<String> = sim.live("web").iter().filter(|t| t.state == TaskState::Pending).map(|t| t.id.clone()).collect();
    assert_eq!(waiting.len(), 1);
    sim.scale("web", 2);
    sim.orchestrate();
    // Never assigned: shut down on the spot, not left for an agent.
    assert_eq!(sim.state.tasks[&waiting[0]].state, TaskState::Shutdown);
    sim.settle();
    assert_eq!(sim.running("web").len(), 2);
}

#[test]
fn scale_to_zero_retires_everything() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    sim.service(spec("web", 4));
    sim.settle();
    sim.scale("web", 0);
    sim.settle();
    assert!(sim.live("web").is_empty());
    assert!(sim.tasks_of("web").iter().all(|t| t.state == TaskState::Shutdown));
}

#[test]
fn global_runs_on_every_eligible_node_and_on_nodes_that_join_later() {
    let mut sim = Sim::default();
    sim.node("a", &[("disk", "ssd")]);
    sim.node("b", &[("disk", "ssd")]);
    sim.node("c", &[("disk", "hdd")]);
    sim.node("p", &[("disk", "ssd")]);
    sim.set_availability("p", Availability::Pause);
    let mut g = global("mon");
    g.constraints.push("node.labels.disk==ssd".into());
    sim.service(g);
    let plan = sim.orchestrate();
    // Created with their node set: the scheduler only checks that node.
    let mut nodes: Vec<String> = plan.create.iter().map(|t| sim.node_name(t)).collect();
    nodes.sort();
    assert_eq!(nodes, vec!["a", "b"]);
    assert!(plan.create.iter().all(|t| t.slot == 0 && t.state == TaskState::New));
    sim.settle();
    assert_eq!(sim.spread("mon").into_iter().filter(|(_, n)| *n == 1).count(), 2);

    sim.node("d", &[("disk", "ssd")]);
    sim.settle();
    assert_eq!(sim.spread("mon")["d"], 1);
    sim.set_availability("p", Availability::Active);
    sim.settle();
    assert_eq!(sim.spread("mon")["p"], 1);
    assert_eq!(sim.running("mon").len(), 4);
}

#[test]
fn global_tasks_leave_drained_and_down_nodes_and_come_back() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b", "c"]);
    sim.service(global("mon"));
    sim.settle();
    assert_eq!(sim.running("mon").len(), 3);

    sim.set_availability("a", Availability::Drain);
    sim.set_status("b", NodeStatus::Down);
    let plan = sim.orchestrate();
    assert!(plan.create.is_empty(), "global tasks are not replaced elsewhere");
    sim.settle();
    let on = |sim: &Sim, node: &str| -> Vec<TaskState> {
        let id = sim.node_id(node);
        sim.tasks_of("mon").iter().filter(|t| t.node_id == Some(id)).map(|t| t.state).collect()
    };
    assert_eq!(on(&sim, "a"), vec![TaskState::Shutdown]);
    assert_eq!(on(&sim, "b"), vec![TaskState::Orphaned]);
    assert_eq!(sim.running("mon").len(), 1);

    sim.set_availability("a", Availability::Active);
    sim.set_status("b", NodeStatus::Ready);
    sim.settle();
    assert_eq!(sim.running("mon").len(), 3);
    // b got a fresh task; the orphaned one stays in its history.
    assert_eq!(on(&sim, "b").len(), 2);
}

#[test]
fn drain_moves_every_task_off_the_node() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b", "c"]);
    sim.service(spec("web", 6));
    sim.settle();
    assert_eq!(sim.spread("web")["a"], 2);
    sim.set_availability("a", Availability::Drain);
    let plan = sim.orchestrate();
    assert_eq!(plan.create.len(), 2);
    assert!(plan.notes.iter().any(|n| n == "service web: 2 tasks moved off drained node a"), "{:?}", plan.notes);
    sim.settle();
    let spread = sim.spread("web");
    assert_eq!((spread["a"], spread["b"], spread["c"]), (0, 3, 3));
    assert_eq!(slots(&sim.running("web")), vec![1, 2, 3, 4, 5, 6]);
    // The stopped tasks were stopped by the agent, not orphaned.
    let a = sim.node_id("a");
    assert!(sim.tasks_of("web").iter().filter(|t| t.node_id == Some(a)).all(|t| t.state == TaskState::Shutdown));
}

#[test]
fn pause_keeps_tasks_but_takes_no_new_ones() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    sim.service(spec("web", 2));
    sim.settle();
    sim.set_availability("a", Availability::Pause);
    sim.settle();
    assert_eq!(sim.spread("web")["a"], 1);
    sim.scale("web", 4);
    sim.settle();
    assert_eq!(sim.spread("web")["a"], 1);
    assert_eq!(sim.spread("web")["b"], 3);
}

#[test]
fn tasks_on_a_down_node_are_orphaned_and_replaced_elsewhere() {
    let mut sim = Sim::default();
    sim.nodes(&["w1", "w2", "w3"]);
    sim.service(spec("web", 6));
    sim.settle();
    let w2 = sim.node_id("w2");
    let lost: Vec<(String, u64)> =
        sim.running("web").iter().filter(|t| t.node_id == Some(w2)).map(|t| (t.id.clone(), t.slot)).collect();
    assert_eq!(lost.len(), 2);

    sim.set_status("w2", NodeStatus::Down);
    let plan = sim.orchestrate();
    assert!(plan.notes.iter().any(|n| n == "service web: 2 tasks orphaned on down node w2, replacing"), "{:?}", plan.notes);
    for (id, slot) in &lost {
        let t = &sim.state.tasks[id];
        assert_eq!((t.state, t.desired_state), (TaskState::Orphaned, TaskState::Shutdown));
        assert!(t.message.contains("w2 is down"), "{}", t.message);
        // Same slot, next attempt.
        assert!(plan.create.iter().any(|n| n.slot == *slot && n.attempt == 1));
    }
    sim.settle();
    let spread = sim.spread("web");
    assert_eq!((spread["w1"], spread["w2"], spread["w3"]), (3, 0, 3));
    assert_eq!(slots(&sim.running("web")), vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn tasks_on_a_removed_node_are_orphaned() {
    let mut sim = Sim::default();
    sim.nodes(&["w1", "w2"]);
    sim.service(spec("web", 2));
    sim.settle();
    let w2 = sim.node_id("w2");
    sim.set_status("w2", NodeStatus::Down);
    sim.apply(Command::RemoveNode { id: w2, force: true });
    sim.settle();
    assert!(sim.tasks_of("web").iter().filter(|t| t.node_id == Some(w2)).all(|t| t.state == TaskState::Orphaned));
    assert_eq!(sim.spread("web")["w1"], 2);
}

/// Runs the only task of `web` to `end` and lets the orchestrator react.
fn end_current(sim: &mut Sim, end: TaskState, exit: Option<i32>) -> String {
    let id = sim.live("web")[0].id.clone();
    sim.report(&id, end, exit);
    id
}

#[test]
fn restart_condition_none_never_restarts() {
    let mut sim = Sim::default();
    sim.nodes(&["a"]);
    sim.service(with_restart(spec("web", 1), "none", 0, 0, 0));
    sim.settle();
    end_current(&mut sim, TaskState::Failed, Some(1));
    sim.settle();
    assert_eq!(sim.tasks_of("web").len(), 1);
    assert!(sim.live("web").is_empty());
    // The slot stays filled by its ended task: no new task either.
    assert!(sim.orchestrate().is_empty());
}

#[test]
fn restart_on_failure_restarts_failures_only() {
    let mut sim = Sim::default();
    sim.nodes(&["a"]);
    sim.service(with_restart(spec("web", 1), "on-failure", 0, 0, 0));
    sim.settle();
    let first = end_current(&mut sim, TaskState::Failed, Some(2));
    sim.settle();
    let next = sim.running("web");
    assert_eq!(next.len(), 1);
    assert_eq!((next[0].slot, next[0].attempt), (1, 1));
    assert_eq!(sim.state.tasks[&first].desired_state, TaskState::Shutdown);
    end_current(&mut sim, TaskState::Complete, Some(0));
    sim.settle();
    assert!(sim.running("web").is_empty());
}

#[test]
fn restart_any_restarts_completed_tasks() {
    let mut sim = Sim::default();
    sim.nodes(&["a"]);
    sim.service(with_restart(spec("web", 1), "any", 0, 0, 0));
    sim.settle();
    end_current(&mut sim, TaskState::Complete, Some(0));
    // No delay set: a short backoff still applies.
    let plan = sim.orchestrate();
    assert!(plan.create.is_empty());
    assert_eq!(plan.wake_at_ms, Some(sim.now + 100));
    sim.now += 100;
    let plan = sim.orchestrate();
    assert_eq!(plan.create.len(), 1);
    assert!(plan.notes.iter().any(|n| n == "service web: 1 task restarted (complete)"), "{:?}", plan.notes);
    sim.settle();
    assert_eq!(sim.running("web").len(), 1);
}

#[test]
fn restart_on_failure_stops_after_max_attempts() {
    let mut sim = Sim::default();
    sim.nodes(&["a"]);
    sim.service(with_restart(spec("web", 1), "on-failure", 2, 0, 0));
    sim.settle();
    for _ in 0..3 {
        end_current(&mut sim, TaskState::Failed, Some(1));
        sim.settle();
    }
    // The original and 2 restarts, all failed; nothing else.
    let mut attempts: Vec<u64> = sim.tasks_of("web").iter().map(|t| t.attempt).collect();
    attempts.sort();
    assert_eq!(attempts, vec![0, 1, 2]);
    assert!(sim.live("web").is_empty());
    assert!(sim.orchestrate().is_empty());
}

#[test]
fn restart_delay_waits_without_blocking_and_wakes_on_time() {
    let mut sim = Sim::default();
    sim.nodes(&["a"]);
    sim.service(with_restart(spec("web", 1), "any", 0, 5_000, 0));
    sim.settle();
    end_current(&mut sim, TaskState::Failed, Some(1));
    let ended_at = sim.now;
    sim.now += 1_000;
    let plan = sim.orchestrate();
    assert!(plan.is_empty());
    assert_eq!(plan.wake_at_ms, Some(ended_at + 5_000));
    sim.now = ended_at + 5_000;
    let plan = sim.orchestrate();
    assert_eq!(plan.create.len(), 1);
    assert_eq!(plan.wake_at_ms, None);
}

#[test]
fn an_unset_restart_delay_backs_off_up_to_five_seconds() {
    use super::reconcile::backoff_ms;
    assert_eq!([0, 1, 2, 3, 4, 5, 6, 7, 60].map(backoff_ms), [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
}

#[test]
fn restart_window_counts_only_recent_restarts() {
    let s = with_restart(spec("web", 1), "any", 2, 0, 60_000);
    let svc = crate::store::objects::ServiceObj::new("s".into(), s.clone());
    let task = |id: &str, attempt: u64, created: u64| TaskObj {
        id: id.into(),
        spec_version: 1,
        state: TaskState::Failed,
        exit_code: Some(1),
        created_at_ms: created,
        updated_at_ms: created,
        state_at_ms: created + 10,
        version: 1,
        ..TaskObj::new(&svc, 1, Some(1), attempt, "")
    };
    let now = 1_000_000;
    let old1 = task("a", 1, now - 200_000);
    let old2 = task("b", 2, now - 100_000);
    let recent = task("c", 3, now - 1_000);
    // Two restarts long ago, one recent: within the window only one counts.
    assert_eq!(restart_decision(&s, &recent, &[&old1, &old2], now), Restart::Now);
    let recent2 = task("d", 4, now - 500);
    assert_eq!(restart_decision(&s, &recent2, &[&old1, &old2, &recent], now), Restart::Never);
    // Without a window the attempt number counts.
    let s0 = with_restart(spec("web", 1), "any", 2, 0, 0);
    assert_eq!(restart_decision(&s0, &recent, &[], now), Restart::Never);
    assert_eq!(restart_decision(&s0, &task("e", 1, now - 1_000), &[], now), Restart::Now);
}

#[test]
fn removed_service_stops_its_tasks_then_forgets_them() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    sim.service(spec("web", 3));
    sim.service(spec("api", 1));
    sim.settle();
    // One more slot that never got a node.
    sim.set_availability("a", Availability::Pause);
    sim.set_availability("b", Availability::Pause);
    sim.scale("web", 4);
    sim.settle();
    assert_eq!(sim.live("web").len(), 4);
    sim.apply(Command::RemoveServices { services: vec!["web".into()] });
    let plan = sim.orchestrate();
    assert!(plan.notes.iter().any(|n| n == "service web: removed: stopping 4 tasks"), "{:?}", plan.notes);
    assert!(sim.tasks_of("web").iter().all(|t| t.desired_state == TaskState::Shutdown));
    sim.settle();
    assert!(sim.tasks_of("web").is_empty());
    assert_eq!(sim.running("api").len(), 1);
}

#[test]
fn task_history_is_bounded_per_slot() {
    let mut sim = Sim::default();
    sim.nodes(&["a"]);
    sim.service(with_restart(spec("web", 1), "any", 0, 0, 0));
    sim.settle();
    for _ in 0..9 {
        sim.now += 10;
        end_current(&mut sim, TaskState::Failed, Some(1));
        sim.settle();
    }
    let tasks = sim.tasks_of("web");
    // The running one and the 5 newest finished ones.
    assert_eq!(tasks.len(), 6);
    assert_eq!(sim.running("web").len(), 1);
    assert_eq!(sim.running("web")[0].attempt, 9);
    let mut kept: Vec<u64> = tasks.iter().filter(|t| t.state.is_terminal()).map(|t| t.attempt).collect();
    kept.sort();
    assert_eq!(kept, vec![4, 5, 6, 7, 8]);
}

#[test]
fn duplicate_tasks_in_a_slot_are_retired() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    sim.service(spec("web", 2));
    sim.settle();
    // A stale leader's write: a second task for slot 1.
    let mut dup = sim.live("web")[0].clone();
    dup.id = "dup".into();
    dup.state = TaskState::New;
    dup.node_id = None;
    sim.apply(Command::CreateTasks { tasks: vec![dup] });
    sim.orchestrate();
    assert_eq!(sim.state.tasks["dup"].state, TaskState::Shutdown);
    sim.settle();
    assert_eq!(slots(&sim.running("web")), vec![1, 2]);
}

#[test]
fn constraint_changes_move_tasks_off_nodes_that_no_longer_match() {
    let mut sim = Sim::default();
    sim.node("a", &[("zone", "x")]);
    sim.node("b", &[("zone", "x")]);
    let mut s = spec("web", 2);
    s.constraints.push("node.labels.zone==x".into());
    sim.service(s);
    sim.settle();
    let a = sim.node_id("a");
    sim.apply(Command::UpdateNode {
        id: a,
        patch: crate::store::NodePatch { label_rm: vec!["zone".into()], ..Default::default() },
    });
    sim.settle();
    let spread = sim.spread("web");
    assert_eq!((spread["a"], spread["b"]), (0, 2));
}

#[test]
fn rebalance_moves_replicas_onto_a_node_that_comes_back_and_converges() {
    let mut sim = Sim::default();
    sim.nodes(&["w1", "w2", "w3", "w4", "w5"]);
    sim.service(spec("web", 10));
    sim.settle();
    sim.set_status("w5", NodeStatus::Down);
    sim.settle();
    assert_eq!(sim.spread("web")["w5"], 0);
    assert_eq!(sim.running("web").len(), 10);

    sim.set_status("w5", NodeStatus::Ready);
    let mut passes = 0;
    loop {
        let plan = sim.orchestrate();
        let moved = plan.create.len();
        assert!(moved <= sim.config.rebalance_moves_per_pass, "bounded: {moved}");
        sim.schedule();
        sim.agents();
        if plan.is_empty() {
            break;
        }
        passes += 1;
        assert!(passes < 20, "did not converge");
    }
    let spread = sim.spread("web");
    assert!(max_minus_min(&spread) <= 1, "{spread:?}");
    assert_eq!(spread["w5"], 2);
    assert_eq!(slots(&sim.running("web")), (1..=10).collect::<Vec<_>>());
    // Steady: nothing more to do.
    assert!(sim.orchestrate().is_empty());
}

#[test]
fn rebalance_does_not_flap_when_the_emptiest_node_cannot_take_more() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    sim.service(with_memory(spec("web", 4), GIB));
    // b is small: one task fits.
    let b = sim.node_id("b");
    sim.apply(Command::UpdateNode {
        id: b,
        patch: crate::store::NodePatch { resources: Some((2_000_000_000, GIB)), ..Default::default() },
    });
    sim.settle();
    let spread = sim.spread("web");
    assert_eq!((spread["a"], spread["b"]), (3, 1));
    assert!(sim.orchestrate().is_empty());
}

#[test]
fn a_pass_over_some_services_leaves_the_others_alone() {
    let mut sim = Sim::default();
    sim.nodes(&["a"]);
    let web = sim.service(spec("web", 1));
    sim.service(spec("api", 1));
    let plan = reconcile(&sim.state, &Scope::Services([web].into()), sim.now, &sim.config);
    assert_eq!(plan.create.len(), 1);
    assert_eq!(plan.create[0].service_name, "web");
}

#[test]
fn a_stale_agent_report_does_not_resurrect_a_retired_task() {
    let mut sim = Sim::default();
    sim.nodes(&["a"]);
    sim.service(spec("web", 1));
    sim.settle();
    sim.scale("web", 0);
    sim.settle();
    let id = sim.tasks_of("web")[0].id.clone();
    sim.apply(Command::UpdateTasks {
        from_node: sim.state.tasks[&id].node_id,
        updates: vec![TaskUpdate { id: id.clone(), state: Some(TaskState::Running), ..Default::default() }],
    });
    assert_eq!(sim.state.tasks[&id].state, TaskState::Shutdown);
    assert!(sim.orchestrate().is_empty());
}

fn update_image(sim: &mut Sim, service: &str, image: &str) {
    let mut spec = sim.state.services.values().find(|s| s.spec.name == service).map(|s| s.spec.clone()).unwrap();
    spec.image = image.into();
    sim.apply(Command::UpdateService { service: service.into(), spec: Box::new(spec), expected_version: 0 });
}

/// One batch of a stop-first update: the pass that stops the old tasks
/// (and starts nothing), the agents stopping them, then the pass that
/// creates their successors, returned.
fn next_batch(sim: &mut Sim) -> Plan {
    let stop = sim.orchestrate();
    assert!(stop.create.is_empty(), "stop-first: nothing starts before the old task stops: {:?}", stop.create);
    sim.agents();
    sim.orchestrate()
}

#[test]
fn stop_first_updates_start_the_successor_once_the_old_task_stopped() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    let mut s = spec("web", 2);
    s.update = Some(shoal_proto::control::UpdateConfig { parallelism: 1, ..Default::default() });
    sim.service(s);
    sim.settle();
    update_image(&mut sim, "web", "bb:2");
    let plan = sim.orchestrate();
    assert_eq!(plan.update.len(), 1, "one old task stops (parallelism 1)");
    assert!(plan.create.is_empty(), "{:?}", plan.create);
    // Still stopping: the slot waits, and so does the next batch.
    for _ in 0..3 {
        sim.schedule();
        let plan = sim.orchestrate();
        assert!(plan.create.is_empty() && plan.update.is_empty(), "{:?} {:?}", plan.create, plan.update);
        assert!(plan.notes.iter().any(|n| n.contains("waiting for their old task to stop")), "{:?}", plan.notes);
    }
    sim.agents();
    let plan = sim.orchestrate();
    assert_eq!(plan.create.len(), 1, "the successor, once the old task stopped");
    assert!(plan.create[0].spec.image == "bb:2");
    sim.settle();
    let running = sim.running("web");
    assert!(running.iter().all(|t| t.spec.image == "bb:2") && running.len() == 2);
    assert_eq!(slots(&running), vec![1, 2]);
    // Global: the node waits for its old task too.
    sim.service(global("mon"));
    sim.settle();
    update_image(&mut sim, "mon", "bb:2");
    let plan = sim.orchestrate();
    assert_eq!(plan.update.len(), 2);
    assert!(plan.create.is_empty(), "{:?}", plan.create);
    assert!(sim.orchestrate().create.is_empty());
    sim.agents();
    assert_eq!(sim.orchestrate().create.len(), 2);
    // A scale-up while an old task stops takes other slots, at once.
    let mut sim = Sim::default();
    sim.nodes(&["a"]);
    sim.service(spec("api", 1));
    sim.settle();
    update_image(&mut sim, "api", "bb:2");
    sim.orchestrate();
    sim.scale("api", 3);
    let plan = sim.orchestrate();
    assert_eq!(slots(&plan.create.iter().collect::<Vec<_>>()), vec![2, 3]);
}

#[test]
fn rolling_update_replaces_tasks_parallelism_at_a_time() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    let mut s = spec("web", 4);
    s.update = Some(shoal_proto::control::UpdateConfig { parallelism: 2, delay_ms: 0, failure_action: "pause".into(), ..Default::default() });
    sim.service(s);
    sim.settle();
    // Scaling is not an update: nothing restarts.
    sim.scale("web", 5);
    let plan = sim.orchestrate();
    assert_eq!(plan.create.len(), 1);
    assert!(plan.update.is_empty());
    sim.settle();

    update_image(&mut sim, "web", "bb:2");
    let plan = sim.orchestrate();
    assert_eq!(plan.update.len(), 2);
    assert!(plan.notes.iter().any(|n| n == "service web: update: 2 tasks stopping before their successors start"), "{:?}", plan.notes);
    sim.agents();
    let plan = sim.orchestrate();
    assert_eq!(plan.create.len(), 2);
    assert!(plan.create.iter().all(|t| t.spec.image == "bb:2"));
    // The next batch waits until this one runs.
    sim.schedule();
    assert!(sim.orchestrate().is_empty());
    sim.settle();
    let running = sim.running("web");
    assert_eq!(running.len(), 5);
    assert!(running.iter().all(|t| t.spec.image == "bb:2"));
    assert_eq!(slots(&running), vec![1, 2, 3, 4, 5]);
}

#[test]
fn a_rollback_rolls_out_with_the_rollback_config() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    let mut s = spec("web", 4);
    s.update = Some(shoal_proto::control::UpdateConfig { parallelism: 1, failure_action: "pause".into(), ..Default::default() });
    s.rollback = Some(shoal_proto::control::UpdateConfig { parallelism: 4, failure_action: "pause".into(), ..Default::default() });
    sim.service(s);
    sim.settle();
    update_image(&mut sim, "web", "bb:2");
    assert_eq!(next_batch(&mut sim).create.len(), 1, "the update goes one at a time");
    sim.settle();
    sim.apply(Command::RollbackService { service: "web".into() });
    let plan = next_batch(&mut sim);
    assert_eq!(plan.create.len(), 4, "the rollback goes four at a time");
    assert!(plan.create.iter().all(|t| t.spec.image == "bb:1"));
}

#[test]
fn start_first_updates_keep_the_old_task_until_its_successor_runs() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    let mut s = spec("web", 2);
    s.update = Some(shoal_proto::control::UpdateConfig { parallelism: 1, order: "start-first".into(), ..Default::default() });
    sim.service(s);
    sim.settle();
    update_image(&mut sim, "web", "bb:2");
    let plan = sim.orchestrate();
    assert_eq!(plan.create.len(), 1, "one successor (parallelism 1)");
    assert!(plan.update.is_empty(), "no old task stops before its successor runs: {:?}", plan.update);
    sim.schedule();
    // While the successor starts, both old tasks still run and nothing
    // else happens (no duplicate retired, no second batch).
    assert!(sim.orchestrate().is_empty());
    assert_eq!(sim.running("web").len(), 2);
    // The successor runs: now its predecessor stops, and the next begins.
    sim.agents();
    let plan = sim.orchestrate();
    assert_eq!(plan.update.len(), 1, "the old task of the slot retires");
    assert_eq!(plan.create.len(), 1, "the next slot's successor");
    sim.settle();
    let running = sim.running("web");
    assert_eq!(running.len(), 2);
    assert!(running.iter().all(|t| t.spec.image == "bb:2"));
    assert_eq!(slots(&running), vec![1, 2]);
}

#[test]
fn rolling_update_waits_the_delay_between_batches() {
    let mut sim = Sim::default();
    sim.nodes(&["a"]);
    let mut s = spec("web", 2);
    s.update = Some(shoal_proto::control::UpdateConfig { parallelism: 1, delay_ms: 10_000, failure_action: String::new(), ..Default::default() });
    sim.service(s);
    sim.settle();
    sim.now += 100_000;
    update_image(&mut sim, "web", "bb:2");
    assert_eq!(next_batch(&mut sim).create.len(), 1);
    sim.schedule();
    sim.agents();
    sim.agents();
    let plan = sim.orchestrate();
    assert!(plan.create.is_empty());
    assert_eq!(plan.wake_at_ms, Some(sim.now + 10_000));
    sim.now += 10_000;
    assert_eq!(next_batch(&mut sim).create.len(), 1);
}

#[test]
fn global_update_replaces_the_task_on_each_node() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    sim.service(global("mon"));
    sim.settle();
    update_image(&mut sim, "mon", "bb:2");
    sim.settle();
    let running = sim.running("mon");
    assert_eq!(running.len(), 2);
    assert!(running.iter().all(|t| t.spec.image == "bb:2"));
    assert_eq!(max_minus_min(&sim.spread("mon")), 0);
}

/// The leader-only loops on a real one-manager Raft node (redb in a
/// tempdir, no network): leadership, read barrier, watch-driven passes,
/// coalesced proposals.
mod live {
    use std::time::Duration;

    use crate::manager::Manager;
    use crate::orchestrator::{Orchestrator, OrchestratorConfig};
    use shoal_security::pki::{self, CertRole};
    use crate::scheduler::{Scheduler, SchedulerConfig};
    use crate::store::objects::{NodeObj, NodeStatus, Role, ServiceObj};
    use crate::store::task::{TaskState, TaskUpdate};
    use crate::store::{Command, State};
    use shoal_security::Trust;

    use super::spec;

    fn node(id: u64, name: &str) -> NodeObj {
        NodeObj::new(id, name, Role::Worker, "")
    }

    /// Waits (on the store's watch, never on a timer) until `cond` holds.
    async fn wait(m: &Manager, what: &str, cond: impl Fn(&State) -> bool) {
        let mut events = m.store.watch();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !m.store.read(&cond) {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(_) => {}
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    fn live_on(s: &State, node: u64) -> usize {
        s.tasks.values().filter(|t| t.desired_state == TaskState::Running && t.node_id == Some(node) && !t.state.is_terminal()).count()
    }

    /// An agent: every task assigned to `node` runs.
    async fn run_assigned(m: &Manager, node: u64) {
        let updates: Vec<TaskUpdate> = m.store.read(|s| {
            s.tasks
                .values()
                .filter(|t| t.node_id == Some(node) && t.state == TaskState::Assigned)
                .map(|t| TaskUpdate { id: t.id.clone(), state: Some(TaskState::Running), ..Default::default() })
                .collect()
        });
        m.propose(Command::UpdateTasks { from_node: Some(node), updates }).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orchestrator_and_scheduler_drive_a_one_manager_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::new_ca().unwrap();
        let (me, _) = pki::issue(&ca, "0000000000000001", CertRole::Manager, pki::DEFAULT_CERT_EXPIRY).unwrap();
        let tls = Trust::new(shoal_security::NodeTls { ca_pem: ca.cert_pem.clone(), cert_pem: me.cert_pem, key_pem: me.key_pem }).unwrap();
        let m = Manager::open(1, dir.path(), tls).await.unwrap();
        m.bootstrap("127.0.0.1:1").await.unwrap();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        tokio::spawn(Orchestrator::new(m.clone(), OrchestratorConfig::default()).run(shutdown.clone()));
        tokio::spawn(Scheduler::new(m.clone(), SchedulerConfig::default()).run(shutdown.clone()));

        m.propose(Command::AddNode { node: node(1, "a") }).await.unwrap();
        m.propose(Command::AddNode { node: node(2, "b") }).await.unwrap();
        let svc = ServiceObj::new("web-id".into(), spec("web", 4));
        m.propose(Command::CreateService { service: Box::new(svc) }).await.unwrap();
        wait(&m, "4 tasks assigned, 2 per node", |s| live_on(s, 1) == 2 && live_on(s, 2) == 2 && s.tasks.values().all(|t| t.state == TaskState::Assigned)).await;
        run_assigned(&m, 1).await;
        run_assigned(&m, 2).await;

        // Node b goes down: its tasks are orphaned and come back on a.
        m.propose(Command::SetNodeStatus { changes: vec![(2, NodeStatus::Down)] }).await.unwrap();
        wait(&m, "b's tasks orphaned and replaced on a", |s| {
            live_on(s, 1) == 4 && s.tasks.values().filter(|t| t.state == TaskState::Orphaned).count() == 2
        })
        .await;
        run_assigned(&m, 1).await;

        // b comes back: rebalanced onto it.
        m.propose(Command::SetNodeStatus { changes: vec![(2, NodeStatus::Ready)] }).await.unwrap();
        wait(&m, "2 tasks moved back to b", |s| live_on(s, 2) == 2).await;
        run_assigned(&m, 2).await;
        // Node a's agent stops what it was told to stop.
        let stopping: Vec<TaskUpdate> = m.store.read(|s| {
            s.tasks
                .values()
                .filter(|t| t.node_id == Some(1) && t.desired_state == TaskState::Shutdown && !t.state.is_terminal())
                .map(|t| TaskUpdate { id: t.id.clone(), state: Some(TaskState::Shutdown), ..Default::default() })
                .collect()
        });
        assert_eq!(stopping.len(), 2);
        m.propose(Command::UpdateTasks { from_node: Some(1), updates: stopping }).await.unwrap();

        // Scale to 0 and remove: everything is stopped, then forgotten.
        m.propose(Command::ScaleServices { items: vec![("web".into(), 0)] }).await.unwrap();
        wait(&m, "no live tasks", |s| live_on(s, 1) + live_on(s, 2) == 0).await;
        m.propose(Command::RemoveServices { services: vec!["web".into()] }).await.unwrap();
        let stop_all: Vec<(u64, Vec<TaskUpdate>)> = m.store.read(|s| {
            [1, 2]
                .into_iter()
                .map(|n| {
                    let u = s
                        .tasks
                        .values()
                        .filter(|t| t.node_id == Some(n) && !t.state.is_terminal())
                        .map(|t| TaskUpdate { id: t.id.clone(), state: Some(TaskState::Shutdown), ..Default::default() })
                        .collect();
                    (n, u)
                })
                .collect()
        });
        for (n, updates) in stop_all {
            m.propose(Command::UpdateTasks { from_node: Some(n), updates }).await.unwrap();
        }
        wait(&m, "the removed service's tasks forgotten", |s| s.tasks.is_empty()).await;

        let _ = stop.send(true);
        let _ = m.raft.shutdown().await;
    }
}

#[test]
fn a_failing_new_spec_pauses_the_update() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    let mut s = with_restart(spec("web", 4), "none", 0, 0, 0);
    s.update = Some(shoal_proto::control::UpdateConfig { parallelism: 1, delay_ms: 0, failure_action: "pause".into(), ..Default::default() });
    sim.service(s);
    sim.settle();
    sim.now += 1_000;
    update_image(&mut sim, "web", "bb:broken");
    assert_eq!(next_batch(&mut sim).create.len(), 1);
    sim.schedule();
    // The first new task fails; the other three stay on the old spec.
    let new = sim.tasks_of("web").into_iter().find(|t| t.spec.image == "bb:broken").map(|t| t.id.clone()).unwrap();
    sim.report(&new, TaskState::Failed, Some(1));
    sim.agents();
    let plan = sim.orchestrate();
    assert!(plan.create.is_empty(), "{:?}", plan.create);
    assert!(plan.notes.iter().any(|n| n.contains("update paused after task")), "{:?}", plan.notes);
    sim.settle();
    let old: Vec<_> = sim.running("web").into_iter().filter(|t| t.spec.image == "bb:1").collect();
    assert_eq!(old.len(), 3);
    // A new update (the fix) goes on, and takes the failed slot too.
    sim.now += 1_000;
    update_image(&mut sim, "web", "bb:2");
    sim.settle();
    assert_eq!(sim.running("web").iter().filter(|t| t.spec.image == "bb:2").count(), 4);
}

/// With restart condition none, the slot whose new task failed is not
/// restarted by the policy; the rollback still brings it back on the old
/// spec, as Swarm's updater does with every dirty slot.
/// Runs `s` on the sim's nodes, updates it to an image whose first new
/// task fails at once.
fn fail_an_update(sim: &mut Sim, s: shoal_proto::control::ServiceSpec) {
    sim.service(s);
    sim.settle();
    sim.now += 1_000;
    update_image(sim, "web", "bb:broken");
    assert_eq!(next_batch(sim).create.len(), 1);
    sim.schedule();
    let new = sim.tasks_of("web").into_iter().find(|t| t.spec.image == "bb:broken").map(|t| t.id.clone()).unwrap();
    sim.report(&new, TaskState::Failed, Some(1));
    sim.agents();
}

#[test]
fn a_rollback_restores_a_slot_that_restart_none_left_failed() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    let mut s = with_restart(spec("web", 4), "none", 0, 0, 0);
    s.update = Some(shoal_proto::control::UpdateConfig { parallelism: 1, failure_action: "rollback".into(), ..Default::default() });
    fail_an_update(&mut sim, s);
    assert_eq!(sim.orchestrate().rollbacks.len(), 1);
    sim.settle();
    let running = sim.running("web");
    assert_eq!(running.len(), 4, "{:?}", running.iter().map(|t| (t.slot, &t.spec.image)).collect::<Vec<_>>());
    assert!(running.iter().all(|t| t.spec.image == "bb:1"));
    assert!(sim.orchestrate().is_empty());
}

#[test]
fn rebalance_fills_a_node_that_joins() {
    let mut sim = Sim::default();
    sim.nodes(&["w1", "w2", "w3", "w4"]);
    sim.service(spec("web", 8));
    sim.service(global("mon"));
    sim.settle();
    sim.node("w5", &[]);
    sim.settle();
    let spread = sim.spread("web");
    assert!(max_minus_min(&spread) <= 1, "{spread:?}");
    assert_eq!(spread["w5"], 1, "{spread:?}");
    assert_eq!(sim.spread("mon")["w5"], 1);
    assert!(sim.orchestrate().is_empty());
}

#[test]
fn a_failing_update_rolls_back_when_its_failure_action_says_so() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    let mut s = spec("web", 4);
    s.update = Some(shoal_proto::control::UpdateConfig { parallelism: 1, failure_action: "rollback".into(), ..Default::default() });
    s.rollback = Some(shoal_proto::control::UpdateConfig { parallelism: 0, failure_action: "pause".into(), ..Default::default() });
    fail_an_update(&mut sim, s);
    let plan = sim.orchestrate();
    assert_eq!(plan.rollbacks.len(), 1, "{:?}", plan.notes);
    let svc = sim.state.services.values().next().unwrap();
    assert!(svc.rolling_back && svc.spec.image == "bb:1", "{:?}", svc.spec.image);
    assert!(svc.update_status.contains("update failed"), "{}", svc.update_status);
    sim.settle();
    let running = sim.running("web");
    assert_eq!(running.len(), 4);
    assert!(running.iter().all(|t| t.spec.image == "bb:1"));
    // A tolerant ratio lets a lone failure through.
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    let mut s = with_restart(spec("web", 4), "none", 0, 0, 0);
    s.update = Some(shoal_proto::control::UpdateConfig { parallelism: 1, failure_action: "rollback".into(), max_failure_ratio: 0.5, ..Default::default() });
    sim.service(s);
    sim.settle();
    sim.now += 1_000;
    update_image(&mut sim, "web", "bb:2");
    next_batch(&mut sim);
    sim.schedule();
    sim.agents();
    let first = sim.tasks_of("web").into_iter().find(|t| t.spec.image == "bb:2").map(|t| t.id.clone()).unwrap();
    next_batch(&mut sim);
    sim.schedule();
    sim.report(&first, TaskState::Failed, Some(1));
    sim.agents();
    let plan = sim.orchestrate();
    assert!(plan.rollbacks.is_empty(), "1 of 2 updated tasks failed: within 0.5");
}

#[test]
fn a_restart_delay_of_zero_restarts_at_once_and_none_backs_off() {
    for (delay, immediate) in [(Some(0), true), (None, false)] {
        let mut sim = Sim::default();
        sim.nodes(&["a"]);
        let mut s = spec("web", 1);
        s.restart = Some(shoal_proto::control::RestartPolicy { condition: "any".into(), delay_ms: delay, ..Default::default() });
        sim.service(s);
        sim.settle();
        let t = sim.running("web")[0].id.clone();
        sim.report(&t, TaskState::Failed, Some(1));
        sim.agents();
        let plan = sim.orchestrate();
        assert_eq!(!plan.create.is_empty(), immediate, "delay {delay:?}: {:?}", plan.notes);
    }
}

#[test]
fn a_new_task_that_fails_after_the_update_moved_on_still_rolls_it_back() {
    let mut sim = Sim::default();
    sim.nodes(&["a"]);
    let mut s = spec("web", 1);
    s.update = Some(shoal_proto::control::UpdateConfig { parallelism: 1, failure_action: "rollback".into(), ..Default::default() });
    sim.service(s);
    sim.settle();
    sim.now += 1_000;
    update_image(&mut sim, "web", "bb:broken");
    // The only slot's new task runs (the update has nothing left to do)...
    sim.settle();
    assert!(sim.running("web").iter().all(|t| t.spec.image == "bb:broken"));
    // ...then fails within the monitor period: the update rolls back.
    let t = sim.running("web")[0].id.clone();
    sim.now += 1_000;
    sim.report(&t, TaskState::Failed, Some(1));
    sim.agents();
    let plan = sim.orchestrate();
    assert_eq!(plan.rollbacks.len(), 1, "{:?}", plan.notes);
    // A scale long after does not reopen it.
    let mut sim2 = Sim::default();
    sim2.nodes(&["a"]);
    let mut s = spec("web", 1);
    s.update = Some(shoal_proto::control::UpdateConfig { parallelism: 1, failure_action: "rollback".into(), ..Default::default() });
    sim2.service(s);
    sim2.settle();
    update_image(&mut sim2, "web", "bb:2");
    sim2.settle();
    sim2.now += 600_000;
    sim2.apply(Command::ScaleServices { items: vec![("web".into(), 2)] });
    sim2.settle();
    let t = sim2.running("web").iter().max_by_key(|t| t.created_at_ms).unwrap().id.clone();
    sim2.report(&t, TaskState::Failed, Some(1));
    sim2.agents();
    assert!(sim2.orchestrate().rollbacks.is_empty(), "a failure long after the update is the restart policy's");
}
