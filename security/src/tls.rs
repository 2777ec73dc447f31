//! A node's TLS material as files (`NodeTls`) and the connection settings
//! every client shares. The live trust built from the material — the TLS
//! configurations, revocation and the role check every server method
//! starts with — is [`crate::trust::Trust`].

use std::time::Duration;

use tonic::transport::Endpoint;


/// The CA bundle (one CA certificate, two while the CA rotates) plus this
/// node's (or the CLI's) certificate and key, as PEM.
#[derive(Clone, Debug)]
pub struct NodeTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Connection settings shared by every client: fail fast on dead peers so
/// callers can say "unreachable" instead of hanging.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(settings(Endpoint::from_shared(format!("https://{addr}"))?))
}

pub(crate) fn settings(e: Endpoint) -> Endpoint {
    e.connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        // A ping only after 10 s without a frame: agents heartbeat every
        // 0.5–2.5 s, and a 2 s interval made the leader answer a ping on
        // most connections between two heartbeats at 5,000 nodes (as many
        // packets as the heartbeats themselves; join 24 s → 12–19 s).
        .http2_keep_alive_interval(Duration::from_secs(10))
        // Generous: a leader that stalls for a few seconds under load must
        // not see thousands of agents drop their connections at once and
        // come back as a storm of TLS handshakes. Dead managers are found
        // by the heartbeats' own 2 s deadline, not by this.
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
}
