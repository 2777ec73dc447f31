//! The container runtime through the `shoal` binary: `shoal run`, `shoal
//! image`, the supervisor. Runs as root on a host with cgroup v1 or v2.
//! Every test has its own data dir and container names, and checks that a
//! container left nothing behind.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::process::Stdio;
use std::time::Duration;

use shoal_tests::runtime_support::{
    Corrupt, Layer, RtHost, TarBuilder, busybox_layer, cgroup_file, docker_archive, i386_hello, oci_archive, stderr,
    stdout, syscall_probe,
};
use shoal_tests::wait_for;

fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "exit {:?}\nstdout: {}\nstderr: {}", o.status.code(), stdout(o), stderr(o));
}

fn assert_clean(h: &RtHost, id: &str) {
    let left = h.leftovers(id);
    assert!(left.is_empty(), "container {id} left: {left:#?}");
}

#[test]
fn exit_code_and_stdio_pass_through() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let id = h.name("exit");
    let o = h.run(&["--rm", "--name", &id, "bb", "sh", "-c", "echo out; echo err >&2; exit 42"]).unwrap();
    assert_eq!(o.status.code(), Some(42), "{}", stderr(&o));
    assert_eq!(stdout(&o), "out\n");
    assert_eq!(stderr(&o), "err\n");
    assert_clean(&h, &id);
    // A command that doesn't exist: 127, as docker run.
    let o = h.run(&["--rm", "bb", "no-such-command"]).unwrap();
    assert_eq!(o.status.code(), Some(127));
    assert!(stderr(&o).contains("no-such-command"), "{}", stderr(&o));
}

#[test]
fn pid1_no_host_processes_only_lo_own_hostname() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    // Without init the command itself is pid 1.
    let o = h.run(&["--rm", "--no-init", "bb", "sh", "-c", "echo $$"]).unwrap();
    ok(&o);
    assert_eq!(stdout(&o).trim(), "1");
    // With init (the default), init is pid 1 and the command its child.
    let id = h.name("iso");
    let script =
        "echo pid=$$; echo procs=$(ls /proc | grep -c '^[0-9]'); echo net=$(ls /sys/class/net); echo host=$(hostname)";
    let o = h.run(&["--rm", "--name", &id, "bb", "sh", "-c", script]).unwrap();
    ok(&o);
    let out = stdout(&o);
    assert!(out.contains("pid=2\n"), "{out}");
    // init, sh, and the ls/grep of the count: no host process is visible.
    let procs: usize = out.lines().find_map(|l| l.strip_prefix("procs=")).unwrap().parse().unwrap();
    assert!(procs <= 5, "{out}");
    assert!(out.contains("net=lo\n"), "{out}");
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let theirs = out.lines().find_map(|l| l.strip_prefix("host=")).unwrap();
    assert_ne!(theirs, host.trim());
    assert_eq!(theirs, &id[..12.min(id.len())]);
    assert_clean(&h, &id);
}

/// A network namespace of the test's own, removed on drop.
struct TestNetns(String);

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn network_none_host_and_refused_overlay_names() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let ns = TestNetns(h.name("ns"));
    let veth = format!("v{}", &h.prefix[2..].chars().take(12).collect::<String>());
    let peer = format!("{veth}p");
    shoal_tests::sh("ip", &["netns", "add", &ns.0]).unwrap();
    shoal_tests::sh("ip", &["-n", &ns.0, "link", "add", &veth, "type", "veth", "peer", "name", &peer]).unwrap();
    let in_ns = |args: &[&str]| {
        // nsenter, not `ip netns exec`: that remounts /sys, cgroups and all.
        let mut c = std::process::Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", ns.0)).arg(shoal_tests::shoal_bin()).arg("run").args(args);
        c.env("SHOAL_DATA_DIR", &h.data_dir).stdin(Stdio::null()).output().unwrap()
    };
    // host: the caller's interfaces; none (the default, and explicit): lo.
    let o = in_ns(&["--rm", "--network", "host", "bb", "cat", "/proc/net/dev"]);
    ok(&o);
    assert!(stdout(&o).contains(&format!("{veth}:")), "{}", stdout(&o));
    for net in [&["--network", "none"][..], &[]] {
        let mut args = vec!["--rm"];
        args.extend_from_slice(net);
        args.extend_from_slice(&["bb", "cat", "/proc/net/dev"]);
        let o = in_ns(&args);
        ok(&o);
        assert!(!stdout(&o).contains(&veth) && stdout(&o).contains("lo:"), "{}", stdout(&o));
    }
    // An overlay network's name, and host with a remapped root: refused,
    // nothing created.
    let id = h.name("refused");
    let o = in_ns(&["--rm", "--name", &id, "--network", "front", "bb", "true"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("shoal service create --network front"), "{}", stderr(&o));
    let o = in_ns(&["--rm", "--name", &id, "--network", "host", "--userns-remap", "default", "bb", "true"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--userns-remap"), "{}", stderr(&o));
    assert_clean(&h, &id);
}

#[test]
fn user_flag_and_supplementary_groups() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let o = h.run(&["--rm", "--user", "65534", "bb", "sh", "-c", "id -u; grep CapEff /proc/self/status"]).unwrap();
    ok(&o);
    assert_eq!(stdout(&o), "65534\nCapEff:\t0000000000000000\n");
    let o = h.run(&["--rm", "--user", "app", "bb", "sh", "-c", "id -u; id -g; grep Groups /proc/self/status"]).unwrap();
    ok(&o);
    assert_eq!(stdout(&o), "1000\n1000\nGroups:\t2000 \n");
    let o = h.run(&["--rm", "--user", "1000:65534", "bb", "id"]).unwrap();
    ok(&o);
    assert!(stdout(&o).starts_with("uid=1000(app) gid=65534(nogroup)"), "{}", stdout(&o));
    let o = h.run(&["--rm", "--user", "nosuchuser", "bb", "id"]).unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unable to find user nosuchuser"), "{}", stderr(&o));
}

#[test]
fn least_privilege_caps_nnp_seccomp_readonly() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let o =
        h.run(&["--rm", "bb", "sh", "-c", "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status"]).unwrap();
    ok(&o);
    assert_eq!(stdout(&o), "CapEff:\t00000000a80425fb\nCapBnd:\t00000000a80425fb\nNoNewPrivs:\t1\nSeccomp:\t2\n");
    // Masked and read-only /proc paths, as Docker does; mount is denied.
    let script = "wc -c < /proc/timer_list; wc -c < /proc/keys; wc -c < /proc/interrupts; echo 1 > /proc/sys/vm/drop_caches && echo wrote-sys; \
                  mount -t tmpfs none /mnt && echo mounted; echo done";
    let o = h.run(&["--rm", "bb", "sh", "-c", script]).unwrap();
    ok(&o);
    assert_eq!(stdout(&o), "0\n0\n0\ndone\n", "stderr: {}", stderr(&o));
    // --read-only: the rootfs refuses writes; tmpfs mounts still work.
    let id = h.name("ro");
    let o = h
        .run(&[
            "--rm",
            "--read-only",
            "--tmpfs",
            "/scratch",
            "--name",
            &id,
            "bb",
            "sh",
            "-c",
            "touch /x || echo refused; touch /scratch/y && echo tmpfs-ok",
        ])
        .unwrap();
    ok(&o);
    assert_eq!(stdout(&o), "refused\ntmpfs-ok\n");
    assert!(stderr(&o).contains("Read-only file system"), "{}", stderr(&o));
    assert_clean(&h, &id);
}

