//! The Dispatcher: agents' sessions with the managers. The leader keeps when
//! each node last heartbeated (in memory: heartbeats are not worth a Raft
//! entry each) and writes only status changes — ready ↔ down — to the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_proto::dispatcher::dispatcher_server::Dispatcher;
use std::collections::HashSet;
use std::pin::Pin;

use shoal_proto::dispatcher::{
    Assignment, AssignmentsMessage, NetworkAttachment, Peer, ServiceRecord, ServiceView, ServicesRequest, TaskData, AssignmentsRequest, BlobChunk, BlobRef, HeartbeatRequest, HeartbeatResponse,
    LocalVolume, TaskStatusAck, TaskStatusBatch, VolumeAttachment,
};
use tokio::io::AsyncReadExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::control::status;
use crate::manager::Manager;
use shoal_security::pki::{self as pki, CertRole, PeerCert};
use shoal_security::trust::Peer as Caller;
use crate::store::objects::{DataKind, IssuedCert, NodeObj, NodeStatus, Role};
use crate::store::state::format_node_id;
use crate::store::task::{TaskObj, TaskState, TaskUpdate};
use crate::store::{Change, Command, NodePatch, State};

/// Dispatcher timing.
#[derive(Clone, Copy, Debug)]
pub struct DispatcherConfig {
    /// How often agents heartbeat (in a cluster small enough that the
    /// leader keeps up; see [`heartbeat_period`]).
    pub period: Duration,
    /// A node that misses heartbeats this long is marked down.
    pub down_after: Duration,
}

/// How often the leader looks for silent nodes: a dead node is marked down
/// at most this long after its `down_after` ran out.
const DOWN_CHECK: Duration = Duration::from_millis(250);

impl DispatcherConfig {
    /// Timing for `--heartbeat-timeout`: agents heartbeat every half of it,
    /// so a node is down after two missed periods (Swarm's 5 s is the
    /// default timeout, with a 2.5 s period).
    pub fn with_timeout(down_after: Duration) -> Self {
        DispatcherConfig { period: (down_after / 2).max(Duration::from_millis(100)), down_after }
    }

    /// The heartbeat period for a cluster of `nodes`.
    pub fn period_for(&self, nodes: usize) -> Duration {
        heartbeat_period(self.period, nodes)
    }

    /// How long a node may stay silent before it is marked down, in a
    /// cluster of `nodes`: the configured time, or two periods where the
    /// period grew past half of it.
    pub fn down_after_for(&self, nodes: usize) -> Duration {
        self.down_after.max(2 * self.period_for(nodes))
    }
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig::with_timeout(Duration::from_secs(5))
    }
}

#[derive(Clone)]
pub struct DispatcherService {
    manager: Arc<Manager>,
    config: DispatcherConfig,
    last_seen: Arc<Mutex<HashMap<u64, Instant>>>,
    /// When each node was last warned about reporting another node's
    /// overlay key or endpoint (at most once a minute per node).
    identity_warned: Arc<Mutex<HashMap<u64, Instant>>>,
    /// Ends the assignment streams when the manager stops: the server's
    /// graceful shutdown waits for every open stream.
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// What every heartbeat compares against, worked out once per cluster
    /// object version instead of per heartbeat.
    ca: Arc<Mutex<Option<CaFacts>>>,
    /// What heartbeats answer with, worked out once per topology version.
    facts: Arc<Mutex<Option<Arc<HeartbeatFacts>>>>,
    hub: Arc<Hub>,
    views: tokio::sync::watch::Receiver<Arc<Views>>,
    /// Heartbeats answered while leading (the down-detector's check on
    /// itself).
    answered: Arc<std::sync::atomic::AtomicU64>,
    /// Nodes whose heartbeat is writing to the store right now.
    writing: Arc<Mutex<HashSet<u64>>>,
}

/// A node write from a heartbeat in flight; the node is free again when
/// this drops (committed, refused or abandoned by a cancelled call).
struct NodeWrite {
    set: Arc<Mutex<HashSet<u64>>>,
    id: u64,
}

impl NodeWrite {
    /// None when this node already has a write in flight.
    fn begin(set: &Arc<Mutex<HashSet<u64>>>, id: u64) -> Option<NodeWrite> {
        set.lock().unwrap_or_else(|e| e.into_inner()).insert(id).then(|| NodeWrite { set: set.clone(), id })
    }
}

impl Drop for NodeWrite {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

/// The parts of a heartbeat's answer that are the same for every node, at
/// one topology version: handling a heartbeat is then O(1) in the size of
/// the cluster.
struct HeartbeatFacts {
    topology: u64,
    period: Duration,
    /// The earliest an agent that heard its peers changed may heartbeat
    /// again.
    soonest: Duration,
    managers: Vec<String>,
    managers_version: u64,
    /// Every ready node with an overlay identity, by node id (an agent
    /// leaves itself out).
    peers: Arc<Vec<Peer>>,
    peers_version: u64,
    /// The peer sets of the last few versions before this one, newest
    /// first: an agent that has one gets a delta.
    history: Vec<(u64, Arc<Vec<Peer>>)>,
    /// Deltas from those versions to this one, worked out at the first
    /// heartbeat that asks.
    deltas: Mutex<HashMap<u64, Option<Arc<PeerDelta>>>>,
    address_pool: String,
}

/// From this many ready nodes on, a leader that answered fewer than half the
/// heartbeats it should have marks no node down (Kubernetes'
/// `--large-cluster-size-threshold` is 50 too).
const LARGE_CLUSTER: usize = 50;

/// Whether this leader answered at least half the heartbeats its `ready`
/// nodes sent over the last `down_after` (`answered` so far; `history`
/// holds earlier counts, one older than the window). Small clusters always
/// pass; without a whole window of history (a new leader) a large one does
/// not. Err: (answered, expected) over the window.
fn kept_up(history: &mut std::collections::VecDeque<(Instant, u64)>, now: Instant, answered: u64, (ready, period, down_after): (usize, Duration, Duration)) -> Result<(), (u64, u64)> {
    history.push_back((now, answered));
    // Keep the newest count that is at least `down_after` old, drop older.
    while history.get(1).is_some_and(|(t, _)| now.duration_since(*t) >= down_after) {
        history.pop_front();
    }
    if ready < LARGE_CLUSTER {
        return Ok(());
    }
    let (at, before) = history.front().copied().unwrap_or((now, answered));
    let window = now.duration_since(at);
    let got = answered - before;
    let expected = (ready as f64 * window.as_secs_f64() / period.as_secs_f64()) as u64;
    if window < down_after || got < expected / 2 { Err((got, expected)) } else { Ok(()) }
}

/// Heartbeats the leader answers per second at most: the period grows with
/// the cluster past this (Nomad's `max_heartbeats_per_second` idea).
const MAX_HEARTBEATS_PER_SEC: u64 = 2000;

/// How many earlier peer sets the leader keeps to answer with deltas.
const PEER_HISTORY: usize = 8;

/// What changed between two peer sets.
#[derive(Debug, Default, PartialEq)]
struct PeerDelta {
    upserts: Vec<Peer>,
    removed: Vec<u64>,
}

/// The delta from `old` to `new` (both sorted by node id): one merge walk.
fn peer_delta(old: &[Peer], new: &[Peer]) -> PeerDelta {
    let mut d = PeerDelta::default();
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) if o.node_id == n.node_id => {
                if o != n {
                    d.upserts.push(n.clone());
                }
                i += 1;
                j += 1;
            }
            (Some(o), Some(n)) if o.node_id < n.node_id => {
                d.removed.push(o.node_id);
                i += 1;
            }
            (Some(o), None) => {
                d.removed.push(o.node_id);
                i += 1;
            }
            (_, Some(n)) => {
                d.upserts.push(n.clone());
                j += 1;
            }
            (None, None) => break,
        }
    }
    d
}

