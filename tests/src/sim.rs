//! Simulated agents: many real nodes in one process, without containers.
//! Each joins with the worker token (CSR, certificate), heartbeats with the
//! period and jitter the managers ask for, follows the leader, reads its
//! assignment stream (resuming with the tasks it has after a reconnect),
//! runs its tasks in a `SimExecutor` (the agent's executor seam, no
//! containers) and reports what it says at once. The managers can't
//! tell them from real agents; the scale test and the `agents` benchmark
//! run thousands of them on this machine's two cores.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::dispatcher::dispatcher_client::DispatcherClient;
use shoal_agent::executor::{ContainerState, Executor, SimExecutor};
use shoal_agent::spec::RunRequest;
use shoal_proto::dispatcher::{Assignment, AssignmentsRequest, HeartbeatRequest, Resources, TaskStatus, TaskStatusBatch};
use shoal_proto::join::JoinRequest;
use shoal_proto::join::join_client::JoinClient;
use shoal_security::pki;
use shoal_security::tls::NodeTls;
use tokio::sync::watch;

/// A joined simulated node.
pub struct SimNode {
    pub id: u64,
    pub tls: NodeTls,
    pub managers: Vec<String>,
    /// Present an overlay identity (a WireGuard key and endpoint, unique
    /// per node; no data plane behind it), so the managers send it peers
    /// as they do a real agent; `Some(true)`: it accepts peer deltas.
    pub overlay: Option<bool>,
}

/// Bytes of overlay peers (encoded `Peer` messages) the simulated nodes of
/// this process received in heartbeat answers.
pub static PEER_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Node `i`'s overlay identity: a base64 32-byte key and an endpoint, both
/// unique to it.
fn overlay_identity(i: u64) -> (String, String) {
    let mut key = [0x5au8; 32];
    key[..8].copy_from_slice(&i.to_be_bytes());
    (shoal_overlay::keys::encode_key(&key), format!("198.19.{}.{}:51820", (i >> 8) & 255, i & 255))
}

