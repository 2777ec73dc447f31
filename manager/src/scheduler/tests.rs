//! Scheduler unit tests: plain data, no cluster.

use super::*;
use crate::orchestrator::testkit::*;
use crate::store::objects::{Availability, NodeStatus};

fn messages(sim: &Sim, service: &str) -> Vec<String> {
    let mut m: Vec<String> =
        sim.live(service).iter().filter(|t| t.state == TaskState::Pending).map(|t| t.message.clone()).collect();
    m.dedup();
    m
}

#[test]
fn spreads_evenly_by_service_then_by_total_load() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b", "c", "d", "e"]);
    // Other work on a and b.
    sim.service(spec("db", 2));
    sim.settle();
    sim.service(spec("web", 8));
    sim.orchestrate();
    let d = schedule(&sim.state, &sim.sched);
    assert_eq!(d.assigned.len(), 8);
    sim.schedule();
    sim.agents();
    let spread = sim.spread("web");
    assert!(max_minus_min(&spread) <= 1, "{spread:?}");
    // The 3 nodes without db get the extra replicas.
    let db_nodes: Vec<String> = sim.running("db").iter().map(|t| sim.node_name(t)).collect();
    for (node, n) in &spread {
        let expect = if db_nodes.contains(node) { 1 } else { 2 };
        assert_eq!(*n, expect, "{node}: {spread:?}");
    }
}

#[test]
fn placement_message_names_the_node() {
    let mut sim = Sim::default();
    sim.nodes(&["w1"]);
    sim.service(spec("web", 1));
    sim.orchestrate();
    sim.schedule();
    let t = &sim.live("web")[0];
    assert_eq!(t.state, TaskState::Assigned);
    assert_eq!(t.message, "assigned to node w1");
    assert_eq!(task_name(t), "web.1");
}

#[test]
fn an_impossible_constraint_leaves_tasks_pending_with_the_reason() {
    let mut sim = Sim::default();
    sim.node("a", &[("zone", "a")]);
    sim.node("b", &[("zone", "a")]);
    sim.node("c", &[]);
    let mut s = spec("web", 2);
    s.constraints.push("node.labels.zone==b".into());
    sim.service(s);
    sim.settle();
    assert!(sim.live("web").iter().all(|t| t.state == TaskState::Pending));
    assert_eq!(messages(&sim, "web"), vec!["no node satisfies node.labels.zone==b: 3 nodes checked"]);
    // Retried when nodes change.
    let c = sim.node_id("c");
    sim.apply(crate::store::Command::UpdateNode {
        id: c,
        patch: crate::store::NodePatch { label_add: [("zone".into(), "b".into())].into(), ..Default::default() },
    });
    sim.settle();
    assert_eq!(sim.spread("web")["c"], 2);
}

#[test]
fn constraints_on_role_name_and_inequality() {
    let mut sim = Sim::default();
    sim.node("a", &[("zone", "x")]);
    sim.node("b", &[]);
    sim.node("c", &[("zone", "y")]);
    let mut s = spec("web", 4);
    s.constraints = vec!["node.labels.zone!=x".into(), "node.name!=c".into(), "node.role==worker".into()];
    sim.service(s);
    sim.settle();
    assert_eq!(sim.spread("web")["b"], 4);
    let mut m = spec("mgr", 1);
    m.constraints = vec!["node.role==manager".into()];
    sim.service(m);
    sim.settle();
    assert_eq!(messages(&sim, "mgr"), vec!["no node satisfies node.role==manager: 3 nodes checked"]);
}

#[test]
fn insufficient_memory_leaves_tasks_pending_with_the_need() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b", "c", "d", "e"]);
    sim.service(with_memory(spec("big", 2), 8 * GIB));
    sim.settle();
    assert_eq!(messages(&sim, "big"), vec!["insufficient memory on 5 nodes (need 8.0 GiB)"]);
}

#[test]
fn reservations_fill_nodes_then_the_rest_waits() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    // 4 GiB nodes, 1.5 GiB each: 2 per node.
    sim.service(with_memory(spec("web", 6), 3 * GIB / 2));
    sim.settle();
    assert_eq!(sim.running("web").len(), 4);
    assert_eq!(messages(&sim, "web"), vec!["insufficient memory on 2 nodes (need 1.5 GiB)"]);
    // Freeing memory lets the waiting ones in.
    sim.node("c", &[]);
    sim.settle();
    assert_eq!(sim.running("web").len(), 6);
}

