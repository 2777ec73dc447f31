//! `shoal secret|config create|ls|inspect|rm`: named data that services use
//! with `--secret NAME` (mounted at /run/secrets/NAME) and `--config NAME`
//! (mounted at /NAME). A secret's data never comes back out of the cluster.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::{json, Value};
use shoal_proto::control::{CreateDataRequest, DataListRequest, DataObject, DataRef};

use crate::client::{rpc_err, Ctx};
use crate::output;

#[derive(Subcommand)]
pub enum DataCmd {
    /// Create one from a file, or from stdin with `-`.
    Create {
        name: String,
        file: PathBuf,
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
    },
    /// List them (never their data).
    Ls,
    /// Show one (a config's data too: as text, or as hex when it is not UTF-8).
    Inspect { name: String },
    /// Remove ones no service uses.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn data_json(d: &DataObject) -> Value {
    let mut v = json!({
        "id": d.id,
        "name": d.name,
        "digest": d.digest,
        "size": d.size,
        "labels": d.labels,
        "services": d.services,
        "version": d.version,
        "created_at_ms": d.created_at_ms,
    });
    if d.kind == "config" && !d.data.is_empty() {
        v["data"] = match std::str::from_utf8(&d.data) {
            Ok(text) => json!(text),
            Err(_) => json!({ "hex": hex_encode(&d.data) }),
        };
    }
    v
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The file's bytes, or stdin's for `-`.
fn read_input(file: &PathBuf) -> anyhow::Result<Vec<u8>> {
    let mut data = Vec::new();
    if file.as_os_str() == "-" {
        std::io::stdin().read_to_end(&mut data).context("reading stdin")?;
    } else {
        data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    }
    Ok(data)
}

pub async fn run(ctx: &Ctx, kind: &str, cmd: DataCmd) -> anyhow::Result<()> {
    let mut c = ctx.control().await?;
    match cmd {
        DataCmd::Create { name, file, labels } => {
            let labels = crate::daemon::parse_labels(&labels)?.into_iter().collect();
            let data = read_input(&file)?;
            let req = CreateDataRequest { kind: kind.into(), name, data, labels };
            let d = c.create_data(req).await.map_err(rpc_err)?.into_inner();
            match ctx.format {
                output::Format::Json => output::object(ctx.format, &data_json(&d)),
                output::Format::Table => println!("{}", d.name),
            }
        }
        DataCmd::Ls => {
            let items = c.list_data(DataListRequest { kind: kind.into() }).await.map_err(rpc_err)?.into_inner().items;
            let rows: Vec<Value> = items.iter().map(data_json).collect();
            output::list(ctx.format, &rows, &[("ID", "id"), ("NAME", "name"), ("SIZE", "size"), ("SERVICES", "services")]);
        }
        DataCmd::Inspect { name } => {
            let d = c.inspect_data(DataRef { kind: kind.into(), name }).await.map_err(rpc_err)?.into_inner();
            output::object(ctx.format, &data_json(&d));
        }
        DataCmd::Rm { names } => {
            for name in names {
                c.remove_data(DataRef { kind: kind.into(), name: name.clone() }).await.map_err(rpc_err)?;
                println!("{name}");
            }
        }
    }
    Ok(())
}