#[test]
fn memory_limit_oom_is_reported() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let id = h.name("oom");
    // 100 MB in one shell variable under a 32 MiB limit.
    let o = h
        .run(&[
            "--rm",
            "--memory",
            "32M",
            "--name",
            &id,
            "bb",
            "sh",
            "-c",
            "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived ${#x}",
        ])
        .unwrap();
    assert_eq!(o.status.code(), Some(137), "stdout {} stderr {}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("out of memory"), "{}", stderr(&o));
    assert!(!stdout(&o).contains("survived"));
    assert_clean(&h, &id);
}

#[test]
fn fork_bomb_stops_at_pids_limit() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let id = h.name("bomb");
    // Forks forever; only the pids limit stops it (sh gives up on EAGAIN).
    let o = h
        .run(&["--rm", "--pids-limit", "32", "--name", &id, "bb", "sh", "-c", "while true; do sleep 1000 & done"])
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("can't fork"), "{}", stderr(&o));
    assert_clean(&h, &id);
}

#[test]
fn cpu_quota_is_applied() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let id = h.name("cpu");
    let mut child = h
        .cmd(&["run", "--rm", "--cpus", "0.5", "--name", &id, "bb", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let quota = cgroup_file("cpu", &id, "cpu.cfs_quota_us", "cpu.max");
    // The file appears when the cgroup is made, holding -1 (v2: "max")
    // until the runtime writes the quota a moment later: wait for a value.
    let q = wait_for(Duration::from_secs(10), "cpu quota set", || {
        Ok(fs::read_to_string(&quota).ok().filter(|q| q.trim() != "-1" && !q.starts_with("max")))
    })
    .unwrap();
    assert!(q.trim() == "50000" || q.trim() == "50000 100000", "{q}");
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    assert_clean(&h, &id);
}

#[test]
fn named_volume_persists_and_bind_mounts_work() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let vol = format!("{}-vol", h.prefix);
    let o = h.run(&["--rm", "-v", &format!("{vol}:/data"), "bb", "sh", "-c", "echo kept > /data/f"]).unwrap();
    ok(&o);
    let o = h
        .run(&["--rm", "-v", &format!("{vol}:/data:ro"), "bb", "sh", "-c", "cat /data/f; echo x > /data/g || echo ro"])
        .unwrap();
    ok(&o);
    assert_eq!(stdout(&o), "kept\nro\n");
    assert!(h.data_dir.join("volumes").join(&vol).join("_data/f").exists());
    // Binds: outside shoal's data dir only; --mount takes the services'
    // syntax; a tmpfs gets its size and mode.
    let host_dir = std::env::temp_dir().join(format!("{}-bind", h.prefix));
    fs::create_dir_all(&host_dir).unwrap();
    fs::write(host_dir.join("in"), "from host").unwrap();
    let o = h
        .run(&["--rm", "-v", &format!("{}:/b", host_dir.display()), "bb", "sh", "-c", "cat /b/in; echo back > /b/out"])
        .unwrap();
    let out = fs::read_to_string(host_dir.join("out"));
    let _ = fs::remove_dir_all(&host_dir);
    ok(&o);
    assert_eq!(stdout(&o), "from host");
    assert_eq!(out.unwrap(), "back\n");
    let o = h
        .run(&["--rm", "--mount", "type=tmpfs,dst=/t,tmpfs-size=1M,tmpfs-mode=750", "--mount", &format!("type=volume,src={vol},dst=/v,readonly"), "bb", "sh", "-c", "grep ' /t ' /proc/mounts; cat /v/f; touch /v/x || echo ro"])
        .unwrap();
    ok(&o);
    assert!(stdout(&o).starts_with("tmpfs /t tmpfs") && stdout(&o).contains("size=1024k") && stdout(&o).contains("mode=750"), "{}", stdout(&o));
    assert!(stdout(&o).ends_with("kept\nro\n"), "{}", stdout(&o));
    for (bad, want) in [
        (format!("{}:/x", h.data_dir.join("volumes").display()), "shoal's data dir"),
        ("Bad:/x".to_string(), "invalid volume name"),
        ("rel/dir:/x".to_string(), "absolute path"),
        (format!("/no-such-{}:/x", h.prefix), "does not exist"),
    ] {
        let o = h.run(&["--rm", "-v", &bad, "bb", "true"]).unwrap();
        assert!(!o.status.success());
        assert!(stderr(&o).contains(want), "-v {bad}: {}", stderr(&o));
    }
}

#[test]
fn init_forwards_sigterm_and_reaps_zombies() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    // An orphan is re-parented to init, which must reap it.
    let script = "(sleep 0 & echo $! > /tmp/p); p=$(cat /tmp/p); i=0; \
                  while [ -e /proc/$p ] && [ $i -lt 500 ]; do usleep 10000; i=$((i+1)); done; \
                  [ -e /proc/$p ] && echo zombie || echo reaped";
    let o = h.run(&["--rm", "bb", "sh", "-c", script]).unwrap();
    ok(&o);
    assert_eq!(stdout(&o), "reaped\n");
    // SIGTERM to `shoal run` reaches the workload through init at once.
    let id = h.name("term");
    let mut child = h
        .cmd(&["run", "--rm", "--name", &id, "bb", "sh", "-c", "echo ready; exec sleep 1000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut buf).unwrap();
    assert_eq!(&buf, b"ready\n");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_for(Duration::from_secs(5), "container to stop on SIGTERM", || Ok(child.try_wait()?)).unwrap();
    assert_eq!(status.code(), Some(143));
    assert_clean(&h, &id);
}

#[test]
fn image_config_and_multi_layer_oci_archive_with_whiteouts() {
    let h = RtHost::new().unwrap();
    let base = busybox_layer(&[("etc/removed", b"old"), ("opq/a", b"a"), ("keep/k", b"k")]).unwrap();
    let top = TarBuilder::new()
        .file("etc/.wh.removed", b"", 0o644)
        .unwrap()
        .dir("opq/")
        .unwrap()
        .file("opq/.wh..wh..opq", b"", 0o644)
        .unwrap()
        .file("opq/b", b"b", 0o644)
        .unwrap()
        .file("hello", b"hi from layer 2\n", 0o644)
        .unwrap()
        .finish()
        .unwrap();
    let layers = [Layer { tar: base, gzip: false }, Layer { tar: top, gzip: true }];
    let config = serde_json::json!({
        "Env": ["PATH=/bin", "GREETING=layered"],
        "Entrypoint": ["sh", "-c"],
        "Cmd": ["echo $GREETING; pwd; id -u; cat /hello; ls /opq; ls /etc/removed 2>&1 || true; ls /keep"],
        "WorkingDir": "/work",
        "User": "65534",
    });
    let archive = h.data_dir.join("oci.tar");
    fs::write(&archive, oci_archive("test/layered:v1", &layers, config, Corrupt::None).unwrap()).unwrap();
    let o = h.shoal(&["image", "load", archive.to_str().unwrap()]).unwrap();
    ok(&o);
    assert!(stdout(&o).contains("test/layered:v1"), "{}", stdout(&o));
    let id = h.name("oci");
    let o = h.run(&["--rm", "--name", &id, "test/layered:v1"]).unwrap();
    ok(&o);
    let out = stdout(&o);
    assert!(out.starts_with("layered\n/work\n65534\nhi from layer 2\nb\n"), "{out}");
    assert!(out.contains("No such file or directory"), "{out}");
    assert!(out.ends_with("k\n"), "{out}");
    // The archive's path works as IMAGE too (already loaded: found by name
    // or loaded again under the same digests).
    let o = h.run(&["--rm", archive.to_str().unwrap(), "echo by path"]).unwrap();
    ok(&o);
    assert_eq!(stdout(&o), "by path\n");
    assert_eq!(h.layer_count(), 2);
    // Command line overrides Cmd but keeps the Entrypoint.
    let o = h.run(&["--rm", "test/layered:v1", "echo override"]).unwrap();
    ok(&o);
    assert_eq!(stdout(&o), "override\n");
    assert_clean(&h, &id);
    // Listing shows the image.
    let o = h.shoal(&["image", "ls", "--json"]).unwrap();
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["name"], "test/layered:v1");
    assert_eq!(v[0]["layers"], 2);
}

