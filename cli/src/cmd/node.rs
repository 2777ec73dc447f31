use clap::Subcommand;
use serde_json::{json, Value};
use shoal_proto::control::{Empty, Node, NodeRef, RemoveNodeRequest, UpdateNodeRequest};

use crate::client::{rpc_err, Ctx};
use crate::output;

#[derive(Subcommand)]
pub enum NodeCmd {
    /// List nodes.
    Ls,
    /// Show one node.
    Inspect { node: String },
    /// Remove a node that is down (or with --force, one that is not).
    Rm {
        node: String,
        #[arg(long)]
        force: bool,
    },
    /// Make a worker a manager.
    Promote { node: String },
    /// Make a manager a worker.
    Demote { node: String },
    /// Change a node's availability or labels.
    Update {
        node: String,
        #[arg(long, value_parser = ["active", "pause", "drain"])]
        availability: Option<String>,
        #[arg(long = "label-add", value_name = "K=V")]
        label_add: Vec<String>,
        #[arg(long = "label-rm", value_name = "K")]
        label_rm: Vec<String>,
    },
}

pub fn node_json(n: &Node) -> Value {
    json!({
        "id": n.id,
        "name": n.name,
        "role": n.role,
        "status": n.status,
        "availability": n.availability,
        "leader": n.leader,
        // Managers: whether the leader hears from it (Docker's MANAGER
        // STATUS); workers are not Raft members.
        "reachable": n.reachable,
        "manager_status": match (n.role.as_str(), n.leader, n.reachable) {
            ("manager", true, _) => "leader",
            ("manager", false, true) => "reachable",
            ("manager", false, false) => "unreachable",
            _ => "",
        },
        "address": n.address,
        "labels": n.labels,
        "nano_cpus": n.nano_cpus,
        "memory_bytes": n.memory_bytes,
        "version": n.version,
        "created_at_ms": n.created_at_ms,
        "updated_at_ms": n.updated_at_ms,
    })
}

pub async fn run(ctx: &Ctx, cmd: NodeCmd) -> anyhow::Result<()> {
    let mut c = ctx.control().await?;
    match cmd {
        NodeCmd::Ls => {
            let nodes = c.list_nodes(Empty {}).await.map_err(rpc_err)?.into_inner().nodes;
            let rows: Vec<Value> = nodes.iter().map(node_json).collect();
            output::list(
                ctx.format,
                &rows,
                &[
                    ("ID", "id"),
                    ("NAME", "name"),
                    ("ROLE", "role"),
                    ("STATUS", "status"),
                    ("AVAILABILITY", "availability"),
                    ("MANAGER STATUS", "manager_status"),
                    ("ADDRESS", "address"),
                    ("LABELS", "labels"),
                ],
            );
        }
        NodeCmd::Inspect { node } => {
            let n = c.inspect_node(NodeRef { node }).await.map_err(rpc_err)?.into_inner();
            output::object(ctx.format, &node_json(&n));
        }
        NodeCmd::Rm { node, force } => {
            c.remove_node(RemoveNodeRequest { node: node.clone(), force }).await.map_err(rpc_err)?;
            println!("{node}");
        }
        NodeCmd::Promote { node } => {
            let n = c.promote_node(NodeRef { node }).await.map_err(rpc_err)?.into_inner();
            println!("node {} is now a {}", n.name, n.role);
        }
        NodeCmd::Demote { node } => {
            let n = c.demote_node(NodeRef { node }).await.map_err(rpc_err)?.into_inner();
            println!("node {} is now a {}", n.name, n.role);
        }
        NodeCmd::Update { node, availability, label_add, label_rm } => {
            let mut adds = std::collections::HashMap::new();
            for kv in label_add {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("invalid label {kv:?}: expected KEY=VALUE"))?;
                adds.insert(k.to_string(), v.to_string());
            }
            let n = c
                .update_node(UpdateNodeRequest {
                    node,
                    availability: availability.unwrap_or_default(),
                    label_add: adds,
                    label_rm,
                })
                .await
                .map_err(rpc_err)?
                .into_inner();
            println!("{}", n.name);
        }
    }
    Ok(())
}
