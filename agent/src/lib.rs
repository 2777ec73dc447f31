//! The shoal worker: the container runtime (image store, rootfs, namespaces,
//! cgroups, least privilege), the per-container supervisor, and the agent's
//! session with the managers.
