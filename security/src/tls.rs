//! A node's TLS material and the tonic settings built from it, plus the
//! check every server method starts with: which role the caller's
//! certificate grants.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::pki::{peer_identity, CertRole, CLUSTER_DNS_NAME};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// The CA plus this node's (or the CLI's) certificate and key, as PEM.
#[derive(Clone, Debug)]
pub struct NodeTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl NodeTls {
    /// Server side: present our certificate and the CA (so a joiner can pin
    /// it), ask for a client certificate but do not require one — the Join
    /// service is for nodes that have none yet; every other service checks.
    pub fn server_config(&self) -> ServerTlsConfig {
        let chain = format!("{}{}", self.cert_pem, self.ca_pem);
        ServerTlsConfig::new()
            .identity(Identity::from_pem(chain, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(true)
    }

    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(CLUSTER_DNS_NAME)
    }

    /// A lazily connected channel to a manager at `addr` (host:port).
    pub fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        Ok(endpoint(addr)?.tls_config(self.client_config())?.connect_lazy())
    }
}

/// Connection settings shared by every client: fail fast on dead peers so
/// callers can say "unreachable" instead of hanging.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true))
}

/// The caller's identity from its certificate, if its role is one of
/// `allowed`.
pub fn authorize<T>(req: &Request<T>, allowed: &[CertRole]) -> Result<(String, CertRole), Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate signed by the cluster CA is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate signed by the cluster CA is required"))?;
    let (id, role) = cached_identity(leaf)
        .ok_or_else(|| Status::unauthenticated("client certificate carries no shoal role"))?;
    if !allowed.contains(&role) {
        return Err(Status::permission_denied(format!(
            "a {} certificate may not call this API",
            role.as_str()
        )));
    }
    Ok((id, role))
}

/// `peer_identity` of a certificate, remembered: every request on a
/// connection presents the same certificate, and parsing X.509 on each
/// call is a large share of a small request's cost. TLS has verified the
/// chain already; this only reads the subject.
fn cached_identity(der: &[u8]) -> Option<(String, CertRole)> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<Vec<u8>, (String, CertRole)>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(der) {
        return Some(hit.clone());
    }
    let found = peer_identity(der)?;
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    // Certificates are few (one per node and CLI); bound it anyway.
    if c.len() >= 4096 {
        c.clear();
    }
    c.insert(der.to_vec(), found.clone());
    Some(found)
}

/// Accepted connections with Nagle's algorithm off: small gRPC responses
/// must not wait for the peer's delayed ACK (a 40 ms stall per exchange).
pub fn incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn
            && let Err(e) = c.set_nodelay(true)
        {
            tracing::debug!(error = %e, "could not turn off Nagle's algorithm on an accepted connection");
        }
        conn
    })
}
