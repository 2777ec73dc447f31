//! Indexes over the tasks, kept in step by `State::apply` so that readers,
//! the orchestrator and the dispatcher look up what they need instead of
//! scanning every task: tasks by service, tasks by node, running tasks per
//! service, the overlay addresses held per network, and for the scheduler
//! what each node's tasks hold, each service's tasks per node and the tasks
//! waiting for a node. Not replicated: a
//! follower or a restarted manager rebuilds them from the tasks
//! ([`TaskIndex::build`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::task::{TaskObj, TaskState};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskIndex {
    by_service: HashMap<String, BTreeSet<String>>,
    by_node: HashMap<u64, BTreeSet<String>>,
    running: HashMap<String, usize>,
    /// Service → spec version → counts of the tasks the orchestrator wants
    /// running (`service ls` reads its replica columns from these).
    wanted: HashMap<String, BTreeMap<u64, Wanted>>,
    /// Network name → addresses (as u32) held by tasks that have not ended.
    addresses: HashMap<String, HashSet<u32>>,
    /// Node → what the tasks that hold its resources hold.
    held: HashMap<u64, Held>,
    /// Service → node → its tasks there that count for spreading.
    spread: HashMap<String, HashMap<u64, u32>>,
    /// Tasks that want a node (the scheduler's work).
    waiting: BTreeSet<String>,
}

/// What the tasks holding one node's resources (assigned or later, not
/// ended) hold together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub nano_cpus: u64,
    pub memory_bytes: u64,
    /// Published host-mode ports (port, udp) → how many tasks hold each.
    pub ports: BTreeMap<(u32, bool), u32>,
    /// Those of the tasks that should run (desired running or earlier).
    pub tasks: u32,
    /// Every one of the tasks.
    holders: u32,
}

/// What one task holds on its node.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Holds {
    node: u64,
    nano_cpus: u64,
    memory_bytes: u64,
    ports: Vec<(u32, bool)>,
    /// Desired running or earlier: counts as a task of the node, and (with
    /// a node) for spreading its service.
    should_run: bool,
}

/// Counts of one service version's tasks whose desired state is running.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    /// Every one of them.
    pub tasks: usize,
    /// Those running.
    pub running: usize,
    /// Those that have not ended.
    pub live: usize,
}

/// What of a task the indexes depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    service: String,
    node: Option<u64>,
    running: bool,
    /// Desired running: (spec version, not ended).
    wanted: Option<(u64, bool)>,
    addresses: Vec<(String, u32)>,
    holds: Option<Holds>,
    /// Wants a node ([`TaskObj::wants_node`]).
    waiting: bool,
}

impl Key {
    pub fn of(t: &TaskObj) -> Key {
        let addresses = if t.state.is_terminal() {
            Vec::new()
        } else {
            t.spec
                .networks
                .iter()
                .zip(&t.addresses)
                .filter_map(|(n, a)| Some((n.clone(), u32::from(a.split('/').next()?.parse::<std::net::Ipv4Addr>().ok()?))))
                .collect()
        };
        let wanted = (t.desired_state == TaskState::Running).then_some((t.spec_version, !t.state.is_terminal()));
        // The scheduler's view.
        let holds = t.node_id.filter(|_| t.holds_resources()).map(|node| {
            let (nano_cpus, memory_bytes) = t.spec.reservations.as_ref().map_or((0, 0), |r| (r.nano_cpus, r.memory_bytes));
            Holds { node, nano_cpus, memory_bytes, ports: host_ports(&t.spec), should_run: t.desired_state <= TaskState::Running }
        });
        let waiting = t.wants_node();
        Key { service: t.service_id.clone(), node: t.node_id, running: t.state == TaskState::Running, wanted, addresses, holds, waiting }
    }
}

/// The ports a spec publishes in host mode (one task per node may hold
/// each; ingress ports are the routing mesh's, reserved cluster-wide).
pub fn host_ports(spec: &shoal_proto::control::ServiceSpec) -> Vec<(u32, bool)> {
    spec.ports.iter().filter(|p| !crate::spec::is_ingress(p)).map(|p| (p.published, p.protocol == "udp")).collect()
}

