//! The routing mesh end to end: five hosts in network namespaces, real
//! containers, HTTP from the test's own namespace (the clients' side of the
//! underlay) to published ports, driven through the CLI.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_tests::{sh, wait_for, Cluster};

const T: Duration = Duration::from_secs(90);
/// The test's own address on the cluster's bridge: the mesh's client.
const CLIENT_IP: &str = "198.18.0.1";

fn running(c: &Cluster, service: &str, n: usize) -> Vec<Value> {
    wait_for(T, &format!("{n} running tasks of {service}"), || {
        let all = c.cli_ok(0, &["service", "ps", service, "--format", "json"]).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default();
        let t: Vec<Value> = all.into_iter().filter(|t| t["state"] == "running" && t["desired_state"] == "running").collect();
        Ok((t.len() == n).then_some(t))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails()))
}

/// `busybox:latest` serving a page that names its task (`web-3`), and
/// logging each client's address (httpd -v).
fn page_server(image: &str) -> Vec<String> {
    [image, "sh", "-c", "mkdir -p /www && echo \"served by $(hostname)\" > /www/index.html && exec httpd -f -v -p 80 -h /www"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn create(c: &Cluster, args: &[&str], cmd: &[String]) {
    let mut all = vec!["service", "create", "--detach"];
    all.extend_from_slice(args);
    all.extend(cmd.iter().map(String::as_str));
    c.cli_ok(0, &all).unwrap();
}

/// One HTTP/1.0 GET; the body of a 200 answer, or why there was none.
fn get(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").map_err(|e| format!("send to {addr}: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| format!("read from {addr}: {e}"))?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") => Ok(body.trim().to_string()),
        _ => Err(format!("{addr} answered {:?}", text.lines().next().unwrap_or(""))),
    }
}

fn node_addr(c: &Cluster, i: usize, port: u16) -> SocketAddr {
    SocketAddr::new(c.hosts[i].ip.into(), port)
}

/// The client's side: the test's address on the cluster's bridge.
fn client_address(c: &Cluster) {
    sh("ip", &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", &c.bridge]).unwrap();
}

/// Steady HTTP load on every node's published port from a few client
/// threads, each request on a new connection, until stopped (and never for
/// more than five minutes).
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    results: Arc<Mutex<LoadResults>>,
}

#[derive(Default, Debug)]
struct LoadResults {
    ok: u64,
    failed: Vec<String>,
    by_replica: BTreeMap<String, u64>,
}

impl Load {
    fn start(targets: Vec<SocketAddr>, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(LoadResults::default()));
        let threads = (0..clients)
            .map(|k| {
                let (stop, results, targets) = (stop.clone(), results.clone(), targets.clone());
                std::thread::spawn(move || {
                    let end = Instant::now() + Duration::from_secs(300);
                    let mut n = k;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        let r = get(targets[n % targets.len()]);
                        n += 1;
                        let mut res = results.lock().unwrap();
                        match r {
                            Ok(body) => {
                                res.ok += 1;
                                *res.by_replica.entry(body).or_default() += 1;
                            }
                            Err(e) => res.failed.push(e),
                        }
                    }
                })
            })
            .collect();
        Load { stop, threads, results }
    }

    fn ok(&self) -> u64 {
        self.results.lock().unwrap().ok
    }

    /// Waits until `more` requests have succeeded from now.
    fn wait_more(&self, more: u64) {
        let base = self.ok();
        wait_for(T, &format!("{more} more requests"), || Ok((self.ok() >= base + more).then_some(()))).unwrap();
    }

    fn finish(self) -> LoadResults {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.results.lock().unwrap())
    }
}

