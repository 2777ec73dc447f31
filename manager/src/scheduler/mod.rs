//! The scheduler (leader only): gives tasks in state `new`/`pending` a node.
//!
//! [`schedule`] is a pure function of the store's state: for each group of
//! tasks with the same spec it runs the filter pipeline ([`filter`]) once
//! per node, then places the whole group with a min-heap keyed by (tasks of
//! this service on the node, tasks on the node), so spreading costs
//! O(log nodes) per task. `spread=node.labels.K` preferences first pick the
//! label value with the fewest tasks of the service, then the node inside
//! it. Tasks that fit nowhere become `pending` with the filters' account of
//! why. [`Scheduler`] runs it once per committed batch of relevant changes
//! and writes every decision of a pass as one `UpdateTasks`.

pub mod filter;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

use crate::manager::Manager;
use crate::orchestrator::leader;
use crate::store::objects::NodeObj;
use crate::store::task::{TaskObj, TaskState, TaskUpdate};
use crate::store::{Change, Command, State};
use filter::{NodeUsage, Rejects, Requirements};

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Treat published ports as host ports: two tasks publishing the same
    /// port and protocol never share a node. (A routing mesh that makes
    /// published ports cluster-wide would turn this off.)
    pub host_ports: bool,
    /// Largest `UpdateTasks` command; bigger passes are split into several
    /// commands proposed together, so they still share Raft entries.
    pub max_updates_per_command: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig { host_ports: true, max_updates_per_command: 10_000 }
    }
}

/// The most task changes one scheduler pass writes.
const MAX_DECISIONS_PER_PASS: usize = 10_000;

/// A task and the node it goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub task_id: String,
    pub node_id: u64,
    pub message: String,
}

/// A task that fits nowhere, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplaced {
    pub task_id: String,
    pub message: String,
}

/// One scheduling pass's decisions.
#[derive(Clone, Debug, Default)]
pub struct Decisions {
    pub assigned: Vec<Placement>,
    /// Only tasks whose state or reason changes (new → pending, or a new
    /// reason); a pending task that stays pending for the same reason is
    /// not rewritten.
    pub pending: Vec<Unplaced>,
}

impl Decisions {
    pub fn is_empty(&self) -> bool {
        self.assigned.is_empty() && self.pending.is_empty()
    }

    pub fn into_updates(self) -> Vec<TaskUpdate> {
        let mut out = Vec::with_capacity(self.assigned.len() + self.pending.len());
        out.extend(self.assigned.into_iter().map(|p| TaskUpdate {
            id: p.task_id,
            state: Some(TaskState::Assigned),
            node_id: Some(p.node_id),
            message: Some(p.message),
            ..Default::default()
        }));
        out.extend(self.pending.into_iter().map(|u| TaskUpdate {
            id: u.task_id,
            state: Some(TaskState::Pending),
            message: Some(u.message),
            ..Default::default()
        }));
        out
    }
}

/// The nodes of one label-value combination, for `spread` preferences.
struct Leaf {
    /// Ids into `level_counts`, one per preference level.
    levels: Vec<usize>,
    heap: BinaryHeap<Reverse<(u32, u32, usize)>>,
}

