//! `shoal network create|ls|inspect|rm`: networks services attach to with
//! `--network`. Without `--subnet`, a network gets the next free /24 of
//! 100.64.0.0/10.

use clap::Subcommand;
use serde_json::{json, Value};
use shoal_proto::control::{CreateNetworkRequest, Empty, Network, NetworkRef};

use crate::client::{rpc_err, Ctx};
use crate::output;

#[derive(Subcommand)]
pub enum NetworkCmd {
    /// Create a network.
    Create {
        name: String,
        /// IPv4 network, e.g. 100.64.7.0/24 (default: the next free /24).
        #[arg(long)]
        subnet: Option<String>,
        /// No route out of the network.
        #[arg(long)]
        internal: bool,
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
    },
    /// List networks.
    Ls,
    /// Show one network.
    Inspect { name: String },
    /// Remove networks no service uses.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn network_json(n: &Network) -> Value {
    json!({
        "id": n.id,
        "name": n.name,
        "subnet": n.subnet,
        "gateway": n.gateway,
        "internal": n.internal,
        "labels": n.labels,
        "services": n.services,
        "slices": n.slices.iter().map(|s| (s.node.clone(), s.slices.clone())).collect::<std::collections::BTreeMap<_, _>>(),
        "tasks": n.tasks.iter().map(|t| json!({"task": t.task, "service": t.service, "node": t.node, "address": t.address})).collect::<Vec<_>>(),
        "version": n.version,
        "created_at_ms": n.created_at_ms,
    })
}

pub async fn run(ctx: &Ctx, cmd: NetworkCmd) -> anyhow::Result<()> {
    let mut c = ctx.control().await?;
    match cmd {
        NetworkCmd::Create { name, subnet, internal, labels } => {
            let labels = crate::daemon::parse_labels(&labels)?.into_iter().collect();
            let req = CreateNetworkRequest { name, subnet: subnet.unwrap_or_default(), internal, labels };
            let n = c.create_network(req).await.map_err(rpc_err)?.into_inner();
            match ctx.format {
                output::Format::Json => output::object(ctx.format, &network_json(&n)),
                output::Format::Table => println!("{}", n.name),
            }
        }
        NetworkCmd::Ls => {
            let list = c.list_networks(Empty {}).await.map_err(rpc_err)?.into_inner().networks;
            let rows: Vec<Value> = list.iter().map(network_json).collect();
            output::list(
                ctx.format,
                &rows,
                &[("ID", "id"), ("NAME", "name"), ("SUBNET", "subnet"), ("INTERNAL", "internal"), ("SERVICES", "services")],
            );
        }
        NetworkCmd::Inspect { name } => {
            let n = c.inspect_network(NetworkRef { name }).await.map_err(rpc_err)?.into_inner();
            output::object(ctx.format, &network_json(&n));
        }
        NetworkCmd::Rm { names } => {
            for name in names {
                c.remove_network(NetworkRef { name: name.clone() }).await.map_err(rpc_err)?;
                println!("{name}");
            }
        }
    }
    Ok(())
}
