//! `shoal daemon`: brings up a node. The first start with `--init` creates a
//! cluster; with `--join` it trades a token for a certificate; any later
//! start with the same data dir comes back as the same node.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use shoal_agent::join::{join_cluster, JoinParams};
use shoal_agent::{Agent, AgentConfig, AgentExit, OverlayOpts};
use shoal_manager::node::{init_identity, init_pending, wait_unlocked, InitNode, ManagerConfig, RunningManager};
use shoal_manager::store::objects::Availability;
use shoal_manager::DispatcherConfig;
use shoal_security::identity::load_tls;
use shoal_security::{Identity, Role};

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
    /// Pool the overlay allocates subnets from (with --init: the
    /// cluster's; ignored when joining).
    #[arg(long, default_value = "100.64.0.0/10")]
    address_pool: String,
    /// The resolver the tasks' DNS server asks for names that are not
    /// services (IPv4, port 53 unless given). Default: the first
    /// nameserver of this host's /etc/resolv.conf that is not on loopback.
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse_dns_upstream)]
    dns_upstream: Option<SocketAddr>,
    #[command(flatten)]
    image_limits: crate::cmd::image::SizeLimitArgs,
    /// Run every task in a user namespace: container root is an
    /// unprivileged host id. `default` takes (or adds) the `shoal` entries
    /// of /etc/subuid and /etc/subgid; `START:SIZE` names a range.
    #[arg(long = "userns-remap", value_name = "default|START:SIZE", value_parser = shoal_agent::userns::parse_remap)]
    userns_remap: Option<shoal_agent::userns::IdMap>,
    /// A node that misses heartbeats this long is marked down. Agents
    /// heartbeat every half of it (less often past 5,000 nodes, so the
    /// leader answers at most ~2,000 heartbeats a second).
    #[arg(long, default_value = "5s", value_parser = parse_timeout)]
    heartbeat_timeout: std::time::Duration,
    /// Fault injection for tests: drop the answers to this many writes
    /// forwarded to this manager, after applying them.
    #[arg(long, hide = true, default_value_t = 0)]
    fault_drop_forwarded_replies: u32,
    /// Fault injection for tests: stop `--init` after the Raft group is
    /// bootstrapped and before the cluster state is written, as a crash
    /// there would.
    #[arg(long, hide = true)]
    fault_stop_init_after_bootstrap: bool,
    /// Fault injection for tests: serve linearizable reads without the
    /// read barrier (stale on a partitioned manager), so the
    /// linearizability checker can be shown to catch it.
    #[arg(long, hide = true)]
    fault_stale_reads: bool,
}

fn parse_dns_upstream(s: &str) -> Result<SocketAddr, String> {
    let addr = match s.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => s
            .parse::<std::net::Ipv4Addr>()
            .map(|ip| SocketAddr::from((ip, 53)))
            .map_err(|_| format!("invalid DNS upstream {s:?}: expected IP or IP:PORT"))?,
    };
    if !addr.is_ipv4() || addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(format!("invalid DNS upstream {s:?}: expected an IPv4 address and a port other than 0"));
    }
    // Loopback is fine here: the daemon asks from the node's own
    // namespace (unlike resolv.conf's, which tasks would read).
    Ok(addr)
}

/// `--heartbeat-timeout`: at least 200 ms (agents heartbeat every half of
/// it, and no faster than every 100 ms).
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_secs(s)?;
    if d < std::time::Duration::from_millis(200) {
        return Err(format!("--heartbeat-timeout {s:?} is too short: at least 0.2s"));
    }
    Ok(d)
}

