//! The Control API: what the CLI calls. Handlers validate, write desired
//! state through Raft, and read back; they never schedule anything
//! themselves.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::control::control_client::ControlClient;
use shoal_proto::control::control_server::Control;
use shoal_proto::control::*;
use tonic::{Request, Response, Status};

use crate::manager::{Manager, ProposeError};
use shoal_security::pki::{self, CertRole};
use crate::spec::{self, SpecError};
use crate::store::objects::{Availability, ClientObj, IssuedCert, NodeObj, Role, ServiceObj};
use crate::store::state::format_node_id;
use crate::store::objects::{DataKind, DataObj, ImageObj, NetworkObj, VolumeObj};
use crate::store::task::{TaskObj, TaskState};
use crate::store::{ApplyError, Command, NodePatch, State};

/// A peer counts as reachable if it answered a Raft RPC this recently.
const REACHABLE_WITHIN: Duration = Duration::from_secs(2);

pub struct ControlService {
    manager: Arc<Manager>,
    heartbeats: crate::DispatcherConfig,
}

impl ControlService {
    pub fn new(manager: Arc<Manager>, heartbeats: crate::DispatcherConfig) -> Self {
        ControlService { manager, heartbeats }
    }
}

/// The one place that turns errors into gRPC statuses.
pub fn status(e: ProposeError) -> Status {
    match e {
        ProposeError::Refused(a) => apply_status(a),
        ProposeError::NoLeader | ProposeError::LeaderUnreachable { .. } => Status::unavailable(e.to_string()),
        ProposeError::Timeout(_) => Status::deadline_exceeded(e.to_string()),
        ProposeError::Raft(_) => Status::internal(e.to_string()),
        ProposeError::TooLarge { .. } => Status::invalid_argument(e.to_string()),
    }
}

fn apply_status(e: ApplyError) -> Status {
    let msg = e.to_string();
    match e {
        ApplyError::NameTaken { .. } | ApplyError::AlreadyInitialized => Status::already_exists(msg),
        ApplyError::NotFound { .. } => Status::not_found(msg),
        ApplyError::Ambiguous { .. } => Status::invalid_argument(msg),
        ApplyError::VersionMismatch { .. } => Status::aborted(msg),
        ApplyError::Refused(_) => Status::failed_precondition(msg),
    }
}

fn spec_status(e: SpecError) -> Status {
    Status::invalid_argument(e.to_string())
}

const CLIENTS: &[CertRole] = &[CertRole::Client, CertRole::Manager];

fn settings(s: &State) -> Option<ClusterSettings> {
    let c = s.cluster.as_ref()?;
    let pending = s.ca_rotation_pending();
    Some(ClusterSettings {
        cert_expiry_ms: c.cert_expiry().as_millis() as u64,
        autolock: !c.unlock_key.is_empty(),
        unlock_key: String::new(),
        ca: c.ca_name(),
        ca_rotating: pending.is_some(),
        ca_pending: pending.unwrap_or_default(),
    })
}

fn new_unlock_key() -> Result<String, Status> {
    let k = shoal_security::at_rest::Key::random().map_err(|e| Status::internal(e.to_string()))?;
    Ok(shoal_security::at_rest::format_unlock_key(&k))
}

fn client_proto(c: &ClientObj) -> ClientCert {
    ClientCert {
        name: c.name.clone(),
        serial: c.cert.serial.clone(),
        created_at_ms: c.created_at_ms,
        expires_at_ms: c.cert.expires_ms,
        cert_pem: String::new(),
        ca_pem: String::new(),
    }
}

/// A client certificate's validity: a year unless given; never below the
/// shortest the cluster accepts.
fn client_expiry(ms: u64) -> Result<Duration, Status> {
    match ms {
        0 => Ok(pki::DEFAULT_CLIENT_EXPIRY),
        ms if Duration::from_millis(ms) < pki::MIN_CERT_EXPIRY => {
            Err(Status::invalid_argument(format!("--expiry is too short: at least {}s", pki::MIN_CERT_EXPIRY.as_secs())))
        }
        ms => Ok(Duration::from_millis(ms)),
    }
}

/// Only the cluster's admin identity (the one `--init` wrote) manages
/// client identities, so a leaked operator certificate can't mint more.
fn require_admin(caller: &(String, CertRole)) -> Result<(), Status> {
    if caller.1 == CertRole::Client && caller.0 != crate::node::ADMIN_CLIENT {
        return Err(Status::permission_denied(format!(
            "client {:?} may not manage client certificates: only the admin identity (DATA/client/ of the first manager) may",
            caller.0
        )));
    }
    Ok(())
}

pub fn task_proto(t: &TaskObj, state: &State, metrics: &crate::metrics::Metrics) -> Task {
    Task {
        id: t.id.clone(),
        service: t.service_name.clone(),
        slot: t.slot,
        node_id: t.node_id.map(format_node_id).unwrap_or_default(),
        node: t.node_id.and_then(|n| state.nodes.get(&n)).map(|n| n.name.clone()).unwrap_or_default(),
        state: t.state.as_str().into(),
        desired_state: t.desired_state.as_str().into(),
        message: t.message.clone(),
        error: t.error.clone(),
        has_exit_code: t.exit_code.is_some(),
        exit_code: t.exit_code.unwrap_or(0),
        addresses: t.addresses.clone(),
        attempt: t.attempt,
        created_at_ms: t.created_at_ms,
        updated_at_ms: t.updated_at_ms,
        state_at_ms: t.state_at_ms,
        image: t.spec.image.clone(),
        cpu_pct: if t.state == TaskState::Running { metrics.task_cpu_pct(&t.id).unwrap_or(-1.0) } else { -1.0 },
    }
}

fn image_proto(i: &ImageObj) -> Image {
    Image {
        reference: i.reference.clone(),
        digest: i.digest.clone(),
        size: i.size,
        layers: i.layers.len() as u64,
        created_at_ms: i.created_at_ms,
    }
}

