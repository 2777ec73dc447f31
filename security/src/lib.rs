//! Node identity and trust, shared by the manager and the agent (neither
//! imports the other): the cluster CA and certificates that carry a node's
//! id and role, join tokens, the pinned-CA verifier a joining node uses, the
//! TLS settings of every connection, the role check every server method
//! starts with, and the identity a node keeps in its data dir.

pub mod at_rest;
pub mod identity;
pub mod pki;
pub mod tls;
pub mod trust;

pub use identity::{Identity, Role};
pub use pki::{CertKey, CertRole};
pub use tls::NodeTls;
pub use trust::Trust;
