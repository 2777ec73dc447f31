//! The shoal worker: the container runtime (image store, rootfs, namespaces,
//! cgroups, least privilege), the per-container supervisor, and the agent's
//! session with the managers.

pub mod cgroup;
pub mod executor;
pub mod image;
pub mod mounts;
pub mod runtime;
pub mod security;
pub mod spec;
pub mod supervisor;
mod sys;
pub mod unpack;
