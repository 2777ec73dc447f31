//! Load as the agents report it with their heartbeats, kept in memory on
//! the manager that receives them (the leader): each task's CPU and each
//! node's routing-mesh connection rate per service. The autoscaler reads
//! it, and so do `service ps` and `service inspect`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use shoal_proto::dispatcher::{ServiceRate, TaskUsage};

/// A report older than this no longer counts (a node that stopped
/// reporting is no load, and its tasks are being replaced).
const FRESH: Duration = Duration::from_secs(3);

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

struct Inner {
    /// When old tasks were last dropped.
    swept: Instant,
    /// Task id → (millicores, when reported).
    tasks: HashMap<String, (u64, Instant)>,
    /// Node → (service name → connections per second, when reported).
    rates: HashMap<u64, (HashMap<String, f64>, Instant)>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner { swept: Instant::now(), tasks: HashMap::new(), rates: HashMap::new() }
    }
}

impl Metrics {
    /// One heartbeat's report from `node`.
    pub fn record(&self, node: u64, usage: &[TaskUsage], rates: &[ServiceRate]) {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for u in usage {
            inner.tasks.insert(u.task_id.clone(), (u.cpu_millicores, now));
        }
        let per: HashMap<String, f64> = rates.iter().filter(|r| r.per_second.is_finite() && r.per_second >= 0.0).map(|r| (r.service.clone(), r.per_second)).collect();
        inner.rates.insert(node, (per, now));
        // Tasks that stopped reporting long ago are gone: swept once per
        // FRESH, not on every heartbeat (a pass over every task).
        if now.duration_since(inner.swept) >= FRESH {
            inner.swept = now;
            inner.tasks.retain(|_, (_, at)| now.duration_since(*at) < FRESH * 10);
        }
    }

    /// A task's CPU in percent of one CPU, if it reported lately.
    pub fn task_cpu_pct(&self, task: &str) -> Option<f64> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.tasks.get(task).filter(|(_, at)| at.elapsed() < FRESH).map(|(m, _)| *m as f64 / 10.0)
    }

    /// Calls `f` with each task that reported lately and its CPU in percent
    /// of one CPU: one pass over what was reported, whatever the cluster holds.
    pub fn each_task_cpu_pct(&self, mut f: impl FnMut(&str, f64)) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for (task, (m, at)) in &inner.tasks {
            if now.duration_since(*at) < FRESH {
                f(task, *m as f64 / 10.0);
            }
        }
    }

    /// Connections per second through every node's routing mesh to
    /// `service`.
    pub fn service_rate(&self, service: &str) -> f64 {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.rates.values().filter(|(_, at)| at.elapsed() < FRESH).filter_map(|(m, _)| m.get(service)).sum()
    }
}
