//! The replicated state and the one function that changes it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::command::{Applied, ApplyError, Command, NodePatch, Refusal};
use super::objects::{ClientObj, ClusterObj, DataKind, DataObj, ImageObj, IssuedCert, NetworkObj, NodeObj, NodeStatus, Role, ServiceObj, VolumeObj, VolumeReplica, MAX_DATA};
use super::index::{Key, TaskIndex};
use super::task::{TaskObj, TaskState, TaskUpdate};

/// Everything the managers agree on. Cloned only to build snapshots.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub cluster: Option<ClusterObj>,
    pub nodes: BTreeMap<u64, NodeObj>,
    pub services: BTreeMap<String, ServiceObj>,
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskObj>,
    #[serde(default)]
    pub images: BTreeMap<String, ImageObj>,
    /// By name.
    pub networks: BTreeMap<String, NetworkObj>,
    /// By name.
    pub secrets: BTreeMap<String, DataObj>,
    /// By name.
    pub configs: BTreeMap<String, DataObj>,
    /// By name.
    #[serde(default)]
    pub volumes: BTreeMap<String, VolumeObj>,
    /// Recent client request ids with their outcomes (exactly-once writes).
    #[serde(default)]
    pub requests: RecentRequests,
    /// Revoked certificate serials (hex) until they expire, when they
    /// need no revoking any more: `node rm`, role changes, `client-cert rm`.
    #[serde(default)]
    pub revoked: BTreeMap<String, u64>,
    /// The log index of the last change to `revoked`.
    #[serde(default)]
    pub revoked_version: u64,
    /// Client identities by name.
    #[serde(default)]
    pub clients: BTreeMap<String, ClientObj>,
    /// Lookups over `tasks`, kept in step by `apply` (rebuilt after a
    /// snapshot is read: [`State::rebuild_index`]).
    #[serde(skip)]
    pub index: TaskIndex,
    /// One shared spec per service version: a task's spec is the largest
    /// part of it, and every task of a version has the same one.
    #[serde(skip)]
    spec_pool: std::collections::HashMap<(String, u64), std::sync::Arc<shoal_proto::control::ServiceSpec>>,
    /// Node name → id, kept in step by `apply` (a join checks that its
    /// name is free in O(1), not by scanning every node).
    #[serde(skip)]
    node_names: std::collections::HashMap<String, u64>,
}

/// The last [`super::command::RECENT_REQUESTS`] request ids and what each
/// one's write came to, oldest first out.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RecentRequests {
    outcomes: BTreeMap<String, Result<Applied, ApplyError>>,
    order: std::collections::VecDeque<String>,
}

impl RecentRequests {
    pub fn get(&self, id: &str) -> Option<&Result<Applied, ApplyError>> {
        self.outcomes.get(id)
    }

    fn record(&mut self, id: String, outcome: Result<Applied, ApplyError>) {
        if self.outcomes.insert(id.clone(), outcome).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > super::command::RECENT_REQUESTS {
            if let Some(old) = self.order.pop_front() {
                self.outcomes.remove(&old);
            }
        }
    }
}

/// Where networks created without `--subnet` get theirs, unless the
/// cluster was created with another `--address-pool`.
pub const NETWORK_POOL: &str = "100.64.0.0/10";
/// The size of a network created without `--subnet`: 64 slices.
pub const NETWORK_PREFIX: u8 = 20;
/// Each node gets its addresses on a network in slices of this size: the
/// first address of a slice is the node's gateway (its bridge), the next
/// ones its tasks'.
pub const SLICE_PREFIX: u8 = 26;

/// What one applied command changed, for watchers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Cluster,
    Node(u64),
    NodeRemoved(u64),
    Service(String),
    ServiceRemoved(String),
    Task(String),
    /// A task's id, and the node it had (its assignment stream learns).
    TaskRemoved(String, Option<u64>),
    Image(String),
    ImageRemoved(String),
    Network(String),
    NetworkRemoved(String),
    Data(DataKind, String),
    DataRemoved(DataKind, String),
    Volume(String),
    VolumeRemoved(String),
}

impl State {
    /// Rebuilds the task indexes from the tasks (after a snapshot or a
    /// restart: they are not part of the replicated state).
    pub fn rebuild_index(&mut self) {
        self.index = TaskIndex::build(self.tasks.values());
        self.node_names = self.nodes.values().map(|n| (n.name.clone(), n.id)).collect();
        self.spec_pool.clear();
        let ids: Vec<String> = self.tasks.keys().cloned().collect();
        for id in ids {
            if let Some(mut t) = self.tasks.remove(&id) {
                self.intern_spec(&mut t);
                self.tasks.insert(id, t);
            }
        }
    }

    /// Points `t`'s spec at the pool's copy for its service version.
    fn intern_spec(&mut self, t: &mut TaskObj) {
        let key = (t.service_id.clone(), t.spec_version);
        match self.spec_pool.get(&key) {
            Some(shared) if **shared == *t.spec => t.spec = shared.clone(),
            Some(_) => {}
            None => {
                self.spec_pool.insert(key, t.spec.clone());
            }
        }
    }

    /// The spec shared by service `id`'s tasks of spec version `version`,
    /// while any of them exists.
    pub fn task_spec(&self, id: &str, version: u64) -> Option<&shoal_proto::control::ServiceSpec> {
        self.spec_pool.get(&(id.to_string(), version)).map(|s| &**s)
    }

