use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use shoal_manager::spec;
use shoal_proto::control::*;

use crate::client::{rpc_err, Ctx};
use crate::output;

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Create a service.
    Create(CreateArgs),
    /// List services.
    Ls,
    /// Show one service.
    Inspect { service: String },
    /// Change a service.
    Update(UpdateArgs),
    /// Go back to the service's previous spec, rolled out with its
    /// rollback config (--rollback-*; else its update config).
    Rollback {
        service: String,
        /// Return once the change is committed.
        #[arg(long, short)]
        detach: bool,
    },
    /// Set the replica count of one or more services: NAME=N...
    Scale {
        #[arg(required = true, value_name = "SERVICE=REPLICAS")]
        items: Vec<String>,
        /// Return once the change is committed.
        #[arg(long, short)]
        detach: bool,
    },
    /// Let the built-in autoscaler set the replica count (or stop it).
    Autoscale(AutoscaleArgs),
    /// Show the output of a service's tasks, from every node.
    Logs {
        service: String,
        /// Keep following new output (and new tasks).
        #[arg(long, short)]
        follow: bool,
    },
    /// List a service's tasks.
    Ps {
        service: String,
        /// Include tasks that have finished.
        #[arg(long, short)]
        all: bool,
    },
    /// Remove services.
    Rm {
        #[arg(required = true)]
        services: Vec<String>,
    },
}

#[derive(Args)]
pub struct AutoscaleArgs {
    service: String,
    /// Never fewer tasks than this (needed the first time).
    #[arg(long)]
    min: Option<u64>,
    /// Never more tasks than this (needed the first time).
    #[arg(long)]
    max: Option<u64>,
    /// CPU per task to aim for, in percent of its --limit-cpu (of one CPU
    /// without a limit).
    #[arg(long = "target-cpu")]
    target_cpu: Option<u32>,
    /// Requests per second per task through the routing mesh to aim for.
    #[arg(long = "target-rps")]
    target_rps: Option<u64>,
    /// Time after a change before scaling down (default 60s).
    #[arg(long)]
    cooldown: Option<String>,
    /// The stable window (default 60s); the panic window is a tenth of it.
    #[arg(long = "stable-window")]
    stable_window: Option<String>,
    /// Stop autoscaling: the replica count stays where it is.
    #[arg(long, conflicts_with_all = ["min", "max", "target_cpu", "target_rps", "cooldown", "stable_window"])]
    off: bool,
}

/// The autoscaler's flags, from `service autoscale` or `--autoscale-*`.
struct AutoscaleInput<'a> {
    min: Option<u64>,
    max: Option<u64>,
    target_cpu: Option<u32>,
    target_rps: Option<u64>,
    cooldown: Option<&'a str>,
    stable_window: Option<&'a str>,
}

impl AutoscaleInput<'_> {
    fn is_empty(&self) -> bool {
        self.min.is_none() && self.max.is_none() && self.target_cpu.is_none() && self.target_rps.is_none() && self.cooldown.is_none() && self.stable_window.is_none()
    }

    /// The settings these flags make of `current`; None when no flag was
    /// given.
    fn apply(&self, current: Option<&Autoscale>) -> anyhow::Result<Option<Autoscale>> {
        if self.is_empty() {
            return Ok(None);
        }
        let mut a = current.cloned().unwrap_or_default();
        if let Some(n) = self.min {
            a.min = n;
        }
        if let Some(n) = self.max {
            a.max = n;
        }
        if let Some(p) = self.target_cpu {
            if p == 0 {
                bail!("invalid --target-cpu 0: must be a percentage above 0");
            }
            a.target_cpu_pct = p;
        }
        if let Some(r) = self.target_rps {
            if r == 0 {
                bail!("invalid --target-rps 0: must be above 0");
            }
            a.target_rps = r;
        }
        if let Some(d) = self.cooldown {
            a.cooldown_ms = parse_duration("--cooldown", d)?.as_millis() as u64;
        }
        if let Some(d) = self.stable_window {
            a.stable_window_ms = parse_duration("--stable-window", d)?.as_millis() as u64;
        }
        if current.is_none() && (self.min.is_none() || self.max.is_none()) {
            bail!("autoscaling needs --min and --max");
        }
        if a.min > a.max {
            bail!("invalid autoscale bounds: --min {} is more than --max {}", a.min, a.max);
        }
        if a.target_cpu_pct == 0 && a.target_rps == 0 {
            bail!("autoscaling needs a target: --target-cpu PCT or --target-rps N");
        }
        Ok(Some(a))
    }
}

#[derive(Args)]
pub struct CreateArgs {
    #[arg(long)]
    name: String,
    #[command(flatten)]
    flags: SpecFlags,
    /// Image to run.
    image: String,
    /// Command and arguments (override the image's).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub struct UpdateArgs {
    service: String,
    #[arg(long)]
    image: Option<String>,
    /// Replace the command and arguments.
    #[arg(long = "args", num_args = 1.., allow_hyphen_values = true)]
    args: Option<Vec<String>>,
    /// Attach to one more network.
    #[arg(long = "network-add")]
    network_add: Vec<String>,
    /// Detach from a network.
    #[arg(long = "network-rm")]
    network_rm: Vec<String>,
    /// Publish one more port (same forms as --publish).
    #[arg(long = "publish-add")]
    publish_add: Vec<String>,
    /// Stop publishing a port: PUBLISHED[/tcp|udp].
    #[arg(long = "publish-rm")]
    publish_rm: Vec<String>,
    /// Add a mount (same forms as --mount).
    #[arg(long = "mount-add")]
    mount_add: Vec<String>,
    /// Remove the mount at this target path.
    #[arg(long = "mount-rm")]
    mount_rm: Vec<String>,
    /// Add or replace an environment variable: KEY=VALUE.
    #[arg(long = "env-add", value_name = "KEY=VALUE")]
    env_add: Vec<String>,
    /// Remove an environment variable: KEY.
    #[arg(long = "env-rm", value_name = "KEY")]
    env_rm: Vec<String>,
    /// Add a placement constraint.
    #[arg(long = "constraint-add")]
    constraint_add: Vec<String>,
    /// Remove a placement constraint (as written when added).
    #[arg(long = "constraint-rm")]
    constraint_rm: Vec<String>,
    /// Add a placement preference (spread=node.labels.KEY).
    #[arg(long = "placement-pref-add")]
    placement_pref_add: Vec<String>,
    /// Remove a placement preference.
    #[arg(long = "placement-pref-rm")]
    placement_pref_rm: Vec<String>,
    /// Give the tasks one more secret (same forms as --secret).
    #[arg(long = "secret-add")]
    secret_add: Vec<String>,
    /// Take a secret away, by name.
    #[arg(long = "secret-rm")]
    secret_rm: Vec<String>,
    /// Give the tasks one more config (same forms as --config).
    #[arg(long = "config-add")]
    config_add: Vec<String>,
    /// Take a config away, by name.
    #[arg(long = "config-rm")]
    config_rm: Vec<String>,
    /// Add or replace a service label: KEY=VALUE.
    #[arg(long = "label-add", value_name = "KEY=VALUE")]
    label_add: Vec<String>,
    /// Remove a service label: KEY.
    #[arg(long = "label-rm", value_name = "KEY")]
    label_rm: Vec<String>,
    /// Add or replace an rlimit: NAME=SOFT[:HARD].
    #[arg(long = "ulimit-add", value_name = "NAME=SOFT[:HARD]")]
    ulimit_add: Vec<String>,
    /// Remove an rlimit: NAME.
    #[arg(long = "ulimit-rm", value_name = "NAME")]
    ulimit_rm: Vec<String>,
    /// Replace every task even if nothing else changed.
    #[arg(long)]
    force: bool,
    /// Go back to the previous spec (as `service rollback`).
    #[arg(long)]
    rollback: bool,
    #[command(flatten)]
    flags: SpecFlags,
}