#[test]
fn images_sharing_a_base_layer_share_one_copy() {
    let h = RtHost::new().unwrap();
    let base = busybox_layer(&[]).unwrap();
    let top_a = TarBuilder::new().file("a", b"A\n", 0o644).unwrap().finish().unwrap();
    let top_b = TarBuilder::new().file("b", b"B\n", 0o644).unwrap().finish().unwrap();
    // One as OCI with a gzipped base, one as docker save with a plain one:
    // the same diff id either way.
    let a = oci_archive(
        "share/a:1",
        &[Layer { tar: base.clone(), gzip: true }, Layer { tar: top_a, gzip: false }],
        serde_json::json!({"Cmd": ["cat", "/a"]}),
        Corrupt::None,
    )
    .unwrap();
    let b = docker_archive(
        "share/b:1",
        &[Layer { tar: base, gzip: false }, Layer { tar: top_b, gzip: false }],
        serde_json::json!({"Cmd": ["cat", "/b"]}),
    )
    .unwrap();
    fs::write(h.data_dir.join("a.tar"), a).unwrap();
    // docker save | gzip: the whole archive compressed.
    fs::write(h.data_dir.join("b.tar"), shoal_tests::runtime_support::gzip(&b).unwrap()).unwrap();
    ok(&h.shoal(&["image", "load", h.data_dir.join("a.tar").to_str().unwrap()]).unwrap());
    ok(&h.shoal(&["image", "load", h.data_dir.join("b.tar").to_str().unwrap()]).unwrap());
    assert_eq!(h.layer_count(), 3, "base + two tops");
    let o = h.run(&["--rm", "share/a:1"]).unwrap();
    ok(&o);
    assert_eq!(stdout(&o), "A\n");
    let o = h.run(&["--rm", "share/b:1"]).unwrap();
    ok(&o);
    assert_eq!(stdout(&o), "B\n");
    // Removing one image keeps the shared base for the other.
    ok(&h.shoal(&["image", "rm", "share/a:1"]).unwrap());
    assert_eq!(h.layer_count(), 2);
    let o = h.run(&["--rm", "share/b:1"]).unwrap();
    ok(&o);
    assert_eq!(stdout(&o), "B\n");
}

#[test]
fn run_from_a_tarball_path_imports_once() {
    let h = RtHost::new().unwrap();
    let tar = h.data_dir.join("rootfs.tar");
    fs::write(&tar, busybox_layer(&[]).unwrap()).unwrap();
    for _ in 0..2 {
        let o = h.run(&["--rm", tar.to_str().unwrap(), "echo", "ok"]).unwrap();
        ok(&o);
        assert_eq!(stdout(&o), "ok\n");
    }
    assert_eq!(h.layer_count(), 1);
    let idx: serde_json::Value =
        serde_json::from_slice(&fs::read(h.data_dir.join("images/index.json")).unwrap()).unwrap();
    assert_eq!(idx["sources"].as_object().unwrap().len(), 1);
}

/// Every bad archive is refused with a clear error, and leaves nothing
/// outside the store nor half-loaded inside it.
#[test]
fn bad_archives_are_refused_and_write_nothing() {
    let h = RtHost::new().unwrap();
    let outside = h.data_dir.join("outside");
    fs::create_dir_all(&outside).unwrap();
    let victim = outside.join("victim");
    let victim_s = victim.to_str().unwrap().to_string();
    let outside_s = outside.to_str().unwrap().to_string();
    let good = busybox_layer(&[]).unwrap();
    let import_cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("dotdot", TarBuilder::new().file("../../escape", b"x", 0o644).unwrap().finish().unwrap(), "'..'"),
        ("absolute", TarBuilder::new().file(&victim_s, b"x", 0o644).unwrap().finish().unwrap(), "absolute path"),
        (
            "symlink",
            TarBuilder::new()
                .symlink("ln", &outside_s)
                .unwrap()
                .file("ln/victim", b"x", 0o644)
                .unwrap()
                .finish()
                .unwrap(),
            "through the symlink",
        ),
        ("hardlink", TarBuilder::new().hardlink("hl", &victim_s).unwrap().finish().unwrap(), "points out of the layer"),
        (
            "hardlink-up",
            TarBuilder::new().hardlink("hl", "../../../etc/passwd").unwrap().finish().unwrap(),
            "points out of the layer",
        ),
        ("truncated", good[..good.len() / 2 + 100].to_vec(), "truncated"),
        (
            "symlink-chain",
            TarBuilder::new()
                .symlink("a", "b")
                .unwrap()
                .symlink("b", &outside_s)
                .unwrap()
                .file("a/victim", b"x", 0o644)
                .unwrap()
                .finish()
                .unwrap(),
            "through the symlink",
        ),
        (
            "hardlink-to-symlink-out",
            TarBuilder::new().symlink("ln", &victim_s).unwrap().hardlink("hl", "ln").unwrap().file("hl", b"x", 0o644).unwrap().finish().unwrap(),
            "",
        ),
        ("whiteout-dotdot", TarBuilder::new().file(".wh...", b"", 0o644).unwrap().finish().unwrap(), "whiteout"),
        ("whiteout-dir-dotdot", TarBuilder::new().dir("d/").unwrap().file("d/.wh...", b"", 0o644).unwrap().finish().unwrap(), "whiteout"),
        ("whiteout-dot", TarBuilder::new().file(".wh..", b"", 0o644).unwrap().finish().unwrap(), "whiteout"),
    ];
    let mut layers_before = h.layer_count();
    for (what, bytes, want) in import_cases {
        let p = h.data_dir.join(format!("{what}.tar"));
        fs::write(&p, bytes).unwrap();
        let o = h.shoal(&["image", "import", p.to_str().unwrap(), &format!("bad/{what}")]).unwrap();
        if want.is_empty() {
            // Harmless once written (links stay inside the layer): what
            // matters is that nothing outside changed.
            assert!(!victim.exists(), "{what} wrote outside the store");
            assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "{what} wrote outside the store");
            ok(&h.shoal(&["image", "rm", &format!("bad/{what}")]).unwrap());
            layers_before = h.layer_count();
            continue;
        }
        assert!(!o.status.success(), "{what} was accepted");
        assert!(stderr(&o).contains(want), "{what}: {}", stderr(&o));
        assert!(!victim.exists(), "{what} wrote outside the store");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "{what} wrote outside the store");
        assert_eq!(h.store_tmp_count(), 0, "{what} left work files");
        assert_eq!(h.layer_count(), layers_before, "{what} left a layer");
    }
    let top = TarBuilder::new().file("t", b"t", 0o644).unwrap().finish().unwrap();
    let layers = || [Layer { tar: good.clone(), gzip: true }, Layer { tar: top.clone(), gzip: false }];
    let archive_cases = [
        (
            "digest",
            oci_archive("bad/digest:1", &layers(), serde_json::json!({}), Corrupt::LayerDigest).unwrap(),
            "digest mismatch",
        ),
        (
            "missing",
            oci_archive("bad/missing:1", &layers(), serde_json::json!({}), Corrupt::MissingLayer).unwrap(),
            "missing blob",
        ),
        ("not-an-image", TarBuilder::new().file("x", b"x", 0o644).unwrap().finish().unwrap(), "neither manifest.json"),
    ];
    for (what, bytes, want) in archive_cases {
        let p = h.data_dir.join(format!("{what}.tar"));
        fs::write(&p, bytes).unwrap();
        let o = h.shoal(&["image", "load", p.to_str().unwrap()]).unwrap();
        assert!(!o.status.success(), "{what} was accepted");
        assert!(stderr(&o).contains(want), "{what}: {}", stderr(&o));
        assert_eq!(h.store_tmp_count(), 0, "{what} left work files");
        let o = h.shoal(&["image", "ls", "--json"]).unwrap();
        assert_eq!(stdout(&o).trim(), "[]", "{what} left an image");
    }
    // A layer whose digest was fine but is loaded with the wrong diff id:
    // nothing is kept of it either.
    assert!(!victim.exists());
}

