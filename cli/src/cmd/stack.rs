//! `shoal stack deploy|ls|services|ps|rm`: a stack is compose files turned
//! into networks, volumes, secrets, configs and services (`shoal-compose`)
//! that all carry the label `com.docker.stack.namespace=STACK`; every verb
//! but `deploy` finds a stack's objects by that label.
//!
//! `deploy` checks everything it can before it creates anything: the files
//! (file:line errors), each service spec as the managers will, the images,
//! external objects, name clashes, and secrets/configs whose data changed
//! (they are immutable). Then it creates what is missing and updates only
//! the services whose spec differs, as `docker stack deploy` does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::Subcommand;
use serde_json::{json, Value};
use shoal_compose::{Stack, NAMESPACE_LABEL};
use shoal_manager::spec;
use shoal_proto::control::*;

use crate::client::{rpc_err, Ctx};
use crate::cmd::service::TERMINAL;
use crate::output;

#[derive(Subcommand)]
pub enum StackCmd {
    /// Deploy a new stack or update one from compose files.
    Deploy {
        /// A compose file; repeat it to lay later files over earlier ones
        /// (mappings merge, lists and values are replaced).
        #[arg(long = "compose-file", short = 'c', required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Also remove the stack's services that the files no longer have.
        #[arg(long)]
        prune: bool,
        /// Return once the changes are committed, without waiting for the
        /// services to converge.
        #[arg(long, short)]
        detach: bool,
        /// Stack name: lowercase letters, digits and '-'.
        name: String,
    },
    /// List stacks.
    Ls,
    /// List a stack's services.
    Services { name: String },
    /// List the tasks of a stack's services.
    Ps {
        name: String,
        /// Include tasks that have finished.
        #[arg(long, short)]
        all: bool,
    },
    /// Remove stacks: their services, and once their tasks are gone, their
    /// networks, secrets, configs and volumes.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
        /// Keep the stack's volumes (and their data).
        #[arg(long = "keep-volumes")]
        keep_volumes: bool,
    },
}

/// How long `deploy` waits for its services and `rm` for their tasks.
const WAIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Between two looks at the cluster while waiting.
const POLL_EVERY: Duration = Duration::from_millis(100);

fn in_stack(labels: &HashMap<String, String>, stack: &str) -> bool {
    labels.get(NAMESPACE_LABEL).is_some_and(|s| s == stack)
}

fn spec_of(s: &Service) -> &ServiceSpec {
    static EMPTY: std::sync::OnceLock<ServiceSpec> = std::sync::OnceLock::new();
    s.spec.as_ref().unwrap_or_else(|| EMPTY.get_or_init(ServiceSpec::default))
}

fn not_found(name: &str) -> anyhow::Error {
    anyhow!("nothing found in stack: {name}")
}

pub async fn run(ctx: &Ctx, cmd: StackCmd) -> anyhow::Result<()> {
    match cmd {
        StackCmd::Deploy { files, prune, detach, name } => deploy(ctx, &files, prune, detach, &name).await,
        StackCmd::Ls => ls(ctx).await,
        StackCmd::Services { name } => services(ctx, &name).await,
        StackCmd::Ps { name, all } => ps(ctx, &name, all).await,
        StackCmd::Rm { names, keep_volumes } => {
            // Like Docker: every stack is tried; the errors come at the end.
            let mut errors = Vec::new();
            for name in &names {
                if let Err(e) = rm(ctx, name, keep_volumes).await {
                    errors.push(format!("{e:#}"));
                }
            }
            if errors.is_empty() { Ok(()) } else { Err(anyhow!("{}", errors.join("\n"))) }
        }
    }
}

/// What one service needs.
enum ServiceAction {
    Create(ServiceSpec),
    Update { id: String, version: u64, spec: ServiceSpec },
    Unchanged,
}

/// Everything `deploy` will do, decided before it does any of it.
struct Plan<'a> {
    networks: Vec<&'a CreateNetworkRequest>,
    volumes: Vec<&'a CreateVolumeRequest>,
    data: Vec<&'a CreateDataRequest>,
    services: Vec<ServiceAction>,
    /// (id, name) of the stack's services the files no longer have.
    prune: Vec<(String, String)>,
}

