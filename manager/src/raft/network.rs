//! The Raft transport, client side: one lazily connected tonic channel per
//! peer, openraft's messages as serde payloads, and a record of when each
//! peer last answered (what `cluster status` calls reachable).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_proto::raft::raft_client::RaftClient;
use shoal_proto::raft::RaftPayload;
use tonic::transport::Channel;

use super::{NodeId, TypeConfig};
use shoal_security::Trust;

/// When each peer last answered a Raft RPC.
#[derive(Clone, Default)]
pub struct PeerHealth(Arc<Mutex<HashMap<NodeId, Instant>>>);

impl PeerHealth {
    fn mark(&self, id: NodeId) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Instant::now());
    }

    /// Whether `id` answered within `within`.
    pub fn reachable(&self, id: NodeId, within: Duration) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .is_some_and(|t| t.elapsed() <= within)
    }
}

#[derive(Clone)]
pub struct Network {
    tls: Arc<Trust>,
    health: PeerHealth,
}

impl Network {
    pub fn new(tls: Arc<Trust>, health: PeerHealth) -> Self {
        Network { tls, health }
    }
}

pub struct Peer {
    target: NodeId,
    client: Option<RaftClient<Channel>>,
    addr: String,
    tls: Arc<Trust>,
    health: PeerHealth,
    /// How many bytes of entries the next AppendEntries may carry. openraft
    /// gives each one a heartbeat interval and retries a timed-out one with
    /// the same entries forever; sending a prefix (a partial success to
    /// openraft) and halving this after a timeout means a follower that is
    /// slow for a moment gets less per request instead of nothing ever.
    budget: usize,
}

/// Bounds of [`Peer::budget`]: one request never carries less than one
/// entry, whatever the budget.
const MAX_APPEND_BYTES: usize = 4 << 20;
const MIN_APPEND_BYTES: usize = 256 << 10;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        Peer {
            target,
            client: None,
            addr: node.addr.clone(),
            tls: self.tls.clone(),
            health: self.health.clone(),
            budget: MAX_APPEND_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum TransportError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: tonic::transport::Error },
    #[error("rpc to {addr}: {source}")]
    Status { addr: String, source: tonic::Status },
    #[error("rpc to {addr} timed out after {ttl:?}")]
    Timeout { addr: String, ttl: Duration },
    #[error("bad payload from {addr}: {source}")]
    Decode { addr: String, source: postcard::Error },
}

impl Peer {
    fn client(&mut self) -> Result<RaftClient<Channel>, TransportError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let channel = self
            .tls
            .channel(&self.addr)
            .map_err(|source| TransportError::Connect { addr: self.addr.clone(), source })?;
        let c = RaftClient::new(channel).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20);
        self.client = Some(c.clone());
        Ok(c)
    }

    async fn call<Req, Resp, E>(
        &mut self,
        rpc: &'static str,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let data = crate::raft::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = self.client().map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let payload = RaftPayload { data };
        let fut = async {
            match rpc {
                "append" => client.append_entries(payload).await,
                "vote" => client.vote(payload).await,
                _ => client.install_snapshot(payload).await,
            }
        };
        let resp = match tokio::time::timeout(ttl, fut).await {
            Err(_) => {
                // Slow is not gone: a leader whose CPU is saturated misses
                // this deadline (one heartbeat interval) often, and an
                // `Unreachable` would make openraft back off for 500 ms
                // without sending anything, longer than the followers'
                // election timeout: they would depose a working leader.
                // A network error is retried at once (with a smaller batch).
                let e = TransportError::Timeout { addr: self.addr.clone(), ttl };
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
            Ok(Err(source)) => {
                let e = TransportError::Status { addr: self.addr.clone(), source };
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        self.health.mark(self.target);
        let res: Result<Resp, E> = crate::raft::decode(&resp.data).map_err(|source| {
            let e = TransportError::Decode { addr: self.addr.clone(), source };
            RPCError::Network(NetworkError::new(&e))
        })?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let mut req = req;
        let budget = self.budget;
        let mut size = 0usize;
        let keep = req
            .entries
            .iter()
            .take_while(|e| {
                size += postcard::experimental::serialized_size(e).unwrap_or(usize::MAX);
                size <= budget
            })
            .count()
            .max(1)
            .min(req.entries.len());
        let truncated = keep < req.entries.len();
        if truncated {
            req.entries.truncate(keep);
        }
        let last_sent = req.entries.last().map(|e| e.log_id);
        // Should openraft drop this call at its deadline, the next one
        // carries half as much; an answer in time restores (and grows) it.
        self.budget = (budget / 2).max(MIN_APPEND_BYTES);
        let res = self.call("append", &req, option.hard_ttl()).await;
        if res.is_ok() {
            self.budget = budget.saturating_mul(2).min(MAX_APPEND_BYTES);
        }
        match res {
            Ok(AppendEntriesResponse::Success) if truncated => Ok(AppendEntriesResponse::PartialSuccess(last_sent)),
            other => other,
        }
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call("snapshot", &req, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("vote", &req, option.hard_ttl()).await
    }
}
