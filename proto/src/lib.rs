//! The wire protocols of shoal, generated from `proto/*.proto` by tonic/prost.
//!
//! - `control`: the Control API, CLI → any manager (manager certificates and
//!   client certificates only).
//! - `raft`: the Raft transport between managers, plus write forwarding to
//!   the leader (manager certificates only).
//! - `dispatcher`: agent ↔ manager sessions (any node certificate).
//! - `join`: the one call that needs no client certificate: a new node trades
//!   a join token and a CSR for a signed certificate.
#![allow(clippy::all)]

pub mod control {
    tonic::include_proto!("shoal.control");
}
pub mod raft {
    tonic::include_proto!("shoal.raft");
}
pub mod dispatcher {
    tonic::include_proto!("shoal.dispatcher");
}
pub mod join {
    tonic::include_proto!("shoal.join");
}
pub mod agent {
    tonic::include_proto!("shoal.agent");
}

/// Limits both ends of a connection enforce.
pub mod limits {
    /// Largest image manifest or config (bytes) a manager stores or an
    /// agent fetches.
    pub const MAX_MANIFEST: u64 = 4 << 20;
}
