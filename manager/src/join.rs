//! The Join service: a new node trades a join token and a CSR for a
//! certificate. The only call served without a client certificate.

use std::sync::Arc;

use shoal_proto::join::join_server::Join;
use shoal_proto::join::{JoinRequest, JoinResponse};
use tonic::{Request, Response, Status};

use crate::control::status;
use crate::manager::Manager;
use shoal_security::pki::{self, CertRole};
use crate::spec;
use crate::store::objects::{Availability, IssuedCert, NodeObj, Role};
use crate::store::state::format_node_id;
use crate::store::Command;

pub struct JoinService {
    manager: Arc<Manager>,
}

impl JoinService {
    pub fn new(manager: Arc<Manager>) -> Self {
        JoinService { manager }
    }
}

#[tonic::async_trait]
impl Join for JoinService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let r = req.into_inner();
        let token = pki::parse_token(&r.token).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (ca, role, expiry) = self.manager.store.read(|s| {
            let c = s.cluster.as_ref().ok_or_else(|| Status::unavailable("cluster not initialized yet"))?;
            let fp = pki::fingerprint(&c.ca_cert_pem).map_err(|e| Status::internal(e.to_string()))?;
            if !pki::secret_eq(&fp, &token.ca_fingerprint) {
                return Err(Status::permission_denied("join token names another cluster's CA"));
            }
            let role = if pki::secret_eq(&token.secret, &c.manager_secret) {
                Role::Manager
            } else if pki::secret_eq(&token.secret, &c.worker_secret) {
                Role::Worker
            } else {
                return Err(Status::permission_denied("join token is not valid (forged, or rotated since it was issued)"));
            };
            Ok((c.clone(), role, c.cert_expiry()))
        })?;
        let availability = match r.availability.as_str() {
            "" => Availability::Active,
            a => Availability::parse(a)
                .ok_or_else(|| Status::invalid_argument(format!("invalid availability {a:?}: expected active, pause or drain")))?,
        };
        if r.advertise_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!("invalid advertise address {:?}: expected IP:PORT", r.advertise_addr)));
        }
        let id = pki::random_u64().map_err(|e| Status::internal(e.to_string()))?;
        let name = if r.node_name.is_empty() { format!("node-{}", &format_node_id(id)[..8]) } else { r.node_name };
        spec::validate_name("node name", &name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cert_role = match role {
            Role::Manager => CertRole::Manager,
            Role::Worker => CertRole::Worker,
        };
        let signed = pki::sign_csr(&ca.ca(), &r.csr_pem, &format_node_id(id), cert_role, expiry)
            .map_err(|e| Status::invalid_argument(format!("bad certificate signing request: {e}")))?;
        let cert_pem = ca.chain(&signed.cert_pem);
        let node = NodeObj {
            availability,
            labels: r.labels.into_iter().collect(),
            csr_pem: r.csr_pem,
            certs: vec![IssuedCert::of(&signed, cert_role.as_str())],
            cert_pem: signed.cert_pem,
            ..NodeObj::new(id, &name, role, &r.advertise_addr)
        };
        self.manager.propose(Command::AddNode { node }).await.map_err(status)?;
        tracing::info!(node = %name, id = %format_node_id(id), role = role.as_str(), "node joined");
        let managers = self.manager.store.read(|s| {
            s.nodes.values().filter(|n| n.role == Role::Manager).map(|n| n.address.clone()).collect()
        });
        Ok(Response::new(JoinResponse {
            node_id: id,
            role: role.as_str().into(),
            cert_pem,
            ca_pem: ca.trust_bundle().to_string(),
            managers,
        }))
    }
}