/// The flags `create` and `update` share. On update, a flag that is given
/// replaces that part of the spec; list flags replace the whole list.
#[derive(Args)]
pub struct SpecFlags {
    /// Number of tasks (replicated mode).
    #[arg(long, allow_hyphen_values = true)]
    replicas: Option<String>,
    #[arg(long, value_parser = ["replicated", "global"])]
    mode: Option<String>,
    /// PUBLISHED:TARGET[/tcp|udp], or published=P,target=T[,protocol=tcp|udp][,mode=ingress|host]:
    /// every node forwards PUBLISHED to the tasks (ingress, the routing
    /// mesh), or only nodes that run a task, to their own (host). On
    /// update, replaces the list.
    #[arg(long, short = 'p')]
    publish: Vec<String>,
    /// Time a stopping task gets to finish the connections it serves
    /// (after it leaves DNS, the virtual IPs and the mesh), and then
    /// between SIGTERM and SIGKILL (default 10s).
    #[arg(long = "stop-grace-period")]
    stop_grace_period: Option<String>,
    /// An overlay network to attach the tasks to: NAME, or
    /// name=NAME[,alias=ALIAS]... for more names the service answers to in
    /// DNS (repeatable; on update, replaces the list and the aliases).
    #[arg(long)]
    network: Vec<String>,
    /// vip: the service name resolves to a virtual IP per network,
    /// balanced over its tasks; dnsrr: to the task addresses.
    #[arg(long = "endpoint-mode", value_parser = ["vip", "dnsrr"])]
    endpoint_mode: Option<String>,
    /// KEY=VALUE
    #[arg(long, short = 'e')]
    env: Vec<String>,
    /// UID[:GID]
    #[arg(long, short = 'u')]
    user: Option<String>,
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    #[arg(long = "limit-cpu")]
    limit_cpu: Option<String>,
    #[arg(long = "limit-memory")]
    limit_memory: Option<String>,
    /// The most processes and threads a task may have (default 4096; -1:
    /// unlimited): a fork bomb stops there, and its node's other tasks
    /// keep running.
    #[arg(long = "limit-pids", allow_hyphen_values = true)]
    limit_pids: Option<i64>,
    #[arg(long = "reserve-cpu")]
    reserve_cpu: Option<String>,
    #[arg(long = "reserve-memory")]
    reserve_memory: Option<String>,
    /// node.labels.KEY==VALUE, node.role!=manager, ...
    #[arg(long)]
    constraint: Vec<String>,
    /// spread=node.labels.KEY
    #[arg(long = "placement-pref")]
    placement_pref: Vec<String>,
    #[arg(long = "restart-condition", value_parser = ["none", "on-failure", "any"])]
    restart_condition: Option<String>,
    #[arg(long = "restart-max-attempts")]
    restart_max_attempts: Option<u64>,
    #[arg(long = "restart-delay")]
    restart_delay: Option<String>,
    #[arg(long = "restart-window")]
    restart_window: Option<String>,
    #[arg(long = "update-parallelism")]
    update_parallelism: Option<u64>,
    #[arg(long = "update-delay")]
    update_delay: Option<String>,
    #[arg(long = "update-failure-action", value_parser = ["pause", "rollback"])]
    update_failure_action: Option<String>,
    /// stop-first (default): old task stops, then its successor starts;
    /// start-first: the successor starts, and the old task stops once it
    /// runs (healthy).
    #[arg(long = "update-order", value_parser = ["stop-first", "start-first"])]
    update_order: Option<String>,
    /// The share of updated tasks that may fail before the failure action
    /// (0 to 1; default 0).
    #[arg(long = "update-max-failure-ratio")]
    update_max_failure_ratio: Option<f64>,
    /// How long after an update a task's failure counts against it
    /// (default 5s).
    #[arg(long = "update-monitor")]
    update_monitor: Option<String>,
    /// A command run by `sh -c` in the container; a task whose check fails
    /// --health-retries times in a row is failed and replaced.
    #[arg(long = "health-cmd")]
    health_cmd: Option<String>,
    /// Time between checks (default 30s).
    #[arg(long = "health-interval")]
    health_interval: Option<String>,
    /// Time a check may take (default 30s).
    #[arg(long = "health-timeout")]
    health_timeout: Option<String>,
    /// Failures in a row that make a task unhealthy (default 3).
    #[arg(long = "health-retries")]
    health_retries: Option<u32>,
    /// Time after start during which failures don't count (default 0s).
    #[arg(long = "health-start-period")]
    health_start_period: Option<String>,
    /// A secret: NAME (at /run/secrets/NAME) or source=NAME,target=FILE|/PATH.
    #[arg(long)]
    secret: Vec<String>,
    /// A config: NAME (at /NAME) or source=NAME,target=/PATH.
    #[arg(long)]
    config: Vec<String>,
    /// type=volume|bind|tmpfs,src=..,dst=..[,readonly][,volume-nocopy]
    /// [,volume-label=K=V][,tmpfs-size=64M][,tmpfs-mode=1777]. A named
    /// volume is created on first use; a replaced task goes back to the
    /// node that holds its volume's data (see `shoal volume`). On update,
    /// replaces the list.
    #[arg(long)]
    mount: Vec<String>,
    /// Replace the image's entrypoint (as a single program; arguments go
    /// after the image).
    #[arg(long)]
    entrypoint: Option<String>,
    #[arg(long = "rollback-parallelism")]
    rollback_parallelism: Option<u64>,
    #[arg(long = "rollback-delay")]
    rollback_delay: Option<String>,
    #[arg(long = "rollback-failure-action", value_parser = ["pause", "continue"])]
    rollback_failure_action: Option<String>,
    #[arg(long = "rollback-order", value_parser = ["stop-first", "start-first"])]
    rollback_order: Option<String>,
    #[arg(long = "rollback-max-failure-ratio")]
    rollback_max_failure_ratio: Option<f64>,
    #[arg(long = "rollback-monitor")]
    rollback_monitor: Option<String>,
    /// Add a capability to Docker's default set (NET_ADMIN, ..., or ALL);
    /// on update, also takes it off the drop list.
    #[arg(long = "cap-add", value_name = "CAP")]
    cap_add: Vec<String>,
    /// Drop a capability (or ALL); on update, also takes it off the add list.
    #[arg(long = "cap-drop", value_name = "CAP")]
    cap_drop: Vec<String>,
    /// seccomp=unconfined, seccomp=PROFILE.json (OCI or Docker format; the
    /// file is read here and sent), seccomp=default, or no-new-privileges.
    #[arg(long = "security-opt", value_name = "OPT")]
    security_opt: Vec<String>,
    /// An rlimit: NAME=SOFT[:HARD] (nofile, nproc, ...; -1 unlimited). On
    /// update, replaces the list (see --ulimit-add/--ulimit-rm).
    #[arg(long = "ulimit", value_name = "NAME=SOFT[:HARD]")]
    ulimit: Vec<String>,
    /// A service label KEY=VALUE (on update, replaces them all; see
    /// --label-add/--label-rm).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    label: Vec<String>,
    /// A read-only root filesystem; `--read-only=false` turns it off.
    #[arg(long = "read-only", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    read_only: Option<bool>,
    /// Let the autoscaler keep the replica count between these (see
    /// `shoal service autoscale`).
    #[arg(long = "autoscale-min")]
    autoscale_min: Option<u64>,
    #[arg(long = "autoscale-max")]
    autoscale_max: Option<u64>,
    #[arg(long = "autoscale-target-cpu")]
    autoscale_target_cpu: Option<u32>,
    #[arg(long = "autoscale-target-rps")]
    autoscale_target_rps: Option<u64>,
    #[arg(long = "autoscale-cooldown")]
    autoscale_cooldown: Option<String>,
    #[arg(long = "autoscale-stable-window")]
    autoscale_stable_window: Option<String>,
    /// Return once the change is committed.
    #[arg(long, short)]
    detach: bool,
}

