//! Commands: the payload of one Raft log entry. Each command is applied
//! whole or not at all; a command that changes many objects (a scale of many
//! services, a batch of node status changes) is still one entry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_proto::control::ServiceSpec;

use super::objects::{Availability, ClientObj, ClusterObj, IssuedCert, DataKind, DataObj, ImageObj, NetworkObj, NodeObj, NodeStatus, Role, ServiceObj, VolumeObj};
use super::task::{TaskObj, TaskUpdate};

/// One Raft entry's application data: the commands that arrived together
/// at the leader (group commit), applied in order, each whole or not at all.
/// `now_ms` is the leader's clock, so every replica stamps the same time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub now_ms: u64,
    pub cmds: Vec<Command>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    /// The first node, and the admin client identity `--init` wrote.
    InitCluster { cluster: ClusterObj, node: NodeObj, client: Option<ClientObj> },
    /// A certificate issued to a node (renewal, role change): it becomes
    /// the node's current one.
    RecordCert { node: u64, cert: IssuedCert, cert_pem: String },
    /// `cluster update`.
    /// `unlock_key`: Some("") turns autolock off, Some(key) on (or
    /// rotates the key).
    UpdateCluster { cert_expiry_ms: Option<u64>, unlock_key: Option<String> },
    CreateClient { client: ClientObj },
    /// A client identity's new certificate (`client-cert renew`): the old
    /// one is revoked.
    RenewClient { name: String, cert: IssuedCert },
    /// `cluster ca --rotate`: the new CA signs from now on; both are
    /// trusted until every node and client holds a certificate from it.
    RotateCa { cert_pem: String, key_pem: String, cross_pem: String },
    /// The end of a rotation to the CA `cert_pem` (if it is still the
    /// current one): only it is trusted.
    FinishCaRotation { cert_pem: String },
    /// Removes a client identity and revokes its certificate.
    RemoveClient { name: String },
    AddNode { node: NodeObj },
    UpdateNode { id: u64, patch: NodePatch },
    RemoveNode { id: u64, force: bool },
    SetNodeStatus { changes: Vec<(u64, NodeStatus)> },
    RotateToken { role: Role, secret: String },
    CreateService { service: Box<ServiceObj> },
    UpdateService {
        service: String,
        #[serde(with = "super::objects::prost_bytes_box")]
        spec: Box<ServiceSpec>,
        expected_version: u64,
    },
    ScaleServices { items: Vec<(String, u64)> },
    /// Back to the service's previous spec (which becomes the previous).
    RollbackService { service: String },
    /// The orchestrator's rollback of a failed update (failure action
    /// `rollback`), with why; nothing if the service is rolling back
    /// already or its spec changed since (`version`).
    AutoRollback { service: String, version: u64, reason: String },
    /// The autoscaler's decision for one service (by id): `from` is the
    /// replica count it decided on; a service changed meanwhile is left
    /// alone (the next decision sees the change).
    Autoscale { service: String, from: u64, to: u64, reason: String },
    RemoveServices { services: Vec<String> },
    /// The orchestrator's new tasks.
    CreateTasks { tasks: Vec<TaskObj> },
    /// Task changes from the orchestrator, the scheduler, the dispatcher
    /// (agents' reports, `from_node` set) and the down-detector. Each update
    /// applies what is legal (states only move forward) and skips the rest:
    /// reports race with decisions, and the later, forward state wins.
    UpdateTasks { from_node: Option<u64>, updates: Vec<TaskUpdate> },
    /// Forget finished tasks (history trimming, removed services).
    RemoveTasks { ids: Vec<String> },
    /// Records an image whose blob the proposing manager holds.
    PutImage { image: ImageObj },
    RemoveImage { reference: String },
    /// A network; an empty subnet takes the next free /24 of the pool.
    CreateNetwork { network: NetworkObj },
    RemoveNetwork { name: String },
    /// A secret or a config.
    CreateData { kind: DataKind, obj: DataObj },
    RemoveData { kind: DataKind, name: String },
    CreateVolume { volume: VolumeObj },
    /// `force`: also while a node holding its data is down (it deletes the
    /// data when it returns).
    RemoveVolume { name: String, force: bool },
    /// A node's volumes with their sizes: (name, id, bytes). Entries for
    /// volumes the cluster no longer has (other ids) are skipped.
    VolumeReport { node: u64, volumes: Vec<(String, String, u64)> },
    /// Changes nothing; a new leader's read barrier and the benchmarks'
    /// smallest write.
    Noop,
    /// A client's write with its request id: applied once however often it
    /// is proposed (a forwarded write retried after its answer was lost);
    /// a repeat gets the first outcome. The state remembers the last
    /// `RECENT_REQUESTS` ids.
    Once { id: String, cmd: Box<Command> },
    /// New tasks as `CreateTasks` makes them, encoded with each distinct
    /// spec once (a run's tasks are one or a few service versions): a
    /// 5,000-task run is a fifth of the bytes to replicate and write. What
    /// the leader loops propose; `CreateTasks` stays for entries already in
    /// logs.
    CreateTaskRun {
        #[serde(with = "shared_specs")]
        tasks: Vec<TaskObj>,
    },
}

