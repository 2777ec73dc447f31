//! A manager as one piece, for the daemon: creating a cluster's identity
//! (`--init`), opening the Raft node, serving every manager service (with
//! this node's Agent service mounted beside them), bootstrapping the
//! cluster on its first start or asking to join the Raft group, and
//! stopping it all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shoal_security::identity::{self, read_file, save_tls, write_file, IdentityError};
use shoal_security::pki::{self, CertKey, CertRole, PkiError};
use shoal_security::{Identity, NodeTls, Role, Trust};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::manager::{Manager, ManagerError, ProposeError};
use crate::store::objects::{Availability, ClientObj, ClusterObj, IssuedCert, NodeObj};
use crate::store::state::format_node_id;
use crate::store::Command;
use crate::DispatcherConfig;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Manager(#[from] ManagerError),
    #[error(transparent)]
    Propose(#[from] ProposeError),
    #[error("fault injected: {0}")]
    FaultInjected(&'static str),
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

/// How this manager starts.
pub struct ManagerConfig {
    pub data_dir: PathBuf,
    pub identity: Identity,
    pub listen: SocketAddr,
    pub dispatcher: DispatcherConfig,
    /// The first start of `--init`: bootstrap a one-member cluster with
    /// this node (its labels and availability).
    pub init: Option<InitNode>,
    /// Fault injection for tests: drop the answers to this many writes
    /// forwarded to this manager (after they were applied).
    pub fault_drop_forwarded_replies: u32,
    /// Fault injection for tests: fail `--init` right after the Raft
    /// bootstrap (the next start must finish it).
    pub fault_stop_init_after_bootstrap: bool,
    /// Fault injection for tests: linearizable reads skip the read barrier.
    pub fault_stale_reads: bool,
    /// The data key, when an operator unlocked this manager (autolock);
    /// None reads it from the data dir.
    pub data_key: Option<shoal_security::at_rest::Key>,
}

/// Serves only the Lock service on `listen` until the unlock key arrives
/// (the data key it opens is returned) or `shutdown` (None).
pub async fn wait_unlocked(
    listen: SocketAddr,
    dir: &Path,
    tls: Arc<Trust>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Option<shoal_security::at_rest::Key>, NodeError> {
    let listener = TcpListener::bind(listen).await.map_err(|source| NodeError::Listen { addr: listen, source })?;
    let (service, unlocked) = crate::lock::LockService::new(dir.to_path_buf(), tls.clone());
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(shoal_proto::control::lock_server::LockServer::new(service))
            .serve_with_incoming_shutdown(tls.incoming(listener), async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            }),
    );
    tracing::warn!(listen = %listen, "this manager is locked (autolock): waiting for `shoal cluster unlock`");
    let key = tokio::select! {
        k = unlocked => k.ok(),
        _ = shutdown.wait_for(|s| *s) => None,
    };
    let _ = stop_tx.send(true);
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "lock server ended with an error"),
        Err(e) => tracing::error!(error = %e, "lock server panicked"),
    }
    Ok(key)
}

/// This node as the first member of a new cluster.
pub struct InitNode {
    pub labels: BTreeMap<String, String>,
    pub availability: Availability,
    /// Where networks get their subnets (`--address-pool`).
    pub address_pool: String,
}

/// The name of the client identity `--init` writes under `DATA/client/`.
pub const ADMIN_CLIENT: &str = "admin";

/// Whether `--init` started in `dir` and did not finish (it removes the
/// CA key's bootstrap copy last): the next start resumes it.
pub fn init_pending(dir: &Path) -> bool {
    dir.join("tls/ca-key.pem").exists()
}

/// First start with `--init`: a CA, this node's certificate, client
/// credentials under `DATA/client/`, and the identity file.
pub fn init_identity(dir: &Path, name: Option<&str>, advertise: &str) -> Result<Identity, NodeError> {
    let ca = pki::new_ca()?;
    let id = pki::random_u64()?;
    let (csr, key_pem) = pki::new_csr()?;
    let node = CertKey { cert_pem: pki::sign_csr(&ca, &csr, &format_node_id(id), CertRole::Manager, pki::DEFAULT_CERT_EXPIRY)?.cert_pem, key_pem };
    write_file(&dir.join("tls/node.csr"), &csr, false)?;
    let (client, _) = pki::issue(&ca, ADMIN_CLIENT, CertRole::Client, pki::DEFAULT_CLIENT_EXPIRY)?;
    save_tls(dir, &NodeTls { ca_pem: ca.cert_pem.clone(), cert_pem: node.cert_pem, key_pem: node.key_pem })?;
    write_file(&dir.join("client/ca.pem"), &ca.cert_pem, false)?;
    write_file(&dir.join("client/cert.pem"), &client.cert_pem, false)?;
    write_file(&dir.join("client/key.pem"), &client.key_pem, true)?;
    // The CA key goes into the replicated state at bootstrap; keep a copy
    // until then so a crash between here and there can finish the job.
    write_file(&dir.join("tls/ca-key.pem"), &ca.key_pem, true)?;
    let identity = Identity {
        id,
        name: name.map(str::to_string).unwrap_or_else(|| format!("node-{}", &format_node_id(id)[..8])),
        role: Role::Manager,
        advertise: advertise.to_string(),
        managers: vec![advertise.to_string()],
    };
    identity.save(dir)?;
    Ok(identity)
}