/// Joins as worker `sim-{i}` through `manager`.
pub async fn join(manager: &str, token: &str, ca_pem: &str, i: u64) -> anyhow::Result<SimNode> {
    let (csr, key_pem) = pki::new_csr()?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .domain_name(pki::CLUSTER_DNS_NAME);
    let channel = shoal_security::tls::endpoint(manager)?.tls_config(tls)?.connect().await?;
    let resp = JoinClient::new(channel)
        .join(JoinRequest {
            token: token.to_string(),
            csr_pem: csr,
            node_name: format!("sim-{i}"),
            advertise_addr: format!("198.18.1.1:{}", 10000 + i),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(SimNode { id: resp.node_id, tls: NodeTls { ca_pem: resp.ca_pem, cert_pem: resp.cert_pem, key_pem }, managers: resp.managers, overlay: None })
}

/// Runs node `n` until the future is dropped (a dead node: aborting its
/// task stops it all): heartbeats, follows its assignments and reports on
/// its tasks.
pub async fn run(n: SimNode) -> anyhow::Result<()> {
    let trust = shoal_security::Trust::new(n.tls)?;
    let first = n.managers.first().cloned().ok_or_else(|| anyhow::anyhow!("the join named no manager"))?;
    let (current_tx, current) = watch::channel(first);
    tokio::select! {
        () = heartbeats(trust.clone(), n.id, n.managers, current_tx, n.overlay) => Ok(()),
        r = follow(trust, n.id, current) => r,
    }
}

/// Heartbeats forever; `current` names the manager that answered last
/// (the leader, or one to try next).
async fn heartbeats(trust: Arc<shoal_security::Trust>, node_id: u64, mut managers: Vec<String>, current: watch::Sender<String>, overlay: Option<bool>) {
    let (overlay_key, overlay_endpoint) = overlay.map(|_| overlay_identity(node_id)).unwrap_or_default();
    let mut peers_version = 0;
    let res = Resources { nano_cpus: 2_000_000_000, memory_bytes: 1 << 30 };
    let mut managers_version = 0;
    let mut idx = 0usize;
    let mut target = current.borrow().clone();
    let mut rng = node_id | 1;
    loop {
        // One connection per manager for everything, kept through errors,
        // as the real agent keeps it.
        let channel = match trust.shared_channel(&target) {
            Ok(c) => c,
            Err(_) => {
                idx += 1;
                target = managers.get(idx % managers.len().max(1)).cloned().unwrap_or_default();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let call = async {
            let mut c = DispatcherClient::new(channel);
            let r = c
                .heartbeat(HeartbeatRequest {
                    node_id,
                    resources: Some(res),
                    managers_version,
                    overlay_key: overlay_key.clone(),
                    overlay_endpoint: overlay_endpoint.clone(),
                    peers_version,
                    accepts_peer_deltas: overlay == Some(true),
                    ..Default::default()
                })
                .await;
            anyhow::Ok(r)
        };
        let wait = match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(Ok(r))) => {
                let r = r.into_inner();
                if !r.managers.is_empty() {
                    managers = r.managers;
                    managers_version = r.managers_version;
                }
                if r.peers_changed {
                    use prost::Message;
                    let bytes: usize = r.peers.iter().map(|p| p.encoded_len()).sum::<usize>() + r.peers_removed.len() * 8;
                    PEER_BYTES.fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
                    peers_version = r.peers_version;
                }
                current.send_if_modified(|c| std::mem::replace(c, target.clone()) != target);
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let period = Duration::from_millis(r.period_ms.clamp(100, 10_000));
                period - (period / 4).mul_f64((rng % 1024) as f64 / 1024.0)
            }
            Ok(Ok(Err(st))) => {
                match st.metadata().get("shoal-leader").and_then(|v| v.to_str().ok()) {
                    Some(l) if !l.is_empty() && l != target => target = l.to_string(),
                    _ => {
                        idx += 1;
                        target = managers.get(idx % managers.len().max(1)).cloned().unwrap_or_default();
                    }
                }
                Duration::from_millis(100)
            }
            _ => {
                idx += 1;
                target = managers.get(idx % managers.len().max(1)).cloned().unwrap_or_default();
                Duration::from_millis(200)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Follows the assignment stream of the current manager and runs each
/// task in the node's [`SimExecutor`] (the agent's executor seam, with no
/// containers behind it): prepared and started while desired running, shut
/// down and removed when told to stop or when the task is gone. Reports
/// what the executor says (`running`; `complete` or `failed` with the exit
/// code for a task whose simulated command exits, `rejected` for one that
/// can't start: a service of `fail` or `exit N` simulates those), retrying
/// reports that fail until one is taken.
async fn follow(trust: Arc<shoal_security::Trust>, node_id: u64, mut current: watch::Receiver<String>) -> anyhow::Result<()> {
    let exec = SimExecutor::new();
    // What this node holds: task → the status it reported (or will).
    let mut tasks: HashMap<String, TaskStatus> = HashMap::new();
    let mut unreported: HashMap<String, TaskStatus> = HashMap::new();
    loop {
        let addr = current.borrow_and_update().clone();
        let channel = trust.shared_channel(&addr);
        let streamed = async {
            let channel = channel?;
            let mut stream = DispatcherClient::new(channel.clone())
                .max_decoding_message_size(64 << 20)
                .assignments(AssignmentsRequest { node_id, known: tasks.keys().cloned().collect() })
                .await?
                .into_inner();
            let mut reports = DispatcherClient::new(channel);
            let mut whole: HashSet<String> = HashSet::new();
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m?,
                    _ = current.changed() => return anyhow::Ok(()),
                    // Retry reports that failed (a leader change).
                    _ = tokio::time::sleep(Duration::from_millis(500)), if !unreported.is_empty() => None,
                };
                if let Some(msg) = msg {
                    for a in msg.updated {
                        if msg.full {
                            whole.insert(a.task_id.clone());
                        }
                        // A task that ended on its own (failed, complete,
                        // rejected) keeps that state: the managers take no
                        // later "shutdown" for it.
                        if tasks.get(&a.task_id).is_some_and(|s| s.state != "running") {
                            if a.desired_state != "running" {
                                stop(&exec, &a.task_id);
                            }
                            continue;
                        }
                        let status = apply(&exec, &a);
                        if tasks.get(&a.task_id).map(|s| &s.state) != Some(&status.state) {
                            tasks.insert(a.task_id.clone(), status.clone());
                            unreported.insert(a.task_id, status);
                        }
                    }
                    let gone: Vec<String> = if msg.full && !msg.more {
                        let gone = tasks.keys().filter(|t| !whole.contains(*t)).cloned().collect();
                        whole.clear();
                        gone
                    } else {
                        msg.removed
                    };
                    for t in gone {
                        stop(&exec, &t);
                        tasks.remove(&t);
                        unreported.remove(&t);
                    }
                }
                if !unreported.is_empty() {
                    let statuses = unreported.values().cloned().collect();
                    if reports.update_task_status(TaskStatusBatch { node_id, statuses }).await.is_ok() {
                        unreported.clear();
                    }
                }
            }
        };
        if streamed.await.is_err() {
            // The manager went away: the heartbeats find the next one.
            tokio::select! {
                _ = current.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
        }
    }
}

/// Brings task `a` to its desired state in `exec`; the status to report.
fn apply(exec: &SimExecutor, a: &Assignment) -> TaskStatus {
    let id = a.task_id.clone();
    if a.desired_state != "running" {
        stop(exec, &id);
        return TaskStatus { task_id: id, state: "shutdown".into(), ..Default::default() };
    }
    let started = match exec.state(&id) {
        Ok(_) => Ok(()),
        Err(_) => {
            let command = a.spec.as_ref().map(|s| s.args.clone()).unwrap_or_default();
            exec.prepare(&RunRequest { id: id.clone(), command, ..Default::default() }).and_then(|()| exec.start(&id))
        }
    };
    match (started, exec.state(&id)) {
        (Err(e), _) => TaskStatus { task_id: id, state: "rejected".into(), error: e.to_string(), ..Default::default() },
        (Ok(()), Ok(ContainerState::Exited(st))) => TaskStatus {
            task_id: id,
            state: if st.code == 0 { "complete" } else { "failed" }.into(),
            has_exit_code: true,
            exit_code: st.code,
            ..Default::default()
        },
        (Ok(()), _) => TaskStatus { task_id: id, state: "running".into(), ..Default::default() },
    }
}

/// Shuts task `id` down and removes it, if the executor holds it.
fn stop(exec: &SimExecutor, id: &str) {
    if exec.shutdown(id, Duration::ZERO).is_ok() {
        // Exited now, so removal can't be refused.
        let _ = exec.remove(id);
    }
}