/// Whether `current` (as the managers keep it) already is `wanted`: the
/// managers add the mesh's network to a publishing service and may name
/// the image `NAME:latest` for `NAME`.
fn same_spec(current: &ServiceSpec, wanted: &ServiceSpec) -> bool {
    let mut cur = current.clone();
    cur.networks.retain(|n| n != spec::INGRESS_NETWORK);
    let mut want = wanted.clone();
    if cur.image == format!("{}:latest", want.image) {
        want.image = cur.image.clone();
    }
    cur == want
}

fn image_known(images: &[Image], image: &str) -> bool {
    let latest = format!("{image}:latest");
    images.iter().any(|i| i.reference == image || i.reference == latest)
}

async fn plan<'a>(c: &mut crate::client::Client, stack: &'a Stack, prune: bool) -> anyhow::Result<Plan<'a>> {
    let mut plan = Plan { networks: Vec::new(), volumes: Vec::new(), data: Vec::new(), services: Vec::new(), prune: Vec::new() };

    let images = c.list_images(Empty {}).await.map_err(rpc_err)?.into_inner().images;
    for (_, s) in &stack.services {
        if !image_known(&images, &s.image) {
            bail!(
                "service {}: image {:?} not found in the cluster: import it with `shoal image import` or `shoal image load`",
                s.name,
                s.image
            );
        }
    }

    let networks = c.list_networks(Empty {}).await.map_err(rpc_err)?.into_inner().networks;
    for n in &stack.networks {
        let existing = networks.iter().find(|x| x.name == n.name);
        match (existing, n.external) {
            (None, true) => bail!("network {:?} is declared as external, but could not be found: create it first (`shoal network create`)", n.name),
            (Some(_), true) => {}
            (None, false) => plan.networks.push(&n.req),
            (Some(x), false) => {
                if !in_stack(&x.labels, &stack.name) {
                    bail!("network {:?} exists and is not part of stack {}: remove it, or give the network another `name:`", n.name, stack.name);
                }
                if x.internal != n.req.internal || (!n.req.subnet.is_empty() && x.subnet != n.req.subnet) {
                    bail!(
                        "network {:?} exists with other settings (subnet {}, internal {}): a network can't be changed; give it another `name:` or remove the stack first",
                        n.name,
                        x.subnet,
                        x.internal
                    );
                }
            }
        }
    }

    if !stack.volumes.is_empty() {
        let volumes = c.list_volumes(Empty {}).await.map_err(rpc_err)?.into_inner().volumes;
        for v in &stack.volumes {
            let exists = volumes.iter().any(|x| x.name == v.name);
            if v.external && !exists {
                bail!("volume {:?} is declared as external, but could not be found: create it first (`shoal volume create`)", v.name);
            }
            if !v.external && !exists {
                plan.volumes.push(&v.req);
            }
        }
    }

    for (kind, objects) in [("secret", &stack.secrets), ("config", &stack.configs)] {
        if objects.is_empty() {
            continue;
        }
        let items = c.list_data(DataListRequest { kind: kind.into() }).await.map_err(rpc_err)?.into_inner().items;
        for d in objects {
            match (items.iter().find(|x| x.name == d.name), d.external) {
                (None, true) => bail!("{kind} {:?} is declared as external, but could not be found: create it first (`shoal {kind} create`)", d.name),
                (Some(_), true) => {}
                (None, false) => plan.data.push(&d.req),
                (Some(x), false) => {
                    if x.digest != d.digest() {
                        bail!(
                            "{kind} {:?} exists with other data: {kind}s are immutable; give the new one another name (`name:` under `{kind}s.{}`) or remove the stack first",
                            d.name,
                            d.key
                        );
                    }
                }
            }
        }
    }

    let current = c.list_services(Empty {}).await.map_err(rpc_err)?.into_inner().services;
    // A published port another service holds would fail that service's
    // create after the rest was made: refused here, before anything is.
    let ours: HashSet<&str> = stack.services.iter().map(|(_, s)| s.name.as_str()).collect();
    for (_, wanted) in &stack.services {
        for p in &wanted.ports {
            let holder = current.iter().map(spec_of).filter(|o| !ours.contains(o.name.as_str())).find(|o| {
                o.ports.iter().any(|q| q.published == p.published && q.protocol == p.protocol && (spec::is_ingress(p) || spec::is_ingress(q)))
            });
            if let Some(o) = holder {
                bail!(
                    "service {}: port {}/{} is already published by service {:?}: change `ports:` or remove that service first",
                    wanted.name,
                    p.published,
                    p.protocol,
                    o.name
                );
            }
        }
    }
    for (_, wanted) in &stack.services {
        let action = match current.iter().find(|s| spec_of(s).name == wanted.name) {
            None => ServiceAction::Create(wanted.clone()),
            Some(s) => {
                let cur = spec_of(s);
                if cur.mode != wanted.mode {
                    bail!(
                        "service {}: its mode can't change from {} to {}: remove it first (`shoal service rm {}`)",
                        wanted.name,
                        cur.mode,
                        wanted.mode,
                        wanted.name
                    );
                }
                if same_spec(cur, wanted) {
                    ServiceAction::Unchanged
                } else {
                    ServiceAction::Update { id: s.id.clone(), version: s.version, spec: wanted.clone() }
                }
            }
        };
        plan.services.push(action);
    }
    if prune {
        let keep: HashSet<&str> = stack.services.iter().map(|(_, s)| s.name.as_str()).collect();
        for s in &current {
            let sp = spec_of(s);
            if in_stack(&sp.labels, &stack.name) && !keep.contains(sp.name.as_str()) {
                plan.prune.push((s.id.clone(), sp.name.clone()));
            }
        }
    }
    Ok(plan)
}