fn parse_secs(s: &str) -> Result<std::time::Duration, String> {
    let n = s.strip_suffix('s').unwrap_or(s);
    n.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(std::time::Duration::from_secs_f64)
        .ok_or_else(|| format!("invalid duration {s:?}: expected seconds such as 5s"))
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

/// glibc malloc arenas the daemon uses (its default is 8 per core).
const MALLOC_ARENAS: i32 = 2;

pub fn main(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,h2=warn,tower=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Before any thread starts: a manager frees on other threads what the
    // Raft apply thread allocated, and with an arena per thread a leader's
    // memory per task at 250,000 tasks was 2.5 KB instead of 1.45 KB
    // (BENCHMARKS.md).
    if !shoal_agent::limit_malloc_arenas(MALLOC_ARENAS) {
        tracing::warn!(arenas = MALLOC_ARENAS, "malloc refused the arena cap: memory use stays at glibc's default");
    }
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
    let pool = shoal_manager::spec::parse_cidr(&args.address_pool).with_context(|| format!("--address-pool {}", args.address_pool))?;
    if pool.1 > shoal_manager::store::state::NETWORK_PREFIX {
        bail!(
            "--address-pool {} is too small: networks take a /{} each",
            args.address_pool,
            shoal_manager::store::state::NETWORK_PREFIX
        );
    }
    if let Some(n) = &args.node_name {
        shoal_manager::spec::validate_name("node name", n)?;
    }
    let dir = args.data_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Keys, the Raft log (the cluster CA among it), secrets: root only.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).with_context(|| format!("making {} private", dir.display()))?;
    }

    let (mut identity, mut init) = if Identity::exists(&dir) {
        if args.init || args.join.is_some() {
            tracing::info!(data_dir = %dir.display(), "data dir holds a node identity: --init/--join ignored, rejoining as that node");
        }
        let resume = init_pending(&dir);
        if resume {
            tracing::info!(data_dir = %dir.display(), "a previous --init did not finish: resuming it");
        }
        (Identity::load(&dir)?, resume)
    } else if args.init {
        (init_identity(&dir, args.node_name.as_deref(), &advertise.to_string())?, true)
    } else if let (Some(join), Some(token)) = (&args.join, &args.token) {
        let params = JoinParams {
            node_name: args.node_name.as_deref(),
            advertise: &advertise.to_string(),
            labels: &labels,
            availability: &args.availability,
        };
        (join_cluster(&dir, join, token, &params).await?, false)
    } else {
        bail!("{} holds no node identity: start with --init to create a cluster or --join IP:PORT --token TOKEN", dir.display());
    };
    loop {
        match run_node(&args, &dir, &labels, &identity, init).await? {
            AgentExit::Shutdown => return Ok(()),
            AgentExit::RoleChanged(role) => {
                identity = Identity::load(&dir)?;
                init = false;
                if role == Role::Worker {
                    // No longer a Raft member: its log is history.
                    if let Err(e) = std::fs::remove_file(dir.join("raft.redb")) {
                        tracing::warn!(node = %identity.name, error = %e, "could not remove the old raft database");
                    }
                }
                tracing::info!(node = %identity.name, role = role.as_str(), "role changed: restarting the node's components");
            }
        }
    }
}