/// Places every task that wants a node. Pure: reads `state`, returns
/// decisions. Incremental: the tasks come from the store's index of those
/// waiting for a node, and what the nodes hold and how each service is
/// spread from its running sums, so a pass costs O(nodes + waiting tasks),
/// not O(every task).
pub fn schedule(state: &State, config: &SchedulerConfig) -> Decisions {
    // Nothing waits (every node joining wakes a pass): no need to look at
    // the nodes.
    if state.index.waiting().next().is_none() {
        return Decisions::default();
    }
    let nodes: Vec<&NodeObj> = state.nodes.values().collect();
    let n = nodes.len();
    let index: HashMap<u64, usize> = nodes.iter().enumerate().map(|(i, node)| (node.id, i)).collect();
    let mut usage: Vec<NodeUsage> = nodes
        .iter()
        .map(|node| state.index.held(node.id).map(|h| NodeUsage::from_held(h, config.host_ports)).unwrap_or_default())
        .collect();
    // Tasks to place, grouped by spec: every task of a group passes the
    // same static filters.
    let mut groups: BTreeMap<(&str, u64), Vec<&TaskObj>> = BTreeMap::new();
    let mut preset: Vec<&TaskObj> = Vec::new();
    for t in state.index.waiting().filter_map(|id| state.tasks.get(id)) {
        if t.node_id.is_some() {
            preset.push(t);
        } else {
            groups.entry((t.service_id.as_str(), t.spec_version)).or_default().push(t);
        }
    }
    // Tasks of each service per node (index), for spreading: the services
    // with tasks to place only.
    let mut svc_counts: HashMap<&str, Vec<u32>> = HashMap::new();
    for t in groups.values().flatten().chain(&preset) {
        svc_counts.entry(t.service_id.as_str()).or_insert_with(|| {
            let mut counts = vec![0; n];
            for (node, c) in state.index.spread(&t.service_id).into_iter().flatten() {
                if let Some(&i) = index.get(node) {
                    counts[i] = *c;
                }
            }
            counts
        });
    }
    // (service, slot) → (created, node) of the slot's latest task that had a
    // node, for services whose tasks to place mount named volumes: data
    // follows the task.
    let mut slot_nodes: HashMap<(&str, u64), (u64, u64)> = HashMap::new();
    let with_volumes: std::collections::BTreeSet<&str> =
        groups.values().flatten().filter(|t| mounts_volumes(t)).map(|t| t.service_id.as_str()).collect();
    for t in with_volumes.into_iter().flat_map(|svc| state.service_tasks(svc)) {
        if let Some(node) = t.node_id
            && t.slot > 0
            && mounts_volumes(t)
        {
            let e = slot_nodes.entry((t.service_id.as_str(), t.slot)).or_insert((t.created_at_ms, node));
            if t.created_at_ms >= e.0 {
                *e = (t.created_at_ms, node);
            }
        }
    }
    let mut out = Decisions::default();
    let pending = |out: &mut Decisions, t: &TaskObj, message: String| {
        if t.state == TaskState::New || t.message != message {
            out.pending.push(Unplaced { task_id: t.id.clone(), message });
        }
    };

    // Global tasks come with their node: check that node only.
    let mut reqs: HashMap<(&str, u64), Requirements> = HashMap::new();
    preset.sort_by(|a, b| (&a.service_id, a.node_id).cmp(&(&b.service_id, b.node_id)));
    for t in preset {
        let req = reqs
            .entry((t.service_id.as_str(), t.spec_version))
            .or_insert_with(|| Requirements::new(&t.spec, config.host_ports));
        let Some(&i) = t.node_id.and_then(|id| index.get(&id)) else {
            pending(&mut out, t, "its node left the cluster".to_string());
            continue;
        };
        match req.check(nodes[i], &usage[i]) {
            Ok(()) => {
                usage[i].book(req);
                svc_counts.entry(t.service_id.as_str()).or_insert_with(|| vec![0; n])[i] += 1;
                out.assigned.push(Placement {
                    task_id: t.id.clone(),
                    node_id: nodes[i].id,
                    message: format!("assigned to node {}", nodes[i].name),
                });
            }
            Err(r) => {
                let mut rejects = Rejects::default();
                rejects.add(r);
                let why = req.explain(&rejects, 1);
                pending(&mut out, t, format!("node {}: {why}", nodes[i].name));
            }
        }
    }

    for ((service_id, _), mut tasks) in groups {
        tasks.sort_by_key(|t| (t.slot, t.created_at_ms));
        let req = Requirements::new(&tasks[0].spec, config.host_ports);
        let counts = svc_counts.entry(service_id).or_insert_with(|| vec![0; n]);
        let mut rejects = Rejects::default();

        // Tasks whose slot's data is on a node go back there first.
        let mut notes: HashMap<&str, String> = HashMap::new();
        let mut free = Vec::with_capacity(tasks.len());
        for t in tasks {
            let Some((node_id, volumes)) = data_node(state, &slot_nodes, t) else {
                free.push(t);
                continue;
            };
            let held = format!("the data of volume {volumes}");
            let Some(&i) = index.get(&node_id) else {
                notes.insert(&t.id, format!("; the node that held {held} left the cluster: it starts empty"));
                free.push(t);
                continue;
            };
            let node = nodes[i];
            if let Err(r) = req.check_constraints(node) {
                notes.insert(&t.id, format!("; node {} holds {held} but {}: it starts empty", node.name, req.explain_one(r, 1)));
                free.push(t);
                continue;
            }
            match req.check(node, &usage[i]) {
                Ok(()) => {
                    usage[i].book(&req);
                    counts[i] += 1;
                    out.assigned.push(Placement {
                        task_id: t.id.clone(),
                        node_id: node.id,
                        message: format!("assigned to node {}, which holds {held}", node.name),
                    });
                }
                Err(r) => {
                    let why = match r {
                        filter::Reject::Down => "it is down".to_string(),
                        filter::Reject::Paused => "it is paused".to_string(),
                        filter::Reject::Drained => "it is drained".to_string(),
                        r => req.explain_one(r, 1),
                    };
                    if t.spec.mounts.iter().filter(|m| m.r#type == "volume").all(|m| m.volume_nocopy) {
                        notes.insert(&t.id, format!("; node {} holds {held} but {why}: it starts empty (volume-nocopy)", node.name));
                        free.push(t);
                    } else {
                        pending(
                            &mut out,
                            t,
                            format!(
                                "waiting for node {}, which holds {held}: {why} (a mount with volume-nocopy, or a constraint that excludes the node, lets it start elsewhere with an empty volume)",
                                node.name
                            ),
                        );
                    }
                }
            }
        }
        let tasks = free;
        if tasks.is_empty() {
            continue;
        }

        // Static filters once per node; eligible nodes go into the heap of
        // their label-value combination.
        let mut leaves: Vec<Leaf> = Vec::new();
        let mut leaf_index: HashMap<Vec<&str>, usize> = HashMap::new();
        let mut level_index: HashMap<Vec<&str>, usize> = HashMap::new();
        let mut level_counts: Vec<u32> = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            if let Err(r) = req.check_static(node) {
                rejects.add(r);
                continue;
            }
            let values: Vec<&str> =
                req.spread.iter().map(|k| node.labels.get(k).map_or("", String::as_str)).collect();
            let li = match leaf_index.get(&values) {
                Some(&li) => li,
                None => {
                    let levels = (1..=values.len())
                        .map(|l| {
                            let next = level_counts.len();
                            let id = *level_index.entry(values[..l].to_vec()).or_insert(next);
                            if id == next {
                                level_counts.push(0);
                            }
                            id
                        })
                        .collect();
                    leaves.push(Leaf { levels, heap: BinaryHeap::new() });
                    leaf_index.insert(values, leaves.len() - 1);
                    leaves.len() - 1
                }
            };
            for &l in &leaves[li].levels {
                level_counts[l] += counts[i];
            }
            leaves[li].heap.push(Reverse((counts[i], usage[i].tasks, i)));
        }

        let mut tasks = tasks.into_iter();
        'tasks: for t in tasks.by_ref() {
            loop {
                // The leaf whose label values hold the fewest tasks of this
                // service, level by level; then its least loaded node.
                let best = leaves
                    .iter()
                    .enumerate()
                    .filter_map(|(li, leaf)| leaf.heap.peek().map(|top| (li, leaf, top.0)))
                    .min_by(|(_, a, ta), (_, b, tb)| {
                        let ka = a.levels.iter().map(|&l| level_counts[l]);
                        let kb = b.levels.iter().map(|&l| level_counts[l]);
                        ka.cmp(kb).then(ta.cmp(tb))
                    })
                    .map(|(li, _, _)| li);
                let Some(li) = best else {
                    // No node left for this spec: the rest of the group
                    // stays pending, for the same reasons.
                    pending(&mut out, t, req.explain(&rejects, n));
                    break 'tasks;
                };
                let leaf = &mut leaves[li];
                let Some(Reverse((_, _, i))) = leaf.heap.pop() else { continue };
                match req.check_usage(nodes[i], &usage[i]) {
                    Ok(()) => {
                        usage[i].book(&req);
                        counts[i] += 1;
                        for &l in &leaf.levels {
                            level_counts[l] += 1;
                        }
                        leaf.heap.push(Reverse((counts[i], usage[i].tasks, i)));
                        let note = notes.get(t.id.as_str()).map_or("", String::as_str);
                        out.assigned.push(Placement {
                            task_id: t.id.clone(),
                            node_id: nodes[i].id,
                            message: format!("assigned to node {}{note}", nodes[i].name),
                        });
                        continue 'tasks;
                    }
                    // Usage only grows while a group is placed: a node that
                    // is full now stays full for the rest of the group.
                    Err(r) => rejects.add(r),
                }
            }
        }
        let why = req.explain(&rejects, n);
        for t in tasks {
            pending(&mut out, t, why.clone());
        }
    }
    out
}

