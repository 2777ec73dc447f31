//! Orchestration end to end: 3 managers + 2 workers as network-namespace
//! hosts, real containers from a busybox image, driven through the CLI.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use shoal_tests::{wait_for, Cluster, DaemonOpts};

const T: Duration = Duration::from_secs(90);

fn tasks(c: &Cluster, via: usize, service: &str, all: bool) -> anyhow::Result<Vec<Value>> {
    let mut args = vec!["service", "ps", service, "--format", "json"];
    if all {
        args.push("--all");
    }
    Ok(c.cli_ok(via, &args)?.as_array().cloned().unwrap_or_default())
}

/// Running tasks (desired running) per node name.
fn running_per_node(c: &Cluster, via: usize, service: &str) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut m = BTreeMap::new();
    for t in tasks(c, via, service, false)? {
        if t["state"] == "running" && t["desired_state"] == "running" {
            *m.entry(t["node"].as_str().unwrap_or_default().to_string()).or_default() += 1;
        }
    }
    Ok(m)
}

/// Waits until `service` runs exactly `n` tasks and nothing else of it is
/// still alive, spread with max − min ≤ 1 over `nodes` (names).
fn wait_spread(c: &Cluster, via: usize, service: &str, n: usize, nodes: &[&str]) -> anyhow::Result<BTreeMap<String, usize>> {
    wait_for(T, &format!("{n} tasks of {service} spread over {nodes:?}"), || {
        let all = tasks(c, via, service, false)?;
        let alive = all.iter().filter(|t| !["complete", "shutdown", "failed", "rejected", "orphaned"].contains(&t["state"].as_str().unwrap_or(""))).count();
        let per = running_per_node(c, via, service)?;
        let total: usize = per.values().sum();
        let counts: Vec<usize> = nodes.iter().map(|n| per.get(*n).copied().unwrap_or(0)).collect();
        let (min, max) = (counts.iter().min().copied().unwrap_or(0), counts.iter().max().copied().unwrap_or(0));
        let on_others = per.keys().any(|k| !nodes.contains(&k.as_str()));
        if total == n && alive == n && max - min <= 1 && !on_others {
            Ok(Some(per))
        } else {
            bail!("running per node {per:?}, {alive} alive")
        }
    })
}

/// Processes on this machine whose command line contains `needle`.
fn processes(needle: &str) -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0 };
    procs
        .flatten()
        .filter(|p| p.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter(|p| {
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).replace('\0', " ").contains(needle)
        })
        .count()
}

fn five_hosts() -> anyhow::Result<Cluster> {
    let c = Cluster::start(3, 2)?;
    c.import_busybox(0, "bb:1")?;
    Ok(c)
}

const ALL: [&str; 5] = ["n0", "n1", "n2", "n3", "n4"];

/// A web server command line unique to this test process, so counting its
/// processes is not confused by other tests.
fn httpd_args() -> (String, Vec<String>) {
    let port = 20000 + (std::process::id() % 20000);
    let args = vec!["httpd".into(), "-f".into(), "-p".into(), port.to_string(), "-h".into(), "/www".into()];
    (args.join(" "), args)
}

#[test]
fn scale_spreads_real_containers_over_every_node() -> anyhow::Result<()> {
    let c = five_hosts()?;
    let (needle, args) = httpd_args();
    let mut create = vec!["service", "create", "--name", "web", "--replicas", "2", "bb:1"];
    create.extend(args.iter().map(String::as_str));
    let out = c.cli(0, &create);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = c.cli(1, &["service", "scale", "web=10"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("web: 10/10 running"), "progress is shown");
    let per = wait_spread(&c, 0, "web", 10, &ALL)?;
    assert_eq!(per.len(), 5, "{per:?}");
    wait_for(T, "10 real httpd processes", || Ok((processes(&needle) == 10).then_some(())))?;
    let ls = c.cli_ok(2, &["service", "ls", "--format", "json"])?;
    assert_eq!(ls[0]["replicas_running"], 10, "{ls}");
    // Scale down to 1: nine containers go away.
    c.cli_ok(0, &["service", "scale", "web=1"])?;
    wait_for(T, "one httpd process", || Ok((processes(&needle) == 1).then_some(())))?;
    // And to 0.
    c.cli_ok(0, &["service", "scale", "web=0"])?;
    wait_for(T, "no httpd process", || Ok((processes(&needle) == 0).then_some(())))?;
    Ok(())
}

#[test]
fn a_dead_node_is_replaced_and_rebalanced_when_it_returns() -> anyhow::Result<()> {
    let mut c = five_hosts()?;
    c.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "10", "bb:1", "sleep", "3600"])?;
    wait_spread(&c, 0, "web", 10, &ALL)?;
    c.kill(4);
    wait_for(T, "n4 marked down", || {
        let n = c.cli_ok(0, &["node", "inspect", "n4", "--format", "json"])?;
        Ok((n["status"] == "down").then_some(()))
    })?;
    wait_spread(&c, 0, "web", 10, &ALL[..4])?;
    let orphaned = tasks(&c, 0, "web", true)?.iter().filter(|t| t["state"] == "orphaned").count();
    assert!(orphaned >= 2, "the dead node's tasks are marked orphaned");
    c.restart(4)?;
    wait_spread(&c, 0, "web", 10, &ALL)?;
    Ok(())
}

