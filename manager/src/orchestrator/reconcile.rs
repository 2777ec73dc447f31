//! The orchestrators' decisions: a pure function from the store's state (and
//! the time) to the tasks to create, change and forget.
//!
//! Every task the orchestrator wants to run has desired state `running`;
//! the one such task of a slot (replicated: slot number, global: node) is
//! the slot's *current* task. Retiring a task means desired `shutdown` (the
//! agent stops it); a task whose node is down or gone is also marked
//! `orphaned` on the spot, since no agent will report on it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use shoal_proto::control::ServiceSpec;

use crate::scheduler::filter::{NodeUsage, Reject, Requirements, usage_by_node};
use crate::store::State;
use crate::store::objects::{NodeObj, NodeStatus, ServiceObj};
use crate::store::state::format_node_id;
use crate::store::task::{TaskObj, TaskState, TaskUpdate};

/// Orchestrator tuning.
#[derive(Clone, Debug)]
pub struct OrchestratorConfig {
    /// Finished tasks kept per slot for `service ps` and restart windows;
    /// older ones are removed so the store does not grow forever (Swarm's
    /// task history limit is 5 too).
    pub history_per_slot: usize,
    /// Move replicas onto nodes that join or come back (Swarm never does).
    pub rebalance: bool,
    /// At most this many tasks of one service move per pass; the next
    /// moves wait until the replacements run, so a rebalance never takes
    /// more than this many replicas down at once.
    pub rebalance_moves_per_pass: usize,
    /// Must match the scheduler's setting (rebalance checks that a task
    /// would fit where it wants to move it).
    pub host_ports: bool,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        OrchestratorConfig { history_per_slot: 5, rebalance: true, rebalance_moves_per_pass: 2, host_ports: true }
    }
}

/// Which services a pass looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    All,
    Services(BTreeSet<String>),
}

/// One pass's decisions.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// New tasks, without ids: the caller names them (ids are random, and
    /// this function does no I/O).
    pub create: Vec<TaskObj>,
    pub update: Vec<TaskUpdate>,
    pub remove: Vec<String>,
    /// The earliest time (ms) a delayed restart becomes due.
    pub wake_at_ms: Option<u64>,
    /// What happened, per service, for the log.
    pub notes: Vec<String>,
    /// Failed updates to roll back (failure action `rollback`): (service
    /// id, its version, why).
    pub rollbacks: Vec<(String, u64, String)>,
    /// Services with tasks still to create after this pass's cap: the
    /// next pass must look at them even if nothing of theirs changes.
    pub unfinished: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.remove.is_empty() && self.rollbacks.is_empty()
    }
}

/// What the restart policy says about a task that ended by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    Now,
    At(u64),
    Never,
}

/// The restart policy (condition, max attempts within a window, delay) for
/// `ended`, whose slot also held `history` (ended included or not).
pub fn restart_decision(spec: &ServiceSpec, ended: &TaskObj, history: &[&TaskObj], now_ms: u64) -> Restart {
    let policy = spec.restart.clone().unwrap_or_default();
    let failed = matches!(ended.state, TaskState::Failed | TaskState::Rejected) || ended.exit_code.is_some_and(|c| c != 0);
    match policy.condition.as_str() {
        "none" => return Restart::Never,
        "on-failure" if !failed => return Restart::Never,
        _ => {}
    }
    if policy.max_attempts > 0 {
        let restarts = if policy.window_ms == 0 {
            ended.attempt
        } else {
            let since = now_ms.saturating_sub(policy.window_ms);
            let mut seen = BTreeSet::new();
            history
                .iter()
                .chain(std::iter::once(&ended))
                .filter(|t| t.attempt > 0 && t.created_at_ms >= since && seen.insert(t.id.as_str()))
                .count() as u64
        };
        if restarts >= policy.max_attempts {
            return Restart::Never;
        }
    }
    let delay = policy.delay_ms.unwrap_or_else(|| backoff_ms(ended.attempt));
    let at = ended.state_at_ms.saturating_add(delay);
    if now_ms >= at { Restart::Now } else { Restart::At(at) }
}

/// The restart delay when the policy sets none: 100 ms, doubling with
/// each restart of the slot, at most 5 s (Swarm's flat default). A task
/// that fails at once (a missing image, a bad command) then costs a few
/// Raft writes per second at first and one per 5 s after, not a stream.
pub fn backoff_ms(attempt: u64) -> u64 {
    const BASE_MS: u64 = 100;
    const MAX_MS: u64 = 5_000;
    (BASE_MS << attempt.min(6)).min(MAX_MS)
}

/// A task as this pass sees it: the stored task plus this pass's changes.
struct View<'a> {
    t: &'a TaskObj,
    state: TaskState,
    desired: TaskState,
    touched: bool,
}

