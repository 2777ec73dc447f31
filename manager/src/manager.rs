//! One manager: the Raft node, the store it applies to, and the write path
//! (propose locally when leader, otherwise forward to the leader).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use shoal_proto::raft::raft_client::RaftClient;
use shoal_proto::raft::{PromoteRequest, RaftPayload};

use crate::raft::log_store::LogStore;
use crate::raft::network::{Network, PeerHealth};
use crate::raft::state_machine::StateMachine;
use crate::raft::{self, NodeId, Raft};
use crate::store::{Applied, ApplyError, Command, Request, Response, Store};
use crate::tls::NodeTls;

/// How long a write may wait for a quorum before the caller is told it was
/// not committed. A partitioned manager must answer with an error, not hang.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("opening raft database {path}: {source}")]
    Db { path: String, source: redb::DatabaseError },
    #[error("raft storage: {0}")]
    Storage(#[from] openraft::StorageError<NodeId>),
    #[error("raft storage: {0}")]
    Redb(#[from] redb::Error),
    #[error("raft: {0}")]
    Fatal(#[from] openraft::error::Fatal<NodeId>),
    #[error("raft config: {0}")]
    Config(#[from] openraft::ConfigError),
}

/// Why a write did not happen. Mapped to a gRPC status in one place
/// (`control::status`).
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error(transparent)]
    Refused(#[from] ApplyError),
    #[error("no leader: this manager cannot reach a quorum of managers, so the write was not committed")]
    NoLeader,
    #[error("the leader ({leader}) is unreachable from this manager, so the write was not committed: {reason}")]
    LeaderUnreachable { leader: String, reason: String },
    #[error("the write was not committed within {0:?}: this manager cannot reach a quorum of managers")]
    Timeout(Duration),
    #[error("raft: {0}")]
    Raft(String),
}

pub struct Manager {
    pub id: NodeId,
    pub raft: Raft,
    pub store: Store,
    pub tls: Arc<NodeTls>,
    pub health: PeerHealth,
    log: LogStore,
    sm: StateMachine,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Manager {
    /// Opens (or creates) the Raft database under `data_dir` and starts the
    /// Raft node. A node restarted on the same data dir rejoins as itself.
    pub async fn open(id: NodeId, data_dir: &Path, tls: Arc<NodeTls>) -> Result<Arc<Self>, ManagerError> {
        let path = data_dir.join("raft.redb");
        let db = tokio::task::spawn_blocking({
            let path = path.clone();
            move || redb::Database::create(&path)
        })
        .await
        .map_err(|e| ManagerError::Redb(redb::Error::Io(std::io::Error::other(e))))?
        .map_err(|source| ManagerError::Db { path: path.display().to_string(), source })?;
        let db = Arc::new(db);
        let store = Store::new();
        let log = LogStore::new(db.clone())?;
        let sm = StateMachine::open(db, store.clone())?;
        let health = PeerHealth::default();
        let network = Network::new(tls.clone(), health.clone());
        let config = Arc::new(raft::config().validate()?);
        let raft = Raft::new(id, config, network, log.clone(), sm.clone()).await?;
        Ok(Arc::new(Manager { id, raft, store, tls, health, log, sm }))
    }

    /// Makes this node a one-member cluster (`--init`).
    pub async fn bootstrap(&self, advertise: &str) -> Result<(), ProposeError> {
        let mut members = BTreeMap::new();
        members.insert(self.id, BasicNode { addr: advertise.to_string() });
        self.raft.initialize(members).await.map_err(|e| ProposeError::Raft(e.to_string()))?;
        self.raft
            .wait(Some(Duration::from_secs(10)))
            .current_leader(self.id, "bootstrap leader")
            .await
            .map_err(|e| ProposeError::Raft(e.to_string()))?;
        Ok(())
    }

    /// The leader's id and address, as this node knows it.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&leader)?.addr.clone();
        Some((leader, addr))
    }

    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader
    }

    /// Voters and learners of the Raft group with their addresses.
    pub fn members(&self) -> Vec<(NodeId, String, bool)> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone(), voters.contains(id)))
            .collect()
    }

    /// (first, last) index of the log on disk and the last snapshot index.
    pub async fn log_bounds(&self) -> (u64, u64, u64) {
        let log = self.log.clone();
        let (first, last) = tokio::task::spawn_blocking(move || log.bounds().unwrap_or((0, 0)))
            .await
            .unwrap_or((0, 0));
        (first, last, self.sm.snapshot_index().await)
    }

    /// Commits `cmd` through Raft and returns once it is applied here, so the
    /// caller reads its own write.
    pub async fn propose(&self, cmd: Command) -> Result<Applied, ProposeError> {
        let kind = cmd.kind();
        let req = Request { now_ms: now_ms(), cmd };
        let res = match self.propose_local(req.clone()).await {
            Err(LocalError::NotLeader(Some((leader, addr)))) if leader != self.id => {
                self.forward(&addr, &req).await?
            }
            Err(LocalError::NotLeader(_)) => return Err(ProposeError::NoLeader),
            Err(LocalError::Other(e)) => return Err(e),
            Ok(r) => r,
        };
        let applied = res?;
        // A forwarded write is applied on the leader first; wait until this
        // manager has applied it too.
        let _ = self
            .raft
            .wait(Some(WRITE_TIMEOUT))
            .applied_index_at_least(Some(applied.version), kind)
            .await;
        Ok(applied)
    }

    /// Proposes on this node only; the leader's `Propose` RPC calls this.
    pub(crate) async fn propose_local(&self, req: Request) -> Result<Response, LocalError> {
        match tokio::time::timeout(WRITE_TIMEOUT, self.raft.client_write(req)).await {
            Err(_) => Err(LocalError::Other(ProposeError::Timeout(WRITE_TIMEOUT))),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                let leader = f.leader_id.zip(f.leader_node.map(|n| n.addr));
                Err(LocalError::NotLeader(leader))
            }
            Ok(Err(e)) => Err(LocalError::Other(ProposeError::Raft(e.to_string()))),
        }
    }

    async fn forward(&self, addr: &str, req: &Request) -> Result<Response, ProposeError> {
        let unreachable = |reason: String| ProposeError::LeaderUnreachable { leader: addr.to_string(), reason };
        let channel = self.tls.channel(addr).map_err(|e| unreachable(e.to_string()))?;
        let data = serde_json::to_vec(req).map_err(|e| ProposeError::Raft(e.to_string()))?;
        let mut client = RaftClient::new(channel);
        let call = client.propose(RaftPayload { data });
        let resp = match tokio::time::timeout(WRITE_TIMEOUT + Duration::from_secs(1), call).await {
            Err(_) => return Err(ProposeError::Timeout(WRITE_TIMEOUT)),
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(unreachable(status.message().to_string()));
            }
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                return Err(ProposeError::Timeout(WRITE_TIMEOUT));
            }
            Ok(Err(status)) => return Err(ProposeError::Raft(status.message().to_string())),
            Ok(Ok(r)) => r.into_inner(),
        };
        serde_json::from_slice(&resp.data).map_err(|e| ProposeError::Raft(format!("bad reply from leader: {e}")))
    }

    /// Adds `id` as a learner, waits until it has caught up, then makes it a
    /// voter. Runs on the leader (the `Promote` RPC forwards here).
    pub async fn add_manager(&self, id: NodeId, addr: &str) -> Result<(), ProposeError> {
        let node = BasicNode { addr: addr.to_string() };
        tracing::info!(node = %crate::store::state::format_node_id(id), addr, "adding manager as raft learner");
        self.raft.add_learner(id, node, true).await.map_err(map_membership_err)?;
        let mut voters: BTreeSet<NodeId> = self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        voters.insert(id);
        self.raft.change_membership(voters, false).await.map_err(map_membership_err)?;
        tracing::info!(node = %crate::store::state::format_node_id(id), "manager is now a raft voter");
        Ok(())
    }

    /// Asks the leader to add this node as a manager (after a manager join).
    pub async fn request_promotion(&self, via: &[String]) -> Result<(), ProposeError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut last = String::from("no manager address known");
        loop {
            for addr in via {
                let Ok(channel) = self.tls.channel(addr) else { continue };
                match RaftClient::new(channel).promote(PromoteRequest { node_id: self.id }).await {
                    Ok(_) => return Ok(()),
                    Err(s) => last = format!("{addr}: {}", s.message()),
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ProposeError::Raft(format!("could not become a raft voter: {last}")));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

fn map_membership_err(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ProposeError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => ProposeError::NoLeader,
        e => ProposeError::Raft(e.to_string()),
    }
}

/// The result of a local proposal, before forwarding.
pub(crate) enum LocalError {
    NotLeader(Option<(NodeId, String)>),
    Other(ProposeError),
}
