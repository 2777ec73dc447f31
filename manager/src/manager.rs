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

use crate::blobs::{BlobError, BlobStore};
use crate::raft::log_store::LogStore;
use crate::raft::network::{Network, PeerHealth};
use crate::raft::state_machine::StateMachine;
use crate::raft::{self, NodeId, Raft};
use crate::store::command::{MAX_ENTRY_BYTES, TARGET_ENTRY_BYTES, encoded_len};
use crate::store::{Applied, ApplyError, Command, Outcome, Request, Store};
use tokio::sync::{mpsc, oneshot, Semaphore};
use shoal_security::{at_rest, Trust};

/// How long a write may wait for a quorum before the caller is told it was
/// not committed. A partitioned manager must answer with an error, not hang.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("opening raft database {path}: {source}")]
    Db { path: String, source: redb::DatabaseError },
    #[error("making {path} private: {source}")]
    Mode { path: String, source: std::io::Error },
    #[error("raft storage: {0}")]
    Storage(#[from] openraft::StorageError<NodeId>),
    #[error("raft storage: {0}")]
    Redb(#[from] redb::Error),
    #[error("raft: {0}")]
    Fatal(#[from] openraft::error::Fatal<NodeId>),
    #[error("raft config: {0}")]
    Config(#[from] openraft::ConfigError),
    #[error(transparent)]
    Blobs(#[from] BlobError),
    #[error("keys at rest: {0}")]
    AtRest(#[from] shoal_security::at_rest::AtRestError),
    #[error("raft threads: {0}")]
    Threads(String),
    #[error("this manager is locked (autolock): give it the unlock key with `shoal cluster unlock`")]
    Locked,
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
    #[error("the change is {size} bytes encoded: one write may be at most {max} bytes")]
    TooLarge { size: usize, max: usize },
}

pub struct Manager {
    /// The threads Raft runs on (see [`RaftRuntime`]).
    _raft_rt: RaftRuntime,
    pub id: NodeId,
    pub raft: Raft,
    pub store: Store,
    pub tls: Arc<Trust>,
    pub health: PeerHealth,
    log: LogStore,
    sm: StateMachine,
    batcher: mpsc::Sender<Pending>,
    pub blobs: BlobStore,
    /// Load the agents report with their heartbeats (on the leader).
    pub metrics: crate::metrics::Metrics,
    /// Faults tests inject.
    pub faults: Faults,
    /// The data key that seals this manager's log and snapshots, and the
    /// unlock key its file was last sealed with (autolock).
    data_dir: std::path::PathBuf,
    data_key: at_rest::Key,
    sealed_with: tokio::sync::Mutex<Option<String>>,
}

/// Faults a test can inject into a manager (`shoal daemon`'s hidden
/// `--fault-*` flags); none by default.
#[derive(Default)]
pub struct Faults {
    /// Answers to forwarded writes to drop (the writes are applied).
    pub drop_forwarded_replies: std::sync::atomic::AtomicU32,
    /// Serve "linearizable" reads from the local state without the read
    /// barrier: a deliberately broken mode the linearizability checker
    /// must catch.
    pub stale_reads: std::sync::atomic::AtomicBool,
}

impl Faults {
    /// Whether to drop this answer (counts one down).
    pub fn drop_reply(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.drop_forwarded_replies.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
    }
}

/// A tokio runtime of two threads (`raft`) for the Raft core, its
/// replication streams, the state machine and the write batcher. Dropping
/// it (the manager is gone) stops them without blocking the caller.
struct RaftRuntime(Option<tokio::runtime::Runtime>);

impl RaftRuntime {
    fn new() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("raft").enable_all().build()?;
        Ok(RaftRuntime(Some(rt)))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for RaftRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Manager {
    /// Opens (or creates) the Raft database under `data_dir` and starts the
    /// Raft node. A node restarted on the same data dir rejoins as itself.
    pub async fn open(id: NodeId, data_dir: &Path, tls: Arc<Trust>) -> Result<Arc<Self>, ManagerError> {
        Self::open_with_key(id, data_dir, tls, None).await
    }

    /// [`Manager::open`] with the data key given (a manager unlocked with
    /// `shoal cluster unlock`); None reads (or makes) `DATA/keys/raft.key`.
    pub async fn open_with_key(
        id: NodeId,
        data_dir: &Path,
        tls: Arc<Trust>,
        key: Option<at_rest::Key>,
    ) -> Result<Arc<Self>, ManagerError> {
        let data_key = match key {
            Some(k) => k,
            None => match at_rest::load_or_create(data_dir)? {
                at_rest::DataKey::Open(k) => k,
                at_rest::DataKey::Locked => return Err(ManagerError::Locked),
            },
        };
        let sealer = Arc::new(at_rest::Sealer::new(&data_key));
        let path = data_dir.join("raft.redb");
        let db = tokio::task::spawn_blocking({
            let path = path.clone();
            move || redb::Database::create(&path)
        })
        .await
        .map_err(|e| ManagerError::Redb(redb::Error::Io(std::io::Error::other(e))))?
        .map_err(|source| ManagerError::Db { path: path.display().to_string(), source })?;
        // The log holds the cluster's secrets: for root's eyes only, also
        // when the file was made by an older version.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|source| ManagerError::Mode { path: path.display().to_string(), source })?;
        }
        let db = Arc::new(db);
        let store = Store::new();
        // Every server method (this node's Agent service too) refuses the
        // certificates the replicated state revokes.
        tls.set_revocation_check({
            let store = store.clone();
            Arc::new(move |serial: &str| store.is_revoked(serial))
        });
        let log = LogStore::new(db.clone(), sealer.clone())?;
        let sm = StateMachine::open(db, store.clone(), sealer)?;
        let health = PeerHealth::default();
        let network = Network::new(tls.clone(), health.clone());
        let config = Arc::new(raft::config().validate()?);
        // Raft runs on threads of its own: a leader busy with thousands of
        // agents (TLS handshakes, heartbeats, assignment streams) on the
        // main runtime must still send its Raft heartbeats on time, or its
        // followers call elections in the middle of the burst.
        let raft_rt = RaftRuntime::new().map_err(|e| ManagerError::Threads(e.to_string()))?;
        let raft = raft_rt
            .handle()
            .spawn({
                let (log, sm) = (log.clone(), sm.clone());
                async move { Raft::new(id, config, network, log, sm).await }
            })
            .await
            .map_err(|e| ManagerError::Threads(e.to_string()))??;
        let (batcher, rx) = mpsc::channel(MAX_BATCH * 4);
        raft_rt.handle().spawn(batch_loop(raft.clone(), rx));
        let blobs = BlobStore::open(data_dir)?;
        Ok(Arc::new(Manager { _raft_rt: raft_rt, id, raft, store, tls, health, log, sm, batcher, blobs, metrics: Default::default(), faults: Faults::default(), data_dir: data_dir.to_path_buf(), data_key, sealed_with: Default::default() }))
    }

    /// Makes this node a one-member cluster (`--init`).
    pub async fn bootstrap(&self, advertise: &str) -> Result<(), ProposeError> {
        let mut members = BTreeMap::new();
        members.insert(self.id, BasicNode { addr: advertise.to_string() });
        match self.raft.initialize(members).await {
            Ok(()) => {}
            // A restart of an `--init` that crashed after this step.
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {
                tracing::info!("raft group was bootstrapped before a restart: resuming --init");
            }
            Err(e) => return Err(ProposeError::Raft(e.to_string())),
        }
        self.raft
            .wait(Some(Duration::from_secs(10)))
            .current_leader(self.id, "bootstrap leader")
            .await
            .map_err(|e| ProposeError::Raft(e.to_string()))?;
        Ok(())
    }

    /// Keeps `DATA/keys/raft.key` as the cluster's autolock setting says:
    /// sealed with the current unlock key, or in the clear. Runs until
    /// `shutdown`.
    pub(crate) async fn keep_data_key(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut events = self.store.watch();
        loop {
            let want = self.store.read(|s| s.cluster.as_ref().map(|c| c.unlock_key.clone()));
            if let Some(want) = want {
                let mut last = self.sealed_with.lock().await;
                if last.as_deref() != Some(want.as_str()) {
                    let unlock = (!want.is_empty()).then_some(want.as_str());
                    match at_rest::store(&self.data_dir, &self.data_key, unlock) {
                        Ok(()) => {
                            if last.is_some() || unlock.is_some() {
                                tracing::info!(autolock = unlock.is_some(), "this manager's data key was re-sealed for the cluster's autolock setting");
                            }
                            *last = Some(want);
                        }
                        Err(e) => tracing::error!(error = %e, "could not re-seal this manager's data key; retrying on the next cluster change"),
                    }
                }
            }
            tokio::select! {
                r = events.recv() => {
                    if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                        return;
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    /// The leader's id and address, as this node knows it.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        // Borrow, don't clone: this runs on every request.
        let rx = self.raft.metrics();
        let m = rx.borrow();
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
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let membership = membership.membership();
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

    /// Makes a read that follows linearizable: returns once this manager
    /// has applied every write committed before the call. The leader
    /// confirms with a quorum that it still leads; a follower asks the
    /// leader for that index. A manager that can't reach a leader with a
    /// quorum says so instead of answering from a state that may be stale.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        loop {
            let err = if self.is_leader() {
                match tokio::time::timeout_at(deadline, self.raft.ensure_linearizable()).await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) => ProposeError::Raft(e.to_string()),
                    Err(_) => ProposeError::NoLeader,
                }
            } else if let Some((_, addr)) = self.leader().filter(|(id, _)| *id != self.id) {
                match tokio::time::timeout_at(deadline, self.read_index_from(&addr)).await {
                    Ok(Ok(index)) => {
                        let waited = self.raft.wait(Some(deadline.saturating_duration_since(tokio::time::Instant::now()))).applied_index_at_least(Some(index), "read barrier").await;
                        return waited.map(|_| ()).map_err(|_| ProposeError::NoLeader);
                    }
                    Ok(Err(e)) => e,
                    Err(_) => ProposeError::NoLeader,
                }
            } else {
                ProposeError::NoLeader
            };
            if tokio::time::Instant::now() + Duration::from_millis(100) > deadline {
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn read_index_from(&self, addr: &str) -> Result<u64, ProposeError> {
        let unreachable = |reason: String| ProposeError::LeaderUnreachable { leader: addr.to_string(), reason };
        let channel = self.tls.channel(addr).map_err(|e| unreachable(e.to_string()))?;
        let r = RaftClient::new(channel).read_index(shoal_proto::raft::ReadIndexRequest {}).await.map_err(|s| unreachable(s.message().to_string()))?;
        Ok(r.into_inner().index)
    }

    /// Commits `cmd` through Raft and returns once it is applied here, so the
    /// caller reads its own write. On a follower the command is forwarded to
    /// the leader.
    pub async fn propose(&self, cmd: Command) -> Result<Applied, ProposeError> {
        let kind = cmd.kind();
        // One id for this request, however often it is sent: a retry of a
        // write whose answer was lost gets the first answer.
        let id = shoal_security::pki::random_hex(16).map_err(|e| ProposeError::Raft(e.to_string()))?;
        let cmd = Command::Once { id, cmd: Box::new(cmd) };
        // During an election there is briefly no leader, or the leader we
        // knew has gone: retry those (nothing was sent) until the deadline,
        // so a failover is a short pause for clients, not an error.
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        let (outcome, forwarded) = loop {
            let retry = match self.propose_local(cmd.clone()).await {
                Ok(o) => break (o, false),
                Err(LocalError::NotLeader(Some((leader, addr)))) if leader != self.id => {
                    match self.forward(&addr, &cmd).await {
                        Ok(o) => break (o, true),
                        Err(e @ (ProposeError::LeaderUnreachable { .. } | ProposeError::NoLeader)) => e,
                        Err(e) => return Err(e),
                    }
                }
                Err(LocalError::NotLeader(_)) => ProposeError::NoLeader,
                Err(LocalError::Timeout) => return Err(ProposeError::Timeout(WRITE_TIMEOUT)),
                Err(LocalError::Raft(e)) => return Err(ProposeError::Raft(e)),
                Err(LocalError::TooLarge(size)) => return Err(ProposeError::TooLarge { size, max: MAX_ENTRY_BYTES }),
            };
            if tokio::time::Instant::now() + Duration::from_millis(100) > deadline {
                return Err(retry);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let applied = outcome?;
        // A local proposal returns once this manager applied it. A forwarded
        // one is applied on the leader first: wait until this manager has
        // applied it too, so the caller reads its own write here.
        if forwarded {
            let _ = self
                .raft
                .wait(Some(WRITE_TIMEOUT))
                .applied_index_at_least(Some(applied.version), kind)
                .await;
        }
        Ok(applied)
    }

    /// Proposes through this node's batcher only; the leader's `Propose` RPC
    /// calls this for forwarded writes.
    pub(crate) async fn propose_local(&self, cmd: Command) -> Result<Outcome, LocalError> {
        let size = encoded_len(&cmd);
        if size > MAX_ENTRY_BYTES {
            return Err(LocalError::TooLarge(size));
        }
        let (reply, rx) = oneshot::channel();
        self.batcher
            .send(Pending { cmd, size, reply, queued: std::time::Instant::now() })
            .await
            .map_err(|_| LocalError::Raft("manager is shutting down".into()))?;
        rx.await.map_err(|_| LocalError::Raft("manager is shutting down".into()))?
    }

    async fn forward(&self, addr: &str, cmd: &Command) -> Result<Outcome, ProposeError> {
        let unreachable = |reason: String| ProposeError::LeaderUnreachable { leader: addr.to_string(), reason };
        let channel = self.tls.channel(addr).map_err(|e| unreachable(e.to_string()))?;
        let data = crate::raft::encode(cmd).map_err(|e| ProposeError::Raft(e.to_string()))?;
        let mut client = RaftClient::new(channel);
        let call = client.propose(RaftPayload { data });
        let resp = match tokio::time::timeout(WRITE_TIMEOUT + Duration::from_secs(1), call).await {
            Err(_) => return Err(ProposeError::Timeout(WRITE_TIMEOUT)),
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                // A connection failure, an answer lost on the way, or the
                // leader saying it no longer leads: safe to retry, as the
                // write carries its request id (applied once at most).
                return Err(unreachable(status.message().to_string()));
            }
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                return Err(ProposeError::Timeout(WRITE_TIMEOUT));
            }
            Ok(Err(status)) => return Err(ProposeError::Raft(status.message().to_string())),
            Ok(Ok(r)) => r.into_inner(),
        };
        crate::raft::decode(&resp.data).map_err(|e| ProposeError::Raft(format!("bad reply from leader: {e}")))
    }

    /// Adds `id` as a learner, waits until it has caught up, then makes it a
    /// voter. Runs on the leader (the `Promote` RPC forwards here).
    pub async fn add_manager(&self, id: NodeId, addr: &str) -> Result<(), ProposeError> {
        let node = BasicNode { addr: addr.to_string() };
        tracing::info!(node = %crate::store::state::format_node_id(id), addr, "adding manager as raft learner");
        self.raft.add_learner(id, node, true).await.map_err(map_membership_err)?;
        self.change_voters(|voters| {
            voters.insert(id);
            Ok(())
        })
        .await?;
        tracing::info!(node = %crate::store::state::format_node_id(id), "manager is now a raft voter");
        Ok(())
    }

    /// Takes `id` out of the Raft group (voter and learner). Runs on the
    /// leader; a follower forwards through the `RemoveVoter` RPC.
    pub async fn remove_manager(&self, id: NodeId) -> Result<(), ProposeError> {
        if !self.is_leader() {
            let (_, addr) = self.leader().ok_or(ProposeError::NoLeader)?;
            let channel = self.tls.channel(&addr).map_err(|e| ProposeError::Raft(e.to_string()))?;
            RaftClient::new(channel)
                .remove_voter(PromoteRequest { node_id: id })
                .await
                .map_err(|s| ProposeError::Raft(s.message().to_string()))?;
            return Ok(());
        }
        self.change_voters(|voters| {
            voters.remove(&id);
            if voters.is_empty() {
                return Err(ProposeError::Raft("cannot remove the last manager".into()));
            }
            Ok(())
        })
        .await?;
        tracing::info!(node = %crate::store::state::format_node_id(id), "manager removed from the raft group");
        Ok(())
    }

    /// Sets the voters to `edit(current voters)`. Another membership change
    /// (a promotion finishing its joint consensus) may still be in flight:
    /// wait for it, briefly, and apply the edit to the voters it leaves.
    async fn change_voters(
        &self,
        edit: impl Fn(&mut BTreeSet<NodeId>) -> Result<(), ProposeError>,
    ) -> Result<(), ProposeError> {
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        loop {
            let mut voters: BTreeSet<NodeId> =
                self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
            edit(&mut voters)?;
            match self.raft.change_membership(voters, false).await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    openraft::error::ChangeMembershipError::InProgress(_),
                ))) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(map_membership_err(e)),
            }
        }
    }

    /// Asks the leader to add this node as a manager (after a manager join).
    pub async fn request_promotion(&self, via: &[String]) -> Result<(), ProposeError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut last = String::from("no manager address known");
        loop {
            let mut targets: std::collections::VecDeque<String> = via.iter().cloned().collect();
            let mut asked = 0;
            while let Some(addr) = targets.pop_front() {
                asked += 1;
                let Ok(channel) = self.tls.channel(&addr) else { continue };
                match RaftClient::new(channel).promote(PromoteRequest { node_id: self.id }).await {
                    Ok(_) => return Ok(()),
                    Err(s) => {
                        last = format!("{addr}: {}", s.message());
                        // A follower names the leader: ask it next.
                        if let Some(l) = s.metadata().get("shoal-leader").and_then(|v| v.to_str().ok())
                            && asked <= via.len() * 2
                        {
                            targets.push_front(l.to_string());
                        }
                    }
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

/// Why a local proposal failed, shared by every command of a batch.
#[derive(Clone, Debug)]
pub(crate) enum LocalError {
    NotLeader(Option<(NodeId, String)>),
    Timeout,
    Raft(String),
    /// The command alone is bigger than a Raft entry may be.
    TooLarge(usize),
}

/// How long a linearizable read may wait to confirm it sees every
/// committed write (an election's length, about).
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// A command waiting for the next batch.
struct Pending {
    cmd: Command,
    /// Its encoded size.
    size: usize,
    reply: oneshot::Sender<Result<Outcome, LocalError>>,
    /// When it joined the queue.
    queued: std::time::Instant,
}

/// Group commit: commands that arrive while earlier batches are in flight
/// share one Raft entry, so a thousand concurrent writes cost a handful of
/// log appends and replication round trips instead of a thousand.
const MAX_BATCH: usize = 1024;
/// Batches in flight at once: enough to keep the pipeline to the followers
/// full, few enough that waiting commands pile into the next batch.
const MAX_IN_FLIGHT: usize = 4;

async fn batch_loop(raft: Raft, mut rx: mpsc::Receiver<Pending>) {
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // A command that would have made the last batch too big starts the next.
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let mut bytes = first.size;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) if bytes + p.size > TARGET_ENTRY_BYTES => {
                    carry = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.size;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let queued = batch.first().map(|p| p.queued.elapsed()).unwrap_or_default();
            let started = std::time::Instant::now();
            let (cmds, replies): (Vec<Command>, Vec<_>) = batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
            let commands = cmds.len();
            let req = Request { now_ms: now_ms(), cmds };
            let err = match tokio::time::timeout(WRITE_TIMEOUT, raft.client_write(req)).await {
                Ok(Ok(resp)) => {
                    tracing::debug!(
                        index = resp.log_id.index,
                        commands,
                        bytes,
                        queued = ?queued,
                        committed_in = ?started.elapsed(),
                        "raft: batch committed and applied"
                    );
                    for (reply, outcome) in replies.into_iter().zip(resp.data) {
                        let _ = reply.send(Ok(outcome));
                    }
                    return;
                }
                Err(_) => LocalError::Timeout,
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    LocalError::NotLeader(f.leader_id.zip(f.leader_node.map(|n| n.addr)))
                }
                Ok(Err(e)) => LocalError::Raft(e.to_string()),
            };
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        });
    }
}