    /// Service `id`'s tasks with desired state running, counted per spec
    /// version (through the index).
    pub fn wanted_tasks(&self, id: &str) -> impl Iterator<Item = (u64, super::index::Wanted)> + '_ {
        self.index.wanted(id)
    }

    /// Service `id`'s tasks (every state), through the index.
    pub fn service_tasks<'a>(&'a self, id: &str) -> impl Iterator<Item = &'a TaskObj> + use<'a> {
        self.index.service_tasks(id).filter_map(|t| self.tasks.get(t))
    }

    /// The tasks that have node `id` (every state), through the index.
    pub fn node_tasks(&self, id: u64) -> impl Iterator<Item = &TaskObj> {
        self.index.node_tasks(id).filter_map(|t| self.tasks.get(t))
    }

    fn insert_task(&mut self, mut t: TaskObj) {
        self.intern_spec(&mut t);
        self.index.add(&t.id, &Key::of(&t));
        self.tasks.insert(t.id.clone(), t);
    }

    fn remove_task(&mut self, id: &str) -> Option<TaskObj> {
        let t = self.tasks.remove(id)?;
        self.index.remove(id, &Key::of(&t));
        let key = (t.service_id.clone(), t.spec_version);
        // The pool's own reference and this task's: the version's last task.
        if self.spec_pool.get(&key).is_some_and(|p| std::sync::Arc::ptr_eq(p, &t.spec) && std::sync::Arc::strong_count(p) == 2) {
            self.spec_pool.remove(&key);
        }
        Some(t)
    }

    /// Changes task `id` in place, keeping the indexes in step.
    fn modify_task<R>(&mut self, id: &str, f: impl FnOnce(&mut TaskObj) -> R) -> Option<R> {
        let t = self.tasks.get_mut(id)?;
        let before = Key::of(t);
        let r = f(t);
        self.index.update(id, &before, &Key::of(t));
        Some(r)
    }

    /// Adds `certs` to the revocation list and drops the entries that
    /// expired (an expired certificate is refused anyway).
    fn revoke(&mut self, certs: Vec<IssuedCert>, index: u64, now: u64) {
        self.revoked.retain(|_, exp| *exp > now);
        for c in certs.into_iter().filter(|c| c.expires_ms > now) {
            self.revoked.insert(c.serial, c.expires_ms);
        }
        self.revoked_version = index;
    }

    /// While the CA rotates: the nodes and client identities whose current
    /// certificate is not from the new CA yet (names). None otherwise.
    pub fn ca_rotation_pending(&self) -> Option<Vec<String>> {
        let c = self.cluster.as_ref().filter(|c| !c.ca_cross_pem.is_empty())?;
        let ca = c.ca_name();
        let nodes = self.nodes.values().filter(|n| n.certs.last().is_none_or(|x| x.issuer != ca)).map(|n| format!("node {}", n.name));
        let clients = self.clients.values().filter(|x| x.cert.issuer != ca).map(|x| format!("client {}", x.name));
        Some(nodes.chain(clients).collect())
    }

    /// Applies `cmd` at log index `index`, stamped `now` (ms). Validates
    /// everything first: on error nothing has changed.
    pub fn apply(&mut self, index: u64, now: u64, cmd: Command, changes: &mut Vec<Change>) -> Result<Applied, ApplyError> {
        let mut applied = Applied { version: index, ids: Vec::new() };
        match cmd {
            Command::Noop => {}
            Command::Once { id, cmd } => {
                if let Some(first) = self.requests.get(&id) {
                    return first.clone();
                }
                let outcome = self.apply(index, now, *cmd, changes);
                self.requests.record(id, outcome.clone());
                return outcome;
            }
            Command::CreateTasks { tasks } | Command::CreateTaskRun { tasks } => {
                if let Some(t) = tasks.iter().find(|t| self.tasks.contains_key(&t.id)) {
                    return Err(ApplyError::NameTaken { kind: "task id".into(), name: t.id.clone() });
                }
                for mut t in tasks {
                    t.version = index;
                    t.created_at_ms = now;
                    t.updated_at_ms = now;
                    t.state_at_ms = now;
                    let id = t.id.clone();
                    applied.ids.push(id.clone());
                    changes.push(Change::Task(id.clone()));
                    self.insert_task(t);
                    // Global tasks are created on their node.
                    self.address_task(&id, index, now, changes);
                    self.volume_task(&id, index, changes);
                }
            }
            Command::UpdateTasks { from_node, updates } => {
                for u in updates {
                    let id = u.id.clone();
                    let changed = self.modify_task(&id, |t| {
                        let changed = apply_task_update(t, from_node, u, now);
                        if changed {
                            t.version = index;
                            t.updated_at_ms = now;
                        }
                        changed
                    });
                    if changed == Some(true) {
                        applied.ids.push(id.clone());
                        changes.push(Change::Task(id.clone()));
                    }
                    // A task placed on a node gets its overlay addresses
                    // there, in the same entry, and its volumes count the
                    // node as one holding their data.
                    self.address_task(&id, index, now, changes);
                    self.volume_task(&id, index, changes);
                }
            }
            Command::PutImage { mut image } => {
                image.version = index;
                image.created_at_ms = now;
                applied.ids.push(image.reference.clone());
                changes.push(Change::Image(image.reference.clone()));
                self.images.insert(image.reference.clone(), image);
            }
            Command::RemoveImage { reference } => {
                if !self.images.contains_key(&reference) {
                    return Err(ApplyError::NotFound { kind: "image".into(), what: reference });
                }
                let reference = self.unused("image", reference, |spec, r| spec.image == r)?;
                self.images.remove(&reference);
                changes.push(Change::ImageRemoved(reference));
            }
            Command::CreateNetwork { mut network } => {
                if self.networks.contains_key(&network.name) {
                    return Err(ApplyError::NameTaken { kind: "network".into(), name: network.name });
                }
                if network.subnet.is_empty() {
                    network.subnet = self.free_subnet()?;
                }
                let net = crate::spec::parse_cidr(&network.subnet)
                    .map_err(|e| ApplyError::Refused(Refusal::InvalidSubnet { message: e.to_string() }))?;
                if net.1 >= SLICE_PREFIX {
                    return Err(ApplyError::Refused(Refusal::InvalidSubnet {
                        message: format!(
                            "subnet {} is too small: nodes take addresses in /{SLICE_PREFIX} slices and virtual IPs take one more, so a network needs a /{} or larger",
                            network.subnet,
                            SLICE_PREFIX - 1
                        ),
                    }));
                }
                network.slices.clear();
                network.last_address.clear();
                if let Some(other) = self.networks.values().find(|o| {
                    crate::spec::parse_cidr(&o.subnet).is_ok_and(|c| crate::spec::cidrs_overlap(c, net))
                }) {
                    return Err(ApplyError::Refused(Refusal::SubnetOverlap {
                        name: network.name,
                        subnet: network.subnet,
                        other: other.name.clone(),
                        other_subnet: other.subnet.clone(),
                    }));
                }
                network.gateway = crate::spec::first_host(net).to_string();
                network.version = index;
                network.created_at_ms = now;
                applied.ids.push(network.id.clone());
                changes.push(Change::Network(network.name.clone()));
                self.networks.insert(network.name.clone(), network);
            }
            Command::RemoveNetwork { name } => {
                if !self.networks.contains_key(&name) {
                    return Err(ApplyError::NotFound { kind: "network".into(), what: name });
                }
                let name = self.unused("network", name, |spec, n| spec.networks.iter().any(|x| x == n))?;
                self.networks.remove(&name);
                changes.push(Change::NetworkRemoved(name));
            }
            Command::CreateData { kind, mut obj } => {
                let map = self.data_mut(kind);
                if map.contains_key(&obj.name) {
                    return Err(ApplyError::NameTaken { kind: kind.as_str().into(), name: obj.name });
                }
                if obj.data.len() > MAX_DATA {
                    return Err(ApplyError::Refused(Refusal::TooLarge {
                        kind: kind.as_str().into(),
                        name: obj.name,
                        size: obj.data.len(),
                        max: MAX_DATA,
                    }));
                }
                obj.version = index;
                obj.created_at_ms = now;
                applied.ids.push(obj.id.clone());
                changes.push(Change::Data(kind, obj.name.clone()));
                map.insert(obj.name.clone(), obj);
            }
            Command::RemoveData { kind, name } => {
                if !self.data(kind).contains_key(&name) {
                    return Err(ApplyError::NotFound { kind: kind.as_str().into(), what: name });
                }
                let name = self.unused(kind.as_str(), name, |spec, n| match kind {
                    DataKind::Secret => spec.secrets.iter().any(|x| x == n),
                    DataKind::Config => spec.configs.iter().any(|x| x == n),
                })?;
                self.data_mut(kind).remove(&name);
                changes.push(Change::DataRemoved(kind, name));
            }
            Command::CreateVolume { mut volume } => {
                if self.volumes.contains_key(&volume.name) {
                    return Err(ApplyError::NameTaken { kind: "volume".into(), name: volume.name });
                }
                volume.nodes.clear();
                volume.version = index;
                volume.created_at_ms = now;
                applied.ids.push(volume.id.clone());
                changes.push(Change::Volume(volume.name.clone()));
                self.volumes.insert(volume.name.clone(), volume);
            }
            Command::RemoveVolume { name, force } => {
                let Some(v) = self.volumes.get(&name) else {
                    return Err(ApplyError::NotFound { kind: "volume".into(), what: name });
                };
                if !force {
                    let down = v.nodes.keys().find_map(|id| match self.nodes.get(id) {
                        Some(n) if n.status == NodeStatus::Down => Some(n.name.clone()),
                        _ => None,
                    });
                    if let Some(node) = down {
                        return Err(ApplyError::Refused(Refusal::VolumeNodeDown { name, node }));
                    }
                }
                let name = self.unused("volume", name, |spec, n| mounts_volume(spec, n))?;
                if let Some(v) = self.volumes.remove(&name) {
                    applied.ids.push(v.id);
                }
                changes.push(Change::VolumeRemoved(name));
            }
            Command::VolumeReport { node, volumes } => {
                if !self.nodes.contains_key(&node) {
                    return Err(node_not_found(node));
                }
                for (name, id, size) in volumes {
                    let Some(v) = self.volumes.get_mut(&name).filter(|v| v.id == id) else { continue };
                    let r = v.nodes.entry(node).or_default();
                    if r.size != size || r.updated_at_ms == 0 {
                        *r = VolumeReplica { size, updated_at_ms: now };
                        v.version = index;
                        changes.push(Change::Volume(name));
                    }
                }
            }
            Command::RemoveTasks { ids } => {
                for id in ids {
                    if let Some(t) = self.remove_task(&id) {
                        changes.push(Change::TaskRemoved(id, t.node_id));
                    }
                }
            }
            Command::InitCluster { mut cluster, mut node, client } => {
                if self.cluster.is_some() {
                    return Err(ApplyError::AlreadyInitialized);
                }
                if let Some(c) = client {
                    self.clients.insert(c.name.clone(), ClientObj { created_at_ms: now, ..c });
                }
                cluster.version = index;
                node.version = index;
                node.created_at_ms = now;
                node.updated_at_ms = now;
                applied.ids.push(node.id.to_string());
                changes.push(Change::Cluster);
                changes.push(Change::Node(node.id));
                self.cluster = Some(cluster);
                self.node_names.insert(node.name.clone(), node.id);
                self.nodes.insert(node.id, node);
            }
            Command::AddNode { mut node } => {
                if self.node_names.get(&node.name).is_some_and(|&id| id != node.id && self.nodes.contains_key(&id)) {
                    return Err(ApplyError::NameTaken { kind: "node".into(), name: node.name });
                }
                node.version = index;
                node.created_at_ms = now;
                node.updated_at_ms = now;
                applied.ids.push(node.id.to_string());
                changes.push(Change::Node(node.id));
                self.node_names.insert(node.name.clone(), node.id);
                if let Some(old) = self.nodes.insert(node.id, node)
                    && self.nodes.get(&old.id).is_none_or(|n| n.name != old.name)
                {
                    self.node_names.remove(&old.name);
                }
            }
            Command::UpdateNode { id, patch } => {
                if !self.nodes.contains_key(&id) {
                    return Err(node_not_found(id));
                }
                if let Some((key, endpoint)) = &patch.overlay {
                    for other in self.claim_overlay_identity(id, key, endpoint)? {
                        if let Some(o) = self.nodes.get_mut(&other) {
                            o.version = index;
                            o.updated_at_ms = now;
                        }
                        changes.push(Change::Node(other));
                    }
                }
                let node = self.nodes.get_mut(&id).ok_or_else(|| node_not_found(id))?;
                // A role change revokes the certificates of the old role;
                // the node's next heartbeat gets one with the new role.
                let mut revoke = Vec::new();
                if let Some(r) = patch.role.filter(|r| *r != node.role) {
                    node.certs.retain(|c| {
                        let keep = c.role == r.as_str();
                        if !keep {
                            revoke.push(c.clone());
                        }
                        keep
                    });
                    node.cert_pem.clear();
                }
                apply_patch(node, patch);
                node.version = index;
                node.updated_at_ms = now;
                changes.push(Change::Node(id));
                if !revoke.is_empty() {
                    self.revoke(revoke, index, now);
                }
            }
            Command::RemoveNode { id, force } => {
                let node = self.nodes.get(&id).ok_or_else(|| node_not_found(id))?;
                if node.role == Role::Manager {
                    return Err(ApplyError::Refused(Refusal::RemoveManager { node: node.name.clone() }));
                }
                if node.status == NodeStatus::Ready && !force {
                    return Err(ApplyError::Refused(Refusal::RemoveReady { node: node.name.clone() }));
                }
                if let Some(gone) = self.nodes.remove(&id) {
                    if self.node_names.get(&gone.name) == Some(&id) {
                        self.node_names.remove(&gone.name);
                    }
                    self.revoke(gone.certs, index, now);
                }
                changes.push(Change::NodeRemoved(id));
                for n in self.networks.values_mut() {
                    n.last_address.remove(&id);
                    if n.slices.remove(&id).is_some() {
                        n.version = index;
                        changes.push(Change::Network(n.name.clone()));
                    }
                }
                // The node's copies of volumes are gone with it.
                for v in self.volumes.values_mut() {
                    if v.nodes.remove(&id).is_some() {
                        v.version = index;
                        changes.push(Change::Volume(v.name.clone()));
                    }
                }
            }
            Command::SetNodeStatus { changes: status } => {
                // Nodes removed meanwhile are skipped: the status report raced
                // with `node rm`, and the removal wins.
                for (id, st) in status {
                    if let Some(node) = self.nodes.get_mut(&id) {
                        if node.status != st {
                            node.status = st;
                            node.version = index;
                            node.updated_at_ms = now;
                            changes.push(Change::Node(id));
                        }
                    }
                }
            }
            Command::RecordCert { node, cert, cert_pem } => {
                let n = self.nodes.get_mut(&node).ok_or_else(|| node_not_found(node))?;
                n.certs.retain(|c| c.expires_ms > now);
                n.certs.push(cert);
                n.cert_pem = cert_pem;
                n.version = index;
                changes.push(Change::Node(node));
            }
            Command::UpdateCluster { cert_expiry_ms, unlock_key } => {
                let cluster = self.cluster.as_mut().ok_or_else(|| ApplyError::NotFound {
                    kind: "cluster".into(),
                    what: "cluster".into(),
                })?;
                if let Some(ms) = cert_expiry_ms {
                    cluster.cert_expiry_ms = ms;
                }
                if let Some(k) = unlock_key {
                    cluster.unlock_key = k;
                }
                cluster.version = index;
                changes.push(Change::Cluster);
            }
            Command::CreateClient { client } => {
                if self.clients.contains_key(&client.name) {
                    return Err(ApplyError::NameTaken { kind: "client certificate".into(), name: client.name });
                }
                self.clients.insert(client.name.clone(), ClientObj { created_at_ms: now, ..client });
            }
            Command::RenewClient { name, cert } => {
                let c = self.clients.get_mut(&name).ok_or_else(|| ApplyError::NotFound {
                    kind: "client certificate".into(),
                    what: name.clone(),
                })?;
                let old = std::mem::replace(&mut c.cert, cert);
                self.revoke(vec![old], index, now);
            }
            Command::RotateCa { cert_pem, key_pem, cross_pem } => {
                let cluster = self.cluster.as_mut().ok_or_else(|| ApplyError::NotFound {
                    kind: "cluster".into(),
                    what: "cluster".into(),
                })?;
                if !cluster.ca_cross_pem.is_empty() {
                    return Err(ApplyError::Refused(Refusal::CaRotating));
                }
                cluster.ca_bundle_pem = format!("{cert_pem}{}", cluster.ca_cert_pem);
                cluster.ca_cert_pem = cert_pem;
                cluster.ca_key_pem = key_pem;
                cluster.ca_cross_pem = cross_pem;
                cluster.version = index;
                changes.push(Change::Cluster);
            }
            Command::FinishCaRotation { cert_pem } => {
                if let Some(cluster) = self.cluster.as_mut().filter(|c| c.ca_cert_pem == cert_pem && !c.ca_cross_pem.is_empty()) {
                    cluster.ca_bundle_pem.clear();
                    cluster.ca_cross_pem.clear();
                    cluster.version = index;
                    changes.push(Change::Cluster);
                }
            }
            Command::RemoveClient { name } => {
                let c = self.clients.remove(&name).ok_or_else(|| ApplyError::NotFound {
                    kind: "client certificate".into(),
                    what: name.clone(),
                })?;
                self.revoke(vec![c.cert], index, now);
            }
            Command::RotateToken { role, secret } => {
                let cluster = self.cluster.as_mut().ok_or_else(|| ApplyError::NotFound {
                    kind: "cluster".into(),
                    what: "cluster".into(),
                })?;
                match role {
                    Role::Manager => cluster.manager_secret = secret,
                    Role::Worker => cluster.worker_secret = secret,
                }
                cluster.version = index;
                changes.push(Change::Cluster);
            }
            Command::CreateService { mut service } => {
                let ingress = self.settle_ports(&mut service.spec, &service.id, index, now)?;
                self.check_references(&service.spec)?;
                if self.services.values().any(|s| s.spec.name == service.spec.name) {
                    return Err(ApplyError::NameTaken { kind: "service".into(), name: service.spec.name });
                }
                if self.services.contains_key(&service.id) {
                    return Err(ApplyError::NameTaken { kind: "service id".into(), name: service.id });
                }
                service.vips = self.vips_for(&service.spec, &service.vips, &service.id)?;
                self.add_ingress(ingress, changes);
                self.add_volumes(&service.spec, index, now, changes);
                service.version = index;
                service.created_at_ms = now;
                service.updated_at_ms = now;
                applied.ids.push(service.id.clone());
                changes.push(Change::Service(service.id.clone()));
                self.services.insert(service.id.clone(), *service);
            }
            Command::UpdateService { service, spec, expected_version } => {
                self.update_service(&service, *spec, expected_version, false, index, now, changes, &mut applied)?;
            }
            Command::RollbackService { service } => {
                let id = self.resolve_service(&service)?;
                let previous = self.services.get(&id).and_then(|s| s.previous_spec.clone());
                let Some(mut spec) = previous else {
                    return Err(ApplyError::Refused(Refusal::NoPreviousSpec { service }));
                };
                // The replica count is today's (Swarm keeps it too).
                if let Some(s) = self.services.get(&id) {
                    spec.replicas = s.spec.replicas;
                }
                self.update_service(&id, spec, 0, true, index, now, changes, &mut applied)?;
            }
            Command::AutoRollback { service, version, reason } => {
                let Some(s) = self.services.get(&service) else { return Ok(applied) };
                if s.rolling_back || s.version != version {
                    // Decided on an older spec: the orchestrator looks again.
                    changes.push(Change::Service(service));
                    return Ok(applied);
                }
                let Some(mut spec) = s.previous_spec.clone() else {
                    return Err(ApplyError::Refused(Refusal::NoPreviousSpec { service: s.spec.name.clone() }));
                };
                spec.replicas = s.spec.replicas;
                self.update_service(&service, spec, 0, true, index, now, changes, &mut applied)?;
                if let Some(s) = self.services.get_mut(&service) {
                    s.update_status = reason;
                }
            }
            Command::Autoscale { service, from, to, reason } => {
                let svc = self.services.get_mut(&service).ok_or_else(|| service_not_found(&service))?;
                if svc.spec.replicas != from {
                    return Err(ApplyError::Refused(Refusal::AutoscaleStale { service: svc.spec.name.clone(), expected: from, actual: svc.spec.replicas }));
                }
                svc.spec.replicas = to;
                svc.last_autoscale = Some(super::objects::AutoscaleDecision { at_ms: now, from, to, reason });
                svc.version = index;
                svc.updated_at_ms = now;
                applied.ids.push(service.clone());
                changes.push(Change::Service(service));
            }
            Command::ScaleServices { items } => {
                // Resolve and check every item before touching any.
                let mut resolved = Vec::with_capacity(items.len());
                for (what, replicas) in items {
                    let id = self.resolve_service(&what)?;
                    if resolved.iter().any(|(i, _)| *i == id) {
                        return Err(ApplyError::Refused(Refusal::Duplicate { service: what }));
                    }
                    let svc = &self.services[&id];
                    if svc.spec.mode == "global" {
                        return Err(ApplyError::Refused(Refusal::ScaleGlobal { service: svc.spec.name.clone() }));
                    }
                    resolved.push((id, replicas));
                }
                for (id, replicas) in resolved {
                    if let Some(svc) = self.services.get_mut(&id) {
                        svc.spec.replicas = replicas;
                        svc.version = index;
                        svc.updated_at_ms = now;
                        applied.ids.push(id.clone());
                        changes.push(Change::Service(id));
                    }
                }
            }
            Command::RemoveServices { services } => {
                let mut ids = Vec::with_capacity(services.len());
                for what in services {
                    let id = self.resolve_service(&what)?;
                    if ids.contains(&id) {
                        return Err(ApplyError::Refused(Refusal::Duplicate { service: what }));
                    }
                    ids.push(id);
                }
                for id in ids {
                    self.services.remove(&id);
                    applied.ids.push(id.clone());
                    changes.push(Change::ServiceRemoved(id));
                }
            }
        }
        Ok(applied)
    }

    /// Replaces a service's spec (the old one becomes its previous).
    #[allow(clippy::too_many_arguments)]
    fn update_service(
        &mut self,
        service: &str,
        mut spec: shoal_proto::control::ServiceSpec,
        expected_version: u64,
        rolling_back: bool,
        index: u64,
        now: u64,
        changes: &mut Vec<Change>,
        applied: &mut Applied,
    ) -> Result<(), ApplyError> {
        let id = self.resolve_service(service)?;
        let current = self.services.get(&id).map_or(0, |s| s.version);
        if expected_version != 0 && current != expected_version {
            return Err(ApplyError::VersionMismatch {
                kind: "service".into(),
                what: service.to_string(),
                expected: expected_version,
                actual: current,
            });
        }
        let ingress = self.settle_ports(&mut spec, &id, index, now)?;
        self.check_references(&spec)?;
        if self.services.values().any(|s| s.id != id && s.spec.name == spec.name) {
            return Err(ApplyError::NameTaken { kind: "service".into(), name: spec.name.clone() });
        }
        let old_vips = self.services.get(&id).map(|s| s.vips.clone()).unwrap_or_default();
        let vips = self.vips_for(&spec, &old_vips, &id)?;
        self.add_ingress(ingress, changes);
        self.add_volumes(&spec, index, now, changes);
        let svc = self.services.get_mut(&id).ok_or_else(|| service_not_found(service))?;
        svc.previous_spec = Some(std::mem::replace(&mut svc.spec, spec));
        svc.vips = vips;
        svc.rolling_back = rolling_back;
        svc.update_status.clear();
        svc.version = index;
        svc.updated_at_ms = now;
        svc.spec_updated_at_ms = now;
        applied.ids.push(id.clone());
        changes.push(Change::Service(id));
        Ok(())
    }

    pub fn data(&self, kind: DataKind) -> &BTreeMap<String, DataObj> {
        match kind {
            DataKind::Secret => &self.secrets,
            DataKind::Config => &self.configs,
        }
    }

    fn data_mut(&mut self, kind: DataKind) -> &mut BTreeMap<String, DataObj> {
        match kind {
            DataKind::Secret => &mut self.secrets,
            DataKind::Config => &mut self.configs,
        }
    }

    /// `name` back if no service and no live task uses it (tasks keep their
    /// own copy of the spec: one of an older spec, mid-update, still needs
    /// what it names).
    fn unused(
        &self,
        kind: &str,
        name: String,
        uses: impl Fn(&shoal_proto::control::ServiceSpec, &str) -> bool,
    ) -> Result<String, ApplyError> {
        let user = self
            .services
            .values()
            .find(|s| uses(&s.spec, &name))
            .map(|s| s.spec.name.clone())
            .or_else(|| self.tasks.values().find(|t| !t.state.is_terminal() && uses(&t.spec, &name)).map(|t| t.service_name.clone()));
        match user {
            Some(service) => Err(ApplyError::Refused(Refusal::InUse { kind: kind.into(), name, service })),
            None => Ok(name),
        }
    }

    /// Puts a service that publishes ports on the routing mesh's network
    /// (last among its networks) and takes one that no longer does off it;
    /// refuses a port another service publishes where either is in ingress
    /// mode (an ingress port is taken on every node). Returns the ingress
    /// network to create when the cluster has none yet: `add_ingress` adds
    /// it once every other check of the command has passed.
    fn settle_ports(&self, spec: &mut shoal_proto::control::ServiceSpec, service_id: &str, index: u64, now: u64) -> Result<Option<NetworkObj>, ApplyError> {
        use crate::spec::{is_ingress, INGRESS_NETWORK};
        for p in &spec.ports {
            let clash = self.services.values().filter(|s| s.id != service_id).find_map(|s| {
                s.spec
                    .ports
                    .iter()
                    .find(|q| q.published == p.published && q.protocol == p.protocol && (is_ingress(p) || is_ingress(q)))
                    .map(|_| s.spec.name.clone())
            });
            if let Some(other) = clash {
                return Err(ApplyError::Refused(Refusal::PortInUse { port: p.published, protocol: p.protocol.clone(), service: other }));
            }
        }
        spec.networks.retain(|n| n != INGRESS_NETWORK);
        if spec.ports.is_empty() {
            return Ok(None);
        }
        spec.networks.push(INGRESS_NETWORK.to_string());
        if self.networks.contains_key(INGRESS_NETWORK) {
            return Ok(None);
        }
        let subnet = self.free_subnet()?;
        let gateway = crate::spec::parse_cidr(&subnet).map(|c| crate::spec::first_host(c).to_string()).unwrap_or_default();
        Ok(Some(NetworkObj {
            // Deterministic (every manager applies the same entry); only one
            // network is ever named ingress at a time.
            id: format!("1e55{index:020x}"),
            name: INGRESS_NETWORK.to_string(),
            subnet,
            gateway,
            internal: false,
            labels: BTreeMap::from([("shoal.network.ingress".to_string(), "true".to_string())]),
            slices: BTreeMap::new(),
            last_address: BTreeMap::new(),
            version: index,
            created_at_ms: now,
        }))
    }

    fn add_ingress(&mut self, network: Option<NetworkObj>, changes: &mut Vec<Change>) {
        if let Some(n) = network {
            changes.push(Change::Network(n.name.clone()));
            self.networks.insert(n.name.clone(), n);
        }
    }

    /// Creates the named volumes a spec mounts that the cluster doesn't
    /// have yet, as Docker creates a volume on first use. The id comes
    /// from the log index and the name, so every replica makes the same.
    fn add_volumes(&mut self, spec: &shoal_proto::control::ServiceSpec, index: u64, now: u64, changes: &mut Vec<Change>) {
        for m in spec.mounts.iter().filter(|m| m.r#type == "volume") {
            if self.volumes.contains_key(&m.source) {
                continue;
            }
            let seed = format!("{index}/{}", m.source);
            let digest = ring::digest::digest(&ring::digest::SHA256, seed.as_bytes());
            let id = hex::encode(&digest.as_ref()[..12]);
            let v = VolumeObj {
                id,
                name: m.source.clone(),
                driver: "local".into(),
                labels: m.volume_labels.clone().into_iter().collect(),
                options: BTreeMap::new(),
                nodes: BTreeMap::new(),
                version: index,
                created_at_ms: now,
            };
            changes.push(Change::Volume(v.name.clone()));
            self.volumes.insert(v.name.clone(), v);
        }
    }

    /// A task placed on a node: each named volume it mounts now holds (or
    /// will hold) data there.
    fn volume_task(&mut self, id: &str, index: u64, changes: &mut Vec<Change>) {
        let Some(t) = self.tasks.get(id) else { return };
        let Some(node) = t.node_id else { return };
        if t.state.is_terminal() {
            return;
        }
        for m in t.spec.mounts.iter().filter(|m| m.r#type == "volume") {
            if let Some(v) = self.volumes.get_mut(&m.source)
                && !v.nodes.contains_key(&node)
            {
                v.nodes.insert(node, VolumeReplica::default());
                v.version = index;
                changes.push(Change::Volume(v.name.clone()));
            }
        }
    }

    /// Every network, secret and config a service spec names must exist
    /// (the ingress network is made with the first service that needs it).
    fn check_references(&self, spec: &shoal_proto::control::ServiceSpec) -> Result<(), ApplyError> {
        let missing = |kind: &str, what: &String| ApplyError::NotFound { kind: kind.into(), what: what.clone() };
        if let Some(n) = spec.networks.iter().find(|n| !self.networks.contains_key(*n) && *n != crate::spec::INGRESS_NETWORK) {
            return Err(missing("network", n));
        }
        if let Some(n) = spec.secrets.iter().find(|n| !self.secrets.contains_key(*n)) {
            return Err(missing("secret", n));
        }
        if let Some(n) = spec.configs.iter().find(|n| !self.configs.contains_key(*n)) {
            return Err(missing("config", n));
        }
        Ok(())
    }

    /// The cluster's address pool.
    pub fn address_pool(&self) -> &str {
        match &self.cluster {
            Some(c) if !c.address_pool.is_empty() => &c.address_pool,
            _ => NETWORK_POOL,
        }
    }

    /// The first /NETWORK_PREFIX of the pool that no network overlaps.
    fn free_subnet(&self) -> Result<String, ApplyError> {
        let pool_text = self.address_pool().to_string();
        let exhausted = || ApplyError::Refused(Refusal::PoolExhausted { pool: pool_text.clone(), prefix: NETWORK_PREFIX });
        let pool = crate::spec::parse_cidr(&pool_text).map_err(|_| exhausted())?;
        let prefix = NETWORK_PREFIX.max(pool.1);
        let taken: Vec<_> = self.networks.values().filter_map(|n| crate::spec::parse_cidr(&n.subnet).ok()).collect();
        let count = 1u32 << (prefix - pool.1);
        (0..count)
            .map(|i| (std::net::Ipv4Addr::from(u32::from(pool.0) + (i << (32 - prefix))), prefix))
            .find(|c| !taken.iter().any(|t| crate::spec::cidrs_overlap(*t, *c)))
            .map(|(a, p)| format!("{a}/{p}"))
            .ok_or_else(exhausted)
    }

    /// The service's virtual IPs for `spec`: one per network in vip mode,
    /// kept where it already had one (`old`), new ones from the network's
    /// last slice, which tasks never get.
    fn vips_for(&self, spec: &shoal_proto::control::ServiceSpec, old: &BTreeMap<String, String>, service_id: &str) -> Result<BTreeMap<String, String>, ApplyError> {
        let mut out = BTreeMap::new();
        if spec.endpoint_mode == "dnsrr" {
            return Ok(out);
        }
        // The routing mesh balances published ports itself: no virtual IP
        // on its network.
        for name in spec.networks.iter().filter(|n| *n != crate::spec::INGRESS_NETWORK) {
            if let Some(v) = old.get(name) {
                out.insert(name.clone(), v.clone());
                continue;
            }
            let Some(net) = self.networks.get(name) else { continue };
            let Ok(subnet) = crate::spec::parse_cidr(&net.subnet) else { continue };
            let size = 1u32 << (32 - SLICE_PREFIX);
            let base = u32::from(subnet.0) + (1u32 << (32 - subnet.1)) - size;
            let used: std::collections::HashSet<String> = self
                .services
                .values()
                .filter(|s| s.id != service_id)
                .filter_map(|s| s.vips.get(name).cloned())
                .collect();
            let vip = (1..size - 1)
                .map(|o| std::net::Ipv4Addr::from(base + o).to_string())
                .find(|a| !used.contains(a))
                .ok_or_else(|| ApplyError::Refused(Refusal::InvalidSubnet {
                    message: format!("network {name:?} has no virtual IP left for service {:?}: its last /{SLICE_PREFIX} holds them", spec.name),
                }))?;
            out.insert(name.clone(), vip);
        }
        Ok(out)
    }

    /// Gives task `id` an address on each of its networks from its node's
    /// slices (taking a new slice when they are full), if it is placed, not
    /// finished, and has none yet. A network with no address left fails
    /// the task with the reason.
    fn address_task(&mut self, id: &str, index: u64, now: u64, changes: &mut Vec<Change>) {
        let Some(t) = self.tasks.get(id) else { return };
        let Some(node) = t.node_id else { return };
        if t.spec.networks.is_empty() || !t.addresses.is_empty() || t.state.is_terminal() {
            return;
        }
        let nets = t.spec.networks.clone();
        let mut addresses = Vec::new();
        let mut new_slices = Vec::new();
        let mut handed_out = Vec::new();
        for name in &nets {
            match self.free_address(name, node, &new_slices) {
                Ok((addr, raw, slice)) => {
                    if let Some(sl) = slice {
                        new_slices.push((name.clone(), sl));
                    }
                    addresses.push(addr);
                    handed_out.push((name.clone(), raw));
                }
                Err(why) => {
                    let rejected = self.modify_task(id, |t| {
                        t.state = TaskState::Rejected;
                        t.state_at_ms = now;
                        t.error = why;
                        t.message = "no overlay address".into();
                        t.version = index;
                    });
                    if rejected.is_some() {
                        changes.push(Change::Task(id.to_string()));
                    }
                    return;
                }
            }
        }
        for (name, slice) in new_slices {
            if let Some(n) = self.networks.get_mut(&name) {
                n.slices.entry(node).or_default().push(slice);
                n.version = index;
                changes.push(Change::Network(name));
            }
        }
        for (name, raw) in handed_out {
            if let Some(n) = self.networks.get_mut(&name) {
                n.last_address.insert(node, raw);
            }
        }
        if self
            .modify_task(id, |t| {
                t.addresses = addresses;
                t.version = index;
            })
            .is_some()
        {
            changes.push(Change::Task(id.to_string()));
        }
    }

    /// A free `ip/SLICE_PREFIX` on network `name` in one of `node`'s slices
    /// (with `pending` slices this entry is adding): the first free one
    /// after the last the node handed out, wrapping; or a new slice for
    /// it. Also returns the address as an integer.
    fn free_address(&self, name: &str, node: u64, pending: &[(String, String)]) -> Result<(String, u32, Option<String>), String> {
        let net = self.networks.get(name).ok_or_else(|| format!("network {name:?} does not exist"))?;
        let subnet = crate::spec::parse_cidr(&net.subnet).map_err(|e| e.to_string())?;
        let size = 1u32 << (32 - SLICE_PREFIX);
        let mine = net.slices.get(&node).into_iter().flatten().chain(pending.iter().filter(|(n, _)| n == name).map(|(_, s)| s));
        // .0 and the last address of a slice stay unused, .1 is the gateway.
        let mut candidates: Vec<u32> = mine
            .filter_map(|slice| crate::spec::parse_cidr(slice).ok())
            .flat_map(|(base, _)| (2..size - 1).map(move |o| u32::from(base) + o))
            .collect();
        candidates.sort_unstable();
        let last = net.last_address.get(&node).copied().unwrap_or(0);
        let after = candidates.partition_point(|a| *a <= last);
        let (earlier, later) = candidates.split_at(after);
        if let Some(a) = later.iter().chain(earlier).copied().find(|a| !self.index.address_used(name, *a)) {
            return Ok((format!("{}/{SLICE_PREFIX}", std::net::Ipv4Addr::from(a)), a, None));
        }
        let taken: std::collections::HashSet<u32> = net
            .slices
            .values()
            .flatten()
            .chain(pending.iter().filter(|(n, _)| n == name).map(|(_, s)| s))
            .filter_map(|s| crate::spec::parse_cidr(s).ok())
            .map(|(a, _)| u32::from(a))
            .collect();
        // The last slice holds the network's virtual IPs.
        let count = (1u32 << (SLICE_PREFIX - subnet.1)) - 1;
        let base = (0..count)
            .map(|i| u32::from(subnet.0) + i * size)
            .find(|b| !taken.contains(b))
            .ok_or_else(|| format!("network {name:?} ({}) has no free address: every /{SLICE_PREFIX} slice is taken", net.subnet))?;
        let slice = format!("{}/{SLICE_PREFIX}", std::net::Ipv4Addr::from(base));
        Ok((format!("{}/{SLICE_PREFIX}", std::net::Ipv4Addr::from(base + 2)), base + 2, Some(slice)))
    }

    /// A service by exact id, exact name, or unique id prefix.
    pub fn resolve_service(&self, what: &str) -> Result<String, ApplyError> {
        if self.services.contains_key(what) {
            return Ok(what.to_string());
        }
        if let Some(s) = self.services.values().find(|s| s.spec.name == what) {
            return Ok(s.id.clone());
        }
        let mut by_prefix = self.services.keys().filter(|id| !what.is_empty() && id.starts_with(what));
        match (by_prefix.next(), by_prefix.next()) {
            (Some(id), None) => Ok(id.clone()),
            (Some(_), Some(_)) => Err(ApplyError::Ambiguous { kind: "service".into(), what: what.into() }),
            _ => Err(service_not_found(what)),
        }
    }

    /// A node by exact id (hex), exact name, or unique id prefix.
    pub fn resolve_node(&self, what: &str) -> Result<u64, ApplyError> {
        if let Some(n) = self.nodes.values().find(|n| n.name == what) {
            return Ok(n.id);
        }
        let mut by_prefix = self
            .nodes
            .keys()
            .filter(|id| !what.is_empty() && format_node_id(**id).starts_with(what));
        match (by_prefix.next(), by_prefix.next()) {
            (Some(id), None) => Ok(*id),
            (Some(_), Some(_)) => Err(ApplyError::Ambiguous { kind: "node".into(), what: what.into() }),
            _ => Err(ApplyError::NotFound { kind: "node".into(), what: what.into() }),
        }
    }
}