impl HeartbeatFacts {
    /// The delta from peer set version `from` to this one, if this leader
    /// still has that set and the delta is smaller than the whole list.
    fn delta_from(&self, from: u64) -> Option<Arc<PeerDelta>> {
        let mut deltas = self.deltas.lock().unwrap_or_else(|e| e.into_inner());
        deltas
            .entry(from)
            .or_insert_with(|| {
                let (_, old) = self.history.iter().find(|(v, _)| *v == from)?;
                let d = peer_delta(old, &self.peers);
                (d.upserts.len() + d.removed.len() < self.peers.len()).then(|| Arc::new(d))
            })
            .clone()
    }
}

/// How soon an agent may heartbeat again to fetch peers the service view
/// says changed (in a small cluster; the rate cap applies past that).
const EARLY_HEARTBEAT: Duration = Duration::from_millis(500);

/// The heartbeat period for a cluster of `nodes` with base period `base`:
/// `base` until the leader would answer more than
/// [`MAX_HEARTBEATS_PER_SEC`], then long enough that it answers that many.
pub fn heartbeat_period(base: Duration, nodes: usize) -> Duration {
    base.max(Duration::from_millis(nodes as u64 * 1000 / MAX_HEARTBEATS_PER_SEC))
}

/// The current CA's name and the CA bundle's digest, at a cluster version.
#[derive(Clone)]
struct CaFacts {
    version: u64,
    name: String,
    bundle_digest: String,
}

impl DispatcherService {
    /// Also starts the assignment router and the service view builder
    /// (call inside a tokio runtime).
    pub fn new(manager: Arc<Manager>, config: DispatcherConfig, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        let hub = Arc::new(Hub::default());
        let store = manager.store.clone();
        tokio::spawn(hub.clone().route(store.clone(), store.watch(), shutdown.clone()));
        let (views_tx, views) = tokio::sync::watch::channel(Arc::new(Views::default()));
        tokio::spawn(build_views(store.clone(), store.watch(), views_tx, shutdown.clone()));
        DispatcherService { manager, config, last_seen: Default::default(), identity_warned: Default::default(), shutdown, ca: Default::default(), facts: Default::default(), hub, views, answered: Default::default(), writing: Default::default() }
    }

    fn heartbeat_facts(&self) -> Arc<HeartbeatFacts> {
        let topology = self.manager.store.topology_version();
        let mut cache = self.facts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.as_ref().filter(|f| f.topology == topology) {
            return f.clone();
        }
        let previous = cache.take();
        let facts = self.manager.store.read(|s| {
            use std::hash::{Hash, Hasher};
            let managers: Vec<String> = s.nodes.values().filter(|n| n.role == Role::Manager).map(|n| n.address.clone()).collect();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            managers.hash(&mut h);
            let v = peers_version(s);
            let (peers_version, peers, history) = match previous {
                // Same peers (a change elsewhere in the topology): the same
                // set, history and deltas' sources.
                Some(p) if p.peers_version == v => (v, p.peers.clone(), p.history.clone()),
                p => {
                    let peers = peer_list(s);
                    let history = p
                        .map(|p| {
                            std::iter::once((p.peers_version, p.peers.clone()))
                                .chain(p.history.iter().cloned())
                                .filter(|(old, _)| *old != v)
                                .take(PEER_HISTORY)
                                .collect()
                        })
                        .unwrap_or_default();
                    (v, Arc::new(peers), history)
                }
            };
            Arc::new(HeartbeatFacts {
                topology,
                period: self.config.period_for(s.nodes.len()),
                soonest: heartbeat_period(EARLY_HEARTBEAT, s.nodes.len()),
                managers,
                managers_version: h.finish().max(1),
                peers,
                peers_version,
                history,
                deltas: Default::default(),
                address_pool: s.address_pool().to_string(),
            })
        });
        // A load report counts as long as its node counts as up.
        self.manager.metrics.set_fresh(self.config.down_after.max(2 * facts.period));
        *cache = Some(facts.clone());
        facts
    }

    pub fn config(&self) -> DispatcherConfig {
        self.config
    }

