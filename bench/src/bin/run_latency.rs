//! `shoal run` start→exit latency of `/bin/true` against `crun run` on the
//! same busybox rootfs, and the memory a running container costs beyond
//! its own processes (its supervisor and init). Needs root.
//!
//! ```sh
//! cargo build --release -p shoal-cli -p shoal-bench && target/release/run_latency [RUNS]
//! ```
//!
//! crun refuses to run on a hybrid cgroup host (v1 controllers plus an empty
//! cgroup2 at /sys/fs/cgroup/unified), so the benchmark first moves itself
//! into a private mount namespace and detaches that cgroup2 mount there;
//! both runtimes then see the same v1 hierarchy.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use shoal_tests::runtime_support::busybox_layer;

fn main() -> anyhow::Result<()> {
    // First, before any thread starts: SIGINT/SIGTERM remove the scratch
    // dir and the containers started under it.
    shoal_tests::cleanup_on_signals()?;
    let runs: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(50);
    let shoal = shoal_tests::shoal_bin();
    if !shoal.exists() {
        bail!("no shoal binary at {} (build shoal-cli, or set SHOAL_BIN)", shoal.display());
    }
    private_cgroup_view()?;
    let work = std::env::temp_dir().join(format!("shoal-bench-run-{}", std::process::id()));
    let data = work.join("data");
    // Removed (containers first) on return, panic or signal.
    let _cleanup = shoal_tests::cleanup::register(shoal_tests::cleanup::Resources {
        label: format!("run_latency scratch {}", work.display()),
        data_dirs: vec![data.clone()],
        dir: Some(work.clone()),
        ..Default::default()
    });
    std::fs::create_dir_all(&work)?;
    let tar = work.join("rootfs.tar");
    std::fs::write(&tar, busybox_layer(&[])?)?;
    check(Command::new(&shoal).args(["image", "import", "--data-dir"]).arg(&data).arg(&tar).arg("bench"))?;
    let bundle = work.join("bundle");
    crun_bundle(&bundle, &tar)?;

    let shoal_run = |_: usize| {
        let mut c = Command::new(&shoal);
        c.args(["run", "--rm", "--data-dir"]).arg(&data).args(["bench", "/bin/true"]);
        c
    };
    let crun_run = |i: usize| {
        let mut c = Command::new("crun");
        c.args(["run", "--bundle"]).arg(&bundle).arg(format!("bench-{}-{i}", std::process::id()));
        c
    };
    // Warm caches (page cache, dentries) for both before measuring.
    for i in 0..3 {
        time(shoal_run(i))?;
        time(crun_run(1_000_000 + i))?;
    }
    let (mut s, mut c) = (Vec::new(), Vec::new());
    // Interleaved, so background noise hits both alike.
    for i in 0..runs {
        s.push(time(shoal_run(i))?);
        c.push(time(crun_run(i))?);
    }
    let (sm, cm) = (median(&mut s), median(&mut c));
    println!("start->exit of /bin/true, {runs} runs each (median / p90):");
    println!("  shoal run --rm : {:>6.2} ms / {:>6.2} ms", ms(sm), ms(p90(&mut s)));
    println!("  crun run       : {:>6.2} ms / {:>6.2} ms", ms(cm), ms(p90(&mut c)));
    println!("  ratio shoal/crun (medians): {:.2}", sm.as_secs_f64() / cm.as_secs_f64());

    memory_overhead(&shoal, &data)?;
    Ok(())
}

/// Starts 10 detached containers and reports the memory of their
/// supervisors and inits: RSS, and the private part (what each extra
/// container really adds; the binary's pages are shared by all of them).
fn memory_overhead(shoal: &Path, data: &Path) -> anyhow::Result<()> {
    const N: usize = 10;
    let mut ids = Vec::new();
    for i in 0..N {
        let id = format!("mem-{}-{i}", std::process::id());
        check(
            Command::new(shoal)
                .args(["run", "-d", "--name", &id, "--data-dir"])
                .arg(data)
                .args(["bench", "sleep", "1000"]),
        )?;
        ids.push(id);
    }
    let mut rss = 0u64;
    let mut private = 0u64;
    for id in &ids {
        let dir = data.join("containers").join(id);
        for f in ["supervisor.pid", "init.pid"] {
            let pid = std::fs::read_to_string(dir.join(f))?.trim().to_string();
            let (r, p) = smaps_rollup(&pid)?;
            rss += r;
            private += p;
        }
    }
    for id in &ids {
        let sup = stop_container(data, id);
        if let Err(e) = sup {
            eprintln!("stopping {id}: {e:#}");
        }
    }
    println!("memory per running container (supervisor + init), mean of {N}:");
    println!("  RSS     : {:>7.0} KiB", rss as f64 / N as f64);
    println!(
        "  private : {:>7.0} KiB  (Private_Clean + Private_Dirty: what each extra container adds)",
        private as f64 / N as f64
    );
    println!("  agent bookkeeping: 0 B (LinuxExecutor keeps container state on disk, not in memory)");
    Ok(())
}

/// Stops a detached container: SIGTERM its init (via the supervisor's
/// files), wait for the supervisor's record, remove it.
fn stop_container(data: &Path, id: &str) -> anyhow::Result<()> {
    let dir = data.join("containers").join(id);
    let init: i32 = std::fs::read_to_string(dir.join("init.pid"))?.trim().parse()?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(init), nix::sys::signal::Signal::SIGKILL)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.join("exit.json").exists() {
        if Instant::now() > deadline {
            bail!("container {id} did not stop");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The supervisor removes the cgroup once it has reaped init; the
    // record is written after that.
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// (Rss, Private_Clean + Private_Dirty) of a process, in KiB.
fn smaps_rollup(pid: &str) -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).with_context(|| format!("pid {pid}"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("Rss:"), field("Private_Clean:") + field("Private_Dirty:")))
}

fn private_cgroup_view() -> anyhow::Result<()> {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if !unified.join("cgroup.controllers").exists() {
        return Ok(());
    }
    unshare(CloneFlags::CLONE_NEWNS).context("unshare mount namespace")?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)?;
    umount2(unified, MntFlags::MNT_DETACH).context("detach /sys/fs/cgroup/unified")?;
    Ok(())
}

fn crun_bundle(bundle: &Path, tar: &Path) -> anyhow::Result<()> {
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    tar::Archive::new(std::fs::File::open(tar)?).unpack(&rootfs)?;
    check(Command::new("crun").arg("spec").current_dir(bundle))?;
    let cfg_path = bundle.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path)?)?;
    cfg["process"]["args"] = serde_json::json!(["/bin/true"]);
    cfg["process"]["terminal"] = serde_json::json!(false);
    // The same seccomp filter shoal installs (Docker's profile for Docker's
    // capabilities), in the OCI form crun takes: both pay for it.
    let caps = shoal_confine::caps::DOCKER_DEFAULT.iter().map(|c| c.to_string()).collect();
    let profile = shoal_confine::docker::default_profile().to_oci(&shoal_confine::Context::new(caps))?;
    cfg["linux"]["seccomp"] = serde_json::to_value(&profile)?;
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)?;
    Ok(())
}

fn check(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn time(mut cmd: Command) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let st = cmd.stdin(Stdio::null()).stdout(Stdio::null()).status()?;
    let d = start.elapsed();
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(d)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p90(v: &mut [Duration]) -> Duration {
    v.sort();
    v[(v.len() * 9 / 10).min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