/// A gzip bomb (64 MiB of zeros in 64 KiB) stops at the layer limit with
/// an error that says so, and leaves nothing: neither a layer nor work
/// files. Several layers that each fit stop at the image limit.
#[test]
fn gzip_bombs_stop_at_the_size_limits() {
    let h = RtHost::new().unwrap();
    let zeros = vec![0u8; 64 << 20];
    let bomb = TarBuilder::new().file("zeros", &zeros, 0o644).unwrap().finish().unwrap();
    let bomb_gz = shoal_tests::runtime_support::gzip(&bomb).unwrap();
    assert!(bomb_gz.len() < 1 << 20, "{}", bomb_gz.len());
    let p = h.data_dir.join("bomb.tar.gz");
    fs::write(&p, &bomb_gz).unwrap();
    let layers_before = h.layer_count();
    let o = h.shoal(&["image", "import", "--max-layer-size", "16M", p.to_str().unwrap(), "bomb:1"]).unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unpacks to more than 16777216 bytes, the layer limit"), "{}", stderr(&o));
    assert_eq!(h.store_tmp_count(), 0);
    assert_eq!(h.layer_count(), layers_before);
    // Within the layer limit it loads.
    ok(&h.shoal(&["image", "import", "--max-layer-size", "65M", p.to_str().unwrap(), "bomb:1"]).unwrap());
    // Three 8 MiB layers under a 20 MiB image limit: the third is refused,
    // and the image is not recorded.
    let eight = |name: &str| TarBuilder::new().file(name, &zeros[..8 << 20], 0o644).unwrap().finish().unwrap();
    let layers = [Layer { tar: eight("a"), gzip: true }, Layer { tar: eight("b"), gzip: true }, Layer { tar: eight("c"), gzip: true }];
    let archive = h.data_dir.join("three.tar");
    fs::write(&archive, oci_archive("three:1", &layers, serde_json::json!({}), Corrupt::None).unwrap()).unwrap();
    let o = h.shoal(&["image", "load", "--max-image-size", "20M", archive.to_str().unwrap()]).unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("the image limit"), "{}", stderr(&o));
    assert_eq!(h.store_tmp_count(), 0);
    let o = h.shoal(&["image", "ls", "--json"]).unwrap();
    assert!(!stdout(&o).contains("three"), "{}", stdout(&o));
    // A limit that isn't a size is refused.
    let o = h.shoal(&["image", "load", "--max-image-size", "lots", archive.to_str().unwrap()]).unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("lots"), "{}", stderr(&o));
}

#[test]
fn supervisor_outlives_its_parent_and_reattaches() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let id = h.name("sup");
    let ctl = format!("{}-ctl", h.prefix);
    let script = "while [ ! -e /ctl/stop ]; do echo tick; usleep 20000; done; echo bye; exit 7";
    let mut parent = h
        .cmd(&["run", "--supervised", "--name", &id, "-v", &format!("{ctl}:/ctl"), "bb", "sh", "-c", script])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let dir = h.data_dir.join("containers").join(&id);
    let log = dir.join("container.log");
    let size = |p: &std::path::Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    wait_for(Duration::from_secs(10), "first log line", || Ok((size(&log) > 0).then_some(()))).unwrap();
    // Kill the process that started the container (the "agent").
    parent.kill().unwrap();
    parent.wait().unwrap();
    let init_pid: i32 = fs::read_to_string(dir.join("init.pid")).unwrap().trim().parse().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{init_pid}")).exists(), "container died with its parent");
    let after_kill = size(&log);
    wait_for(Duration::from_secs(10), "log to keep growing", || Ok((size(&log) > after_kill + 20).then_some(())))
        .unwrap();
    // A new process reattaches, then the container exits: it sees the status.
    let mut attach =
        h.cmd(&["internal-attach", "--rm", &id]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for(Duration::from_secs(10), "attach to start following", || Ok(attach.try_wait()?.is_none().then_some(())))
        .unwrap();
    fs::write(h.data_dir.join("volumes").join(&ctl).join("_data/stop"), "").unwrap();
    let status = wait_for(Duration::from_secs(10), "attached container to exit", || Ok(attach.try_wait()?)).unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(attach.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert_eq!(status.code(), Some(7), "{out}");
    assert!(out.contains("tick\n") && out.ends_with("bye\n"), "{out}");
    assert_clean(&h, &id);
}

#[test]
fn detached_run_logs_and_records_exit() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let id = h.name("det");
    let o = h.run(&["-d", "--name", &id, "bb", "sh", "-c", "echo detached; exit 3"]).unwrap();
    ok(&o);
    assert_eq!(stdout(&o).trim(), id);
    let exit = h.data_dir.join("containers").join(&id).join("exit.json");
    let rec = wait_for(Duration::from_secs(10), "exit record", || Ok(fs::read(&exit).ok())).unwrap();
    let rec: serde_json::Value = serde_json::from_slice(&rec).unwrap();
    assert_eq!(rec["status"]["code"], 3);
    let log = fs::read_to_string(h.data_dir.join("containers").join(&id).join("container.log")).unwrap();
    assert_eq!(log, "detached\n");
    let o = h.shoal(&["internal-attach", "--rm", &id]).unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert_clean(&h, &id);
}