/// Every node forwards a published port to the tasks wherever they run,
/// the task sees the client's own address, host mode binds only where a
/// task runs, and bad input changes nothing.
#[test]
fn published_ports_answer_on_every_node_with_the_client_address() {
    let c = Cluster::start(3, 2).unwrap();
    client_address(&c);
    c.import_busybox(0, "busybox:latest").unwrap();
    // Two replicas on the workers (n3, n4): the managers run none.
    create(&c, &["--name", "web", "--replicas", "2", "--publish", "8080:80", "--constraint", "node.role==worker"], &page_server("busybox:latest"));
    let tasks = running(&c, "web", 2);
    assert!(tasks.iter().all(|t| t["address"].as_array().is_some_and(|a| a.len() == 1)), "on the mesh's network: {tasks:?}");
    let svc = c.cli_ok(0, &["service", "inspect", "web", "--format", "json"]).unwrap();
    assert_eq!(svc["networks"], serde_json::json!(["ingress"]), "{svc}");
    assert_eq!(svc["ports"][0]["mode"], "ingress");

    // A node that runs no replica (n0, a manager) serves the page; the first
    // packets may wait for a WireGuard handshake.
    let first = wait_for(T, "the page through n0:8080", || Ok(get(node_addr(&c, 0, 8080)).ok())).unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails()));
    assert!(first.starts_with("served by web-"), "{first}");
    // 100 requests over every node reach every replica.
    let mut seen = BTreeMap::<String, u32>::new();
    for i in 0..100 {
        let body = get(node_addr(&c, i % 5, 8080)).unwrap_or_else(|e| panic!("request {i}: {e}\n{}", c.log_tails()));
        *seen.entry(body).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "both replicas answer: {seen:?}");
    // Each task saw the client's own address, not a node's.
    let logs = wait_for(T, "the client's address in the tasks' logs", || {
        let out = c.cli(0, &["service", "logs", "web"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        Ok((text.matches(&format!("{CLIENT_IP}]:")).count() >= 100).then_some(text))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails()));
    for h in &c.hosts {
        assert!(!logs.contains(&format!("{}]:", h.ip)), "node {}'s address reached a task instead of the client's: {logs}", h.name);
    }

    // Host mode: only the node that runs the task accepts.
    create(
        &c,
        &["--name", "local", "--publish", "published=9090,target=80,mode=host", "--constraint", "node.name==n3"],
        &page_server("busybox:latest"),
    );
    running(&c, "local", 1);
    let body = wait_for(T, "n3:9090", || Ok(get(node_addr(&c, 3, 9090)).ok())).unwrap();
    assert_eq!(body, "served by local-1");
    let refused = get(node_addr(&c, 4, 9090));
    assert!(refused.is_err(), "n4 runs no task of a host-mode service but answered: {refused:?}");

    // Bad input: clear errors, nothing changes.
    let before = c.cli_ok(0, &["service", "ls", "--format", "json"]).unwrap();
    let bad: [(&[&str], &str); 6] = [
        (&["--name", "again", "--publish", "8080:80"], "already published by service \"web\""),
        (&["--name", "again", "--publish", "9090:80"], "already published by service \"local\""),
        (&["--name", "zero", "--publish", "0:80"], "must be 1-65535"),
        (&["--name", "huge", "--publish", "70000:80"], "must be 1-65535"),
        (&["--name", "odd", "--publish", "published=81,target=80,mode=sideways"], "mode \"sideways\""),
        (&["--name", "sneaky", "--network", "ingress"], "managed by shoal"),
    ];
    for (args, want) in bad {
        let mut all = vec!["service", "create", "--detach"];
        all.extend_from_slice(args);
        all.extend(["busybox:latest", "sleep", "1d"]);
        let out = c.cli(0, &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{args:?}: want {want:?}, got {err}");
    }
    let out = c.cli(0, &["network", "create", "ingress"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("reserved"));
    assert_eq!(c.cli_ok(0, &["service", "ls", "--format", "json"]).unwrap(), before, "a refused command changed the services");

    // --publish-rm: the port closes on every node, and the task leaves the
    // mesh's network.
    c.cli_ok(0, &["service", "update", "--publish-rm", "8080", "web"]).unwrap();
    wait_for(T, "n0:8080 to close", || Ok(get(node_addr(&c, 0, 8080)).is_err().then_some(()))).unwrap();
    let svc = c.cli_ok(0, &["service", "inspect", "web", "--format", "json"]).unwrap();
    assert_eq!(svc["networks"], serde_json::json!([]), "{svc}");
}

/// The flash sale: steady load on every node's port while the service goes
/// 2 → 10 → 2 and through a rolling update; no request fails.
#[test]
fn no_request_fails_while_scaling_and_updating() {
    let c = Cluster::start(3, 2).unwrap();
    client_address(&c);
    c.import_busybox(0, "busybox:latest").unwrap();
    c.import_busybox(0, "busybox:v2").unwrap();
    create(&c, &["--name", "web", "--replicas", "2", "--publish", "8080:80", "--stop-grace-period", "5s"], &page_server("busybox:latest"));
    running(&c, "web", 2);
    let targets: Vec<SocketAddr> = (0..5).map(|i| node_addr(&c, i, 8080)).collect();
    for t in &targets {
        wait_for(T, &format!("the page through {t}"), || Ok(get(*t).ok())).unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails()));
    }

    let load = Load::start(targets, 4);
    load.wait_more(200);
    c.cli_ok(0, &["service", "scale", "web=10"]).unwrap();
    running(&c, "web", 10);
    // All ten take traffic.
    wait_for(T, "all ten replicas to serve", || Ok((load.results.lock().unwrap().by_replica.len() >= 10).then_some(()))).unwrap();
    load.wait_more(200);
    c.cli_ok(0, &["service", "scale", "web=2"]).unwrap();
    running(&c, "web", 2);
    load.wait_more(200);
    // A rolling update to a second image, two tasks at a time (stop-first:
    // with four replicas, two keep serving while two are replaced).
    c.cli_ok(0, &["service", "scale", "web=4"]).unwrap();
    running(&c, "web", 4);
    c.cli_ok(0, &["service", "update", "--image", "busybox:v2", "--update-parallelism", "2", "web"]).unwrap();
    wait_for(T, "the update to finish", || {
        let ps = c.cli_ok(0, &["service", "ps", "web", "--format", "json"])?;
        let live: Vec<&Value> = ps.as_array().map(|a| a.iter().filter(|t| t["desired_state"] == "running").collect()).unwrap_or_default();
        Ok((live.len() == 4 && live.iter().all(|t| t["state"] == "running" && t["image"] == "busybox:v2")).then_some(()))
    })
    .unwrap();
    load.wait_more(200);
    let res = load.finish();
    assert!(res.failed.is_empty(), "{} of {} requests failed: {:?}\n{}", res.failed.len(), res.ok + res.failed.len() as u64, &res.failed[..res.failed.len().min(10)], c.log_tails());
    assert!(res.ok >= 1000, "{res:?}");
}
