//! The shoal manager: a Raft node (openraft, redb), the replicated store,
//! the cluster CA and join tokens, and the gRPC services managers serve:
//! Control (CLI), Raft (managers), Dispatcher (agents) and Join (new nodes).
//!
//! Invariant: this crate never imports `shoal-agent`; the daemon in `cli`
//! composes a manager and an agent on one node.

pub mod autoscaler;
pub mod blobs;
pub mod codec;
pub mod control;
pub mod dispatcher;
pub mod join;
pub mod lock;
pub mod logs;
pub mod manager;
pub mod metrics;
pub mod node;
pub mod orchestrator;
pub mod raft;
pub mod replication;
pub mod scheduler;
pub mod spec;
pub mod store;

use std::sync::Arc;

use shoal_proto::control::control_server::ControlServer;
use shoal_proto::dispatcher::dispatcher_server::DispatcherServer;
use shoal_proto::join::join_server::JoinServer;
use shoal_proto::raft::raft_server::RaftServer;
use tokio::net::TcpListener;

pub use dispatcher::{DispatcherConfig, DispatcherService};
pub use manager::Manager;

/// Serves every manager service on `listener` until `shutdown` turns true.
/// The dispatcher's down-detector, the orchestrators, the scheduler and
/// blob replication run alongside. `agent` is this node's own Agent service
/// (the daemon composes it; this crate does not know the agent).
pub async fn serve(
    manager: Arc<Manager>,
    listener: TcpListener,
    dispatcher: DispatcherConfig,
    agent: tonic::service::Routes,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let dispatcher = DispatcherService::new(manager.clone(), dispatcher, shutdown.clone());
    tokio::spawn(dispatcher.clone().run(shutdown.clone()));
    tokio::spawn(orchestrator::Orchestrator::new(manager.clone(), Default::default()).run(shutdown.clone()));
    tokio::spawn(scheduler::Scheduler::new(manager.clone(), Default::default()).run(shutdown.clone()));
    tokio::spawn(autoscaler::Autoscaler::new(manager.clone()).run(shutdown.clone()));
    tokio::spawn(replication::replicate(manager.clone(), shutdown.clone()));
    tokio::spawn(manager.clone().keep_data_key(shutdown.clone()));
    // Snapshots can be large; everything else is small.
    const MAX_MSG: usize = 256 << 20;
    let mut stop = shutdown.clone();
    tonic::transport::Server::builder()
        .add_routes(agent)
        .add_service(ControlServer::new(control::ControlService::new(manager.clone(), dispatcher.config())))
        .add_service(
            RaftServer::new(raft::server::RaftService::new(manager.clone()))
                .max_decoding_message_size(MAX_MSG)
                .max_encoding_message_size(MAX_MSG),
        )
        .add_service(JoinServer::new(join::JoinService::new(manager.clone())))
        .add_service(DispatcherServer::new(dispatcher))
        .serve_with_incoming_shutdown(manager.tls.incoming(listener), async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}