impl View<'_> {
    fn current(&self) -> bool {
        self.desired <= TaskState::Running
    }
}

/// What became of a slot's current task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Ended and not to be restarted.
    Done,
    /// To be replaced now (ended, on a lost or drained node, …).
    Replace,
    /// To be restarted at this time.
    Later(u64),
    /// Waiting for the scheduler.
    Unassigned,
    /// Assigned or running on this node.
    OnNode(u64),
}

struct Planner<'a> {
    state: &'a State,
    now: u64,
    config: &'a OrchestratorConfig,
    plan: Plan,
    updates: BTreeMap<String, TaskUpdate>,
    usage: Option<HashMap<u64, NodeUsage>>,
    /// Per service: phrase → count, for the log.
    tally: BTreeMap<String, usize>,
}

/// The most tasks one orchestrator pass creates: a scale to 50,000 goes as
/// steps, with other writes in between.
pub const MAX_CREATE_PER_PASS: usize = 5_000;

/// Decides what the orchestrators do about the services in `scope`.
pub fn reconcile(state: &State, scope: &Scope, now_ms: u64, config: &OrchestratorConfig) -> Plan {
    let mut by_service: BTreeMap<&str, Vec<View>> = BTreeMap::new();
    let view = |t| View { t, state: t.state, desired: t.desired_state, touched: false };
    match scope {
        Scope::All => {
            for t in state.tasks.values() {
                by_service.entry(t.service_id.as_str()).or_default().push(view(t));
            }
        }
        // Only the services in scope, through the index (in id order, as
        // the full scan gives them).
        Scope::Services(ids) => {
            for id in ids {
                let views: Vec<View> = state.service_tasks(id).map(view).collect();
                if let Some(first) = views.first() {
                    by_service.insert(first.t.service_id.as_str(), views);
                }
            }
        }
    }
    let mut ids: BTreeSet<&str> = by_service.keys().copied().collect();
    match scope {
        Scope::All => ids.extend(state.services.keys().map(String::as_str)),
        Scope::Services(s) => ids.extend(s.iter().map(String::as_str).filter(|id| state.services.contains_key(*id))),
    }
    let mut p = Planner {
        state,
        now: now_ms,
        config,
        plan: Plan::default(),
        updates: BTreeMap::new(),
        usage: None,
        tally: BTreeMap::new(),
    };
    for id in ids {
        let mut views = by_service.remove(id).unwrap_or_default();
        match state.services.get(id) {
            None => p.removed_service(&mut views),
            Some(svc) => {
                if svc.spec.mode == "global" {
                    p.global(svc, &mut views);
                } else {
                    p.replicated(svc, &mut views);
                }
                p.trim_history(svc, &views);
            }
        }
        let name = state
            .services
            .get(id)
            .map(|s| s.spec.name.clone())
            .or_else(|| views.first().map(|v| v.t.service_name.clone()))
            .unwrap_or_else(|| id.to_string());
        for (phrase, n) in std::mem::take(&mut p.tally) {
            p.plan.notes.push(format!("service {name}: {}", phrase.replace("{n}", &tasks(n))));
        }
    }
    p.plan.update = p.updates.into_values().collect();
    p.plan
}

fn tasks(n: usize) -> String {
    if n == 1 { "1 task".into() } else { format!("{n} tasks") }
}

impl<'a> Planner<'a> {
    fn note(&mut self, phrase: String) {
        *self.tally.entry(phrase).or_default() += 1;
    }