/// `"1s"`, `"500ms"`, `"2m"`, `"1h"`, `"90d"` → duration.
pub(crate) fn parse_duration(what: &str, s: &str) -> anyhow::Result<Duration> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: f64 = n.parse().map_err(|_| anyhow!("invalid {what} {s:?}: expected a duration such as 500ms, 1s or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => bail!("invalid {what} {s:?}: expected a duration such as 500ms, 1s, 2m, 24h or 90d"),
    };
    if !secs.is_finite() || secs < 0.0 {
        bail!("invalid {what} {s:?}: must not be negative");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `PUBLISHED:TARGET[/tcp|udp]`, or the long form
/// `published=P,target=T[,protocol=tcp|udp][,mode=ingress|host]`.
fn parse_port(s: &str) -> anyhow::Result<Port> {
    let short = "expected PUBLISHED:TARGET[/tcp|udp] or published=P,target=T[,protocol=tcp|udp][,mode=ingress|host]";
    let number = |what: &str, v: &str| -> anyhow::Result<u32> {
        match v.parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) => Ok(n),
            _ => bail!("invalid --publish {s:?}: {what} port {v:?} must be 1-65535"),
        }
    };
    let mut port = Port { protocol: "tcp".into(), mode: "ingress".into(), ..Default::default() };
    if s.contains('=') {
        let (mut published, mut target) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("published", v)) => published = Some(number("published", v)?),
                Some(("target", v)) => target = Some(number("target", v)?),
                Some(("protocol", v)) => port.protocol = v.into(),
                Some(("mode", v)) => port.mode = v.into(),
                _ => bail!("invalid --publish {s:?}: unknown part {part:?} ({short})"),
            }
        }
        let (Some(p), Some(t)) = (published, target) else { bail!("invalid --publish {s:?}: {short}") };
        (port.published, port.target) = (p, t);
    } else {
        let (ports, protocol) = s.split_once('/').unwrap_or((s, "tcp"));
        port.protocol = protocol.into();
        let (p, t) = ports.split_once(':').ok_or_else(|| anyhow!("invalid --publish {s:?}: {short}"))?;
        (port.published, port.target) = (number("published", p)?, number("target", t)?);
    }
    if port.protocol != "tcp" && port.protocol != "udp" {
        bail!("invalid --publish {s:?}: protocol {:?} must be tcp or udp", port.protocol);
    }
    if port.mode != "ingress" && port.mode != "host" {
        bail!("invalid --publish {s:?}: mode {:?} must be ingress or host", port.mode);
    }
    Ok(port)
}

/// `--secret`/`--config`: `NAME` or `source=NAME[,target=T]`; returns
/// the name and the target (empty: the default path).
fn parse_data_ref(flag: &str, s: &str) -> anyhow::Result<(String, String)> {
    if !s.contains('=') {
        return Ok((s.to_string(), String::new()));
    }
    let (mut name, mut target) = (String::new(), String::new());
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("source" | "src", v)) => name = v.to_string(),
            Some(("target", v)) => target = v.to_string(),
            _ => bail!("invalid --{flag} {s:?}: unknown option {part:?} (expected source=NAME[,target=PATH]; uid, gid and mode are not supported)"),
        }
    }
    if name.is_empty() {
        bail!("invalid --{flag} {s:?}: source=NAME is required");
    }
    Ok((name, target))
}

/// Applies `--secret`/`--config` values: the names, and their targets.
fn apply_data_refs(flag: &str, values: &[String], names: &mut Vec<String>, targets: &mut std::collections::HashMap<String, String>) -> anyhow::Result<()> {
    names.clear();
    targets.clear();
    for v in values {
        let (name, target) = parse_data_ref(flag, v)?;
        if !target.is_empty() {
            targets.insert(name.clone(), target);
        }
        names.push(name);
    }
    Ok(())
}

