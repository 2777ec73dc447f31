//! The agent's task runner: follows the node's assignment stream from the
//! managers, runs each task through the executor (real containers via the
//! per-container supervisors), and reports state changes in batches.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::executor::{ContainerState, Executor, LinuxExecutor};
use crate::image::ManifestRefs;
use shoal_proto::limits::MAX_MANIFEST;
use crate::spec::{Mount, RunRequest};
use shoal_security::Trust;
use shoal_proto::dispatcher::dispatcher_client::DispatcherClient;
use shoal_proto::dispatcher::{Assignment, AssignmentsRequest, BlobRef, TaskData, TaskStatus, TaskStatusBatch};
use shoal_overlay::{Attachment, Overlay};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

/// How long a task that publishes ports may take to listen on them before
/// it is reported running anyway.
const LISTEN_WAIT: Duration = Duration::from_secs(10);

pub(crate) struct Worker {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub shoal_bin: PathBuf,
    pub tls: Arc<Trust>,
    pub executor: Arc<LinuxExecutor>,
    /// How long a task gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// Wires tasks' networks; `None` on a node without an overlay.
    pub overlay: Option<Arc<Overlay>>,
    /// The manager the session currently talks to.
    pub manager: watch::Receiver<Option<String>>,
    pub shutdown: watch::Receiver<bool>,
    /// The node's named volumes (shared with the session, which reports
    /// them and deletes removed ones).
    pub volumes: Arc<crate::volume::Volumes>,
    /// `--userns-remap`: every task in a user namespace over this range.
    pub userns: Option<crate::userns::IdMap>,
}

/// One task this node runs: the controller's handle.
struct Local {
    desired: watch::Sender<String>,
}

#[derive(Clone)]
struct Ctx {
    node_id: u64,
    data_dir: PathBuf,
    shoal_bin: PathBuf,
    tls: Arc<Trust>,
    executor: Arc<LinuxExecutor>,
    stop_grace: Duration,
    overlay: Option<Arc<Overlay>>,
    manager: watch::Receiver<Option<String>>,
    reports: mpsc::UnboundedSender<TaskStatus>,
    /// One image fetch at a time per image.
    fetching: Arc<tokio::sync::Mutex<()>>,
    /// `DATA/taskdata` is a tmpfs: secrets may be written there.
    secrets_on_tmpfs: bool,
    volumes: Arc<crate::volume::Volumes>,
    userns: Option<crate::userns::IdMap>,
}

fn status(task: &str, state: &str, message: &str) -> TaskStatus {
    TaskStatus { task_id: task.into(), state: state.into(), message: message.into(), ..Default::default() }
}