    fn ca_facts(&self) -> Result<CaFacts, Status> {
        let version = self.manager.store.read(|s| s.cluster.as_ref().map(|c| c.version)).ok_or_else(|| Status::unavailable("cluster not initialized"))?;
        let mut cache = self.ca.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.as_ref().filter(|f| f.version == version) {
            return Ok(f.clone());
        }
        let facts = self
            .manager
            .store
            .read(|s| s.cluster.as_ref().map(|c| CaFacts { version: c.version, name: c.ca_name(), bundle_digest: pki::bundle_digest(c.trust_bundle()) }))
            .ok_or_else(|| Status::unavailable("cluster not initialized"))?;
        *cache = Some(facts.clone());
        Ok(facts)
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.last_seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// While this manager leads, marks nodes down when their heartbeats stop.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut was_leader = false;
        let mut tick = tokio::time::interval(DOWN_CHECK.min(self.config.period));
        // (when, heartbeats answered by then): how many this leader answered
        // over the last down time.
        let mut answered_at: std::collections::VecDeque<(Instant, u64)> = std::collections::VecDeque::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let leader = self.manager.is_leader();
            if leader && !was_leader {
                // A new leader knows no heartbeats yet: give every node a
                // full period to reach it before calling it down.
                let now = Instant::now();
                let ids: Vec<u64> = self.manager.store.read(|s| s.nodes.keys().copied().collect());
                let mut seen = self.seen();
                seen.clear();
                for id in ids {
                    seen.insert(id, now);
                }
                answered_at.clear();
            }
            was_leader = leader;
            if !leader {
                continue;
            }
            self.finish_ca_rotation().await;
            let (nodes, ready) = self.manager.store.read(|s| (s.nodes.len(), s.nodes.values().filter(|n| n.status == NodeStatus::Ready).count()));
            let (down_after, period) = (self.config.down_after_for(nodes), self.config.period_for(nodes));
            let down: Vec<(u64, NodeStatus)> = {
                let mut seen = self.seen();
                let now = Instant::now();
                self.manager.store.read(|s| {
                    s.nodes
                        .values()
                        .filter(|n| n.status == NodeStatus::Ready && n.id != self.manager.id)
                        // A node that joined since is given the whole time
                        // from now: its first heartbeat may be on its way.
                        .filter(|n| seen.entry(n.id).or_insert(now).elapsed() > down_after)
                        .map(|n| (n.id, NodeStatus::Down))
                        .collect()
                })
            };
            // A leader that answered far fewer heartbeats than its nodes
            // send stalled itself (a burst of work): its silent nodes are
            // not down, and marking them so would move their tasks and
            // make the stall worse. In a large cluster (Kubernetes' node
            // controller holds evictions the same way when most nodes look
            // unhealthy at once) it waits until it keeps up again.
            let answered = self.answered.load(std::sync::atomic::Ordering::Relaxed);
            let kept_up = kept_up(&mut answered_at, Instant::now(), answered, (ready, period, down_after));
            if down.is_empty() {
                continue;
            }
            if let Err((got, expected)) = kept_up {
                tracing::warn!(
                    silent = down.len(),
                    ready,
                    answered = got,
                    expected,
                    "this leader answered too few heartbeats lately to tell dead nodes from its own delay: not marking nodes down yet"
                );
                continue;
            }
            let names: Vec<String> = down.iter().map(|(id, _)| format_node_id(*id)).collect();
            match self.manager.propose(Command::SetNodeStatus { changes: down }).await {
                Ok(_) => tracing::warn!(nodes = ?names, after = ?down_after, "nodes missed heartbeats: marked down"),
                Err(e) => tracing::warn!(nodes = ?names, error = %e, "could not mark nodes down"),
            }
        }
    }
}

/// A node's overlay identity must be usable by its peers: a 32-byte key in
/// base64 and an `ip:port` endpoint.
fn overlay_identity_ok(key: &str, endpoint: &str) -> Result<(), String> {
    let valid_key = key.len() == 44 && key.ends_with('=') && key[..43].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
    if !valid_key {
        return Err(format!("overlay key {key:?} is not a base64 WireGuard public key"));
    }
    endpoint
        .parse::<std::net::SocketAddrV4>()
        .map(|_| ())
        .map_err(|_| format!("overlay endpoint {endpoint:?} is not an IPv4 ip:port"))
}

/// Whether `t` belongs in node `node`'s assignment set: assigned there and
/// not finished.
fn assigned_to(t: &TaskObj, node: u64) -> bool {
    t.node_id == Some(node) && t.state >= TaskState::Assigned && !t.state.is_terminal()
}

/// The secrets and configs a task's spec names, for its node only.
fn task_data(t: &TaskObj, s: &State) -> Vec<TaskData> {
    let pick = |kind: DataKind, names: &[String], targets: &std::collections::HashMap<String, String>| {
        names
            .iter()
            .filter_map(|n| s.data(kind).get(n))
            .map(|d| TaskData {
                kind: kind.as_str().into(),
                name: d.name.clone(),
                data: d.data.clone(),
                target: targets.get(&d.name).cloned().unwrap_or_default(),
            })
            .collect::<Vec<_>>()
    };
    let mut out = pick(DataKind::Secret, &t.spec.secrets, &t.spec.secret_targets);
    out.extend(pick(DataKind::Config, &t.spec.configs, &t.spec.config_targets));
    out
}

fn assignment(t: &TaskObj, s: &State, with_data: bool) -> Assignment {
    let image = s.images.get(&t.spec.image);
    Assignment {
        task_id: t.id.clone(),
        service: t.service_name.clone(),
        slot: t.slot,
        spec: Some((*t.spec).clone()),
        desired_state: t.desired_state.as_str().into(),
        state: t.state.as_str().into(),
        image_digest: image.map(|i| i.digest.clone()).unwrap_or_default(),
        data: if with_data { task_data(t, s) } else { Vec::new() },
        networks: attachments(t, s),
        volumes: t
            .spec
            .mounts
            .iter()
            .filter(|m| m.r#type == "volume")
            .filter_map(|m| s.volumes.get(&m.source))
            .map(|v| VolumeAttachment { name: v.name.clone(), id: v.id.clone(), options: v.options.clone().into_iter().collect() })
            .collect(),
    }
}

/// The task's networks with its address on each (in the order of its
/// spec's networks; empty until the task has addresses).
fn attachments(t: &TaskObj, s: &State) -> Vec<NetworkAttachment> {
    t.spec
        .networks
        .iter()
        .zip(&t.addresses)
        .filter_map(|(name, addr)| {
            let n = s.networks.get(name)?;
            let ip: std::net::Ipv4Addr = addr.split('/').next()?.parse().ok()?;
            let slice_size = 1u32 << (32 - crate::store::state::SLICE_PREFIX);
            let gateway = std::net::Ipv4Addr::from((u32::from(ip) & !(slice_size - 1)) + 1);
            Some(NetworkAttachment {
                name: n.name.clone(),
                id: n.id.clone(),
                subnet: n.subnet.clone(),
                address: addr.clone(),
                gateway: gateway.to_string(),
                internal: n.internal,
            })
        })
        .collect()
}

/// The version of the peer set [`peer_list`] gives (a hash: any leader
/// computes the same one), worked out without building it: the service
/// view works it out on every node change.
fn peers_version(s: &State) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    // `nodes` is in id order, as the peer list is.
    for n in s.nodes.values().filter(|n| n.status == NodeStatus::Ready && !n.overlay_key.is_empty()) {
        (n.id, &n.overlay_key, &n.overlay_endpoint).hash(&mut h);
        for ip in s.networks.values().filter_map(|net| net.slices.get(&n.id)).flatten() {
            ip.hash(&mut h);
        }
        0xffu8.hash(&mut h);
    }
    h.finish().max(1)
}