/// Node ids are shown as 16 hex digits.
pub fn format_node_id(id: u64) -> String {
    format!("{id:016x}")
}

fn apply_patch(node: &mut NodeObj, patch: NodePatch) {
    if let Some(a) = patch.availability {
        node.availability = a;
    }
    if let Some(r) = patch.role {
        node.role = r;
    }
    for k in patch.label_rm {
        node.labels.remove(&k);
    }
    node.labels.extend(patch.label_add);
    if let Some(addr) = patch.address {
        node.address = addr;
    }
    if let Some((cpus, mem)) = patch.resources {
        node.nano_cpus = cpus;
        node.memory_bytes = mem;
    }
    if let Some((key, endpoint)) = patch.overlay {
        node.overlay_key = key;
        node.overlay_endpoint = endpoint;
    }
}

/// Applies the legal parts of `u` to `t`; returns whether anything changed.
/// An agent may only report on tasks assigned to it.
fn apply_task_update(t: &mut TaskObj, from_node: Option<u64>, u: TaskUpdate, now: u64) -> bool {
    if from_node.is_some() && from_node != t.node_id {
        return false;
    }
    let mut changed = false;
    if let Some(st) = u.state {
        if t.state.can_advance_to(st) {
            t.state = st;
            t.state_at_ms = now;
            changed = true;
        } else {
            // A stale report: its details belong to an older state.
            return changed;
        }
    }
    if let Some(d) = u.desired_state {
        if d > t.desired_state {
            t.desired_state = d;
            changed = true;
        }
    }
    if let Some(n) = u.node_id {
        if t.node_id != Some(n) {
            t.node_id = Some(n);
            changed = true;
        }
    }
    if let Some(m) = u.message {
        changed |= t.message != m;
        t.message = m;
    }
    if let Some(e) = u.error {
        changed |= t.error != e;
        t.error = e;
    }
    if let Some(c) = u.exit_code {
        changed |= t.exit_code != Some(c);
        t.exit_code = Some(c);
    }
    if let Some(a) = u.addresses {
        changed |= t.addresses != a;
        t.addresses = a;
    }
    changed
}