/// The tasks of a [`Command::CreateTaskRun`] on the wire: the distinct
/// specs once, then each task with the index of its spec. Decoding gives
/// the tasks of one spec one shared `Arc`.
mod shared_specs {
    use std::borrow::Cow;
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use shoal_proto::control::ServiceSpec;

    use crate::store::task::{TaskObj, TaskState};

    /// A task without its spec: `spec` indexes the run's specs.
    #[derive(Serialize, Deserialize)]
    pub(super) struct Wire<'a> {
        spec: u32,
        id: Cow<'a, str>,
        service_id: Cow<'a, str>,
        service_name: Cow<'a, str>,
        slot: u64,
        node_id: Option<u64>,
        spec_version: u64,
        desired_state: TaskState,
        state: TaskState,
        message: Cow<'a, str>,
        error: Cow<'a, str>,
        exit_code: Option<i32>,
        attempt: u64,
        addresses: Cow<'a, [String]>,
        created_at_ms: u64,
        updated_at_ms: u64,
        state_at_ms: u64,
        version: u64,
    }

    #[derive(Serialize)]
    struct Out<'a> {
        #[serde(serialize_with = "specs_out")]
        specs: Vec<&'a ServiceSpec>,
        tasks: Vec<Wire<'a>>,
    }

    #[derive(Deserialize)]
    struct In<'a> {
        #[serde(deserialize_with = "specs_in")]
        specs: Vec<Arc<ServiceSpec>>,
        #[serde(borrow)]
        tasks: Vec<Wire<'a>>,
    }

    fn specs_out<S: Serializer>(specs: &[&ServiceSpec], s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(specs.len()))?;
        for spec in specs {
            seq.serialize_element(&serde_bytes_of(spec))?;
        }
        seq.end()
    }

    fn serde_bytes_of(spec: &ServiceSpec) -> Bytes {
        Bytes(prost::Message::encode_to_vec(spec))
    }

    /// Bytes that serialize as bytes (postcard: a length and the bytes).
    struct Bytes(Vec<u8>);

    impl Serialize for Bytes {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }

    fn specs_in<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Arc<ServiceSpec>>, D::Error> {
        #[derive(Deserialize)]
        struct One(#[serde(deserialize_with = "crate::store::objects::prost_bytes_arc::deserialize")] Arc<ServiceSpec>);
        let v: Vec<One> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|o| o.0).collect())
    }

    /// The index of `spec` in `specs`, added if new (a run holds one or a
    /// few specs, so a scan beats hashing).
    pub(super) fn index_of<'a>(specs: &mut Vec<&'a ServiceSpec>, spec: &'a Arc<ServiceSpec>) -> u32 {
        let found = specs.iter().position(|s| std::ptr::eq(*s, &**spec) || **s == **spec);
        found.unwrap_or_else(|| {
            specs.push(spec);
            specs.len() - 1
        }) as u32
    }

    pub(super) fn wire(t: &TaskObj, spec: u32) -> Wire<'_> {
        Wire {
            spec,
            id: Cow::Borrowed(&t.id),
            service_id: Cow::Borrowed(&t.service_id),
            service_name: Cow::Borrowed(&t.service_name),
            slot: t.slot,
            node_id: t.node_id,
            spec_version: t.spec_version,
            desired_state: t.desired_state,
            state: t.state,
            message: Cow::Borrowed(&t.message),
            error: Cow::Borrowed(&t.error),
            exit_code: t.exit_code,
            attempt: t.attempt,
            addresses: Cow::Borrowed(&t.addresses),
            created_at_ms: t.created_at_ms,
            updated_at_ms: t.updated_at_ms,
            state_at_ms: t.state_at_ms,
            version: t.version,
        }
    }

    pub fn serialize<S: Serializer>(tasks: &[TaskObj], s: S) -> Result<S::Ok, S::Error> {
        let mut specs = Vec::new();
        let tasks = tasks.iter().map(|t| { let i = index_of(&mut specs, &t.spec); wire(t, i) }).collect();
        Out { specs, tasks }.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<TaskObj>, D::Error> {
        let run = In::deserialize(d)?;
        run.tasks
            .into_iter()
            .map(|w| {
                let spec = run.specs.get(w.spec as usize).cloned().ok_or_else(|| {
                    serde::de::Error::custom(format!("task {} names spec {} of a run of {}", w.id, w.spec, run.specs.len()))
                })?;
                Ok(TaskObj {
                    id: w.id.into_owned(),
                    service_id: w.service_id.into_owned(),
                    service_name: w.service_name.into_owned(),
                    slot: w.slot,
                    node_id: w.node_id,
                    spec,
                    spec_version: w.spec_version,
                    desired_state: w.desired_state,
                    state: w.state,
                    message: w.message.into_owned(),
                    error: w.error.into_owned(),
                    exit_code: w.exit_code,
                    attempt: w.attempt,
                    addresses: w.addresses.into_owned(),
                    created_at_ms: w.created_at_ms,
                    updated_at_ms: w.updated_at_ms,
                    state_at_ms: w.state_at_ms,
                    version: w.version,
                })
            })
            .collect()
    }

    /// What a task adds to a run's encoding, its spec apart.
    pub(super) fn task_len(t: &TaskObj) -> usize {
        postcard::experimental::serialized_size(&wire(t, 0)).unwrap_or(usize::MAX)
    }

    pub(super) fn spec_len(spec: &ServiceSpec) -> usize {
        prost::Message::encoded_len(spec) + 5
    }
}

