//! What this node reports of its load with each heartbeat, for the
//! managers' autoscaler: each container's CPU (from its cgroup's CPU
//! accounting) and the connections per second the routing mesh forwarded
//! per service (from its nftables counters), both as rates since the
//! previous sample.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use shoal_overlay::Overlay;
use shoal_proto::dispatcher::{ServiceRate, TaskUsage};

use crate::executor::Executor;

pub(crate) struct LoadMeter {
    executor: Arc<dyn Executor>,
    /// Per container: CPU nanoseconds and when they were read.
    cpu: Mutex<HashMap<String, (u64, Instant)>>,
    /// Per service: mesh connections counted and when.
    mesh: Mutex<HashMap<String, (u64, Instant)>>,
}

impl LoadMeter {
    pub(crate) fn new(executor: Arc<dyn Executor>) -> Self {
        LoadMeter { executor, cpu: Mutex::default(), mesh: Mutex::default() }
    }

    /// Rates since the previous call (nothing for what was first seen now).
    pub(crate) async fn sample(&self, overlay: Option<&Overlay>) -> (Vec<TaskUsage>, Vec<ServiceRate>) {
        let exec = self.executor.clone();
        let readings = tokio::task::spawn_blocking(move || {
            let ids = exec.list().unwrap_or_default();
            ids.into_iter().filter_map(|id| exec.cpu_usage_ns(&id).map(|ns| (id, ns))).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let now = Instant::now();
        let usage = {
            let mut prev = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
            let mut next = HashMap::with_capacity(readings.len());
            let mut usage = Vec::new();
            for (id, ns) in readings {
                if let Some((before, at)) = prev.get(&id) {
                    let secs = now.duration_since(*at).as_secs_f64();
                    if secs > 0.0 && ns >= *before {
                        let millicores = ((ns - before) as f64 / 1e6 / secs).round() as u64;
                        usage.push(TaskUsage { task_id: id.clone(), cpu_millicores: millicores });
                    }
                }
                next.insert(id, (ns, now));
            }
            *prev = next;
            usage
        };
        let counters = match overlay {
            Some(o) => match o.mesh_counters().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "could not read the routing mesh's counters");
                    Default::default()
                }
            },
            None => Default::default(),
        };
        let mut prev = self.mesh.lock().unwrap_or_else(|e| e.into_inner());
        let mut rates = Vec::new();
        let mut next = HashMap::with_capacity(counters.len());
        for (service, n) in counters {
            if let Some((before, at)) = prev.get(&service) {
                let secs = now.duration_since(*at).as_secs_f64();
                // The rule set was rewritten (counters start at 0 again):
                // what it holds now came since.
                let delta = if n >= *before { n - before } else { n };
                if secs > 0.0 {
                    rates.push(ServiceRate { service: service.clone(), per_second: delta as f64 / secs });
                }
            }
            next.insert(service, (n, now));
        }
        *prev = next;
        (usage, rates)
    }
}
