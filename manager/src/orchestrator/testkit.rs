//! A cluster on plain data for the orchestrator's and scheduler's unit
//! tests: the real `State::apply`, the real decisions, and agents that do
//! what they are told in one step. No Raft, no network, no clock.

use std::collections::BTreeMap;

use shoal_proto::control::{Port, Resources, RestartPolicy, ServiceSpec};

use super::reconcile::{OrchestratorConfig, Plan, Scope, reconcile};
use crate::scheduler::{SchedulerConfig, schedule};
use crate::store::objects::{Availability, NodeObj, NodeStatus, Role, ServiceObj};
use crate::store::task::{TaskObj, TaskState, TaskUpdate};
use crate::store::{Command, NodePatch, State};

pub const GIB: u64 = 1 << 30;

pub struct Sim {
    pub state: State,
    pub now: u64,
    index: u64,
    ids: u64,
    pub config: OrchestratorConfig,
    pub sched: SchedulerConfig,
}

pub fn spec(name: &str, replicas: u64) -> ServiceSpec {
    ServiceSpec { name: name.into(), image: "bb:1".into(), mode: "replicated".into(), replicas, ..Default::default() }
}

pub fn global(name: &str) -> ServiceSpec {
    ServiceSpec { name: name.into(), image: "bb:1".into(), mode: "global".into(), ..Default::default() }
}

pub fn with_restart(mut s: ServiceSpec, condition: &str, max_attempts: u64, delay_ms: u64, window_ms: u64) -> ServiceSpec {
    s.restart = Some(RestartPolicy { condition: condition.into(), max_attempts, delay_ms: (delay_ms > 0).then_some(delay_ms), window_ms });
    s
}

pub fn with_memory(mut s: ServiceSpec, bytes: u64) -> ServiceSpec {
    s.reservations = Some(Resources { nano_cpus: 0, memory_bytes: bytes, pids: 0 });
    s
}

pub fn with_port(mut s: ServiceSpec, published: u32) -> ServiceSpec {
    s.ports.push(Port { published, target: 80, protocol: "tcp".into(), mode: "host".into() });
    s
}

impl Default for Sim {
    fn default() -> Self {
        Sim {
            state: State::default(),
            now: 1_000_000,
            index: 0,
            ids: 0,
            config: OrchestratorConfig::default(),
            sched: SchedulerConfig::default(),
        }
    }
}

impl Sim {
    pub fn apply(&mut self, cmd: Command) {
        self.index += 1;
        let kind = cmd.kind();
        if let Err(e) = self.state.apply(self.index, self.now, cmd, &mut Vec::new()) {
            panic!("{kind} refused: {e}");
        }
    }

    pub fn node(&mut self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let id = self.state.nodes.len() as u64 + 1;
        self.apply(Command::AddNode {
            node: NodeObj {
                labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                nano_cpus: 2_000_000_000,
                memory_bytes: 4 * GIB,
                ..NodeObj::new(id, name, Role::Worker, "")
            },
        });
        id
    }

    pub fn nodes(&mut self, names: &[&str]) -> Vec<u64> {
        names.iter().map(|n| self.node(n, &[])).collect()
    }

