//! The built-in autoscaler (leader only), after Knative's KPA: every
//! 500 ms it samples each autoscaled service's load (its running tasks'
//! CPU and its requests per second through the routing mesh, from the
//! agents' reports); every 2 s it decides. Up: straight to the count the
//! load needs over the short panic window (a tenth of the stable window,
//! 6 s by default) or over the last decision period, whichever is more. Down: to what the stable window (60 s) needs, only
//! after the cooldown since the last change and never while in panic
//! (the panic window needed at least twice the ready tasks within the
//! last stable window). Always within [min, max]. Each decision is one
//! Raft write (`Command::Autoscale`), recorded with the service.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::control::Autoscale;
use tokio::sync::watch;

use crate::manager::{now_ms, Manager};
use crate::orchestrator::leader;
use crate::store::task::TaskState;
use crate::store::{Command, State};

/// How often load is sampled, and how many samples make a decision period.
const SAMPLE: Duration = Duration::from_millis(500);
const SAMPLES_PER_DECISION: u32 = 4;
pub const DEFAULT_STABLE_WINDOW_MS: u64 = 60_000;
pub const DEFAULT_COOLDOWN_MS: u64 = 60_000;

/// One look at a service's load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub at_ms: u64,
    /// Percent of one CPU, summed over the running tasks.
    pub cpu_pct: f64,
    /// Requests per second through the routing mesh.
    pub rps: f64,
}

/// A service's recent samples and whether it is in panic mode.
#[derive(Clone, Debug, Default)]
pub struct Window {
    samples: VecDeque<Sample>,
    panic_until_ms: u64,
}

/// What a decision needs to know besides the samples.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub cfg: &'a Autoscale,
    /// CPUs one task may use (its --limit-cpu, else 1).
    pub task_cpus: f64,
    pub current: u64,
    pub ready: u64,
    pub last_change_ms: u64,
    pub now_ms: u64,
}

impl Window {
    pub fn push(&mut self, s: Sample, stable_ms: u64) {
        self.samples.push_back(s);
        while self.samples.front().is_some_and(|f| f.at_ms + stable_ms < s.at_ms) {
            self.samples.pop_front();
        }
    }

    fn average(&self, since_ms: u64) -> Option<(f64, f64)> {
        let v: Vec<&Sample> = self.samples.iter().filter(|s| s.at_ms >= since_ms).collect();
        (!v.is_empty()).then(|| {
            let n = v.len() as f64;
            (v.iter().map(|s| s.cpu_pct).sum::<f64>() / n, v.iter().map(|s| s.rps).sum::<f64>() / n)
        })
    }
}

/// Tasks needed for `cpu` (percent of one CPU) and `rps`, by each target
/// set; with the reason, for the record.
fn needed(i: &Inputs<'_>, cpu: f64, rps: f64, over: &str) -> (u64, String) {
    let mut best = (0u64, String::new());
    if i.cfg.target_cpu_pct > 0 {
        let each = f64::from(i.cfg.target_cpu_pct) * i.task_cpus;
        let n = (cpu / each).ceil() as u64;
        best = (n, format!("CPU {cpu:.0}% over the {over} (target {}% per task)", i.cfg.target_cpu_pct));
    }
    if i.cfg.target_rps > 0 {
        let n = (rps / i.cfg.target_rps as f64).ceil() as u64;
        if n >= best.0 || best.1.is_empty() {
            best = (n, format!("{rps:.1} requests/s over the {over} (target {} per task)", i.cfg.target_rps));
        }
    }
    best
}

