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

pub use crate::codec::{decode, encode};

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;

/// Raft timing. The election timeout bounds failover: a follower that hears
/// nothing for 400–800 ms starts an election (openraft's leader lease makes
/// voters wait out their own timeout too), so a new leader commits within
/// about a second of a crash, while 4+ missed heartbeats on a loaded 2-core
/// host are still needed to start one.
pub fn config() -> openraft::Config {
    openraft::Config {
        cluster_name: "shoal".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        // Compaction: snapshot every 1000 entries and keep 200 behind it for
        // followers that lag a little; the rest of the log is purged.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
        max_in_snapshot_log_to_keep: 200,
        purge_batch_size: 256,
        // openraft gives an AppendEntries one heartbeat interval to finish,
        // and retries one that doesn't forever. Entries carry up to 1024
        // commands and about TARGET_ENTRY_BYTES (256 KiB; one command alone
        // up to 1 MiB) each (group commit), so 4 a request carry about
        // 1 MiB; the log reader also cuts a request at
        // `log_store::MAX_PAYLOAD_BYTES` (1 MiB), so four 1 MiB entries
        // can't make a 4 MiB one, and the transport sends less after a
        // timeout. (64 a request, with the byte cut, was slower in the one
        // 250,000-task run tried: 121 s against 77-89 s, with twice the
        // AppendEntries timeouts.)
        max_payload_entries: 4,
        // Snapshots go in 1 MiB chunks, each with its own deadline, so a
        // big state streams to a lagging follower instead of timing out.
        snapshot_max_chunk_size: 1 << 20,
        install_snapshot_timeout: 2_000,
        ..Default::default()
    }
}
