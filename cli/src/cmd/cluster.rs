use clap::{Args, Subcommand};
use serde_json::{json, Value};
use anyhow::Context;
use shoal_proto::control::{ClusterSettings, ClusterStatusResponse, Empty, JoinTokenRequest, UnlockKeyRequest, UnlockRequest, UpdateClusterRequest};

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
        /// Autolock: a restarted manager stays locked until `shoal cluster
        /// unlock` is given the unlock key this prints.
        #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
        autolock: Option<bool>,
    },
    /// Give a locked manager (autolock) its unlock key, read from stdin.
    Unlock,
    /// Rotate the cluster CA: a new CA signs from now on, cross-signed by
    /// the old so the cluster keeps working; this CLI's identity is renewed
    /// on the way. Other client identities run `client-cert renew` before
    /// the rotation can complete.
    Ca {
        #[arg(long, required = true)]
        rotate: bool,
    },
    /// Show autolock's unlock key, or make a new one.
    UnlockKey {
        #[arg(long)]
        rotate: bool,
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
        ClusterCmd::Update { cert_expiry, autolock } => update(ctx, cert_expiry, autolock).await,
        ClusterCmd::Unlock => unlock(ctx).await,
        ClusterCmd::Ca { rotate } => rotate_ca(ctx, rotate).await,
        ClusterCmd::UnlockKey { rotate } => unlock_key(ctx, rotate).await,
    }
}

async fn update(ctx: &Ctx, cert_expiry: Option<String>, autolock: Option<bool>) -> anyhow::Result<()> {
    if cert_expiry.is_none() && autolock.is_none() {
        anyhow::bail!("nothing to update: give --cert-expiry or --autolock");
    }
    let mut cert_expiry_ms = 0;
    if let Some(e) = cert_expiry {
        let d = crate::cmd::service::parse_duration("--cert-expiry", &e)?;
        cert_expiry_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
    }
    let s = ctx.control().await?.update_cluster(UpdateClusterRequest { cert_expiry_ms, autolock }).await.map_err(rpc_err)?.into_inner();
    match ctx.format {
        Format::Json => output::object(Format::Json, &settings_json(Some(&s))),
        Format::Table => {
            println!("node certificates are valid for {}s; autolock {}", s.cert_expiry_ms / 1000, if s.autolock { "on" } else { "off" });
            if !s.unlock_key.is_empty() {
                println!("To unlock a manager after it restarts, run `shoal cluster unlock` and give it this key; keep it safe:\n\n    {}", s.unlock_key);
            }
        }
    }
    Ok(())
}

async fn rotate_ca(ctx: &Ctx, rotate: bool) -> anyhow::Result<()> {
    if !rotate {
        anyhow::bail!("give --rotate");
    }
    let r = ctx.control().await?.rotate_ca(Empty {}).await.map_err(rpc_err)?.into_inner();
    crate::cmd::client_cert::renew(ctx, 0).await.context("the CA rotated, but renewing this CLI's identity failed: run `shoal client-cert renew`")?;
    match ctx.format {
        Format::Json => println!("{}", json!({ "ca": r.ca })),
        Format::Table => println!(
            "CA rotation to {} started; this CLI's identity was renewed. `shoal cluster status` shows who still holds a certificate from the old CA.",
            r.ca
        ),
    }
    Ok(())
}

async fn unlock(ctx: &Ctx) -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading the unlock key from stdin")?;
    let key = line.trim();
    shoal_security::at_rest::parse_unlock_key(key)?;
    let mut client = ctx.lock().await?;
    client.unlock(UnlockRequest { unlock_key: key.to_string() }).await.map_err(rpc_err)?;
    if ctx.format == Format::Table {
        println!("manager unlocked");
    }
    Ok(())
}

async fn unlock_key(ctx: &Ctx, rotate: bool) -> anyhow::Result<()> {
    let r = ctx.control().await?.unlock_key(UnlockKeyRequest { rotate }).await.map_err(rpc_err)?.into_inner();
    match ctx.format {
        Format::Json => println!("{}", json!({ "unlock_key": r.unlock_key })),
        Format::Table => println!("{}", r.unlock_key),
    }
    Ok(())
}

fn settings_json(s: Option<&ClusterSettings>) -> Value {
    json!({
        "cert_expiry_s": s.map(|s| s.cert_expiry_ms / 1000),
        "autolock": s.map(|s| s.autolock),
        "unlock_key": s.map(|s| s.unlock_key.clone()).filter(|k| !k.is_empty()),
        "ca": s.map(|s| s.ca.clone()),
        "ca_rotating": s.map(|s| s.ca_rotating),
        "ca_pending": s.map(|s| s.ca_pending.clone()),
    })
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
        "heartbeat_period_ms": s.heartbeat_period_ms,
        "down_after_ms": s.down_after_ms,
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
                "heartbeats every {} ms; a node silent for {} ms is marked down",
                s.heartbeat_period_ms, s.down_after_ms
            );
            if let Some(st) = &s.settings {
                println!("node certificates valid for: {}s  CA: {}  autolock: {}", st.cert_expiry_ms / 1000, st.ca, if st.autolock { "on" } else { "off" });
                if st.ca_rotating {
                    println!("CA rotating; still on the old CA: {}", st.ca_pending.join(", "));
                }
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