async fn deploy(ctx: &Ctx, files: &[PathBuf], prune: bool, detach: bool, name: &str) -> anyhow::Result<()> {
    // Variables that aren't UTF-8 can't be substituted into a compose
    // file's text anyway.
    let env: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let stack = shoal_compose::load(files, &env, name)?;
    for w in &stack.warnings {
        eprintln!("{w}");
    }
    // The managers' own checks, so a spec they would refuse stops the
    // deploy before anything exists.
    for (_, s) in &stack.services {
        spec::validate_service_spec(s).map_err(|e| anyhow!("service {}: {e}", s.name))?;
    }
    let mut c = ctx.control().await?;
    let plan = plan(&mut c, &stack, prune).await?;

    for req in plan.networks {
        println!("Creating network {}", req.name);
        c.create_network(req.clone()).await.map_err(rpc_err)?;
    }
    for req in plan.volumes {
        println!("Creating volume {}", req.name);
        c.create_volume(req.clone()).await.map_err(rpc_err)?;
    }
    for req in plan.data {
        println!("Creating {} {}", req.kind, req.name);
        c.create_data(req.clone()).await.map_err(rpc_err)?;
    }
    let mut changed = Vec::new();
    for action in plan.services {
        match action {
            ServiceAction::Create(spec) => {
                println!("Creating service {}", spec.name);
                let svc = c.create_service(CreateServiceRequest { spec: Some(spec) }).await.map_err(rpc_err)?.into_inner();
                changed.push(svc.id);
            }
            ServiceAction::Update { id, version, spec } => {
                println!("Updating service {}", spec.name);
                c.update_service(UpdateServiceRequest { service: id.clone(), spec: Some(spec), version }).await.map_err(rpc_err)?;
                changed.push(id);
            }
            ServiceAction::Unchanged => {}
        }
    }
    if !plan.prune.is_empty() {
        for (_, n) in &plan.prune {
            println!("Removing service {n}");
        }
        let ids = plan.prune.into_iter().map(|(id, _)| id).collect();
        c.remove_services(RemoveServicesRequest { services: ids }).await.map_err(rpc_err)?;
    }
    if !detach && !changed.is_empty() {
        let gave_up = format!("the stack is deployed and the cluster keeps working on it (see `shoal stack ps {name}`)");
        super::service::wait_converged(&mut c, &changed, &gave_up).await?;
    }
    Ok(())
}

async fn stack_services(c: &mut crate::client::Client, name: &str) -> anyhow::Result<Vec<Service>> {
    let all = c.list_services(Empty {}).await.map_err(rpc_err)?.into_inner().services;
    Ok(all.into_iter().filter(|s| in_stack(&spec_of(s).labels, name)).collect())
}

async fn ls(ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.control().await?;
    let all = c.list_services(Empty {}).await.map_err(rpc_err)?.into_inner().services;
    let mut stacks: BTreeMap<String, usize> = BTreeMap::new();
    for s in &all {
        if let Some(stack) = spec_of(s).labels.get(NAMESPACE_LABEL) {
            *stacks.entry(stack.clone()).or_default() += 1;
        }
    }
    let rows: Vec<Value> = stacks.into_iter().map(|(name, n)| json!({ "name": name, "services": n })).collect();
    output::list(ctx.format, &rows, &[("NAME", "name"), ("SERVICES", "services")]);
    Ok(())
}

