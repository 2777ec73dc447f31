//! The scheduler's filter pipeline: ready → availability → constraints →
//! resources → host ports. Each node fails at its first failing filter; the
//! failures are counted so a task that fits nowhere can say why ("no node
//! satisfies node.labels.zone==b: 3 nodes checked").
//!
//! The orchestrator uses the same filters for global services (which nodes
//! are eligible), for enforcing constraints on running tasks and for
//! rebalancing (which nodes could take one more task).

use std::collections::{BTreeMap, HashMap};

use shoal_proto::control::ServiceSpec;

use crate::store::State;
use crate::store::objects::{Availability, NodeObj, NodeStatus};
use crate::store::state::format_node_id;

/// What a constraint compares.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Key {
    Id,
    Name,
    Role,
    Label(String),
}

/// One parsed placement constraint (`node.labels.zone==a`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Constraint {
    key: Key,
    equal: bool,
    value: String,
    /// The constraint as the operator wrote it, for explanations.
    text: String,
}

impl Constraint {
    /// Parses `node.(id|name|hostname|role|labels.K) (==|!=) V`. The managers
    /// validate specs on the way in (`spec::validate_constraint`); a spec
    /// that still fails to parse matches no node, and says so.
    pub fn parse(c: &str) -> Option<Constraint> {
        let (lhs, rhs, equal) = if let Some((l, r)) = c.split_once("==") {
            (l, r, true)
        } else if let Some((l, r)) = c.split_once("!=") {
            (l, r, false)
        } else {
            return None;
        };
        let (lhs, value) = (lhs.trim(), rhs.trim());
        if value.is_empty() {
            return None;
        }
        let key = match lhs {
            "node.id" => Key::Id,
            "node.name" | "node.hostname" => Key::Name,
            "node.role" => Key::Role,
            _ => Key::Label(lhs.strip_prefix("node.labels.").filter(|k| !k.is_empty())?.to_string()),
        };
        Some(Constraint { key, equal, value: value.to_string(), text: c.trim().to_string() })
    }

    /// Whether `node` satisfies the constraint. A missing label never
    /// equals anything, so `!=` matches nodes without the label (as Swarm).
    pub fn matches(&self, node: &NodeObj) -> bool {
        let eq = match &self.key {
            Key::Id => format_node_id(node.id) == self.value || node.id.to_string() == self.value,
            Key::Name => node.name == self.value,
            Key::Role => node.role.as_str() == self.value,
            Key::Label(k) => node.labels.get(k).is_some_and(|v| *v == self.value),
        };
        eq == self.equal
    }
}

/// Why a node cannot take a task: the first filter it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    Down,
    Paused,
    Drained,
    /// The index of the failed constraint in the spec, or `usize::MAX` for a
    /// constraint that does not parse.
    Constraint(usize),
    Cpu,
    Memory,
    /// The index of the conflicting port in the spec's published ports.
    Port(usize),
}

/// A port published on the host: (port, udp?).
pub type HostPort = (u32, bool);

/// A service spec prepared for filtering many nodes: constraints parsed
/// once, reservations and published ports extracted.
#[derive(Clone, Debug)]
pub struct Requirements {
    constraints: Vec<Option<Constraint>>,
    texts: Vec<String>,
    pub nano_cpus: u64,
    pub memory_bytes: u64,
    pub ports: Vec<HostPort>,
    /// `spread=node.labels.K` preferences: the label keys, outermost first.
    pub spread: Vec<String>,
}

impl Requirements {
    pub fn new(spec: &ServiceSpec, host_ports: bool) -> Self {
        let constraints = spec.constraints.iter().map(|c| Constraint::parse(c)).collect();
        let texts = spec.constraints.iter().map(|c| c.trim().to_string()).collect();
        let (nano_cpus, memory_bytes) = spec.reservations.as_ref().map_or((0, 0), |r| (r.nano_cpus, r.memory_bytes));
        let ports = if host_ports { published_ports(spec) } else { Vec::new() };
        let spread = spec
            .placement_prefs
            .iter()
            .filter_map(|p| p.strip_prefix("spread=")?.strip_prefix("node.labels."))
            .filter(|k| !k.is_empty())
            .map(str::to_string)
            .collect();
        Requirements { constraints, texts, nano_cpus, memory_bytes, ports, spread }
    }

    /// The filters that depend only on the node: ready, availability,
    /// constraints.
    pub fn check_static(&self, node: &NodeObj) -> Result<(), Reject> {
        if node.status != NodeStatus::Ready {
            return Err(Reject::Down);
        }
        match node.availability {
            Availability::Active => {}
            Availability::Pause => return Err(Reject::Paused),
            Availability::Drain => return Err(Reject::Drained),
        }
        self.check_constraints(node)
    }

    pub fn check_constraints(&self, node: &NodeObj) -> Result<(), Reject> {
        for (i, c) in self.constraints.iter().enumerate() {
            match c {
                Some(c) if c.matches(node) => {}
                Some(_) => return Err(Reject::Constraint(i)),
                None => return Err(Reject::Constraint(usize::MAX)),
            }
        }
        Ok(())
    }

