//! One node in this test process: a real [`RunningManager`] and a real
//! [`Agent`] on loopback, built from the library crates the daemon
//! composes, without `shoal daemon`. Containers still run through the
//! `shoal` binary (their supervisors are re-executed from it), and the
//! CLI drives the node from outside, as an operator would.
//!
//! Everything it makes lives under a unique temporary directory and is
//! removed when the node is dropped, also when a test panics.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use anyhow::Context;
use serde_json::Value;
use shoal_agent::{Agent, AgentConfig, AgentExit};
use shoal_manager::node::{init_identity, InitNode, ManagerConfig, RunningManager};
use shoal_manager::store::objects::Availability;
use shoal_manager::DispatcherConfig;
use shoal_security::identity::load_tls;
use shoal_security::{Identity, Trust};
use tokio::sync::watch;

use crate::{busybox_rootfs, remove_containers, shoal_bin, unique_id};

pub struct InProcessNode {
    pub dir: PathBuf,
    pub addr: String,
    pub identity: Identity,
    pub tls: Arc<Trust>,
    pub rt: tokio::runtime::Runtime,
    stop: watch::Sender<bool>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl InProcessNode {
    /// A one-node cluster (`--init`). `prepare` runs on the fresh data dir
    /// before anything starts; `configure` adjusts the agent's settings.
    pub fn start(prepare: impl FnOnce(&Path), configure: impl FnOnce(&mut AgentConfig)) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("shoal-inproc-{}", unique_id()));
        std::fs::create_dir_all(&dir)?;
        prepare(&dir);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?.to_string();
        let identity = init_identity(&dir, Some("inproc"), &addr)?;
        let tls = Trust::new(load_tls(&dir)?)?;
        let mut cfg = AgentConfig::new(dir.clone(), identity.clone(), shoal_bin());
        configure(&mut cfg);
        let agent = Agent::new(cfg, tls.clone())?;
        let (stop, stop_rx) = watch::channel(false);
        let mcfg = ManagerConfig {
            data_dir: dir.clone(),
            identity: identity.clone(),
            listen: listener.local_addr()?,
            dispatcher: DispatcherConfig::default(),
            init: Some(InitNode { labels: Default::default(), availability: Availability::Active, address_pool: "100.64.0.0/10".into() }),
            fault_drop_forwarded_replies: 0,
            fault_stop_init_after_bootstrap: false,
            data_key: None,
            fault_stale_reads: false,
        };
        let routes = tonic::service::Routes::new(agent.service());
        let manager = rt
            .block_on(RunningManager::start_on(mcfg, listener, tls.clone(), routes, stop_rx.clone()))
            .context("starting the in-process manager")?;
        let done = rt.spawn(async move {
            let exit = agent.run(stop_rx).await;
            assert!(matches!(exit, Ok(AgentExit::Shutdown)), "{exit:?}");
            manager.stop().await;
        });
        let node = InProcessNode { dir, addr, identity, tls, rt, stop, done: Some(done) };
        crate::wait_for(std::time::Duration::from_secs(30), "the in-process node to be ready", || {
            let nodes = node.cli_ok(&["node", "ls", "--format", "json"])?;
            Ok((nodes[0]["status"] == "ready").then_some(()))
        })?;
        Ok(node)
    }

    /// Runs the CLI against this node (bounded by coreutils `timeout`).
    pub fn cli(&self, args: &[&str]) -> Output {
        let out = Command::new("timeout")
            .args(["--kill-after=5", "150"])
            .arg(shoal_bin())
            .arg("--host")
            .arg(&self.addr)
            .arg("--cert-dir")
            .arg(self.dir.join("client"))
            .args(args)
            .stdin(Stdio::null())
            .output();
        crate::spawned(out)
    }

    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<Value> {
        crate::cli_json(args, self.cli(args))
    }

    pub fn import_busybox(&self, reference: &str) -> anyhow::Result<()> {
        let tar = busybox_rootfs()?.display().to_string();
        self.cli_ok(&["image", "import", &tar, reference])?;
        Ok(())
    }
}

impl Drop for InProcessNode {
    fn drop(&mut self) {
        // Receivers are gone only if the node already stopped.
        let _ = self.stop.send(true);
        if let Some(done) = self.done.take() {
            match self.rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(30), done).await }) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("in-process node did not stop cleanly: {e}"),
                Err(_) => eprintln!("in-process node did not stop within 30 s"),
            }
        }
        remove_containers(&self.dir);
        if std::env::var_os("SHOAL_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes a test's directory when dropped (unless SHOAL_KEEP_TEST_DIRS).
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        remove_containers(&self.0);
        if std::env::var_os("SHOAL_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