/// Cuts new tasks into [`Command::CreateTaskRun`]s whose encoding stays
/// under `budget` bytes: each task's bytes, and each spec's once per run.
fn task_runs(tasks: Vec<TaskObj>, budget: usize) -> Vec<Command> {
    let mut out = Vec::new();
    let mut run: Vec<TaskObj> = Vec::new();
    let mut specs: Vec<std::sync::Arc<ServiceSpec>> = Vec::new();
    let mut size = 0usize;
    for t in tasks {
        let new_spec = !specs.iter().any(|s| std::sync::Arc::ptr_eq(s, &t.spec) || **s == *t.spec);
        let n = shared_specs::task_len(&t) + if new_spec { shared_specs::spec_len(&t.spec) } else { 0 };
        if !run.is_empty() && size + n > budget {
            out.push(Command::CreateTaskRun { tasks: std::mem::take(&mut run) });
            specs.clear();
            size = shared_specs::spec_len(&t.spec) + shared_specs::task_len(&t);
            specs.push(t.spec.clone());
        } else {
            size += n;
            if new_spec {
                specs.push(t.spec.clone());
            }
        }
        run.push(t);
    }
    if !run.is_empty() {
        out.push(Command::CreateTaskRun { tasks: run });
    }
    out
}

/// How many request ids the state remembers for exactly-once writes: far
/// more than can be in flight while a client retries.
pub const RECENT_REQUESTS: usize = 10_000;