/// The agent's seam: a LinuxExecutor starts a task under a supervisor; a
/// second executor (an agent after a restart) finds it running, stops it
/// (SIGTERM through init) and removes it.
#[test]
fn linux_executor_lifecycle_and_reattach() {
    use shoal_agent::executor::{ContainerState, Executor, LinuxExecutor};
    use shoal_agent::spec::RunRequest;
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let id = h.name("exec");
    let bin = shoal_tests::shoal_bin();
    let first = LinuxExecutor::new(&h.data_dir, &bin).unwrap();
    let req = RunRequest {
        id: id.clone(),
        image: "bb".into(),
        // httpd as the workload: with init forwarding SIGTERM it stops at once.
        command: vec!["sh".into(), "-c".into(), "echo up; exec httpd -f -p 8080 -h /".into()],
        ..Default::default()
    };
    first.prepare(&req).unwrap();
    assert_eq!(first.state(&id).unwrap(), ContainerState::Created);
    first.start(&id).unwrap();
    assert_eq!(first.state(&id).unwrap(), ContainerState::Running);
    drop(first);
    let second = LinuxExecutor::new(&h.data_dir, &bin).unwrap();
    assert_eq!(second.list().unwrap(), vec![id.clone()]);
    assert_eq!(second.state(&id).unwrap(), ContainerState::Running);
    assert_eq!(second.wait(&id, Some(Duration::from_millis(50))).unwrap(), None);
    assert!(second.remove(&id).is_err(), "removing a running container");
    let log_path = h.data_dir.join("containers").join(&id).join("container.log");
    wait_for(Duration::from_secs(10), "httpd to start", || {
        Ok(fs::read_to_string(&log_path).ok().filter(|l| l == "up\n"))
    })
    .unwrap();
    let t = std::time::Instant::now();
    let status = second.shutdown(&id, Duration::from_secs(10)).unwrap();
    assert_eq!(status.code, 143, "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "httpd took {:?} to stop on SIGTERM", t.elapsed());
    assert_eq!(second.state(&id).unwrap(), ContainerState::Exited(status));
    let log = fs::read_to_string(h.data_dir.join("containers").join(&id).join("container.log")).unwrap();
    assert_eq!(log, "up\n");
    second.remove(&id).unwrap();
    assert_clean(&h, &id);
}

/// A workload that ignores SIGTERM is killed once the grace period is over.
#[test]
fn stop_escalates_to_sigkill_after_grace() {
    use shoal_agent::executor::{Executor, LinuxExecutor};
    use shoal_agent::spec::RunRequest;
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let id = h.name("stubborn");
    let exec = LinuxExecutor::new(&h.data_dir, &shoal_tests::shoal_bin()).unwrap();
    let req = RunRequest {
        id: id.clone(),
        image: "bb".into(),
        command: vec!["sh".into(), "-c".into(), "trap '' TERM; echo up; while true; do usleep 10000; done".into()],
        ..Default::default()
    };
    exec.prepare(&req).unwrap();
    exec.start(&id).unwrap();
    let log_path = h.data_dir.join("containers").join(&id).join("container.log");
    wait_for(Duration::from_secs(10), "trap to be set", || {
        Ok(fs::read_to_string(&log_path).ok().filter(|l| l == "up\n"))
    })
    .unwrap();
    let t = std::time::Instant::now();
    let status = exec.shutdown(&id, Duration::from_millis(300)).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300), "killed before the grace period");
    assert_eq!(status.code, 137, "{status:?}");
    exec.remove(&id).unwrap();
    assert_clean(&h, &id);
}

#[test]
fn minimal_dev() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let script = "ls /dev | tr '\\n' ' '; echo; head -c 4 /dev/zero | wc -c; echo x > /dev/null && echo null-ok; \
                  head -c 8 /dev/urandom | wc -c; echo > /dev/full || echo full-refuses; grep -c ' /dev/pts devpts' /proc/mounts";
    let o = h.run(&["--rm", "bb", "sh", "-c", script]).unwrap();
    ok(&o);
    let out = stdout(&o);
    let mut lines = out.lines();
    let devs: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    for d in
        ["null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "ptmx", "fd", "stdin", "stdout", "stderr"]
    {
        assert!(devs.contains(&d), "/dev lacks {d}: {devs:?}");
    }
    // Nothing of the host's /dev (disks, consoles) is there.
    assert!(devs.len() <= 14, "{devs:?}");
    assert_eq!(lines.collect::<Vec<_>>(), ["4", "null-ok", "8", "full-refuses", "1"]);
}

/// CAP_MKNOD is in Docker's set, so a container can make a node for the
/// host's disk; opening it must still fail (devices cgroup on v1, nodev
/// mounts otherwise).
#[test]
fn host_devices_cannot_be_opened() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let parts = fs::read_to_string("/proc/partitions").unwrap();
    let (major, minor) = parts
        .lines()
        .skip(2)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4).then(|| (f[0].to_string(), f[1].to_string()))
        })
        .expect("a block device");
    let vol = format!("{}-dev", h.prefix);
    let script = format!(
        "mknod /tmp/disk b {major} {minor}; head -c 512 /tmp/disk | wc -c; \
         mknod /data/disk b {major} {minor}; head -c 512 /data/disk | wc -c; echo x > /dev/null && echo null-ok"
    );
    let o = h.run(&["--rm", "-v", &format!("{vol}:/data"), "bb", "sh", "-c", &script]).unwrap();
    ok(&o);
    assert_eq!(stdout(&o), "0\n0\nnull-ok\n", "stderr: {}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("head: /tmp/disk: Operation not permitted") || err.contains("head: /tmp/disk: Permission denied"),
        "{err}"
    );
}