fn network_proto(n: &NetworkObj, state: &State) -> Network {
    Network {
        id: n.id.clone(),
        name: n.name.clone(),
        subnet: n.subnet.clone(),
        gateway: n.gateway.clone(),
        internal: n.internal,
        labels: n.labels.clone().into_iter().collect(),
        version: n.version,
        created_at_ms: n.created_at_ms,
        services: state.services.values().filter(|s| s.spec.networks.contains(&n.name)).map(|s| s.spec.name.clone()).collect(),
        slices: n
            .slices
            .iter()
            .map(|(node, slices)| shoal_proto::control::NetworkSlice {
                node: state.nodes.get(node).map(|x| x.name.clone()).unwrap_or_else(|| format_node_id(*node)),
                slices: slices.clone(),
            })
            .collect(),
        tasks: state
            .tasks
            .values()
            .filter(|t| !t.state.is_terminal())
            .filter_map(|t| {
                let i = t.spec.networks.iter().position(|x| *x == n.name)?;
                Some(shoal_proto::control::NetworkTask {
                    task: t.id.clone(),
                    service: t.service_name.clone(),
                    node: t.node_id.and_then(|id| state.nodes.get(&id)).map(|x| x.name.clone()).unwrap_or_default(),
                    address: t.addresses.get(i)?.clone(),
                })
            })
            .collect(),
    }
}

fn volume_proto(v: &VolumeObj, state: &State) -> Volume {
    Volume {
        id: v.id.clone(),
        name: v.name.clone(),
        driver: v.driver.clone(),
        labels: v.labels.clone().into_iter().collect(),
        options: v.options.clone().into_iter().collect(),
        version: v.version,
        created_at_ms: v.created_at_ms,
        nodes: v
            .nodes
            .iter()
            .map(|(id, r)| VolumeNode {
                node: state.nodes.get(id).map(|x| x.name.clone()).unwrap_or_else(|| format_node_id(*id)),
                node_id: format_node_id(*id),
                size: r.size,
                updated_at_ms: r.updated_at_ms,
            })
            .collect(),
        services: state
            .services
            .values()
            .filter(|s| crate::store::state::mounts_volume(&s.spec, &v.name))
            .map(|s| s.spec.name.clone())
            .collect(),
        size: v.nodes.values().map(|r| r.size).sum(),
    }
}

/// Docker's local driver options: `type`, `device` and `o`, handed to
/// mount(2) on each node; `type` and `device` go together.
fn validate_volume_options(options: &std::collections::HashMap<String, String>) -> Result<(), Status> {
    if let Some(k) = options.keys().find(|k| !["type", "device", "o"].contains(&k.as_str())) {
        return Err(Status::invalid_argument(format!("volume option {k:?} is not one of the local driver's: type, device, o")));
    }
    if options.contains_key("type") != options.contains_key("device") {
        return Err(Status::invalid_argument("volume options type and device go together (e.g. --opt type=tmpfs --opt device=tmpfs)"));
    }
    if options.values().any(|v| v.is_empty() || v.contains('\0')) {
        return Err(Status::invalid_argument("volume option values must be non-empty and free of NUL bytes"));
    }
    Ok(())
}

/// A secret's or config's metadata; `with_data` only for a config's inspect.
fn data_proto(kind: DataKind, d: &DataObj, state: &State, with_data: bool) -> DataObject {
    let uses = |s: &&ServiceObj| match kind {
        DataKind::Secret => s.spec.secrets.contains(&d.name),
        DataKind::Config => s.spec.configs.contains(&d.name),
    };
    DataObject {
        kind: kind.as_str().into(),
        id: d.id.clone(),
        name: d.name.clone(),
        digest: d.digest.clone(),
        size: d.data.len() as u64,
        data: if with_data && kind == DataKind::Config { d.data.clone() } else { Vec::new() },
        labels: d.labels.clone().into_iter().collect(),
        version: d.version,
        created_at_ms: d.created_at_ms,
        services: state.services.values().filter(uses).map(|s| s.spec.name.clone()).collect(),
    }
}

fn data_kind(kind: &str) -> Result<DataKind, Status> {
    DataKind::parse(kind).ok_or_else(|| Status::invalid_argument(format!("invalid kind {kind:?}: expected secret or config")))
}

fn validate_label_keys<'a>(mut keys: impl Iterator<Item = &'a String>) -> Result<(), Status> {
    match keys.find(|k| k.is_empty() || k.contains(['=', ' '])) {
        Some(k) => Err(Status::invalid_argument(format!("invalid label key {k:?}"))),
        None => Ok(()),
    }
}

fn node_proto(n: &NodeObj, leader: Option<u64>, reachable: bool) -> Node {
    Node {
        id: format_node_id(n.id),
        name: n.name.clone(),
        role: n.role.as_str().into(),
        status: n.status.as_str().into(),
        availability: n.availability.as_str().into(),
        leader: leader == Some(n.id),
        address: n.address.clone(),
        labels: n.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        nano_cpus: n.nano_cpus,
        memory_bytes: n.memory_bytes,
        version: n.version,
        created_at_ms: n.created_at_ms,
        updated_at_ms: n.updated_at_ms,
        reachable,
    }
}

/// Each service's CPU in percent of one CPU: the sum over its running
/// tasks that reported lately, in one pass over the reports.
fn cpu_by_service<'a>(state: &'a State, metrics: &crate::metrics::Metrics) -> HashMap<&'a str, f64> {
    let mut cpu: HashMap<&'a str, f64> = HashMap::new();
    metrics.each_task_cpu_pct(|task, pct| {
        if let Some(t) = state.tasks.get(task).filter(|t| t.state == TaskState::Running) {
            *cpu.entry(t.service_id.as_str()).or_default() += pct;
        }
    });
    cpu
}

fn service_proto(s: &ServiceObj, state: &State, metrics: &crate::metrics::Metrics, cpu: &HashMap<&str, f64>) -> Service {
    // Counted by the store's index per spec version: O(versions), not
    // O(tasks), so polling `service ls` stays cheap at any scale.
    let (mut wanted, mut running, mut outdated) = (0u64, 0u64, 0u64);
    for (version, w) in state.wanted_tasks(&s.id) {
        wanted += w.tasks as u64;
        running += w.running as u64;
        if state.task_spec(&s.id, version).is_some_and(|spec| crate::orchestrator::reconcile::outdated_version(s, version, spec)) {
            outdated += w.live as u64;
        }
    }
    Service {
        id: s.id.clone(),
        spec: Some(s.spec.clone()),
        previous_spec: s.previous_spec.clone(),
        version: s.version,
        created_at_ms: s.created_at_ms,
        updated_at_ms: s.updated_at_ms,
        replicas_running: running,
        // A global service wants one task per eligible node: as many as the
        // orchestrator keeps alive.
        replicas_desired: if s.spec.mode == "global" { wanted } else { s.spec.replicas },
        vips: s.vips.clone().into_iter().collect(),
        rolling_back: s.rolling_back,
        update_status: s.update_status.clone(),
        replicas_outdated: outdated,
        last_autoscale: s.last_autoscale.as_ref().map(|d| shoal_proto::control::AutoscaleDecision {
            at_ms: d.at_ms,
            from: d.from,
            to: d.to,
            reason: d.reason.clone(),
        }),
        cpu_pct: cpu.get(s.id.as_str()).copied().unwrap_or(0.0),
        request_rate: metrics.service_rate(&s.spec.name),
    }
}

