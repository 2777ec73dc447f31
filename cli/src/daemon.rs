//! `shoal daemon`: brings up a node. The first start with `--init` creates a
//! cluster; with `--join` it trades a token for a certificate; any later
//! start with the same data dir comes back as the same node.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use shoal_manager::pki::{self, CertKey, CertRole};
use shoal_manager::store::objects::{Availability, ClusterObj, NodeObj, NodeStatus, Role};
use shoal_manager::store::state::format_node_id;
use shoal_manager::store::Command;
use shoal_manager::tls::NodeTls;
use shoal_manager::{DispatcherConfig, Manager};
use shoal_proto::join::join_client::JoinClient;
use shoal_proto::join::JoinRequest;
use tonic::transport::Certificate;

use crate::session;

#[derive(Args)]
pub struct DaemonArgs {
    /// Where this node keeps its identity, certificates and Raft data.
    #[arg(long, default_value = "/var/lib/shoal")]
    data_dir: PathBuf,
    /// Address for the gRPC server (managers).
    #[arg(long, default_value = "0.0.0.0:7700")]
    listen: SocketAddr,
    /// Address other nodes use to reach this one (default: --listen).
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// Create a new cluster with this node as its first manager.
    #[arg(long, conflicts_with_all = ["join", "token"])]
    init: bool,
    /// Join the cluster of the manager at IP:PORT.
    #[arg(long, value_name = "MANAGER_IP:PORT", requires = "token")]
    join: Option<String>,
    /// Join token (from `shoal join-token worker|manager`).
    #[arg(long, env = "SHOAL_JOIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[arg(long)]
    node_name: Option<String>,
    /// Node label K=V (repeatable).
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
    #[arg(long, value_parser = ["active", "pause", "drain"], default_value = "active")]
    availability: String,
    /// WireGuard UDP port of the overlay.
    #[arg(long, default_value_t = 51820)]
    overlay_port: u16,
    /// Pool the overlay allocates subnets from.
    #[arg(long, default_value = "100.64.0.0/10")]
    address_pool: String,
    /// A node that misses heartbeats this long is marked down.
    #[arg(long, default_value = "5s", value_parser = parse_secs)]
    heartbeat_timeout: std::time::Duration,
}

fn parse_secs(s: &str) -> Result<std::time::Duration, String> {
    let n = s.strip_suffix('s').unwrap_or(s);
    n.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(std::time::Duration::from_secs_f64)
        .ok_or_else(|| format!("invalid duration {s:?}: expected seconds such as 5s"))
}

/// What a node remembers about itself across restarts.
#[derive(Serialize, Deserialize)]
pub struct Identity {
    pub id: u64,
    pub name: String,
    pub role: Role,
    pub advertise: String,
    /// Managers last heard of, for an agent to reconnect to.
    pub managers: Vec<String>,
}

fn identity_path(dir: &Path) -> PathBuf {
    dir.join("node.json")
}

fn write_file(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::io::Write;
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn save_tls(dir: &Path, tls: &NodeTls) -> anyhow::Result<()> {
    write_file(&dir.join("tls/ca.pem"), &tls.ca_pem, false)?;
    write_file(&dir.join("tls/node.pem"), &tls.cert_pem, false)?;
    write_file(&dir.join("tls/node-key.pem"), &tls.key_pem, true)
}

fn load_tls(dir: &Path) -> anyhow::Result<NodeTls> {
    Ok(NodeTls {
        ca_pem: read(&dir.join("tls/ca.pem"))?,
        cert_pem: read(&dir.join("tls/node.pem"))?,
        key_pem: read(&dir.join("tls/node-key.pem"))?,
    })
}

pub fn save_identity(dir: &Path, id: &Identity) -> anyhow::Result<()> {
    write_file(&identity_path(dir), &serde_json::to_string_pretty(id)?, false)
}

pub fn parse_labels(labels: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    labels
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("invalid --label {kv:?}: expected KEY=VALUE"),
        })
        .collect()
}

