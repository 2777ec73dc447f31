//! The shoal worker: the container runtime (image store, rootfs, namespaces,
//! cgroups, least privilege), the per-container supervisor, and the agent
//! itself ([`Agent`]): its session with the managers, the task runner, and
//! the Agent gRPC service.
//!
//! Invariant: this crate never imports `shoal-manager`; it speaks the
//! Dispatcher protocol and never touches the store.

pub mod cgroup;
pub mod devfilter;
pub mod executor;
pub mod image;
pub mod join;
pub mod mounts;
pub mod volume;
mod discovery;
mod load;
mod node;
mod paths;
pub mod runtime;
pub mod security;
mod service;
mod session;
pub mod spec;
pub mod supervisor;
mod sys;
pub mod unpack;
pub mod userns;
mod worker;

pub use node::{Agent, AgentConfig, AgentError, AgentExit, OverlayOpts};
pub use service::{exec_in_task, AgentService, ExecError, ExecOutput};
pub use sys::limit_malloc_arenas;