impl ControlService {
    fn read_node(&self, what: &str) -> Result<Node, Status> {
        let leader = self.manager.leader().map(|l| l.0);
        self.manager.store.read(|s| {
            let id = s.resolve_node(what).map_err(apply_status)?;
            Ok(node_proto(&s.nodes[&id], leader, self.reachable(id)))
        })
    }

    fn read_network(&self, name: &str) -> Result<Network, Status> {
        self.manager
            .store
            .read(|s| s.networks.get(name).map(|n| network_proto(n, s)))
            .ok_or_else(|| Status::not_found(format!("network {name:?} not found")))
    }

    /// Reads are linearizable unless the caller asks for `local`
    /// (metadata `shoal-consistency`).
    async fn consistent<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match req.metadata().get("shoal-consistency").map(|v| v.to_str().unwrap_or("?")) {
            Some("local") => Ok(()),
            None | Some("linearizable") if self.manager.faults.stale_reads.load(std::sync::atomic::Ordering::Relaxed) => Ok(()),
            None | Some("linearizable") => self
                .manager
                .read_barrier()
                .await
                .map_err(|e| Status::unavailable(format!("{e} (this read must see every committed write; `--consistency local` reads this manager's state, which may be behind)"))),
            Some(other) => Err(Status::invalid_argument(format!("consistency {other:?}: expected linearizable or local"))),
        }
    }

    fn read_volume(&self, name: &str) -> Result<Volume, Status> {
        self.manager
            .store
            .read(|s| s.volumes.get(name).map(|v| volume_proto(v, s)))
            .ok_or_else(|| Status::not_found(format!("volume {name:?} not found")))
    }

    fn read_data(&self, kind: DataKind, name: &str, with_data: bool) -> Result<DataObject, Status> {
        self.manager
            .store
            .read(|s| s.data(kind).get(name).map(|d| data_proto(kind, d, s, with_data)))
            .ok_or_else(|| Status::not_found(format!("{} {name:?} not found", kind.as_str())))
    }

    fn read_service(&self, what: &str) -> Result<Service, Status> {
        self.manager.store.read(|s| {
            let id = s.resolve_service(what).map_err(apply_status)?;
            let cpu = cpu_by_service(s, &self.manager.metrics);
            Ok(service_proto(&s.services[&id], s, &self.manager.metrics, &cpu))
        })
    }

    /// The image must be one the cluster holds; `NAME` means `NAME:latest`.
    fn check_image(&self, spec: &mut ServiceSpec) -> Result<(), Status> {
        let image = spec.image.clone();
        let found = self.manager.store.read(|s| {
            if s.images.contains_key(&image) {
                Some(image.clone())
            } else {
                let latest = format!("{image}:latest");
                s.images.contains_key(&latest).then_some(latest)
            }
        });
        match found {
            Some(reference) => {
                spec.image = reference;
                Ok(())
            }
            None => Err(Status::not_found(format!(
                "image {image:?} not found in the cluster: import it with `shoal image import` or `shoal image load`"
            ))),
        }
    }

    /// The leader's cluster status, asked from a follower (None when the
    /// leader can't be reached within 2 s).
    async fn leader_status(&self) -> Option<ClusterStatusResponse> {
        let (_, addr) = self.manager.leader()?;
        let channel = self.manager.tls.channel(&addr).ok()?;
        let mut client = ControlClient::new(channel);
        match tokio::time::timeout(Duration::from_secs(2), client.cluster_status(Empty {})).await {
            Ok(Ok(resp)) => Some(resp.into_inner()),
            _ => None,
        }
    }

    fn reachable(&self, id: u64) -> bool {
        id == self.manager.id || (self.manager.is_leader() && self.manager.health.reachable(id, REACHABLE_WITHIN))
    }

    fn local_status(&self, (first, last, snap): (u64, u64, u64)) -> ClusterStatusResponse {
        let m = self.manager.raft.metrics().borrow().clone();
        let names = self.manager.store.read(|s| {
            s.nodes.iter().map(|(id, n)| (*id, n.name.clone())).collect::<std::collections::HashMap<_, _>>()
        });
        let name = |id: u64| names.get(&id).cloned().unwrap_or_else(|| format_node_id(id));
        let members = self
            .manager
            .members()
            .into_iter()
            .map(|(id, addr, voter)| ClusterMember {
                id: format_node_id(id),
                name: name(id),
                address: addr,
                voter,
                reachable: self.reachable(id),
            })
            .collect();
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        ClusterStatusResponse {
            leader: m.current_leader.map(name).unwrap_or_default(),
            leader_id: m.current_leader.map(format_node_id).unwrap_or_default(),
            term: m.current_term,
            commit_index: commit_index(&m).unwrap_or(applied).max(applied),
            members,
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            snapshot_index: snap,
            log_first_index: first,
            log_last_index: last,
            answered_by: name(self.manager.id),
            settings: self.manager.store.read(settings),
            heartbeat_period_ms: self.heartbeats.period_for(names.len()).as_millis() as u64,
            down_after_ms: self.heartbeats.down_after_for(names.len()).as_millis() as u64,
        }
    }
}