async fn services(ctx: &Ctx, name: &str) -> anyhow::Result<()> {
    let mut c = ctx.control().await?;
    let list = stack_services(&mut c, name).await?;
    if list.is_empty() {
        return Err(not_found(name));
    }
    super::service::print_services(ctx, &list);
    Ok(())
}

async fn ps(ctx: &Ctx, name: &str, all: bool) -> anyhow::Result<()> {
    let mut c = ctx.control().await?;
    let list = stack_services(&mut c, name).await?;
    if list.is_empty() {
        return Err(not_found(name));
    }
    let mut tasks = Vec::new();
    for s in &list {
        tasks.extend(c.list_tasks(ListTasksRequest { service: s.id.clone(), all }).await.map_err(rpc_err)?.into_inner().tasks);
    }
    super::service::print_tasks(ctx, &tasks);
    Ok(())
}

/// Removes one stack: its services, then (once their tasks are gone, as a
/// network or secret a live task uses can't go) its networks, secrets,
/// configs and volumes. Only objects labelled with the stack are touched:
/// external ones never are.
async fn rm(ctx: &Ctx, name: &str, keep_volumes: bool) -> anyhow::Result<()> {
    let mut c = ctx.control().await?;
    let services = stack_services(&mut c, name).await?;
    let networks: Vec<String> = c
        .list_networks(Empty {})
        .await
        .map_err(rpc_err)?
        .into_inner()
        .networks
        .into_iter()
        .filter(|n| in_stack(&n.labels, name))
        .map(|n| n.name)
        .collect();
    let mut data = Vec::new();
    for kind in ["secret", "config"] {
        let items = c.list_data(DataListRequest { kind: kind.into() }).await.map_err(rpc_err)?.into_inner().items;
        data.extend(items.into_iter().filter(|d| in_stack(&d.labels, name)).map(|d| (kind, d.name)));
    }
    let volumes: Vec<String> = if keep_volumes {
        Vec::new()
    } else {
        c.list_volumes(Empty {})
            .await
            .map_err(rpc_err)?
            .into_inner()
            .volumes
            .into_iter()
            .filter(|v| in_stack(&v.labels, name))
            .map(|v| v.name)
            .collect()
    };
    if services.is_empty() && networks.is_empty() && data.is_empty() && volumes.is_empty() {
        return Err(not_found(name));
    }

    let names: Vec<String> = services.iter().map(|s| spec_of(s).name.clone()).collect();
    if !services.is_empty() {
        for n in &names {
            println!("Removing service {n}");
        }
        let ids = services.iter().map(|s| s.id.clone()).collect();
        c.remove_services(RemoveServicesRequest { services: ids }).await.map_err(rpc_err)?;
        let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
        loop {
            let tasks = c.list_tasks(ListTasksRequest { service: String::new(), all: false }).await.map_err(rpc_err)?.into_inner().tasks;
            let live = tasks.iter().filter(|t| names.contains(&t.service) && !TERMINAL.contains(&t.state.as_str())).count();
            if live == 0 {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{live} task(s) of stack {name} still stopping after {WAIT_TIMEOUT:?}; its services are removed: run `shoal stack rm {name}` again to remove the rest");
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
    for n in networks {
        println!("Removing network {n}");
        c.remove_network(NetworkRef { name: n }).await.map_err(rpc_err)?;
    }
    for (kind, n) in data {
        println!("Removing {kind} {n}");
        c.remove_data(DataRef { kind: kind.into(), name: n }).await.map_err(rpc_err)?;
    }
    for n in volumes {
        println!("Removing volume {n}");
        c.remove_volume(RemoveVolumeRequest { name: n, force: false }).await.map_err(rpc_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_managers_normalisations_are_not_changes() {
        let wanted = ServiceSpec { name: "shop_web".into(), image: "busybox".into(), networks: vec!["shop_front".into()], ..Default::default() };
        let mut current = wanted.clone();
        current.image = "busybox:latest".into();
        current.networks.push(spec::INGRESS_NETWORK.into());
        assert!(same_spec(&current, &wanted));
        current.replicas = 3;
        assert!(!same_spec(&current, &wanted));
    }

    #[test]
    fn images_match_with_or_without_latest() {
        let images = [Image { reference: "busybox:latest".into(), ..Default::default() }];
        assert!(image_known(&images, "busybox"));
        assert!(image_known(&images, "busybox:latest"));
        assert!(!image_known(&images, "busybox:1.36"));
    }
}