/// Writes the syscall probes into `dir` (mode 0755): each makes one raw
/// system call and exits with its errno (0: allowed and succeeded).
#[cfg(target_arch = "x86_64")]
fn write_probes(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir).unwrap();
    const CLONE_NEWUSER: i32 = 0x1000_0000;
    for (name, bytes) in [
        ("getpid", syscall_probe(39, 0, 0, 0)),
        ("clone-newuser", syscall_probe(56, CLONE_NEWUSER | 17, 0, 0)),
        ("unshare-newuser", syscall_probe(272, CLONE_NEWUSER, 0, 0)),
        // io_uring_setup(1, NULL): EFAULT where the call reaches the kernel.
        ("io-uring-setup", syscall_probe(425, 1, 0, 0)),
        ("kexec-load", syscall_probe(246, 0, 0, 0)),
        // bpf(BPF_PROG_LOAD, NULL, 0)
        ("bpf", syscall_probe(321, 5, 0, 0)),
        ("i386", i386_hello()),
    ] {
        let p = dir.join(name);
        fs::write(&p, bytes).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// Docker's default seccomp profile, as an allow list: user namespaces
/// (by clone or unshare), io_uring, kexec and bpf are refused with EPERM;
/// an i386 program runs, by its own syscall numbers, and doesn't take the
/// container's init down. Unconfined, the same calls reach the kernel;
/// with CAP_SYS_ADMIN added, the profile lets namespaces through as
/// Docker's does. A profile file (OCI format) is applied as written, and a
/// bad one is refused before anything is created.
#[test]
#[cfg(target_arch = "x86_64")]
fn seccomp_default_allow_list_unconfined_and_custom_profiles() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    // Outside the data dir: shoal refuses to bind-mount its own state.
    let tmp = tempfile::tempdir().unwrap();
    let probes = tmp.path().join("probes");
    write_probes(&probes);
    let script = "for p in getpid clone-newuser unshare-newuser io-uring-setup kexec-load bpf; do /probe/$p; echo \"$p $?\"; done; \
                  /probe/i386; echo \"i386 $?\"; grep -E '^Seccomp:' /proc/self/status";
    let bind = format!("{}:/probe:ro", probes.display());
    let run = |extra: &[&str]| {
        let mut args = vec!["--rm", "-v", &bind];
        args.extend_from_slice(extra);
        args.extend(["bb", "sh", "-c", script]);
        let o = h.run(&args).unwrap();
        ok(&o);
        stdout(&o)
    };
    let out = run(&[]);
    for want in ["getpid 0", "clone-newuser 1", "unshare-newuser 1", "io-uring-setup 1", "kexec-load 1", "bpf 1", "i386 ok", "i386 0", "Seccomp:\t2"] {
        assert!(out.lines().any(|l| l == want), "default profile: want {want:?} in\n{out}");
    }
    let out = run(&["--security-opt", "seccomp=unconfined"]);
    for want in ["clone-newuser 0", "unshare-newuser 0", "io-uring-setup 14", "Seccomp:\t0"] {
        assert!(out.lines().any(|l| l == want), "unconfined: want {want:?} in\n{out}");
    }
    let out = run(&["--cap-add", "SYS_ADMIN"]);
    for want in ["clone-newuser 0", "unshare-newuser 0", "io-uring-setup 1", "kexec-load 1"] {
        assert!(out.lines().any(|l| l == want), "CAP_SYS_ADMIN: want {want:?} in\n{out}");
    }
    let profile = h.data_dir.join("profile.json");
    fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
            "syscalls":[{"names":["getpid"],"action":"SCMP_ACT_ERRNO","errnoRet":42}]}"#,
    )
    .unwrap();
    let opt = format!("seccomp={}", profile.display());
    let out = run(&["--security-opt", &opt]);
    assert!(out.lines().any(|l| l == "getpid 42"), "{out}");
    assert!(out.lines().any(|l| l == "clone-newuser 0"), "{out}");
    // Not listed: i386 is killed (libseccomp's answer to a foreign arch),
    // the program alone; the shell and init go on.
    assert!(out.lines().any(|l| l == "i386 159"), "{out}");
    for (bad, want) in [
        (r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_PERHAPS"}]}"#, "unknown action"),
        ("{not json", "not valid JSON"),
    ] {
        fs::write(&profile, bad).unwrap();
        let id = h.name("badprof");
        let o = h.run(&["--rm", "--name", &id, "--security-opt", &opt, "bb", "true"]).unwrap();
        assert!(!o.status.success());
        assert!(stderr(&o).contains(want), "{}", stderr(&o));
        assert_clean(&h, &id);
    }
    let o = h.run(&["--rm", "--security-opt", "apparmor=unconfined", "bb", "true"]).unwrap();
    assert!(stderr(&o).contains("unsupported --security-opt"), "{}", stderr(&o));
}

/// --cap-add/--cap-drop change the workload's capability set as Docker's
/// do; --ulimit sets rlimits; bad names are refused.
#[test]
fn caps_and_ulimits() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let caps = |extra: &[&str]| {
        let mut args = vec!["--rm"];
        args.extend_from_slice(extra);
        args.extend(["bb", "sh", "-c", "grep -E '^CapEff:' /proc/self/status"]);
        let o = h.run(&args).unwrap();
        ok(&o);
        stdout(&o)
    };
    assert_eq!(caps(&["--cap-drop", "ALL", "--cap-add", "net_bind_service"]), "CapEff:\t0000000000000400\n");
    // Docker's set without NET_RAW (bit 13) and MKNOD (27), with NET_ADMIN (12).
    assert_eq!(caps(&["--cap-drop", "NET_RAW", "--cap-drop", "CAP_MKNOD", "--cap-add", "NET_ADMIN"]), "CapEff:\t00000000a00415fb\n");
    let o = h.run(&["--rm", "--cap-add", "FLY", "bb", "true"]).unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown capability \"FLY\""), "{}", stderr(&o));
    let o = h
        .run(&["--rm", "--ulimit", "nofile=100:200", "--ulimit", "nproc=50", "bb", "sh", "-c", "ulimit -n; ulimit -Hn; ulimit -u"])
        .unwrap();
    ok(&o);
    assert_eq!(stdout(&o), "100\n200\n50\n");
    for (bad, want) in [("nofile=2:1", "must not exceed"), ("files=1", "unknown name"), ("nofile", "NAME=SOFT")] {
        let o = h.run(&["--rm", "--ulimit", bad, "bb", "true"]).unwrap();
        assert!(!o.status.success());
        assert!(stderr(&o).contains(want), "{bad}: {}", stderr(&o));
    }
}