impl SpecFlags {
    /// Applies the given flags onto `spec`, checking each as it goes.
    fn apply(&self, spec: &mut ServiceSpec) -> anyhow::Result<()> {
        if let Some(r) = &self.replicas {
            spec.replicas = r
                .parse::<u64>()
                .map_err(|_| anyhow!("invalid replicas {r:?}: must be a whole number >= 0"))?;
        }
        if let Some(m) = &self.mode {
            spec.mode = m.clone();
        }
        if !self.publish.is_empty() {
            spec.ports = self.publish.iter().map(|p| parse_port(p)).collect::<Result<_, _>>()?;
        }
        let auto = AutoscaleInput {
            min: self.autoscale_min,
            max: self.autoscale_max,
            target_cpu: self.autoscale_target_cpu,
            target_rps: self.autoscale_target_rps,
            cooldown: self.autoscale_cooldown.as_deref(),
            stable_window: self.autoscale_stable_window.as_deref(),
        };
        if let Some(a) = auto.apply(spec.autoscale.as_ref())? {
            spec.autoscale = Some(a);
        }
        if let Some(d) = &self.stop_grace_period {
            spec.stop_grace_period_ms = parse_duration("--stop-grace-period", d)?.as_millis() as u64;
        }
        if !self.network.is_empty() {
            spec.networks.clear();
            spec.aliases.clear();
            for n in &self.network {
                let (name, aliases) = parse_network("network", n)?;
                spec.networks.push(name);
                for a in aliases {
                    if !spec.aliases.contains(&a) {
                        spec.aliases.push(a);
                    }
                }
            }
        }
        if let Some(m) = &self.endpoint_mode {
            spec.endpoint_mode = m.clone();
        }
        if !self.env.is_empty() {
            spec.env = self.env.clone();
        }
        if let Some(u) = &self.user {
            spec.user = u.clone();
        }
        if let Some(w) = &self.workdir {
            spec.workdir = w.clone();
        }
        let limits = spec.limits.get_or_insert_with(Default::default);
        // 0 resets a limit or reservation (no limit; pids: unlimited).
        let zero = |s: &str| s.trim() == "0";
        if let Some(c) = &self.limit_cpu {
            limits.nano_cpus = if zero(c) { 0 } else { spec::parse_cpus(c)? };
        }
        if let Some(m) = &self.limit_memory {
            limits.memory_bytes = if zero(m) { 0 } else { spec::parse_memory(m)? };
        }
        if let Some(n) = self.limit_pids {
            if n < -1 {
                anyhow::bail!("invalid --limit-pids {n}: expected a positive count, or 0 or -1 for unlimited");
            }
            limits.pids = if n == 0 { -1 } else { n };
        }
        let res = spec.reservations.get_or_insert_with(Default::default);
        if let Some(c) = &self.reserve_cpu {
            res.nano_cpus = if zero(c) { 0 } else { spec::parse_cpus(c)? };
        }
        if let Some(m) = &self.reserve_memory {
            res.memory_bytes = if zero(m) { 0 } else { spec::parse_memory(m)? };
        }
        if !self.constraint.is_empty() {
            spec.constraints = self.constraint.clone();
        }
        if !self.placement_pref.is_empty() {
            spec.placement_prefs = self.placement_pref.clone();
        }
        // Swarm's defaults: restart on any exit, 5 s apart.
        let restart = spec
            .restart
            .get_or_insert_with(|| RestartPolicy { condition: "any".into(), delay_ms: Some(5000), ..Default::default() });
        if let Some(c) = &self.restart_condition {
            restart.condition = c.clone();
        }
        if let Some(n) = self.restart_max_attempts {
            restart.max_attempts = n;
        }
        if let Some(d) = &self.restart_delay {
            // 0 means at once; no flag means backoff from 100 ms.
            restart.delay_ms = Some(parse_duration("--restart-delay", d)?.as_millis() as u64);
        }
        if let Some(d) = &self.restart_window {
            restart.window_ms = parse_duration("--restart-window", d)?.as_millis() as u64;
        }
        let update = spec
            .update
            .get_or_insert_with(|| UpdateConfig { parallelism: 1, failure_action: "pause".into(), ..Default::default() });
        if let Some(p) = self.update_parallelism {
            update.parallelism = p;
        }
        if let Some(d) = &self.update_delay {
            update.delay_ms = parse_duration("--update-delay", d)?.as_millis() as u64;
        }
        if let Some(a) = &self.update_failure_action {
            update.failure_action = a.clone();
        }
        if let Some(o) = &self.update_order {
            update.order = o.clone();
        }
        if let Some(r) = self.update_max_failure_ratio {
            update.max_failure_ratio = r;
        }
        if let Some(d) = &self.update_monitor {
            update.monitor_ms = parse_duration("--update-monitor", d)?.as_millis() as u64;
        }
        if let Some(h) = &self.health_cmd {
            spec.health_cmd = h.clone();
        }
        if let Some(d) = &self.health_interval {
            spec.health_interval_ms = parse_duration("--health-interval", d)?.as_millis() as u64;
        }
        if let Some(d) = &self.health_timeout {
            spec.health_timeout_ms = parse_duration("--health-timeout", d)?.as_millis() as u64;
        }
        if let Some(n) = self.health_retries {
            spec.health_retries = n;
        }
        if let Some(d) = &self.health_start_period {
            spec.health_start_period_ms = parse_duration("--health-start-period", d)?.as_millis() as u64;
        }
        if !self.secret.is_empty() {
            apply_data_refs("secret", &self.secret, &mut spec.secrets, &mut spec.secret_targets)?;
        }
        if !self.config.is_empty() {
            apply_data_refs("config", &self.config, &mut spec.configs, &mut spec.config_targets)?;
        }
        if !self.mount.is_empty() {
            spec.mounts = self.mount.iter().map(|m| super::mount::parse_mount(m)).collect::<Result<_, _>>()?;
        }
        if let Some(e) = &self.entrypoint {
            spec.entrypoint = if e.is_empty() { Vec::new() } else { vec![e.clone()] };
        }
        let rollback_given = self.rollback_parallelism.is_some()
            || self.rollback_delay.is_some()
            || self.rollback_failure_action.is_some()
            || self.rollback_order.is_some()
            || self.rollback_max_failure_ratio.is_some()
            || self.rollback_monitor.is_some();
        if rollback_given {
            let r = spec
                .rollback
                .get_or_insert_with(|| UpdateConfig { parallelism: 1, failure_action: "pause".into(), ..Default::default() });
            if let Some(p) = self.rollback_parallelism {
                r.parallelism = p;
            }
            if let Some(d) = &self.rollback_delay {
                r.delay_ms = parse_duration("--rollback-delay", d)?.as_millis() as u64;
            }
            if let Some(a) = &self.rollback_failure_action {
                r.failure_action = a.clone();
            }
            if let Some(o) = &self.rollback_order {
                r.order = o.clone();
            }
            if let Some(x) = self.rollback_max_failure_ratio {
                r.max_failure_ratio = x;
            }
            if let Some(d) = &self.rollback_monitor {
                r.monitor_ms = parse_duration("--rollback-monitor", d)?.as_millis() as u64;
            }
        }
        if let Some(r) = self.read_only {
            spec.read_only = r;
        }
        super::confine::apply_caps(&self.cap_add, &self.cap_drop, &mut spec.cap_add, &mut spec.cap_drop)?;
        if let Some(s) = super::confine::seccomp_from_opts(&self.security_opt)? {
            spec.seccomp = s;
        }
        if !self.ulimit.is_empty() {
            spec.ulimits = super::confine::ulimits(&self.ulimit)?.into_iter().map(ulimit_proto).collect();
        }
        if !self.label.is_empty() {
            spec.labels = self.label.iter().map(|l| parse_label("label", l)).collect::<Result<_, _>>()?;
        }
        Ok(())
    }
}

