//! `service logs`: a manager fans in the output of a service's tasks from
//! the agents that run them, line by line, prefixed by task and node.

use std::collections::HashSet;
use std::sync::Arc;

use shoal_proto::agent::agent_client::AgentClient;
use shoal_proto::agent::TaskLogsRequest;
use shoal_proto::control::LogLine;
use tokio::sync::mpsc;
use tonic::Status;

use crate::manager::Manager;
use crate::store::task::TaskObj;
use crate::store::{ApplyError, Change, State};

/// A task by id, unique id prefix, or `SERVICE.SLOT` (the live task of
/// that slot).
pub fn resolve_task<'a>(s: &'a State, what: &str) -> Result<&'a TaskObj, ApplyError> {
    if let Some(t) = s.tasks.get(what) {
        return Ok(t);
    }
    if let Some((svc, slot)) = what.rsplit_once('.') {
        if let Ok(slot) = slot.parse::<u64>() {
            let live = s
                .tasks
                .values()
                .filter(|t| t.service_name == svc && t.slot == slot)
                .max_by_key(|t| (t.desired_state == crate::store::task::TaskState::Running, t.created_at_ms));
            if let Some(t) = live {
                return Ok(t);
            }
        }
    }
    let mut by_prefix = s.tasks.values().filter(|t| !what.is_empty() && t.id.starts_with(what));
    match (by_prefix.next(), by_prefix.next()) {
        (Some(t), None) => Ok(t),
        (Some(_), Some(_)) => Err(ApplyError::Ambiguous { kind: "task".into(), what: what.into() }),
        _ => Err(ApplyError::NotFound { kind: "task".into(), what: what.into() }),
    }
}

/// Streams the logs of every task of `service_id` into `tx`. With
/// `follow`, keeps going — picking up tasks that start later — until the
/// client goes away; a task or node that goes away only ends its own part.
pub async fn stream_service(
    manager: Arc<Manager>,
    service_id: String,
    follow: bool,
    tx: mpsc::Sender<Result<LogLine, Status>>,
) {
    let mut events = manager.store.watch();
    let mut started: HashSet<String> = HashSet::new();
    let mut parts = tokio::task::JoinSet::new();
    loop {
        let tasks: Vec<(String, String, String, (String, String))> = manager.store.read(|s| {
            s.service_tasks(&service_id)
                .filter(|t| t.state >= crate::store::task::TaskState::Starting)
                .filter_map(|t| {
                    let node = s.nodes.get(&t.node_id?)?;
                    let at = (node.address.clone(), crate::store::state::format_node_id(node.id));
                    Some((t.id.clone(), crate::scheduler::task_name(t), node.name.clone(), at))
                })
                .collect()
        });
        for (id, name, node, addr) in tasks {
            if started.insert(id.clone()) {
                parts.spawn(stream_task(manager.clone(), id, name, node, addr, follow, tx.clone()));
            }
        }
        if !follow {
            while parts.join_next().await.is_some() {}
            return;
        }
        tokio::select! {
            _ = tx.closed() => return,
            ev = events.recv() => {
                let relevant = match ev {
                    Ok(ev) => ev.changes.iter().any(|c| matches!(c, Change::Task(_))),
                    Err(_) => true,
                };
                if !relevant {
                    continue;
                }
            }
            Some(_) = parts.join_next(), if !parts.is_empty() => {}
        }
    }
}

async fn stream_task(
    manager: Arc<Manager>,
    task_id: String,
    name: String,
    node: String,
    (addr, node_id): (String, String),
    follow: bool,
    tx: mpsc::Sender<Result<LogLine, Status>>,
) {
    let Ok(channel) = manager.tls.node_channel(&addr, &node_id) else { return };
    let stream = AgentClient::new(channel)
        .max_decoding_message_size(8 << 20)
        .task_logs(TaskLogsRequest { task_id: task_id.clone(), follow })
        .await;
    let mut stream = match stream {
        Ok(s) => s.into_inner(),
        Err(e) => {
            tracing::debug!(task = %name, node = %node, error = %e.message(), "no logs from agent");
            return;
        }
    };
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let chunk = tokio::select! {
            _ = tx.closed() => return,
            c = stream.message() => c,
        };
        let Ok(Some(chunk)) = chunk else { break };
        partial.extend_from_slice(&chunk.data);
        while let Some(pos) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=pos).collect();
            let msg = LogLine { task: name.clone(), node: node.clone(), data: line };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
        }
    }
    if !partial.is_empty() {
        partial.push(b'\n');
        let _ = tx.send(Ok(LogLine { task: name, node, data: partial })).await;
    }
}