/// One decision: the new replica count and why, or None to keep it.
pub fn decide(w: &mut Window, i: &Inputs<'_>) -> Option<(u64, String)> {
    let stable_ms = if i.cfg.stable_window_ms == 0 { DEFAULT_STABLE_WINDOW_MS } else { i.cfg.stable_window_ms };
    let panic_ms = (stable_ms / 10).max(1);
    let cooldown = if i.cfg.cooldown_ms == 0 { DEFAULT_COOLDOWN_MS } else { i.cfg.cooldown_ms };
    let (min, max) = (i.cfg.min, i.cfg.max.max(i.cfg.min));
    if i.current < min {
        return Some((min, format!("below --min {min}")));
    }
    if i.current > max {
        return Some((max, format!("above --max {max}")));
    }
    let (stable_cpu, stable_rps) = w.average(i.now_ms.saturating_sub(stable_ms))?;
    let (panic_cpu, panic_rps) = w.average(i.now_ms.saturating_sub(panic_ms))?;
    let panic_window = format!("last {:.0} s", panic_ms as f64 / 1000.0);
    let stable_window = format!("last {:.0} s", stable_ms as f64 / 1000.0);
    // The panic window's average trails a step for its whole length: the
    // last decision period shows the load as it is now, so the first
    // decision after a step already asks for everything the step needs.
    let period_ms = SAMPLE.as_millis() as u64 * u64::from(SAMPLES_PER_DECISION);
    let (now_cpu, now_rps) = w.average(i.now_ms.saturating_sub(period_ms.saturating_sub(1))).unwrap_or((panic_cpu, panic_rps));
    let (panic_need, panic_why) = {
        let a = needed(i, panic_cpu, panic_rps, &panic_window);
        let b = needed(i, now_cpu, now_rps, &format!("last {} s", period_ms / 1000));
        if b.0 > a.0 { b } else { a }
    };
    let (stable_need, stable_why) = needed(i, stable_cpu, stable_rps, &stable_window);
    if panic_need as f64 >= 2.0 * i.ready.max(1) as f64 {
        w.panic_until_ms = i.now_ms + stable_ms;
    }
    let panic = i.now_ms < w.panic_until_ms;
    // Up at once, to what the short window needs.
    let up = panic_need.max(stable_need).clamp(min, max);
    if up > i.current {
        let why = if panic_need >= stable_need { panic_why } else { stable_why };
        let mode = if panic { " (panic)" } else { "" };
        return Some((up, format!("{why}: {up} tasks needed{mode}")));
    }
    // Down slowly: the stable window's need, after the cooldown.
    let down = stable_need.clamp(min, max);
    if down < i.current && !panic && i.now_ms.saturating_sub(i.last_change_ms) >= cooldown {
        return Some((down, format!("{stable_why}: {down} tasks needed, {} s since the last change", (i.now_ms - i.last_change_ms) / 1000)));
    }
    None
}

pub struct Autoscaler {
    manager: Arc<Manager>,
}

