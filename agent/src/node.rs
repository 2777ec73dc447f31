//! The agent as one piece: the session with the managers (heartbeats,
//! leader following, role changes), the task runner that follows the
//! node's assignment stream, and the Agent gRPC service (task logs and
//! exec, for managers). The daemon builds one with [`Agent::new`] and
//! drives it with [`Agent::run`]; on a manager node the manager's server
//! mounts [`Agent::service`], on a worker [`Agent::serve`] listens itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::agent::agent_server::AgentServer;
use shoal_security::Trust;
use shoal_security::{Identity, Role};
use tokio::net::TcpListener;
use tokio::sync::watch;

use shoal_overlay::{Overlay, OverlayConfig};

use crate::executor::{ExecutorError, LinuxExecutor};
use crate::service::{AgentService, EXEC_MAX_OUTPUT};
use crate::{session, worker};

/// What an agent needs to know about its node.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The node's data dir: identity, containers, images, task data.
    pub data_dir: PathBuf,
    /// The node as it knows itself (`DATA/node.json`).
    pub identity: Identity,
    /// The `shoal` binary, re-executed as the per-container supervisor
    /// and for `exec` (`shoal internal-supervise|internal-exec`).
    pub shoal_bin: PathBuf,
    /// How long a task gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// How much of each of stdout and stderr `exec` returns.
    pub exec_max_output: usize,
    /// The overlay: WireGuard on this UDP port at this node's address. A
    /// node without one refuses tasks on networks.
    pub overlay: Option<OverlayOpts>,
    /// How much one image layer, and one image, may unpack to here.
    pub image_limits: crate::image::SizeLimits,
    /// `--userns-remap`: run every task in a user namespace over this range.
    pub userns: Option<crate::userns::IdMap>,
}

#[derive(Clone, Debug)]
pub struct OverlayOpts {
    pub port: u16,
    pub endpoint_ip: std::net::Ipv4Addr,
    /// `--dns-upstream`: the resolver for names that are not services.
    pub dns_upstream: Option<std::net::SocketAddr>,
}