fn ulimit_proto(u: shoal_confine::ulimit::Ulimit) -> Ulimit {
    Ulimit { name: u.name, soft: u.soft, hard: u.hard }
}

/// `--network NAME` or `name=NAME[,alias=A]...` (Docker's long form): the
/// network and more names the service answers to in DNS.
fn parse_network(flag: &str, s: &str) -> anyhow::Result<(String, Vec<String>)> {
    if !s.contains('=') {
        return Ok((s.to_string(), Vec::new()));
    }
    let (mut name, mut aliases) = (String::new(), Vec::new());
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("name" | "target", v)) => name = v.to_string(),
            Some(("alias", v)) if !v.is_empty() => aliases.push(v.to_string()),
            _ => bail!("invalid --{flag} {s:?}: unknown option {part:?} (expected NAME or name=NAME[,alias=ALIAS]...)"),
        }
    }
    if name.is_empty() {
        bail!("invalid --{flag} {s:?}: name=NAME is required");
    }
    Ok((name, aliases))
}

/// `KEY=VALUE` (or `KEY`, an empty value) for a label.
fn parse_label(flag: &str, s: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = s.split_once('=').unwrap_or((s, ""));
    if k.is_empty() || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("invalid --{flag} {s:?}: expected KEY=VALUE with a non-empty key and no spaces in it");
    }
    Ok((k.to_string(), v.to_string()))
}

/// The `-rm`/`-add` pairs of `service update` for env, constraints,
/// placement preferences, secrets, configs, labels and ulimits. A `-rm`
/// naming something the service doesn't have is an error (as Docker's are
/// for ports and mounts here), so a typo never passes silently.
fn apply_list_edits(a: &UpdateArgs, s: &mut ServiceSpec) -> anyhow::Result<()> {
    let key = |e: &str| e.split_once('=').map_or(e, |(k, _)| k).to_string();
    for k in &a.env_rm {
        if !s.env.iter().any(|e| key(e) == *k) {
            bail!("--env-rm {k}: the service sets no variable {k:?}");
        }
        s.env.retain(|e| key(e) != *k);
    }
    for e in &a.env_add {
        if !e.contains('=') {
            bail!("invalid --env-add {e:?}: expected KEY=VALUE");
        }
        s.env.retain(|x| key(x) != key(e));
        s.env.push(e.clone());
    }
    for (rm, add, list, what) in [
        (&a.constraint_rm, &a.constraint_add, &mut s.constraints, "constraint"),
        (&a.placement_pref_rm, &a.placement_pref_add, &mut s.placement_prefs, "placement-pref"),
    ] {
        for c in rm {
            if !list.contains(c) {
                bail!("--{what}-rm {c:?}: the service has no such {what}");
            }
            list.retain(|x| x != c);
        }
        for c in add {
            if !list.contains(c) {
                list.push(c.clone());
            }
        }
    }
    for (rm, add, names, targets, what) in [
        (&a.secret_rm, &a.secret_add, &mut s.secrets, &mut s.secret_targets, "secret"),
        (&a.config_rm, &a.config_add, &mut s.configs, &mut s.config_targets, "config"),
    ] {
        for n in rm {
            if !names.contains(n) {
                bail!("--{what}-rm {n}: the service has no {what} {n:?}");
            }
            names.retain(|x| x != n);
            targets.remove(n);
        }
        for v in add {
            let (name, target) = parse_data_ref(&format!("{what}-add"), v)?;
            if names.contains(&name) {
                bail!("--{what}-add {v}: the service has {what} {name:?} already");
            }
            if !target.is_empty() {
                targets.insert(name.clone(), target);
            }
            names.push(name);
        }
    }
    for k in &a.label_rm {
        if s.labels.remove(k).is_none() {
            bail!("--label-rm {k}: the service has no label {k:?}");
        }
    }
    for l in &a.label_add {
        let (k, v) = parse_label("label-add", l)?;
        s.labels.insert(k, v);
    }
    for n in &a.ulimit_rm {
        if !s.ulimits.iter().any(|u| u.name == *n) {
            bail!("--ulimit-rm {n}: the service sets no {n} limit");
        }
        s.ulimits.retain(|u| u.name != *n);
    }
    for u in super::confine::ulimits(&a.ulimit_add)? {
        s.ulimits.retain(|x| x.name != u.name);
        s.ulimits.push(ulimit_proto(u));
    }
    Ok(())
}

/// `service ps` (and `stack ps`): a table naming each task NAME.SLOT (or
/// NAME.NODE for global services), a pending task's reason as its error;
/// or the tasks as JSON.
pub fn print_tasks(ctx: &Ctx, tasks: &[Task]) {
    let rows: Vec<Value> = tasks
        .iter()
        .map(|t| {
            let mut v = task_json(t);
            if ctx.format == output::Format::Table {
                v["name"] = json!(format!("{}.{}", t.service, if t.slot > 0 { t.slot.to_string() } else { t.node_id.chars().take(8).collect() }));
                v["error"] = json!(if t.error.is_empty() && t.state == "pending" { t.message.clone() } else { t.error.clone() });
            }
            v
        })
        .collect();
    output::list(
        ctx.format,
        &rows,
        &[
            ("ID", "id"),
            ("NAME", "name"),
            ("IMAGE", "image"),
            ("NODE", "node"),
            ("DESIRED", "desired_state"),
            ("STATE", "state"),
            ("CPU%", "cpu_pct"),
            ("ERROR", "error"),
        ],
    );
}