    /// The filters that depend on what already runs there: resources and
    /// host ports.
    pub fn check_usage(&self, node: &NodeObj, usage: &NodeUsage) -> Result<(), Reject> {
        if self.nano_cpus > 0 && usage.nano_cpus.saturating_add(self.nano_cpus) > node.nano_cpus {
            return Err(Reject::Cpu);
        }
        if self.memory_bytes > 0 && usage.memory_bytes.saturating_add(self.memory_bytes) > node.memory_bytes {
            return Err(Reject::Memory);
        }
        for (i, p) in self.ports.iter().enumerate() {
            if usage.ports.contains(p) {
                return Err(Reject::Port(i));
            }
        }
        Ok(())
    }

    pub fn check(&self, node: &NodeObj, usage: &NodeUsage) -> Result<(), Reject> {
        self.check_static(node)?;
        self.check_usage(node, usage)
    }

    /// One filter's account of the nodes it turned away.
    pub fn explain_one(&self, r: Reject, n: usize) -> String {
        let nodes = plural(n, "node");
        match r {
            Reject::Down => format!("{nodes} down"),
            Reject::Paused => format!("{nodes} paused"),
            Reject::Drained => format!("{nodes} drained"),
            Reject::Constraint(usize::MAX) => format!("invalid constraint on {nodes}"),
            Reject::Constraint(i) => {
                let c = self.texts.get(i).map_or("a constraint", String::as_str);
                format!("{c} not satisfied on {nodes}")
            }
            Reject::Cpu => format!("insufficient cpu on {nodes} (need {})", fmt_cpus(self.nano_cpus)),
            Reject::Memory => format!("insufficient memory on {nodes} (need {})", fmt_bytes(self.memory_bytes)),
            Reject::Port(i) => {
                let (p, udp) = self.ports.get(i).copied().unwrap_or((0, false));
                format!("host port {p}/{} in use on {nodes}", if udp { "udp" } else { "tcp" })
            }
        }
    }

    /// Why no node took the task, from the per-filter counts. `checked` is
    /// the number of nodes looked at.
    pub fn explain(&self, rejects: &Rejects, checked: usize) -> String {
        if checked == 0 {
            return "no nodes in the cluster".to_string();
        }
        let parts: Vec<(Reject, usize)> = rejects.counts.iter().map(|(r, n)| (*r, *n)).collect();
        match parts.as_slice() {
            [] => format!("no suitable node: {} checked", plural(checked, "node")),
            [(Reject::Constraint(i), _)] if *i != usize::MAX => {
                let c = self.texts.get(*i).map_or("a constraint", String::as_str);
                format!("no node satisfies {c}: {} checked", plural(checked, "node"))
            }
            [(r, n)] if *n == checked => self.explain_one(*r, *n),
            _ => {
                let text: Vec<String> = parts.iter().map(|(r, n)| self.explain_one(*r, *n)).collect();
                format!("no suitable node ({} checked): {}", plural(checked, "node"), text.join("; "))
            }
        }
    }
}

/// Per-filter counts of rejected nodes, in pipeline order.
#[derive(Clone, Debug, Default)]
pub struct Rejects {
    counts: BTreeMap<Reject, usize>,
}

impl Rejects {
    pub fn add(&mut self, r: Reject) {
        *self.counts.entry(r).or_default() += 1;
    }
}

/// The ports a spec publishes in host mode: one task per node may hold
/// each. (Ingress ports are reserved cluster-wide when the service is
/// created, and every node forwards them: they never limit placement.)
pub fn published_ports(spec: &ServiceSpec) -> Vec<HostPort> {
    crate::store::index::host_ports(spec)
}

/// What the live tasks on one node hold.
#[derive(Clone, Debug, Default)]
pub struct NodeUsage {
    pub nano_cpus: u64,
    pub memory_bytes: u64,
    pub ports: Vec<HostPort>,
    /// Tasks that should run there (desired running, not over).
    pub tasks: u32,
}

impl NodeUsage {
    /// A node's usage from what the store's index says its tasks hold.
    pub fn from_held(held: &crate::store::index::Held, host_ports: bool) -> NodeUsage {
        NodeUsage {
            nano_cpus: held.nano_cpus,
            memory_bytes: held.memory_bytes,
            ports: if host_ports { held.ports.keys().copied().collect() } else { Vec::new() },
            tasks: held.tasks,
        }
    }

    /// Books a task placed during this decision.
    pub fn book(&mut self, req: &Requirements) {
        self.nano_cpus = self.nano_cpus.saturating_add(req.nano_cpus);
        self.memory_bytes = self.memory_bytes.saturating_add(req.memory_bytes);
        self.ports.extend_from_slice(&req.ports);
        self.tasks += 1;
    }
}

/// Usage of every node by the tasks that hold resources there.
pub fn usage_by_node(state: &State, host_ports: bool) -> HashMap<u64, NodeUsage> {
    state.index.held_by_node().map(|(n, held)| (n, NodeUsage::from_held(held, host_ports))).collect()
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 { format!("1 {what}") } else { format!("{n} {what}s") }
}

pub fn fmt_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let f = b as f64;
    if f >= GIB {
        format!("{:.1} GiB", f / GIB)
    } else if f >= MIB {
        format!("{:.1} MiB", f / MIB)
    } else {
        format!("{b} bytes")
    }
}

pub fn fmt_cpus(nano: u64) -> String {
    let c = nano as f64 / 1e9;
    if c == 1.0 { "1 cpu".to_string() } else { format!("{c} cpus") }
}