    pub fn node_id(&self, name: &str) -> u64 {
        self.state.nodes.values().find(|n| n.name == name).map(|n| n.id).unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn set_status(&mut self, name: &str, st: NodeStatus) {
        let id = self.node_id(name);
        self.apply(Command::SetNodeStatus { changes: vec![(id, st)] });
    }

    pub fn set_availability(&mut self, name: &str, a: Availability) {
        let id = self.node_id(name);
        self.apply(Command::UpdateNode { id, patch: NodePatch { availability: Some(a), ..Default::default() } });
    }

    pub fn service(&mut self, spec: ServiceSpec) -> String {
        let id = format!("svc-{}", spec.name);
        self.apply(Command::CreateService {
            service: Box::new(ServiceObj::new(id.clone(), spec)),
        });
        id
    }

    pub fn scale(&mut self, name: &str, n: u64) {
        self.apply(Command::ScaleServices { items: vec![(name.into(), n)] });
    }

    /// One orchestrator pass over everything, applied; returns the plan.
    pub fn orchestrate(&mut self) -> Plan {
        let mut plan = reconcile(&self.state, &Scope::All, self.now, &self.config);
        let mut tasks = std::mem::take(&mut plan.create);
        for t in &mut tasks {
            self.ids += 1;
            t.id = format!("t{:04}", self.ids);
        }
        plan.create = tasks.clone();
        if !tasks.is_empty() {
            self.apply(Command::CreateTasks { tasks });
        }
        if !plan.update.is_empty() {
            self.apply(Command::UpdateTasks { from_node: None, updates: plan.update.clone() });
        }
        if !plan.remove.is_empty() {
            self.apply(Command::RemoveTasks { ids: plan.remove.clone() });
        }
        for (service, version, reason) in plan.rollbacks.clone() {
            self.apply(Command::AutoRollback { service, version, reason });
        }
        plan
    }

    /// One scheduler pass, applied.
    pub fn schedule(&mut self) -> usize {
        let d = schedule(&self.state, &self.sched);
        let n = d.assigned.len() + d.pending.len();
        if n > 0 {
            self.apply(Command::UpdateTasks { from_node: None, updates: d.into_updates() });
        }
        n
    }

    /// Agents on ready nodes start what is assigned and stop what should stop.
    pub fn agents(&mut self) -> usize {
        let mut by_node: BTreeMap<u64, Vec<TaskUpdate>> = BTreeMap::new();
        for t in self.state.tasks.values() {
            let Some(n) = t.node_id else { continue };
            if self.state.nodes.get(&n).is_none_or(|n| n.status != NodeStatus::Ready) {
                continue;
            }
            let to = if t.desired_state > TaskState::Running && !t.state.is_terminal() && t.state >= TaskState::Assigned {
                TaskState::Shutdown
            } else if t.desired_state == TaskState::Running && t.state >= TaskState::Assigned && t.state < TaskState::Running {
                TaskState::Running
            } else {
                continue;
            };
            by_node.entry(n).or_default().push(TaskUpdate { id: t.id.clone(), state: Some(to), ..Default::default() });
        }
        let mut n = 0;
        for (node, updates) in by_node {
            n += updates.len();
            self.apply(Command::UpdateTasks { from_node: Some(node), updates });
        }
        n
    }

    /// An agent's report for one task.
    pub fn report(&mut self, id: &str, state: TaskState, exit_code: Option<i32>) {
        let node = self.state.tasks[id].node_id;
        self.apply(Command::UpdateTasks {
            from_node: node,
            updates: vec![TaskUpdate { id: id.into(), state: Some(state), exit_code, ..Default::default() }],
        });
    }

    /// Orchestrator, scheduler and agents until nothing changes.
    /// A delayed restart that is due is taken as due: time jumps to it.
    pub fn settle(&mut self) {
        for _ in 0..50 {
            let p = self.orchestrate();
            let s = self.schedule();
            let a = self.agents();
            if p.is_empty() && s == 0 && a == 0 {
                match p.wake_at_ms {
                    Some(at) if at > self.now => self.now = at,
                    _ => return,
                }
            }
        }
        panic!("did not settle");
    }

    pub fn tasks_of(&self, service: &str) -> Vec<&TaskObj> {
        self.state.tasks.values().filter(|t| t.service_name == service).collect()
    }

    /// The current (desired running) tasks of a service.
    pub fn live(&self, service: &str) -> Vec<&TaskObj> {
        self.tasks_of(service).into_iter().filter(|t| t.desired_state == TaskState::Running && !t.state.is_terminal()).collect()
    }

    pub fn running(&self, service: &str) -> Vec<&TaskObj> {
        self.live(service).into_iter().filter(|t| t.state == TaskState::Running).collect()
    }

    /// Running tasks of `service` per node name (nodes with none included).
    pub fn spread(&self, service: &str) -> BTreeMap<String, usize> {
        let mut m: BTreeMap<String, usize> = self.state.nodes.values().map(|n| (n.name.clone(), 0)).collect();
        for t in self.running(service) {
            if let Some(n) = t.node_id.and_then(|n| self.state.nodes.get(&n)) {
                *m.entry(n.name.clone()).or_default() += 1;
            }
        }
        m
    }

    pub fn node_name(&self, t: &TaskObj) -> String {
        t.node_id.and_then(|n| self.state.nodes.get(&n)).map(|n| n.name.clone()).unwrap_or_default()
    }
}

pub fn max_minus_min(m: &BTreeMap<String, usize>) -> usize {
    let max = m.values().max().copied().unwrap_or(0);
    let min = m.values().min().copied().unwrap_or(0);
    max - min
}