    fn node(&self, id: Option<u64>) -> Option<&'a NodeObj> {
        id.and_then(|id| self.state.nodes.get(&id))
    }

    fn node_name(&self, id: u64) -> String {
        self.state.nodes.get(&id).map(|n| n.name.clone()).unwrap_or_else(|| format_node_id(id))
    }

    fn update(&mut self, v: &mut View, f: impl FnOnce(&mut TaskUpdate)) {
        v.touched = true;
        let u = self.updates.entry(v.t.id.clone()).or_insert_with(|| TaskUpdate { id: v.t.id.clone(), ..Default::default() });
        f(u);
    }

    /// Desired shutdown. A task no agent has seen yet (new, pending) is
    /// shut down on the spot.
    fn shut(&mut self, v: &mut View, message: &str) {
        let never_started = v.state < TaskState::Assigned;
        let current = v.current();
        if !current && !never_started {
            return;
        }
        if current {
            v.desired = TaskState::Shutdown;
        }
        if never_started {
            v.state = TaskState::Shutdown;
        }
        // A finished task keeps the message of how it ended.
        let message = (!v.state.is_terminal() || never_started).then(|| message.to_string());
        self.update(v, |u| {
            if current {
                u.desired_state = Some(TaskState::Shutdown);
            }
            if never_started {
                u.state = Some(TaskState::Shutdown);
            }
            if message.is_some() {
                u.message = message;
            }
        });
    }

    /// Orphaned (no agent will report on it) and desired shutdown (so the
    /// agent stops it if its node comes back).
    fn orphan(&mut self, v: &mut View, message: String) {
        v.state = TaskState::Orphaned;
        v.desired = TaskState::Shutdown;
        self.update(v, |u| {
            u.state = Some(TaskState::Orphaned);
            u.desired_state = Some(TaskState::Shutdown);
            u.message = Some(message);
        });
    }

    /// Whether the task's node is gone or down; the reason if so.
    fn lost(&self, v: &View) -> Option<String> {
        let id = v.t.node_id?;
        match self.state.nodes.get(&id) {
            None => Some(format!("node {} was removed", format_node_id(id))),
            Some(n) if n.status == NodeStatus::Down => Some(format!("node {} is down", n.name)),
            Some(_) => None,
        }
    }

    /// Retires a task: orphaned if its node is lost, else desired shutdown.
    fn retire(&mut self, v: &mut View, message: &str) {
        if !v.state.is_terminal()
            && let Some(why) = self.lost(v)
        {
            self.orphan(v, why);
            return;
        }
        self.shut(v, message);
    }

    /// Tasks that are no slot's current task: orphan those on lost nodes,
    /// finish those no agent has seen.
    fn tidy_retired(&mut self, views: &mut [View]) {
        for v in views.iter_mut().filter(|v| !v.current() && !v.state.is_terminal()) {
            if let Some(why) = self.lost(v) {
                self.orphan(v, why);
            } else if v.state < TaskState::Assigned {
                self.shut(v, "shut down before it was assigned");
            }
        }
    }

    fn removed_service(&mut self, views: &mut [View]) {
        let mut stopping = 0;
        for v in views.iter_mut() {
            if v.current() {
                self.retire(v, "service removed");
                stopping += 1;
            }
        }
        self.tidy_retired(views);
        for v in views.iter() {
            if v.state.is_terminal() && !v.touched {
                self.plan.remove.push(v.t.id.clone());
            }
        }
        if stopping > 0 {
            *self.tally.entry("removed: stopping {n}".into()).or_default() += stopping;
        }
    }

    /// Of several current tasks in one slot (a race; should not happen),
    /// keeps the most advanced live one and retires the others.
    fn dedupe(&mut self, views: &mut [View], idxs: &[usize]) -> Option<usize> {
        let best = idxs
            .iter()
            .copied()
            .filter(|&i| views[i].current())
            .max_by_key(|&i| (!views[i].state.is_terminal(), views[i].state, views[i].t.created_at_ms, &views[i].t.id))?;
        for &i in idxs {
            if i != best && views[i].current() {
                self.retire(&mut views[i], "duplicate task for its slot");
                self.note("{n} duplicate retired".into());
            }
        }
        Some(best)
    }

    /// What to do with a replicated slot's current task: restart policy for
    /// ended tasks; orphan, drain and constraint checks for placed ones.
    fn classify(&mut self, svc: &ServiceObj, views: &mut [View], cur: usize, history: &[&TaskObj], req: &Requirements) -> Class {
        let v = &views[cur];
        if v.state.is_terminal() {
            return match v.state {
                TaskState::Orphaned | TaskState::Shutdown => Class::Replace,
                _ => match restart_decision(&svc.spec, v.t, history, self.now) {
                    Restart::Now => Class::Replace,
                    Restart::At(t) => Class::Later(t),
                    Restart::Never => Class::Done,
                },
            };
        }
        let Some(node_id) = v.t.node_id else { return Class::Unassigned };
        if let Some(why) = self.lost(v) {
            let name = self.node_name(node_id);
            self.orphan(&mut views[cur], why);
            self.note(format!("{{n}} orphaned on down node {name}, replacing"));
            return Class::Replace;
        }
        let Some(node) = self.node(Some(node_id)) else { return Class::Replace };
        match req.check_static(node) {
            Ok(()) | Err(Reject::Paused) => Class::OnNode(node_id),
            Err(Reject::Drained) => {
                self.shut(&mut views[cur], &format!("node {} is drained", node.name));
                self.note(format!("{{n}} moved off drained node {}", node.name));
                Class::Replace
            }
            Err(_) => {
                self.shut(&mut views[cur], &format!("node {} no longer satisfies the constraints", node.name));
                self.note(format!("{{n}} moved off node {}: constraints no longer satisfied", node.name));
                Class::Replace
            }
        }
    }

    /// Replaces a slot's current task: retire it, create its successor.
    fn replace(&mut self, svc: &ServiceObj, v: &mut View, node_id: Option<u64>, message: &str) {
        let (slot, attempt) = (v.t.slot, v.t.attempt + 1);
        if v.current() {
            self.retire(v, message);
        }
        let t = TaskObj::new(svc, slot, node_id, attempt, message);
        self.plan.create.push(t);
    }

    fn wake(&mut self, at: u64) {
        self.plan.wake_at_ms = Some(self.plan.wake_at_ms.map_or(at, |w| w.min(at)));
    }

    fn replicated(&mut self, svc: &ServiceObj, views: &mut [View]) {
        let req = Requirements::new(&svc.spec, self.config.host_ports);
        let want = svc.spec.replicas as usize;
        let mut slots: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, v) in views.iter().enumerate() {
            slots.entry(v.t.slot).or_default().push(i);
        }
        // slot → (current task, class)
        let mut current: BTreeMap<u64, (usize, Class)> = BTreeMap::new();
        // Start-first updates: slots whose successor is starting while the
        // old task still serves (the old one stays the slot's current).
        let start_first = rollout_config(svc).is_some_and(|u| u.order == "start-first");
        let mut successors: BTreeSet<u64> = BTreeSet::new();
        let mut cache = HashMap::new();
        for (&slot, idxs) in &slots {
            let mut idxs = idxs.clone();
            if start_first {
                let live = |v: &View| v.current() && !v.state.is_terminal();
                let successor = idxs
                    .iter()
                    .copied()
                    .find(|&i| live(&views[i]) && views[i].state < TaskState::Running && !Self::outdated(svc, views[i].t, &mut cache));
                let serving = idxs.iter().any(|&i| live(&views[i]) && Self::outdated(svc, views[i].t, &mut cache));
                if let (Some(s), true) = (successor, serving) {
                    idxs.retain(|&i| i != s);
                    successors.insert(slot);
                }
            }
            let Some(cur) = self.dedupe(views, &idxs) else { continue };
            // The slot's history only matters to the restart policy.
            let history: Vec<&TaskObj> = if views[cur].state.is_terminal() {
                idxs.iter().filter(|&&i| i != cur).map(|&i| views[i].t).collect()
            } else {
                Vec::new()
            };
            let class = self.classify(svc, views, cur, &history, &req);
            current.insert(slot, (cur, class));
        }
        self.tidy_retired(views);
        // Stop-first updates: slots whose old task is still stopping. The
        // successor starts once it has (as Swarm's updater waits), so the
        // slot is neither empty nor free for a new task meanwhile.
        let stopping: BTreeSet<u64> = slots
            .iter()
            .filter(|(slot, idxs)| !current.contains_key(slot) && idxs.iter().any(|&i| self.stopping_for_update(svc, &views[i], &mut cache)))
            .map(|(&slot, _)| slot)
            .collect();
        if !stopping.is_empty() {
            *self.tally.entry("update: {n} waiting for their old task to stop".into()).or_default() += stopping.len();
        }

        // Scale down: first slots that are over anyway, then tasks still
        // waiting for a node, then tasks on the busiest nodes.
        if current.len() > want {
            let mut excess = current.len() - want;
            let mut victims: Vec<u64> = Vec::new();
            for rank in [0, 1, 2] {
                for (&slot, &(_, class)) in current.iter().rev() {
                    let r = match class {
                        Class::Done => 0,
                        Class::Replace | Class::Later(_) => 1,
                        Class::Unassigned => 2,
                        Class::OnNode(_) => 3,
                    };
                    if r == rank && excess > 0 {
                        victims.push(slot);
                        excess -= 1;
                    }
                }
            }
            if excess > 0 {
                let usage = self.usage();
                let mut per_node: BTreeMap<u64, Vec<(bool, u64)>> = BTreeMap::new();
                for (&slot, &(cur, class)) in &current {
                    if let Class::OnNode(n) = class {
                        per_node.entry(n).or_default().push((views[cur].state >= TaskState::Running, slot));
                    }
                }
                // Max-heap of (service tasks, all tasks, node): the busiest
                // node gives up a task (not yet running first, then the
                // highest slot), then the heap is updated.
                let mut heap: BinaryHeap<(usize, u32, u64)> = per_node
                    .iter_mut()
                    .map(|(&n, list)| {
                        list.sort();
                        (list.len(), usage.get(&n).map_or(0, |u| u.tasks), n)
                    })
                    .collect();
                while excess > 0 {
                    let Some((count, total, n)) = heap.pop() else { break };
                    let Some((_, slot)) = per_node.get_mut(&n).and_then(|l| {
                        // Prefer a task that is not running yet, then the highest slot.
                        let pos = l.iter().rposition(|(running, _)| !running).unwrap_or(l.len().saturating_sub(1));
                        (pos < l.len()).then(|| l.remove(pos))
                    }) else {
                        continue;
                    };
                    victims.push(slot);
                    excess -= 1;
                    if count > 1 {
                        heap.push((count - 1, total.saturating_sub(1), n));
                    }
                }
            }
            for slot in victims {
                if let Some((cur, _)) = current.remove(&slot) {
                    self.retire(&mut views[cur], "scaled down");
                    self.note("scaled down: {n} retired".into());
                }
            }
        }

        for &(cur, class) in current.values() {
            match class {
                Class::Replace => {
                    let why = if views[cur].state.is_terminal() && !views[cur].touched {
                        format!("restarting after task {} ended ({})", views[cur].t.id, views[cur].state.as_str())
                    } else {
                        "replacement".to_string()
                    };
                    if views[cur].t.state.is_terminal() && views[cur].t.state != TaskState::Orphaned {
                        self.note(format!("{{n}} restarted ({})", views[cur].t.state.as_str()));
                    }
                    self.replace(svc, &mut views[cur], None, &why);
                }
                Class::Later(at) => self.wake(at),
                Class::Done | Class::Unassigned | Class::OnNode(_) => {}
            }
        }

        // Scale up: the lowest free slot numbers, at most
        // `MAX_CREATE_PER_PASS` per pass (the next pass, woken by these
        // tasks' commit, creates more).
        let occupied = current.len() + stopping.len();
        // Tasks created below start now: an update's next batch waits
        // for them as for its own.
        let mut starting = 0;
        if occupied < want {
            let budget = MAX_CREATE_PER_PASS.saturating_sub(self.plan.create.len());
            let mut missing = (want - occupied).min(budget);
            let left = want - occupied - missing;
            if left > 0 {
                *self.tally.entry(format!("scaling up to {want}: {{n}} left for the next passes")).or_default() += left;
                self.plan.unfinished.push(svc.id.clone());
            }
            let mut slot = 1u64;
            let (mut created, mut successors_now) = (0, 0);
            while missing > 0 {
                if !current.contains_key(&slot) && !stopping.contains(&slot) {
                    // A slot whose old-spec task a stop-first update stopped.
                    let updated = slots.get(&slot).is_some_and(|idxs| idxs.iter().any(|&i| !views[i].current() && Self::outdated(svc, views[i].t, &mut cache)));
                    let message = if updated { "updated to the new spec (its old task stopped)" } else { "created" };
                    self.plan.create.push(TaskObj::new(svc, slot, None, 0, message));
                    missing -= 1;
                    if updated {
                        successors_now += 1;
                    } else {
                        created += 1;
                    }
                }
                slot += 1;
            }
            if created > 0 {
                *self.tally.entry(format!("scaled up to {want}: {{n}} created")).or_default() += created;
            }
            if successors_now > 0 {
                *self.tally.entry("update: {n} replaced with the new spec".into()).or_default() += successors_now;
            }
            starting = created + successors_now;
        }

        let slots: Vec<(Option<u64>, usize, Class)> = current.iter().map(|(&s, &(cur, c))| (Some(s), cur, c)).collect();
        let updating = self.rolling_update(svc, views, &slots, &successors, stopping.len(), starting);
        let converged = current.values().all(|(cur, c)| matches!(c, Class::OnNode(_)) && views[*cur].state == TaskState::Running);
        if self.config.rebalance && !updating && converged && svc.spec.placement_prefs.is_empty() && current.len() == want {
            self.rebalance(svc, views, &current, &req);
        }
    }

    /// Whether `t` runs an older spec than its service. Scaling and the
    /// update settings themselves do not restart tasks (as in Swarm);
    /// anything else the task runs with does. Cached per spec version: every
    /// task created at one service version has that version's spec.
    fn outdated(svc: &ServiceObj, t: &TaskObj, cache: &mut HashMap<u64, bool>) -> bool {
        if t.spec_version == svc.version {
            return false;
        }
        *cache.entry(t.spec_version).or_insert_with(|| outdated_spec(svc, t))
    }

    /// Whether `v` is an old-spec task retired by a stop-first update that
    /// has not stopped yet (on a node that still answers).
    fn stopping_for_update(&self, svc: &ServiceObj, v: &View, cache: &mut HashMap<u64, bool>) -> bool {
        !v.current() && !v.state.is_terminal() && v.state >= TaskState::Assigned && self.lost(v).is_none() && Self::outdated(svc, v.t, cache)
    }

    /// Rolling update: replaces current tasks that run an older spec,
    /// `update.parallelism` at a time (0: all at once), each batch once
    /// the previous one runs and `update.delay_ms` has passed. Returns
    /// whether an update is in progress. Stop-first (the default, as in
    /// Swarm): the old task stops and its successor, in the same slot (or
    /// on the same node, for global), is created once it has stopped.
    /// `stopping` counts slots or nodes still waiting for an old task to
    /// stop, `starting` tasks created this pass: both are in flight too.
    fn rolling_update(
        &mut self,
        svc: &ServiceObj,
        views: &mut [View],
        slots: &[(Option<u64>, usize, Class)],
        successors: &BTreeSet<u64>,
        stopping: usize,
        starting: usize,
    ) -> bool {
        let mut cache = HashMap::new();
        let live = |c: &Class| matches!(c, Class::OnNode(_) | Class::Unassigned);
        // Slots whose successor is already starting (start-first) wait. A
        // slot whose task ended for good (restart condition none, or
        // attempts used up) on an older spec is updated too, as Swarm's
        // updater takes every dirty slot: a rollback after a failed
        // update then brings back every slot, not only the running ones.
        let outdated: Vec<usize> = slots
            .iter()
            .filter(|(slot, cur, c)| {
                (live(c) || matches!(c, Class::Done))
                    && views[*cur].current()
                    && Self::outdated(svc, views[*cur].t, &mut cache)
                    && !slot.is_some_and(|s| successors.contains(&s))
            })
            .map(|(_, cur, _)| *cur)
            .collect();
        let cfg = rollout_config(svc).cloned().unwrap_or_default();
        // Tasks of the new spec that failed within the monitor window count
        // against the update; past `max_failure_ratio` of the tasks updated
        // so far, the failure action: pause (Swarm's default: the rest keep
        // the old spec until the service is updated again) or rollback.
        let monitor = if cfg.monitor_ms == 0 { 5_000 } else { cfg.monitor_ms };
        let mut updated = 0usize;
        let mut failures = Vec::new();
        for v in views.iter().filter(|v| v.t.created_at_ms >= svc.updated_at_ms) {
            if Self::outdated(svc, v.t, &mut cache) {
                continue;
            }
            updated += 1;
            if matches!(v.t.state, TaskState::Failed | TaskState::Rejected) && v.t.state_at_ms.saturating_sub(v.t.created_at_ms) <= monitor {
                failures.push(v);
            }
        }
        let over = !failures.is_empty() && failures.len() as f64 / updated.max(1) as f64 > cfg.max_failure_ratio;
        let failed = failures.first().copied().filter(|_| over);
        // A rollback whose failure action is `continue` goes on regardless.
        let keep_going = svc.rolling_back && rollout_config(svc).is_some_and(|c| c.failure_action == "continue");
        // The update counts as in progress while tasks still run the old
        // spec, and for a monitor period per slot after it began: a new
        // task may reach running (and the update move on) before it fails.
        let in_progress = !outdated.is_empty()
            || (svc.spec_updated_at_ms != 0 && self.now <= svc.spec_updated_at_ms.saturating_add(monitor.saturating_mul(slots.len().max(1) as u64)));
        if let Some(v) = failed.filter(|_| in_progress && !keep_going && !svc.rolling_back && cfg.failure_action == "rollback" && svc.previous_spec.is_some()) {
            let why = format!(
                "rolled back: update failed: task {} of the new spec {} ({} of {} updated tasks failed)",
                v.t.id,
                v.t.state.as_str(),
                failures.len(),
                updated
            );
            self.note(format!("{why}; {{n}} still on the failed spec roll back"));
            *self.tally.entry(format!("update failed ({}): rolling back {{n}} slots", svc.spec.name)).or_default() += slots.len();
            self.plan.rollbacks.push((svc.id.clone(), svc.version, why));
            return true;
        }
        if outdated.is_empty() && (!successors.is_empty() || stopping > 0) {
            return true;
        }
        if outdated.is_empty() {
            return false;
        }
        let parallelism = if cfg.parallelism == 0 { usize::MAX } else { cfg.parallelism as usize };
        let stale: std::collections::HashSet<usize> = outdated.iter().copied().collect();
        let fresh: Vec<&View> = slots
            .iter()
            .filter(|(_, cur, c)| live(c) && views[*cur].current() && !stale.contains(cur))
            .map(|(_, cur, _)| &views[*cur])
            .collect();
        let in_flight = fresh.iter().filter(|v| v.state < TaskState::Running).count() + successors.len() + stopping + starting;
        let last_started = fresh
            .iter()
            .filter(|v| v.state == TaskState::Running && v.t.created_at_ms >= svc.updated_at_ms)
            .map(|v| v.t.state_at_ms)
            .max();
        if let Some(at) = last_started.map(|t| t.saturating_add(cfg.delay_ms)).filter(|at| *at > self.now) {
            self.wake(at);
            return true;
        }
        if let Some(v) = failed.filter(|_| !keep_going) {
            let phrase = format!("update paused after task {} of the new spec {}: {{n}} still on the old spec", v.t.id, v.t.state.as_str());
            *self.tally.entry(phrase).or_default() += outdated.len();
            return true;
        }
        let allowed = parallelism.saturating_sub(in_flight);
        let start_first = rollout_config(svc).is_some_and(|u| u.order == "start-first");
        for cur in outdated.into_iter().take(allowed) {
            let node = if views[cur].t.slot == 0 { views[cur].t.node_id } else { None };
            let (slot, v) = (views[cur].t.slot, &mut views[cur]);
            if start_first && slot != 0 {
                // The old task keeps serving until its successor runs; the
                // slot's next pass then retires it.
                let t = TaskObj::new(svc, slot, None, 0, "updating to the new spec (start-first: the old task stops once this one runs)");
                self.plan.create.push(t);
                self.note("update: {n} successors started before their old tasks stop".into());
                continue;
            }
            // Stop-first: the successor is created once this task has
            // stopped (the slot, or for global the node, waits for it);
            // at once when it had ended, never started, or its node is lost.
            self.retire(v, "updating to the new spec (stop-first: its successor starts once it has stopped)");
            if v.state.is_terminal() {
                let t = TaskObj::new(svc, slot, node, 0, "updated to the new spec");
                self.plan.create.push(t);
                self.note("update: {n} replaced with the new spec".into());
            } else {
                self.note("update: {n} stopping before their successors start".into());
            }
        }
        true
    }

    fn usage(&mut self) -> HashMap<u64, NodeUsage> {
        if self.usage.is_none() {
            self.usage = Some(usage_by_node(self.state, self.config.host_ports));
        }
        self.usage.clone().unwrap_or_default()
    }

    /// Moves tasks from the busiest to the emptiest eligible node while the
    /// spread is uneven (max − min > 1), a few per pass. The retired task's
    /// successor is placed by the scheduler, which picks the node with the
    /// fewest tasks of the service among the nodes it fits on: the same
    /// nodes and order used here, so the spread narrows every round and
    /// never flaps.
    fn rebalance(&mut self, svc: &ServiceObj, views: &mut [View], current: &BTreeMap<u64, (usize, Class)>, req: &Requirements) {
        let mut on: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (&slot, &(_, class)) in current {
            if let Class::OnNode(n) = class {
                on.entry(n).or_default().push(slot);
            }
        }
        let state = self.state;
        let mut usage = self.usage();
        let mut moves = 0;
        while moves < self.config.rebalance_moves_per_pass {
            // The emptiest node that could take one more task now.
            let min = state
                .nodes
                .values()
                .filter(|n| req.check(n, usage.get(&n.id).unwrap_or(&NodeUsage::default())).is_ok())
                .map(|n| (on.get(&n.id).map_or(0, Vec::len), usage.get(&n.id).map_or(0, |u| u.tasks), n.id))
                .min();
            let max = on.iter().map(|(&n, slots)| (slots.len(), usage.get(&n).map_or(0, |u| u.tasks), n)).max();
            let (Some((lo, _, to)), Some((hi, _, from))) = (min, max) else { break };
            if hi <= lo + 1 {
                break;
            }
            let Some(slot) = on.get_mut(&from).and_then(Vec::pop) else { break };
            let Some(&(cur, _)) = current.get(&slot) else { break };
            let to_name = self.node_name(to);
            let from_name = self.node_name(from);
            self.replace(svc, &mut views[cur], None, &format!("rebalancing from node {from_name} to node {to_name}"));
            self.note(format!("rebalancing: {{n}} moved from node {from_name} toward node {to_name}"));
            on.entry(to).or_default().push(slot);
            usage.entry(to).or_default().book(req);
            moves += 1;
        }
    }

    fn global(&mut self, svc: &ServiceObj, views: &mut [View]) {
        let req = Requirements::new(&svc.spec, self.config.host_ports);
        let mut by_node: BTreeMap<Option<u64>, Vec<usize>> = BTreeMap::new();
        for (i, v) in views.iter().enumerate() {
            by_node.entry(v.t.node_id).or_default().push(i);
        }
        // Tasks without a node, or for nodes that left: retire.
        for (node, idxs) in &by_node {
            if node.is_some_and(|n| self.state.nodes.contains_key(&n)) {
                continue;
            }
            for &i in idxs {
                if views[i].current() {
                    self.retire(&mut views[i], "its node left the cluster");
                    self.note("{n} retired: node left the cluster".into());
                }
            }
        }
        let state = self.state;
        let mut live = Vec::new();
        let mut cache = HashMap::new();
        let mut stopping = 0;
        for node in state.nodes.values() {
            let idxs = by_node.get(&Some(node.id)).cloned().unwrap_or_default();
            let eligible = req.check_static(node);
            let cur = self.dedupe(views, &idxs);
            let history: Vec<&TaskObj> = idxs.iter().filter(|&&i| Some(i) != cur).map(|&i| views[i].t).collect();
            let Some(cur) = cur else {
                if idxs.iter().any(|&i| self.stopping_for_update(svc, &views[i], &mut cache)) {
                    stopping += 1;
                    self.note(format!("update: {{n}} waiting for the old task to stop on node {}", node.name));
                } else if eligible.is_ok() {
                    let t = TaskObj::new(svc, 0, Some(node.id), 0, "created");
                    self.plan.create.push(t);
                    self.note(format!("{{n}} created for node {}", node.name));
                }
                continue;
            };
            let v = &views[cur];
            if !v.state.is_terminal() {
                match eligible {
                    Ok(()) | Err(Reject::Paused) => live.push((None, cur, Class::OnNode(node.id))),
                    Err(Reject::Down) => {
                        let why = format!("node {} is down", node.name);
                        self.orphan(&mut views[cur], why);
                        self.note(format!("{{n}} orphaned on down node {}", node.name));
                    }
                    Err(Reject::Drained) => {
                        self.shut(&mut views[cur], &format!("node {} is drained", node.name));
                        self.note(format!("{{n}} stopped on drained node {}", node.name));
                    }
                    Err(_) => {
                        self.shut(&mut views[cur], &format!("node {} no longer satisfies the constraints", node.name));
                        self.note(format!("{{n}} stopped on node {}: constraints no longer satisfied", node.name));
                    }
                }
                continue;
            }
            if eligible.is_err() {
                self.shut(&mut views[cur], "node no longer eligible");
                continue;
            }
            let restart = match v.state {
                TaskState::Orphaned | TaskState::Shutdown => Restart::Now,
                _ => restart_decision(&svc.spec, v.t, &history, self.now),
            };
            match restart {
                Restart::Now => {
                    let why = format!("restarting after task {} ended ({})", v.t.id, v.state.as_str());
                    self.note(format!("{{n}} restarted on node {}", node.name));
                    self.replace(svc, &mut views[cur], Some(node.id), &why);
                }
                Restart::At(at) => self.wake(at),
                Restart::Never => {}
            }
        }
        self.rolling_update(svc, views, &live, &BTreeSet::new(), stopping, 0);
        self.tidy_retired(views);
    }

    /// Keeps the newest `history_per_slot` finished tasks of each slot
    /// (more when a restart window needs them to count attempts).
    fn trim_history(&mut self, svc: &ServiceObj, views: &[View]) {
        let mut keep = self.config.history_per_slot.max(1);
        if let Some(r) = &svc.spec.restart
            && r.window_ms > 0
        {
            keep = keep.max((r.max_attempts as usize).saturating_add(1).min(100));
        }
        let mut slots: HashMap<(u64, Option<u64>), Vec<&View>> = HashMap::new();
        for v in views.iter().filter(|v| v.state.is_terminal() && !v.current() && !v.touched) {
            let key = if v.t.slot != 0 { (v.t.slot, None) } else { (0, v.t.node_id) };
            slots.entry(key).or_default().push(v);
        }
        for (_, mut old) in slots {
            if old.len() <= keep {
                continue;
            }
            old.sort_by_key(|v| Reverse((v.t.created_at_ms, v.t.version)));
            self.plan.remove.extend(old[keep..].iter().map(|v| v.t.id.clone()));
        }
    }
}

