//! Load as the agents report it with their heartbeats, kept in memory on
//! the manager that receives them (the leader): each task's CPU and each
//! node's routing-mesh connection rate per service. The autoscaler reads
//! it, and so do `service ps` and `service inspect`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shoal_proto::dispatcher::{ServiceRate, TaskUsage};

/// A report older than this no longer counts (a node that stopped
/// reporting is no load, and its tasks are being replaced), until the
/// dispatcher sets it to its heartbeat timeout ([`Metrics::set_fresh`]).
const FRESH: Duration = Duration::from_secs(5);

pub struct Metrics {
    inner: Mutex<Inner>,
    /// How long a report counts, in ms: as long as its node counts as up.
    fresh_ms: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics { inner: Mutex::default(), fresh_ms: AtomicU64::new(FRESH.as_millis() as u64) }
    }
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
    /// Reports count for `d` after they arrive: the time a silent node
    /// takes to be marked down (heartbeats come every half of it, or less
    /// often in a big cluster, so a live node's report never lapses).
    pub fn set_fresh(&self, d: Duration) {
        self.fresh_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }

    fn fresh(&self) -> Duration {
        Duration::from_millis(self.fresh_ms.load(Ordering::Relaxed))
    }

    /// One heartbeat's report from `node`.
    pub fn record(&self, node: u64, usage: &[TaskUsage], rates: &[ServiceRate]) {
        let now = Instant::now();
        let fresh = self.fresh();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for u in usage {
            inner.tasks.insert(u.task_id.clone(), (u.cpu_millicores, now));
        }
        let per: HashMap<String, f64> = rates.iter().filter(|r| r.per_second.is_finite() && r.per_second >= 0.0).map(|r| (r.service.clone(), r.per_second)).collect();
        inner.rates.insert(node, (per, now));
        // Tasks that stopped reporting long ago are gone: swept once per
        // freshness time, not on every heartbeat (a pass over every task).
        if now.duration_since(inner.swept) >= fresh {
            inner.swept = now;
            inner.tasks.retain(|_, (_, at)| now.duration_since(*at) < fresh * 10);
        }
    }

    /// A task's CPU in percent of one CPU, if it reported lately.
    pub fn task_cpu_pct(&self, task: &str) -> Option<f64> {
        let fresh = self.fresh();
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.tasks.get(task).filter(|(_, at)| at.elapsed() < fresh).map(|(m, _)| *m as f64 / 10.0)
    }

    /// Calls `f` with each task that reported lately and its CPU in percent
    /// of one CPU: one pass over what was reported, whatever the cluster holds.
    pub fn each_task_cpu_pct(&self, mut f: impl FnMut(&str, f64)) {
        let fresh = self.fresh();
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for (task, (m, at)) in &inner.tasks {
            if now.duration_since(*at) < fresh {
                f(task, *m as f64 / 10.0);
            }
        }
    }

    /// Connections per second through every node's routing mesh to
    /// `service`.
    pub fn service_rate(&self, service: &str) -> f64 {
        let fresh = self.fresh();
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.rates.values().filter(|(_, at)| at.elapsed() < fresh).filter_map(|(m, _)| m.get(service)).sum()
    }
}