fn mounts_volumes(t: &TaskObj) -> bool {
    t.spec.mounts.iter().any(|m| m.r#type == "volume")
}

/// Where a replicated task's data is: the node of its slot's latest task,
/// when a named volume the task mounts holds data there; with those
/// volumes' names.
fn data_node(state: &State, slot_nodes: &HashMap<(&str, u64), (u64, u64)>, t: &TaskObj) -> Option<(u64, String)> {
    if t.slot == 0 {
        return None;
    }
    let &(_, node) = slot_nodes.get(&(t.service_id.as_str(), t.slot))?;
    let names: Vec<&str> = t
        .spec
        .mounts
        .iter()
        .filter(|m| m.r#type == "volume")
        .filter(|m| state.volumes.get(&m.source).is_some_and(|v| v.nodes.contains_key(&node)))
        .map(|m| m.source.as_str())
        .collect();
    (!names.is_empty()).then(|| (node, names.join(", ")))
}

/// Runs [`schedule`] on the leader whenever nodes change or tasks appear,
/// end, or wait.
pub struct Scheduler {
    manager: Arc<Manager>,
    config: SchedulerConfig,
}

/// Retry a failed write after this long.
const RETRY: Duration = Duration::from_millis(500);

impl Scheduler {
    pub fn new(manager: Arc<Manager>, config: SchedulerConfig) -> Self {
        Scheduler { manager, config }
    }

    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        while leader::until_leader(&self.manager, &mut shutdown).await {
            if !self.lead(&mut shutdown).await {
                return;
            }
        }
    }

    /// One term of leadership. Returns false when shutting down.
    async fn lead(&self, shutdown: &mut watch::Receiver<bool>) -> bool {
        let mut events = self.manager.store.watch();
        if let Err(e) = leader::barrier(&self.manager).await {
            tracing::debug!(error = %e, "scheduler: read barrier failed");
            tokio::time::sleep(RETRY).await;
            return true;
        }
        tracing::info!("scheduler: leading");
        let mut metrics = self.manager.raft.metrics();
        let mut dirty = true;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut rest_at: Option<tokio::time::Instant> = None;
        loop {
            if dirty && retry_at.is_none() && rest_at.is_none() {
                dirty = false;
                let started = tokio::time::Instant::now();
                let mut held = Duration::ZERO;
                let result = self.pass(&mut held).await;
                rest_at = leader::rest_after(started, held);
                if let Err(e) = result {
                    tracing::warn!(error = %e, "scheduler: could not write decisions; retrying");
                    dirty = true;
                    retry_at = Some(tokio::time::Instant::now() + RETRY);
                }
            }
            if !self.manager.is_leader() {
                tracing::info!("scheduler: no longer the leader");
                return true;
            }
            let retry = leader::sleep_until(retry_at);
            let rested = leader::sleep_until(rest_at);
            tokio::select! {
                ev = events.recv() => {
                    let mut evs = Vec::new();
                    match ev {
                        Ok(ev) => evs.push(ev),
                        Err(RecvError::Lagged(_)) => dirty = true,
                        Err(RecvError::Closed) => return false,
                    }
                    // Coalesce: everything already committed goes into one pass.
                    loop {
                        match events.try_recv() {
                            Ok(ev) => evs.push(ev),
                            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => dirty = true,
                            Err(_) => break,
                        }
                    }
                    if !dirty {
                        dirty = self.manager.store.read(|s| {
                            evs.iter().flat_map(|e| e.changes.iter()).any(|c| relevant(s, c))
                        });
                    }
                }
                _ = retry => retry_at = None,
                _ = rested => rest_at = None,
                r = metrics.changed() => if r.is_err() { return false },
                _ = shutdown.changed() => return false,
            }
        }
    }

    /// One pass; sets `held` to how long it read the store.
    async fn pass(&self, held: &mut Duration) -> Result<(), leader::LeadError> {
        let started = std::time::Instant::now();
        let config = self.config.clone();
        let (mut decisions, read) = leader::plan(&self.manager, move |s| schedule(s, &config)).await?;
        *held = read.held;
        if decisions.is_empty() {
            return Ok(());
        }
        // A huge backlog is written in steps (placements first); the tasks'
        // changes wake the next pass for the rest.
        decisions.assigned.truncate(MAX_DECISIONS_PER_PASS);
        decisions.pending.truncate(MAX_DECISIONS_PER_PASS - decisions.assigned.len());
        let (placed, pending) = (decisions.assigned.len(), decisions.pending.len());
        self.log(&decisions);
        let decided = started.elapsed();
        let updates = decisions.into_updates();
        let cmds = updates
            .chunks(self.config.max_updates_per_command.max(1))
            .map(|c| Command::UpdateTasks { from_node: None, updates: c.to_vec() })
            .collect();
        leader::propose_all(&self.manager, cmds).await?;
        tracing::info!(
            placed,
            pending,
            read_wait = ?read.waited,
            planned_in = ?read.held,
            committed_in = ?started.elapsed().saturating_sub(decided),
            "scheduler: pass committed"
        );
        Ok(())
    }

    fn log(&self, d: &Decisions) {
        // Every placement by name for small passes; big ones (a scale to
        // thousands) log a summary above and details at debug.
        const DETAIL: usize = 32;
        let small = d.assigned.len() + d.pending.len() <= DETAIL;
        self.manager.store.read(|s| {
            let name = |id: &str| s.tasks.get(id).map(task_name).unwrap_or_else(|| id.to_string());
            for p in &d.assigned {
                let node = s.nodes.get(&p.node_id).map_or("?", |n| n.name.as_str());
                if small {
                    tracing::info!(task = %p.task_id, "{} assigned to node {node}", name(&p.task_id));
                } else {
                    tracing::debug!(task = %p.task_id, "{} assigned to node {node}", name(&p.task_id));
                }
            }
            for u in &d.pending {
                if small {
                    tracing::info!(task = %u.task_id, "{} pending: {}", name(&u.task_id), u.message);
                } else {
                    tracing::debug!(task = %u.task_id, "{} pending: {}", name(&u.task_id), u.message);
                }
            }
        });
    }
}

/// `web.3` for replicated tasks, `mon.<node>` for global ones.
pub fn task_name(t: &TaskObj) -> String {
    if t.slot != 0 {
        format!("{}.{}", t.service_name, t.slot)
    } else {
        let node = t.node_id.map(crate::store::state::format_node_id).unwrap_or_default();
        format!("{}.{}", t.service_name, node.get(..12).unwrap_or(&node))
    }
}

/// Whether a change can give a waiting task a node: nodes change, tasks
/// appear or wait, tasks end (freeing resources and ports).
fn relevant(s: &State, c: &Change) -> bool {
    match c {
        Change::Node(_) | Change::NodeRemoved(_) => true,
        Change::Task(id) => s.tasks.get(id).is_some_and(|t| t.wants_node() || t.state.is_terminal()),
        _ => false,
    }
}