/// Runs this node's manager (if it is one) and agent until a signal or a
/// role change.
async fn run_node(
    args: &DaemonArgs,
    dir: &Path,
    labels: &BTreeMap<String, String>,
    identity: &Identity,
    init: bool,
) -> anyhow::Result<AgentExit> {
    let tls = shoal_security::Trust::new(load_tls(dir)?).context("loading the node's TLS material")?;
    tracing::info!(node = %identity.name, id = %format!("{:016x}", identity.id), role = identity.role.as_str(), "node starting");
    let shoal_bin = std::env::current_exe().context("locating the shoal binary")?;
    let mut cfg = AgentConfig::new(dir.to_path_buf(), identity.clone(), shoal_bin);
    let std::net::IpAddr::V4(endpoint_ip) = args.advertise.unwrap_or(args.listen).ip() else {
        bail!("the overlay needs an IPv4 address: --advertise {} is not one", args.advertise.unwrap_or(args.listen));
    };
    cfg.overlay = Some(OverlayOpts { port: args.overlay_port, endpoint_ip, dns_upstream: args.dns_upstream });
    cfg.image_limits = args.image_limits.limits();
    cfg.userns = args.userns_remap;
    if let Some(m) = cfg.userns {
        tracing::info!(node = %identity.name, uid = m.uid, gid = m.gid, size = m.size, "tasks run in user namespaces: container root is host uid {}", m.uid);
    }
    let agent = Agent::new(cfg, tls.clone())?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut manager = None;
    let mut agent_server = None;
    if identity.role == Role::Manager {
        // Autolock: nothing runs until the operator gives the unlock key.
        let data_key = if shoal_security::at_rest::is_locked(dir)? {
            let (sig_tx, sig_rx) = tokio::sync::watch::channel(false);
            let waiter = wait_unlocked(args.listen, dir, tls.clone(), sig_rx);
            tokio::pin!(waiter);
            let key = tokio::select! {
                k = &mut waiter => k?,
                _ = wait_for_signal() => {
                    let _ = sig_tx.send(true);
                    (&mut waiter).await?
                }
            };
            match key {
                Some(k) => Some(k),
                None => return Ok(AgentExit::Shutdown),
            }
        } else {
            None
        };
        let cfg = ManagerConfig {
            data_dir: dir.to_path_buf(),
            identity: identity.clone(),
            listen: args.listen,
            dispatcher: DispatcherConfig::with_timeout(args.heartbeat_timeout),
            init: init.then(|| InitNode {
                labels: labels.clone(),
                availability: Availability::parse(&args.availability).unwrap_or(Availability::Active),
                address_pool: args.address_pool.clone(),
            }),
            fault_drop_forwarded_replies: args.fault_drop_forwarded_replies,
            fault_stop_init_after_bootstrap: args.fault_stop_init_after_bootstrap,
            data_key,
            fault_stale_reads: args.fault_stale_reads,
        };
        let routes = tonic::service::Routes::new(agent.service());
        manager = Some(RunningManager::start(cfg, tls.clone(), routes, stop_rx.clone()).await?);
    } else {
        // A worker serves only its Agent service (logs, exec) to managers.
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        agent_server = Some(tokio::spawn(agent.serve(listener, stop_rx.clone())));
    }

    let (agent_stop_tx, agent_stop_rx) = tokio::sync::watch::channel(false);
    let agent_run = tokio::spawn(agent.run(agent_stop_rx));
    tokio::pin!(agent_run);
    let exit = tokio::select! {
        _ = wait_for_signal() => {
            tracing::info!(node = %identity.name, "shutting down");
            let _ = agent_stop_tx.send(true);
            (&mut agent_run).await.map(|r| r.map(|_| AgentExit::Shutdown))
        }
        r = &mut agent_run => r,
    };
    let exit = match exit {
        Ok(Ok(exit)) => Ok(exit),
        Ok(Err(e)) => Err(anyhow::Error::from(e)),
        Err(e) => Err(anyhow::anyhow!("the agent panicked: {e}")),
    };
    // Receivers may be gone already; then there is nothing left to stop.
    let _ = stop_tx.send(true);
    if let Some(m) = manager {
        m.stop().await;
    }
    if let Some(s) = agent_server {
        match s.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(node = %identity.name, error = %e, "agent server ended with an error"),
            Err(e) => tracing::error!(node = %identity.name, error = %e, "agent server panicked"),
        }
    }
    exit
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_upstream_takes_an_ipv4_address_with_or_without_a_port() {
        assert_eq!(parse_dns_upstream("198.18.0.1"), Ok(SocketAddr::from(([198, 18, 0, 1], 53))));
        assert_eq!(parse_dns_upstream("198.18.0.1:5353"), Ok(SocketAddr::from(([198, 18, 0, 1], 5353))));
        for bad in ["", "resolver", "::1", "[::1]:53", "0.0.0.0", "198.18.0.1:0", "198.18.0.1:x"] {
            assert!(parse_dns_upstream(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn heartbeat_timeouts_are_seconds_and_at_least_200_ms() {
        assert_eq!(parse_timeout("5s"), Ok(std::time::Duration::from_secs(5)));
        assert_eq!(parse_timeout("0.2"), Ok(std::time::Duration::from_millis(200)));
        assert!(parse_timeout("0.1s").is_err_and(|e| e.contains("too short")));
        for bad in ["", "s", "five", "-1s", "0s", "inf"] {
            assert!(parse_timeout(bad).is_err(), "{bad:?} accepted");
        }
    }
}
