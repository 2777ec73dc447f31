//! The Raft node: openraft with its log, vote and snapshots in redb, the
//! replicated [`Store`](crate::store::Store) as its state machine, and a
//! tonic transport between managers.

pub mod log_store;
pub mod network;
pub mod server;
pub mod state_machine;

use std::io::Cursor;

use openraft::BasicNode;

use crate::store::{Request, Response};

openraft::declare_raft_types!(
    /// shoal's Raft types: commands in, apply results out, nodes addressed by
    /// their gRPC `host:port`.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;

/// Raft timing. The election timeout bounds failover: a follower that hears
/// nothing for 600–1200 ms starts an election, so a new leader answers well
/// within 2 s of a crash while a loaded 2-core host does not flap.
pub fn config() -> openraft::Config {
    openraft::Config {
        cluster_name: "shoal".into(),
        heartbeat_interval: 150,
        election_timeout_min: 600,
        election_timeout_max: 1200,
        // Compaction: snapshot every 1000 entries and keep 200 behind it for
        // followers that lag a little; the rest of the log is purged.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
        max_in_snapshot_log_to_keep: 200,
        purge_batch_size: 256,
        max_payload_entries: 512,
        ..Default::default()
    }
}
