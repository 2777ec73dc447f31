//! The Raft transport, server side, plus write forwarding and learner
//! promotion. Only manager certificates may call it.

use std::sync::Arc;

use shoal_proto::raft::raft_server::Raft as RaftRpc;
use shoal_proto::raft::{PromoteRequest, PromoteResponse, RaftPayload, ReadIndexRequest, ReadIndexResponse};
use tonic::{Request, Response, Status};

use crate::manager::{LocalError, Manager, WRITE_TIMEOUT};
use crate::store::Command;
use shoal_security::pki::CertRole;
use crate::store::state::format_node_id;

pub struct RaftService {
    manager: Arc<Manager>,
}

impl RaftService {
    pub fn new(manager: Arc<Manager>) -> Self {
        RaftService { manager }
    }
}

fn decode<T: serde::de::DeserializeOwned>(req: &RaftPayload) -> Result<T, Status> {
    crate::raft::decode(&req.data).map_err(|e| Status::invalid_argument(format!("malformed raft payload: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    let data = crate::raft::encode(v).map_err(|e| Status::internal(format!("encoding raft payload: {e}")))?;
    Ok(Response::new(RaftPayload { data }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.manager.tls.authorize(&req, &[CertRole::Manager])?;
        let rpc = decode(req.get_ref())?;
        encode(&self.manager.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.manager.tls.authorize(&req, &[CertRole::Manager])?;
        let rpc = decode(req.get_ref())?;
        encode(&self.manager.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.manager.tls.authorize(&req, &[CertRole::Manager])?;
        let rpc = decode(req.get_ref())?;
        encode(&self.manager.raft.install_snapshot(rpc).await)
    }

    async fn propose(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.manager.tls.authorize(&req, &[CertRole::Manager])?;
        let cmd: Command = decode(req.get_ref())?;
        match self.manager.propose_local(cmd).await {
            Ok(_) if self.manager.faults.drop_reply() => {
                tracing::warn!("fault injected: the answer to a forwarded write is dropped (the write was applied)");
                Err(Status::unavailable("fault injected: answer dropped"))
            }
            Ok(outcome) => encode(&outcome),
            Err(LocalError::NotLeader(_)) => Err(Status::unavailable("not the leader any more")),
            Err(LocalError::Timeout) => {
                Err(Status::deadline_exceeded(format!("write not committed within {WRITE_TIMEOUT:?}")))
            }
            Err(LocalError::Raft(e)) => Err(Status::internal(e)),
            Err(LocalError::TooLarge(n)) => Err(Status::invalid_argument(format!("a write of {n} bytes is too large for a raft entry"))),
        }
    }

    async fn read_index(&self, req: Request<ReadIndexRequest>) -> Result<Response<ReadIndexResponse>, Status> {
        self.manager.tls.authorize(&req, &[CertRole::Manager])?;
        match self.manager.raft.get_read_log_id().await {
            Ok((read, _)) => Ok(Response::new(ReadIndexResponse { index: read.map_or(0, |l| l.index) })),
            Err(e) => Err(Status::unavailable(format!("not the leader: {e}"))),
        }
    }

    async fn promote(&self, req: Request<PromoteRequest>) -> Result<Response<PromoteResponse>, Status> {
        let (caller, _) = self.manager.tls.authorize(&req, &[CertRole::Manager])?;
        let id = req.get_ref().node_id;
        if caller != format_node_id(id) {
            return Err(Status::permission_denied("a manager may only ask to promote itself"));
        }
        let m = &self.manager;
        // Only managers the store knows (joined with a manager token) may
        // enter the Raft group.
        let addr = m
            .store
            .read(|s| {
                s.nodes
                    .get(&id)
                    .filter(|n| n.role == crate::store::objects::Role::Manager)
                    .map(|n| n.address.clone())
            })
            .ok_or_else(|| Status::permission_denied("node is not a manager in the cluster state"))?;
        if !m.is_leader() {
            // Not forwarded: the leader checks that the caller asks for
            // itself, so the node must ask it with its own certificate.
            let (_, leader) = m.leader().ok_or_else(|| Status::unavailable("no leader"))?;
            let mut st = Status::unavailable(format!("not the leader; ask the leader at {leader}"));
            if let Ok(v) = leader.parse() {
                st.metadata_mut().insert("shoal-leader", v);
            }
            return Err(st);
        }
        m.add_manager(id, &addr).await.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(PromoteResponse {}))
    }

    async fn remove_voter(&self, req: Request<PromoteRequest>) -> Result<Response<PromoteResponse>, Status> {
        self.manager.tls.authorize(&req, &[CertRole::Manager])?;
        let id = req.get_ref().node_id;
        if !self.manager.is_leader() {
            return Err(Status::unavailable("not the leader"));
        }
        self.manager.remove_manager(id).await.map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(PromoteResponse {}))
    }
}