pub fn main(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,h2=warn,tower=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn run(args: DaemonArgs) -> anyhow::Result<()> {
    let advertise = match args.advertise {
        Some(a) => a,
        None if args.listen.ip().is_unspecified() => {
            bail!("--listen {} is a wildcard address: pass --advertise IP:PORT so other nodes can reach this one", args.listen)
        }
        None => args.listen,
    };
    let labels = parse_labels(&args.labels)?;
    if let Some(n) = &args.node_name {
        shoal_manager::spec::validate_name("node name", n)?;
    }
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let dir = args.data_dir.clone();

    let (identity, fresh) = if identity_path(&dir).exists() {
        if args.init || args.join.is_some() {
            tracing::info!(data_dir = %dir.display(), "data dir holds a node identity: --init/--join ignored, rejoining as that node");
        }
        let id: Identity = serde_json::from_str(&read(&identity_path(&dir))?).context("parsing node.json")?;
        (id, Fresh::No)
    } else if args.init {
        (init_identity(&dir, &args, advertise)?, Fresh::Init)
    } else if let (Some(join), Some(token)) = (&args.join, &args.token) {
        (join_cluster(&dir, &args, advertise, join, token, &labels).await?, Fresh::Joined)
    } else {
        bail!("{} holds no node identity: start with --init to create a cluster or --join IP:PORT --token TOKEN", dir.display());
    };
    let mut identity = identity;
    let mut fresh = fresh;
    loop {
        match run_node(&args, &dir, advertise, &labels, &identity, fresh).await? {
            Exit::Signal => return Ok(()),
            Exit::RoleChanged => {
                identity = serde_json::from_str(&read(&identity_path(&dir))?).context("parsing node.json")?;
                fresh = Fresh::No;
                if identity.role == Role::Worker {
                    // No longer a Raft member: its log is history.
                    let _ = std::fs::remove_file(dir.join("raft.redb"));
                }
                tracing::info!(node = %identity.name, role = identity.role.as_str(), "role changed: restarting the node's components");
            }
        }
    }
}

/// Why a node's components stopped.
enum Exit {
    Signal,
    RoleChanged,
}

async fn run_node(
    args: &DaemonArgs,
    dir: &Path,
    advertise: SocketAddr,
    labels: &BTreeMap<String, String>,
    identity: &Identity,
    fresh: Fresh,
) -> anyhow::Result<Exit> {
    let dir = dir.to_path_buf();
    let tls = Arc::new(load_tls(&dir)?);
    tracing::info!(node = %identity.name, id = %format_node_id(identity.id), role = identity.role.as_str(), "node starting");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (role_tx, mut role_rx) = tokio::sync::watch::channel(false);
    let server;
    let mut manager = None;
    if identity.role == Role::Manager {
        // A manager without a Raft database has just joined or been
        // promoted: it must ask to be added to the group. (Raft's own view
        // is not loaded yet right after opening, so it can't tell us.)
        let new_member = !dir.join("raft.redb").exists() && !matches!(fresh, Fresh::Init);
        let m = Manager::open(identity.id, &dir, tls.clone()).await?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let cfg = DispatcherConfig { down_after: args.heartbeat_timeout, ..Default::default() };
        let agent = tonic::service::Routes::new(shoal_proto::agent::agent_server::AgentServer::new(
            crate::agent_server::AgentService { data_dir: dir.clone() },
        ));
        server = tokio::spawn(shoal_manager::serve(m.clone(), listener, cfg, agent, stop_rx.clone()));
        tracing::info!(listen = %args.listen, advertise = %advertise, "manager serving");
        if matches!(fresh, Fresh::Init) {
            init_cluster(&m, &dir, identity, labels, &args.availability).await?;
        } else if new_member {
            // Just joined with a manager token, or just promoted.
            m.request_promotion(&identity.managers).await?;
            tracing::info!("joined the raft group as a voter");
        }
        manager = Some(m);
    } else {
        // A worker serves only its Agent service (logs, exec) to managers.
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let mut stop = stop_rx.clone();
        let tls_cfg = tls.server_config();
        let svc = shoal_proto::agent::agent_server::AgentServer::new(crate::agent_server::AgentService { data_dir: dir.clone() });
        server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .tls_config(tls_cfg)?
                .add_service(svc)
                .serve_with_incoming_shutdown(shoal_manager::incoming(listener), async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        });
    }

    let (current_tx, current_rx) = tokio::sync::watch::channel(None);
    let executor = Arc::new(
        shoal_agent::executor::LinuxExecutor::new(&dir, &std::env::current_exe().context("locating the shoal binary")?)
            .context("opening the container runtime")?,
    );
    let worker = tokio::spawn(
        crate::worker::Worker {
            node_id: identity.id,
            data_dir: dir.clone(),
            tls: tls.clone(),
            executor,
            manager: current_rx,
            shutdown: stop_rx.clone(),
        }
        .run(),
    );
    let agent = tokio::spawn(session::run(session::Session {
        role: identity.role,
        role_changed: role_tx,
        current: current_tx,
        data_dir: dir.clone(),
        node_id: identity.id,
        tls: tls.clone(),
        advertise: advertise.to_string(),
        managers: if identity.role == Role::Manager {
            // A manager reports to itself first: it knows the leader.
            let mut v = vec![advertise.to_string()];
            v.extend(identity.managers.iter().filter(|m| **m != advertise.to_string()).cloned());
            v
        } else {
            identity.managers.clone()
        },
        shutdown: stop_rx.clone(),
    }));

    let exit = tokio::select! {
        _ = wait_for_signal() => Exit::Signal,
        _ = role_rx.wait_for(|c| *c) => Exit::RoleChanged,
    };
    if matches!(exit, Exit::Signal) {
        tracing::info!(node = %identity.name, "shutting down");
    }
    let _ = stop_tx.send(true);
    if let Some(m) = manager {
        let _ = m.raft.shutdown().await;
    }
    let _ = server.await;
    let _ = agent.await;
    let _ = worker.await;
    Ok(exit)
}

