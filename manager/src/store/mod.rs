//! The replicated state store: the objects, the commands that change them,
//! and a watch stream of what changed. The Raft state machine owns the
//! `State`; everyone else reads it through [`Store`] and changes it only by
//! proposing commands.

pub mod command;
pub mod index;
pub mod objects;
pub mod state;
pub mod task;

use std::sync::{Arc, RwLock, RwLockReadGuard};

use tokio::sync::broadcast;

pub use command::{Applied, ApplyError, Command, NodePatch, Outcome, Request, Response};
pub use state::{Change, State};

/// What one applied log entry changed.
#[derive(Debug)]
pub struct Event {
    pub version: u64,
    pub changes: Vec<Change>,
}

/// A shared, read-only view of the applied state plus its watch stream.
#[derive(Clone)]
pub struct Store {
    state: Arc<RwLock<State>>,
    events: broadcast::Sender<Arc<Event>>,
    /// The revoked serials, apart from the state: every RPC checks them,
    /// and must not wait while a big entry is applied.
    revoked: Arc<RwLock<Arc<std::collections::HashSet<String>>>>,
    /// Bumped whenever a node, a network or the cluster object changes:
    /// what every heartbeat answers from (managers, peers) is worked out
    /// once per value instead of per heartbeat.
    topology: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        // Watchers that fall this far behind get `Lagged` and must re-read
        // the whole state; 4096 entries is seconds of the busiest load.
        let (events, _) = broadcast::channel(4096);
        Store { state: Arc::new(RwLock::new(State::default())), events, revoked: Default::default(), topology: Default::default() }
    }

    /// Whether the certificate with `serial` (hex) is revoked; never waits
    /// for the state machine.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.read().unwrap_or_else(|e| e.into_inner()).contains(serial)
    }

    fn publish_revoked(&self, st: &State) {
        let set = Arc::new(st.revoked.keys().cloned().collect());
        *self.revoked.write().unwrap_or_else(|e| e.into_inner()) = set;
    }

    /// Reads the applied state. Keep the closure short: the state machine
    /// waits for it.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.guard())
    }

    fn guard(&self) -> RwLockReadGuard<'_, State> {
        // A poisoned lock means a panic while applying; the state may be
        // half-changed, but reading it is still the best we can do.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes whenever a node, a network or the cluster object changes.
    pub fn topology_version(&self) -> u64 {
        self.topology.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Subscribes to what each applied entry changes.
    pub fn watch(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Applies one entry (state machine only).
    pub(crate) fn apply(&self, index: u64, req: Request) -> Response {
        let mut changes = Vec::new();
        let asked = std::time::Instant::now();
        let res = {
            let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
            let got = std::time::Instant::now();
            let commands = req.cmds.len();
            let revoked_before = st.revoked_version;
            let res = req
                .cmds
                .into_iter()
                .map(|cmd| {
                    let kind = cmd.kind();
                    let res = st.apply(index, req.now_ms, cmd, &mut changes);
                    if let Err(e) = &res {
                        tracing::debug!(index, command = kind, error = %e, "command refused");
                    }
                    res
                })
                .collect();
            if st.revoked_version != revoked_before {
                self.publish_revoked(&st);
            }
            tracing::debug!(index, commands, lock_wait = ?(got - asked), applied_in = ?got.elapsed(), "store: entry applied");
            res
        };
        if changes.iter().any(|c| {
            matches!(c, Change::Node(_) | Change::NodeRemoved(_) | Change::Network(_) | Change::NetworkRemoved(_) | Change::Cluster)
        }) {
            self.topology.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        if !changes.is_empty() {
            // No receivers is fine: nobody watches yet.
            let _ = self.events.send(Arc::new(Event { version: index, changes }));
        }
        res
    }

    /// Replaces the whole state (snapshot install or restart).
    pub(crate) fn replace(&self, mut state: State) {
        state.rebuild_index();
        self.publish_revoked(&state);
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = state;
        self.topology.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    pub(crate) fn snapshot_bytes(&self) -> Result<Vec<u8>, postcard::Error> {
        crate::codec::encode(&*self.guard())
    }
}
