//! First start with `--join`: pin the cluster CA by the token's
//! fingerprint, send a CSR, and keep the certificate the cluster signs and
//! the identity it assigns (`DATA/node.json`, `DATA/tls/`).

use std::collections::BTreeMap;
use std::path::Path;

use shoal_proto::join::join_client::JoinClient;
use shoal_proto::join::JoinRequest;
use shoal_security::identity::{save_tls, IdentityError};
use shoal_security::pki::{self, PkiError};
use shoal_security::tls::endpoint;
use shoal_security::{Identity, NodeTls, Role};
use tonic::transport::{Certificate, ClientTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Token(#[from] PkiError),
    #[error("verifying the cluster at {addr} against the join token's CA fingerprint: {source}")]
    Pin { addr: String, source: std::io::Error },
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: tonic::transport::Error },
    #[error("join refused by {addr}: {message}")]
    Refused { addr: String, message: String },
    #[error("{addr} answered with role {role:?}: expected manager or worker")]
    BadRole { addr: String, role: String },
    #[error(transparent)]
    Save(#[from] IdentityError),
}

/// What a joining node says about itself.
pub struct JoinParams<'a> {
    pub node_name: Option<&'a str>,
    pub advertise: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub availability: &'a str,
}

pub async fn join_cluster(dir: &Path, addr: &str, token: &str, p: &JoinParams<'_>) -> Result<Identity, JoinError> {
    let t = pki::parse_token(token)?;
    let ca_pem = pki::fetch_pinned_ca(addr, &t.ca_fingerprint)
        .await
        .map_err(|source| JoinError::Pin { addr: addr.to_string(), source })?;
    let (csr, key_pem) = pki::new_csr()?;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem)).domain_name(pki::CLUSTER_DNS_NAME);
    let connect = |source| JoinError::Connect { addr: addr.to_string(), source };
    let channel = endpoint(addr).map_err(connect)?.tls_config(tls).map_err(connect)?.connect().await.map_err(connect)?;
    let resp = JoinClient::new(channel)
        .join(JoinRequest {
            token: token.to_string(),
            csr_pem: csr,
            node_name: p.node_name.unwrap_or_default().to_string(),
            advertise_addr: p.advertise.to_string(),
            labels: p.labels.clone().into_iter().collect(),
            availability: p.availability.to_string(),
        })
        .await
        .map_err(|s| JoinError::Refused { addr: addr.to_string(), message: s.message().to_string() })?
        .into_inner();
    let role = Role::parse(&resp.role).ok_or_else(|| JoinError::BadRole { addr: addr.to_string(), role: resp.role.clone() })?;
    save_tls(dir, &NodeTls { ca_pem: resp.ca_pem, cert_pem: resp.cert_pem, key_pem })?;
    let name = p.node_name.map(str::to_string).unwrap_or_else(|| format!("node-{:016x}", resp.node_id)[..13].to_string());
    let identity = Identity {
        id: resp.node_id,
        name,
        role,
        advertise: p.advertise.to_string(),
        managers: if resp.managers.is_empty() { vec![addr.to_string()] } else { resp.managers },
    };
    identity.save(dir)?;
    tracing::info!(node = %identity.name, role = role.as_str(), via = addr, "joined the cluster");
    Ok(identity)
}
