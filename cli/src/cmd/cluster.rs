use clap::{Args, Subcommand};
use serde_json::{json, Value};
use shoal_proto::control::{ClusterStatusResponse, Empty, JoinTokenRequest};

use crate::client::{rpc_err, Ctx};
use crate::output::{self, Format};

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Members, leader, term and commit index.
    Status,
}

#[derive(Args)]
pub struct JoinTokenArgs {
    /// worker or manager
    #[arg(value_parser = ["worker", "manager"])]
    role: String,
    /// Replace the token; the old one stops admitting nodes.
    #[arg(long)]
    rotate: bool,
}

pub async fn run(ctx: &Ctx, cmd: ClusterCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Status => status(ctx).await,
    }
}

fn status_json(s: &ClusterStatusResponse) -> Value {
    json!({
        "leader": s.leader,
        "leader_id": s.leader_id,
        "term": s.term,
        "commit_index": s.commit_index,
        "members": s.members.iter().map(|m| json!({
            "id": m.id, "name": m.name, "address": m.address, "voter": m.voter, "reachable": m.reachable,
        })).collect::<Vec<_>>(),
        "answered_by": s.answered_by,
        "last_applied": s.last_applied,
        "snapshot_index": s.snapshot_index,
        "log_first_index": s.log_first_index,
        "log_last_index": s.log_last_index,
    })
}

async fn status(ctx: &Ctx) -> anyhow::Result<()> {
    let s = ctx.control().await?.cluster_status(Empty {}).await.map_err(rpc_err)?.into_inner();
    let v = status_json(&s);
    match ctx.format {
        Format::Json => output::object(Format::Json, &v),
        Format::Table => {
            println!("leader: {}  term: {}  commit index: {}", s.leader, s.term, s.commit_index);
            println!(
                "log on {}: entries {}..{}, snapshot at {}",
                s.answered_by, s.log_first_index, s.log_last_index, s.snapshot_index
            );
            println!();
            let rows: Vec<Value> = v["members"].as_array().cloned().unwrap_or_default();
            output::list(
                Format::Table,
                &rows,
                &[("ID", "id"), ("NAME", "name"), ("ADDRESS", "address"), ("VOTER", "voter"), ("REACHABLE", "reachable")],
            );
        }
    }
    Ok(())
}

pub async fn join_token(ctx: &Ctx, a: JoinTokenArgs) -> anyhow::Result<()> {
    let t = ctx
        .control()
        .await?
        .join_token(JoinTokenRequest { role: a.role, rotate: a.rotate })
        .await
        .map_err(rpc_err)?
        .into_inner();
    match ctx.format {
        Format::Json => println!("{}", json!({ "token": t.token })),
        Format::Table => println!("{}", t.token),
    }
    Ok(())
}
