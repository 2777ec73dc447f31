//! The Dispatcher: agents' sessions with the managers. The leader keeps when
//! each node last heartbeated (in memory: heartbeats are not worth a Raft
//! entry each) and writes only status changes — ready ↔ down — to the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_proto::dispatcher::dispatcher_server::Dispatcher;
use shoal_proto::dispatcher::{HeartbeatRequest, HeartbeatResponse};
use tonic::{Request, Response, Status};

use crate::control::status;
use crate::manager::Manager;
use crate::pki::CertRole;
use crate::store::objects::{NodeStatus, Role};
use crate::store::state::format_node_id;
use crate::store::{Command, NodePatch};
use crate::tls::authorize;

/// Dispatcher timing.
#[derive(Clone, Copy, Debug)]
pub struct DispatcherConfig {
    /// How often agents heartbeat.
    pub period: Duration,
    /// A node that misses heartbeats this long is marked down (Swarm's
    /// default is 5 s too: 5 × its heartbeat period).
    pub down_after: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig { period: Duration::from_millis(500), down_after: Duration::from_secs(5) }
    }
}

#[derive(Clone)]
pub struct DispatcherService {
    manager: Arc<Manager>,
    config: DispatcherConfig,
    last_seen: Arc<Mutex<HashMap<u64, Instant>>>,
}

impl DispatcherService {
    pub fn new(manager: Arc<Manager>, config: DispatcherConfig) -> Self {
        DispatcherService { manager, config, last_seen: Default::default() }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.last_seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// While this manager leads, marks nodes down when their heartbeats stop.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut was_leader = false;
        let mut tick = tokio::time::interval(self.config.period);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let leader = self.manager.is_leader();
            if leader && !was_leader {
                // A new leader knows no heartbeats yet: give every node a
                // full period to reach it before calling it down.
                let now = Instant::now();
                let ids: Vec<u64> = self.manager.store.read(|s| s.nodes.keys().copied().collect());
                let mut seen = self.seen();
                seen.clear();
                for id in ids {
                    seen.insert(id, now);
                }
            }
            was_leader = leader;
            if !leader {
                continue;
            }
            let down: Vec<(u64, NodeStatus)> = {
                let seen = self.seen();
                self.manager.store.read(|s| {
                    s.nodes
                        .values()
                        .filter(|n| n.status == NodeStatus::Ready && n.id != self.manager.id)
                        .filter(|n| seen.get(&n.id).is_none_or(|t| t.elapsed() > self.config.down_after))
                        .map(|n| (n.id, NodeStatus::Down))
                        .collect()
                })
            };
            if down.is_empty() {
                continue;
            }
            let names: Vec<String> = down.iter().map(|(id, _)| format_node_id(*id)).collect();
            match self.manager.propose(Command::SetNodeStatus { changes: down }).await {
                Ok(_) => tracing::warn!(nodes = ?names, after = ?self.config.down_after, "nodes missed heartbeats: marked down"),
                Err(e) => tracing::warn!(nodes = ?names, error = %e, "could not mark nodes down"),
            }
        }
    }
}

#[tonic::async_trait]
impl Dispatcher for DispatcherService {
    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let (caller, _) = authorize(&req, &[CertRole::Manager, CertRole::Worker])?;
        let r = req.into_inner();
        if caller != format_node_id(r.node_id) {
            return Err(Status::permission_denied("a node may only heartbeat for itself"));
        }
        if !self.manager.is_leader() {
            let leader = self.manager.leader().map(|l| l.1).unwrap_or_default();
            let mut st = Status::failed_precondition(format!("not the leader; the leader is {leader:?}"));
            if let Ok(v) = leader.parse() {
                st.metadata_mut().insert("shoal-leader", v);
            }
            return Err(st);
        }
        let node = self.manager.store.read(|s| s.nodes.get(&r.node_id).cloned());
        let Some(node) = node else {
            return Err(Status::not_found("this node was removed from the cluster"));
        };
        self.seen().insert(r.node_id, Instant::now());
        let resources = r.resources.map(|x| (x.nano_cpus, x.memory_bytes));
        let changed_resources = resources.is_some_and(|x| x != (node.nano_cpus, node.memory_bytes));
        if changed_resources {
            let patch = NodePatch { resources, ..Default::default() };
            self.manager.propose(Command::UpdateNode { id: r.node_id, patch }).await.map_err(status)?;
        }
        if node.status == NodeStatus::Down {
            self.manager
                .propose(Command::SetNodeStatus { changes: vec![(r.node_id, NodeStatus::Ready)] })
                .await
                .map_err(status)?;
            tracing::info!(node = %node.name, "node is heartbeating again: marked ready");
        }
        let managers = self.manager.store.read(|s| {
            s.nodes.values().filter(|n| n.role == Role::Manager).map(|n| n.address.clone()).collect()
        });
        Ok(Response::new(HeartbeatResponse { period_ms: self.config.period.as_millis() as u64, managers }))
    }
}