/// Every ready node with an overlay identity, with its slices of every
/// network, in id order. Each agent leaves itself out.
fn peer_list(s: &State) -> Vec<Peer> {
    let mut peers: Vec<Peer> = s
        .nodes
        .values()
        .filter(|n| n.status == NodeStatus::Ready && !n.overlay_key.is_empty())
        .map(|n| Peer {
            node_id: n.id,
            name: n.name.clone(),
            public_key: n.overlay_key.clone(),
            endpoint: n.overlay_endpoint.clone(),
            allowed_ips: s.networks.values().filter_map(|net| net.slices.get(&n.id)).flatten().cloned().collect(),
        })
        .collect();
    peers.sort_by_key(|p| p.node_id);
    peers
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Every service on every network it is on: its virtual IP and the
/// addresses of its tasks that run and are to keep running (a task told to
/// stop leaves the view at once, before its node signals it).
fn service_view(s: &State) -> ServiceView {
    let mut records = Vec::new();
    for svc in s.services.values() {
        for network in &svc.spec.networks {
            let addresses = s
                .service_tasks(&svc.id)
                .filter(|t| t.state == TaskState::Running && t.desired_state == TaskState::Running)
                // A task's addresses follow its own spec's networks (an older
                // task may be on other ones than the service now).
                .filter_map(|t| t.spec.networks.iter().position(|n| n == network).and_then(|j| t.addresses.get(j)))
                .filter_map(|a| a.split('/').next().map(str::to_string))
                .collect();
            records.push(ServiceRecord {
                service: svc.spec.name.clone(),
                network: network.clone(),
                vip: svc.vips.get(network).cloned().unwrap_or_default(),
                addresses,
                // The routing mesh forwards published ports to the tasks'
                // addresses on its network.
                ports: if network == crate::spec::INGRESS_NETWORK { svc.spec.ports.clone() } else { Vec::new() },
                aliases: if network == crate::spec::INGRESS_NETWORK { Vec::new() } else { svc.spec.aliases.clone() },
            });
        }
    }
    ServiceView { records, ..Default::default() }
}

/// What the router hands one node's assignment stream.
enum Routed {
    /// These of the node's tasks changed or went away.
    Tasks(Vec<String>),
    /// The router fell behind the store: compare the whole set again.
    Resync,
}

type Subscribers = HashMap<u64, Vec<(u64, tokio::sync::mpsc::UnboundedSender<Routed>)>>;

/// Routes the store's task changes to the assignment streams of the nodes
/// they concern. One reader of the event stream for the whole cluster: a
/// change costs the same with 5 nodes connected as with 5,000 (each stream
/// reading every event was O(nodes × changes)).
#[derive(Default)]
struct Hub {
    next: std::sync::atomic::AtomicU64,
    subs: Mutex<Subscribers>,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn subscribe(self: &Arc<Self>, node: u64) -> (Subscription, tokio::sync::mpsc::UnboundedReceiver<Routed>) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.lock().entry(node).or_default().push((id, tx));
        (Subscription { hub: self.clone(), node, id }, rx)
    }

    fn send(&self, per_node: HashMap<u64, Vec<String>>) {
        let subs = self.lock();
        for (node, ids) in per_node {
            for (_, tx) in subs.get(&node).into_iter().flatten() {
                let _ = tx.send(Routed::Tasks(ids.clone()));
            }
        }
    }

    fn resync_all(&self) {
        for (_, tx) in self.lock().values().flatten() {
            let _ = tx.send(Routed::Resync);
        }
    }

    /// Follows the store and routes each entry's task changes by node.
    async fn route(self: Arc<Self>, store: crate::store::Store, mut events: tokio::sync::broadcast::Receiver<Arc<crate::store::Event>>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let Some(ev) = next_event(&mut events, &mut shutdown).await else { return };
            match ev {
                Ok(ev) => {
                    let mut per_node: HashMap<u64, Vec<String>> = HashMap::new();
                    store.read(|s| {
                        for c in &ev.changes {
                            let (id, node) = match c {
                                // A task removed since is routed by its own
                                // removal.
                                Change::Task(id) => (id, s.tasks.get(id).and_then(|t| t.node_id)),
                                Change::TaskRemoved(id, node) => (id, *node),
                                _ => continue,
                            };
                            if let Some(n) = node {
                                per_node.entry(n).or_default().push(id.clone());
                            }
                        }
                    });
                    if !per_node.is_empty() {
                        self.send(per_node);
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "assignment router fell behind the store: every connected node compares its whole task set");
                    self.resync_all();
                }
                Err(RecvError::Closed) => return,
            }
        }
    }
}

/// The store's next event, or None once the manager stops.
async fn next_event(
    events: &mut tokio::sync::broadcast::Receiver<Arc<crate::store::Event>>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<Result<Arc<crate::store::Event>, tokio::sync::broadcast::error::RecvError>> {
    tokio::select! {
        ev = events.recv() => Some(ev),
        _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => None,
    }
}

/// Removes a stream from the hub when it ends.
struct Subscription {
    hub: Arc<Hub>,
    node: u64,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut subs = self.hub.lock();
        if let Some(v) = subs.get_mut(&self.node) {
            v.retain(|(id, _)| *id != self.id);
            if v.is_empty() {
                subs.remove(&self.node);
            }
        }
    }
}