#[test]
fn cpu_reservations_count_too() {
    let mut sim = Sim::default();
    sim.nodes(&["a"]);
    let mut s = spec("web", 3);
    s.reservations = Some(shoal_proto::control::Resources { nano_cpus: 1_000_000_000, memory_bytes: 0, pids: 0 });
    sim.service(s);
    sim.settle();
    assert_eq!(sim.running("web").len(), 2);
    assert_eq!(messages(&sim, "web"), vec!["insufficient cpu on 1 node (need 1 cpu)"]);
}

#[test]
fn down_paused_and_drained_nodes_are_skipped_and_explained() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b", "c", "d"]);
    sim.set_status("a", NodeStatus::Down);
    sim.set_availability("b", Availability::Pause);
    sim.set_availability("c", Availability::Drain);
    let mut s = spec("web", 3);
    s.constraints.push("node.name!=d".into());
    sim.service(s);
    sim.settle();
    assert_eq!(
        messages(&sim, "web"),
        vec!["no suitable node (4 nodes checked): 1 node down; 1 node paused; 1 node drained; node.name!=d not satisfied on 1 node"]
    );
}

#[test]
fn spread_preference_balances_label_values_first() {
    let mut sim = Sim::default();
    sim.node("a1", &[("zone", "a")]);
    sim.node("b1", &[("zone", "b")]);
    sim.node("b2", &[("zone", "b")]);
    sim.node("b3", &[("zone", "b")]);
    let mut s = spec("web", 6);
    s.placement_prefs.push("spread=node.labels.zone".into());
    sim.service(s);
    sim.settle();
    let spread = sim.spread("web");
    assert_eq!(spread["a1"], 3, "{spread:?}");
    assert_eq!(spread["b1"] + spread["b2"] + spread["b3"], 3, "{spread:?}");
    assert!(spread["b1"] == 1 && spread["b2"] == 1 && spread["b3"] == 1, "{spread:?}");
}

#[test]
fn nested_spread_preferences() {
    let mut sim = Sim::default();
    sim.node("a-r1", &[("zone", "a"), ("rack", "1")]);
    sim.node("a-r2", &[("zone", "a"), ("rack", "2")]);
    sim.node("a-r2b", &[("zone", "a"), ("rack", "2")]);
    sim.node("b-r1", &[("zone", "b"), ("rack", "1")]);
    let mut s = spec("web", 4);
    s.placement_prefs = vec!["spread=node.labels.zone".into(), "spread=node.labels.rack".into()];
    sim.service(s);
    sim.settle();
    let spread = sim.spread("web");
    // 2 per zone; in zone a, 1 per rack.
    assert_eq!(spread["b-r1"], 2, "{spread:?}");
    assert_eq!(spread["a-r1"], 1, "{spread:?}");
    assert_eq!(spread["a-r2"] + spread["a-r2b"], 1, "{spread:?}");
}

#[test]
fn host_port_conflicts_keep_tasks_apart() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b", "c"]);
    sim.service(with_port(spec("web", 4), 8080));
    sim.settle();
    assert_eq!(max_minus_min(&sim.spread("web")), 0);
    assert_eq!(sim.running("web").len(), 3);
    assert_eq!(messages(&sim, "web"), vec!["host port 8080/tcp in use on 3 nodes"]);
    // Another service on the same port conflicts too; another port does not.
    sim.service(with_port(spec("other", 1), 8080));
    sim.service(with_port(spec("fine", 1), 9090));
    sim.settle();
    assert_eq!(sim.running("other").len(), 0);
    assert_eq!(sim.running("fine").len(), 1);
    // Ports are free again once the holder is gone.
    sim.scale("web", 2);
    sim.settle();
    assert_eq!(sim.running("other").len(), 1);
}

#[test]
fn global_tasks_are_checked_on_their_own_node() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    let b = sim.node_id("b");
    sim.apply(crate::store::Command::UpdateNode {
        id: b,
        patch: crate::store::NodePatch { resources: Some((1_000_000_000, GIB)), ..Default::default() },
    });
    sim.service(with_memory(global("mon"), 2 * GIB));
    sim.settle();
    assert_eq!(sim.spread("mon")["a"], 1);
    assert_eq!(messages(&sim, "mon"), vec!["node b: insufficient memory on 1 node (need 2.0 GiB)"]);
}

