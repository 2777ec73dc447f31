//! `shoal run`: one container on this host, without a cluster, through the
//! same runtime the agent uses; and the hidden commands the runtime
//! re-executes the binary for (`internal-supervise`, `internal-attach`).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use shoal_agent::cgroup::Limits;
use shoal_agent::image::{Image, ImageStore, random_hex};
use shoal_agent::runtime::{Runtime, RuntimeError, StartOptions, Stdio};
use shoal_agent::spec::{ContainerSpec, DEFAULT_PIDS_LIMIT, RunRequest, parse_bytes};
use shoal_agent::supervisor::{self, State, Supervised};

/// Default data dir of a node and of `shoal run`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/shoal";

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Remove the container (upper dir, cgroup, state) when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Set an environment variable (K=V, or K to copy it from here).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Memory limit (e.g. 64M); swap is not allowed beyond it.
    #[arg(long, value_parser = parse_bytes)]
    pub memory: Option<u64>,
    /// CPU quota in CPUs (e.g. 0.5).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Maximum number of processes; 0 or -1 for no limit.
    #[arg(long, default_value_t = DEFAULT_PIDS_LIMIT as i64, allow_hyphen_values = true)]
    pub pids_limit: i64,
    /// User to run as: UID[:GID] or NAME[:GROUP] from the image's /etc.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// Mount the container's root filesystem read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Add a capability to Docker's default set (NET_ADMIN, ..., or ALL).
    #[arg(long = "cap-add", value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Drop a capability from it (or ALL).
    #[arg(long = "cap-drop", value_name = "CAP")]
    pub cap_drop: Vec<String>,
    /// seccomp=unconfined, seccomp=PROFILE.json (OCI or Docker format), or
    /// no-new-privileges (always on). Default: Docker's seccomp profile.
    #[arg(long = "security-opt", value_name = "OPT")]
    pub security_opt: Vec<String>,
    /// An rlimit: NAME=SOFT[:HARD] (nofile, nproc, core, ...; -1 unlimited).
    #[arg(long = "ulimit", value_name = "NAME=SOFT[:HARD]")]
    pub ulimit: Vec<String>,
    /// Run in a user namespace: container root is an unprivileged host id
    /// (default: the `shoal` range of /etc/subuid, added when missing; or
    /// START:SIZE).
    #[arg(long = "userns-remap", value_name = "default|START:SIZE", value_parser = shoal_agent::userns::parse_remap)]
    pub userns_remap: Option<shoal_agent::userns::IdMap>,
    /// Bind mount (/host/path:/dst[:ro]) or named volume (name:/dst[:ro]),
    /// kept under DATA/volumes on this host.
    #[arg(short = 'v', long = "volume", value_name = "SRC:DST[:ro]")]
    pub volumes: Vec<String>,
    /// A mount, as `service create --mount` takes it:
    /// type=volume|bind|tmpfs,src=..,dst=..[,readonly][,volume-nocopy][,tmpfs-size=..][,tmpfs-mode=..]
    #[arg(long)]
    pub mount: Vec<String>,
    /// Mount a tmpfs (DST[:size=64m]).
    #[arg(long, value_name = "DST[:size=N]")]
    pub tmpfs: Vec<String>,
    /// The container's network: `none` (a namespace of its own with only
    /// loopback) or `host` (this host's network namespace, as `docker run
    /// --network host`). Overlay networks are the cluster's: attach a
    /// service with `shoal service create --network NAME`.
    #[arg(long, value_name = "none|host", default_value = "none")]
    pub network: String,
    /// Container name (also its id on this host); random if not given.
    #[arg(long)]
    pub name: Option<String>,
    /// Hostname inside the container (default: the first 12 chars of the id).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Override the image's entrypoint.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Run the command as pid 1 without shoal's minimal init.
    #[arg(long)]
    pub no_init: bool,
    /// Run in the background under a supervisor; print the container id.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Run under a supervisor (as the agent does) and follow its log; the
    /// container survives this process being killed.
    #[arg(long, hide = true)]
    pub supervised: bool,
    /// Node data dir holding the image store, containers and volumes.
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Image name in the store, or path of a rootfs tarball or image archive.
    pub image: String,
    /// Command and arguments (default: the image's Entrypoint + Cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `shoal run`: returns the container's exit code.
pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    let store = ImageStore::open(&args.data_dir).context("opening the image store")?;
    let image = store.resolve(&args.image).with_context(|| format!("image {}", args.image))?;
    let spec = build_spec(&args, &image)?;
    let rt = Runtime::new(&args.data_dir).context("container runtime")?;
    rt.reap_orphans();
    rt.create(&spec)?;
    let id = spec.id.clone();
    if args.detach || args.supervised {
        let bin = std::env::current_exe().context("finding the shoal binary")?;
        let sup = match Supervised::spawn(&bin, &args.data_dir, &id, args.rm && args.detach) {
            Ok(s) => s,
            Err(supervisor::SupervisorError::Start { code, message, .. }) => {
                let _ = rt.remove(&id);
                eprintln!("shoal: {message}");
                return Ok(code);
            }
            Err(e) => {
                let _ = rt.remove(&id);
                return Err(e.into());
            }
        };
        if args.detach {
            println!("{id}");
            return Ok(0);
        }
        let code = follow(&sup)?;
        if args.rm {
            rt.remove(&id)?;
        }
        return Ok(code);
    }
    // Removes the container on every path out of here when --rm is given.
    let guard = RemoveGuard { rt: &rt, id: &id, armed: args.rm };
    rt.mark_foreground(&id, args.rm)?;
    let opts = StartOptions { stdio: Stdio::Inherit, die_with_parent: true, forward_signals: true };
    let running = match rt.start(&spec, opts) {
        Ok(r) => r,
        Err(e @ RuntimeError::Start { .. }) => {
            eprintln!("shoal: {e}");
            return Ok(e.exit_code());
        }
        Err(e) => return Err(e.into()),
    };
    let status = running.wait_forwarding()?;
    if status.oom_killed {
        eprintln!(
            "shoal: container {id} was killed: out of memory (memory limit {})",
            args.memory.map(|m| format!("{} MiB", m >> 20)).unwrap_or_else(|| "none".into())
        );
    }
    drop(guard);
    Ok(status.code)
}

struct RemoveGuard<'a> {
    rt: &'a Runtime,
    id: &'a str,
    armed: bool,
}

impl Drop for RemoveGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            // Kept for inspection; no longer ours to clean up.
            let _ = std::fs::remove_file(self.rt.container_dir(self.id).join("run.pid"));
        } else if let Err(e) = self.rt.remove(self.id) {
            eprintln!("shoal: removing container {}: {e}", self.id);
        }
    }
}

