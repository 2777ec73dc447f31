use clap::{Args, Subcommand};
use serde_json::{json, Value};
use shoal_proto::control::{ClusterSettings, ClusterStatusResponse, Empty, JoinTokenRequest, UpdateClusterRequest};

use crate::client::{rpc_err, Ctx};
use crate::output::{self, Format};

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Members, leader, term and commit index, and the cluster's settings.
    Status,
    /// Change cluster-wide settings.
    Update {
        /// How long node certificates are valid (e.g. 24h, 90d); nodes
        /// renew theirs at two thirds of it, and at once when theirs
        /// outlives the new setting.
        #[arg(long, value_name = "DURATION")]
        cert_expiry: Option<String>,
    },
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
        ClusterCmd::Update { cert_expiry } => update(ctx, cert_expiry).await,
    }
}

async fn update(ctx: &Ctx, cert_expiry: Option<String>) -> anyhow::Result<()> {
    let Some(e) = cert_expiry else {
        anyhow::bail!("nothing to update: give --cert-expiry");
    };
    let d = crate::cmd::service::parse_duration("--cert-expiry", &e)?;
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
    let s = ctx.control().await?.update_cluster(UpdateClusterRequest { cert_expiry_ms: ms }).await.map_err(rpc_err)?.into_inner();
    match ctx.format {
        Format::Json => output::object(Format::Json, &settings_json(Some(&s))),
        Format::Table => println!("node certificates are valid for {}s", s.cert_expiry_ms / 1000),
    }
    Ok(())
}

fn settings_json(s: Option<&ClusterSettings>) -> Value {
    json!({ "cert_expiry_s": s.map(|s| s.cert_expiry_ms / 1000) })
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
        "settings": settings_json(s.settings.as_ref()),
    })
}

async fn status(ctx: &Ctx) -> anyhow::Result<()> {
    let s = ctx.control().await?.cluster_status(Empty {}).await.map_err(rpc_err)?.into_inner();
    let v = status_json(&s);
    match ctx.format {
        Format::Json => output::object(Format::Json, &v),
        Format::Table => {
            println!("leader: {}  term: {}  commit index: {}", s.leader, s.term, s.commit_index);
            if let Some(st) = &s.settings {
                println!("node certificates valid for: {}s", st.cert_expiry_ms / 1000);
            }
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