impl AgentConfig {
    pub fn new(data_dir: PathBuf, identity: Identity, shoal_bin: PathBuf) -> Self {
        AgentConfig {
            data_dir,
            identity,
            shoal_bin,
            stop_grace: Duration::from_secs(10),
            exec_max_output: EXEC_MAX_OUTPUT,
            overlay: None,
            image_limits: crate::image::SizeLimits::default(),
            userns: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("opening the container runtime: {0}")]
    Runtime(#[from] ExecutorError),
    #[error("starting the overlay: {0}")]
    Overlay(#[from] shoal_overlay::OverlayError),
}

/// Why [`Agent::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentExit {
    /// The caller asked it to stop.
    Shutdown,
    /// The managers changed this node's role (new certificate and role are
    /// recorded in the data dir): restart the node's components.
    RoleChanged(Role),
}

pub struct Agent {
    cfg: AgentConfig,
    tls: Arc<Trust>,
    executor: Arc<LinuxExecutor>,
}

impl Agent {
    pub fn new(cfg: AgentConfig, tls: Arc<Trust>) -> Result<Agent, AgentError> {
        let executor = Arc::new(LinuxExecutor::new(&cfg.data_dir, &cfg.shoal_bin)?.with_image_limits(cfg.image_limits));
        Ok(Agent { cfg, tls, executor })
    }

    /// The Agent gRPC service (logs, exec) for a server that also serves
    /// other services, like a manager's.
    pub fn service(&self) -> AgentServer<AgentService> {
        AgentServer::new(AgentService {
            data_dir: self.cfg.data_dir.clone(),
            shoal_bin: self.cfg.shoal_bin.clone(),
            exec_max_output: self.cfg.exec_max_output,
            tls: self.tls.clone(),
        })
    }

    /// Serves only the Agent service on `listener` (a worker node) until
    /// `shutdown` turns true. The future owns what it needs: spawn it.
    pub fn serve(
        &self,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = Result<(), tonic::transport::Error>> + Send + 'static {
        let (tls, service) = (self.tls.clone(), self.service());
        async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(tls.incoming(listener), async move {
                    // A dropped sender also means stop.
                    let _ = shutdown.wait_for(|s| *s).await;
                })
                .await
        }
    }

    /// Runs the session and the task runner until `shutdown` turns true or
    /// the managers change this node's role.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<AgentExit, AgentError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let overlay = match &self.cfg.overlay {
            Some(o) => {
                let cfg = OverlayConfig {
                    data_dir: self.cfg.data_dir.clone(),
                    port: o.port,
                    endpoint_ip: o.endpoint_ip,
                    dns_upstream: o.dns_upstream,
                };
                Some(Arc::new(Overlay::start(cfg, stop_rx.clone()).await?))
            }
            None => None,
        };
        Ok(self.run_with(shutdown, stop_tx, stop_rx, overlay).await)
    }

    async fn run_with(
        self,
        mut shutdown: watch::Receiver<bool>,
        stop_tx: watch::Sender<bool>,
        stop_rx: watch::Receiver<bool>,
        overlay: Option<Arc<Overlay>>,
    ) -> AgentExit {
        let id = &self.cfg.identity;
        let overlay_at_exit = overlay.clone();
        let (role_tx, mut role_rx) = watch::channel(None);
        let (current_tx, current_rx) = watch::channel(None);
        let volumes = Arc::new(crate::volume::Volumes::new(&self.cfg.data_dir));
        let worker = tokio::spawn(
            worker::Worker {
                node_id: id.id,
                data_dir: self.cfg.data_dir.clone(),
                shoal_bin: self.cfg.shoal_bin.clone(),
                tls: self.tls.clone(),
                executor: self.executor.clone(),
                stop_grace: self.cfg.stop_grace,
                overlay: overlay.clone(),
                manager: current_rx.clone(),
                shutdown: stop_rx.clone(),
                volumes: volumes.clone(),
                userns: self.cfg.userns,
            }
            .run(),
        );
        let managers = if id.role == Role::Manager {
            // A manager reports to itself first: it knows the leader.
            let mut v = vec![id.advertise.clone()];
            v.extend(id.managers.iter().filter(|m| **m != id.advertise).cloned());
            v
        } else {
            id.managers.clone()
        };
        let (peers_tx, peers_rx) = tokio::sync::watch::channel(0u64);
        let discovery = overlay.clone().map(|o| {
            tokio::spawn(
                crate::discovery::Discovery {
                    node_id: id.id,
                    tls: self.tls.clone(),
                    overlay: o,
                    manager: current_rx.clone(),
                    shutdown: stop_rx.clone(),
                    peers_version: peers_tx,
                }
                .run(),
            )
        });
        let session = tokio::spawn(session::run(session::Session {
            role: id.role,
            role_changed: role_tx,
            current: current_tx,
            data_dir: self.cfg.data_dir.clone(),
            node_id: id.id,
            tls: self.tls.clone(),
            advertise: id.advertise.clone(),
            managers,
            shutdown: stop_rx,
            overlay,
            load: Arc::new(crate::load::LoadMeter::new(self.executor.clone())),
            volumes,
            peers_wanted: peers_rx,
        }));
        let exit = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => AgentExit::Shutdown,
            r = role_rx.wait_for(|r| r.is_some()) => match r.ok().and_then(|r| *r) {
                Some(role) => AgentExit::RoleChanged(role),
                None => AgentExit::Shutdown,
            },
        };
        // Nobody may be listening any more: the send can only fail then.
        let _ = stop_tx.send(true);
        let mut handles = vec![("session", session), ("task runner", worker)];
        handles.extend(discovery.map(|d| ("service discovery", d)));
        for (what, handle) in handles {
            if let Err(e) = handle.await {
                tracing::error!(node = %id.name, error = %e, "the agent's {what} panicked");
            }
        }
        // A node that stops with no task on a network leaves nothing of
        // shoal's in the host's firewall (a role change starts the agent
        // again at once: nothing to clean then).
        if matches!(exit, AgentExit::Shutdown)
            && let Some(o) = overlay_at_exit
        {
            match o.release_if_idle().await {
                Ok(true) => tracing::info!(node = %id.name, "no task here is on a network: shoal's nftables table and forward accepts removed"),
                Ok(false) => {}
                Err(e) => tracing::warn!(node = %id.name, error = %e, "could not remove shoal's firewall rules"),
            }
        }
        exit
    }
}
