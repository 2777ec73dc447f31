//! The orchestrators (leader only): replicated services keep N slots,
//! global services one task per eligible node; restart policies, node loss,
//! drain, removed services, task history and rebalancing.
//!
//! [`reconcile::reconcile`] decides (a pure function of the store's state
//! and the time); [`Orchestrator`] runs it on the leader: everything once
//! when leadership is gained (after a read barrier), then the services that
//! each committed batch touched, with all decisions of a pass proposed
//! together (one `CreateTasks`, one `UpdateTasks`, one `RemoveTasks`, which
//! the batcher puts into one Raft entry). Delayed restarts wake the loop on
//! a timer; nothing blocks it.

pub(crate) mod leader;
pub mod reconcile;
#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ring::rand::SecureRandom;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::watch;

use crate::manager::{Manager, now_ms};
use leader::sleep_until;
use crate::store::{Change, Command, State};
pub use leader::LeadError;
pub use reconcile::{MAX_CREATE_PER_PASS, OrchestratorConfig, Plan, Restart, Scope, reconcile, restart_decision};

pub struct Orchestrator {
    manager: Arc<Manager>,
    config: OrchestratorConfig,
}

/// Retry a failed write after this long.
const RETRY: Duration = Duration::from_millis(500);
/// Reconcile everything this often even without events: a safety net for
/// anything a watch event could not express.
const RESYNC: Duration = Duration::from_secs(30);

/// Progress-only changes (a task placed, starting, running) are looked at
/// after at least this long, and after four times the last pass took: a
/// 50,000-task service converging sends reports all the time, and a pass
/// per Raft entry kept the leader's core busy with them.
const LAZY_MIN: Duration = Duration::from_millis(100);

