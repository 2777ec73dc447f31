//! The overlay network that links containers across hosts: a userspace
//! WireGuard data plane (boringtun over TUN), bridges, routes and DNS.
//!
//! Not built yet: the agent does not drive an overlay in this release, and
//! containers on different hosts cannot reach each other. See README.md.