impl TaskIndex {
    /// The indexes of `tasks`, from scratch.
    pub fn build<'a>(tasks: impl IntoIterator<Item = &'a TaskObj>) -> TaskIndex {
        let mut ix = TaskIndex::default();
        for t in tasks {
            ix.add(&t.id, &Key::of(t));
        }
        ix
    }

    pub fn add(&mut self, id: &str, k: &Key) {
        self.by_service.entry(k.service.clone()).or_default().insert(id.to_string());
        if let Some(n) = k.node {
            self.by_node.entry(n).or_default().insert(id.to_string());
        }
        if k.running {
            *self.running.entry(k.service.clone()).or_default() += 1;
        }
        if let Some((version, live)) = k.wanted {
            let w = self.wanted.entry(k.service.clone()).or_default().entry(version).or_default();
            w.tasks += 1;
            w.running += usize::from(k.running);
            w.live += usize::from(live);
        }
        for (net, a) in &k.addresses {
            self.addresses.entry(net.clone()).or_default().insert(*a);
        }
        if let Some(h) = &k.holds {
            let held = self.held.entry(h.node).or_default();
            held.holders += 1;
            held.nano_cpus = held.nano_cpus.saturating_add(h.nano_cpus);
            held.memory_bytes = held.memory_bytes.saturating_add(h.memory_bytes);
            for p in &h.ports {
                *held.ports.entry(*p).or_default() += 1;
            }
            if h.should_run {
                held.tasks += 1;
                *self.spread.entry(k.service.clone()).or_default().entry(h.node).or_default() += 1;
            }
        }
        if k.waiting {
            self.waiting.insert(id.to_string());
        }
    }

    pub fn remove(&mut self, id: &str, k: &Key) {
        if let Some(set) = self.by_service.get_mut(&k.service) {
            set.remove(id);
            if set.is_empty() {
                self.by_service.remove(&k.service);
            }
        }
        if let Some(n) = k.node
            && let Some(set) = self.by_node.get_mut(&n)
        {
            set.remove(id);
            if set.is_empty() {
                self.by_node.remove(&n);
            }
        }
        if k.running
            && let Some(c) = self.running.get_mut(&k.service)
        {
            *c -= 1;
            if *c == 0 {
                self.running.remove(&k.service);
            }
        }
        if let Some((version, live)) = k.wanted
            && let Some(versions) = self.wanted.get_mut(&k.service)
        {
            if let Some(w) = versions.get_mut(&version) {
                w.tasks -= 1;
                w.running -= usize::from(k.running);
                w.live -= usize::from(live);
                if w.tasks == 0 {
                    versions.remove(&version);
                }
            }
            if versions.is_empty() {
                self.wanted.remove(&k.service);
            }
        }
        for (net, a) in &k.addresses {
            if let Some(set) = self.addresses.get_mut(net) {
                set.remove(a);
                if set.is_empty() {
                    self.addresses.remove(net);
                }
            }
        }
        if let Some(h) = &k.holds {
            if let Some(held) = self.held.get_mut(&h.node) {
                // Sums of what was added: saturation aside, exact.
                held.nano_cpus = held.nano_cpus.saturating_sub(h.nano_cpus);
                held.memory_bytes = held.memory_bytes.saturating_sub(h.memory_bytes);
                for p in &h.ports {
                    if let Some(c) = held.ports.get_mut(p) {
                        *c -= 1;
                        if *c == 0 {
                            held.ports.remove(p);
                        }
                    }
                }
                held.tasks = held.tasks.saturating_sub(u32::from(h.should_run));
                held.holders = held.holders.saturating_sub(1);
                if held.holders == 0 {
                    self.held.remove(&h.node);
                }
            }
            if h.should_run
                && let Some(nodes) = self.spread.get_mut(&k.service)
            {
                if let Some(c) = nodes.get_mut(&h.node) {
                    *c -= 1;
                    if *c == 0 {
                        nodes.remove(&h.node);
                    }
                }
                if nodes.is_empty() {
                    self.spread.remove(&k.service);
                }
            }
        }
        if k.waiting {
            self.waiting.remove(id);
        }
    }

    /// Re-indexes a task whose key went from `before` to `after`.
    pub fn update(&mut self, id: &str, before: &Key, after: &Key) {
        if before != after {
            self.remove(id, before);
            self.add(id, after);
        }
    }

    /// Ids of service `id`'s tasks, every state.
    pub fn service_tasks<'a>(&'a self, id: &str) -> impl Iterator<Item = &'a String> + use<'a> {
        self.by_service.get(id).into_iter().flatten()
    }

    /// Ids of the tasks that have node `id`, every state.
    pub fn node_tasks(&self, id: u64) -> impl Iterator<Item = &String> {
        self.by_node.get(&id).into_iter().flatten()
    }

    /// How many of service `id`'s tasks are running.
    pub fn running(&self, id: &str) -> usize {
        self.running.get(id).copied().unwrap_or(0)
    }

    /// Service `id`'s tasks with desired state running, counted per spec
    /// version.
    pub fn wanted(&self, id: &str) -> impl Iterator<Item = (u64, Wanted)> + '_ {
        self.wanted.get(id).into_iter().flatten().map(|(v, w)| (*v, *w))
    }

    /// What the tasks holding node `id`'s resources hold (none: nothing).
    pub fn held(&self, id: u64) -> Option<&Held> {
        self.held.get(&id)
    }

    /// Nodes that hold resources, with what they hold.
    pub fn held_by_node(&self) -> impl Iterator<Item = (u64, &Held)> {
        self.held.iter().map(|(n, h)| (*n, h))
    }

    /// Service `id`'s tasks per node that count for spreading it.
    pub fn spread(&self, id: &str) -> Option<&HashMap<u64, u32>> {
        self.spread.get(id)
    }

    /// Ids of the tasks that want a node.
    pub fn waiting(&self) -> impl Iterator<Item = &String> {
        self.waiting.iter()
    }

    /// Whether a task that has not ended holds `addr` on network `net`.
    pub fn address_used(&self, net: &str, addr: u32) -> bool {
        self.addresses.get(net).is_some_and(|s| s.contains(&addr))
    }
}