/// What of a node the orchestrators act on: status, availability, role
/// and labels (not the resources a heartbeat refreshes).
fn node_facts(n: &crate::store::objects::NodeObj) -> (crate::store::objects::NodeStatus, &'static str, &'static str, Vec<(String, String)>) {
    (n.status, n.availability.as_str(), n.role.as_str(), n.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Which services need a look.
enum Dirty {
    Nothing,
    Some(BTreeSet<String>),
    All,
}

impl Dirty {
    fn mark(&mut self, service_id: &str) {
        match self {
            Dirty::All => {}
            Dirty::Some(s) => {
                s.insert(service_id.to_string());
            }
            Dirty::Nothing => *self = Dirty::Some(BTreeSet::from([service_id.to_string()])),
        }
    }

    fn take(&mut self) -> Option<Scope> {
        match std::mem::replace(self, Dirty::Nothing) {
            Dirty::Nothing => None,
            Dirty::Some(s) => Some(Scope::Services(s)),
            Dirty::All => Some(Scope::All),
        }
    }
}

impl Orchestrator {
    pub fn new(manager: Arc<Manager>, config: OrchestratorConfig) -> Self {
        Orchestrator { manager, config }
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
        // Subscribe before the barrier: nothing applied after it is missed.
        let mut events = self.manager.store.watch();
        if let Err(e) = leader::barrier(&self.manager).await {
            tracing::debug!(error = %e, "orchestrator: read barrier failed");
            tokio::time::sleep(RETRY).await;
            return true;
        }
        tracing::info!("orchestrator: leading; reconciling every service");
        let mut metrics = self.manager.raft.metrics();
        let mut dirty = Dirty::All;
        // Services with only progress to look at, and when to.
        let mut lazy: BTreeSet<String> = BTreeSet::new();
        let mut lazy_at: Option<tokio::time::Instant> = None;
        let mut lazy_delay = LAZY_MIN;
        let mut nodes: std::collections::HashMap<u64, _> =
            self.manager.store.read(|s| s.nodes.values().map(|n| (n.id, node_facts(n))).collect());
        let mut wake_at: Option<tokio::time::Instant> = None;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut rest_at: Option<tokio::time::Instant> = None;
        let mut resync = tokio::time::interval(RESYNC);
        resync.tick().await;
        loop {
            if retry_at.is_none()
                && rest_at.is_none()
                && let Some(scope) = dirty.take()
            {
                let started = tokio::time::Instant::now();
                let mut held = Duration::ZERO;
                let mut unfinished = Vec::new();
                let result = self.pass(&scope, &mut held, &mut unfinished).await;
                // Services the pass's cap left work for come next, whether
                // or not anything of theirs changes meanwhile (else they
                // waited for the 30 s resync once another service's tasks
                // stopped waking the loop).
                for id in &unfinished {
                    dirty.mark(id);
                }
                lazy_delay = LAZY_MIN.max(held * 4);
                rest_at = leader::rest_after(started, held);
                match result {
                    Ok(wake) => {
                        // A pass over some services only knows their
                        // wake-ups; keep the earlier one.
                        wake_at = match (wake, wake_at, &scope) {
                            (w, _, Scope::All) => w,
                            (Some(w), Some(o), _) => Some(w.min(o)),
                            (w, o, _) => w.or(o),
                        };
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "orchestrator: could not write decisions; retrying");
                        dirty = Dirty::All;
                        retry_at = Some(tokio::time::Instant::now() + RETRY);
                    }
                }
            }
            if !self.manager.is_leader() {
                tracing::info!("orchestrator: no longer the leader");
                return true;
            }
            let retry = sleep_until(retry_at);
            let wake = sleep_until(wake_at);
            let lazy_due = sleep_until(lazy_at);
            let rested = sleep_until(rest_at);
            tokio::select! {
                ev = events.recv() => {
                    let mut evs = Vec::new();
                    match ev {
                        Ok(ev) => evs.push(ev),
                        Err(RecvError::Lagged(_)) => dirty = Dirty::All,
                        Err(RecvError::Closed) => return false,
                    }
                    // Coalesce: everything already committed goes into one pass.
                    loop {
                        match events.try_recv() {
                            Ok(ev) => evs.push(ev),
                            Err(TryRecvError::Lagged(_)) => dirty = Dirty::All,
                            Err(_) => break,
                        }
                    }
                    self.manager.store.read(|s| {
                        for c in evs.iter().flat_map(|e| e.changes.iter()) {
                            mark(s, c, &mut dirty, &mut lazy, &mut nodes);
                        }
                    });
                    if !lazy.is_empty() && lazy_at.is_none() {
                        lazy_at = Some(tokio::time::Instant::now() + lazy_delay);
                    }
                }
                _ = lazy_due => {
                    lazy_at = None;
                    for id in std::mem::take(&mut lazy) {
                        dirty.mark(&id);
                    }
                }
                _ = retry => retry_at = None,
                _ = rested => rest_at = None,
                _ = wake => { wake_at = None; dirty = Dirty::All; }
                _ = resync.tick() => dirty = Dirty::All,
                r = metrics.changed() => if r.is_err() { return false },
                _ = shutdown.changed() => return false,
            }
        }
    }

    /// One reconcile pass; returns when the next delayed restart is due,
    /// sets `held` to how long it read the store and `unfinished` to the
    /// services it left tasks to create for.
    async fn pass(&self, scope: &Scope, held: &mut Duration, unfinished: &mut Vec<String>) -> Result<Option<tokio::time::Instant>, LeadError> {
        let now = now_ms();
        let (scope, config) = (scope.clone(), self.config.clone());
        let (mut plan, read) = leader::plan(&self.manager, move |s| reconcile(s, &scope, now, &config)).await?;
        *held = read.held;
        *unfinished = std::mem::take(&mut plan.unfinished);
        let wake = plan.wake_at_ms.map(|at| tokio::time::Instant::now() + Duration::from_millis(at.saturating_sub(now)));
        if plan.is_empty() {
            return Ok(wake);
        }
        // A big scale is created in steps (the planner stops at
        // `MAX_CREATE_PER_PASS` for replicated services; this also bounds
        // global ones): each pass's tasks go as a few Raft entries, and
        // other writes get in between passes. The next pass (woken by
        // these tasks' changes) creates the rest.
        if plan.create.len() > MAX_CREATE_PER_PASS {
            tracing::info!(
                created = MAX_CREATE_PER_PASS,
                left = plan.create.len() - MAX_CREATE_PER_PASS,
                "orchestrator: creating tasks in steps"
            );
            unfinished.extend(plan.create[MAX_CREATE_PER_PASS..].iter().map(|t| t.service_id.clone()));
            unfinished.sort();
            unfinished.dedup();
            plan.create.truncate(MAX_CREATE_PER_PASS);
        }
        name_tasks(&mut plan)?;
        let (created, updated, removed) = (plan.create.len(), plan.update.len(), plan.remove.len());
        let mut cmds = Vec::new();
        if !plan.create.is_empty() {
            cmds.push(Command::CreateTasks { tasks: std::mem::take(&mut plan.create) });
        }
        if !plan.update.is_empty() {
            cmds.push(Command::UpdateTasks { from_node: None, updates: std::mem::take(&mut plan.update) });
        }
        if !plan.remove.is_empty() {
            cmds.push(Command::RemoveTasks { ids: std::mem::take(&mut plan.remove) });
        }
        for (service, version, reason) in std::mem::take(&mut plan.rollbacks) {
            tracing::warn!(service = %service, reason = %reason, "update failed: rolling the service back");
            cmds.push(Command::AutoRollback { service, version, reason });
        }
        leader::propose_all(&self.manager, cmds).await?;
        for note in &plan.notes {
            tracing::info!("{note}");
        }
        tracing::debug!(created, updated, removed, read_wait = ?read.waited, planned_in = ?read.held, "orchestrator: pass committed");
        Ok(wake)
    }
}

/// Marks the services a change concerns: now (`dirty`), or for a look a
/// little later (`lazy`) when a task only made progress.
fn mark(
    s: &State,
    c: &Change,
    dirty: &mut Dirty,
    lazy: &mut BTreeSet<String>,
    nodes: &mut std::collections::HashMap<u64, (crate::store::objects::NodeStatus, &'static str, &'static str, Vec<(String, String)>)>,
) {
    use crate::store::task::TaskState;
    match c {
        // A node change can concern every service (down, drain, labels,
        // global services, a new node to rebalance onto); a refresh of its
        // resources or certificate does not.
        Change::Node(id) => {
            let facts = s.nodes.get(id).map(node_facts);
            if facts.as_ref() != nodes.get(id) {
                match facts {
                    Some(f) => nodes.insert(*id, f),
                    None => nodes.remove(id),
                };
                *dirty = Dirty::All;
            }
        }
        Change::NodeRemoved(id) => {
            nodes.remove(id);
            *dirty = Dirty::All;
        }
        Change::Service(id) | Change::ServiceRemoved(id) => dirty.mark(id),
        Change::Task(id) => {
            if let Some(t) = s.tasks.get(id) {
                let progress = t.desired_state == TaskState::Running && t.state > TaskState::New && !t.state.is_terminal();
                if progress {
                    lazy.insert(t.service_id.clone());
                } else {
                    dirty.mark(&t.service_id);
                }
            }
        }
        // Removals of tasks are our own doing; the rest does not concern
        // the orchestrators.
        _ => {}
    }
}

/// Gives the plan's new tasks random ids (24 hex digits, like service ids).
fn name_tasks(plan: &mut Plan) -> Result<(), LeadError> {
    const BYTES: usize = 12;
    let mut buf = vec![0u8; plan.create.len() * BYTES];
    ring::rand::SystemRandom::new().fill(&mut buf).map_err(|_| LeadError::Random)?;
    for (t, b) in plan.create.iter_mut().zip(buf.chunks(BYTES)) {
        t.id = hex::encode(b);
    }
    Ok(())
}