/// Builds the service view once for every connected node: again after a
/// burst of changes that can move it (a service, a network, or a task of
/// a service on a network).
async fn build_views(
    store: crate::store::Store,
    mut events: tokio::sync::broadcast::Receiver<Arc<crate::store::Event>>,
    out: tokio::sync::watch::Sender<Arc<Views>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::sync::broadcast::error::RecvError;
    // What to work out again: the records, the peer set's version.
    let (mut records, mut peers) = (true, true);
    loop {
        let (view, version) = store.read(|s| (records.then(|| service_view(s)), peers.then(|| peers_version(s))));
        out.send_if_modified(|v| {
            let records = match view {
                Some(r) if *v.records != r => Arc::new(r),
                _ => v.records.clone(),
            };
            let peers_version = version.unwrap_or(v.peers_version);
            let changed = !Arc::ptr_eq(&records, &v.records) || peers_version != v.peers_version;
            if changed {
                *v = Arc::new(Views { records, peers_version });
            }
            changed
        });
        (records, peers) = (false, false);
        while !records && !peers {
            let Some(ev) = next_event(&mut events, &mut shutdown).await else { return };
            match ev {
                Ok(ev) => store.read(|s| {
                    for c in &ev.changes {
                        match c {
                            Change::Service(_) | Change::ServiceRemoved(_) | Change::TaskRemoved(..) => records = true,
                            Change::Task(id) => records |= s.tasks.get(id).is_none_or(|t| !t.spec.networks.is_empty()),
                            // A network's slices are peers' allowed IPs.
                            Change::Network(_) | Change::NetworkRemoved(_) => (records, peers) = (true, true),
                            Change::Node(_) | Change::NodeRemoved(_) | Change::Cluster => peers = true,
                            _ => {}
                        }
                    }
                }),
                Err(RecvError::Lagged(_)) => (records, peers) = (true, true),
                Err(RecvError::Closed) => return,
            }
        }
        // Let the rest of a burst land first.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the service view streams send: the records and the peer set's
/// version (a change to either is one message; records unchanged since a
/// stream's last message are not sent again).
#[derive(Default)]
struct Views {
    records: Arc<ServiceView>,
    peers_version: u64,
}

/// At most this many task ids an agent may say it has.
const MAX_KNOWN: usize = 100_000;

/// At most this many assignments in one message: a node with a big task
/// set gets it in several.
const ASSIGNMENTS_PER_MESSAGE: usize = 1000;

/// Only what an agent needs about a task it already has: its desired
/// state (a task's spec, networks and data never change).
fn light_assignment(t: &TaskObj) -> Assignment {
    Assignment {
        task_id: t.id.clone(),
        service: t.service_name.clone(),
        slot: t.slot,
        desired_state: t.desired_state.as_str().into(),
        state: t.state.as_str().into(),
        ..Default::default()
    }
}

impl DispatcherService {
    /// Streams the service view: now, then whenever it changes.
    async fn stream_services(self, tx: tokio::sync::mpsc::Sender<Result<ServiceView, Status>>) {
        let mut views = self.views.clone();
        let mut shutdown = self.shutdown.clone();
        let mut sent: Option<Arc<ServiceView>> = None;
        loop {
            let v = views.borrow_and_update().clone();
            let msg = match &sent {
                Some(r) if Arc::ptr_eq(r, &v.records) => ServiceView { records: Vec::new(), peers_version: v.peers_version, same_records: true },
                _ => ServiceView { records: v.records.records.clone(), peers_version: v.peers_version, same_records: false },
            };
            sent = Some(v.records.clone());
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => return,
                r = views.changed() => if r.is_err() { return },
            }
        }
    }

    /// Streams node `node`'s assignments: the whole set (in messages of at
    /// most [`ASSIGNMENTS_PER_MESSAGE`], the last with `more` false), then
    /// what changes. Tasks the agent says it `known`s already get only
    /// their desired state, and later changes to a task only when its
    /// desired state moved, it ended or it went away.
    async fn stream_assignments(self, node: u64, known: HashSet<String>, tx: tokio::sync::mpsc::Sender<Result<AssignmentsMessage, Status>>) {
        let (_subscription, mut routed) = self.hub.subscribe(node);
        let mut shutdown = self.shutdown.clone();
        // What the agent has: task → desired state.
        let mut sent: HashMap<String, TaskState> = HashMap::new();
        let mut known = known;
        let mut resync = true;
        loop {
            let (updated, removed, full) = if resync {
                resync = false;
                let full = self.manager.store.read(|s| {
                    s.node_tasks(node)
                        .filter(|t| assigned_to(t, node))
                        .map(|t| (t.desired_state, if known.contains(&t.id) { light_assignment(t) } else { assignment(t, s, true) }))
                        .collect::<Vec<_>>()
                });
                sent.clear();
                known.clear();
                (full, Vec::new(), true)
            } else {
                let first = tokio::select! {
                    _ = tx.closed() => return,
                    _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => return,
                    r = routed.recv() => match r {
                        Some(r) => r,
                        None => return,
                    },
                };
                // Everything routed meanwhile, at once.
                let mut ids: HashSet<String> = HashSet::new();
                let mut next = Some(first);
                while let Some(r) = next {
                    match r {
                        Routed::Tasks(t) => ids.extend(t),
                        Routed::Resync => resync = true,
                    }
                    next = routed.try_recv().ok();
                }
                if resync {
                    // The agent has what was sent: those get their state only.
                    known = sent.keys().cloned().collect();
                    continue;
                }
                let (updated, removed) = self.manager.store.read(|s| {
                    let mut updated = Vec::new();
                    let mut removed = Vec::new();
                    for id in ids {
                        match s.tasks.get(&id) {
                            Some(t) if assigned_to(t, node) => match sent.get(&id) {
                                None => updated.push((t.desired_state, assignment(t, s, true))),
                                Some(d) if *d != t.desired_state => updated.push((t.desired_state, light_assignment(t))),
                                Some(_) => {}
                            },
                            _ if sent.contains_key(&id) => removed.push(id),
                            _ => {}
                        }
                    }
                    (updated, removed)
                });
                (updated, removed, false)
            };
            for r in &removed {
                sent.remove(r);
            }
            let assignments = updated
                .into_iter()
                .map(|(desired, a)| {
                    sent.insert(a.task_id.clone(), desired);
                    a
                })
                .collect();
            for m in messages(assignments, removed, full) {
                if tx.send(Ok(m)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// `updated` and `removed` as messages of at most
/// [`ASSIGNMENTS_PER_MESSAGE`] assignments. A whole set (`full`) is always
/// sent, even empty, and every message of it but the last says `more`.
fn messages(updated: Vec<Assignment>, removed: Vec<String>, full: bool) -> Vec<AssignmentsMessage> {
    let mut out: Vec<AssignmentsMessage> = Vec::new();
    let mut updated = updated.into_iter().peekable();
    while updated.peek().is_some() {
        let chunk = updated.by_ref().take(ASSIGNMENTS_PER_MESSAGE).collect();
        out.push(AssignmentsMessage { full, more: full, updated: chunk, removed: Vec::new() });
    }
    if out.is_empty() && (full || !removed.is_empty()) {
        out.push(AssignmentsMessage { full, more: full, updated: Vec::new(), removed: Vec::new() });
    }
    if let Some(last) = out.last_mut() {
        last.more = false;
        last.removed = removed;
    }
    out
}

#[tonic::async_trait]
impl Dispatcher for DispatcherService {
    type AssignmentsStream = Stream_<AssignmentsMessage>;
    type FetchBlobStream = Stream_<BlobChunk>;

    async fn assignments(&self, req: Request<AssignmentsRequest>) -> Result<Response<Self::AssignmentsStream>, Status> {
        let (caller, _) = self.manager.tls.authorize(&req, &[CertRole::Manager, CertRole::Worker])?;
        let node = req.get_ref().node_id;
        if caller != format_node_id(node) {
            return Err(Status::permission_denied("a node may only read its own assignments"));
        }
        if req.get_ref().known.len() > MAX_KNOWN {
            return Err(Status::invalid_argument(format!("{} known tasks: at most {MAX_KNOWN}", req.get_ref().known.len())));
        }
        let known = req.into_inner().known.into_iter().collect();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(self.clone().stream_assignments(node, known, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ServicesStream = Stream_<ServiceView>;

    async fn services(&self, req: Request<ServicesRequest>) -> Result<Response<Self::ServicesStream>, Status> {
        let (caller, _) = self.manager.tls.authorize(&req, &[CertRole::Manager, CertRole::Worker])?;
        if caller != format_node_id(req.get_ref().node_id) {
            return Err(Status::permission_denied("a node may only follow the service view for itself"));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(self.clone().stream_services(tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn update_task_status(&self, req: Request<TaskStatusBatch>) -> Result<Response<TaskStatusAck>, Status> {
        let (caller, _) = self.manager.tls.authorize(&req, &[CertRole::Manager, CertRole::Worker])?;
        let batch = req.into_inner();
        if caller != format_node_id(batch.node_id) {
            return Err(Status::permission_denied("a node may only report on its own tasks"));
        }
        let mut updates = Vec::with_capacity(batch.statuses.len());
        for st in batch.statuses {
            let state = TaskState::parse(&st.state)
                .ok_or_else(|| Status::invalid_argument(format!("invalid task state {:?}", st.state)))?;
            if state < TaskState::Accepted {
                return Err(Status::invalid_argument(format!("an agent cannot move a task to {:?}", st.state)));
            }
            updates.push(TaskUpdate {
                id: st.task_id,
                state: Some(state),
                message: Some(st.message),
                error: Some(st.error),
                exit_code: st.has_exit_code.then_some(st.exit_code),
                ..Default::default()
            });
        }
        if !updates.is_empty() {
            self.manager
                .propose(Command::UpdateTasks { from_node: Some(batch.node_id), updates })
                .await
                .map_err(status)?;
        }
        Ok(Response::new(TaskStatusAck {}))
    }

    async fn fetch_blob(&self, req: Request<BlobRef>) -> Result<Response<Self::FetchBlobStream>, Status> {
        self.manager.tls.authorize(&req, &[CertRole::Manager, CertRole::Worker])?;
        let digest = req.into_inner().digest;
        let path = self.manager.blobs.path(&digest).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|_| Status::not_found(format!("blob {digest} is not on this manager (yet)")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut buf = vec![0u8; crate::blobs::CHUNK];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        if tx.send(Ok(BlobChunk { data: buf[..n].to_vec() })).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("reading blob: {e}")))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let peer = self.manager.tls.authorize_peer(&req, &[CertRole::Manager, CertRole::Worker])?;
        let r = req.into_inner();
        if peer.cert.subject != format_node_id(r.node_id) {
            return Err(Status::permission_denied("a node may only heartbeat for itself"));
        }
        if !self.manager.is_leader() {
            let leader = self.manager.leader().map(|l| l.1).unwrap_or_default();
            let mut st = Status::failed_precondition(format!("not the leader; the leader is {leader:?}"));
            if let Ok(v) = leader.parse() {
                st.metadata_mut().insert("shoal-leader", v);
            }
            return Err(st);
        }
        let node = self.manager.store.read(|s| s.nodes.get(&r.node_id).cloned());
        let Some(node) = node else {
            return Err(Status::not_found("this node was removed from the cluster"));
        };
        if peer.revoked {
            // A node whose role changed holds a revoked certificate: all it
            // may do is pick up its replacement (for the key it holds, with
            // the role the cluster gave it).
            let cert_pem = self.node_cert(&node, &peer).await?;
            if cert_pem.is_empty() {
                return Err(shoal_security::trust::revoked_status(&peer.cert));
            }
            let ca_pem = self.manager.store.read(|s| s.cluster.as_ref().map(|c| c.trust_bundle().to_string())).unwrap_or_default();
            let facts = self.heartbeat_facts();
            return Ok(Response::new(HeartbeatResponse {
                period_ms: facts.period.as_millis() as u64,
                soonest_ms: facts.soonest.as_millis() as u64,
                role: node.role.as_str().into(),
                cert_pem,
                ca_pem,
                ..Default::default()
            }));
        }
        self.seen().insert(r.node_id, Instant::now());
        self.answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let resources = r.resources.map(|x| (x.nano_cpus, x.memory_bytes));
        let changed_resources = resources.is_some_and(|x| x != (node.nano_cpus, node.memory_bytes));
        let overlay = (!r.overlay_key.is_empty()).then(|| (r.overlay_key.clone(), r.overlay_endpoint.clone()));
        let mut changed_overlay = overlay.as_ref().is_some_and(|(k, e)| *k != node.overlay_key || *e != node.overlay_endpoint);
        if changed_overlay {
            overlay_identity_ok(&r.overlay_key, &r.overlay_endpoint).map_err(Status::invalid_argument)?;
            // Another live node's key or endpoint: not recorded (the store
            // refuses it too), so this node gets no peers' traffic meant
            // for the other; the heartbeat itself still counts.
            let taken = self.manager.store.read(|s| {
                s.overlay_identity_holder(r.node_id, &r.overlay_key, &r.overlay_endpoint)
                    .filter(|(o, _)| o.status != NodeStatus::Down)
                    .map(|(o, what)| (o.name.clone(), what))
            });
            if let Some((other, what)) = taken {
                changed_overlay = false;
                let mut warned = self.identity_warned.lock().unwrap_or_else(|e| e.into_inner());
                if warned.get(&r.node_id).is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                    warned.insert(r.node_id, Instant::now());
                    tracing::warn!(
                        node = %node.name,
                        other = %other,
                        endpoint = %r.overlay_endpoint,
                        "node reports an overlay {what} that another node holds: not recorded; the node stays off the overlay until it reports its own"
                    );
                }
            }
        }
        // One node write from heartbeats at a time per node: while a write
        // waits for its commit (seconds, on a leader under load), the
        // node's next heartbeats must not propose it again.
        let wants_write = changed_resources || changed_overlay || node.status == NodeStatus::Down;
        if let Some(_writing) = wants_write.then(|| NodeWrite::begin(&self.writing, r.node_id)).flatten() {
            if changed_resources || changed_overlay {
                let patch = NodePatch {
                    resources: resources.filter(|_| changed_resources),
                    overlay: overlay.filter(|_| changed_overlay),
                    ..Default::default()
                };
                self.manager.propose(Command::UpdateNode { id: r.node_id, patch }).await.map_err(status)?;
                if changed_overlay {
                    tracing::info!(node = %node.name, endpoint = %r.overlay_endpoint, "node's overlay identity recorded");
                }
            }
            if node.status == NodeStatus::Down {
                self.manager
                    .propose(Command::SetNodeStatus { changes: vec![(r.node_id, NodeStatus::Ready)] })
                    .await
                    .map_err(status)?;
                tracing::info!(node = %node.name, "node is heartbeating again: marked ready");
            }
        }
        let facts = self.heartbeat_facts();
        let cert_pem = self.node_cert(&node, &peer).await?;
        // A node speaks only for its own tasks and for services that exist
        // (a misbehaving one can't inflate another node's load).
        let (usage, rates) = self.manager.store.read(|s| {
            let usage: Vec<_> = r.usage.iter().filter(|u| s.tasks.get(&u.task_id).is_some_and(|t| t.node_id == Some(r.node_id))).cloned().collect();
            let rates: Vec<_> = r.rates.iter().take(s.services.len()).filter(|x| s.services.values().any(|svc| svc.spec.name == x.service)).cloned().collect();
            (usage, rates)
        });
        self.manager.metrics.record(r.node_id, &usage, &rates);
        let remove_volumes = if r.volumes_sent { self.record_volumes(&node.name, r.node_id, &r.volumes).await? } else { Vec::new() };
        let peers_changed = facts.peers_version != r.peers_version;
        let delta = (peers_changed && r.accepts_peer_deltas && r.peers_version != 0).then(|| facts.delta_from(r.peers_version)).flatten();
        let managers_changed = facts.managers_version != r.managers_version;
        let (revoked_version, revoked) = self.manager.store.read(|s| {
            let changed = s.revoked_version != r.revoked_version;
            (s.revoked_version, if changed { s.revoked.keys().cloned().collect() } else { Vec::new() })
        });
        let revoked_changed = revoked_version != r.revoked_version;
        // The CA bundle, when the node's differs (a CA rotation).
        let ca_pem = if self.ca_facts()?.bundle_digest != r.ca_digest {
            self.manager.store.read(|s| s.cluster.as_ref().map(|c| c.trust_bundle().to_string())).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(HeartbeatResponse {
            period_ms: facts.period.as_millis() as u64,
            soonest_ms: facts.soonest.as_millis() as u64,
            managers: if managers_changed { facts.managers.clone() } else { Vec::new() },
            managers_version: facts.managers_version,
            role: node.role.as_str().into(),
            cert_pem,
            peers_version: facts.peers_version,
            peers_changed,
            peers_delta: delta.is_some(),
            peers_removed: delta.as_ref().map(|d| d.removed.clone()).unwrap_or_default(),
            peers: match (&delta, peers_changed) {
                (Some(d), _) => d.upserts.clone(),
                (None, true) => facts.peers.to_vec(),
                (None, false) => Vec::new(),
            },
            address_pool: if peers_changed { facts.address_pool.clone() } else { String::new() },
            remove_volumes,
            revoked_version,
            revoked_changed,
            revoked,
            ca_pem,
        }))
    }
}

impl DispatcherService {
    /// The certificate a heartbeating node should switch to, or "" when
    /// the one it presented is fine: after `node promote|demote` one with
    /// the new role, and a renewal once two thirds of its life are gone
    /// (or the cluster's `--cert-expiry` shrank below it). Signed for the
    /// key the node joined with; recorded, so revocation can name it and
    /// a node that asks again before switching gets the same one.
    async fn node_cert(&self, node: &NodeObj, peer: &Caller) -> Result<String, Status> {
        let presented = &peer.cert;
        let want = match node.role {
            Role::Manager => CertRole::Manager,
            Role::Worker => CertRole::Worker,
        };
        let expiry = self.manager.store.read(|s| s.cluster.as_ref().map(|c| c.cert_expiry())).ok_or_else(|| Status::unavailable("cluster not initialized"))?;
        let now = crate::manager::now_ms();
        let ca_name = self.ca_facts()?.name;
        let fine = |c: &PeerCert| {
            c.role == want && c.issuer == ca_name && !pki::renewal_due(c.not_before_ms, c.not_after_ms, now, expiry)
        };
        if !peer.revoked && fine(presented) {
            return Ok(String::new());
        }
        if !node.cert_pem.is_empty()
            && let Ok(latest) = pki::pem_identity(&node.cert_pem)
            && latest.serial != presented.serial
            && fine(&latest)
        {
            return Ok(node.cert_pem.clone());
        }
        if node.csr_pem.is_empty() {
            return Ok(String::new());
        }
        let cluster = self.manager.store.read(|s| s.cluster.clone()).ok_or_else(|| Status::unavailable("cluster not initialized"))?;
        let signed = pki::sign_csr(&cluster.ca(), &node.csr_pem, &presented.subject, want, expiry)
            .map_err(|e| Status::internal(format!("signing node {}'s certificate: {e}", node.name)))?;
        let cert = IssuedCert::of(&signed, want.as_str());
        let chain = cluster.chain(&signed.cert_pem);
        self.manager
            .propose(Command::RecordCert { node: node.id, cert, cert_pem: chain.clone() })
            .await
            .map_err(status)?;
        let why = if presented.role != want {
            "role change"
        } else if presented.issuer != ca_name {
            "CA rotation"
        } else {
            "renewal"
        };
        tracing::info!(node = %node.name, serial = %signed.serial, role = want.as_str(), reason = why, valid_for_s = expiry.as_secs(), "issued the node a new certificate");
        Ok(chain)
    }

    /// Ends a CA rotation once every node and client identity holds a
    /// certificate from the new CA: from then on only it is trusted.
    async fn finish_ca_rotation(&self) {
        let done = self.manager.store.read(|s| {
            let pending = s.ca_rotation_pending()?;
            pending.is_empty().then(|| s.cluster.as_ref().map(|c| c.ca_cert_pem.clone())).flatten()
        });
        let Some(cert_pem) = done else { return };
        match self.manager.propose(Command::FinishCaRotation { cert_pem }).await {
            Ok(_) => tracing::info!("CA rotation complete: every node and client holds a certificate from the new CA; the old CA is no longer trusted"),
            Err(e) => tracing::warn!(error = %e, "could not finish the CA rotation; retrying"),
        }
    }

    /// Records a node's volume sizes when they changed (by more than a
    /// little: a database's volume grows all the time); answers with the
    /// ids of the volumes it holds that the cluster no longer has.
    async fn record_volumes(&self, node_name: &str, node: u64, local: &[LocalVolume]) -> Result<Vec<String>, Status> {
        const MAX_VOLUMES: usize = 10_000;
        if local.len() > MAX_VOLUMES {
            return Err(Status::invalid_argument(format!("{} volumes reported: at most {MAX_VOLUMES}", local.len())));
        }
        let (report, gone) = self.manager.store.read(|s| {
            let mut report = Vec::new();
            let mut gone = Vec::new();
            for l in local {
                match s.volumes.get(&l.name).filter(|v| v.id == l.id) {
                    None => gone.push(l.id.clone()),
                    Some(v) => {
                        let known = v.nodes.get(&node);
                        let moved = known.is_none_or(|r| {
                            let diff = r.size.abs_diff(l.size);
                            r.updated_at_ms == 0 || diff > (64 << 10).max(r.size / 100)
                        });
                        if moved {
                            report.push((l.name.clone(), l.id.clone(), l.size));
                        }
                    }
                }
            }
            (report, gone)
        });
        if !report.is_empty() {
            tracing::debug!(node = %node_name, volumes = report.len(), "volume sizes recorded");
            self.manager.propose(Command::VolumeReport { node, volumes: report }).await.map_err(status)?;
        }
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn peer(id: u64, endpoint: &str) -> Peer {
        Peer { node_id: id, name: format!("n{id}"), public_key: format!("key{id}"), endpoint: endpoint.into(), allowed_ips: vec![format!("100.64.{id}.0/26")] }
    }

    /// Applying a delta to the old set gives the new one, whatever moved.
    #[test]
    fn peer_deltas_carry_only_what_changed() {
        let old: Vec<Peer> = (1..=5).map(|i| peer(i, "198.18.0.1:51820")).collect();
        // n2 left, n4 moved, n6 and n0 joined.
        let mut new: Vec<Peer> = [0, 1, 3, 4, 5, 6].iter().map(|i| peer(*i, "198.18.0.1:51820")).collect();
        new[3].endpoint = "198.18.0.9:51820".into();
        let d = peer_delta(&old, &new);
        assert_eq!(d.removed, vec![2]);
        assert_eq!(d.upserts.iter().map(|p| p.node_id).collect::<Vec<_>>(), vec![0, 4, 6]);
        let mut applied: BTreeMap<u64, Peer> = old.iter().map(|p| (p.node_id, p.clone())).collect();
        for id in &d.removed {
            applied.remove(id);
        }
        applied.extend(d.upserts.into_iter().map(|p| (p.node_id, p)));
        assert_eq!(applied.into_values().collect::<Vec<_>>(), new);
        assert_eq!(peer_delta(&new, &new), PeerDelta::default());
        assert_eq!(peer_delta(&[], &new).upserts, new);
        assert_eq!(peer_delta(&new, &[]).removed, vec![0, 1, 3, 4, 5, 6]);
    }

    /// A leader answers from the sets it still has, and only when the
    /// delta is the smaller message.
    #[test]
    fn deltas_come_from_the_kept_versions_only() {
        let v1: Arc<Vec<Peer>> = Arc::new((1..=10).map(|i| peer(i, "198.18.0.1:51820")).collect());
        let mut now = (*v1).clone();
        now.remove(3);
        let facts = HeartbeatFacts {
            topology: 2,
            period: Duration::from_millis(500),
            soonest: Duration::from_millis(500),
            managers: Vec::new(),
            managers_version: 1,
            peers: Arc::new(now),
            peers_version: 22,
            history: vec![(11, v1), (5, Arc::new(Vec::new()))],
            deltas: Default::default(),
            address_pool: String::new(),
        };
        let d = facts.delta_from(11).expect("a delta from a kept version");
        assert_eq!((d.upserts.len(), d.removed.clone()), (0, vec![4]));
        assert!(facts.delta_from(99).is_none(), "an unknown version gets the whole list");
        assert!(facts.delta_from(5).is_none(), "from nothing, the whole list is no bigger");
        assert!(Arc::ptr_eq(&facts.delta_from(11).unwrap(), &d), "worked out once");
    }

    #[test]
    fn the_peer_version_moves_with_the_peers_and_only_with_them() {
        use crate::store::objects::NetworkObj;
        let mut s = State::default();
        for id in 1..=3 {
            let mut n = NodeObj::new(id, &format!("n{id}"), Role::Worker, "198.18.0.1:7700");
            n.status = NodeStatus::Ready;
            n.overlay_key = format!("key{id}");
            n.overlay_endpoint = format!("198.18.0.{id}:51820");
            s.nodes.insert(id, n);
        }
        let v0 = peers_version(&s);
        assert_eq!(peer_list(&s).iter().map(|p| p.node_id).collect::<Vec<_>>(), vec![1, 2, 3], "the set those versions stand for");
        s.nodes.get_mut(&2).unwrap().memory_bytes = 1 << 30;
        assert_eq!(peers_version(&s), v0, "a resource refresh is no peer change");
        let net = NetworkObj {
            id: "id-front".into(),
            name: "front".into(),
            subnet: "100.64.0.0/24".into(),
            gateway: String::new(),
            internal: false,
            labels: Default::default(),
            slices: [(2, vec!["100.64.0.0/26".to_string()])].into(),
            last_address: Default::default(),
            version: 1,
            created_at_ms: 0,
        };
        s.networks.insert("front".into(), net);
        let v1 = peers_version(&s);
        assert_ne!(v1, v0, "a new slice is a new allowed IP");
        s.nodes.get_mut(&3).unwrap().status = NodeStatus::Down;
        let v2 = peers_version(&s);
        assert_ne!(v2, v1, "a node down leaves the peers");
        s.nodes.get_mut(&3).unwrap().status = NodeStatus::Ready;
        assert_eq!(peers_version(&s), v1, "and is back with the same version");
        s.nodes.get_mut(&1).unwrap().overlay_endpoint = "198.18.0.9:51820".into();
        assert_ne!(peers_version(&s), v1, "a moved endpoint");
    }

    #[test]
    fn a_node_has_one_heartbeat_write_in_flight_at_a_time() {
        let set = Arc::new(Mutex::new(HashSet::new()));
        let first = NodeWrite::begin(&set, 7);
        assert!(first.is_some());
        assert!(NodeWrite::begin(&set, 7).is_none(), "a second write of node 7 while the first waits");
        assert!(NodeWrite::begin(&set, 8).is_some(), "other nodes are not held up");
        drop(first);
        assert!(NodeWrite::begin(&set, 7).is_some(), "free again once the first is done");
    }

    #[test]
    fn a_stalled_leader_marks_no_node_down_in_a_large_cluster() {
        let (period, down_after) = (Duration::from_millis(500), Duration::from_secs(5));
        let t0 = Instant::now();
        // Ticks drift a little: the window must still fill.
        let tick = Duration::from_millis(499);
        // 100 nodes heartbeating every period: 100 answers a tick.
        let mut h = std::collections::VecDeque::new();
        let mut answered = 0;
        let mut last = Ok(());
        for i in 0..30u32 {
            answered += 100;
            last = kept_up(&mut h, t0 + tick * i, answered, (100, period, down_after));
            // Not a whole window yet: a new leader waits.
            if tick * i < down_after {
                assert!(last.is_err(), "tick {i}");
            }
        }
        assert_eq!(last, Ok(()), "a leader that keeps up marks silent nodes down");
        assert!(h.len() <= 12, "history stays one window long: {}", h.len());
        // It stalls: a tenth of the answers for a whole window.
        for i in 30..45u32 {
            answered += 10;
            last = kept_up(&mut h, t0 + tick * i, answered, (100, period, down_after));
        }
        assert!(matches!(last, Err((got, expected)) if got < expected / 2), "{last:?}");
        // A small cluster is never held.
        let mut h = std::collections::VecDeque::new();
        assert_eq!(kept_up(&mut h, t0, 0, (3, period, down_after)), Ok(()));
    }
}