/// On the leader: the highest log index a quorum of voters holds (the
/// leader's own log counts for itself). None on a follower, which does not
/// know it.
fn commit_index(m: &openraft::RaftMetrics<u64, openraft::BasicNode>) -> Option<u64> {
    let replication = m.replication.as_ref()?;
    let mut matched: Vec<u64> = m
        .membership_config
        .membership()
        .voter_ids()
        .map(|id| if id == m.id { m.last_log_index.unwrap_or(0) } else { replication.get(&id).cloned().flatten().map_or(0, |l| l.index) })
        .collect();
    matched.sort_unstable_by(|a, b| b.cmp(a));
    matched.get(matched.len() / 2).copied()
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn cluster_status(&self, req: Request<Empty>) -> Result<Response<ClusterStatusResponse>, Status> {
        let (_, role) = self.manager.tls.authorize(&req, CLIENTS)?;
        let bounds = self.manager.log_bounds().await;
        // Only the leader knows which peers answer; a follower asks it, and
        // falls back to its own view when the leader is out of reach. A
        // manager caller is a follower asking us: never forward again.
        if !self.manager.is_leader() && role == CertRole::Client {
            if let Some(mut st) = self.leader_status().await {
                // Log bounds are per manager: report our own.
                let me = self.local_status(bounds);
                st.snapshot_index = me.snapshot_index;
                st.log_first_index = me.log_first_index;
                st.log_last_index = me.log_last_index;
                st.last_applied = me.last_applied;
                st.answered_by = me.answered_by;
                return Ok(Response::new(st));
            }
        }
        Ok(Response::new(self.local_status(bounds)))
    }

    async fn update_cluster(&self, req: Request<UpdateClusterRequest>) -> Result<Response<ClusterSettings>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let r = req.into_inner();
        let mut cert_expiry_ms = None;
        if r.cert_expiry_ms != 0 {
            let d = Duration::from_millis(r.cert_expiry_ms);
            if d < pki::MIN_CERT_EXPIRY {
                return Err(Status::invalid_argument(format!(
                    "--cert-expiry {}s is too short: at least {}s (nodes renew at two thirds of it)",
                    d.as_secs(),
                    pki::MIN_CERT_EXPIRY.as_secs()
                )));
            }
            if d > Duration::from_secs(10 * 365 * 24 * 3600) {
                return Err(Status::invalid_argument("--cert-expiry is longer than ten years"));
            }
            cert_expiry_ms = Some(r.cert_expiry_ms);
        }
        let was_locked = self.manager.store.read(|s| s.cluster.as_ref().is_some_and(|c| !c.unlock_key.is_empty()));
        let unlock_key = match r.autolock {
            Some(true) if !was_locked => Some(new_unlock_key()?),
            Some(false) if was_locked => Some(String::new()),
            _ => None,
        };
        if cert_expiry_ms.is_none() && r.autolock.is_none() {
            return Err(Status::invalid_argument("nothing to update: give --cert-expiry or --autolock"));
        }
        self.manager.propose(Command::UpdateCluster { cert_expiry_ms, unlock_key: unlock_key.clone() }).await.map_err(status)?;
        if let Some(ms) = cert_expiry_ms {
            tracing::info!(cert_expiry_s = ms / 1000, "node certificate validity changed; nodes renew on their next heartbeats");
        }
        if let Some(k) = &unlock_key {
            tracing::info!(autolock = !k.is_empty(), "autolock changed: managers re-seal their data keys");
        }
        let st = self.manager.store.read(settings).ok_or_else(|| Status::unavailable("cluster not initialized yet"))?;
        Ok(Response::new(ClusterSettings { unlock_key: unlock_key.unwrap_or_default(), ..st }))
    }

    async fn unlock_key(&self, req: Request<UnlockKeyRequest>) -> Result<Response<UnlockKeyResponse>, Status> {
        let caller = self.manager.tls.authorize(&req, CLIENTS)?;
        require_admin(&caller)?;
        let current = self.manager.store.read(|s| s.cluster.as_ref().map(|c| c.unlock_key.clone())).unwrap_or_default();
        if current.is_empty() {
            return Err(Status::failed_precondition("autolock is off: turn it on with `shoal cluster update --autolock=true`"));
        }
        if !req.get_ref().rotate {
            return Ok(Response::new(UnlockKeyResponse { unlock_key: current }));
        }
        let k = new_unlock_key()?;
        self.manager.propose(Command::UpdateCluster { cert_expiry_ms: None, unlock_key: Some(k.clone()) }).await.map_err(status)?;
        tracing::info!("unlock key rotated: managers re-seal their data keys; the old key no longer unlocks them");
        Ok(Response::new(UnlockKeyResponse { unlock_key: k }))
    }

    async fn create_client_cert(&self, req: Request<CreateClientCertRequest>) -> Result<Response<ClientCert>, Status> {
        let caller = self.manager.tls.authorize(&req, CLIENTS)?;
        require_admin(&caller)?;
        let r = req.into_inner();
        spec::validate_name("client name", &r.name).map_err(spec_status)?;
        if self.manager.store.read(|s| s.clients.contains_key(&r.name)) {
            return Err(Status::already_exists(format!("client certificate {:?} already exists", r.name)));
        }
        let expiry = client_expiry(r.expiry_ms)?;
        let cluster = self.manager.store.read(|s| s.cluster.clone()).ok_or_else(|| Status::unavailable("cluster not initialized yet"))?;
        let signed = pki::sign_csr(&cluster.ca(), &r.csr_pem, &r.name, CertRole::Client, expiry)
            .map_err(|e| Status::invalid_argument(format!("bad certificate signing request: {e}")))?;
        let client = ClientObj { name: r.name.clone(), cert: IssuedCert::of(&signed, CertRole::Client.as_str()), created_at_ms: 0 };
        self.manager.propose(Command::CreateClient { client }).await.map_err(status)?;
        tracing::info!(client = %r.name, serial = %signed.serial, "client certificate issued");
        let c = self.manager.store.read(|s| s.clients.get(&r.name).cloned()).ok_or_else(|| Status::not_found("client certificate removed meanwhile"))?;
        Ok(Response::new(ClientCert {
            cert_pem: cluster.chain(&signed.cert_pem),
            ca_pem: cluster.trust_bundle().to_string(),
            ..client_proto(&c)
        }))
    }

    async fn renew_client_cert(&self, req: Request<CreateClientCertRequest>) -> Result<Response<ClientCert>, Status> {
        let (name, _) = self.manager.tls.authorize(&req, &[CertRole::Client])?;
        let r = req.into_inner();
        let (cluster, known) = self.manager.store.read(|s| (s.cluster.clone(), s.clients.contains_key(&name)));
        let cluster = cluster.ok_or_else(|| Status::unavailable("cluster not initialized yet"))?;
        if !known {
            return Err(Status::not_found(format!("client {name:?} is not a client identity of this cluster")));
        }
        let expiry = client_expiry(r.expiry_ms)?;
        let signed = pki::sign_csr(&cluster.ca(), &r.csr_pem, &name, CertRole::Client, expiry)
            .map_err(|e| Status::invalid_argument(format!("bad certificate signing request: {e}")))?;
        let cert = IssuedCert::of(&signed, CertRole::Client.as_str());
        self.manager.propose(Command::RenewClient { name: name.clone(), cert }).await.map_err(status)?;
        tracing::info!(client = %name, serial = %signed.serial, ca = %signed.issuer, "client certificate renewed; the old one is revoked");
        let c = self.manager.store.read(|s| s.clients.get(&name).cloned()).ok_or_else(|| Status::not_found("client certificate removed meanwhile"))?;
        Ok(Response::new(ClientCert {
            cert_pem: cluster.chain(&signed.cert_pem),
            ca_pem: cluster.trust_bundle().to_string(),
            ..client_proto(&c)
        }))
    }

    async fn rotate_ca(&self, req: Request<Empty>) -> Result<Response<RotateCaResponse>, Status> {
        let caller = self.manager.tls.authorize(&req, CLIENTS)?;
        require_admin(&caller)?;
        let old = self.manager.store.read(|s| s.cluster.clone()).ok_or_else(|| Status::unavailable("cluster not initialized yet"))?;
        if !old.ca_cross_pem.is_empty() {
            return Err(apply_status(ApplyError::Refused(crate::store::command::Refusal::CaRotating)));
        }
        let new = pki::new_ca().map_err(|e| Status::internal(e.to_string()))?;
        let cross_pem = pki::cross_sign(&old.ca(), &new).map_err(|e| Status::internal(e.to_string()))?;
        let name = pki::pem_common_names(&new.cert_pem).into_iter().next().unwrap_or_default();
        self.manager
            .propose(Command::RotateCa { cert_pem: new.cert_pem, key_pem: new.key_pem, cross_pem })
            .await
            .map_err(status)?;
        tracing::info!(old = %old.ca_name(), new = %name, "CA rotation started: nodes get certificates from the new CA on their next heartbeats");
        Ok(Response::new(RotateCaResponse { ca: name }))
    }

    async fn list_client_certs(&self, req: Request<Empty>) -> Result<Response<ClientCertList>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        self.consistent(&req).await?;
        let certs = self.manager.store.read(|s| s.clients.values().map(client_proto).collect());
        Ok(Response::new(ClientCertList { certs }))
    }

    async fn remove_client_cert(&self, req: Request<ClientCertRef>) -> Result<Response<Empty>, Status> {
        let caller = self.manager.tls.authorize(&req, CLIENTS)?;
        require_admin(&caller)?;
        let name = req.into_inner().name;
        if name == crate::node::ADMIN_CLIENT {
            return Err(Status::failed_precondition("the admin identity can't be removed: it is how the cluster is managed"));
        }
        self.manager.propose(Command::RemoveClient { name: name.clone() }).await.map_err(status)?;
        tracing::info!(client = %name, "client certificate removed and revoked");
        Ok(Response::new(Empty {}))
    }

    async fn join_token(&self, req: Request<JoinTokenRequest>) -> Result<Response<JoinTokenResponse>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let r = req.into_inner();
        let role = match r.role.as_str() {
            "worker" => Role::Worker,
            "manager" => Role::Manager,
            other => return Err(Status::invalid_argument(format!("invalid role {other:?}: expected worker or manager"))),
        };
        if r.rotate {
            let secret = pki::random_hex(16).map_err(|e| Status::internal(e.to_string()))?;
            self.manager.propose(Command::RotateToken { role, secret }).await.map_err(status)?;
            tracing::info!(role = role.as_str(), "join token rotated; the old token no longer admits nodes");
        }
        let token = self.manager.store.read(|s| {
            let c = s.cluster.as_ref().ok_or_else(|| Status::unavailable("cluster not initialized yet"))?;
            let fp = pki::fingerprint(&c.ca_cert_pem).map_err(|e| Status::internal(e.to_string()))?;
            let secret = match role {
                Role::Worker => &c.worker_secret,
                Role::Manager => &c.manager_secret,
            };
            Ok::<_, Status>(pki::format_token(&fp, secret))
        })?;
        Ok(Response::new(JoinTokenResponse { token }))
    }

    async fn list_nodes(&self, req: Request<Empty>) -> Result<Response<NodeList>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        self.consistent(&req).await?;
        let leader = self.manager.leader().map(|l| l.0);
        // Which managers answer is the leader's knowledge: a follower asks
        // it (the cluster status it forwards), else shows only itself.
        let known: Option<std::collections::HashSet<String>> = if self.manager.is_leader() {
            None
        } else {
            self.leader_status().await.map(|st| st.members.into_iter().filter(|m| m.reachable).map(|m| m.id).collect())
        };
        let reachable = |id: u64| match &known {
            Some(set) => id == self.manager.id || set.contains(&format_node_id(id)),
            None => self.reachable(id),
        };
        let nodes = self.manager.store.read(|s| s.nodes.values().map(|n| node_proto(n, leader, reachable(n.id))).collect());
        Ok(Response::new(NodeList { nodes }))
    }

    async fn inspect_node(&self, req: Request<NodeRef>) -> Result<Response<Node>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        self.consistent(&req).await?;
        Ok(Response::new(self.read_node(&req.get_ref().node)?))
    }

    async fn remove_node(&self, req: Request<RemoveNodeRequest>) -> Result<Response<Empty>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let r = req.into_inner();
        let id = self.manager.store.read(|s| s.resolve_node(&r.node)).map_err(apply_status)?;
        self.manager.propose(Command::RemoveNode { id, force: r.force }).await.map_err(status)?;
        tracing::info!(node = %format_node_id(id), "node removed from the cluster");
        Ok(Response::new(Empty {}))
    }

    async fn promote_node(&self, req: Request<NodeRef>) -> Result<Response<Node>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let what = req.into_inner().node;
        let (id, role, csr, node_status) = self.manager.store.read(|s| {
            let id = s.resolve_node(&what).map_err(apply_status)?;
            let n = &s.nodes[&id];
            Ok::<_, Status>((id, n.role, n.csr_pem.clone(), n.status))
        })?;
        if role == Role::Manager {
            return Err(Status::failed_precondition(format!("node {what:?} is already a manager")));
        }
        if csr.is_empty() {
            return Err(Status::failed_precondition(format!("node {what:?} has no key on record to certify as a manager")));
        }
        if node_status != crate::store::objects::NodeStatus::Ready {
            return Err(Status::failed_precondition(format!("node {what:?} is down: it must be up to become a manager")));
        }
        let patch = NodePatch { role: Some(Role::Manager), ..Default::default() };
        self.manager.propose(Command::UpdateNode { id, patch }).await.map_err(status)?;
        tracing::info!(node = %what, "node promoted to manager; it joins the raft group on its next heartbeat");
        Ok(Response::new(self.read_node(&format_node_id(id))?))
    }

    async fn demote_node(&self, req: Request<NodeRef>) -> Result<Response<Node>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let what = req.into_inner().node;
        let (id, role, managers) = self.manager.store.read(|s| {
            let id = s.resolve_node(&what).map_err(apply_status)?;
            let managers = s.nodes.values().filter(|n| n.role == Role::Manager).count();
            Ok::<_, Status>((id, s.nodes[&id].role, managers))
        })?;
        if role == Role::Worker {
            return Err(Status::failed_precondition(format!("node {what:?} is already a worker")));
        }
        if managers <= 1 {
            return Err(Status::failed_precondition(format!("node {what:?} is the last manager: promote another node first")));
        }
        if self.manager.leader().map(|l| l.0) == Some(id) {
            return Err(Status::failed_precondition(format!(
                "node {what:?} is the leader: stop it (a new leader is elected) or demote it once another manager leads"
            )));
        }
        // Out of the Raft group first, so the quorum never counts a node
        // that already stopped acting as a manager.
        self.manager.remove_manager(id).await.map_err(status)?;
        let patch = NodePatch { role: Some(Role::Worker), ..Default::default() };
        self.manager.propose(Command::UpdateNode { id, patch }).await.map_err(status)?;
        tracing::info!(node = %what, "manager demoted to worker");
        Ok(Response::new(self.read_node(&format_node_id(id))?))
    }

    async fn update_node(&self, req: Request<UpdateNodeRequest>) -> Result<Response<Node>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let r = req.into_inner();
        let id = self.manager.store.read(|s| s.resolve_node(&r.node)).map_err(apply_status)?;
        let availability = match r.availability.as_str() {
            "" => None,
            a => Some(Availability::parse(a).ok_or_else(|| {
                Status::invalid_argument(format!("invalid availability {a:?}: expected active, pause or drain"))
            })?),
        };
        validate_label_keys(r.label_add.keys().chain(r.label_rm.iter()))?;
        let patch = NodePatch {
            availability,
            label_add: r.label_add.into_iter().collect(),
            label_rm: r.label_rm,
            ..Default::default()
        };
        self.manager.propose(Command::UpdateNode { id, patch }).await.map_err(status)?;
        Ok(Response::new(self.read_node(&format_node_id(id))?))
    }

    async fn create_service(&self, req: Request<CreateServiceRequest>) -> Result<Response<Service>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let mut spec = req.into_inner().spec.ok_or_else(|| Status::invalid_argument("missing service spec"))?;
        spec::validate_service_spec(&spec).map_err(spec_status)?;
        self.check_image(&mut spec)?;
        let id = pki::random_hex(12).map_err(|e| Status::internal(e.to_string()))?;
        let service = ServiceObj::new(id.clone(), spec);
        let name = service.spec.name.clone();
        self.manager
            .propose(Command::CreateService { service: Box::new(service) })
            .await
            .map_err(status)?;
        tracing::info!(service = %name, id = %id, "service created");
        Ok(Response::new(self.read_service(&id)?))
    }

    async fn list_services(&self, req: Request<Empty>) -> Result<Response<ServiceList>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        self.consistent(&req).await?;
        let services = self
            .manager
            .store
            .read(|s| {
                let cpu = cpu_by_service(s, &self.manager.metrics);
                s.services.values().map(|svc| service_proto(svc, s, &self.manager.metrics, &cpu)).collect()
            });
        Ok(Response::new(ServiceList { services }))
    }

    async fn inspect_service(&self, req: Request<ServiceRef>) -> Result<Response<Service>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        self.consistent(&req).await?;
        Ok(Response::new(self.read_service(&req.get_ref().service)?))
    }

    async fn update_service(&self, req: Request<UpdateServiceRequest>) -> Result<Response<Service>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let r = req.into_inner();
        let mut spec = r.spec.ok_or_else(|| Status::invalid_argument("missing service spec"))?;
        spec::validate_service_spec(&spec).map_err(spec_status)?;
        self.check_image(&mut spec)?;
        let id = self.manager.store.read(|s| s.resolve_service(&r.service)).map_err(apply_status)?;
        let mode_changed = self.manager.store.read(|s| s.services[&id].spec.mode != spec.mode);
        if mode_changed {
            return Err(Status::invalid_argument("a service's mode cannot be changed: remove and create it"));
        }
        self.manager
            .propose(Command::UpdateService { service: id.clone(), spec: Box::new(spec), expected_version: r.version })
            .await
            .map_err(status)?;
        Ok(Response::new(self.read_service(&id)?))
    }

    async fn rollback_service(&self, req: Request<ServiceRef>) -> Result<Response<Service>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let what = req.into_inner().service;
        let id = self.manager.store.read(|s| s.resolve_service(&what)).map_err(apply_status)?;
        self.manager.propose(Command::RollbackService { service: id.clone() }).await.map_err(status)?;
        let svc = self.read_service(&id)?;
        tracing::info!(service = %what, "service rolled back to its previous spec");
        Ok(Response::new(svc))
    }

    async fn scale_services(&self, req: Request<ScaleRequest>) -> Result<Response<ServiceList>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let items: Vec<(String, u64)> = req.into_inner().items.into_iter().map(|i| (i.service, i.replicas)).collect();
        if items.is_empty() {
            return Err(Status::invalid_argument("nothing to scale: expected SERVICE=REPLICAS"));
        }
        for (_, n) in &items {
            spec::validate_replicas(*n).map_err(spec_status)?;
        }
        let applied = self
            .manager
            .propose(Command::ScaleServices { items: items.clone() })
            .await
            .map_err(status)?;
        for (what, n) in &items {
            tracing::info!(service = %what, replicas = n, "service scaled");
        }
        let services = applied.ids.iter().map(|id| self.read_service(id)).collect::<Result<_, _>>()?;
        Ok(Response::new(ServiceList { services }))
    }

    async fn remove_services(&self, req: Request<RemoveServicesRequest>) -> Result<Response<Empty>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let services = req.into_inner().services;
        if services.is_empty() {
            return Err(Status::invalid_argument("no service named"));
        }
        self.manager.propose(Command::RemoveServices { services }).await.map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn list_tasks(&self, req: Request<ListTasksRequest>) -> Result<Response<TaskList>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        self.consistent(&req).await?;
        let r = req.into_inner();
        let tasks = self.manager.store.read(|s| {
            let service = if r.service.is_empty() { None } else { Some(s.resolve_service(&r.service).map_err(apply_status)?) };
            let all: Box<dyn Iterator<Item = &crate::store::task::TaskObj>> = match &service {
                Some(id) => Box::new(s.service_tasks(id)),
                None => Box::new(s.tasks.values()),
            };
            let mut tasks: Vec<Task> = all
                .filter(|t| r.all || t.desired_state == TaskState::Running || !t.state.is_terminal())
                .map(|t| task_proto(t, s, &self.manager.metrics))
                .collect();
            tasks.sort_by(|a, b| (&a.service, a.slot, &a.node, b.created_at_ms).cmp(&(&b.service, b.slot, &b.node, a.created_at_ms)));
            Ok::<_, Status>(tasks)
        })?;
        Ok(Response::new(TaskList { tasks }))
    }

    async fn missing_blobs(&self, req: Request<BlobList>) -> Result<Response<BlobList>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let digests = req.into_inner().digests;
        if digests.len() > crate::blobs::MAX_IMAGE_BLOBS {
            return Err(Status::invalid_argument(format!(
                "{} blobs asked about: at most {} per call",
                digests.len(),
                crate::blobs::MAX_IMAGE_BLOBS
            )));
        }
        let mut missing = Vec::new();
        for d in digests {
            self.manager.blobs.path(&d).map_err(|e| Status::invalid_argument(e.to_string()))?;
            if !self.manager.blobs.has_fresh(&d) {
                missing.push(d);
            }
        }
        Ok(Response::new(BlobList { digests: missing }))
    }

    async fn push_blob(&self, req: Request<tonic::Streaming<BlobUpload>>) -> Result<Response<BlobList>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty blob upload"))?;
        let digest = first.digest;
        self.manager.blobs.path(&digest).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self.manager.blobs.has_fresh(&digest) {
            return Ok(Response::new(BlobList { digests: vec![digest] }));
        }
        let blob_err = |e: crate::blobs::BlobError| Status::invalid_argument(e.to_string());
        let mut w = self.manager.blobs.writer().await.map_err(|e| Status::internal(e.to_string()))?;
        w.write(&first.data).await.map_err(blob_err)?;
        while let Some(chunk) = stream.message().await? {
            w.write(&chunk.data).await.map_err(blob_err)?;
        }
        let (digest, size) = w.finish(Some(&digest)).await.map_err(blob_err)?;
        tracing::debug!(blob = %digest, size, "blob pushed");
        Ok(Response::new(BlobList { digests: vec![digest] }))
    }

    async fn put_image(&self, req: Request<PutImageRequest>) -> Result<Response<Image>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let r = req.into_inner();
        spec::validate_image(&r.reference).map_err(spec_status)?;
        let reference = if r.reference.contains(':') || r.reference.contains('@') {
            r.reference.clone()
        } else {
            format!("{}:latest", r.reference)
        };
        let image = self
            .manager
            .blobs
            .image(&reference, &r.manifest_digest)
            .await
            .map_err(|e| match e {
                crate::blobs::BlobError::NotFound(_) => Status::failed_precondition(e.to_string()),
                crate::blobs::BlobError::Io { .. } => Status::internal(e.to_string()),
                _ => Status::invalid_argument(e.to_string()),
            })?;
        let (size, layers) = (image.size, image.layers.len());
        self.manager.propose(Command::PutImage { image }).await.map_err(status)?;
        tracing::info!(image = %reference, digest = %r.manifest_digest, size, layers, "image added to the cluster");
        let img = self
            .manager
            .store
            .read(|s| s.images.get(&reference).map(image_proto))
            .ok_or_else(|| Status::internal("image vanished after import"))?;
        Ok(Response::new(img))
    }

    async fn create_network(&self, req: Request<CreateNetworkRequest>) -> Result<Response<Network>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let r = req.into_inner();
        spec::validate_name("network name", &r.name).map_err(spec_status)?;
        if r.name == spec::INGRESS_NETWORK {
            return Err(Status::invalid_argument(
                "network name \"ingress\" is reserved: shoal makes the routing mesh's network itself when a service publishes a port",
            ));
        }
        if !r.subnet.is_empty() {
            spec::parse_cidr(&r.subnet).map_err(spec_status)?;
        }
        validate_label_keys(r.labels.keys())?;
        let network = NetworkObj {
            id: pki::random_hex(12).map_err(|e| Status::internal(e.to_string()))?,
            name: r.name.clone(),
            subnet: r.subnet,
            gateway: String::new(),
            internal: r.internal,
            labels: r.labels.into_iter().collect(),
            version: 0,
            created_at_ms: 0,
            slices: Default::default(),
            last_address: Default::default(),
        };
        self.manager.propose(Command::CreateNetwork { network }).await.map_err(status)?;
        let n = self.read_network(&r.name)?;
        tracing::info!(network = %n.name, subnet = %n.subnet, "network created");
        Ok(Response::new(n))
    }

    async fn list_networks(&self, req: Request<Empty>) -> Result<Response<NetworkList>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        self.consistent(&req).await?;
        let networks = self.manager.store.read(|s| s.networks.values().map(|n| network_proto(n, s)).collect());
        Ok(Response::new(NetworkList { networks }))
    }

    async fn inspect_network(&self, req: Request<NetworkRef>) -> Result<Response<Network>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        self.consistent(&req).await?;
        Ok(Response::new(self.read_network(&req.into_inner().name)?))
    }

    async fn remove_network(&self, req: Request<NetworkRef>) -> Result<Response<Empty>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let name = req.into_inner().name;
        self.manager.propose(Command::RemoveNetwork { name: name.clone() }).await.map_err(status)?;
        tracing::info!(network = %name, "network removed");
        Ok(Response::new(Empty {}))
    }

    async fn create_volume(&self, req: Request<CreateVolumeRequest>) -> Result<Response<Volume>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let r = req.into_inner();
        spec::validate_name("volume name", &r.name).map_err(spec_status)?;
        if !["", "local"].contains(&r.driver.as_str()) {
            return Err(Status::invalid_argument(format!("volume driver {:?} is not supported: shoal has the local driver only", r.driver)));
        }
        validate_label_keys(r.labels.keys())?;
        validate_volume_options(&r.options)?;
        let volume = VolumeObj {
            id: pki::random_hex(12).map_err(|e| Status::internal(e.to_string()))?,
            name: r.name.clone(),
            driver: "local".into(),
            labels: r.labels.into_iter().collect(),
            options: r.options.into_iter().collect(),
            nodes: Default::default(),
            version: 0,
            created_at_ms: 0,
        };
        self.manager.propose(Command::CreateVolume { volume }).await.map_err(status)?;
        let v = self.read_volume(&r.name)?;
        tracing::info!(volume = %v.name, id = %v.id, "volume created");
        Ok(Response::new(v))
    }

    async fn list_volumes(&self, req: Request<Empty>) -> Result<Response<VolumeList>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        self.consistent(&req).await?;
        let volumes = self.manager.store.read(|s| s.volumes.values().map(|v| volume_proto(v, s)).collect());
        Ok(Response::new(VolumeList { volumes }))
    }

    async fn inspect_volume(&self, req: Request<VolumeRef>) -> Result<Response<Volume>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        self.consistent(&req).await?;
        Ok(Response::new(self.read_volume(&req.into_inner().name)?))
    }

    async fn remove_volume(&self, req: Request<RemoveVolumeRequest>) -> Result<Response<Empty>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let r = req.into_inner();
        self.manager.propose(Command::RemoveVolume { name: r.name.clone(), force: r.force }).await.map_err(status)?;
        tracing::info!(volume = %r.name, force = r.force, "volume removed: the nodes holding its data delete it");
        Ok(Response::new(Empty {}))
    }

    async fn prune_volumes(&self, req: Request<Empty>) -> Result<Response<VolumeList>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        // Volumes no service mounts; each removal is checked again when it
        // applies (a service may have taken one meanwhile).
        let candidates: Vec<Volume> = self.manager.store.read(|s| {
            s.volumes
                .values()
                .filter(|v| !s.services.values().any(|x| crate::store::state::mounts_volume(&x.spec, &v.name)))
                .map(|v| volume_proto(v, s))
                .collect()
        });
        let mut removed = Vec::new();
        for v in candidates {
            match self.manager.propose(Command::RemoveVolume { name: v.name.clone(), force: false }).await {
                Ok(_) => {
                    tracing::info!(volume = %v.name, "volume pruned");
                    removed.push(v);
                }
                Err(ProposeError::Refused(e)) => tracing::info!(volume = %v.name, reason = %e, "volume kept by prune"),
                Err(e) => return Err(status(e)),
            }
        }
        Ok(Response::new(VolumeList { volumes: removed }))
    }

    async fn create_data(&self, req: Request<CreateDataRequest>) -> Result<Response<DataObject>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let r = req.into_inner();
        let kind = data_kind(&r.kind)?;
        let what = match kind {
            DataKind::Secret => "secret name",
            DataKind::Config => "config name",
        };
        spec::validate_name(what, &r.name).map_err(spec_status)?;
        validate_label_keys(r.labels.keys())?;
        if r.data.len() > crate::store::objects::MAX_DATA {
            return Err(Status::invalid_argument(format!(
                "{} {:?} is {} bytes: at most {}",
                kind.as_str(),
                r.name,
                r.data.len(),
                crate::store::objects::MAX_DATA
            )));
        }
        let digest = format!("sha256:{}", hex::encode(ring::digest::digest(&ring::digest::SHA256, &r.data)));
        let obj = DataObj {
            id: pki::random_hex(12).map_err(|e| Status::internal(e.to_string()))?,
            name: r.name.clone(),
            data: r.data,
            digest,
            labels: r.labels.into_iter().collect(),
            version: 0,
            created_at_ms: 0,
        };
        self.manager.propose(Command::CreateData { kind, obj }).await.map_err(status)?;
        tracing::info!(kind = kind.as_str(), name = %r.name, "{} created", kind.as_str());
        Ok(Response::new(self.read_data(kind, &r.name, false)?))
    }

    async fn list_data(&self, req: Request<DataListRequest>) -> Result<Response<DataList>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        self.consistent(&req).await?;
        let kind = data_kind(&req.into_inner().kind)?;
        let items = self.manager.store.read(|s| s.data(kind).values().map(|d| data_proto(kind, d, s, false)).collect());
        Ok(Response::new(DataList { items }))
    }

    async fn inspect_data(&self, req: Request<DataRef>) -> Result<Response<DataObject>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        self.consistent(&req).await?;
        let r = req.into_inner();
        Ok(Response::new(self.read_data(data_kind(&r.kind)?, &r.name, true)?))
    }

    async fn remove_data(&self, req: Request<DataRef>) -> Result<Response<Empty>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let r = req.into_inner();
        let kind = data_kind(&r.kind)?;
        self.manager.propose(Command::RemoveData { kind, name: r.name.clone() }).await.map_err(status)?;
        tracing::info!(kind = kind.as_str(), name = %r.name, "{} removed", kind.as_str());
        Ok(Response::new(Empty {}))
    }

    async fn list_images(&self, req: Request<Empty>) -> Result<Response<ImageList>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        self.consistent(&req).await?;
        let images = self.manager.store.read(|s| s.images.values().map(image_proto).collect());
        Ok(Response::new(ImageList { images }))
    }

    async fn remove_image(&self, req: Request<ImageRef>) -> Result<Response<Empty>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let reference = req.into_inner().reference;
        let reference = self
            .manager
            .store
            .read(|s| {
                if s.images.contains_key(&reference) {
                    Some(reference.clone())
                } else {
                    let latest = format!("{reference}:latest");
                    s.images.contains_key(&latest).then_some(latest)
                }
            })
            .unwrap_or(reference);
        self.manager.propose(Command::RemoveImage { reference }).await.map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    type ServiceLogsStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<LogLine, Status>> + Send>>;

    async fn service_logs(&self, req: Request<ServiceLogsRequest>) -> Result<Response<Self::ServiceLogsStream>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let r = req.into_inner();
        let service_id = self.manager.store.read(|s| s.resolve_service(&r.service)).map_err(apply_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(crate::logs::stream_service(self.manager.clone(), service_id, r.follow, tx));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn exec(&self, req: Request<ExecTaskRequest>) -> Result<Response<ExecTaskResponse>, Status> {
        self.manager.tls.authorize(&req, CLIENTS)?;
        let r = req.into_inner();
        if r.cmd.is_empty() {
            return Err(Status::invalid_argument("no command given"));
        }
        let (task_id, addr) = self.manager.store.read(|s| {
            let t = crate::logs::resolve_task(s, &r.task).map_err(apply_status)?;
            if t.state != TaskState::Running {
                return Err(Status::failed_precondition(format!("task {} is {}, not running", r.task, t.state.as_str())));
            }
            let node = t.node_id.and_then(|n| s.nodes.get(&n)).ok_or_else(|| Status::unavailable("the task's node is gone"))?;
            Ok((t.id.clone(), (node.address.clone(), format_node_id(node.id))))
        })?;
        let channel = self.manager.tls.node_channel(&addr.0, &addr.1).map_err(|e| Status::unavailable(e.to_string()))?;
        let resp = shoal_proto::agent::agent_client::AgentClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .exec(shoal_proto::agent::ExecRequest { task_id, cmd: r.cmd })
            .await
            .map_err(|s| Status::new(s.code(), format!("agent at {}: {}", addr.0, s.message())))?
            .into_inner();
        Ok(Response::new(ExecTaskResponse { exit_code: resp.exit_code, stdout: resp.stdout, stderr: resp.stderr }))
    }
}
