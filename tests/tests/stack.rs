//! Stacks end to end: `deploy/examples/shop.yml` on three hosts in network
//! namespaces, real containers, through the CLI: it converges, its tiers
//! reach each other by name only where their networks say so, the page
//! answers through the routing mesh, a redeploy changes only what changed,
//! bad compose files create nothing, and `stack rm` leaves nothing.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use shoal_tests::{client_address, http_get, node_addr, wait_for, Cluster};

const T: Duration = Duration::from_secs(120);

fn shop_yml() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/shop.yml").canonicalize().unwrap()
}

fn list(c: &Cluster, args: &[&str]) -> Vec<Value> {
    let mut all = args.to_vec();
    all.extend(["--format", "json"]);
    c.cli_ok(0, &all).unwrap().as_array().cloned().unwrap_or_default()
}

fn names(rows: &[Value]) -> Vec<String> {
    let mut n: Vec<String> = rows.iter().map(|r| r["name"].as_str().unwrap_or_default().to_string()).collect();
    n.sort();
    n
}

/// name → version of every service.
fn versions(c: &Cluster) -> std::collections::BTreeMap<String, u64> {
    list(c, &["service", "ls"])
        .iter()
        .map(|s| {
            let name = s["name"].as_str().unwrap().to_string();
            let v = c.cli_ok(0, &["service", "inspect", &name, "--format", "json"]).unwrap()["version"].as_u64().unwrap();
            (name, v)
        })
        .collect()
}

/// `shoal exec TASK sh -c SCRIPT`: (exit code, stdout + stderr).
fn exec(c: &Cluster, task: &str, script: &str) -> (i32, String) {
    let out = c.cli(0, &["exec", task, "sh", "-c", script]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text.trim().to_string())
}