/// `service ls` (and `stack services`): a table with RUNNING/DESIRED, or
/// the services as JSON.
pub fn print_services(ctx: &Ctx, list: &[Service]) {
    let rows: Vec<Value> = list
        .iter()
        .map(|s| {
            let mut v = service_json(s);
            if ctx.format == output::Format::Table {
                v["replicas"] = json!(format!("{}/{}", s.replicas_running, s.replicas_desired));
            }
            v
        })
        .collect();
    output::list(ctx.format, &rows, &[("ID", "id"), ("NAME", "name"), ("MODE", "mode"), ("REPLICAS", "replicas"), ("IMAGE", "image")]);
}

pub fn service_json(s: &Service) -> Value {
    let spec = s.spec.clone().unwrap_or_default();
    let limits = spec.limits.clone().unwrap_or_default();
    let res = spec.reservations.clone().unwrap_or_default();
    let restart = spec.restart.clone().unwrap_or_default();
    let update = spec.update.clone().unwrap_or_default();
    let mut v = json!({
        "id": s.id,
        "name": spec.name,
        "mode": spec.mode,
        "replicas_desired": s.replicas_desired,
        "replicas_running": s.replicas_running,
        "image": spec.image,
        "args": spec.args,
        "env": spec.env,
        "ports": spec.ports.iter().map(|p| json!({"published": p.published, "target": p.target, "protocol": p.protocol, "mode": if p.mode.is_empty() { "ingress" } else { p.mode.as_str() }})).collect::<Vec<_>>(),
        "stop_grace_period_ms": if spec.stop_grace_period_ms == 0 { 10_000 } else { spec.stop_grace_period_ms },
        "autoscale": spec.autoscale.as_ref().map(|a| json!({
            "min": a.min,
            "max": a.max,
            "target_cpu_pct": a.target_cpu_pct,
            "target_rps": a.target_rps,
            "cooldown_ms": if a.cooldown_ms == 0 { 60_000 } else { a.cooldown_ms },
            "stable_window_ms": if a.stable_window_ms == 0 { 60_000 } else { a.stable_window_ms },
        })),
        "last_autoscale": s.last_autoscale.as_ref().map(|d| json!({"at_ms": d.at_ms, "from": d.from, "to": d.to, "reason": d.reason})),
        "cpu_pct": (s.cpu_pct * 10.0).round() / 10.0,
        "request_rate": (s.request_rate * 10.0).round() / 10.0,
        "networks": spec.networks,
        "endpoint_mode": if spec.endpoint_mode.is_empty() { "vip" } else { spec.endpoint_mode.as_str() },
        "vips": s.vips,
        "user": spec.user,
        "workdir": spec.workdir,
        "limits": {"nano_cpus": limits.nano_cpus, "memory_bytes": limits.memory_bytes, "pids": match limits.pids { 0 => 4096, n => n }},
        "reservations": {"nano_cpus": res.nano_cpus, "memory_bytes": res.memory_bytes},
        "constraints": spec.constraints,
        "placement_prefs": spec.placement_prefs,
        "restart": {"condition": restart.condition, "max_attempts": restart.max_attempts, "delay_ms": restart.delay_ms, "window_ms": restart.window_ms},
        "update": {"parallelism": update.parallelism, "delay_ms": update.delay_ms, "failure_action": update.failure_action, "order": if update.order.is_empty() { "stop-first" } else { update.order.as_str() }, "max_failure_ratio": update.max_failure_ratio, "monitor_ms": if update.monitor_ms == 0 { 5_000 } else { update.monitor_ms }},
        "health_cmd": spec.health_cmd,
        "health": {"interval_ms": spec.health_interval_ms, "timeout_ms": spec.health_timeout_ms, "retries": spec.health_retries, "start_period_ms": spec.health_start_period_ms},
        "secrets": spec.secrets,
        "configs": spec.configs,
        "read_only": spec.read_only,
        "version": s.version,
        "created_at_ms": s.created_at_ms,
        "updated_at_ms": s.updated_at_ms,
    });
    // (Two literals: one would pass serde_json's macro recursion limit.)
    let extra = json!({
        "mounts": spec.mounts.iter().map(|m| json!({
            "type": m.r#type,
            "source": m.source,
            "target": m.target,
            "read_only": m.read_only,
            "volume_nocopy": m.volume_nocopy,
            "volume_labels": m.volume_labels,
            "tmpfs_size": m.tmpfs_size,
            "tmpfs_mode": format!("{:o}", if m.tmpfs_mode == 0 && m.r#type == "tmpfs" { 0o1777 } else { m.tmpfs_mode }),
        })).collect::<Vec<_>>(),
        "entrypoint": spec.entrypoint,
        "aliases": spec.aliases,
        "secret_targets": spec.secret_targets,
        "config_targets": spec.config_targets,
        "force_update": spec.force_update,
        "rolling_back": s.rolling_back,
        "update_status": s.update_status,
        "labels": spec.labels,
        "cap_add": spec.cap_add,
        "cap_drop": spec.cap_drop,
        "seccomp": match spec.seccomp.as_str() { "" => "default", "unconfined" => "unconfined", _ => "custom" },
        "ulimits": spec.ulimits.iter().map(|u| json!({"name": u.name, "soft": u.soft, "hard": u.hard})).collect::<Vec<_>>(),
        "rollback": spec.rollback.as_ref().map(|r| json!({"parallelism": r.parallelism, "delay_ms": r.delay_ms, "failure_action": r.failure_action, "order": if r.order.is_empty() { "stop-first" } else { r.order.as_str() }})),
    });
    if let (Value::Object(v), Value::Object(extra)) = (&mut v, extra) {
        v.extend(extra);
    }
    v
}

pub fn task_json(t: &Task) -> Value {
    json!({
        "id": t.id,
        "service": t.service,
        "slot": t.slot,
        "node": t.node,
        "node_id": t.node_id,
        "state": t.state,
        "desired_state": t.desired_state,
        "message": t.message,
        "error": t.error,
        "exit_code": if t.has_exit_code { json!(t.exit_code) } else { Value::Null },
        "address": t.addresses,
        "attempt": t.attempt,
        "image": t.image,
        "created_at_ms": t.created_at_ms,
        "updated_at_ms": t.updated_at_ms,
        "state_at_ms": t.state_at_ms,
        // Percent of one CPU over the last report; null when unknown.
        "cpu_pct": if t.cpu_pct >= 0.0 { json!((t.cpu_pct * 10.0).round() / 10.0) } else { Value::Null },
    })
}

/// Task states after which a task runs no more.
pub const TERMINAL: [&str; 5] = ["complete", "shutdown", "failed", "rejected", "orphaned"];

/// One service's way to convergence, from it and its tasks: whether it has
/// converged (its desired count runs, none on an older spec, none it told
/// to stop still running), its part of the progress line, and a pending
/// task's reason.
pub fn progress<'a>(svc: &Service, tasks: impl Iterator<Item = &'a Task> + Clone) -> (bool, String, Option<String>) {
    let name = svc.spec.as_ref().map(|s| s.name.as_str()).unwrap_or(svc.id.as_str());
    let stopping = tasks.clone().filter(|t| t.desired_state != "running" && !TERMINAL.contains(&t.state.as_str())).count();
    let pending = tasks.clone().find(|t| t.state == "pending" && !t.message.is_empty()).map(|t| format!("{name}: {}", t.message));
    let done = svc.replicas_running == svc.replicas_desired && svc.replicas_outdated == 0 && stopping == 0;
    let mut part = format!("{name}: {}/{} running", svc.replicas_running, svc.replicas_desired);
    if svc.replicas_outdated > 0 {
        part.push_str(&format!(", {} to update", svc.replicas_outdated));
    }
    if stopping > 0 {
        part.push_str(&format!(", {stopping} stopping"));
    }
    (done, part, pending)
}