/// The most bytes of commands one Raft entry carries. openraft gives an
/// AppendEntries one heartbeat interval (100 ms) to reach a follower and be
/// written there, and retries a request that doesn't make it forever: an
/// entry too big for that wedges every later commit. With
/// `max_payload_entries` entries per request, this bounds a request.
pub const MAX_ENTRY_BYTES: usize = 1 << 20;

/// What the batcher fills an entry up to, and the size of the runs the
/// leader loops cut their many-task commands into: a follower decodes,
/// re-encodes, seals and writes an entry within the AppendEntries deadline
/// even on a slow (debug-built, loaded) machine. A single command up to
/// [`MAX_ENTRY_BYTES`] (a large secret) still makes its own entry.
pub const TARGET_ENTRY_BYTES: usize = 256 << 10;

/// A command's encoded size (what it adds to its Raft entry).
pub fn encoded_len(cmd: &Command) -> usize {
    postcard::experimental::serialized_size(cmd).unwrap_or(usize::MAX)
}

/// Cuts `items` into runs whose encoding stays under `budget` bytes (an
/// item bigger than that alone makes one run).
fn runs<T: Serialize>(items: Vec<T>, budget: usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut run = Vec::new();
    let mut size = 0usize;
    for item in items {
        let n = postcard::experimental::serialized_size(&item).unwrap_or(budget);
        if !run.is_empty() && size + n > budget {
            out.push(std::mem::take(&mut run));
            size = 0;
        }
        size += n;
        run.push(item);
    }
    if !run.is_empty() {
        out.push(run);
    }
    out
}