/// A running manager: the Raft node and the server in front of it.
pub struct RunningManager {
    pub manager: Arc<Manager>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningManager {
    /// Opens the Raft node and serves on `cfg.listen` until `shutdown`;
    /// `agent` is this node's Agent service, served beside the manager's.
    pub async fn start(
        cfg: ManagerConfig,
        tls: Arc<Trust>,
        agent: tonic::service::Routes,
        shutdown: watch::Receiver<bool>,
    ) -> Result<RunningManager, NodeError> {
        let listener =
            TcpListener::bind(cfg.listen).await.map_err(|source| NodeError::Listen { addr: cfg.listen, source })?;
        Self::start_on(cfg, listener, tls, agent, shutdown).await
    }

    /// [`RunningManager::start`] on a listener the caller bound.
    pub async fn start_on(
        cfg: ManagerConfig,
        listener: TcpListener,
        tls: Arc<Trust>,
        agent: tonic::service::Routes,
        shutdown: watch::Receiver<bool>,
    ) -> Result<RunningManager, NodeError> {
        let id = &cfg.identity;
        // A manager without a Raft database has just joined or been
        // promoted: it must ask to be added to the group. (Raft's own view
        // is not loaded yet right after opening, so it can't tell us.)
        let new_member = !cfg.data_dir.join("raft.redb").exists() && cfg.init.is_none();
        let manager = Manager::open_with_key(id.id, &cfg.data_dir, tls, cfg.data_key.clone()).await?;
        manager.faults.drop_forwarded_replies.store(cfg.fault_drop_forwarded_replies, std::sync::atomic::Ordering::Relaxed);
        manager.faults.stale_reads.store(cfg.fault_stale_reads, std::sync::atomic::Ordering::Relaxed);
        let server = tokio::spawn(crate::serve(manager.clone(), listener, cfg.dispatcher, agent, shutdown));
        tracing::info!(node = %id.name, listen = %cfg.listen, advertise = %id.advertise, "manager serving");
        let running = RunningManager { manager, server };
        if let Some(init) = &cfg.init {
            if cfg.fault_stop_init_after_bootstrap {
                running.manager.bootstrap(&id.advertise).await?;
                return Err(NodeError::FaultInjected("stopped --init after the raft bootstrap"));
            }
            running.init_cluster(&cfg.data_dir, id, init).await?;
        } else if new_member {
            running.manager.request_promotion(&id.managers).await?;
            tracing::info!(node = %id.name, "joined the raft group as a voter");
        }
        Ok(running)
    }

    async fn init_cluster(&self, dir: &Path, identity: &Identity, init: &InitNode) -> Result<(), NodeError> {
        self.manager.bootstrap(&identity.advertise).await?;
        let tls = identity::load_tls(dir)?;
        let cluster = ClusterObj {
            ca_cert_pem: tls.ca_pem.clone(),
            ca_key_pem: read_file(&dir.join("tls/ca-key.pem"))?,
            address_pool: init.address_pool.clone(),
            worker_secret: pki::random_hex(16)?,
            manager_secret: pki::random_hex(16)?,
            cert_expiry_ms: 0,
            unlock_key: String::new(),
            ca_bundle_pem: String::new(),
            ca_cross_pem: String::new(),
            version: 0,
        };
        let issued = |pem: &str| -> Result<IssuedCert, NodeError> {
            let c = pki::pem_identity(pem)?;
            Ok(IssuedCert { serial: c.serial, role: c.role.as_str().into(), expires_ms: c.not_after_ms, issuer: c.issuer })
        };
        let node = NodeObj {
            availability: init.availability,
            labels: init.labels.clone(),
            csr_pem: read_file(&dir.join("tls/node.csr")).unwrap_or_default(),
            certs: vec![issued(&tls.cert_pem)?],
            cert_pem: tls.cert_pem.clone(),
            ..NodeObj::new(identity.id, &identity.name, Role::Manager, &identity.advertise)
        };
        let client = match read_file(&dir.join("client/cert.pem")) {
            Ok(pem) => Some(ClientObj { name: ADMIN_CLIENT.into(), cert: issued(&pem)?, created_at_ms: 0 }),
            Err(_) => None,
        };
        match self.manager.propose(Command::InitCluster { cluster, node, client }).await {
            Ok(_) => {}
            // Committed before a crash that kept the bootstrap copy below.
            Err(ProposeError::Refused(crate::store::ApplyError::AlreadyInitialized)) => {
                tracing::info!(node = %identity.name, "cluster state was initialized before a restart");
            }
            Err(e) => return Err(e.into()),
        }
        if let Err(e) = std::fs::remove_file(dir.join("tls/ca-key.pem")) {
            tracing::warn!(node = %identity.name, error = %e, "could not remove the CA key's bootstrap copy");
        }
        tracing::info!(node = %identity.name, "cluster initialized");
        Ok(())
    }

    /// Stops Raft and waits for the server (whose `shutdown` the caller
    /// has raised) to finish.
    pub async fn stop(self) {
        if let Err(e) = self.manager.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
        match self.server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "manager server ended with an error"),
            Err(e) => tracing::error!(error = %e, "manager server panicked"),
        }
    }
}