#[test]
fn a_pending_task_is_not_rewritten_for_the_same_reason() {
    let mut sim = Sim::default();
    sim.nodes(&["a"]);
    sim.service(with_memory(spec("big", 1), 64 * GIB));
    sim.settle();
    assert!(schedule(&sim.state, &sim.sched).is_empty());
}

#[test]
fn no_nodes_at_all() {
    let mut sim = Sim::default();
    sim.service(spec("web", 1));
    sim.settle();
    assert_eq!(messages(&sim, "web"), vec!["no nodes in the cluster"]);
}

#[test]
fn tasks_to_shut_down_are_not_scheduled() {
    let mut sim = Sim::default();
    sim.service(spec("web", 1));
    sim.orchestrate();
    sim.scale("web", 0);
    sim.orchestrate();
    sim.nodes(&["a"]);
    assert!(schedule(&sim.state, &sim.sched).assigned.is_empty());
}

#[test]
fn a_large_batch_is_placed_in_one_decision_and_spread() {
    let mut sim = Sim::default();
    let names: Vec<String> = (0..50).map(|i| format!("n{i}")).collect();
    for n in &names {
        sim.node(n, &[]);
    }
    sim.service(spec("web", 1000));
    sim.orchestrate();
    let d = schedule(&sim.state, &sim.sched);
    assert_eq!(d.assigned.len(), 1000);
    sim.schedule();
    sim.agents();
    let spread = sim.spread("web");
    assert!(spread.values().all(|n| *n == 20), "{spread:?}");
}

#[test]
fn constraint_parsing() {
    use filter::Constraint;
    assert!(Constraint::parse("node.labels.zone==a").is_some());
    assert!(Constraint::parse("node.labels.==a").is_none());
    assert!(Constraint::parse("zone==a").is_none());
    assert!(Constraint::parse("node.labels.zone==").is_none());
}

fn with_volume(mut s: shoal_proto::control::ServiceSpec, nocopy: bool) -> shoal_proto::control::ServiceSpec {
    s.mounts.push(shoal_proto::control::Mount {
        r#type: "volume".into(),
        source: format!("{}-data", s.name),
        target: "/data".into(),
        volume_nocopy: nocopy,
        ..Default::default()
    });
    s
}

#[test]
fn a_replaced_task_goes_back_to_the_node_holding_its_volume() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b", "c"]);
    sim.service(with_volume(spec("db", 1), false));
    sim.settle();
    let home = sim.node_name(sim.running("db")[0]);
    // Other work elsewhere would draw a free-placed task to the emptiest
    // node; the slot's data wins.
    sim.service(spec("other", 2));
    sim.settle();
    let id = sim.running("db")[0].id.clone();
    sim.report(&id, TaskState::Failed, Some(1));
    sim.settle();
    let t = sim.running("db")[0];
    assert_ne!(t.id, id);
    assert_eq!(sim.node_name(t), home);

    // Its node drained: the slot waits for it, and says why.
    sim.set_availability(&home, Availability::Drain);
    sim.settle();
    assert!(sim.running("db").is_empty());
    let m = messages(&sim, "db");
    assert_eq!(m.len(), 1);
    assert!(m[0].starts_with(&format!("waiting for node {home}, which holds the data of volume db-data: it is drained")), "{m:?}");
    // Active again: back home.
    sim.set_availability(&home, Availability::Active);
    sim.settle();
    assert_eq!(sim.node_name(sim.running("db")[0]), home);
}

#[test]
fn volume_nocopy_or_an_excluding_constraint_lets_the_task_move() {
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    sim.service(with_volume(spec("db", 1), true));
    sim.settle();
    let home = sim.node_name(sim.running("db")[0]);
    sim.set_status(&home, NodeStatus::Down);
    sim.settle();
    let t = sim.running("db")[0];
    assert_ne!(sim.node_name(t), home, "volume-nocopy: it starts elsewhere");

    // Without nocopy, a constraint that rules the data's node out moves it.
    let mut sim = Sim::default();
    sim.nodes(&["a", "b"]);
    let mut s = with_volume(spec("db", 1), false);
    sim.service(s.clone());
    sim.settle();
    let home = sim.node_name(sim.running("db")[0]);
    s.constraints = vec![format!("node.name!={home}")];
    let id = sim.state.services.values().find(|x| x.spec.name == "db").unwrap().id.clone();
    sim.apply(crate::store::Command::UpdateService { service: id, spec: Box::new(s), expected_version: 0 });
    sim.settle();
    let running = sim.running("db");
    assert_eq!(running.len(), 1);
    assert_ne!(sim.node_name(running[0]), home);
}