#[test]
fn the_shop_deploys_updates_refuses_bad_files_and_is_removed() {
    let c = Cluster::start(1, 2).unwrap();
    c.import_busybox(0, "busybox:latest").unwrap();
    let shop = shop_yml();
    let shop = shop.to_str().unwrap();
    let out = c.cli(0, &["stack", "deploy", "-c", shop, "shop"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), c.log_tails());

    // Converged: three services of the stack, every replica running.
    let stacks = list(&c, &["stack", "ls"]);
    assert_eq!(stacks, vec![serde_json::json!({"name": "shop", "services": 3})]);
    let services = list(&c, &["stack", "services", "shop"]);
    assert_eq!(names(&services), ["shop_backend", "shop_db", "shop_frontend"]);
    for s in &services {
        assert_eq!(s["replicas_running"], s["replicas_desired"], "{s:#}");
    }
    assert_eq!(names(&list(&c, &["network", "ls"])).iter().filter(|n| n.starts_with("shop_")).collect::<Vec<_>>(), ["shop_back", "shop_front"]);
    let vols = list(&c, &["volume", "ls"]);
    assert_eq!(names(&vols), ["shop_dbdata"]);
    assert_eq!(vols[0]["labels"]["com.docker.stack.namespace"], "shop");
    assert_eq!(names(&list(&c, &["secret", "ls"])), ["shop_db_password"]);

    // The page through the mesh on every node; the API goes frontend →
    // backend → db by their short names, with the secret.
    client_address(&c);
    for i in 0..3 {
        let page = wait_for(T, &format!("the page through n{i}:8080"), || Ok(http_get(node_addr(&c, i, 8080), "/").ok())).unwrap();
        assert!(page.contains("The busybox shop"), "{page}");
    }
    let api = wait_for(T, "the API through the tiers", || Ok(http_get(node_addr(&c, 0, 8080), "/cgi-bin/api").ok().filter(|b| b.contains("visit number"))))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails()));
    assert!(api.starts_with("backend shop_backend-") && api.ends_with("visit number 1"), "{api}");
    let api = http_get(node_addr(&c, 1, 8080), "/cgi-bin/api").unwrap();
    assert!(api.ends_with("visit number 2"), "{api}");
    // frontend → db: no name, and no route to its address.
    let (code, text) = exec(&c, "shop_frontend.1", "nslookup db");
    assert!(code != 0 || text.contains("can't find") || text.contains("NXDOMAIN"), "{text}");
    let db_ip = list(&c, &["service", "ps", "shop_db"]).iter().find(|t| t["state"] == "running").unwrap()["address"][0].as_str().unwrap().split('/').next().unwrap().to_string();
    let (code, text) = exec(&c, "shop_frontend.1", &format!("timeout 3 wget -q -O - http://{db_ip}:5432/ 2>&1"));
    assert_ne!(code, 0, "frontend reached the db: {text}");
    let (code, text) = exec(&c, "shop_backend.1", &format!("timeout 3 wget -q -O - http://{db_ip}:5432/ 2>&1; echo"));
    assert!(code == 0 || text.contains("401"), "the backend must reach the db (401 without the password is fine): {text}");

    // A redeploy with one replica count changed updates only that service.
    let before = versions(&c);
    let over = c.dir.join("more-frontends.yml");
    std::fs::write(&over, "services:\n  frontend:\n    deploy:\n      replicas: 3\n").unwrap();
    let out = c.cli(0, &["stack", "deploy", "-c", shop, "-c", over.to_str().unwrap(), "shop"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = versions(&c);
    assert_ne!(before["shop_frontend"], after["shop_frontend"]);
    assert_eq!(before["shop_backend"], after["shop_backend"]);
    assert_eq!(before["shop_db"], after["shop_db"]);
    let fe = c.cli_ok(0, &["service", "inspect", "shop_frontend", "--format", "json"]).unwrap();
    assert_eq!(fe["replicas_desired"], 3);
    // The same files again: nothing changes.
    c.cli_ok(0, &["stack", "deploy", "-c", shop, "-c", over.to_str().unwrap(), "shop"]).unwrap();
    assert_eq!(versions(&c), after);

    // Bad compose input: a clear error naming file, line and key; nothing
    // created.
    let cases = [
        ("wrong-type.yml", "services:\n  web:\n    image: busybox:latest\n    deploy:\n      replicas: many\n", "wrong-type.yml:5", "replicas"),
        ("unknown-key.yml", "services:\n  web:\n    image: busybox:latest\n    replicaz: 2\n", "unknown-key.yml:4", "replicaz"),
        ("missing-var.yml", "services:\n  web:\n    image: ${SHOAL_TEST_NO_SUCH_VAR:?set the image}\n", "missing-var.yml:3", "set the image"),
        ("unknown-net.yml", "services:\n  web:\n    image: busybox:latest\n    networks: [nope]\n", "unknown-net.yml:4", "nope"),
        ("bad-port.yml", "services:\n  web:\n    image: busybox:latest\n    ports:\n      - \"80:http\"\n", "bad-port.yml:5", "ports"),
    ];
    for (file, text, place, key) in cases {
        let path = c.dir.join(file);
        std::fs::write(&path, text).unwrap();
        let out = c.cli(0, &["stack", "deploy", "-c", path.to_str().unwrap(), "bad"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} was accepted");
        assert!(err.contains(place) && err.contains(key), "{file}: {err}");
    }
    // A port another service publishes: refused before anything is made
    // (the stack's network and secret included).
    c.cli_ok(0, &["service", "create", "--detach", "--name", "holder", "--publish", "9999:80", "busybox:latest", "sleep", "1d"]).unwrap();
    let path = c.dir.join("port-taken.yml");
    std::fs::write(
        &path,
        "services:\n  web:\n    image: busybox:latest\n    ports: [\"9999:80\"]\n    secrets: [s]\nsecrets:\n  s:\n    file: ./port-taken.yml\n",
    )
    .unwrap();
    let out = c.cli(0, &["stack", "deploy", "-c", path.to_str().unwrap(), "bad"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("port 9999/tcp is already published by service \"holder\""), "{err}");
    assert!(!names(&list(&c, &["secret", "ls"])).iter().any(|n| n.starts_with("bad_")));
    c.cli_ok(0, &["service", "rm", "holder"]).unwrap();
    assert_eq!(list(&c, &["stack", "ls"]).len(), 1);
    assert_eq!(list(&c, &["service", "ls"]).len(), 3);
    assert!(!names(&list(&c, &["network", "ls"])).iter().any(|n| n.starts_with("bad_")));

    // stack rm: everything the stack made goes, data included.
    let db_node = list(&c, &["service", "ps", "shop_db"]).iter().find(|t| t["state"] == "running").unwrap()["node"].as_str().unwrap().to_string();
    let data = c.hosts.iter().find(|h| h.name == db_node).unwrap().data_dir.join("volumes/shop_dbdata");
    assert!(data.exists());
    c.cli_ok(0, &["stack", "rm", "shop"]).unwrap();
    assert!(list(&c, &["stack", "ls"]).is_empty());
    assert!(list(&c, &["service", "ls"]).is_empty());
    assert!(list(&c, &["secret", "ls"]).is_empty());
    assert!(list(&c, &["volume", "ls"]).is_empty());
    assert!(!names(&list(&c, &["network", "ls"])).iter().any(|n| n.starts_with("shop_")));
    wait_for(T, "the db's data to be deleted on its node", || Ok((!data.exists()).then_some(()))).unwrap();
    let out = c.cli(0, &["stack", "ps", "shop"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("nothing found in stack: shop"));

    // Deployed again (its networks get the same subnets back): the tiers
    // find each other as before, and the db starts from an empty volume.
    let out = c.cli(0, &["stack", "deploy", "-c", shop, "shop"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let api = wait_for(T, "the API after a redeploy", || Ok(http_get(node_addr(&c, 2, 8080), "/cgi-bin/api").ok().filter(|b| b.contains("visit number"))))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails()));
    assert!(api.ends_with("visit number 1"), "{api}");
    c.cli_ok(0, &["stack", "rm", "shop"]).unwrap();
    assert!(list(&c, &["service", "ls"]).is_empty());
}