/// Whether `spec` mounts the named volume `name`.
pub fn mounts_volume(spec: &shoal_proto::control::ServiceSpec, name: &str) -> bool {
    spec.mounts.iter().any(|m| m.r#type == "volume" && m.source == name)
}

impl State {
    /// The node, other than `id`, that holds overlay `key` or `endpoint`,
    /// and which of the two it holds.
    pub fn overlay_identity_holder(&self, id: u64, key: &str, endpoint: &str) -> Option<(&NodeObj, &'static str)> {
        self.nodes.values().filter(|o| o.id != id).find_map(|o| {
            if !key.is_empty() && o.overlay_key == key {
                Some((o, "key"))
            } else if !endpoint.is_empty() && o.overlay_endpoint == endpoint {
                Some((o, "endpoint"))
            } else {
                None
            }
        })
    }

    /// Lets node `id` take overlay `key` and `endpoint`: refused while a
    /// node that is not down holds either (a peer claiming another's
    /// endpoint would take its traffic); a down node's identity is
    /// cleared (a machine reinstalled and joined again as a new node).
    /// Returns the nodes whose identity was cleared.
    fn claim_overlay_identity(&mut self, id: u64, key: &str, endpoint: &str) -> Result<Vec<u64>, ApplyError> {
        let mut cleared = Vec::new();
        while let Some((other, what)) = self.overlay_identity_holder(id, key, endpoint) {
            if other.status != NodeStatus::Down {
                let name = self.nodes.get(&id).map(|n| n.name.clone()).unwrap_or_default();
                let value = if what == "key" { key } else { endpoint };
                return Err(ApplyError::Refused(Refusal::OverlayIdentityTaken {
                    node: name,
                    what: what.into(),
                    value: value.into(),
                    other: other.name.clone(),
                }));
            }
            let other = other.id;
            if let Some(o) = self.nodes.get_mut(&other) {
                o.overlay_key.clear();
                o.overlay_endpoint.clear();
            }
            cleared.push(other);
        }
        Ok(cleared)
    }
}

fn node_not_found(id: u64) -> ApplyError {
    ApplyError::NotFound { kind: "node".into(), what: format_node_id(id) }
}

fn service_not_found(what: &str) -> ApplyError {
    ApplyError::NotFound { kind: "service".into(), what: what.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::objects::ServiceObj;
    use shoal_proto::control::ServiceSpec;

    fn svc(id: &str, name: &str, mode: &str) -> Command {
        Command::CreateService {
            service: Box::new(ServiceObj::new(
                id.into(),
                ServiceSpec { name: name.into(), image: "bb:1".into(), mode: mode.into(), replicas: 1, ..Default::default() },
            )),
        }
    }

    fn apply(st: &mut State, index: u64, cmd: Command) -> Result<Applied, ApplyError> {
        st.apply(index, 1000 + index, cmd, &mut Vec::new())
    }

    #[test]
    fn volumes_are_made_by_first_use_follow_their_tasks_and_are_removed_only_when_unused() {
        use crate::store::objects::{NodeObj, Role};
        use shoal_proto::control::Mount;
        let mut st = State::default();
        for id in [1, 2] {
            apply(&mut st, id, Command::AddNode { node: NodeObj::new(id, &format!("n{id}"), Role::Worker, "198.18.0.1:7700") }).unwrap();
        }
        let mut spec = ServiceSpec { name: "db".into(), image: "bb:1".into(), mode: "replicated".into(), replicas: 1, ..Default::default() };
        spec.mounts = vec![Mount {
            r#type: "volume".into(),
            source: "data".into(),
            target: "/data".into(),
            volume_labels: [("tier".to_string(), "db".to_string())].into(),
            ..Default::default()
        }];
        apply(&mut st, 10, Command::CreateService { service: Box::new(ServiceObj::new("s1".into(), spec.clone())) }).unwrap();
        let v = st.volumes.get("data").cloned().unwrap();
        assert_eq!((v.driver.as_str(), v.nodes.len()), ("local", 0));
        assert_eq!(v.labels.get("tier").map(String::as_str), Some("db"), "volume-label on the mount labels a volume made by first use");
        // Every replica derives the same id for a volume made by first use.
        let mut other = State::default();
        for id in [1, 2] {
            apply(&mut other, id, Command::AddNode { node: NodeObj::new(id, &format!("n{id}"), Role::Worker, "198.18.0.1:7700") }).unwrap();
        }
        apply(&mut other, 10, Command::CreateService { service: Box::new(ServiceObj::new("s1".into(), spec.clone())) }).unwrap();
        assert_eq!(other.volumes["data"].id, v.id);
        // A task placed on node 2: the volume holds data there.
        let mut t = TaskObj::new(&st.services["s1"], 1, None, 0, "created");
        t.id = "t1".into();
        apply(&mut st, 11, Command::CreateTasks { tasks: vec![t] }).unwrap();
        let place = TaskUpdate { id: "t1".into(), state: Some(TaskState::Assigned), node_id: Some(2), ..Default::default() };
        apply(&mut st, 12, Command::UpdateTasks { from_node: None, updates: vec![place] }).unwrap();
        assert_eq!(st.volumes["data"].nodes.keys().copied().collect::<Vec<_>>(), [2]);
        // Reports: sizes recorded; another id's report ignored.
        apply(&mut st, 13, Command::VolumeReport { node: 2, volumes: vec![("data".into(), v.id.clone(), 4096), ("data".into(), "old".into(), 1)] }).unwrap();
        assert_eq!(st.volumes["data"].nodes[&2].size, 4096);
        // In use: refused.
        let e = apply(&mut st, 14, Command::RemoveVolume { name: "data".into(), force: true }).unwrap_err();
        assert!(e.to_string().contains("used by service \"db\""), "{e}");
        apply(&mut st, 15, Command::RemoveServices { services: vec!["db".into()] }).unwrap();
        apply(&mut st, 16, Command::UpdateTasks { from_node: None, updates: vec![TaskUpdate { id: "t1".into(), state: Some(TaskState::Shutdown), ..Default::default() }] }).unwrap();
        // A node holding data is down: refused unless forced.
        apply(&mut st, 17, Command::SetNodeStatus { changes: vec![(2, NodeStatus::Down)] }).unwrap();
        let e = apply(&mut st, 18, Command::RemoveVolume { name: "data".into(), force: false }).unwrap_err();
        assert!(e.to_string().contains("node \"n2\", which is down"), "{e}");
        apply(&mut st, 19, Command::RemoveVolume { name: "data".into(), force: true }).unwrap();
        assert!(st.volumes.is_empty());
        // Explicit create: name taken is refused.
        let vol = VolumeObj { id: "v".into(), name: "x".into(), driver: "local".into(), labels: Default::default(), options: Default::default(), nodes: Default::default(), version: 0, created_at_ms: 0 };
        apply(&mut st, 20, Command::CreateVolume { volume: vol.clone() }).unwrap();
        assert!(matches!(apply(&mut st, 21, Command::CreateVolume { volume: vol }), Err(ApplyError::NameTaken { .. })));
    }

    #[test]
    fn a_node_cannot_take_a_live_nodes_overlay_key_or_endpoint() {
        use crate::store::objects::{NodeObj, Role};
        let mut st = State::default();
        for id in [1, 2] {
            apply(&mut st, id, Command::AddNode { node: NodeObj::new(id, &format!("n{id}"), Role::Worker, "198.18.0.1:7700") }).unwrap();
        }
        let claim = |st: &mut State, index: u64, id: u64, key: &str, endpoint: &str| {
            let patch = NodePatch { overlay: Some((key.into(), endpoint.into())), ..Default::default() };
            apply(st, index, Command::UpdateNode { id, patch })
        };
        claim(&mut st, 3, 1, "k1", "198.18.0.1:51820").unwrap();
        let e = claim(&mut st, 4, 2, "k2", "198.18.0.1:51820").unwrap_err();
        assert!(e.to_string().contains("reports overlay endpoint 198.18.0.1:51820, which node \"n1\" holds"), "{e}");
        let e = claim(&mut st, 5, 2, "k1", "198.18.0.2:51820").unwrap_err();
        assert!(e.to_string().contains("overlay key k1"), "{e}");
        assert!(st.nodes[&2].overlay_key.is_empty(), "a refused claim changes nothing");
        // A down node's identity goes to the node that claims it.
        apply(&mut st, 6, Command::SetNodeStatus { changes: vec![(1, NodeStatus::Down)] }).unwrap();
        claim(&mut st, 7, 2, "k2", "198.18.0.1:51820").unwrap();
        assert_eq!((st.nodes[&1].overlay_key.as_str(), st.nodes[&1].overlay_endpoint.as_str()), ("", ""));
        assert_eq!(st.nodes[&2].overlay_endpoint, "198.18.0.1:51820");
        // When it comes back it can't take it back while the other holds it.
        apply(&mut st, 8, Command::SetNodeStatus { changes: vec![(1, NodeStatus::Ready)] }).unwrap();
        assert!(claim(&mut st, 9, 1, "k1", "198.18.0.1:51820").is_err());
        claim(&mut st, 10, 1, "k1", "198.18.0.3:51820").unwrap();
    }

    #[test]
    fn many_task_commands_split_into_entries_that_fit() {
        use crate::store::command::{MAX_ENTRY_BYTES, encoded_len};
        let mut st = State::default();
        apply(&mut st, 1, svc("s1", "big", "replicated")).unwrap();
        let tasks: Vec<TaskObj> = (1..=20_000u64)
            .map(|slot| {
                let mut t = TaskObj::new(&st.services["s1"], slot, None, 0, "created");
                t.id = format!("{slot:024x}");
                t
            })
            .collect();
        let whole = Command::CreateTasks { tasks };
        assert!(encoded_len(&whole) > MAX_ENTRY_BYTES, "the test needs a command too big for one entry");
        let whole_len = encoded_len(&whole);
        let parts = whole.clone().split();
        assert!(parts.len() > 1);
        let mut n = 0;
        let mut parts_len = 0;
        for p in &parts {
            assert!(encoded_len(p) <= MAX_ENTRY_BYTES / 2, "{} bytes", encoded_len(p));
            parts_len += encoded_len(p);
            // Each run encodes its one spec once, and decodes to the same
            // tasks, sharing one spec.
            let Command::CreateTaskRun { tasks } = p else { panic!("a run of new tasks is a CreateTaskRun, not {}", p.kind()) };
            n += tasks.len();
            let bytes = postcard::to_stdvec(p).unwrap();
            let Command::CreateTaskRun { tasks: back } = postcard::from_bytes::<Command>(&bytes).unwrap() else { panic!("decoded another command") };
            assert_eq!(&back, tasks);
            assert!(back.windows(2).all(|w| std::sync::Arc::ptr_eq(&w[0].spec, &w[1].spec)));
        }
        assert_eq!(n, 20_000);
        assert!(parts_len < whole_len * 3 / 4, "runs {parts_len} bytes against {whole_len} with the spec in every task");
        // Tasks of two specs in one run keep their own.
        let mut two = match whole { Command::CreateTasks { tasks } => tasks[..4].to_vec(), _ => unreachable!() };
        let mut other = (*two[1].spec).clone();
        other.image = "other:2".into();
        two[1].spec = std::sync::Arc::new(other);
        let runs = Command::CreateTasks { tasks: two.clone() }.split();
        assert_eq!(runs.len(), 1);
        let bytes = postcard::to_stdvec(&runs[0]).unwrap();
        let Command::CreateTaskRun { tasks: back } = postcard::from_bytes::<Command>(&bytes).unwrap() else { panic!("decoded another command") };
        assert_eq!(back, two);
        assert_eq!(back[1].spec.image, "other:2");
        assert!(std::sync::Arc::ptr_eq(&back[0].spec, &back[2].spec));
        // A cut-off run is an error at decode, not a shorter run.
        assert!(postcard::from_bytes::<Command>(&bytes[..bytes.len() / 2]).is_err());
        for (i, p) in parts.into_iter().enumerate() {
            apply(&mut st, 2 + i as u64, p).unwrap();
        }
        assert_eq!(st.tasks.len(), 20_000);
        // Small commands stay whole.
        assert_eq!(Command::Noop.split().len(), 1);
    }

    #[test]
    fn a_request_id_is_applied_once_and_answers_the_same() {
        use crate::store::command::RECENT_REQUESTS;
        let mut st = State::default();
        let once = |id: &str, c: Command| Command::Once { id: id.into(), cmd: Box::new(c) };
        let first = apply(&mut st, 1, once("r1", svc("s1", "web", "replicated"))).unwrap();
        // The same request again (a retry): not NameTaken, the first answer.
        assert_eq!(apply(&mut st, 2, once("r1", svc("s1", "web", "replicated"))).unwrap(), first);
        assert_eq!(st.services.len(), 1);
        // Another request for the same name is a new write: refused, and a
        // retry of it gets the same refusal.
        let e = apply(&mut st, 3, once("r2", svc("s2", "web", "replicated"))).unwrap_err();
        assert_eq!(apply(&mut st, 4, once("r2", Command::Noop)).unwrap_err(), e);
        // Bounded: the oldest ids are forgotten.
        for i in 0..RECENT_REQUESTS {
            apply(&mut st, 10 + i as u64, once(&format!("n{i}"), Command::Noop)).unwrap();
        }
        assert!(st.requests.get("r1").is_none());
        assert!(st.requests.get(&format!("n{}", RECENT_REQUESTS - 1)).is_some());
    }

    #[test]
    fn rollback_swaps_specs_and_marks_the_rollout() {
        let mut st = State::default();
        apply(&mut st, 1, svc("s1", "web", "replicated")).unwrap();
        assert!(matches!(apply(&mut st, 2, Command::RollbackService { service: "web".into() }), Err(ApplyError::Refused(Refusal::NoPreviousSpec { .. }))));
        let mut spec = st.services["s1"].spec.clone();
        spec.image = "bb:2".into();
        apply(&mut st, 3, Command::UpdateService { service: "web".into(), spec: Box::new(spec), expected_version: 0 }).unwrap();
        apply(&mut st, 4, Command::ScaleServices { items: vec![("web".into(), 5)] }).unwrap();
        apply(&mut st, 5, Command::RollbackService { service: "web".into() }).unwrap();
        let s = &st.services["s1"];
        assert_eq!((s.spec.image.as_str(), s.spec.replicas, s.rolling_back), ("bb:1", 5, true));
        assert_eq!(s.previous_spec.as_ref().map(|p| p.image.as_str()), Some("bb:2"));
        let spec = s.spec.clone();
        apply(&mut st, 6, Command::UpdateService { service: "web".into(), spec: Box::new(spec), expected_version: 0 }).unwrap();
        assert!(!st.services["s1"].rolling_back);
    }

    fn publishing(id: &str, name: &str, port: u32, mode: &str) -> Command {
        let mut cmd = svc(id, name, "replicated");
        if let Command::CreateService { service } = &mut cmd {
            service.spec.ports.push(shoal_proto::control::Port { published: port, target: 80, protocol: "tcp".into(), mode: mode.into() });
        }
        cmd
    }

    #[test]
    fn publishing_joins_the_ingress_network_and_reserves_the_port() {
        let mut st = State::default();
        apply(&mut st, 1, publishing("a1", "web", 8080, "ingress")).unwrap();
        // The mesh's network is made with the first service that needs it.
        let ingress = &st.networks["ingress"];
        assert_eq!(ingress.subnet, "100.64.0.0/20");
        assert_eq!(st.services["a1"].spec.networks, ["ingress"]);
        assert!(st.services["a1"].vips.is_empty(), "no virtual IP on the mesh's network");
        // An ingress port is the cluster's: any other service, any mode, is refused.
        for (i, mode) in ["ingress", "host"].into_iter().enumerate() {
            let err = apply(&mut st, 2 + i as u64, publishing("b2", "other", 8080, mode)).unwrap_err();
            assert!(matches!(&err, ApplyError::Refused(Refusal::PortInUse { port: 8080, service, .. }) if service == "web"), "{err}");
        }
        // Host-mode ports may be shared (the scheduler keeps them apart).
        apply(&mut st, 5, publishing("c3", "h1", 9090, "host")).unwrap();
        apply(&mut st, 6, publishing("d4", "h2", 9090, "host")).unwrap();
        assert_eq!(st.networks.len(), 1, "one ingress network for all");
        // A service that stops publishing leaves it; the network stays (in
        // use by the others) until `network rm`.
        let mut spec = st.services["a1"].spec.clone();
        spec.ports.clear();
        apply(&mut st, 7, Command::UpdateService { service: "web".into(), spec: Box::new(spec), expected_version: 0 }).unwrap();
        assert!(st.services["a1"].spec.networks.is_empty());
        assert!(matches!(apply(&mut st, 8, Command::RemoveNetwork { name: "ingress".into() }), Err(ApplyError::Refused(Refusal::InUse { .. }))));
    }

    #[test]
    fn duplicate_names_are_refused() {
        let mut st = State::default();
        apply(&mut st, 1, svc("a1", "web", "replicated")).unwrap();
        let err = apply(&mut st, 2, svc("b2", "web", "replicated")).unwrap_err();
        assert!(matches!(err, ApplyError::NameTaken { .. }));
        assert_eq!(st.services.len(), 1);
    }

    #[test]
    fn a_scale_with_one_bad_item_changes_nothing() {
        let mut st = State::default();
        apply(&mut st, 1, svc("a1", "web", "replicated")).unwrap();
        apply(&mut st, 2, svc("g1", "mon", "global")).unwrap();
        for items in [
            vec![("web".to_string(), 5), ("nope".to_string(), 1)],
            vec![("web".to_string(), 5), ("mon".to_string(), 1)],
            vec![("web".to_string(), 5), ("a1".to_string(), 6)],
        ] {
            assert!(apply(&mut st, 3, Command::ScaleServices { items }).is_err());
            assert_eq!(st.services["a1"].spec.replicas, 1);
            assert_eq!(st.services["a1"].version, 1);
        }
        let ok = apply(&mut st, 4, Command::ScaleServices { items: vec![("a".into(), 7)] }).unwrap();
        assert_eq!(ok.ids, vec!["a1".to_string()]);
        assert_eq!((st.services["a1"].spec.replicas, st.services["a1"].version, st.services["a1"].updated_at_ms), (7, 4, 1004));
    }

    #[test]
    fn stale_updates_are_refused() {
        let mut st = State::default();
        apply(&mut st, 1, svc("a1", "web", "replicated")).unwrap();
        let spec = Box::new(ServiceSpec { name: "web".into(), image: "bb:2".into(), mode: "replicated".into(), ..Default::default() });
        let stale = Command::UpdateService { service: "web".into(), spec: spec.clone(), expected_version: 7 };
        assert!(matches!(apply(&mut st, 2, stale), Err(ApplyError::VersionMismatch { .. })));
        apply(&mut st, 3, Command::UpdateService { service: "web".into(), spec, expected_version: 1 }).unwrap();
        assert_eq!(st.services["a1"].spec.image, "bb:2");
        assert_eq!(st.services["a1"].previous_spec.as_ref().map(|s| s.image.as_str()), Some("bb:1"));
    }

    fn net(name: &str, subnet: &str) -> Command {
        Command::CreateNetwork {
            network: NetworkObj {
                id: format!("id-{name}"),
                name: name.into(),
                subnet: subnet.into(),
                gateway: String::new(),
                internal: false,
                labels: Default::default(),
                slices: Default::default(),
                last_address: Default::default(),
                version: 0,
                created_at_ms: 0,
            },
        }
    }

    fn secret(name: &str, size: usize) -> Command {
        let obj = DataObj {
            id: format!("id-{name}"),
            name: name.into(),
            data: vec![7; size],
            digest: String::new(),
            labels: Default::default(),
            version: 0,
            created_at_ms: 0,
        };
        Command::CreateData { kind: DataKind::Secret, obj }
    }

    #[test]
    fn networks_take_free_subnets_and_never_overlap() {
        let mut st = State::default();
        apply(&mut st, 1, net("front", "")).unwrap();
        apply(&mut st, 2, net("mine", "100.64.16.0/24")).unwrap();
        apply(&mut st, 3, net("back", "")).unwrap();
        assert_eq!((st.networks["front"].subnet.as_str(), st.networks["front"].gateway.as_str()), ("100.64.0.0/20", "100.64.0.1"));
        assert_eq!(st.networks["back"].subnet, "100.64.32.0/20", "skips the /20 a network taken by hand overlaps");
        let small = apply(&mut st, 7, net("tiny", "100.65.0.0/27")).unwrap_err();
        assert!(small.to_string().contains("too small"), "{small}");
        let err = apply(&mut st, 4, net("wide", "100.64.0.0/16")).unwrap_err();
        assert!(matches!(err, ApplyError::Refused(Refusal::SubnetOverlap { .. })), "{err}");
        assert!(matches!(apply(&mut st, 5, net("front", "")), Err(ApplyError::NameTaken { .. })));
        assert!(matches!(apply(&mut st, 6, net("bad", "100.64.9.1/24")), Err(ApplyError::Refused(Refusal::InvalidSubnet { .. }))));
        assert_eq!(st.networks.len(), 3);
    }

    #[test]
    fn services_need_their_references_and_keep_them_alive() {
        let mut st = State::default();
        let mut cmd = svc("a1", "web", "replicated");
        if let Command::CreateService { service } = &mut cmd {
            service.spec.networks = vec!["front".into()];
            service.spec.secrets = vec!["db-pass".into()];
        }
        let err = apply(&mut st, 1, cmd.clone()).unwrap_err();
        assert!(matches!(&err, ApplyError::NotFound { kind, .. } if kind == "network"), "{err}");
        apply(&mut st, 2, net("front", "")).unwrap();
        let err = apply(&mut st, 3, cmd.clone()).unwrap_err();
        assert!(matches!(&err, ApplyError::NotFound { kind, .. } if kind == "secret"), "{err}");
        assert!(matches!(apply(&mut st, 4, secret("db-pass", MAX_DATA + 1)), Err(ApplyError::Refused(Refusal::TooLarge { .. }))));
        apply(&mut st, 5, secret("db-pass", 12)).unwrap();
        apply(&mut st, 6, cmd).unwrap();
        let err = apply(&mut st, 7, Command::RemoveNetwork { name: "front".into() }).unwrap_err();
        assert_eq!(err.to_string(), "network \"front\" is used by service \"web\"");
        let err = apply(&mut st, 8, Command::RemoveData { kind: DataKind::Secret, name: "db-pass".into() }).unwrap_err();
        assert_eq!(err.to_string(), "secret \"db-pass\" is used by service \"web\"");
        apply(&mut st, 9, Command::RemoveServices { services: vec!["web".into()] }).unwrap();
        apply(&mut st, 10, Command::RemoveNetwork { name: "front".into() }).unwrap();
        apply(&mut st, 11, Command::RemoveData { kind: DataKind::Secret, name: "db-pass".into() }).unwrap();
        assert!(st.networks.is_empty() && st.secrets.is_empty());
    }

    #[test]
    fn what_a_live_task_still_uses_stays() {
        use crate::store::task::TaskState;
        let mut st = State::default();
        apply(&mut st, 1, secret("db-pass", 4)).unwrap();
        let spec = ServiceSpec { name: "web".into(), image: "bb:1".into(), secrets: vec!["db-pass".into()], ..Default::default() };
        let svc = ServiceObj::new("gone".into(), spec);
        let task = |id: &str, state: TaskState| TaskObj { id: id.into(), state, ..TaskObj::new(&svc, 1, Some(1), 0, "") };
        // The service is gone, but its task is still stopping.
        apply(&mut st, 2, Command::CreateTasks { tasks: vec![task("t1", TaskState::Running)] }).unwrap();
        let rm = || Command::RemoveData { kind: DataKind::Secret, name: "db-pass".into() };
        let err = apply(&mut st, 3, rm()).unwrap_err();
        assert_eq!(err.to_string(), "secret \"db-pass\" is used by service \"web\"");
        let done = TaskUpdate { id: "t1".into(), state: Some(TaskState::Shutdown), ..Default::default() };
        apply(&mut st, 4, Command::UpdateTasks { from_node: None, updates: vec![done] }).unwrap();
        apply(&mut st, 5, rm()).unwrap();
        assert!(st.secrets.is_empty());
    }

    /// A task on networks placed on a node, with its update.
    fn placed(st: &mut State, index: u64, id: &str, nets: &[&str], node: u64) {
        let spec = ServiceSpec { name: "web".into(), image: "bb:1".into(), networks: nets.iter().map(|n| n.to_string()).collect(), ..Default::default() };
        let svc = ServiceObj::new("svc".into(), spec);
        let t = TaskObj { id: id.into(), ..TaskObj::new(&svc, 1, None, 0, "") };
        apply(st, index, Command::CreateTasks { tasks: vec![t] }).unwrap();
        let u = TaskUpdate { id: id.into(), node_id: Some(node), state: Some(TaskState::Assigned), ..Default::default() };
        apply(st, index, Command::UpdateTasks { from_node: None, updates: vec![u] }).unwrap();
    }

    #[test]
    fn tasks_get_addresses_from_their_nodes_slices() {
        let mut st = State::default();
        apply(&mut st, 1, net("front", "100.64.0.0/24")).unwrap();
        apply(&mut st, 2, net("back", "")).unwrap();
        placed(&mut st, 3, "t1", &["front", "back"], 7);
        placed(&mut st, 4, "t2", &["front"], 7);
        placed(&mut st, 5, "t3", &["front"], 9);
        assert_eq!(st.tasks["t1"].addresses, ["100.64.0.2/26", "100.64.16.2/26"]);
        assert_eq!(st.tasks["t2"].addresses, ["100.64.0.3/26"], "the node's slice is reused");
        assert_eq!(st.tasks["t3"].addresses, ["100.64.0.66/26"], "another node gets its own slice");
        assert_eq!(st.networks["front"].slices[&7], ["100.64.0.0/26"]);
        assert_eq!(st.networks["front"].slices[&9], ["100.64.0.64/26"]);
        // A finished task's address is free again, but handed out only
        // after the slice's others (round robin, as Docker's IPAM).
        let done = TaskUpdate { id: "t2".into(), state: Some(TaskState::Shutdown), ..Default::default() };
        apply(&mut st, 6, Command::UpdateTasks { from_node: None, updates: vec![done] }).unwrap();
        placed(&mut st, 7, "t4", &["front"], 7);
        assert_eq!(st.tasks["t4"].addresses, ["100.64.0.4/26"], "not the address t2 just gave back");
        for i in 0..58 {
            placed(&mut st, 100 + i, &format!("f{i}"), &["front"], 7);
        }
        assert_eq!(st.tasks["f57"].addresses, ["100.64.0.62/26"], "the slice's last usable address");
        placed(&mut st, 200, "t5", &["front"], 7);
        assert_eq!(st.tasks["t5"].addresses, ["100.64.0.3/26"], "wrapped around to the one free address");
        // A node that goes gives its slices back.
        st.nodes.insert(9, NodeObj { status: NodeStatus::Down, ..NodeObj::new(9, "n9", Role::Worker, "") });
        apply(&mut st, 8, Command::RemoveNode { id: 9, force: true }).unwrap();
        assert!(!st.networks["front"].slices.contains_key(&9));
    }

    #[test]
    fn node_names_are_unique_through_joins_removals_and_snapshots() {
        let mut st = State::default();
        let add = |id, name: &str| Command::AddNode { node: NodeObj::new(id, name, Role::Worker, "198.18.0.1:7700") };
        apply(&mut st, 1, add(1, "a")).unwrap();
        apply(&mut st, 2, add(2, "b")).unwrap();
        assert!(matches!(apply(&mut st, 3, add(3, "a")), Err(ApplyError::NameTaken { .. })), "a second node named a");
        assert!(!st.nodes.contains_key(&3), "a refused join changes nothing");
        // The same node joining again (a retried write) keeps its name.
        apply(&mut st, 4, add(1, "a")).unwrap();
        st.nodes.get_mut(&2).unwrap().status = NodeStatus::Down;
        apply(&mut st, 5, Command::RemoveNode { id: 2, force: false }).unwrap();
        apply(&mut st, 6, add(4, "b")).unwrap();
        assert_eq!(st.nodes[&4].name, "b", "a removed node's name is free again");
        let names = |s: &State| s.node_names.clone().into_iter().collect::<BTreeMap<_, _>>();
        assert_eq!(names(&st), BTreeMap::from([("a".to_string(), 1), ("b".to_string(), 4)]));
        let mut copy: State = crate::codec::decode(&crate::codec::encode(&st).unwrap()).unwrap();
        copy.rebuild_index();
        assert_eq!(names(&copy), names(&st), "a snapshot round trip rebuilds the names");
        assert!(matches!(apply(&mut copy, 7, add(5, "b")), Err(ApplyError::NameTaken { .. })));
    }

    #[test]
    fn a_full_network_fails_the_task_with_the_reason() {
        let mut st = State::default();
        apply(&mut st, 1, net("one", "100.64.0.0/25")).unwrap();
        for i in 0..61 {
            placed(&mut st, 2 + i, &format!("t{i}"), &["one"], 7);
        }
        assert!(st.tasks.values().all(|t| t.state == TaskState::Assigned));
        placed(&mut st, 100, "late", &["one"], 8);
        let t = &st.tasks["late"];
        assert_eq!(t.state, TaskState::Rejected);
        assert!(t.error.contains("no free address"), "{}", t.error);
        assert!(t.addresses.is_empty());
    }


    #[test]
    fn an_exhausted_pool_is_a_clear_error_at_network_create() {
        let mut st = State::default();
        st.cluster = Some(ClusterObj {
            ca_cert_pem: String::new(),
            ca_key_pem: String::new(),
            address_pool: "100.70.0.0/19".into(),
            worker_secret: String::new(),
            manager_secret: String::new(),
            cert_expiry_ms: 0,
            unlock_key: String::new(),
            ca_bundle_pem: String::new(),
            ca_cross_pem: String::new(),
            version: 0,
        });
        apply(&mut st, 1, net("one", "")).unwrap();
        apply(&mut st, 2, net("two", "")).unwrap();
        assert_eq!((st.networks["one"].subnet.as_str(), st.networks["two"].subnet.as_str()), ("100.70.0.0/20", "100.70.16.0/20"));
        let err = apply(&mut st, 3, net("three", "")).unwrap_err();
        assert_eq!(err.to_string(), "the network pool 100.70.0.0/19 has no free /20 left");
        assert_eq!(st.networks.len(), 2);
    }

    /// After any sequence of commands, the task indexes equal a recount
    /// from the tasks (and from a snapshot's rebuild).
    #[test]
    fn task_indexes_equal_a_full_recount_after_any_commands() {
        use crate::store::index::TaskIndex;
        use crate::store::objects::{NodeObj, Role};
        // xorshift64*: reproducible without a dependency.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
        };
        let mut st = State::default();
        let mut index = 1u64;
        let mut run = |st: &mut State, cmd: Command| {
            index += 1;
            let _ = st.apply(index, 1000 + index, cmd, &mut Vec::new());
        };
        run(&mut st, net("front", ""));
        for id in 1..=4 {
            run(&mut st, Command::AddNode { node: NodeObj::new(id, &format!("n{id}"), Role::Worker, "198.18.0.1:7700") });
        }
        let mut task_no = 0u64;
        for step in 0..3000 {
            let services: Vec<String> = st.services.keys().cloned().collect();
            let tasks: Vec<String> = st.tasks.keys().cloned().collect();
            let pick = |v: &[String], i: u64| v.get(i as usize).cloned();
            let cmd = match next(8) {
                0 if services.len() < 6 => {
                    let id = format!("s{step}");
                    let mut spec = ServiceSpec { name: format!("svc{step}"), image: "bb:1".into(), mode: "replicated".into(), replicas: 3, ..Default::default() };
                    if next(2) == 0 {
                        spec.networks = vec!["front".into()];
                    }
                    // What the scheduler's sums count: reservations and
                    // host-mode ports (an ingress port is not a node's).
                    if next(2) == 0 {
                        spec.reservations = Some(shoal_proto::control::Resources { nano_cpus: 100_000_000 * (1 + next(4)), memory_bytes: 1 << 20, ..Default::default() });
                        let port = |published, mode: &str| shoal_proto::control::Port { published, target: 80, protocol: "tcp".into(), mode: mode.into(), ..Default::default() };
                        spec.ports = vec![port(8000 + next(3) as u32, "host"), port(9000, "ingress")];
                    }
                    Command::CreateService { service: Box::new(ServiceObj::new(id, spec)) }
                }
                1 if !services.is_empty() && next(10) == 0 => {
                    let Some(svc) = pick(&services, next(services.len() as u64)) else { continue };
                    Command::RemoveServices { services: vec![svc] }
                }
                0..=2 if !services.is_empty() => {
                    let Some(svc) = pick(&services, next(services.len() as u64)).and_then(|id| st.services.get(&id)) else { continue };
                    let tasks = (0..1 + next(3))
                        .map(|_| {
                            task_no += 1;
                            let node = (next(3) == 0).then(|| 1 + next(4));
                            let mut t = TaskObj::new(svc, 1 + next(3), node, 0, "created");
                            t.id = format!("t{task_no}");
                            t
                        })
                        .collect();
                    Command::CreateTasks { tasks }
                }
                3..=6 if !tasks.is_empty() => {
                    let updates = (0..1 + next(4))
                        .filter_map(|_| {
                            let id = pick(&tasks, next(tasks.len() as u64))?;
                            let state = TaskState::ALL[next(TaskState::ALL.len() as u64) as usize];
                            Some(TaskUpdate {
                                id,
                                state: Some(state),
                                node_id: (next(2) == 0).then(|| 1 + next(4)),
                                desired_state: (next(5) == 0).then_some(TaskState::Shutdown),
                                ..Default::default()
                            })
                        })
                        .collect();
                    Command::UpdateTasks { from_node: None, updates }
                }
                7 if !tasks.is_empty() => {
                    let ids = (0..1 + next(3)).filter_map(|_| pick(&tasks, next(tasks.len() as u64))).collect();
                    Command::RemoveTasks { ids }
                }
                _ => continue,
            };
            run(&mut st, cmd);
            assert_eq!(st.index, TaskIndex::build(st.tasks.values()), "after step {step}");
        }
        assert!(st.tasks.len() > 50, "the sequence must leave tasks to check: {}", st.tasks.len());
        assert!(st.tasks.values().any(|t| !t.addresses.is_empty()), "some tasks must hold overlay addresses");
        assert!(st.index.held_by_node().any(|(_, h)| h.nano_cpus > 0 && !h.ports.is_empty()), "some nodes must hold reservations and ports");
        assert!(st.index.waiting().next().is_some(), "some tasks must wait for a node");
        for svc in st.services.keys() {
            let running = st.tasks.values().filter(|t| &t.service_id == svc && t.state == TaskState::Running).count();
            assert_eq!(st.index.running(svc), running);
            let wanted: Vec<&TaskObj> = st.tasks.values().filter(|t| &t.service_id == svc && t.desired_state == TaskState::Running).collect();
            let counted = st.wanted_tasks(svc).fold((0, 0, 0), |(a, b, c), (_, w)| (a + w.tasks, b + w.running, c + w.live));
            let recount = (
                wanted.len(),
                wanted.iter().filter(|t| t.state == TaskState::Running).count(),
                wanted.iter().filter(|t| !t.state.is_terminal()).count(),
            );
            assert_eq!(counted, recount, "service {svc}: desired-running counts");
            for (v, _) in st.wanted_tasks(svc) {
                assert!(st.task_spec(svc, v).is_some(), "service {svc} version {v} has tasks but no pooled spec");
            }
            assert_eq!(st.service_tasks(svc).count(), st.tasks.values().filter(|t| &t.service_id == svc).count());
        }
        for node in 1..=4 {
            assert_eq!(st.node_tasks(node).count(), st.tasks.values().filter(|t| t.node_id == Some(node)).count());
        }
        // Tasks of one service version share one spec.
        for t in st.tasks.values() {
            let shared = &st.spec_pool[&(t.service_id.clone(), t.spec_version)];
            assert!(std::sync::Arc::ptr_eq(shared, &t.spec), "task {} has its own copy of the spec", t.id);
        }
        // A snapshot round trip rebuilds the same indexes.
        let mut copy: State = crate::codec::decode(&crate::codec::encode(&st).unwrap()).unwrap();
        assert_eq!(copy.index, TaskIndex::default());
        copy.rebuild_index();
        assert_eq!(copy.index, st.index);
        assert_eq!(copy.spec_pool.len(), st.tasks.values().map(|t| (&t.service_id, t.spec_version)).collect::<std::collections::HashSet<_>>().len());
    }
}
