//! Indexes over the tasks, kept in step by `State::apply` so that readers,
//! the orchestrator and the dispatcher look up what they need instead of
//! scanning every task: tasks by service, tasks by node, running tasks per
//! service, and the overlay addresses held per network. Not replicated: a
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
        Key { service: t.service_id.clone(), node: t.node_id, running: t.state == TaskState::Running, wanted, addresses }
    }
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

    /// Whether a task that has not ended holds `addr` on network `net`.
    pub fn address_used(&self, net: &str, addr: u32) -> bool {
        self.addresses.get(net).is_some_and(|s| s.contains(&addr))
    }
}
