//! Volumes end to end: three hosts in network namespaces (one manager, two
//! workers), real containers, driven through the CLI. A named volume keeps
//! its data across task replacement and brings the task back to its node;
//! image content seeds an empty volume; bind, tmpfs and readonly mounts do
//! what they say; bad mounts are refused.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::Value;
use shoal_tests::{wait_for, Cluster};

const T: Duration = Duration::from_secs(90);

fn tasks(c: &Cluster, service: &str) -> Vec<Value> {
    c.cli_ok(0, &["service", "ps", service, "--format", "json"]).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

/// The one running task of `service` that isn't `not`; waits for it.
fn running_task(c: &Cluster, service: &str, not: &str) -> Value {
    wait_for(T, &format!("a running task of {service} other than {not:?}"), || {
        Ok(tasks(c, service).into_iter().find(|t| t["state"] == "running" && t["desired_state"] == "running" && t["id"] != not))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{:#?}\n{}", tasks(c, service), c.log_tails()))
}

/// `shoal exec TASK sh -c SCRIPT`: (exit code, stdout, stderr).
fn exec(c: &Cluster, task: &str, script: &str) -> (i32, String, String) {
    let out = c.cli(0, &["exec", task, "sh", "-c", script]);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).trim().to_string(), String::from_utf8_lossy(&out.stderr).trim().to_string())
}

fn volume(c: &Cluster, name: &str) -> Value {
    c.cli_ok(0, &["volume", "inspect", name, "--format", "json"]).unwrap()
}

fn host_of(c: &Cluster, node: &str) -> usize {
    c.hosts.iter().position(|h| h.name == node).unwrap_or_else(|| panic!("no host named {node}"))
}

#[test]
fn a_volume_keeps_its_data_and_brings_its_task_back_to_its_node() {
    let c = Cluster::start(1, 2).unwrap();
    c.import_busybox(0, "busybox:latest").unwrap();
    // The first task writes its name into the volume; later ones keep it.
    let script = "[ -f /data/first ] || hostname > /data/first; exec sleep 1d";
    c.cli_ok(
        0,
        &["service", "create", "--detach", "--name", "db", "--constraint", "node.role==worker", "--mount", "type=volume,src=dbdata,dst=/data", "busybox:latest", "sh", "-c", script],
    )
    .unwrap();
    let first = running_task(&c, "db", "");
    let node = first["node"].as_str().unwrap().to_string();
    let (code, written, err) = exec(&c, "db.1", "cat /data/first");
    assert_eq!(code, 0, "{err}");
    assert_eq!(written, "db-1");

    // The volume object exists (created by first use) and holds data on
    // that node only; it can't be removed while the service mounts it.
    wait_for(T, "the volume's size to be reported", || {
        let v = volume(&c, "dbdata");
        Ok((v["nodes"] == serde_json::json!([node.clone()]) && v["size"].as_u64().unwrap_or(0) > 0).then_some(()))
    })
    .unwrap();
    let out = c.cli(0, &["volume", "rm", "dbdata"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("used by service \"db\""), "{err}");

    // `service update --force`: a new task, same node, same data.
    c.cli_ok(0, &["service", "update", "--detach", "--force", "db"]).unwrap();
    let second = running_task(&c, "db", first["id"].as_str().unwrap());
    assert_eq!(second["node"], node.as_str(), "{second:#}");
    assert_eq!(exec(&c, "db.1", "cat /data/first").1, "db-1");

    // A killed container: replaced on the same node, data there.
    // (The exec may die with the container: its outcome doesn't matter.)
    let _ = exec(&c, "db.1", "kill -9 $(pidof sleep)");
    let third = running_task(&c, "db", second["id"].as_str().unwrap());
    assert_eq!(third["node"], node.as_str(), "{third:#}");
    assert_eq!(exec(&c, "db.1", "cat /data/first").1, "db-1");

    // Draining the node: the task waits for it, saying why, rather than
    // starting elsewhere with an empty volume.
    c.cli_ok(0, &["node", "update", "--availability", "drain", &node]).unwrap();
    let waiting = wait_for(T, "the replacement to wait for the drained node", || {
        Ok(tasks(&c, "db").into_iter().find(|t| t["desired_state"] == "running" && t["state"] == "pending"))
    })
    .unwrap();
    let msg = waiting["message"].as_str().unwrap();
    assert!(msg.contains(&format!("waiting for node {node}, which holds the data of volume dbdata: it is drained")), "{msg}");
    // Back to active: the task returns to its node and its data.
    c.cli_ok(0, &["node", "update", "--availability", "active", &node]).unwrap();
    let back = running_task(&c, "db", third["id"].as_str().unwrap());
    assert_eq!(back["node"], node.as_str());
    assert_eq!(exec(&c, "db.1", "cat /data/first && touch /data/extra").1, "db-1");

    // With volume-nocopy the task may move: drained again, it starts on the
    // other worker, with an empty volume there.
    c.cli_ok(0, &["service", "update", "--detach", "--mount-rm", "/data", "--mount-add", "type=volume,src=dbdata,dst=/data,volume-nocopy", "db"]).unwrap();
    let spec = c.cli_ok(0, &["service", "inspect", "db", "--format", "json"]).unwrap();
    assert_eq!(spec["mounts"].as_array().map(Vec::len), Some(1), "{spec}");
    assert_eq!(spec["mounts"][0]["volume_nocopy"], true);
    let updated = running_task(&c, "db", back["id"].as_str().unwrap());
    assert_eq!(updated["node"], node.as_str());
    c.cli_ok(0, &["node", "update", "--availability", "drain", &node]).unwrap();
    let moved = wait_for(T, "the task to move off the drained node", || {
        Ok(tasks(&c, "db").into_iter().find(|t| t["state"] == "running" && t["desired_state"] == "running" && t["node"] != node.as_str()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{:#?}", tasks(&c, "db")));
    let other = moved["node"].as_str().unwrap().to_string();
    let (code, _, _) = exec(&c, "db.1", "test -e /data/extra");
    assert_ne!(code, 0, "the task on {other} must have started with an empty volume");
    wait_for(T, "the volume to hold data on both workers", || {
        let v = volume(&c, "dbdata");
        let nodes: Vec<String> = v["nodes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect();
        Ok((nodes.contains(&node) && nodes.contains(&other)).then_some(()))
    })
    .unwrap();

    // Removing the service frees the volume; removing the volume deletes
    // its data on every node.
    c.cli_ok(0, &["node", "update", "--availability", "active", &node]).unwrap();
    c.cli_ok(0, &["service", "rm", "db"]).unwrap();
    let dirs: Vec<_> = [&node, &other].iter().map(|n| c.hosts[host_of(&c, n)].data_dir.join("volumes/dbdata")).collect();
    assert!(dirs.iter().all(|d| d.exists()));
    wait_for(T, "volume rm to be allowed once the tasks are gone", || Ok(c.cli(0, &["volume", "rm", "dbdata"]).status.success().then_some(()))).unwrap();
    wait_for(T, "the volume's data to be deleted on both nodes", || Ok(dirs.iter().all(|d| !d.exists()).then_some(()))).unwrap();
    let ls = c.cli_ok(0, &["volume", "ls", "--format", "json"]).unwrap();
    assert_eq!(ls, serde_json::json!([]));
}

#[test]
fn image_content_bind_tmpfs_readonly_and_refusals() {
    let c = Cluster::start(1, 1).unwrap();
    c.import_busybox(0, "busybox:latest").unwrap();
    let host_dir = c.dir.join("bind-src");
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(host_dir.join("f"), "from the host\n").unwrap();
    let bind = format!("type=bind,src={},dst=/host,readonly", host_dir.display());
    c.cli_ok(0, &["volume", "create", "--label", "tier=web", "www"]).unwrap();
    // Local-driver options: mount(2) arguments used on the node.
    c.cli_ok(0, &["volume", "create", "--opt", "type=tmpfs", "--opt", "device=tmpfs", "--opt", "o=size=4m", "mem"]).unwrap();
    c.cli_ok(
        0,
        &[
            "service", "create", "--detach", "--name", "m", "--constraint", "node.role==worker",
            "--mount", "type=volume,src=www,dst=/www",
            "--mount", &bind,
            "--mount", "type=tmpfs,dst=/scratch,tmpfs-size=8M,tmpfs-mode=700",
            "--mount", "type=volume,src=ro,dst=/ro,readonly",
            "--mount", "type=volume,src=bare,dst=/www2,volume-nocopy",
            "--mount", "type=volume,src=mem,dst=/mem",
            // The entrypoint replaces the image's; the rest are its args.
            "--entrypoint", "sleep",
            "busybox:latest", "1d",
        ],
    )
    .unwrap();
    running_task(&c, "m", "");
    // The image's /www seeded the empty volume; volume-nocopy kept one empty.
    assert_eq!(exec(&c, "m.1", "cat /www/index.html").1, "hello from shoal");
    assert_eq!(exec(&c, "m.1", "ls -A /www2 | wc -l").1, "0");
    let data = c.hosts[1].data_dir.join("volumes/www/_data/index.html");
    assert_eq!(std::fs::read_to_string(&data).unwrap().trim(), "hello from shoal");
    // The bind shows the host's file, and refuses writes.
    assert_eq!(exec(&c, "m.1", "cat /host/f").1, "from the host");
    let (code, _, _) = exec(&c, "m.1", "echo x > /host/new");
    assert_ne!(code, 0, "a write to a readonly bind must fail");
    assert!(!host_dir.join("new").exists());
    // A readonly volume refuses writes.
    assert_ne!(exec(&c, "m.1", "touch /ro/x").0, 0);
    // The tmpfs is a tmpfs of 8 MiB with mode 700.
    let (_, mounts, _) = exec(&c, "m.1", "grep ' /scratch ' /proc/mounts");
    assert!(mounts.starts_with("tmpfs /scratch tmpfs") && mounts.contains("size=8192k") && mounts.contains("mode=700"), "{mounts}");
    assert_eq!(exec(&c, "m.1", "touch /scratch/x && echo ok").1, "ok");
    let (_, mounts, _) = exec(&c, "m.1", "grep ' /mem ' /proc/mounts");
    assert!(mounts.starts_with("tmpfs /mem tmpfs") && mounts.contains("size=4096k"), "the volume's options: {mounts}");
    // volume ls shows the labels and the node; inspect the services.
    let v = volume(&c, "www");
    assert_eq!(v["labels"]["tier"], "web");
    assert_eq!(v["services"], serde_json::json!(["m"]));
    assert_eq!(v["nodes"], serde_json::json!([c.hosts[1].name.clone()]));

    // A missing bind source fails the task with a clear error, and shoal
    // never creates it.
    let missing = c.dir.join("no-such-dir");
    let spec = format!("type=bind,src={},dst=/x", missing.display());
    c.cli_ok(0, &["service", "create", "--detach", "--name", "nobind", "--restart-condition", "none", "--mount", &spec, "busybox:latest", "sleep", "1d"]).unwrap();
    let t = wait_for(T, "the task with a missing bind source to be refused", || {
        Ok(tasks(&c, "nobind").into_iter().find(|t| t["state"] == "rejected" || t["state"] == "failed"))
    })
    .unwrap();
    let err = t["error"].as_str().unwrap();
    assert!(err.contains("does not exist") && err.contains("no-such-dir"), "{err}");
    assert!(!missing.exists());
    // A bind of shoal's own data dir is refused on the node.
    let spec = format!("type=bind,src={},dst=/x", c.hosts[1].data_dir.display());
    c.cli_ok(0, &["service", "create", "--detach", "--name", "sneaky", "--restart-condition", "none", "--constraint", "node.role==worker", "--mount", &spec, "busybox:latest", "sleep", "1d"]).unwrap();
    let t = wait_for(T, "a bind of the data dir to be refused", || {
        Ok(tasks(&c, "sneaky").into_iter().find(|t| t["state"] == "rejected" || t["state"] == "failed"))
    })
    .unwrap();
    assert!(t["error"].as_str().unwrap().contains("shoal's data dir"), "{t:#}");

    // Bad input: a clear error, and nothing created.
    for (mount, want) in [
        ("type=bind,src=relative/path,dst=/x", "must be an absolute host path"),
        ("type=bind,src=/a/../b,dst=/x", "clean absolute path"),
        ("type=volume,src=Bad_Name,dst=/x", "invalid volume name"),
        ("type=volume,src=v,dst=relative", "mount target"),
        ("type=tmpfs,dst=/x,tmpfs-mode=99999", "tmpfs-mode"),
        ("type=volume,src=v,dst=/x,bind-propagation=rshared", "not supported"),
        ("type=bind,src=/tmp,dst=/x,volume-nocopy", "volume mounts only"),
    ] {
        let out = c.cli(0, &["service", "create", "--detach", "--name", "bad", "--mount", mount, "busybox:latest", "true"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "--mount {mount}: {err}");
    }
    assert!(tasks(&c, "bad").is_empty());
    let out = c.cli(0, &["volume", "create", "--opt", "bogus=1", "v2"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("bogus"));
    let out = c.cli(0, &["volume", "create", "--driver", "nfs", "v2"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("local driver only"));
    let names: Vec<String> = c.cli_ok(0, &["volume", "ls", "--format", "json"]).unwrap().as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["bare", "mem", "ro", "www"], "only the mounted volumes exist");

    // prune removes the volumes nobody mounts, and their data.
    c.cli_ok(0, &["service", "rm", "m", "nobind", "sneaky"]).unwrap();
    let www_dir = c.hosts[1].data_dir.join("volumes/www");
    wait_for(T, "prune to remove all four volumes", || {
        let _ = c.cli(0, &["volume", "prune", "--force"]);
        Ok(c.cli_ok(0, &["volume", "ls", "--format", "json"])?.as_array().is_some_and(|a| a.is_empty()).then_some(()))
    })
    .unwrap();
    wait_for(T, "the pruned volume's data to go", || Ok((!www_dir.exists()).then_some(()))).unwrap();
}