impl Command {
    /// This command as commands that each fit in a Raft entry with room
    /// to spare: the leader loops' many-task commands are cut into runs
    /// (each applies whole; the loops' next passes see the sum). Other
    /// commands come back as they are.
    pub fn split(self) -> Vec<Command> {
        const BUDGET: usize = TARGET_ENTRY_BYTES / 2;
        if let Command::CreateTasks { tasks } | Command::CreateTaskRun { tasks } = self {
            return task_runs(tasks, BUDGET);
        }
        if encoded_len(&self) <= BUDGET {
            return vec![self];
        }
        match self {
            Command::UpdateTasks { from_node, updates } => {
                runs(updates, BUDGET).into_iter().map(|updates| Command::UpdateTasks { from_node, updates }).collect()
            }
            Command::RemoveTasks { ids } => runs(ids, BUDGET).into_iter().map(|ids| Command::RemoveTasks { ids }).collect(),
            other => vec![other],
        }
    }

    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::InitCluster { .. } => "init-cluster",
            Command::AddNode { .. } => "add-node",
            Command::UpdateNode { .. } => "update-node",
            Command::RemoveNode { .. } => "remove-node",
            Command::SetNodeStatus { .. } => "set-node-status",
            Command::RotateToken { .. } => "rotate-token",
            Command::CreateService { .. } => "create-service",
            Command::UpdateService { .. } => "update-service",
            Command::ScaleServices { .. } => "scale-services",
            Command::RollbackService { .. } => "rollback-service",
            Command::AutoRollback { .. } => "auto-rollback",
            Command::Autoscale { .. } => "autoscale",
            Command::RemoveServices { .. } => "remove-services",
            Command::CreateTasks { .. } | Command::CreateTaskRun { .. } => "create-tasks",
            Command::UpdateTasks { .. } => "update-tasks",
            Command::RemoveTasks { .. } => "remove-tasks",
            Command::PutImage { .. } => "put-image",
            Command::RemoveImage { .. } => "remove-image",
            Command::CreateNetwork { .. } => "create-network",
            Command::RemoveNetwork { .. } => "remove-network",
            Command::CreateData { .. } => "create-data",
            Command::RemoveData { .. } => "remove-data",
            Command::CreateVolume { .. } => "create-volume",
            Command::RemoveVolume { .. } => "remove-volume",
            Command::VolumeReport { .. } => "volume-report",
            Command::RecordCert { .. } => "record-cert",
            Command::UpdateCluster { .. } => "update-cluster",
            Command::CreateClient { .. } => "create-client",
            Command::RenewClient { .. } => "renew-client",
            Command::RotateCa { .. } => "rotate-ca",
            Command::FinishCaRotation { .. } => "finish-ca-rotation",
            Command::RemoveClient { .. } => "remove-client",
            Command::Noop => "noop",
            Command::Once { cmd, .. } => cmd.kind(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodePatch {
    pub availability: Option<Availability>,
    pub role: Option<Role>,
    pub label_add: BTreeMap<String, String>,
    pub label_rm: Vec<String>,
    pub address: Option<String>,
    pub resources: Option<(u64, u64)>,
    /// (WireGuard public key, UDP endpoint)
    pub overlay: Option<(String, String)>,
}

/// What applying a command produced: the log index it was applied at (the
/// new version of every object it touched) and the ids it touched.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Applied {
    pub version: u64,
    pub ids: Vec<String>,
}

/// Why a command was refused. Nothing of a refused command is applied.
#[derive(Clone, Debug, thiserror::Error, Serialize, Deserialize, PartialEq, Eq)]
pub enum ApplyError {
    #[error("{kind} {name:?} already exists")]
    NameTaken { kind: String, name: String },
    #[error("{kind} {what:?} not found")]
    NotFound { kind: String, what: String },
    #[error("{kind} id prefix {what:?} is ambiguous")]
    Ambiguous { kind: String, what: String },
    #[error("{kind} {what:?} changed since it was read (version {expected}, now {actual}); read it again")]
    VersionMismatch { kind: String, what: String, expected: u64, actual: u64 },
    #[error("{0}")]
    Refused(Refusal),
    #[error("cluster is already initialized")]
    AlreadyInitialized,
}

/// Requests that are well-formed but not allowed in the current state.
#[derive(Clone, Debug, thiserror::Error, Serialize, Deserialize, PartialEq, Eq)]
pub enum Refusal {
    #[error("service {service:?} is global: it runs one task per node and cannot be scaled")]
    ScaleGlobal { service: String },
    #[error("node {node:?} is a manager: demote it first")]
    RemoveManager { node: String },
    #[error("node {node:?} is ready: drain and stop it first, or use --force")]
    RemoveReady { node: String },
    #[error("{kind} {name:?} is used by service {service:?}")]
    InUse { kind: String, name: String, service: String },
    #[error("node {node:?} reports overlay {what} {value}, which node {other:?} holds: refused (two peers can't share a WireGuard key or endpoint)")]
    OverlayIdentityTaken { node: String, what: String, value: String, other: String },
    #[error("network {name:?}: subnet {subnet} overlaps network {other:?} ({other_subnet})")]
    SubnetOverlap { name: String, subnet: String, other: String, other_subnet: String },
    #[error("{message}")]
    InvalidSubnet { message: String },
    #[error("the network pool {pool} has no free /{prefix} left")]
    PoolExhausted { pool: String, prefix: u8 },
    #[error("{kind} {name:?} is {size} bytes: at most {max}")]
    TooLarge { kind: String, name: String, size: usize, max: usize },
    #[error("service {service:?} has no previous spec to roll back to")]
    NoPreviousSpec { service: String },
    #[error("service {service:?} was named twice in one request")]
    Duplicate { service: String },
    #[error("service {service:?} has {actual} replicas now, not the {expected} the autoscaler decided on")]
    AutoscaleStale { service: String, expected: u64, actual: u64 },
    #[error("volume {name:?} holds data on node {node:?}, which is down: its data there could not be deleted now (use --force to delete it when the node returns)")]
    VolumeNodeDown { name: String, node: String },
    #[error("port {port}/{protocol} is already published by service {service:?}")]
    PortInUse { port: u32, protocol: String, service: String },
    #[error("the CA is rotating already: wait until every node and client holds a certificate from the new CA (cluster status shows the rotation)")]
    CaRotating,
}

/// The outcome of one command.
pub type Outcome = Result<Applied, ApplyError>;

/// The response for one log entry: one outcome per command, in order.
pub type Response = Vec<Outcome>;