#[test]
fn drain_empties_a_node_and_pause_stops_new_placements() -> anyhow::Result<()> {
    let c = five_hosts()?;
    c.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "5", "bb:1", "sleep", "3600"])?;
    wait_spread(&c, 0, "web", 5, &ALL)?;
    c.cli_ok(0, &["node", "update", "n4", "--availability", "drain"])?;
    wait_spread(&c, 0, "web", 5, &ALL[..4])?;
    c.cli_ok(0, &["node", "update", "n3", "--availability", "pause"])?;
    let on_paused = running_per_node(&c, 0, "web")?.get("n3").copied().unwrap_or(0);
    c.cli_ok(0, &["service", "scale", "web=9"])?;
    let per = wait_for(T, "9 tasks, none new on the paused node", || {
        let per = running_per_node(&c, 0, "web")?;
        Ok((per.values().sum::<usize>() == 9).then_some(per))
    })?;
    assert_eq!(per.get("n4"), None, "drained: {per:?}");
    assert_eq!(per.get("n3").copied().unwrap_or(0), on_paused, "paused node got new tasks: {per:?}");
    Ok(())
}

#[test]
fn impossible_constraints_and_reservations_stay_pending_with_the_reason() -> anyhow::Result<()> {
    let c = five_hosts()?;
    let out = c.cli(0, &["service", "create", "--detach", "--name", "zoned", "--replicas", "2", "--constraint", "node.labels.zone==b", "bb:1", "sleep", "3600"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.cli_ok(0, &["service", "create", "--detach", "--name", "huge", "--reserve-memory", "100T", "bb:1", "sleep", "3600"])?;
    for (svc, want) in [("zoned", "node.labels.zone==b"), ("huge", "memory")] {
        wait_for(T, &format!("{svc} pending with a reason"), || {
            let ts = tasks(&c, 0, svc, false)?;
            let ok = !ts.is_empty() && ts.iter().all(|t| t["state"] == "pending" && t["message"].as_str().unwrap_or("").contains(want));
            if ok { Ok(Some(())) } else { bail!("{ts:?}") }
        })?;
    }
    // Giving a node the label lets the tasks run.
    c.cli_ok(0, &["node", "update", "n3", "--label-add", "zone=b"])?;
    wait_spread(&c, 0, "zoned", 2, &["n3"]).or_else(|_| {
        let per = running_per_node(&c, 0, "zoned")?;
        if per.get("n3") == Some(&2) { Ok(per) } else { bail!("zoned: {per:?}") }
    })?;
    Ok(())
}

#[test]
fn a_global_service_runs_on_every_node_and_on_late_joiners() -> anyhow::Result<()> {
    let mut c = Cluster::start(1, 1)?;
    c.import_busybox(0, "bb:1")?;
    c.cli_ok(0, &["service", "create", "--name", "mon", "--mode", "global", "bb:1", "sleep", "3600"])?;
    wait_spread(&c, 0, "mon", 2, &["n0", "n1"])?;
    let i = c.add_host()?;
    c.join(i, 0, "worker", &DaemonOpts::default())?;
    wait_spread(&c, 0, "mon", 3, &["n0", "n1", "n2"])?;
    Ok(())
}

#[test]
fn restart_policies_are_honoured() -> anyhow::Result<()> {
    let c = Cluster::start(1, 0)?;
    c.import_busybox(0, "bb:1")?;
    c.cli_ok(0, &["service", "create", "--detach", "--name", "flaky", "--restart-condition", "on-failure", "--restart-max-attempts", "2", "--restart-delay", "100ms", "bb:1", "sh", "-c", "exit 3"])?;
    c.cli_ok(0, &["service", "create", "--detach", "--name", "once", "--restart-condition", "none", "bb:1", "sh", "-c", "exit 4"])?;
    wait_for(T, "flaky to fail 3 times (1 + 2 restarts)", || {
        let ts = tasks(&c, 0, "flaky", true)?;
        let failed = ts.iter().filter(|t| t["state"] == "failed").count();
        Ok((failed == 3).then_some(()))
    })?;
    wait_for(T, "once to fail once", || {
        let ts = tasks(&c, 0, "once", true)?;
        Ok((ts.len() == 1 && ts[0]["state"] == "failed").then_some(()))
    })?;
    // No further restarts happen: the counts stay put while the
    // orchestrator keeps reconciling (a later node change triggers a pass).
    c.cli_ok(0, &["node", "update", "n0", "--label-add", "poke=1"])?;
    // A negative check needs a window: watch it for two seconds.
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        assert_eq!(tasks(&c, 0, "flaky", true)?.len(), 3, "flaky was restarted beyond max attempts");
        assert_eq!(tasks(&c, 0, "once", true)?.len(), 1, "once was restarted");
    }
    let flaky = tasks(&c, 0, "flaky", true)?;
    assert!(flaky.iter().all(|t| t["exit_code"] == 3 && t["error"].as_str().unwrap_or("").contains("exit code 3")), "{flaky:?}");
    assert_eq!(tasks(&c, 0, "once", true)?.len(), 1);
    Ok(())
}

#[test]
fn losing_the_leader_during_a_scale_still_converges_exactly() -> anyhow::Result<()> {
    let mut c = five_hosts()?;
    c.cli_ok(0, &["service", "create", "--name", "web", "--replicas", "2", "bb:1", "sleep", "3600"])?;
    let leader = c.leader(0)?;
    let via = (leader + 1) % 3;
    c.cli_ok(via, &["service", "scale", "--detach", "web=20"])?;
    c.kill(leader);
    let alive: Vec<&str> = ALL.iter().copied().filter(|n| *n != c.hosts[leader].name).collect();
    wait_spread(&c, via, "web", 20, &alive)?;
    let ts = tasks(&c, via, "web", false)?;
    let mut slots: Vec<u64> = ts.iter().filter(|t| t["desired_state"] == "running").map(|t| t["slot"].as_u64().unwrap_or(0)).collect();
    slots.sort();
    assert_eq!(slots, (1..=20).collect::<Vec<_>>(), "no duplicate or lost slots");
    Ok(())
}

#[test]
fn bad_orchestration_input_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    let c = Cluster::start(1, 0)?;
    c.import_busybox(0, "bb:1")?;
    c.cli_ok(0, &["service", "create", "--detach", "--name", "web", "--replicas", "0", "bb:1", "sleep", "3600"])?;
    let before = c.cli_ok(0, &["service", "ls", "--format", "json"])?;
    let cases: &[(&[&str], &str)] = &[
        (&["service", "create", "--detach", "--name", "x", "ghost:9"], "ghost:9"),
        (&["service", "scale", "nope=2"], "nope"),
        (&["service", "create", "--detach", "--name", "x", "--constraint", "node.labels.zone~a", "bb:1"], "node.labels.zone~a"),
        (&["service", "create", "--detach", "--name", "x", "--limit-cpu", "lots", "bb:1"], "lots"),
        (&["service", "create", "--detach", "--name", "x", "--reserve-memory", "12Q", "bb:1"], "12Q"),
        (&["image", "import", "/nonexistent.tar", "x:1"], "nonexistent"),
    ];
    for (args, needle) in cases {
        let out = c.cli(0, args);
        assert!(!out.status.success(), "{args:?} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(c.cli_ok(0, &["service", "ls", "--format", "json"])?, before);
    }
    let images = c.cli_ok(0, &["image", "ls", "--format", "json"])?;
    assert_eq!(images.as_array().map(Vec::len), Some(1), "{images}");
    Ok(())
}

#[test]
fn logs_follow_and_exec_reach_tasks_on_other_hosts() -> anyhow::Result<()> {
    use std::io::BufRead;
    let c = Cluster::start(1, 2)?;
    c.import_busybox(0, "bb:1")?;
    let script = "i=0; while true; do echo line $i from $(hostname); i=$((i+1)); sleep 0.2; done";
    c.cli_ok(0, &["service", "create", "--name", "ticker", "--replicas", "2", "--constraint", "node.role==worker", "bb:1", "sh", "-c", script])?;
    wait_spread(&c, 0, "ticker", 2, &["n1", "n2"])?;
    // Follow: lines from both workers arrive through the manager.
    let h = &c.hosts[0];
    let mut child = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", h.netns))
        .arg(shoal_tests::shoal_bin())
        .args(["--host", &h.addr(), "--cert-dir"])
        .arg(c.cert_dir())
        .args(["service", "logs", "-f", "ticker"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + T;
    while seen.len() < 2 && std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            if let Some((prefix, _)) = line.split_once('|') {
                if line.contains("from ticker-") {
                    seen.insert(prefix.trim().to_string());
                }
            }
        }
    }
    // Following must not hang when a task goes away: scale down while
    // following, then the stream keeps working for the remaining task.
    c.cli_ok(0, &["service", "scale", "ticker=1"])?;
    let mut after = 0;
    let deadline = std::time::Instant::now() + T;
    while after < 3 && std::time::Instant::now() < deadline {
        if rx.recv_timeout(Duration::from_millis(500)).is_ok() {
            after += 1;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen.len(), 2, "lines from both tasks on both workers: {seen:?}");
    assert!(seen.iter().any(|s| s.contains("@n1")) && seen.iter().any(|s| s.contains("@n2")), "{seen:?}");
    assert!(after >= 3, "logs -f kept streaming after a task went away");
    // Exec from the manager's host into a task on a worker.
    let out = c.cli(0, &["exec", "ticker.1", "hostname"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ticker-1");
    // A task on no network still gets /etc/hostname and /etc/hosts (only
    // localhost: it has no other address), as Docker writes them, and no
    // loopback resolver of the host's in resolv.conf.
    let out = c.cli(0, &["exec", "ticker.1", "sh", "-c", "cat /etc/hostname; cat /etc/hosts; grep -c 'nameserver 127' /etc/resolv.conf"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("ticker-1\n127.0.0.1\tlocalhost\n") && text.ends_with("ip6-loopback\n0\n"), "{text}");
    let out = c.cli(0, &["exec", "ticker.1", "sh", "-c", "echo oops >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "oops");
    let out = c.cli(0, &["exec", "nosuch.9", "true"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("nosuch.9"));
    // The exec'd command is held to what the workload is: Docker's
    // capabilities, no_new_privs, seccomp, the container's cgroup and pid
    // namespace.
    let out = c.cli(0, &["exec", "ticker.1", "sh", "-c", "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; cat /proc/self/cgroup; ps -o pid,args"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("CapEff:\t00000000a80425fb\nCapBnd:\t00000000a80425fb\nNoNewPrivs:\t1\nSeccomp:\t2\n"), "{text}");
    let ticker = tasks(&c, 0, "ticker", false)?;
    let id = ticker.iter().find(|t| t["slot"] == 1).and_then(|t| t["id"].as_str()).unwrap_or_default().to_string();
    assert!(text.lines().any(|l| l.ends_with(&format!("shoal/{id}"))), "in the task's cgroup: {text}");
    assert!(text.lines().any(|l| l.trim_start().starts_with("1 ")), "sees the container's pid 1: {text}");
    Ok(())
}

#[test]
fn images_travel_as_layers_and_nodes_fetch_only_what_they_lack() -> anyhow::Result<()> {
    use shoal_tests::runtime_support::{docker_archive, Layer, TarBuilder};
    let c = Cluster::start(1, 1)?;
    c.import_busybox(0, "bb:1")?;
    // bb:2 is busybox's layer (gzipped, as `docker save` may ship it) with
    // a small layer on top: the same diff id as bb:1's only layer.
    let base = std::fs::read(shoal_tests::busybox_rootfs()?)?;
    let top = TarBuilder::new().dir("www/")?.file("www/motd", b"layered image\n", 0o644)?.finish()?;
    let archive = docker_archive(
        "bb:2",
        &[Layer { tar: base, gzip: true }, Layer { tar: top, gzip: false }],
        serde_json::json!({"Env": ["PATH=/bin"]}),
    )?;
    let path = c.dir.join("bb2.tar");
    std::fs::write(&path, archive)?;
    c.cli_ok(0, &["image", "load", &path.display().to_string()])?;
    let images = c.cli_ok(0, &["image", "ls", "--format", "json"])?;
    let layers = |r: &str| images.as_array().into_iter().flatten().find(|i| i["reference"] == r).map(|i| i["layers"].clone());
    assert_eq!(layers("bb:1"), Some(1.into()), "{images}");
    assert_eq!(layers("bb:2"), Some(2.into()), "{images}");

    // Every node runs bb:1 first, then bb:2: for bb:2 each fetches only the
    // top layer.
    c.cli_ok(0, &["service", "create", "--name", "one", "--mode", "global", "bb:1", "sleep", "3600"])?;
    wait_spread(&c, 0, "one", 2, &["n0", "n1"])?;
    c.cli_ok(0, &["service", "create", "--name", "two", "--mode", "global", "bb:2", "sh", "-c", "cat /www/motd; sleep 3600"])?;
    wait_spread(&c, 0, "two", 2, &["n0", "n1"])?;
    for i in 0..2 {
        let log = std::fs::read_to_string(&c.hosts[i].log)?;
        assert!(log.contains("1 of 1 layers were missing"), "n{i} fetched bb:1:\n{}", c.log_tail(i));
        assert!(log.contains("1 of 2 layers were missing"), "n{i} fetched only bb:2's top layer:\n{}", c.log_tail(i));
        assert!(!log.contains("2 of 2 layers were missing"), "n{i} fetched bb:2's base layer again");
    }
    wait_for(T, "the top layer's file in both tasks' output", || {
        let out = c.cli(0, &["service", "logs", "two"]);
        let text = String::from_utf8_lossy(&out.stdout);
        Ok((text.matches("layered image").count() == 2).then_some(()))
    })?;
    // An image in use can't go; once its service is gone, it can.
    assert!(!c.cli(0, &["image", "rm", "bb:2"]).status.success());
    c.cli_ok(0, &["service", "rm", "two"])?;
    wait_for(T, "bb:2 to be removable once its tasks stopped", || {
        Ok(c.cli(0, &["image", "rm", "bb:2"]).status.success().then_some(()))
    })?;
    let images = c.cli_ok(0, &["image", "ls", "--format", "json"])?;
    assert_eq!(images.as_array().map(Vec::len), Some(1), "{images}");
    Ok(())
}

#[test]
fn networks_secrets_and_configs_reach_the_tasks_that_use_them() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1)?;
    c.import_busybox(0, "bb:1")?;
    let front = c.cli_ok(0, &["network", "create", "front", "--label", "tier=web", "--format", "json"])?;
    assert_eq!((front["subnet"].as_str(), front["gateway"].as_str()), (Some("100.64.0.0/20"), Some("100.64.0.1")), "{front}");
    for (args, needle) in [
        (&["network", "create", "--subnet", "100.64.0.0/16", "wide"][..], "overlaps network \"front\""),
        (&["network", "create", "--subnet", "300.1.1.0/24", "bad"][..], "300.1.1.0/24"),
        (&["network", "create", "Front"][..], "Front"),
        (&["network", "create", "front"][..], "already exists"),
        (&["network", "create", "--label", "a b=1", "other"][..], "invalid label key \"a b\""),
    ] {
        let out = c.cli(0, args);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(String::from_utf8_lossy(&out.stderr).contains(needle), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(c.cli_ok(0, &["network", "ls", "--format", "json"])?.as_array().map(Vec::len), Some(1));

    let pass = c.dir.join("db-pass");
    std::fs::write(&pass, "s3cret-value")?;
    let motd = c.dir.join("motd");
    std::fs::write(&motd, "hello from a config")?;
    c.cli_ok(0, &["secret", "create", "db-pass", &pass.display().to_string()])?;
    c.cli_ok(0, &["config", "create", "motd", &motd.display().to_string()])?;
    let out = c.cli(0, &["service", "create", "--detach", "--name", "x", "--secret", "ghost", "bb:1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("secret \"ghost\" not found"), "{out:?}");

    let script = "cat /run/secrets/db-pass; echo; cat /motd; echo; sleep 3600";
    c.cli_ok(0, &["service", "create", "--name", "app", "--replicas", "2", "--network", "front", "--secret", "db-pass", "--config", "motd", "bb:1", "sh", "-c", script])?;
    wait_spread(&c, 0, "app", 2, &["n0", "n1"])?;
    wait_for(T, "both tasks to print the secret and the config", || {
        let out = c.cli(0, &["service", "logs", "app"]);
        let text = String::from_utf8_lossy(&out.stdout);
        Ok((text.matches("s3cret-value").count() == 2 && text.matches("hello from a config").count() == 2).then_some(()))
    })?;
    // On the nodes the files live on a tmpfs, not on disk.
    for i in 0..2 {
        let dir = c.hosts[i].data_dir.join("taskdata");
        assert!(shoal_agent::mounts::is_mount_point(&dir)?, "{} is not a mount point", dir.display());
    }
    // A secret's data never comes back out; a config's does.
    let secrets = c.cli_ok(0, &["secret", "ls", "--format", "json"])?;
    assert!(!secrets.to_string().contains("s3cret"), "{secrets}");
    assert_eq!(secrets[0]["size"], 12);
    assert_eq!(secrets[0]["services"], serde_json::json!(["app"]));
    assert!(!c.cli_ok(0, &["secret", "inspect", "db-pass", "--format", "json"])?.to_string().contains("s3cret"));
    assert_eq!(c.cli_ok(0, &["config", "inspect", "motd", "--format", "json"])?["data"], "hello from a config");
    // In use: none of them can go.
    for args in [["secret", "rm", "db-pass"], ["config", "rm", "motd"], ["network", "rm", "front"]] {
        let out = c.cli(0, &args);
        assert!(String::from_utf8_lossy(&out.stderr).contains("is used by service \"app\""), "{args:?}: {out:?}");
    }
    c.cli_ok(0, &["service", "rm", "app"])?;
    // They can go once the service's tasks have stopped too.
    for args in [["secret", "rm", "db-pass"], ["config", "rm", "motd"], ["network", "rm", "front"]] {
        wait_for(T, &format!("{args:?} to succeed"), || Ok(c.cli(0, &args).status.success().then_some(())))?;
    }
    // The nodes drop the files once the tasks are gone.
    for i in 0..2 {
        let dir = c.hosts[i].data_dir.join("taskdata");
        wait_for(T, "the tasks' secret files to be removed", || {
            let left = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
            Ok((left == 0).then_some(()))
        })?;
    }
    Ok(())
}

#[test]
fn a_task_that_fails_its_health_check_is_failed_and_replaced() -> anyhow::Result<()> {
    let c = Cluster::start(1, 0)?;
    c.import_busybox(0, "bb:1")?;
    // Healthy for its first second or so, then the check's file goes away.
    let script = "touch /tmp/ok; sleep 1; rm /tmp/ok; sleep 3600";
    c.cli_ok(0, &["service", "create", "--name", "sick", "--health-cmd", "test -f /tmp/ok", "--health-interval", "200ms", "--health-retries", "2", "bb:1", "sh", "-c", script])?;
    let failed = wait_for(T, "the unhealthy task to be failed and replaced", || {
        let ts = tasks(&c, 0, "sick", true)?;
        let failed: Vec<Value> = ts.iter().filter(|t| t["state"] == "failed").cloned().collect();
        let replaced = ts.iter().any(|t| t["state"] == "running" && t["desired_state"] == "running");
        Ok((!failed.is_empty() && replaced).then_some(failed))
    })?;
    let err = failed[0]["error"].as_str().unwrap_or_default();
    assert!(err.contains("unhealthy: health check failed 2 times in a row") && err.contains("exit code 1"), "{err}");
    // A task is `starting` until its first check passes, then `running`.
    let script = "sleep 2; touch /tmp/ready; sleep 3600";
    c.cli_ok(0, &["service", "create", "--detach", "--name", "slow", "--health-cmd", "test -f /tmp/ready", "--health-interval", "200ms", "--health-retries", "100", "bb:1", "sh", "-c", script])?;
    let state = |c: &Cluster| -> anyhow::Result<String> {
        Ok(tasks(c, 0, "slow", false)?.first().and_then(|t| t["state"].as_str()).unwrap_or_default().to_string())
    };
    wait_for(T, "slow to be started but not yet healthy", || Ok((state(&c)? == "starting").then_some(())))?;
    wait_for(T, "slow to pass its check and run", || Ok((state(&c)? == "running").then_some(())))?;
    // Bad settings are refused.
    let out = c.cli(0, &["service", "create", "--detach", "--name", "x", "--health-cmd", "true", "--health-interval", "5ms", "bb:1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 100ms"), "{out:?}");
    let out = c.cli(0, &["service", "create", "--detach", "--name", "x", "--health-interval", "soon", "bb:1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("soon"), "{out:?}");
    Ok(())
}

#[test]
fn a_failing_update_rolls_back_on_its_own() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1)?;
    c.import_busybox(0, "bb:1")?;
    c.cli_ok(0, &[
        "service", "create", "--detach", "--name", "web", "--replicas", "3", "--update-parallelism", "1",
        "--update-failure-action", "rollback", "--update-monitor", "60s",
        "bb:1", "sleep", "3600",
    ])?;
    wait_spread(&c, 0, "web", 3, &["n0", "n1"])?;
    // The new command exits 1 at once: the update fails, and rolls back.
    c.cli_ok(0, &["service", "update", "web", "--detach", "--args", "sh", "-c", "exit 1"])?;
    let svc = wait_for(Duration::from_secs(60), "the update to roll back on its own", || {
        let s = c.cli_ok(0, &["service", "inspect", "web", "--format", "json"])?;
        let args = s["args"].to_string();
        Ok((s["rolling_back"] == true && args.contains("sleep")).then_some(s))
    })
    .with_context(|| c.log_tails())?;
    let status = svc["update_status"].as_str().unwrap_or_default();
    assert!(status.contains("rolled back") && status.contains("update failed"), "{svc}");
    wait_for(T, "three tasks running the old command again", || {
        let running: Vec<Value> = tasks(&c, 0, "web", false)?.into_iter().filter(|t| t["state"] == "running").collect();
        Ok((running.len() == 3).then_some(()))
    })?;
    // Bad ratios are refused.
    let out = c.cli(0, &["service", "update", "--update-max-failure-ratio", "1.5", "web"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("between 0 and 1"), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[test]
fn a_fork_bomb_in_a_service_stops_at_its_pids_limit() -> anyhow::Result<()> {
    let c = Cluster::start(1, 0)?;
    c.import_busybox(0, "bb:1")?;
    c.cli_ok(0, &["service", "create", "--detach", "--name", "calm", "bb:1", "sleep", "3600"])?;
    c.cli_ok(0, &[
        "service", "create", "--detach", "--name", "bomb", "--limit-pids", "32", "--restart-condition", "none",
        "bb:1", "sh", "-c", "while true; do sleep 1000 & done",
    ])?;
    // The shell gives up on EAGAIN at the limit: the task fails, not the node.
    let t = wait_for(T, "the bomb to stop at its limit", || {
        let ts = tasks(&c, 0, "bomb", true)?;
        Ok(ts.into_iter().find(|t| t["state"] == "failed"))
    })?;
    assert_eq!(t["exit_code"], 2, "{t}");
    let calm = tasks(&c, 0, "calm", false)?;
    assert!(calm.iter().any(|t| t["state"] == "running"), "{calm:?}");
    let out = c.cli(0, &["exec", "calm.1", "echo", "alive"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("alive"), "the node's other task must still answer");
    // The default is 4096; bad values are refused.
    let v = c.cli_ok(0, &["service", "inspect", "calm", "--format", "json"])?;
    assert_eq!(v["limits"]["pids"], 4096, "{v}");
    for bad in ["-2", "lots"] {
        let out = c.cli(0, &["service", "update", "--limit-pids", bad, "calm"]);
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("limit-pids"), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Every update is reversible: --read-only and back, and a restart
    // delay of 0 (at once) is kept apart from none given (backoff).
    for (args, key, want) in [
        (vec!["--read-only"], "read_only", serde_json::json!(true)),
        (vec!["--read-only=false"], "read_only", serde_json::json!(false)),
    ] {
        let mut a = vec!["service", "update", "--detach"];
        a.extend(args);
        a.push("calm");
        c.cli_ok(0, &[&a[..], &["--format", "json"]].concat())?;
        let v = c.cli_ok(0, &["service", "inspect", "calm", "--format", "json"])?;
        assert_eq!(v[key], want, "{a:?}: {v}");
    }
    c.cli_ok(0, &["service", "update", "--detach", "--restart-delay", "0", "calm", "--format", "json"])?;
    let v = c.cli_ok(0, &["service", "inspect", "calm", "--format", "json"])?;
    assert_eq!(v["restart"]["delay_ms"], 0, "{v}");
    Ok(())
}

/// Every list in a service spec can be edited in place: each `-rm` flag
/// removes what it names and only that, each `-add` adds; limits go back
/// to unlimited with 0; capabilities, rlimits and the seccomp profile
/// reach the task's processes. A `-rm` naming something the service lacks
/// is refused and changes nothing; so is a bad capability or profile sent
/// straight to the managers, past the CLI.
#[test]
fn update_add_rm_pairs_labels_and_confinement() -> anyhow::Result<()> {
    let c = Cluster::start(1, 0)?;
    c.import_busybox(0, "bb:1")?;
    let dir = tempfile::tempdir()?;
    for (kind, name) in [("secret", "s1"), ("secret", "s2"), ("config", "c1"), ("config", "c2")] {
        let f = dir.path().join(name);
        std::fs::write(&f, name)?;
        c.cli_ok(0, &[kind, "create", name, &f.display().to_string()])?;
    }
    c.cli_ok(0, &[
        "service", "create", "--name", "svc", "--env", "A=1", "--env", "B=2", "--label", "team=web", "--label", "tier=front",
        "--constraint", "node.labels.zone!=mars", "--constraint", "node.labels.rack!=r9",
        "--placement-pref", "spread=node.labels.zone", "--placement-pref", "spread=node.labels.rack",
        "--secret", "s1", "--secret", "s2", "--config", "c1", "--config", "c2",
        "--ulimit", "nofile=100:200", "--ulimit", "nproc=500", "--cap-add", "NET_ADMIN", "--cap-drop", "MKNOD",
        "--limit-memory", "64M", "--limit-cpu", "0.5", "--limit-pids", "100",
        "bb:1", "sleep", "3600",
    ])?;
    let inspect = || c.cli_ok(0, &["service", "inspect", "svc", "--format", "json"]);
    let task_sees = |cmd: &str| -> anyhow::Result<String> {
        let out = c.cli(0, &["exec", "svc.1", "sh", "-c", cmd]);
        anyhow::ensure!(out.status.success(), "exec: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let v = inspect()?;
    assert_eq!(v["labels"], serde_json::json!({"team": "web", "tier": "front"}), "{v}");
    assert_eq!(v["cap_add"], serde_json::json!(["CAP_NET_ADMIN"]), "{v}");
    let probe = "ulimit -n; ulimit -Hn; ulimit -u; grep -E '^(CapEff|Seccomp):' /proc/self/status; echo $A$B$C";
    // Docker's set with NET_ADMIN (bit 12), without MKNOD (27).
    assert_eq!(task_sees(probe)?, "100\n200\n500\nCapEff:\t00000000a00435fb\nSeccomp:\t2\n12\n");
    c.cli_ok(0, &[
        "service", "update", "svc", "--env-rm", "A", "--env-add", "C=3", "--label-rm", "tier", "--label-add", "owner=ops",
        "--constraint-rm", "node.labels.rack!=r9", "--placement-pref-rm", "spread=node.labels.rack",
        "--secret-rm", "s2", "--config-rm", "c2", "--ulimit-rm", "nproc", "--cap-drop", "NET_ADMIN",
        "--limit-memory", "0", "--limit-cpu", "0", "--limit-pids", "0", "--security-opt", "seccomp=unconfined",
    ])?;
    let v = inspect()?;
    assert_eq!(v["env"], serde_json::json!(["B=2", "C=3"]), "{v}");
    assert_eq!(v["labels"], serde_json::json!({"team": "web", "owner": "ops"}), "{v}");
    assert_eq!(v["constraints"], serde_json::json!(["node.labels.zone!=mars"]), "{v}");
    assert_eq!(v["placement_prefs"], serde_json::json!(["spread=node.labels.zone"]), "{v}");
    assert_eq!(v["secrets"], serde_json::json!(["s1"]), "{v}");
    assert_eq!(v["configs"], serde_json::json!(["c1"]), "{v}");
    assert_eq!(v["ulimits"], serde_json::json!([{"name": "nofile", "soft": 100, "hard": 200}]), "{v}");
    assert_eq!(v["cap_add"], serde_json::json!([]), "{v}");
    assert_eq!(v["cap_drop"], serde_json::json!(["CAP_MKNOD", "CAP_NET_ADMIN"]), "{v}");
    assert_eq!(v["limits"], serde_json::json!({"nano_cpus": 0, "memory_bytes": 0, "pids": -1}), "{v}");
    assert_eq!(v["seccomp"], "unconfined", "{v}");
    let sees = task_sees(probe)?;
    let lines: Vec<&str> = sees.lines().collect();
    // nproc is back to what the node gives processes: not 500.
    assert_eq!((lines.len(), lines[0], lines[1], lines[3], lines[4], lines[5]), (6, "100", "200", "CapEff:\t00000000a00425fb", "Seccomp:\t0", "23"), "{sees}");
    assert_ne!(lines[2], "500", "{sees}");
    assert_eq!(task_sees("ls /run/secrets; ls /c1 /c2 2>&1 | head -2")?.lines().next(), Some("s1"));
    // -rm of something the service lacks, and bad values: refused, no change.
    let version = v["version"].clone();
    for (args, needle) in [
        (vec!["--env-rm", "NOPE"], "NOPE"),
        (vec!["--label-rm", "nope"], "nope"),
        (vec!["--secret-rm", "s2"], "s2"),
        (vec!["--constraint-rm", "node.labels.rack!=r9"], "rack"),
        (vec!["--ulimit-rm", "core"], "core"),
        (vec!["--cap-add", "FLY"], "FLY"),
        (vec!["--ulimit-add", "nofile=9:1"], "soft limit"),
        (vec!["--security-opt", "seccomp=/nonexistent.json"], "nonexistent"),
        (vec!["--label", "=x"], "non-empty key"),
    ] {
        let mut a = vec!["service", "update", "--detach"];
        a.extend(args.iter().copied());
        a.push("svc");
        let out = c.cli(0, &a);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(String::from_utf8_lossy(&out.stderr).contains(needle), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(inspect()?["version"], version, "{args:?} changed the service");
    }
    // The managers check what any client sends, not just this CLI.
    let addr = c.hosts[0].addr();
    let certs = c.cert_dir();
    let refused: Vec<String> = shoal_tests::netns::in_netns(&c.hosts[0].netns.clone(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let mut client = shoal_tests::control_client(&addr, &certs).await?;
            let base = shoal_proto::control::ServiceSpec {
                name: "raw".into(),
                image: "bb:1".into(),
                mode: "replicated".into(),
                args: vec!["true".into()],
                ..Default::default()
            };
            let mut out = Vec::new();
            for spec in [
                shoal_proto::control::ServiceSpec { cap_add: vec!["CAP_FLY".into()], ..base.clone() },
                shoal_proto::control::ServiceSpec { seccomp: "{\"defaultAction\":\"SCMP_ACT_SOMETIMES\"}".into(), ..base.clone() },
                shoal_proto::control::ServiceSpec {
                    ulimits: vec![shoal_proto::control::Ulimit { name: "nofile".into(), soft: -1, hard: -1 }],
                    ..base.clone()
                },
            ] {
                let req = shoal_proto::control::CreateServiceRequest { spec: Some(spec) };
                match client.create_service(req).await {
                    Ok(_) => anyhow::bail!("a bad spec was accepted"),
                    Err(s) => out.push(format!("{:?}: {}", s.code(), s.message())),
                }
            }
            anyhow::Ok(out)
        })
    })?;
    assert!(refused[0].contains("InvalidArgument") && refused[0].contains("CAP_FLY"), "{refused:?}");
    assert!(refused[1].contains("unknown action"), "{refused:?}");
    assert!(refused[2].contains("can't be unlimited"), "{refused:?}");
    let ls = c.cli_ok(0, &["service", "ls", "--format", "json"])?;
    assert_eq!(ls.as_array().map(Vec::len), Some(1), "{ls}");
    Ok(())
}

/// A stop-first update (the default) starts each successor only once its
/// old task has stopped: every task logs its start and, on SIGTERM, its
/// stop to a bind-mounted file (a second after SIGTERM: a task that takes
/// a while to stop), and at no point do more than the service's replicas
/// run.
#[test]
fn a_stop_first_update_starts_each_successor_after_its_old_task_stopped() -> anyhow::Result<()> {
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir =
        Dir(std::env::temp_dir().join(format!("shoal-stopfirst-{}", shoal_tests::unique_id())));
    std::fs::create_dir_all(&dir.0)?;
    let events = dir.0.join("events");
    let c = Cluster::start(1, 1)?;
    c.import_busybox(0, "bb:1")?;
    let script = "id=$(cat /proc/sys/kernel/random/uuid); trap 'sleep 1; echo stop $id >> /log/events; exit 0' TERM; \
                  echo start $id >> /log/events; while :; do sleep 1 & wait; done";
    let mount = format!("type=bind,src={},dst=/log", dir.0.display());
    c.cli_ok(
        0,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "web",
            "--replicas",
            "2",
            "--update-parallelism",
            "1",
            "--mount",
            &mount,
            "bb:1",
            "sh",
            "-c",
            script,
        ],
    )?;
    wait_spread(&c, 0, "web", 2, &["n0", "n1"])?;
    c.cli_ok(
        0,
        &["service", "update", "web", "--detach", "--env-add", "V=2"],
    )?;
    let log = wait_for(T, "both tasks replaced: 4 starts and 2 stops", || {
        let log = std::fs::read_to_string(&events).unwrap_or_default();
        let starts = log.lines().filter(|l| l.starts_with("start ")).count();
        let stops = log.lines().filter(|l| l.starts_with("stop ")).count();
        if starts >= 4 && stops >= 2 {
            Ok(Some(log))
        } else {
            bail!("{log}")
        }
    })?;
    let mut running = 0i32;
    for line in log.lines() {
        running += if line.starts_with("start ") { 1 } else { -1 };
        assert!(running <= 2, "more tasks than replicas ran at once:\n{log}");
    }
    assert_eq!(log.lines().count(), 6, "{log}");
    Ok(())
}