#[derive(Clone, Copy)]
enum Fresh {
    No,
    Init,
    Joined,
}

/// Records a role change the managers announced: the new certificate and
/// role, so the restarted components (and a restarted daemon) use them.
pub fn apply_role_change(dir: &Path, role: Role, cert_pem: &str) -> anyhow::Result<()> {
    write_file(&dir.join("tls/node.pem"), cert_pem, false)?;
    let mut id: Identity = serde_json::from_str(&read(&identity_path(dir))?).context("parsing node.json")?;
    id.role = role;
    save_identity(dir, &id)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers, run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// First start with `--init`: a CA, this node's certificate, client
/// credentials, and the identity file.
fn init_identity(dir: &Path, args: &DaemonArgs, advertise: SocketAddr) -> anyhow::Result<Identity> {
    let ca = pki::new_ca()?;
    let id = pki::random_u64()?;
    let (csr, key_pem) = pki::new_csr()?;
    let node = CertKey { cert_pem: pki::sign_csr(&ca, &csr, &format_node_id(id), CertRole::Manager)?, key_pem };
    write_file(&dir.join("tls/node.csr"), &csr, false)?;
    let client = pki::issue(&ca, "client", CertRole::Client)?;
    save_tls(dir, &NodeTls { ca_pem: ca.cert_pem.clone(), cert_pem: node.cert_pem, key_pem: node.key_pem })?;
    write_file(&dir.join("client/ca.pem"), &ca.cert_pem, false)?;
    write_file(&dir.join("client/cert.pem"), &client.cert_pem, false)?;
    write_file(&dir.join("client/key.pem"), &client.key_pem, true)?;
    // The CA key goes into the replicated state at bootstrap; keep a copy
    // until then so a crash between here and there can finish the job.
    write_file(&dir.join("tls/ca-key.pem"), &ca.key_pem, true)?;
    let identity = Identity {
        id,
        name: args.node_name.clone().unwrap_or_else(|| format!("node-{}", &format_node_id(id)[..8])),
        role: Role::Manager,
        advertise: advertise.to_string(),
        managers: vec![advertise.to_string()],
    };
    save_identity(dir, &identity)?;
    Ok(identity)
}

async fn init_cluster(
    m: &Arc<Manager>,
    dir: &Path,
    identity: &Identity,
    labels: &BTreeMap<String, String>,
    availability: &str,
) -> anyhow::Result<()> {
    m.bootstrap(&identity.advertise).await?;
    let tls = load_tls(dir)?;
    let ca = CertKey { cert_pem: tls.ca_pem.clone(), key_pem: read(&dir.join("tls/ca-key.pem"))? };
    let cluster = ClusterObj {
        ca_cert_pem: ca.cert_pem,
        ca_key_pem: ca.key_pem,
        worker_secret: pki::random_hex(16)?,
        manager_secret: pki::random_hex(16)?,
        version: 0,
    };
    let node = NodeObj {
        id: identity.id,
        name: identity.name.clone(),
        role: Role::Manager,
        status: NodeStatus::Ready,
        availability: Availability::parse(availability).unwrap_or(Availability::Active),
        labels: labels.clone(),
        address: identity.advertise.clone(),
        nano_cpus: 0,
        memory_bytes: 0,
        csr_pem: std::fs::read_to_string(dir.join("tls/node.csr")).unwrap_or_default(),
        version: 0,
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    m.propose(Command::InitCluster { cluster, node }).await?;
    std::fs::remove_file(dir.join("tls/ca-key.pem")).ok();
    tracing::info!(node = %identity.name, "cluster initialized");
    Ok(())
}

/// First start with `--join`: pin the CA by the token's fingerprint, send a
/// CSR, and keep the certificate the cluster signs.
async fn join_cluster(
    dir: &Path,
    args: &DaemonArgs,
    advertise: SocketAddr,
    join: &str,
    token: &str,
    labels: &BTreeMap<String, String>,
) -> anyhow::Result<Identity> {
    let t = pki::parse_token(token)?;
    let ca_pem = pki::fetch_pinned_ca(join, &t.ca_fingerprint)
        .await
        .with_context(|| format!("verifying the cluster at {join} against the join token's CA fingerprint"))?;
    let (csr, key_pem) = pki::new_csr()?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .domain_name(pki::CLUSTER_DNS_NAME);
    let channel = shoal_manager::tls::endpoint(join)?
        .tls_config(tls)?
        .connect()
        .await
        .with_context(|| format!("connecting to {join}"))?;
    let resp = JoinClient::new(channel)
        .join(JoinRequest {
            token: token.to_string(),
            csr_pem: csr,
            node_name: args.node_name.clone().unwrap_or_default(),
            advertise_addr: advertise.to_string(),
            labels: labels.clone().into_iter().collect(),
            availability: args.availability.clone(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("join refused by {join}: {}", s.message()))?
        .into_inner();
    let role = if resp.role == "manager" { Role::Manager } else { Role::Worker };
    save_tls(dir, &NodeTls { ca_pem: resp.ca_pem, cert_pem: resp.cert_pem, key_pem })?;
    let name = args.node_name.clone().unwrap_or_else(|| format!("node-{}", &format_node_id(resp.node_id)[..8]));
    let identity = Identity {
        id: resp.node_id,
        name,
        role,
        advertise: advertise.to_string(),
        managers: if resp.managers.is_empty() { vec![join.to_string()] } else { resp.managers },
    };
    save_identity(dir, &identity)?;
    tracing::info!(node = %identity.name, role = role.as_str(), via = join, "joined the cluster");
    Ok(identity)
}