impl Worker {
    pub(crate) async fn run(self) {
        // Secrets and configs live on a tmpfs: never on the node's disk.
        let taskdata = self.data_dir.join("taskdata");
        let secrets_on_tmpfs = match crate::mounts::ensure_tmpfs(&taskdata, 64) {
            Ok(mounted) => {
                if mounted {
                    tracing::info!(dir = %taskdata.display(), "tmpfs mounted for task secrets and configs");
                }
                true
            }
            Err(e) => {
                tracing::warn!(dir = %taskdata.display(), error = %e, "no tmpfs for task secrets and configs: tasks that use them are rejected");
                false
            }
        };
        let (reports, rx) = mpsc::unbounded_channel();
        let ctx = Ctx {
            node_id: self.node_id,
            data_dir: self.data_dir.clone(),
            shoal_bin: self.shoal_bin.clone(),
            tls: self.tls.clone(),
            executor: self.executor.clone(),
            stop_grace: self.stop_grace,
            overlay: self.overlay.clone(),
            manager: self.manager.clone(),
            reports,
            fetching: Default::default(),
            secrets_on_tmpfs,
            volumes: self.volumes.clone(),
            userns: self.userns,
        };
        tokio::spawn(report_loop(ctx.clone(), rx, self.shutdown.clone()));
        let mut tasks: HashMap<String, Local> = HashMap::new();
        let mut manager = self.manager.clone();
        let mut shutdown = self.shutdown.clone();
        loop {
            let addr = manager.borrow_and_update().clone();
            if let Some(addr) = addr {
                match self.follow(&ctx, &addr, &mut tasks, &mut manager, &mut shutdown).await {
                    Ok(()) => {}
                    Err(e) => tracing::debug!(manager = %addr, error = %e, "assignment stream ended"),
                }
            }
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                _ = manager.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn follow(
        &self,
        ctx: &Ctx,
        addr: &str,
        tasks: &mut HashMap<String, Local>,
        manager: &mut watch::Receiver<Option<String>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let channel = self.tls.shared_channel(addr).map_err(|e| e.to_string())?;
        let mut stream = DispatcherClient::new(channel)
            .max_decoding_message_size(64 << 20)
            // What it has already: a reconnect is sent those tasks' states,
            // not their specs and secrets again.
            .assignments(AssignmentsRequest { node_id: self.node_id, known: tasks.keys().cloned().collect() })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        // The tasks of a whole set that arrives in several messages.
        let mut whole: std::collections::HashSet<String> = std::collections::HashSet::new();
        loop {
            let msg = tokio::select! {
                m = stream.message() => m.map_err(|s| s.message().to_string())?,
                _ = manager.changed() => return Ok(()),
                _ = shutdown.changed() => return Ok(()),
            };
            let Some(msg) = msg else { return Ok(()) };
            for a in msg.updated {
                if msg.full {
                    whole.insert(a.task_id.clone());
                }
                match tasks.get(&a.task_id) {
                    Some(local) => {
                        local.desired.send_if_modified(|d| {
                            let changed = *d != a.desired_state;
                            *d = a.desired_state.clone();
                            changed
                        });
                    }
                    // Only the state of a task this agent should have had:
                    // a new stream will send it whole.
                    None if a.spec.is_none() => {
                        tracing::warn!(task = %a.task_id, service = %a.service, "the managers sent only the state of a task this node does not have; reconnecting for its spec");
                        return Err(format!("task {} arrived without its spec", a.task_id));
                    }
                    None => {
                        let (tx, rx) = watch::channel(a.desired_state.clone());
                        tasks.insert(a.task_id.clone(), Local { desired: tx });
                        tokio::spawn(run_task(ctx.clone(), a, rx));
                    }
                }
            }
            let gone: Vec<String> = if msg.full && msg.more {
                continue;
            } else if msg.full {
                let gone = tasks.keys().filter(|id| !whole.contains(*id)).cloned().collect();
                whole.clear();
                gone
            } else {
                msg.removed
            };
            for id in gone {
                if let Some(local) = tasks.remove(&id) {
                    // No longer ours: stop it if it still runs, and clean up.
                    let _ = local.desired.send("removed".into());
                }
            }
            if msg.full {
                cleanup_strays(ctx, tasks.keys().cloned().collect());
            }
        }
    }
}

/// Removes containers this node holds that no assignment names (left over
/// from before a restart, or from tasks removed while we were away).
fn cleanup_strays(ctx: &Ctx, keep: Vec<String>) {
    if let Some(o) = ctx.overlay.clone() {
        let keep = keep.clone();
        tokio::spawn(async move { o.remove_strays(&keep).await });
    }
    let exec = ctx.executor.clone();
    let data_dir = ctx.data_dir.clone();
    let grace = ctx.stop_grace;
    tokio::task::spawn_blocking(move || {
        // Secrets and configs of tasks this node no longer runs.
        if let Ok(rd) = std::fs::read_dir(data_dir.join("taskdata")) {
            for e in rd.flatten() {
                if !keep.iter().any(|k| e.file_name() == k.as_str()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        for id in exec.list().unwrap_or_default() {
            if keep.contains(&id) {
                continue;
            }
            if let Ok(ContainerState::Running) = exec.state(&id) {
                tracing::info!(container = %id, "stopping a container no task claims");
                let _ = exec.shutdown(&id, grace);
            }
            let _ = exec.remove(&id);
        }
    });
}

/// Where a task's secrets and configs live on this node: a root-only
/// directory; each file is bind-mounted read-only into the container
/// (secrets at /run/secrets/NAME, configs at /NAME).
fn task_data_dir(data_dir: &std::path::Path, task: &str) -> PathBuf {
    data_dir.join("taskdata").join(task)
}

/// Writes the task's secrets and configs; returns their mounts.
fn write_task_data(dir: &std::path::Path, data: &[TaskData]) -> Result<Vec<Mount>, String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let mut mounts = Vec::new();
    if data.is_empty() {
        return Ok(mounts);
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for d in data {
        // The managers check names; a name must still never leave `dir`.
        let safe = !d.name.is_empty() && d.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let clean_target = d.target.is_empty()
            || !d.target.contains('\0') && d.target.split('/').skip(usize::from(d.target.starts_with('/'))).all(|c| !c.is_empty() && c != "." && c != "..");
        let destination = match d.kind.as_str() {
            _ if !safe || !clean_target => return Err(format!("invalid {} {:?} (target {:?}) in the assignment", d.kind, d.name, d.target)),
            "secret" if d.target.is_empty() => format!("/run/secrets/{}", d.name),
            "secret" if d.target.starts_with('/') => d.target.clone(),
            "secret" => format!("/run/secrets/{}", d.target),
            "config" if d.target.is_empty() => format!("/{}", d.name),
            "config" if d.target.starts_with('/') => d.target.clone(),
            _ => return Err(format!("invalid {} {:?} (target {:?}) in the assignment", d.kind, d.name, d.target)),
        };
        let path = dir.join(format!("{}-{}", d.kind, d.name));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o444)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        std::io::Write::write_all(&mut f, &d.data).map_err(|e| format!("{}: {e}", path.display()))?;
        mounts.push(Mount::Bind { source: path, destination, read_only: true, seed: false });
    }
    Ok(mounts)
}

/// The task's networks with its addresses, as the overlay takes them.
fn attachments(a: &Assignment) -> Result<Vec<Attachment>, String> {
    let wanted = a.spec.as_ref().map_or(0, |s| s.networks.len());
    if a.networks.len() != wanted {
        return Err(format!("the task names {wanted} networks but the assignment gives addresses on {}", a.networks.len()));
    }
    a.networks
        .iter()
        .map(|n| Attachment::parse(&n.name, &n.id, &n.subnet, &n.address, &n.gateway, n.internal).map_err(|e| e.to_string()))
        .collect()
}

/// The task's `/etc/resolv.conf` (this node's DNS server), `/etc/hostname`
/// and `/etc/hosts`
/// (localhost, and the task's hostname on its first network's address, as
/// Docker writes it), under `DATA/netconf/<task>/`; bind-mounted read-only
/// into the container.
fn write_netconf(
    data_dir: &std::path::Path,
    task: &str,
    hostname: &str,
    atts: &[Attachment],
) -> Result<(PathBuf, PathBuf, PathBuf), shoal_overlay::OverlayError> {
    let dir = data_dir.join("netconf").join(task);
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|source| shoal_overlay::OverlayError::Io { what: format!("writing {}", path.display()), source })?;
        Ok::<_, shoal_overlay::OverlayError>(path)
    };
    // A task on no network has only `lo`: the host's resolvers minus the
    // loopback ones (which would be the task's own), as Docker does.
    let resolv = match Overlay::resolv_conf(atts) {
        Some(r) => r,
        None => host_resolv_conf(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()),
    };
    let resolv = write("resolv.conf", &resolv)?;
    let mut hosts = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if let Some(a) = atts.first() {
        hosts.push_str(&format!("{}\t{hostname}\n", a.address));
    }
    let hosts = write("hosts", &hosts)?;
    let name = write("hostname", &format!("{hostname}\n"))?;
    Ok((resolv, hosts, name))
}

/// The host's `resolv.conf` without nameservers on loopback.
fn host_resolv_conf(host: &str) -> String {
    host.lines()
        .filter(|l| {
            let mut w = l.split_whitespace();
            !(w.next() == Some("nameserver")
                && w.next().and_then(|a| a.parse::<std::net::IpAddr>().ok()).is_some_and(|a| a.is_loopback()))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Takes the task's interfaces and namespace down (its addresses go back
/// to the managers once the task is reported finished).
async fn release_networks(ctx: &Ctx, id: &str, atts: &[Attachment]) {
    if let Some(o) = ctx.overlay.as_ref().filter(|_| !atts.is_empty())
        && let Err(e) = o.detach(id, atts.len()).await
    {
        tracing::warn!(task = %id, error = %e, "could not remove the task's network interfaces");
    }
    if let Err(e) = tokio::fs::remove_dir_all(ctx.data_dir.join("netconf").join(id)).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(task = %id, error = %e, "could not remove the task's resolv.conf, hosts and hostname");
    }
}

fn run_request(a: &Assignment) -> RunRequest {
    let spec = a.spec.clone().unwrap_or_default();
    let limits = spec.limits.unwrap_or_default();
    RunRequest {
        id: a.task_id.clone(),
        image: spec.image.clone(),
        command: spec.args.clone(),
        env: spec.env.clone(),
        user: (!spec.user.is_empty()).then(|| spec.user.clone()),
        workdir: (!spec.workdir.is_empty()).then(|| spec.workdir.clone()),
        hostname: Some(format!("{}-{}", a.service, a.slot)),
        read_only: spec.read_only,
        entrypoint: (!spec.entrypoint.is_empty()).then(|| spec.entrypoint.clone()),
        limits: crate::cgroup::Limits {
            memory_bytes: (limits.memory_bytes > 0).then_some(limits.memory_bytes),
            cpu_micros: (limits.nano_cpus > 0).then_some(limits.nano_cpus / 1000),
            pids: match limits.pids {
                0 => Some(crate::spec::DEFAULT_PIDS_LIMIT),
                n if n < 0 => None,
                n => Some(n as u64),
            },
        },
        security: crate::spec::Security {
            cap_add: spec.cap_add.clone(),
            cap_drop: spec.cap_drop.clone(),
            seccomp: spec.seccomp.clone(),
            ulimits: spec.ulimits.iter().map(|u| (u.name.clone(), u.soft, u.hard)).collect(),
        },
        ..Default::default()
    }
}

/// Drives one task from assigned to a final state.
async fn run_task(ctx: Ctx, a: Assignment, mut desired: watch::Receiver<String>) {
    let id = a.task_id.clone();
    let report = |st: TaskStatus| {
        let _ = ctx.reports.send(st);
    };
    let wants_stop = |d: &watch::Receiver<String>| d.borrow().as_str() != "running";
    let exec = ctx.executor.clone();
    // The id names paths on this node (container, secrets): a bad one from
    // a misbehaving manager must touch nothing.
    if let Err(e) = crate::runtime::validate_id(&id) {
        tracing::warn!(task = %id, error = %e, "assignment refused");
        report(TaskStatus { error: e.to_string(), ..status(&id, "rejected", "invalid task id") });
        return;
    }

    // The task's volumes stay on this node while it lives.
    let _volumes_held = ctx.volumes.hold(
        a.spec.iter().flat_map(|s| &s.mounts).filter(|m| m.r#type == "volume").map(|m| m.source.clone()).collect(),
    );
    let atts = match attachments(&a) {
        Ok(atts) if !atts.is_empty() && ctx.overlay.is_none() => {
            report(TaskStatus { error: "this node runs no overlay: tasks on networks can't run here".into(), ..status(&id, "rejected", "no overlay") });
            return;
        }
        Ok(atts) => atts,
        Err(e) => {
            tracing::warn!(task = %id, error = %e, "assignment refused");
            report(TaskStatus { error: e, ..status(&id, "rejected", "invalid networks") });
            return;
        }
    };

    // Reattach: a container from before an agent restart keeps running.
    let existing = {
        let (exec, id) = (exec.clone(), id.clone());
        tokio::task::spawn_blocking(move || exec.state(&id)).await.ok().and_then(Result::ok)
    };
    match existing {
        Some(ContainerState::Running) => {
            if let Some(o) = ctx.overlay.as_ref().filter(|_| !atts.is_empty())
                && let Err(e) = o.attach(&id, &atts).await
            {
                tracing::warn!(task = %id, error = %e, "could not restore the task's networks");
            }
            tracing::info!(task = %id, service = %a.service, "reattached to running container");
            report(status(&id, "running", "reattached"));
        }
        Some(ContainerState::Exited(_)) | Some(ContainerState::Created) | None => {
            if existing.is_some() {
                let (exec, id) = (exec.clone(), id.clone());
                let _ = tokio::task::spawn_blocking(move || exec.remove(&id)).await;
            }
            if wants_stop(&desired) {
                report(status(&id, "shutdown", "stopped before it started"));
                return;
            }
            report(status(&id, "accepted", "accepted by agent"));
            if let Err(e) = ensure_image(&ctx, &a).await {
                tracing::warn!(task = %id, service = %a.service, error = %e, "task rejected");
                report(TaskStatus { error: e, ..status(&id, "rejected", "image unavailable") });
                return;
            }
            report(status(&id, "preparing", "preparing container"));
            let mut req = run_request(&a);
            req.userns = ctx.userns;
            let mounts = a.spec.as_ref().map_or(&[][..], |s| &s.mounts[..]);
            match crate::volume::resolve_mounts(&ctx.volumes, &ctx.data_dir, mounts, &a.volumes, true) {
                Ok((m, _)) => req.mounts = m,
                Err(e) => {
                    tracing::warn!(task = %id, service = %a.service, error = %e, "task rejected: its mounts can't be made");
                    report(TaskStatus { error: e, ..status(&id, "rejected", "mounts") });
                    return;
                }
            }
            let data_dir = task_data_dir(&ctx.data_dir, &id);
            let written = if a.data.is_empty() || ctx.secrets_on_tmpfs {
                write_task_data(&data_dir, &a.data)
            } else {
                Err("this node has no tmpfs for secrets and configs (see its log): they are never written to disk".to_string())
            };
            match written {
                Ok(mounts) => req.mounts.extend(mounts),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&data_dir);
                    report(TaskStatus { error: e, ..status(&id, "rejected", "secrets and configs") });
                    return;
                }
            }
            // The task's namespace (a task on no network gets the runtime's
            // own, with only `lo`), then its resolv.conf, hosts and hostname.
            let hostname = req.hostname.clone().unwrap_or_default();
            let netns = match ctx.overlay.as_ref().filter(|_| !atts.is_empty()) {
                Some(o) => o.attach(&id, &atts).await.map(Some),
                None => Ok(None),
            };
            let wired = match netns {
                // Files on disk: off the runtime's workers.
                Ok(netns) => {
                    let (dir, task, a) = (ctx.data_dir.clone(), id.clone(), atts.clone());
                    tokio::task::spawn_blocking(move || write_netconf(&dir, &task, &hostname, &a))
                        .await
                        .unwrap_or_else(|e| {
                            Err(shoal_overlay::OverlayError::Io { what: "writing the task's network files".into(), source: std::io::Error::other(e.to_string()) })
                        })
                        .map(|files| (netns, files))
                }
                Err(e) => Err(e),
            };
            match wired {
                Ok((netns, (resolv, hosts, name))) => {
                    req.netns = netns;
                    for (source, destination) in [(resolv, "/etc/resolv.conf"), (hosts, "/etc/hosts"), (name, "/etc/hostname")] {
                        req.mounts.push(Mount::Bind { source, destination: destination.into(), read_only: true, seed: false });
                    }
                }
                Err(e) => {
                    tracing::warn!(task = %id, service = %a.service, error = %e, "task rejected: its networks could not be wired");
                    let _ = std::fs::remove_dir_all(&data_dir);
                    release_networks(&ctx, &id, &atts).await;
                    report(TaskStatus { error: e.to_string(), ..status(&id, "rejected", "networks") });
                    return;
                }
            }
            // Outer mounts before the ones inside them.
            req.mounts.sort_by_key(|m| m.destination().matches('/').count());
            let prep = {
                let exec = exec.clone();
                tokio::task::spawn_blocking(move || exec.prepare(&req)).await
            };
            let failed = match prep {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some((e.to_string(), "rejected")),
                Err(e) => Some((e.to_string(), "failed")),
            };
            if let Some((error, state)) = failed {
                let _ = tokio::fs::remove_dir_all(&data_dir).await;
                release_networks(&ctx, &id, &atts).await;
                report(TaskStatus { error, ..status(&id, state, "preparing failed") });
                return;
            }
            if wants_stop(&desired) {
                let (exec, id2) = (exec.clone(), id.clone());
                let _ = tokio::task::spawn_blocking(move || exec.remove(&id2)).await;
                let _ = tokio::fs::remove_dir_all(&data_dir).await;
                release_networks(&ctx, &id, &atts).await;
                report(status(&id, "shutdown", "stopped before it started"));
                return;
            }
            report(status(&id, "starting", "starting container"));
            let started = {
                let (exec, id) = (exec.clone(), id.clone());
                tokio::task::spawn_blocking(move || exec.start(&id)).await
            };
            if let Err(e) = started.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                let _ = tokio::fs::remove_dir_all(&data_dir).await;
                release_networks(&ctx, &id, &atts).await;
                report(TaskStatus { error: e, ..status(&id, "failed", "starting failed") });
                return;
            }
            let has_health = a.spec.as_ref().is_some_and(|s| !s.health_cmd.is_empty());
            if has_health {
                // As in Swarm: a task with a health check is `starting`
                // until its first check passes (the health loop reports it).
                tracing::info!(task = %id, service = %a.service, slot = a.slot, "task started: waiting for its first health check");
            } else {
                // A task that publishes TCP ports is running (and joins the
                // routing mesh) once it listens on them.
                let ports: Vec<u16> = a
                    .spec
                    .as_ref()
                    .map(|s| s.ports.iter().filter(|p| p.protocol != "udp").filter_map(|p| u16::try_from(p.target).ok()).collect())
                    .unwrap_or_default();
                if let Some(o) = ctx.overlay.as_ref().filter(|_| !ports.is_empty() && !atts.is_empty()) {
                    let closed = o.wait_listening(&id, &ports, LISTEN_WAIT).await;
                    if !closed.is_empty() {
                        tracing::warn!(task = %id, service = %a.service, ports = ?closed, "task started but does not listen on its published target ports: it takes traffic anyway");
                    }
                }
                tracing::info!(task = %id, service = %a.service, slot = a.slot, "task running");
                report(status(&id, "running", "started"));
            }
        }
    }

    // Running: wait for the exit, for the managers to want it stopped, or
    // for the health check to give up on it.
    let waiter = {
        let (exec, id) = (exec.clone(), id.clone());
        tokio::task::spawn_blocking(move || exec.wait(&id, None))
    };
    tokio::pin!(waiter);
    let health = health_loop(ctx.clone(), id.clone(), a.spec.clone().unwrap_or_default());
    tokio::pin!(health);
    let mut unhealthy = None;
    let stopped_by_us = loop {
        if wants_stop(&desired) {
            break true;
        }
        tokio::select! {
            why = &mut health => {
                tracing::warn!(task = %id, service = %a.service, reason = %why, "task unhealthy: stopping it");
                unhealthy = Some(why);
                break true;
            }
            r = &mut waiter => {
                let exit = r.ok().and_then(Result::ok).flatten();
                let (state, msg, err, code) = match exit {
                    Some(s) if s.oom_killed => ("failed", "container exited", "OOM killed: the memory limit was reached".to_string(), Some(s.code)),
                    Some(s) if s.code == 0 => ("complete", "finished", String::new(), Some(0)),
                    Some(s) => ("failed", "container exited", format!("exit code {}", s.code), Some(s.code)),
                    None => ("failed", "container lost", "the container's supervisor went away".to_string(), None),
                };
                tracing::info!(task = %id, service = %a.service, state, error = %err, "task ended");
                release_networks(&ctx, &id, &atts).await;
                report(TaskStatus {
                    error: err,
                    has_exit_code: code.is_some(),
                    exit_code: code.unwrap_or(0),
                    ..status(&id, state, msg)
                });
                break false;
            }
            c = desired.changed() => {
                if c.is_err() {
                    break true;
                }
            }
        }
    };
    if stopped_by_us {
        // Out of DNS and the virtual IPs first, then the signal.
        // The service's --stop-grace-period (the node's default without).
        let grace = a.spec.as_ref().map(|s| s.stop_grace_period_ms).filter(|ms| *ms > 0).map_or(ctx.stop_grace, Duration::from_millis);
        if let Some(o) = ctx.overlay.as_ref().filter(|_| !atts.is_empty() && unhealthy.is_none()) {
            let addrs: Vec<std::net::Ipv4Addr> = atts.iter().map(|a| a.address).collect();
            // The other nodes got the same view from the same leader; a second
            // covers their applying it (an nft transaction) on a loaded host.
            o.wait_out_of_view(&addrs, Duration::from_secs(2), Duration::from_secs(1)).await;
            // Then the connections it still serves get up to the grace
            // period to finish before the signal.
            // No new connection for a second either: a node that applied
            // the view late still sends some (within the grace period).
            let open = o.drain(&id, grace, Duration::from_secs(1).min(grace)).await;
            if open > 0 {
                tracing::info!(task = %id, service = %a.service, open, "grace period over with connections still open: stopping the task");
            }
        }
        let (exec2, id2) = (exec.clone(), id.clone());
        let res = tokio::task::spawn_blocking(move || exec2.shutdown(&id2, grace)).await;
        let code = res.ok().and_then(Result::ok).map(|s| s.code);
        release_networks(&ctx, &id, &atts).await;
        let st = match unhealthy {
            // Failed, not shut down: the restart policy replaces it.
            Some(why) => TaskStatus { error: why, ..status(&id, "failed", "unhealthy") },
            None => {
                tracing::info!(task = %id, service = %a.service, "task shut down");
                status(&id, "shutdown", "shut down")
            }
        };
        report(TaskStatus { has_exit_code: code.is_some(), exit_code: code.unwrap_or(0), ..st });
    }
    // Keep the container (and its logs) until the managers forget the task.
    while desired.borrow().as_str() != "removed" {
        if desired.changed().await.is_err() {
            break;
        }
    }
    let data_dir = task_data_dir(&ctx.data_dir, &id);
    let _ = tokio::task::spawn_blocking(move || exec.remove(&id)).await;
    let _ = tokio::fs::remove_dir_all(data_dir).await;
}

/// Runs the spec's health check inside the task's container (through
/// `shoal internal-exec`, so it is held to what the workload is); reports
/// the task `running` on the first pass, and returns why once it fails
/// `retries` times in a row. Never returns without a health command.
async fn health_loop(ctx: Ctx, task: String, spec: shoal_proto::control::ServiceSpec) -> String {
    if spec.health_cmd.is_empty() {
        return std::future::pending().await;
    }
    let ms = |v: u64, default: u64| Duration::from_millis(if v == 0 { default } else { v });
    let interval = ms(spec.health_interval_ms, 30_000);
    let timeout = ms(spec.health_timeout_ms, 30_000);
    let retries = if spec.health_retries == 0 { 3 } else { spec.health_retries };
    let started = tokio::time::Instant::now();
    let start_period = Duration::from_millis(spec.health_start_period_ms);
    let mut failures = 0u32;
    let mut healthy = false;
    loop {
        tokio::time::sleep(interval).await;
        let check = ["/bin/sh".to_string(), "-c".to_string(), spec.health_cmd.clone()];
        // Docker keeps 4 KiB of a check's output; so do we.
        let why = match crate::service::exec_in_task(&ctx.shoal_bin, &ctx.data_dir, &task, &check, timeout, 4096).await {
            Ok(out) if out.code == 0 => None,
            Ok(out) => {
                let text = String::from_utf8_lossy(if out.stdout.is_empty() { &out.stderr } else { &out.stdout }).trim().to_string();
                let text: String = text.chars().take(200).collect();
                Some(format!("exit code {}{}", out.code, if text.is_empty() { String::new() } else { format!(": {text}") }))
            }
            Err(e) => Some(e.to_string()),
        };
        match why {
            None => {
                if !healthy {
                    healthy = true;
                    tracing::info!(task = %task, "task healthy: running");
                    let _ = ctx.reports.send(status(&task, "running", "healthy"));
                }
                failures = 0;
            }
            Some(_) if started.elapsed() < start_period => {}
            Some(why) => {
                failures += 1;
                tracing::info!(task = %task, failures, retries, reason = %why, "health check failed");
                if failures >= retries {
                    return format!("unhealthy: health check failed {failures} times in a row, last: {why}");
                }
            }
        }
    }
}

/// Makes sure the task's image is in this node's store: fetches its
/// manifest and config from a manager, then only the layers this node
/// lacks, each checked against its digest.
async fn ensure_image(ctx: &Ctx, a: &Assignment) -> Result<(), String> {
    let reference = a.spec.as_ref().map(|s| s.image.clone()).unwrap_or_default();
    let _guard = ctx.fetching.lock().await;
    let have = {
        let (exec, r) = (ctx.executor.clone(), reference.clone());
        tokio::task::spawn_blocking(move || exec.images().get(&r).map(|i| i.manifest_digest)).await
    };
    if let Ok(Ok(digest)) = have {
        // A re-imported tag has a new manifest: fetch that one.
        if a.image_digest.is_empty() || digest == a.image_digest {
            return Ok(());
        }
    }
    if a.image_digest.is_empty() {
        return Err(format!("image {reference:?} is not known to the cluster"));
    }
    let addr = ctx.manager.borrow().clone().ok_or("no manager to fetch the image from")?;
    let mut manifest = Vec::new();
    fetch_blob(ctx, &addr, &a.image_digest, &mut manifest, MAX_MANIFEST).await?;
    let refs = ManifestRefs::parse(&manifest).map_err(|e| e.to_string())?;
    let mut config = Vec::new();
    fetch_blob(ctx, &addr, &refs.config.digest, &mut config, MAX_MANIFEST).await?;

    let tmp_dir = ctx.data_dir.join("tmp");
    tokio::fs::create_dir_all(&tmp_dir).await.map_err(|e| e.to_string())?;
    let (mut fetched, mut bytes) = (0, 0u64);
    let limits = ctx.executor.images().limits();
    for layer in &refs.layers {
        let have = {
            let (exec, d) = (ctx.executor.clone(), layer.digest.clone());
            tokio::task::spawn_blocking(move || exec.images().has_layer(&d)).await.unwrap_or(false)
        };
        if have {
            continue;
        }
        let tmp = tmp_dir.join(format!("layer-{}", a.task_id));
        let res = async {
            let mut f = tokio::fs::File::create(&tmp).await.map_err(|e| e.to_string())?;
            // Layers come uncompressed: the limits bound the download too.
            let limit = limits.layer.min(limits.image.saturating_sub(bytes));
            if layer.size > limit {
                return Err(format!("image {reference}: layer {} is {} bytes, more than the node's limit of {limit} (--max-layer-size, --max-image-size)", layer.digest, layer.size));
            }
            let n = fetch_blob(ctx, &addr, &layer.digest, &mut f, limit).await?;
            f.sync_all().await.map_err(|e| e.to_string())?;
            let (exec, path, d) = (ctx.executor.clone(), tmp.clone(), layer.digest.clone());
            tokio::task::spawn_blocking(move || exec.images().add_layer_tar(&path, &d))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(n)
        }
        .await;
        let _ = tokio::fs::remove_file(&tmp).await;
        bytes += res?;
        fetched += 1;
    }
    let (exec, r) = (ctx.executor.clone(), reference.clone());
    tokio::task::spawn_blocking(move || exec.images().add_image(&r, &manifest, &config))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    tracing::info!(
        image = %reference,
        digest = %a.image_digest,
        layers = refs.layers.len(),
        fetched,
        bytes,
        "image fetched from the managers: {fetched} of {} layers were missing",
        refs.layers.len()
    );
    Ok(())
}

/// Streams blob `digest` from the manager at `addr` into `dst`, checking
/// its digest and that it is at most `limit` bytes; returns its size.
async fn fetch_blob<W: tokio::io::AsyncWrite + Unpin>(
    ctx: &Ctx,
    addr: &str,
    digest: &str,
    dst: &mut W,
    limit: u64,
) -> Result<u64, String> {
    let channel = ctx.tls.channel(addr).map_err(|e| e.to_string())?;
    let mut stream = DispatcherClient::new(channel)
        .max_decoding_message_size(2 << 20)
        .fetch_blob(BlobRef { digest: digest.to_string() })
        .await
        .map_err(|s| format!("fetching image blob {digest}: {}", s.message()))?
        .into_inner();
    let mut hash = <sha2::Sha256 as sha2::Digest>::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.message().await.map_err(|s| s.message().to_string())? {
        size += chunk.data.len() as u64;
        if size > limit {
            return Err(format!("image blob {digest} is larger than {limit} bytes"));
        }
        sha2::Digest::update(&mut hash, &chunk.data);
        dst.write_all(&chunk.data).await.map_err(|e| e.to_string())?;
    }
    dst.flush().await.map_err(|e| e.to_string())?;
    let got = format!("sha256:{}", hex::encode(sha2::Digest::finalize(hash)));
    if got != digest {
        return Err(format!("image blob digest mismatch: expected {digest}, got {got}"));
    }
    Ok(size)
}

/// Sends task reports to the manager in batches; keeps only the latest
/// report per task while the manager is unreachable.
async fn report_loop(ctx: Ctx, mut rx: mpsc::UnboundedReceiver<TaskStatus>, mut shutdown: watch::Receiver<bool>) {
    let pending: Arc<Mutex<Vec<TaskStatus>>> = Default::default();
    loop {
        let first = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => return },
            _ = shutdown.changed() => return,
        };
        let mut batch = vec![first];
        while let Ok(r) = rx.try_recv() {
            batch.push(r);
        }
        {
            let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
            for r in batch {
                // States only move forward, so order within a task matters:
                // keep every report, in order.
                p.push(r);
            }
        }
        loop {
            let batch: Vec<TaskStatus> = pending.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if batch.is_empty() {
                break;
            }
            let addr = ctx.manager.borrow().clone();
            // The connection the heartbeats and streams to this manager use
            // (no handshake per report).
            let channel = match addr {
                Some(addr) => ctx.tls.shared_channel(&addr).map_err(|e| e.to_string()),
                None => Err("no manager".into()),
            };
            let sent = match channel {
                Ok(ch) => DispatcherClient::new(ch)
                    .update_task_status(TaskStatusBatch { node_id: ctx.node_id, statuses: batch.clone() })
                    .await
                    .map_err(|s| s.message().to_string()),
                Err(e) => Err(e),
            };
            match sent {
                Ok(_) => {
                    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                    let n = batch.len().min(p.len());
                    p.drain(..n);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "task report failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
            while let Ok(r) = rx.try_recv() {
                pending.lock().unwrap_or_else(|e| e.into_inner()).push(r);
            }
        }
    }
}