/// Copies the supervised container's log to stdout until it exits; returns
/// its exit code.
fn follow(sup: &Supervised) -> anyhow::Result<i32> {
    let mut offset = 0u64;
    let mut out = std::io::stdout();
    let mut copy = |offset: &mut u64| -> anyhow::Result<()> {
        let Ok(mut f) = std::fs::File::open(sup.log_path()) else { return Ok(()) };
        let len = f.metadata()?.len();
        if len < *offset {
            *offset = 0; // rotated
        }
        f.seek(SeekFrom::Start(*offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        *offset += buf.len() as u64;
        out.write_all(&buf)?;
        out.flush()?;
        Ok(())
    };
    loop {
        let done = sup.wait(Some(Duration::from_millis(100)))?;
        copy(&mut offset)?;
        if let Some(rec) = done {
            if let Some(e) = rec.error {
                eprintln!("shoal: {e}");
            }
            if rec.status.oom_killed {
                eprintln!("shoal: container {} was killed: out of memory", sup.id());
            }
            return Ok(rec.status.code);
        }
    }
}

fn build_spec(args: &RunArgs, image: &Image) -> anyhow::Result<ContainerSpec> {
    let id = match &args.name {
        Some(n) => n.clone(),
        None => random_hex(8),
    };
    shoal_agent::runtime::validate_id(&id)?;
    let mut env = Vec::new();
    for e in &args.env {
        match e.split_once('=') {
            Some(_) => env.push(e.clone()),
            // `-e K` copies K from here, as docker run does.
            None => {
                if let Ok(v) = std::env::var(e) {
                    env.push(format!("{e}={v}"));
                }
            }
        }
    }
    let mut wanted = Vec::new();
    for v in &args.volumes {
        wanted.push(super::mount::parse_volume(v)?);
    }
    for m in &args.mount {
        wanted.push(super::mount::parse_mount(m)?);
    }
    for t in &args.tmpfs {
        let (dst, opts) = t.split_once(':').unwrap_or((t.as_str(), ""));
        let mut m = shoal_proto::control::Mount { r#type: "tmpfs".into(), target: dst.to_string(), ..Default::default() };
        match opts.strip_prefix("size=") {
            Some(s) => m.tmpfs_size = parse_bytes(s).map_err(anyhow::Error::msg)?,
            None if opts.is_empty() => {}
            None => bail!("--tmpfs {t}: only the size=N option is supported"),
        }
        wanted.push(m);
    }
    for (i, m) in wanted.iter().enumerate() {
        shoal_manager::spec::validate_mount(m).map_err(|e| anyhow::anyhow!("{e}"))?;
        if wanted[..i].iter().any(|o| o.target == m.target) {
            bail!("{} is mounted twice", m.target);
        }
    }
    let volumes = shoal_agent::volume::Volumes::new(&args.data_dir);
    let (mut mounts, _) = shoal_agent::volume::resolve_mounts(&volumes, &args.data_dir, &wanted, &[], false).map_err(anyhow::Error::msg)?;
    mounts.sort_by_key(|m| m.destination().matches('/').count());
    let cpu_micros = match args.cpus {
        Some(c) if c > 0.0 && c.is_finite() => Some((c * 1_000_000.0) as u64),
        Some(c) => bail!("--cpus {c}: want a positive number of CPUs"),
        None => None,
    };
    let req = RunRequest {
        id,
        image: args.image.clone(),
        entrypoint: args.entrypoint.as_ref().map(|e| if e.is_empty() { vec![] } else { vec![e.clone()] }),
        command: args.command.clone(),
        env,
        user: args.user.clone(),
        workdir: args.workdir.clone(),
        hostname: args.hostname.clone(),
        read_only: args.read_only,
        mounts,
        limits: Limits {
            memory_bytes: args.memory,
            cpu_micros,
            pids: (args.pids_limit > 0).then_some(args.pids_limit as u64),
        },
        no_init: args.no_init,
        netns: run_netns(&args.network, args.userns_remap.is_some())?,
        userns: args.userns_remap,
        security: shoal_agent::spec::Security {
            cap_add: super::confine::cap_names("cap-add", &args.cap_add)?,
            cap_drop: super::confine::cap_names("cap-drop", &args.cap_drop)?,
            seccomp: super::confine::seccomp_from_opts(&args.security_opt)?.unwrap_or_default(),
            ulimits: super::confine::ulimits(&args.ulimit)?.into_iter().map(|u| (u.name, u.soft, u.hard)).collect(),
        },
    };
    Ok(req.to_spec(image)?)
}

/// The network namespace a `shoal run` container joins (`None`: a new one).
fn run_netns(network: &str, remapped: bool) -> anyhow::Result<Option<PathBuf>> {
    match network {
        "none" => Ok(None),
        "host" if remapped => bail!(
            "--network host can't be combined with --userns-remap: the remapped root would configure the host's network namespace"
        ),
        // Opened by the process that starts the container, which runs in
        // the caller's namespace.
        "host" => Ok(Some(PathBuf::from("/proc/self/ns/net"))),
        other => bail!(
            "--network {other}: `shoal run` starts a container outside the cluster, so it can use only `none` or `host`; to attach to overlay network {other:?}, run it as a service: shoal service create --network {other} ..."
        ),
    }
}

/// Hidden subcommands the runtime re-executes `shoal` for.
#[derive(clap::Subcommand, Debug)]
pub enum InternalCmd {
    /// Supervise one created container (started by the agent or `run -d`).
    #[command(name = "internal-supervise", hide = true)]
    Supervise(SuperviseArgs),
    /// Reattach to a supervised container: follow its log, wait, and exit
    /// with its exit code.
    #[command(name = "internal-attach", hide = true)]
    Attach(AttachArgs),
    /// Run a command in a running container as its workload runs (the
    /// agent's side of `shoal exec`).
    #[command(name = "internal-exec", hide = true)]
    Exec(ExecArgs),
}

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    pub id: String,
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub cmd: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct SuperviseArgs {
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Remove the container when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Rotate the log at this size.
    #[arg(long, value_parser = parse_bytes, default_value = "10M")]
    pub log_max: u64,
    pub id: String,
}

#[derive(clap::Args, Debug)]
pub struct AttachArgs {
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Remove the container after it exits.
    #[arg(long)]
    pub rm: bool,
    pub id: String,
}

/// Runs a hidden subcommand; returns the exit code.
pub fn internal(cmd: InternalCmd) -> anyhow::Result<i32> {
    match cmd {
        InternalCmd::Supervise(a) => supervise(a),
        InternalCmd::Attach(a) => attach(a),
        InternalCmd::Exec(a) => exec(a),
    }
}

/// `shoal internal-exec`: single-threaded (it enters the container's
/// namespaces); the command's exit code is ours.
pub fn exec(args: ExecArgs) -> anyhow::Result<i32> {
    let sup = Supervised::attach(&args.data_dir, &args.id)?;
    let init_pid = match sup.state()? {
        State::Running { init_pid } if init_pid > 0 => init_pid,
        _ => bail!("container {} is not running", args.id),
    };
    let rt = Runtime::new(&args.data_dir)?;
    Ok(rt.exec(&args.id, init_pid, &args.cmd)?.code)
}

/// `shoal internal-supervise`: must run before any thread is started.
pub fn supervise(args: SuperviseArgs) -> anyhow::Result<i32> {
    Ok(supervisor::supervise(&args.data_dir, &args.id, args.log_max, args.rm)?)
}

/// `shoal internal-attach`.
pub fn attach(args: AttachArgs) -> anyhow::Result<i32> {
    let sup = Supervised::attach(&args.data_dir, &args.id)?;
    if let State::Running { init_pid } = sup.state()? {
        eprintln!("shoal: attached to container {} (init pid {init_pid})", args.id);
    }
    let code = follow(&sup)?;
    if args.rm {
        Runtime::new(&args.data_dir)?.remove(&args.id)?;
    }
    Ok(code)
}