impl Autoscaler {
    pub fn new(manager: Arc<Manager>) -> Self {
        Autoscaler { manager }
    }

    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        while leader::until_leader(&self.manager, &mut shutdown).await {
            let mut windows: HashMap<String, Window> = HashMap::new();
            let mut tick = tokio::time::interval(SAMPLE);
            let mut n = 0u32;
            while self.manager.is_leader() {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                }
                n = n.wrapping_add(1);
                let now = now_ms();
                let metrics = &self.manager.metrics;
                let looks: Vec<(String, Autoscale, Sample)> = self.manager.store.read(|s: &State| {
                    s.services
                        .values()
                        .filter_map(|svc| {
                            let cfg = svc.spec.autoscale.clone()?;
                            let running = s.service_tasks(&svc.id).filter(|t| t.state == TaskState::Running);
                            let cpu_pct = running.filter_map(|t| metrics.task_cpu_pct(&t.id)).sum();
                            let rps = metrics.service_rate(&svc.spec.name);
                            Some((svc.id.clone(), cfg, Sample { at_ms: now, cpu_pct, rps }))
                        })
                        .collect()
                });
                windows.retain(|id, _| looks.iter().any(|(l, _, _)| l == id));
                for (id, cfg, sample) in &looks {
                    let stable = if cfg.stable_window_ms == 0 { DEFAULT_STABLE_WINDOW_MS } else { cfg.stable_window_ms };
                    windows.entry(id.clone()).or_default().push(*sample, stable);
                }
                if n % SAMPLES_PER_DECISION != 0 {
                    continue;
                }
                let mut cmds = Vec::new();
                for (id, cfg, _) in &looks {
                    let Some(w) = windows.get_mut(id) else { continue };
                    let facts = self.manager.store.read(|s: &State| {
                        let svc = s.services.get(id)?;
                        let ready = s.service_tasks(id).filter(|t| t.state == TaskState::Running && t.desired_state == TaskState::Running).count() as u64;
                        let cpus = svc.spec.limits.as_ref().map_or(0, |l| l.nano_cpus);
                        let last = svc.last_autoscale.as_ref().map_or(svc.created_at_ms, |d| d.at_ms);
                        Some((svc.spec.name.clone(), svc.spec.replicas, ready, if cpus == 0 { 1.0 } else { cpus as f64 / 1e9 }, last))
                    });
                    let Some((name, current, ready, task_cpus, last_change_ms)) = facts else { continue };
                    let inputs = Inputs { cfg, task_cpus, current, ready, last_change_ms, now_ms: now };
                    if let Some((to, reason)) = decide(w, &inputs) {
                        tracing::info!(service = %name, from = current, to, reason = %reason, "autoscaler: scaling");
                        cmds.push(Command::Autoscale { service: id.clone(), from: current, to, reason });
                    }
                }
                if !cmds.is_empty()
                    && let Err(e) = leader::propose_all(&self.manager, cmds).await
                {
                    tracing::warn!(error = %e, "autoscaler: the decision was not committed; deciding again next period");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Autoscale {
        Autoscale { min: 1, max: 10, target_cpu_pct: 50, target_rps: 0, cooldown_ms: 5_000, stable_window_ms: 60_000 }
    }

    fn run(w: &mut Window, c: &Autoscale, from_ms: u64, to_ms: u64, cpu: f64) {
        let mut t = from_ms;
        while t <= to_ms {
            w.push(Sample { at_ms: t, cpu_pct: cpu, rps: 0.0 }, c.stable_window_ms);
            t += 500;
        }
    }

    fn inputs(c: &Autoscale, current: u64, last: u64, now: u64) -> Inputs<'_> {
        Inputs { cfg: c, task_cpus: 1.0, current, ready: current, last_change_ms: last, now_ms: now }
    }

    #[test]
    fn a_load_step_scales_straight_up_and_down_only_after_the_windows() {
        let c = cfg();
        let mut w = Window::default();
        // Idle for a minute at one replica: nothing to do.
        run(&mut w, &c, 0, 60_000, 10.0);
        assert_eq!(decide(&mut w, &inputs(&c, 1, 0, 60_000)), None);
        // 340% of CPU arrives: within one 2 s decision, straight to 7.
        run(&mut w, &c, 60_500, 62_000, 340.0);
        let (to, why) = decide(&mut w, &inputs(&c, 1, 0, 62_000)).unwrap();
        assert_eq!(to, 7, "{why}");
        assert!(why.contains("panic") && why.contains("target 50%"), "{why}");
        // The load stops: no scale-down while the stable window remembers
        // the burst (panic mode), whatever the cooldown says.
        run(&mut w, &c, 62_500, 100_000, 0.0);
        assert_eq!(decide(&mut w, &inputs(&c, 7, 62_000, 100_000)), None);
        // A stable window later, back to --min.
        run(&mut w, &c, 100_500, 125_000, 0.0);
        let (to, _) = decide(&mut w, &inputs(&c, 7, 62_000, 125_000)).unwrap();
        assert_eq!(to, 1);
    }

    #[test]
    fn bounds_cooldown_and_requests_per_second() {
        let mut c = cfg();
        c.max = 4;
        let mut w = Window::default();
        run(&mut w, &c, 0, 10_000, 900.0);
        assert_eq!(decide(&mut w, &inputs(&c, 1, 0, 10_000)).unwrap().0, 4, "never above --max");
        assert_eq!(decide(&mut w, &inputs(&c, 0, 0, 10_000)).unwrap().0, 1, "never below --min");
        // A gentle decline within the cooldown: kept.
        c.stable_window_ms = 4_000;
        let mut w = Window::default();
        run(&mut w, &c, 0, 10_000, 60.0);
        assert_eq!(decide(&mut w, &inputs(&c, 3, 8_000, 10_000)), None, "cooldown");
        assert_eq!(decide(&mut w, &inputs(&c, 3, 0, 10_000)).unwrap().0, 2);
        // Requests per second as the target.
        let c = Autoscale { min: 1, max: 20, target_cpu_pct: 0, target_rps: 100, cooldown_ms: 0, stable_window_ms: 0 };
        let mut w = Window::default();
        w.push(Sample { at_ms: 1_000, cpu_pct: 0.0, rps: 950.0 }, 60_000);
        let (to, why) = decide(&mut w, &inputs(&c, 2, 0, 1_000)).unwrap();
        assert_eq!(to, 10, "{why}");
        assert!(why.contains("requests/s"), "{why}");
    }
}