/// How long `create`, `update`, `scale` and `stack deploy` wait for
/// convergence.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);

async fn converge(ctx: &Ctx, ids: &[String]) -> anyhow::Result<()> {
    let mut c = ctx.control().await?;
    wait_converged(&mut c, ids, "the change is committed and the cluster keeps working on it (see `shoal service ps`)").await
}

/// Waits until every service in `ids` has converged (see [`progress`]),
/// showing progress: a live line on a terminal, a plain line per change
/// otherwise. One ListServices and one ListTasks per look, however many
/// services; `gave_up` ends the error after the timeout.
pub async fn wait_converged(c: &mut crate::client::Client, ids: &[String], gave_up: &str) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stdout().is_terminal();
    let deadline = tokio::time::Instant::now() + CONVERGE_TIMEOUT;
    let mut last = String::new();
    loop {
        let services = c.list_services(Empty {}).await.map_err(rpc_err)?.into_inner().services;
        let tasks = c.list_tasks(ListTasksRequest { service: String::new(), all: false }).await.map_err(rpc_err)?.into_inner().tasks;
        let mut done = true;
        let mut parts = Vec::new();
        let mut pending = None;
        for id in ids {
            let Some(svc) = services.iter().find(|s| &s.id == id) else {
                bail!("service {id} was removed while waiting for it to converge");
            };
            let name = svc.spec.as_ref().map(|s| s.name.as_str()).unwrap_or_default();
            let (ok, part, why) = progress(svc, tasks.iter().filter(|t| t.service == name));
            done &= ok;
            if pending.is_none() {
                pending = why;
            }
            parts.push(part);
        }
        let mut text = parts.join("  ");
        if let Some(p) = pending {
            text.push_str(&format!("  (pending: {p})"));
        }
        if text != last {
            if tty {
                print!("\r\x1b[2K{text}");
                let _ = std::io::stdout().flush();
            } else {
                println!("{text}");
            }
            last = text;
        }
        if done {
            if tty {
                println!();
            }
            println!("converged");
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            if tty {
                println!();
            }
            bail!("not converged after {CONVERGE_TIMEOUT:?}; {gave_up}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(ctx: &Ctx, cmd: ServiceCmd) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Create(a) => {
            spec::validate_name("service name", &a.name)?;
            let mut s = ServiceSpec {
                name: a.name,
                image: a.image,
                args: a.command,
                mode: "replicated".into(),
                replicas: 1,
                ..Default::default()
            };
            a.flags.apply(&mut s)?;
            // An autoscaled service starts at its --min unless told.
            if let Some(auto) = &s.autoscale
                && a.flags.replicas.is_none()
            {
                s.replicas = auto.min.max(1).min(auto.max);
            }
            if s.mode == "global" {
                if a.flags.replicas.is_some() {
                    bail!("--replicas cannot be used with --mode global");
                }
                s.replicas = 0;
            }
            let mut c = ctx.control().await?;
            let detach = a.flags.detach;
            let svc = c.create_service(CreateServiceRequest { spec: Some(s) }).await.map_err(rpc_err)?.into_inner();
            println!("{}", svc.id);
            if !detach {
                converge(ctx, &[svc.id]).await?;
            }
        }
        ServiceCmd::Ls => {
            let mut c = ctx.control().await?;
            let list = c.list_services(Empty {}).await.map_err(rpc_err)?.into_inner().services;
            print_services(ctx, &list);
        }
        ServiceCmd::Inspect { service } => {
            let mut c = ctx.control().await?;
            let s = c.inspect_service(ServiceRef { service }).await.map_err(rpc_err)?.into_inner();
            output::object(ctx.format, &service_json(&s));
        }
        ServiceCmd::Update(a) => {
            let mut c = ctx.control().await?;
            let cur = c
                .inspect_service(ServiceRef { service: a.service.clone() })
                .await
                .map_err(rpc_err)?
                .into_inner();
            let mut s = cur.spec.clone().unwrap_or_default();
            // The managers put a service on the mesh's network while it
            // publishes ports, and take it off when it stops.
            s.networks.retain(|n| n != spec::INGRESS_NETWORK);
            if let Some(i) = &a.image {
                s.image = i.clone();
            }
            if let Some(args) = &a.args {
                s.args = args.clone();
            }
            a.flags.apply(&mut s)?;
            for n in &a.network_rm {
                if !s.networks.contains(n) {
                    return Err(anyhow!("--network-rm {n}: the service is not on network {n:?}"));
                }
                s.networks.retain(|x| x != n);
            }
            for n in &a.network_add {
                let (name, aliases) = parse_network("network-add", n)?;
                if s.networks.contains(&name) {
                    return Err(anyhow!("--network-add {n}: the service is on network {name:?} already"));
                }
                s.networks.push(name);
                for al in aliases {
                    if !s.aliases.contains(&al) {
                        s.aliases.push(al);
                    }
                }
            }
            for p in &a.publish_rm {
                let (port, proto) = p.split_once('/').unwrap_or((p, "tcp"));
                let port: u32 = port.parse().map_err(|_| anyhow!("invalid --publish-rm {p:?}: expected PUBLISHED[/tcp|udp]"))?;
                if !s.ports.iter().any(|x| x.published == port && x.protocol == proto) {
                    return Err(anyhow!("--publish-rm {p}: the service does not publish {port}/{proto}"));
                }
                s.ports.retain(|x| !(x.published == port && x.protocol == proto));
            }
            for p in &a.publish_add {
                let port = parse_port(p)?;
                if s.ports.iter().any(|x| x.published == port.published && x.protocol == port.protocol) {
                    return Err(anyhow!("--publish-add {p}: the service publishes {}/{} already", port.published, port.protocol));
                }
                s.ports.push(port);
            }
            for t in &a.mount_rm {
                if !s.mounts.iter().any(|m| m.target == *t) {
                    return Err(anyhow!("--mount-rm {t}: the service mounts nothing at {t:?}"));
                }
                s.mounts.retain(|m| m.target != *t);
            }
            for m in &a.mount_add {
                let m = super::mount::parse_mount(m)?;
                if s.mounts.iter().any(|x| x.target == m.target) {
                    return Err(anyhow!("--mount-add: the service mounts something at {:?} already", m.target));
                }
                s.mounts.push(m);
            }
            apply_list_edits(&a, &mut s)?;
            if a.force {
                s.force_update += 1;
            }
            if a.rollback {
                let svc = c.rollback_service(ServiceRef { service: cur.id.clone() }).await.map_err(rpc_err)?.into_inner();
                println!("{}: rolled back to its previous spec", a.service);
                if !a.flags.detach {
                    converge(ctx, &[svc.id]).await?;
                }
                return Ok(());
            }
            let svc = c
                .update_service(UpdateServiceRequest { service: cur.id.clone(), spec: Some(s), version: cur.version })
                .await
                .map_err(rpc_err)?
                .into_inner();
            println!("{}", svc.spec.map(|s| s.name).unwrap_or_default());
            if !a.flags.detach {
                converge(ctx, &[svc.id]).await?;
            }
        }
        ServiceCmd::Rollback { service, detach } => {
            let mut c = ctx.control().await?;
            let svc = c.rollback_service(ServiceRef { service: service.clone() }).await.map_err(rpc_err)?.into_inner();
            println!("{service}: rolled back to its previous spec");
            if !detach {
                converge(ctx, &[svc.id]).await?;
            }
        }
        ServiceCmd::Scale { items, detach } => {
            let mut parsed = Vec::with_capacity(items.len());
            for i in &items {
                let (service, replicas) = spec::parse_scale(i)?;
                parsed.push(ScaleItem { service, replicas });
            }
            let mut c = ctx.control().await?;
            let list = c.scale_services(ScaleRequest { items: parsed }).await.map_err(rpc_err)?.into_inner();
            let ids: Vec<String> = list.services.iter().map(|s| s.id.clone()).collect();
            for s in list.services {
                let spec = s.spec.unwrap_or_default();
                println!("{} scaled to {}", spec.name, spec.replicas);
            }
            if !detach {
                converge(ctx, &ids).await?;
            }
        }
        ServiceCmd::Logs { service, follow } => {
            use std::io::Write;
            let mut c = ctx.control_streaming().await?;
            let mut stream = c
                .service_logs(ServiceLogsRequest { service, follow })
                .await
                .map_err(rpc_err)?
                .into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(line) = stream.message().await.map_err(rpc_err)? {
                let written = write!(out, "{}@{}    | ", line.task, line.node)
                    .and_then(|_| out.write_all(&line.data))
                    .and_then(|_| out.flush());
                match written {
                    // The reader went away (`| head`): done, not an error.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                    other => other?,
                }
            }
        }
        ServiceCmd::Autoscale(a) => {
            let mut c = ctx.control().await?;
            let cur = c.inspect_service(ServiceRef { service: a.service.clone() }).await.map_err(rpc_err)?.into_inner();
            let mut s = cur.spec.clone().unwrap_or_default();
            s.networks.retain(|n| n != spec::INGRESS_NETWORK);
            if a.off {
                if s.autoscale.is_none() {
                    bail!("service {:?} is not autoscaled", a.service);
                }
                s.autoscale = None;
            } else {
                let input = AutoscaleInput {
                    min: a.min,
                    max: a.max,
                    target_cpu: a.target_cpu,
                    target_rps: a.target_rps,
                    cooldown: a.cooldown.as_deref(),
                    stable_window: a.stable_window.as_deref(),
                };
                if input.is_empty() {
                    bail!("nothing to change: give --min and --max with --target-cpu or --target-rps, or --off");
                }
                s.autoscale = input.apply(s.autoscale.as_ref())?;
            }
            c.update_service(UpdateServiceRequest { service: cur.id.clone(), spec: Some(s.clone()), version: cur.version })
                .await
                .map_err(rpc_err)?;
            match s.autoscale {
                Some(x) => println!(
                    "{}: autoscaled between {} and {} tasks{}{}",
                    a.service,
                    x.min,
                    x.max,
                    if x.target_cpu_pct > 0 { format!(", {}% CPU per task", x.target_cpu_pct) } else { String::new() },
                    if x.target_rps > 0 { format!(", {} requests/s per task", x.target_rps) } else { String::new() }
                ),
                None => println!("{}: autoscaling off", a.service),
            }
        }
        ServiceCmd::Ps { service, all } => {
            let mut c = ctx.control().await?;
            let tasks = c.list_tasks(ListTasksRequest { service, all }).await.map_err(rpc_err)?.into_inner().tasks;
            print_tasks(ctx, &tasks);
        }
        ServiceCmd::Rm { services } => {
            let mut c = ctx.control().await?;
            c.remove_services(RemoveServicesRequest { services: services.clone() }).await.map_err(rpc_err)?;
            for s in services {
                println!("{s}");
            }
        }
    }
    Ok(())
}

/// `shoal exec TASK CMD...`: the command's output is printed as it came and
/// its exit code becomes ours.
pub async fn exec(ctx: &Ctx, task: String, cmd: Vec<String>) -> anyhow::Result<std::process::ExitCode> {
    use std::io::Write;
    let r = ctx
        .control()
        .await?
        .exec(ExecTaskRequest { task, cmd })
        .await
        .map_err(rpc_err)?
        .into_inner();
    std::io::stdout().write_all(&r.stdout)?;
    std::io::stderr().write_all(&r.stderr)?;
    Ok(std::process::ExitCode::from(r.exit_code.clamp(0, 255) as u8))
}
