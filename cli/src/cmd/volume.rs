//! `shoal volume create|ls|inspect|rm|prune`: named volumes (local driver).
//! A volume is a cluster-wide object; its data lives on each node that ran
//! a task mounting it, and `ls`/`inspect` say which nodes and how much.

use anyhow::{anyhow, bail};
use clap::Subcommand;
use serde_json::{Value, json};
use shoal_proto::control::{CreateVolumeRequest, Empty, RemoveVolumeRequest, Volume, VolumeRef};

use crate::client::{Ctx, rpc_err};
use crate::output;

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (a task that names a missing volume creates it too).
    Create {
        /// Volume name (default: a random one).
        name: Option<String>,
        /// Only `local`.
        #[arg(long, short = 'd', default_value = "local")]
        driver: String,
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
        /// Local driver options, handed to mount(2) on each node: type=,
        /// device=, o= (e.g. --opt type=tmpfs --opt device=tmpfs --opt o=size=64m).
        #[arg(long = "opt", short = 'o', value_name = "K=V")]
        opts: Vec<String>,
    },
    /// List volumes, with the nodes that hold their data.
    Ls,
    /// Show volumes.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove volumes no service uses; their data is deleted on every node.
    Rm {
        /// Also when a node holding the data is down (it deletes the data
        /// when it returns).
        #[arg(long, short)]
        force: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove every volume no service uses.
    Prune {
        /// Don't ask for confirmation.
        #[arg(long, short)]
        force: bool,
    },
}

fn volume_json(v: &Volume) -> Value {
    json!({
        "id": v.id,
        "name": v.name,
        "driver": v.driver,
        "labels": v.labels,
        "options": v.options,
        "nodes": v.nodes.iter().map(|n| n.node.clone()).collect::<Vec<_>>(),
        "node_sizes": v.nodes.iter().map(|n| json!({"node": n.node, "node_id": n.node_id, "size": n.size, "updated_at_ms": n.updated_at_ms})).collect::<Vec<_>>(),
        "size": v.size,
        "services": v.services,
        "version": v.version,
        "created_at_ms": v.created_at_ms,
    })
}

/// 1536 → "1.5KiB".
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes}B") } else { format!("{v:.1}{}", UNITS[u]) }
}

fn parse_kv(flag: &str, items: &[String]) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let mut out = std::collections::HashMap::new();
    for i in items {
        let (k, v) = i.split_once('=').ok_or_else(|| anyhow!("invalid --{flag} {i:?}: expected KEY=VALUE"))?;
        if k.is_empty() {
            bail!("invalid --{flag} {i:?}: empty key");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

pub async fn run(ctx: &Ctx, cmd: VolumeCmd) -> anyhow::Result<()> {
    let mut c = ctx.control().await?;
    match cmd {
        VolumeCmd::Create { name, driver, labels, opts } => {
            let name = match name {
                Some(n) => n,
                None => shoal_agent::image::random_hex(16),
            };
            let req = CreateVolumeRequest {
                name,
                driver,
                labels: crate::daemon::parse_labels(&labels)?.into_iter().collect(),
                options: parse_kv("opt", &opts)?,
            };
            let v = c.create_volume(req).await.map_err(rpc_err)?.into_inner();
            match ctx.format {
                output::Format::Json => output::object(ctx.format, &volume_json(&v)),
                output::Format::Table => println!("{}", v.name),
            }
        }
        VolumeCmd::Ls => {
            let list = c.list_volumes(Empty {}).await.map_err(rpc_err)?.into_inner().volumes;
            match ctx.format {
                output::Format::Json => output::list(ctx.format, &list.iter().map(volume_json).collect::<Vec<_>>(), &[]),
                output::Format::Table => {
                    let rows: Vec<Value> = list
                        .iter()
                        .map(|v| {
                            json!({
                                "name": v.name,
                                "driver": v.driver,
                                "nodes": v.nodes.iter().map(|n| format!("{} ({})", n.node, human(n.size))).collect::<Vec<_>>(),
                                "size": human(v.size),
                                "services": v.services,
                                "labels": v.labels,
                            })
                        })
                        .collect();
                    output::list(
                        ctx.format,
                        &rows,
                        &[("NAME", "name"), ("DRIVER", "driver"), ("NODES", "nodes"), ("SIZE", "size"), ("SERVICES", "services"), ("LABELS", "labels")],
                    );
                }
            }
        }
        VolumeCmd::Inspect { names } => {
            let mut out = Vec::new();
            for name in names {
                out.push(volume_json(&c.inspect_volume(VolumeRef { name }).await.map_err(rpc_err)?.into_inner()));
            }
            if out.len() == 1 {
                output::object(ctx.format, &out[0]);
            } else {
                output::object(ctx.format, &Value::Array(out));
            }
        }
        VolumeCmd::Rm { force, names } => {
            for name in names {
                c.remove_volume(RemoveVolumeRequest { name: name.clone(), force }).await.map_err(rpc_err)?;
                println!("{name}");
            }
        }
        VolumeCmd::Prune { force } => {
            if !force {
                use std::io::{BufRead, Write};
                eprint!("WARNING! This will remove every volume no service uses, and its data on every node.\nAre you sure you want to continue? [y/N] ");
                std::io::stderr().flush()?;
                let mut answer = String::new();
                std::io::stdin().lock().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    bail!("prune cancelled");
                }
            }
            let removed = c.prune_volumes(Empty {}).await.map_err(rpc_err)?.into_inner().volumes;
            match ctx.format {
                output::Format::Json => output::list(ctx.format, &removed.iter().map(volume_json).collect::<Vec<_>>(), &[]),
                output::Format::Table => {
                    if !removed.is_empty() {
                        println!("Deleted Volumes:");
                    }
                    for v in &removed {
                        println!("{}", v.name);
                    }
                    println!("Total reclaimed space: {}", human(removed.iter().map(|v| v.size).sum()));
                }
            }
        }
    }
    Ok(())
}