/// How the service's tasks roll out now: its rollback config while it
/// rolls back (when it has one), else its update config.
fn rollout_config(svc: &ServiceObj) -> Option<&shoal_proto::control::UpdateConfig> {
    match (&svc.spec.rollback, svc.rolling_back) {
        (Some(r), true) => Some(r),
        _ => svc.spec.update.as_ref(),
    }
}

/// Whether task `t` runs a spec that differs from its service's in what
/// makes a task (not the count, the rollout settings, labels or aliases).
pub fn outdated_spec(svc: &ServiceObj, t: &TaskObj) -> bool {
    outdated_version(svc, t.spec_version, &t.spec)
}

/// Whether tasks made from `spec` (service version `version`) must be
/// replaced to run `svc`'s current spec.
pub fn outdated_version(svc: &ServiceObj, version: u64, spec: &shoal_proto::control::ServiceSpec) -> bool {
    if version == svc.version {
        return false;
    }
    let mut old = spec.clone();
    old.replicas = svc.spec.replicas;
    old.update = svc.spec.update.clone();
    old.rollback = svc.spec.rollback.clone();
    old.aliases = svc.spec.aliases.clone();
    old.labels = svc.spec.labels.clone();
    // The autoscaler's settings change the count, not the tasks.
    old.autoscale = svc.spec.autoscale.clone();
    old != svc.spec
}