/// --userns-remap: container root is host uid START. Inside, it is root
/// and owns its files (the image's layers are idmapped, not copied);
/// outside, its processes and the files it writes to its rootfs are START.
/// Volumes and binds keep their owners as the container sees them (host
/// root's 0600 file is readable by container root, and what it writes to a
/// volume is root's on the host). It can still bind port 80, and the
/// default seccomp profile still applies.
#[test]
fn userns_remap_maps_root_to_an_unprivileged_range() {
    use std::os::unix::fs::MetadataExt;
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let id = h.name("userns");
    let start = 1_000_000 + (std::process::id() % 1000) * 65536;
    let remap = format!("{start}:65536");
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    fs::write(&secret, "s3cret").unwrap();
    fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let vol = format!("{}-uvol", h.prefix);
    let bind = format!("{}:/secret:ro", secret.display());
    let script = "id -u; cat /proc/self/uid_map | tr -s ' '; stat -c %u /bin/busybox /dev /tmp; cat /secret; echo; \
                  echo data > /data/f && stat -c %u /data/f; \
                  nc -l -p 80 </dev/null & sleep 0.2; netstat -ltn | grep -q ':80 ' && echo port-80-ok; kill %1; \
                  /bin/sh -c 'mount -t tmpfs none /mnt' 2>/dev/null || echo mount-refused; grep -E '^Seccomp:' /proc/self/status; \
                  touch /made-here; sleep 1000";
    let child = h
        .cmd(&["run", "--rm", "--userns-remap", &remap, "--name", &id, "-v", &format!("{vol}:/data"), "-v", &bind, "bb", "sh", "-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Its processes are START on the host.
    let procs = cgroup_file("pids", &id, "cgroup.procs", "cgroup.procs");
    let pids: Vec<u32> = wait_for(Duration::from_secs(10), "the container to run", || {
        let p: Vec<u32> = fs::read_to_string(&procs).unwrap_or_default().lines().filter_map(|l| l.parse().ok()).collect();
        Ok((p.len() >= 2).then_some(p))
    })
    .unwrap();
    for pid in &pids {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or_default().to_string();
        assert!(uid_line.split_whitespace().nth(1) == Some(&start.to_string()) || status.is_empty(), "pid {pid}: {uid_line}");
    }
    // What it wrote to its rootfs is START's on the host.
    let made = h.data_dir.join("containers").join(&id).join("upper/made-here");
    wait_for(Duration::from_secs(10), "the container's file", || Ok(made.exists().then_some(()))).unwrap();
    assert_eq!(fs::metadata(&made).unwrap().uid(), start);
    let vol_file = h.data_dir.join("volumes").join(&vol).join("_data/f");
    let vol_uid = fs::metadata(&vol_file).map(|m| m.uid());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        text,
        format!("0\n 0 {start} 65536\n0\n0\n0\ns3cret\n0\nport-80-ok\nmount-refused\nSeccomp:\t2\n"),
        "{text}"
    );
    // Written as container root through the idmapped volume: host root's.
    assert_eq!(vol_uid.ok(), Some(0), "{}", vol_file.display());
    assert_clean(&h, &id);
    for bad in ["0:65536", "100000:10", "lots"] {
        let o = h.run(&["--rm", "--userns-remap", bad, "bb", "true"]).unwrap();
        assert!(!o.status.success() && stderr(&o).contains("--userns-remap"), "{bad}: {}", stderr(&o));
    }
}

/// Loads `bb-dev`: busybox plus a layer shipping a block device (loop0,
/// 7:0) and a copy of /dev/null (1:3) at the top of the rootfs.
fn load_image_with_devices(h: &RtHost) {
    let devs = TarBuilder::new()
        .device("imgdisk", tar::EntryType::Block, 7, 0)
        .unwrap()
        .device("imgnull", tar::EntryType::Char, 1, 3)
        .unwrap()
        .finish()
        .unwrap();
    let layers = [Layer { tar: busybox_layer(&[]).unwrap(), gzip: false }, Layer { tar: devs, gzip: false }];
    let archive = h.data_dir.join("bb-dev.tar");
    fs::write(&archive, oci_archive("bb-dev", &layers, serde_json::json!({}), Corrupt::None).unwrap()).unwrap();
    ok(&h.shoal(&["image", "load", archive.to_str().unwrap()]).unwrap());
}

/// The rootfs is nodev and nosuid, and stays so when --read-only remounts
/// it (a plain MS_REMOUNT would reset both): device nodes an image ships
/// never open, even one the devices cgroup would allow. Read-only binds
/// keep their source's flags and are read-only all the way down.
#[test]
fn read_only_rootfs_keeps_nodev_nosuid_and_image_devices_stay_closed() {
    let h = RtHost::new().unwrap();
    load_image_with_devices(&h);
    let vol = format!("{}-ro", h.prefix);
    let script = "ls -l /imgdisk /imgnull | cut -c1; head -c 1 /imgdisk | wc -c; head -c 1 /imgnull | wc -c; \
                  awk '$5 == \"/\" || $5 == \"/data\" {print $5, $6}' /proc/self/mountinfo; \
                  touch /data/x || echo data-refused";
    for ro in [true, false] {
        let mut args = vec!["--rm", "-v"];
        let m = format!("{vol}:/data:ro");
        args.push(&m);
        if ro {
            args.push("--read-only");
        }
        args.extend(["bb-dev", "sh", "-c", script]);
        let o = h.run(&args).unwrap();
        ok(&o);
        let out = stdout(&o);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(&lines[..4], ["b", "c", "0", "0"], "read-only {ro}: {out}\n{}", stderr(&o));
        assert!(stderr(&o).contains("head: /imgdisk: Permission denied"), "{}", stderr(&o));
        assert!(stderr(&o).contains("head: /imgnull: Permission denied"), "{}", stderr(&o));
        let root = lines.iter().find(|l| l.starts_with("/ ")).unwrap();
        let opts: Vec<&str> = root[2..].split(',').collect();
        for want in ["nosuid", "nodev"] {
            assert!(opts.contains(&want), "read-only {ro}: / is mounted {root}");
        }
        assert_eq!(opts.contains(&"ro"), ro, "/ is mounted {root}");
        let data = lines.iter().find(|l| l.starts_with("/data ")).unwrap();
        assert!(data.split(',').any(|o| o.ends_with("ro")), "{data}");
        assert_eq!(lines.last(), Some(&"data-refused"));
    }
}

/// On a pure cgroup v2 host there is no devices controller: an eBPF
/// program attached to the container's cgroup refuses to open a device
/// node made with CAP_MKNOD on /dev (a mount without nodev), while
/// /dev/null works. Shown in a mount namespace where /sys/fs/cgroup is a
/// lone cgroup2 mount, which is how such a host looks to the runtime. A
/// limit that hierarchy can't enforce is refused with a clear error.
#[test]
fn devices_are_filtered_on_a_pure_cgroup_v2_host() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let id = h.name("v2");
    let v2_only = |args: &[&str]| {
        let mut c = std::process::Command::new("unshare");
        c.args([
            "-m",
            "sh",
            "-c",
            "mount --make-rprivate / && umount -l /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup && exec \"$@\"",
            "v2-only",
        ])
        .arg(shoal_tests::shoal_bin())
        .args(args)
        .env("SHOAL_DATA_DIR", &h.data_dir)
        .stdin(Stdio::null());
        c.output().unwrap()
    };
    let has_pids = fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .or_else(|_| fs::read_to_string("/sys/fs/cgroup/cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .any(|c| c == "pids");
    let script = "grep -c '^0::/shoal/' /proc/self/cgroup; mknod /dev/disk b 7 0 && echo made; \
                  head -c 1 /dev/disk | wc -c; echo x > /dev/null && echo null-ok; exit 3";
    let o = v2_only(&["run", "--rm", "--pids-limit", "-1", "--name", &id, "bb", "sh", "-c", script]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(stdout(&o), "1\nmade\n0\nnull-ok\n");
    assert!(stderr(&o).contains("head: /dev/disk: Operation not permitted"), "{}", stderr(&o));
    assert_clean(&h, &id);
    if !has_pids {
        // A hybrid host keeps pids on v1: the default limit can't be set.
        let o = v2_only(&["run", "--rm", "bb", "true"]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains("no pids controller"), "{}", stderr(&o));
    }
}

/// `shoal run` killed with SIGKILL takes its container with it; the next
/// `shoal run` removes what it left (directory, cgroup).
#[test]
fn killed_foreground_run_is_cleaned_up() {
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let id = h.name("killed");
    let mut child = h.cmd(&["run", "--rm", "--name", &id, "bb", "sleep", "1000"]).spawn().unwrap();
    let procs = cgroup_file("pids", &id, "cgroup.procs", "cgroup.procs");
    wait_for(Duration::from_secs(10), "container to run", || {
        Ok(fs::read_to_string(&procs).ok().filter(|p| p.lines().count() >= 2))
    })
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for(Duration::from_secs(10), "container processes to die", || {
        Ok(fs::read_to_string(&procs).ok().filter(|p| p.trim().is_empty()))
    })
    .unwrap();
    assert!(!h.leftovers(&id).is_empty(), "nothing to clean up?");
    ok(&h.run(&["--rm", "bb", "true"]).unwrap());
    assert_clean(&h, &id);
}

/// A supervisor killed with SIGKILL: the executor reports the container as
/// killed, kills what is left of it, and can remove it.
#[test]
fn lost_supervisor_is_recovered() {
    use shoal_agent::executor::{ContainerState, Executor, LinuxExecutor};
    use shoal_agent::spec::RunRequest;
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let id = h.name("lost");
    let exec = LinuxExecutor::new(&h.data_dir, &shoal_tests::shoal_bin()).unwrap();
    let req = RunRequest {
        id: id.clone(),
        image: "bb".into(),
        command: vec!["sleep".into(), "1000".into()],
        ..Default::default()
    };
    exec.prepare(&req).unwrap();
    exec.start(&id).unwrap();
    let dir = h.data_dir.join("containers").join(&id);
    let sup: i32 = fs::read_to_string(dir.join("supervisor.pid")).unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(sup), nix::sys::signal::Signal::SIGKILL).unwrap();
    let state = wait_for(Duration::from_secs(10), "the loss to be noticed", || {
        Ok(match exec.state(&id)? {
            ContainerState::Running => None,
            s => Some(s),
        })
    })
    .unwrap();
    let ContainerState::Exited(status) = state else { panic!("{state:?}") };
    assert_eq!(status.code, 137);
    exec.remove(&id).unwrap();
    assert_clean(&h, &id);
}

/// Sends `sig` to `pid` (a supervisor this test started through `shoal run -d`).
fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

fn read_pid(path: &std::path::Path) -> i32 {
    fs::read_to_string(path).unwrap().trim().parse().unwrap()
}

/// A supervisor still starting its container has not written `init.pid`.
/// This freezes a real one in that state: stopped (SIGSTOP), its init.pid
/// moved aside. `resume` puts both back.
struct StartingSupervisor {
    pid: i32,
    init_pid: std::path::PathBuf,
    hidden: std::path::PathBuf,
}

impl StartingSupervisor {
    fn freeze(h: &RtHost, id: &str) -> Self {
        let dir = h.data_dir.join("containers").join(id);
        let pid = read_pid(&dir.join("supervisor.pid"));
        signal(pid, nix::sys::signal::Signal::SIGSTOP);
        let (init_pid, hidden) = (dir.join("init.pid"), dir.join("init.pid.hidden"));
        fs::rename(&init_pid, &hidden).unwrap();
        StartingSupervisor { pid, init_pid, hidden }
    }

    fn resume(&self) {
        fs::rename(&self.hidden, &self.init_pid).unwrap();
        signal(self.pid, nix::sys::signal::Signal::SIGCONT);
    }
}

/// Stop's grace period runs from SIGTERM: a container whose init shows up
/// only after the stop was asked for still gets the whole grace period to
/// finish (here its TERM handler takes 2 s of a 4 s grace, and the init
/// appears 2.5 s into the stop).
#[test]
fn stop_grace_runs_from_sigterm_for_a_container_still_starting() {
    use shoal_agent::supervisor::Supervised;
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let id = h.name("slow");
    let script = "trap 'sleep 2; exit 3' TERM; echo up; while true; do usleep 50000; done";
    ok(&h.run(&["-d", "--name", &id, "bb", "sh", "-c", script]).unwrap());
    let log = h.data_dir.join("containers").join(&id).join("container.log");
    wait_for(Duration::from_secs(10), "the container to run", || Ok(fs::read_to_string(&log)?.contains("up").then_some(())))
        .unwrap();
    let frozen = StartingSupervisor::freeze(&h, &id);
    let sup = Supervised::attach(&h.data_dir, &id).unwrap();
    let stopper = std::thread::spawn(move || sup.stop_within(Duration::from_secs(4), Duration::from_secs(30)));
    std::thread::sleep(Duration::from_millis(2500)); // the container is "starting" for this long
    frozen.resume();
    let rec = wait_for(Duration::from_secs(20), "the stop to finish", || Ok(stopper.is_finished().then_some(())))
        .and_then(|()| stopper.join().map_err(|_| anyhow::anyhow!("stop panicked")))
        .unwrap()
        .unwrap();
    assert_eq!(rec.status.code, 3, "the TERM handler was cut short: {rec:?}");
    let o = h.shoal(&["internal-attach", "--rm", &id]).unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert_clean(&h, &id);
}

/// A container whose init never shows up is not waited for forever: after
/// grace plus the start timeout its supervisor is killed, and recovering
/// the lost container sweeps its cgroup, which still holds the workload
/// (a supervisor killed mid-start never wrote init.pid).
#[test]
fn a_container_stuck_starting_is_given_up_and_its_cgroup_swept() {
    use shoal_agent::supervisor::{Supervised, SupervisorError};
    let h = RtHost::new().unwrap();
    h.import_busybox("bb").unwrap();
    let id = h.name("stuck");
    ok(&h.run(&["-d", "--name", &id, "bb", "sh", "-c", "echo up; sleep 1000"]).unwrap());
    let dir = h.data_dir.join("containers").join(&id);
    wait_for(Duration::from_secs(10), "the container to run", || {
        Ok(fs::read_to_string(dir.join("container.log"))?.contains("up").then_some(()))
    })
    .unwrap();
    let frozen = StartingSupervisor::freeze(&h, &id);
    let sup = Supervised::attach(&h.data_dir, &id).unwrap();
    let started = std::time::Instant::now();
    let res = sup.stop_within(Duration::from_millis(200), Duration::from_secs(1));
    assert!(matches!(res, Err(SupervisorError::Lost { .. })), "{res:?}");
    assert!(started.elapsed() >= Duration::from_millis(1200));
    wait_for(Duration::from_secs(10), "the supervisor to be killed", || {
        Ok((!std::path::Path::new(&format!("/proc/{}", frozen.pid)).exists()
            || fs::read_to_string(format!("/proc/{}/stat", frozen.pid))?.contains(") Z "))
        .then_some(()))
    })
    .unwrap();
    // The workload is still in the container's cgroup, with no init.pid.
    assert!(h.leftovers(&id).iter().any(|l| l.starts_with("process")), "{:?}", h.leftovers(&id));
    let rec = sup.recover_lost().unwrap();
    assert_eq!(rec.status.signal, Some(9));
    assert!(!h.leftovers(&id).iter().any(|l| l.starts_with("process")), "{:?}", h.leftovers(&id));
    drop(frozen);
    let exec = shoal_agent::executor::LinuxExecutor::new(&h.data_dir, &shoal_tests::shoal_bin()).unwrap();
    shoal_agent::executor::Executor::remove(&exec, &id).unwrap();
    assert_clean(&h, &id);
}
