//! The overlay end to end: hosts in network namespaces, real containers,
//! WireGuard between the hosts, driven through the CLI.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use shoal_tests::{sh, wait_for, Cluster, DaemonOpts};

const T: Duration = Duration::from_secs(90);

fn tasks(c: &Cluster, service: &str) -> Vec<Value> {
    c.cli_ok(0, &["service", "ps", service, "--format", "json"]).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

/// Waits for `service` to have `n` running tasks; returns them.
fn running(c: &Cluster, service: &str, n: usize) -> Vec<Value> {
    wait_for(T, &format!("{n} running tasks of {service}"), || {
        let t: Vec<Value> = tasks(c, service).into_iter().filter(|t| t["state"] == "running").collect();
        Ok((t.len() == n).then_some(t))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails()))
}

/// The task's address on its `i`-th network, without the prefix.
fn ip(task: &Value, i: usize) -> String {
    task["address"][i].as_str().unwrap().split('/').next().unwrap().to_string()
}

fn create(c: &Cluster, args: &[&str]) {
    let mut all = vec!["service", "create", "--detach"];
    all.extend_from_slice(args);
    c.cli_ok(0, &all).unwrap();
}

/// A web server in a task that serves `marker`.
fn web(marker: &str) -> Vec<String> {
    ["busybox:latest", "sh", "-c", &format!("mkdir -p /www && echo {marker} > /www/index.html && exec httpd -f -p 80 -h /www")]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// An HTTP GET from task `from` (SERVICE.SLOT) to `url` (`http://IP[:PORT]/`)
/// with busybox `nc` (Debian's static busybox `wget` crashes): the body,
/// or None when it could not connect within 3 s.
fn fetch(c: &Cluster, from: &str, url: &str) -> Option<String> {
    let hostport = url.strip_prefix("http://")?.trim_end_matches('/');
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "80"));
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port}");
    let out = c.cli(0, &["exec", from, "sh", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (_, body) = text.split_once("\r\n\r\n")?;
    (out.status.success() && text.starts_with("HTTP/1.")).then(|| body.trim().to_string())
}

fn fetch_ok(c: &Cluster, from: &str, url: &str, want: &str) {
    // The first packets may wait for a WireGuard handshake: poll.
    wait_for(T, &format!("{from} to fetch {url}"), || Ok(fetch(c, from, url).filter(|b| b == want)))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails()));
}

/// A one-shot HTTP server on the test's own bridge address (the underlay
/// seen from the root namespace), answering `body` to every request.
fn underlay_server(c: &Cluster, body: &'static str) -> (String, std::thread::JoinHandle<()>, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    sh("ip", &["addr", "add", "198.18.0.1/24", "dev", &c.bridge]).unwrap();
    let l = TcpListener::bind("198.18.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let url = format!("http://{}/", l.local_addr().unwrap());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            match l.accept() {
                Ok((mut conn, _)) => {
                    conn.set_nonblocking(false).unwrap();
                    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf);
                    let _ = write!(conn, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    (url, h, stop)
}

/// Everything the overlay promises on one cluster: cross-host traffic by
/// address, isolation between networks on one host and across hosts,
/// encryption on the wire, egress (not from internal networks), and clear
/// refusals.
#[test]
fn overlay_links_isolates_and_encrypts() {
    let c = Cluster::start(1, 2).unwrap();
    c.import_busybox(0, "busybox:latest").unwrap();
    for n in [&["network", "create", "front"][..], &["network", "create", "back"], &["network", "create", "--internal", "priv"]] {
        c.cli_ok(0, n).unwrap();
    }
    // frontend on n1, backend on front+back on n2, db on back on n1 and n2.
    let (n1, n2) = ("node.name==n1", "node.name==n2");
    let mut args = vec!["--name", "db", "--network", "back", "--replicas", "2", "--constraint", "node.role==worker"];
    let db_cmd = web("DB-MARKER");
    args.extend(db_cmd.iter().map(String::as_str));
    create(&c, &args);
    let mut args = vec!["--name", "backend", "--network", "front", "--network", "back", "--constraint", n2];
    let be_cmd = web("BACKEND-MARKER");
    args.extend(be_cmd.iter().map(String::as_str));
    create(&c, &args);
    create(&c, &["--name", "frontend", "--network", "front", "--constraint", n1, "busybox:latest", "sleep", "1d"]);
    create(&c, &["--name", "hidden", "--network", "priv", "--constraint", n1, "busybox:latest", "sleep", "1d"]);

    let backend = running(&c, "backend", 1);
    let dbs = running(&c, "db", 2);
    running(&c, "frontend", 1);
    running(&c, "hidden", 1);
    assert_eq!(backend[0]["address"].as_array().unwrap().len(), 2, "backend has an address on each network");
    let (be_front, be_back) = (ip(&backend[0], 0), ip(&backend[0], 1));
    let db_on = |node: &str| dbs.iter().find(|t| t["node"] == node).map(|t| ip(t, 0));
    let (db_n1, db_n2) = (db_on("n1").unwrap(), db_on("n2").unwrap());

    // frontend (n1) → backend (n2) across hosts: yes.
    fetch_ok(&c, "frontend.1", &format!("http://{be_front}/"), "BACKEND-MARKER");
    // backend → db on its own host and across hosts: yes.
    fetch_ok(&c, "backend.1", &format!("http://{db_n2}/"), "DB-MARKER");
    fetch_ok(&c, "backend.1", &format!("http://{db_n1}/"), "DB-MARKER");
    // frontend → db: no, on the same host (n1) and across hosts (n2), and
    // not through backend's address on back either.
    for target in [&db_n1, &db_n2, &be_back] {
        assert_eq!(fetch(&c, "frontend.1", &format!("http://{target}/")), None, "frontend reached {target} on back");
    }

    // Encryption: between the two workers there is only WireGuard, and the
    // page backend serves never shows on the wire.
    let cap = c.dir.join("n2.pcap");
    let (h1, h2) = (&c.hosts[1], &c.hosts[2]);
    let filter = format!("host {} and host {}", h1.ip, h2.ip);
    // Written through our own file: tcpdump drops root before it writes.
    let mut dump = Command::new("tcpdump")
        .args(["-i", &h2.veth, "--immediate-mode", "-U", "-n", "-w", "-", &filter])
        .stdout(std::fs::File::create(&cap).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // tcpdump says "listening on" once it captures.
    let mut err = dump.stderr.take().unwrap();
    let mut seen = Vec::new();
    wait_for(Duration::from_secs(10), "tcpdump to listen", || {
        let mut b = [0u8; 256];
        let n = err.read(&mut b)?;
        seen.extend_from_slice(&b[..n]);
        Ok(String::from_utf8_lossy(&seen).contains("listening on").then_some(()))
    })
    .unwrap();
    for _ in 0..3 {
        fetch_ok(&c, "frontend.1", &format!("http://{be_front}/"), "BACKEND-MARKER");
    }
    // Captured packets reach the file as they come (immediate mode).
    wait_for(Duration::from_secs(10), "the capture to hold packets", || {
        Ok((std::fs::metadata(&cap)?.len() > 1000).then_some(()))
    })
    .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(dump.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    dump.wait().unwrap();
    let mut rest = String::new();
    let _ = err.read_to_string(&mut rest);
    let raw = std::fs::read(&cap).unwrap();
    assert!(!raw.windows(14).any(|w| w == b"BACKEND-MARKER"), "the page crossed the underlay in the clear");
    let listing = sh("tcpdump", &["-r", cap.to_str().unwrap(), "-n"]).unwrap();
    let packets: Vec<&str> = listing.lines().collect();
    assert!(packets.len() > 4, "captured nothing between the workers ({filter} on {}): {listing} {rest}", h2.veth);
    for p in &packets {
        assert!(p.contains(" UDP, length") && p.contains(".51820"), "not WireGuard: {p}");
    }

    // Egress: a container reaches a server on the underlay; one on an
    // internal network does not.
    let (url, server, stop) = underlay_server(&c, "EGRESS-OK");
    fetch_ok(&c, "frontend.1", &url, "EGRESS-OK");
    assert_eq!(fetch(&c, "hidden.1", &url), None, "an internal network reached the underlay");

    // A peer that sends garbage to the overlay port changes nothing.
    let garbage = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", c.hosts[0].netns))
        .args(["/bin/busybox", "sh", "-c"])
        .arg(format!("for i in 1 2 3 4 5; do head -c 300 /dev/urandom | /bin/busybox nc -u -w 1 {} 51820; done; true", c.hosts[2].ip))
        .status()
        .unwrap();
    assert!(garbage.success());
    fetch_ok(&c, "frontend.1", &format!("http://{be_front}/"), "BACKEND-MARKER");

    // Bad input: clear errors, nothing changes.
    let before = c.cli_ok(0, &["network", "ls", "--format", "json"]).unwrap();
    let bad: [(&[&str], &str); 5] = [
        (&["network", "create", "--subnet", "100.64.0.0/16", "wide"], "overlaps"),
        (&["network", "create", "--subnet", "100.90.0.0/28", "tiny"], "too small"),
        (&["network", "rm", "front"], "is used by service"),
        (&["service", "create", "--detach", "--name", "h", "--network", "host", "busybox:latest", "true"], "not supported"),
        (&["service", "create", "--detach", "--name", "u", "--network", "nosuch", "busybox:latest", "true"], "nosuch"),
    ];
    for (args, want) in bad {
        let out = c.cli(0, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(c.cli_ok(0, &["network", "ls", "--format", "json"]).unwrap(), before);
    let services = c.cli_ok(0, &["service", "ls", "--format", "json"]).unwrap();
    assert_eq!(services.as_array().unwrap().len(), 4);

    // inspect shows slices and the attached tasks.
    let front = c.cli_ok(0, &["network", "inspect", "front", "--format", "json"]).unwrap();
    assert!(front["slices"]["n1"].is_array() && front["slices"]["n2"].is_array(), "{front}");
    assert_eq!(front["tasks"].as_array().unwrap().len(), 2, "{front}");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap();
}

/// Routes through the WireGuard device on host `i` (its peers' slices).
fn tunnel_routes(c: &Cluster, i: usize) -> Vec<String> {
    sh("ip", &["-n", &c.hosts[i].netns, "route", "show", "dev", "shoal0"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Peers follow the cluster: a restarted node's tasks are reachable again,
/// a node that goes down leaves its peers' routes, and comes back into
/// them when it returns.
#[test]
fn peers_follow_the_cluster() {
    let mut c = Cluster::start(1, 2).unwrap();
    c.import_busybox(0, "busybox:latest").unwrap();
    c.cli_ok(0, &["network", "create", "front"]).unwrap();
    let mut args = vec!["--name", "b", "--network", "front", "--constraint", "node.name==n2"];
    let cmd = web("B-MARKER");
    args.extend(cmd.iter().map(String::as_str));
    create(&c, &args);
    create(&c, &["--name", "a", "--network", "front", "--constraint", "node.name==n1", "busybox:latest", "sleep", "1d"]);
    let b = running(&c, "b", 1);
    running(&c, "a", 1);
    let url = format!("http://{}/", ip(&b[0], 0));
    fetch_ok(&c, "a.1", &url, "B-MARKER");
    let front = c.cli_ok(0, &["network", "inspect", "front", "--format", "json"]).unwrap();
    let n2_slice = front["slices"]["n2"][0].as_str().unwrap().to_string();
    assert!(tunnel_routes(&c, 1).contains(&n2_slice));

    // b's running task, asked each time: a restart that outlasts the
    // heartbeat timeout replaces it (on n2 again, with an address of its
    // own), and its old task may still show as running until n2's report
    // lands.
    let fetch_running_b = |c: &Cluster| {
        wait_for(T, "a.1 to fetch from b's running task", || {
            let b: Vec<Value> = tasks(c, "b").into_iter().filter(|t| t["state"] == "running").collect();
            Ok(b.first().and_then(|t| fetch(c, "a.1", &format!("http://{}/", ip(t, 0)))).filter(|body| body == "B-MARKER"))
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails()));
    };

    // A clean restart of n2's daemon: its networking comes back with the
    // new data plane.
    c.stop(2);
    c.restart(2).unwrap();
    fetch_running_b(&c);

    // n2 dies: once it is down, n1 no longer routes its slice.
    c.kill(2);
    wait_for(T, "n1 to drop n2's routes", || Ok((!tunnel_routes(&c, 1).contains(&n2_slice)).then_some(()))).unwrap();
    // It comes back: its slice is routed again and its task reachable.
    c.restart(2).unwrap();
    wait_for(T, "n1 to route n2's slice again", || Ok(tunnel_routes(&c, 1).contains(&n2_slice).then_some(()))).unwrap();
    fetch_running_b(&c);
}

/// `nslookup NAME` in task `from`: the addresses it answered, or None.
fn lookup(c: &Cluster, from: &str, name: &str) -> Option<Vec<String>> {
    let out = c.cli(0, &["exec", from, "nslookup", name]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return None;
    }
    // busybox prints the server first, then "Name: …" and the answers.
    let answers = text.split_once("Name:")?.1;
    Some(answers.lines().filter_map(|l| l.trim().strip_prefix("Address:")).map(|a| a.trim().to_string()).collect())
}

/// Discovery: a service's name resolves to its virtual IP on the asker's
/// network, `tasks.NAME` to every running task, connections to the VIP are
/// balanced over all tasks on every host, names on other networks don't
/// resolve, and a scaled-down task leaves DNS and the VIP.
#[test]
fn services_by_name_and_virtual_ip() {
    let c = Cluster::start(1, 2).unwrap();
    c.import_busybox(0, "busybox:latest").unwrap();
    c.cli_ok(0, &["network", "create", "front"]).unwrap();
    c.cli_ok(0, &["network", "create", "other"]).unwrap();
    let serve_hostname = "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www";
    create(&c, &["--name", "b", "--network", "name=front,alias=backend", "--replicas", "3", "--constraint", "node.role==worker", "busybox:latest", "sh", "-c", serve_hostname]);
    create(&c, &["--name", "a", "--network", "front", "--constraint", "node.name==n1", "busybox:latest", "sleep", "1d"]);
    create(&c, &["--name", "o", "--network", "other", "--constraint", "node.name==n1", "busybox:latest", "sleep", "1d"]);
    let bs = running(&c, "b", 3);
    running(&c, "a", 1);
    running(&c, "o", 1);
    let svc = c.cli_ok(0, &["service", "inspect", "b", "--format", "json"]).unwrap();
    let vip = svc["vips"]["front"].as_str().unwrap().to_string();
    let mut task_ips: Vec<String> = bs.iter().map(|t| ip(t, 0)).collect();
    task_ips.sort();

    // By name: the VIP; tasks.b: every running task.
    wait_for(T, "b to resolve to its VIP", || Ok((lookup(&c, "a.1", "b") == Some(vec![vip.clone()])).then_some(()))).unwrap();
    let mut tasks = lookup(&c, "a.1", "tasks.b").unwrap();
    tasks.sort();
    assert_eq!(tasks, task_ips);
    // An alias given with --network name=front,alias=backend answers too.
    assert_eq!(lookup(&c, "a.1", "backend"), Some(vec![vip.clone()]));
    // Not on a network the asker shares: no answer.
    assert_eq!(lookup(&c, "o.1", "b"), None);
    // /etc/hosts names the task (its hostname on its address), and lo is up.
    let a = running(&c, "a", 1);
    let out = c.cli(0, &["exec", "a.1", "sh", "-c", "cat /etc/hosts; ping -c 1 -W 2 127.0.0.1 >/dev/null && echo lo-ok; cat /etc/hostname"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains(&format!("{}\ta-1", ip(&a[0], 0))) && text.contains("localhost") && text.contains("lo-ok"), "{text}");
    assert!(text.ends_with("lo-ok\na-1\n"), "/etc/hostname names the task: {text}");

    // Through the VIP: 60 connections reach all three tasks.
    wait_for(T, "the VIP to answer", || Ok(fetch(&c, "a.1", &format!("http://{vip}/")))).unwrap();
    let script = format!("for i in $(seq 60); do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {vip} 80 | tail -n 1; done");
    let out = c.cli(0, &["exec", "a.1", "sh", "-c", &script]);
    let seen: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
    assert_eq!(seen.len(), 3, "60 connections reached {seen:?}");

    // Scale down: the removed task leaves DNS and the VIP.
    c.cli_ok(0, &["service", "scale", "--detach", "b=2"]).unwrap();
    let left = running(&c, "b", 2);
    let mut left_ips: Vec<String> = left.iter().map(|t| ip(t, 0)).collect();
    left_ips.sort();
    wait_for(T, "tasks.b to hold two tasks", || {
        let mut t = lookup(&c, "a.1", "tasks.b").unwrap_or_default();
        t.sort();
        Ok((t == left_ips).then_some(()))
    })
    .unwrap();
    let out = c.cli(0, &["exec", "a.1", "sh", "-c", &script.replace("seq 60", "seq 20")]);
    let seen: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
    assert_eq!(seen.len(), 2, "after scale-down: {seen:?}");
}

/// `shoal daemon --userns-remap`: every task runs in a user namespace
/// (root inside, an unprivileged id on the host), and still serves port 80
/// on an overlay network to tasks on other hosts, reads its secret, and
/// answers `shoal exec` as root of its own namespace.
#[test]
fn remapped_tasks_serve_on_the_overlay() {
    let mut c = Cluster::hosts(2).unwrap();
    let start = 1_000_000 + (std::process::id() % 1000) * 65536;
    let opts = DaemonOpts { extra: vec!["--userns-remap".into(), format!("{start}:65536")] };
    c.init(0, &opts).unwrap();
    c.join(1, 0, "worker", &opts).unwrap();
    c.wait_converged(0, 1, 2).unwrap();
    c.import_busybox(0, "busybox:latest").unwrap();
    c.cli_ok(0, &["network", "create", "front"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("token");
    std::fs::write(&f, "t0ken").unwrap();
    c.cli_ok(0, &["secret", "create", "token", &f.display().to_string()]).unwrap();
    let mut args = vec!["--name", "web", "--network", "front", "--secret", "token", "--constraint", "node.name==n1"];
    let w = web("remapped");
    args.extend(w.iter().map(String::as_str));
    create(&c, &args);
    create(&c, &["--name", "client", "--network", "front", "--constraint", "node.name==n0", "busybox:latest", "sleep", "1d"]);
    running(&c, "web", 1);
    running(&c, "client", 1);
    fetch_ok(&c, "client.1", "http://web", "remapped");
    let out = c.cli(0, &["exec", "web.1", "sh", "-c", "id -u; tr -s ' ' < /proc/self/uid_map; cat /run/secrets/token"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(text, format!("0\n 0 {start} 65536\nt0ken"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Who asked a fake resolver which name.
type Asked = std::sync::Arc<std::sync::Mutex<Vec<(std::net::SocketAddr, String)>>>;

/// A fake upstream resolver on the test's own bridge address: answers
/// `outside.example` with 203.0.113.7 and everything else NXDOMAIN,
/// and records who asked. Raw DNS, enough for one question.
fn fake_resolver(c: &Cluster) -> (std::net::SocketAddr, Asked, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    shoal_tests::client_address(c);
    let sock = std::net::UdpSocket::bind(format!("{}:0", shoal_tests::CLIENT_IP)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let addr = sock.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s, st) = (seen.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
            let q = &buf[..n];
            // The question's name: labels from byte 12 to a zero byte.
            let (mut at, mut labels) = (12, Vec::new());
            while at < n && q[at] != 0 {
                let len = q[at] as usize;
                labels.push(String::from_utf8_lossy(&q[(at + 1).min(n)..(at + 1 + len).min(n)]).to_string());
                at += 1 + len;
            }
            let end = (at + 5).min(n);
            let name = labels.join(".");
            s.lock().unwrap().push((from, name.clone()));
            // An A question for the one name it knows (AAAA: no records).
            let is_a = end >= 4 && q[end - 4..end - 2] == [0, 1];
            let known = name.eq_ignore_ascii_case("outside.example");
            let found = known && is_a;
            let mut r = vec![q[0], q[1], 0x81, if known { 0x80 } else { 0x83 }, 0, 1, 0, u8::from(found), 0, 0, 0, 0];
            r.extend_from_slice(&q[12..end]);
            if found {
                r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 203, 0, 113, 7]);
            }
            let _ = sock.send_to(&r, from);
        }
    });
    (addr, seen, stop)
}

/// Names that are not services go to the node's resolver (here a fake
/// one, named with `--dns-upstream`), and its answers come back to the
/// task; the node's DNS server also answers over TCP.
#[test]
fn other_names_go_to_the_upstream_resolver() {
    let mut c = Cluster::hosts(1).unwrap();
    let (upstream, seen, stop) = fake_resolver(&c);
    c.init(0, &DaemonOpts { extra: vec!["--dns-upstream".into(), upstream.to_string()] }).unwrap();
    c.wait_converged(0, 1, 1).unwrap();
    c.import_busybox(0, "busybox:latest").unwrap();
    c.cli_ok(0, &["network", "create", "front"]).unwrap();
    create(&c, &["--name", "a", "--network", "front", "busybox:latest", "sleep", "1d"]);
    let a = running(&c, "a", 1);
    wait_for(T, "outside.example to resolve through the upstream", || {
        if lookup(&c, "a.1", "outside.example") == Some(vec!["203.0.113.7".to_string()]) {
            return Ok(Some(()));
        }
        let out = c.cli(0, &["exec", "a.1", "nslookup", "outside.example"]);
        let asked = seen.lock().unwrap().len();
        anyhow::bail!("nslookup said {} {}; the resolver was asked {asked} times", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails()));
    // The node asked, from its own address; an unknown name is NXDOMAIN.
    assert!(seen.lock().unwrap().iter().any(|(from, name)| from.ip() == c.hosts[0].ip && name == "outside.example"), "{:?}", seen.lock().unwrap());
    assert_eq!(lookup(&c, "a.1", "nothing.example"), None);
    assert!(seen.lock().unwrap().iter().any(|(_, name)| name == "nothing.example"));
    // Service names never leave the node.
    assert_eq!(lookup(&c, "a.1", "a").map(|v| v.len()), Some(1));
    assert!(!seen.lock().unwrap().iter().any(|(_, name)| name == "a"));
    // Over TCP: a length-prefixed query for tasks.a gets an answer that
    // holds the task's address (busybox nslookup only speaks UDP).
    // The node's DNS server, as the task's resolv.conf names it.
    let out = c.cli(0, &["exec", "a.1", "cat", "/etc/resolv.conf"]);
    let resolv = String::from_utf8_lossy(&out.stdout).into_owned();
    let gateway = resolv.lines().find_map(|l| l.strip_prefix("nameserver ")).unwrap_or_else(|| panic!("resolv.conf: {resolv}")).trim().to_string();
    let query = r"\000\031\022\064\001\000\000\001\000\000\000\000\000\000\005tasks\001a\000\000\001\000\001";
    let task_ip: std::net::Ipv4Addr = ip(&a[0], 0).parse().unwrap();
    let script = format!("printf '{query}' | nc -w 2 {gateway} 53 | od -An -tu1 -v");
    let out = c.cli(0, &["exec", "a.1", "sh", "-c", &script]);
    let bytes: Vec<u8> = String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|b| b.parse().ok()).collect();
    assert!(bytes.len() > 2 + 12 && bytes[2..4] == [0x12, 0x34], "TCP answer {bytes:?} ({})", String::from_utf8_lossy(&out.stderr));
    assert!(bytes.windows(4).any(|w| w == task_ip.octets()), "TCP answer {bytes:?} lacks {task_ip}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// `nft ARGS` (or `nft -f -` with `script`) in host `i`'s namespace.
fn host_nft(c: &Cluster, i: usize, args: &[&str], script: Option<&str>) -> String {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", c.hosts[i].netns)).arg("nft").args(args);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(s) = script {
        stdin.write_all(s.as_bytes()).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "nft {args:?} in {}: {}", c.hosts[i].name, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A host whose firewall drops forwarded packets (Docker's FORWARD policy)
/// still carries the overlay: shoal accepts its own interfaces at the top
/// of that chain, leaves the host's rules and policy as they are, puts its
/// accepts back when the host's rules are reloaded, and removes them with
/// its table when it stops with no task on a network.
#[test]
fn overlay_works_where_the_host_drops_forwarded_packets() {
    let mut c = Cluster::hosts(3).unwrap();
    // Each host's own firewall, as Docker leaves it (in the host's
    // namespace only: the root namespace's firewall is never touched).
    let docker_like = "table ip filter {\n  chain FORWARD {\n    type filter hook forward priority 0; policy drop;\n    iifname \"docker0\" accept\n  }\n}\n";
    for i in 0..3 {
        host_nft(&c, i, &["-f", "-"], Some(docker_like));
    }
    let opts = DaemonOpts::default();
    c.init(0, &opts).unwrap();
    c.join(1, 0, "worker", &opts).unwrap();
    c.join(2, 0, "worker", &opts).unwrap();
    c.wait_converged(0, 1, 3).unwrap();
    c.import_busybox(0, "busybox:latest").unwrap();
    c.cli_ok(0, &["network", "create", "front"]).unwrap();
    let mut args = vec!["--name", "b", "--network", "front", "--constraint", "node.name==n2"];
    let cmd = web("B-BEHIND-DROP");
    args.extend(cmd.iter().map(String::as_str));
    create(&c, &args);
    create(&c, &["--name", "a", "--network", "front", "--constraint", "node.name==n1", "busybox:latest", "sleep", "1d"]);
    running(&c, "b", 1);
    running(&c, "a", 1);
    // Across hosts, by name (the VIP): through both hosts' FORWARD chains.
    fetch_ok(&c, "a.1", "http://b/", "B-BEHIND-DROP");
    // Egress to the underlay.
    let (url, server, stop) = underlay_server(&c, "EGRESS-BEHIND-DROP");
    fetch_ok(&c, "a.1", &url, "EGRESS-BEHIND-DROP");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap();

    // The host's chain: its policy and its rule kept, shoal's four accepts
    // first.
    let chain = |c: &Cluster, i: usize| host_nft(c, i, &["list", "chain", "ip", "filter", "FORWARD"], None);
    let listing = chain(&c, 1);
    assert!(listing.contains("policy drop;") && listing.contains("iifname \"docker0\" accept"), "{listing}");
    let rules: Vec<&str> = listing.lines().map(str::trim).filter(|l| l.contains("accept")).collect();
    assert_eq!(rules.len(), 5, "{listing}");
    assert!(rules[..4].iter().all(|r| r.ends_with("comment \"shoal overlay\"")), "{listing}");

    // A firewall reload drops them: the daemon puts them back.
    host_nft(&c, 1, &["flush", "chain", "ip", "filter", "FORWARD"], None);
    wait_for(Duration::from_secs(30), "n1's daemon to accept its interfaces again", || {
        Ok((chain(&c, 1).matches("shoal overlay").count() == 4).then_some(()))
    })
    .unwrap();
    fetch_ok(&c, "a.1", "http://b/", "B-BEHIND-DROP");

    // Cleanup: a node that stops with no task on a network takes its
    // table and its accepts out, and only them.
    c.cli_ok(0, &["service", "rm", "b"]).unwrap();
    let namespaces = c.hosts[2].data_dir.join("netns");
    wait_for(T, "n2's last task to go", || {
        let left = std::fs::read_dir(&namespaces).map(|d| d.count()).unwrap_or(0);
        Ok((bridges(&c, 2).is_empty() && left == 0).then_some(()))
    })
    .unwrap();
    c.stop(2);
    let listing = chain(&c, 2);
    assert!(!listing.contains("shoal overlay") && listing.contains("iifname \"docker0\" accept") && listing.contains("policy drop;"), "{listing}\n{}", c.log_tail(2));
    assert!(!host_nft(&c, 2, &["list", "tables"], None).contains("inet shoal"));
}

/// Host `i`'s network bridges (`shn…`) and the addresses on them.
fn bridges(c: &Cluster, i: usize) -> Vec<String> {
    sh("ip", &["-n", &c.hosts[i].netns, "-o", "addr", "show"])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|n| n.starts_with("shn")) && l.contains(" inet "))
        .map(|l| l.split_whitespace().take(4).collect::<Vec<_>>().join(" "))
        .collect()
}

/// A network's bridge (and its gateway address, and its rules) lives as
/// long as the network has tasks on the node: it goes with the last one,
/// and comes back with the next, also when one task stops while another
/// starts.
#[test]
fn bridges_go_with_their_networks_last_task() {
    let mut c = Cluster::hosts(1).unwrap();
    c.init(0, &DaemonOpts::default()).unwrap();
    c.wait_converged(0, 1, 1).unwrap();
    c.import_busybox(0, "busybox:latest").unwrap();
    c.cli_ok(0, &["network", "create", "solo"]).unwrap();
    let mut args = vec!["--name", "b", "--network", "solo"];
    let cmd = web("SOLO");
    args.extend(cmd.iter().map(String::as_str));
    create(&c, &args);
    let b = running(&c, "b", 1);
    let gateway = c.cli_ok(0, &["exec", "b.1", "cat", "/etc/resolv.conf"]).unwrap();
    let gateway = gateway.as_str().unwrap().lines().find_map(|l| l.strip_prefix("nameserver ")).unwrap().trim().to_string();
    let held = bridges(&c, 0);
    assert!(held.len() == 1 && held[0].contains(&format!("{gateway}/")), "{held:?}");
    let bridge = held[0].split_whitespace().nth(1).unwrap().to_string();
    let resolves_to = |want: &[String]| {
        wait_for(T, &format!("tasks.b to be {want:?} from inside"), || {
            let mut got = lookup(&c, "b.1", "tasks.b").unwrap_or_default();
            got.sort();
            if got != want {
                anyhow::bail!("got {got:?}; tasks {:?}", tasks(&c, "b").iter().map(|t| format!("{} {} {}", t["id"], t["state"], t["address"])).collect::<Vec<_>>());
            }
            Ok(Some(()))
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails()));
    };
    resolves_to(&[ip(&b[0], 0)]);
    let mut previous = b[0]["id"].as_str().unwrap().to_string();

    // Replaced in place, one stopping as the next starts (both orders):
    // the new task has its bridge, gateway and DNS.
    for (i, order) in ["stop-first", "start-first"].iter().enumerate() {
        let env = format!("ROUND={i}");
        c.cli_ok(0, &["service", "update", "--detach", "--update-order", order, "--env-add", &env, "b"]).unwrap();
        let b = wait_for(T, "b's new task to run", || {
            let all = tasks(&c, "b");
            let t: Vec<Value> = all.iter().filter(|t| t["state"] == "running").cloned().collect();
            Ok((t.len() == 1 && t[0]["id"] != previous.as_str()).then_some(t))
        })
        .unwrap();
        previous = b[0]["id"].as_str().unwrap().to_string();
        resolves_to(&[ip(&b[0], 0)]);
    }
    // All gone, then back at once: tasks stopping while others start.
    c.cli_ok(0, &["service", "scale", "--detach", "b=0"]).unwrap();
    c.cli_ok(0, &["service", "scale", "--detach", "b=2"]).unwrap();
    let b = running(&c, "b", 2);
    let mut ips: Vec<String> = b.iter().map(|t| ip(t, 0)).collect();
    ips.sort();
    resolves_to(&ips);
    assert_eq!(bridges(&c, 0).len(), 1, "{:?}", bridges(&c, 0));

    // The last task goes: the bridge, its address and its rules go too.
    c.cli_ok(0, &["service", "rm", "b"]).unwrap();
    // The bridge goes first, then its rules: wait for both.
    wait_for(T, "the network's bridge and its rules to go", || {
        let links = sh("ip", &["-n", &c.hosts[0].netns, "link", "show"])?;
        let table = host_nft(&c, 0, &["list", "table", "inet", "shoal"], None);
        if bridges(&c, 0).is_empty() && !links.contains(&bridge) && !table.contains(&bridge) {
            Ok(Some(()))
        } else {
            anyhow::bail!("links:\n{links}\ntable:\n{table}")
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails()));
    // And a new task brings them back.
    create(&c, &["--name", "again", "--network", "solo", "busybox:latest", "sleep", "1d"]);
    running(&c, "again", 1);
    assert_eq!(bridges(&c, 0).len(), 1);
    wait_for(T, "again to resolve itself", || Ok(lookup(&c, "again.1", "again").map(|_| ()))).unwrap();
}

/// The interfaces in task `from`'s namespace, `lo` aside.
fn interfaces(c: &Cluster, from: &str) -> Vec<String> {
    let out = c.cli(0, &["exec", from, "cat", "/proc/net/dev"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_string()))
        .filter(|n| n != "lo")
        .collect()
}

/// `service update --network-add` gives the service's new task an
/// interface and a name on that network; `--network-rm` takes both away.
#[test]
fn networks_added_and_removed_by_update() {
    let mut c = Cluster::hosts(1).unwrap();
    c.init(0, &DaemonOpts::default()).unwrap();
    c.wait_converged(0, 1, 1).unwrap();
    c.import_busybox(0, "busybox:latest").unwrap();
    c.cli_ok(0, &["network", "create", "front"]).unwrap();
    c.cli_ok(0, &["network", "create", "back"]).unwrap();
    let mut args = vec!["--name", "b", "--network", "back"];
    let cmd = web("ON-BACK");
    args.extend(cmd.iter().map(String::as_str));
    create(&c, &args);
    create(&c, &["--name", "a", "--network", "front", "busybox:latest", "sleep", "1d"]);
    running(&c, "b", 1);
    let a = running(&c, "a", 1);
    assert_eq!(interfaces(&c, "a.1"), ["eth0"]);
    assert_eq!(lookup(&c, "a.1", "b"), None, "b is not on a's network");
    assert_eq!(lookup(&c, "b.1", "a"), None);
    let svc = c.cli_ok(0, &["service", "inspect", "b", "--format", "json"]).unwrap();
    let b_vip = svc["vips"]["back"].as_str().unwrap().to_string();

    // A new task of a, on both networks (the old one may still be
    // stopping: stop-first lets it drain).
    let replaced = |old: &[&Value], addresses: usize| {
        wait_for(T, &format!("a's task on {addresses} networks"), || {
            let t: Vec<Value> = tasks(&c, "a")
                .into_iter()
                .filter(|t| t["state"] == "running" && t["desired_state"] == "running" && old.iter().all(|o| o["id"] != t["id"]))
                .collect();
            Ok((t.len() == 1 && t[0]["address"].as_array().map(Vec::len) == Some(addresses)).then(|| t[0].clone()))
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails()))
    };
    c.cli_ok(0, &["service", "update", "--detach", "--network-add", "back", "a"]).unwrap();
    let a2 = replaced(&[&a[0]], 2);
    wait_for(T, "a to see eth0 and eth1", || Ok((interfaces(&c, "a.1") == ["eth0", "eth1"]).then_some(()))).unwrap();
    wait_for(T, "b to resolve from a", || Ok((lookup(&c, "a.1", "b") == Some(vec![b_vip.clone()])).then_some(()))).unwrap();
    fetch_ok(&c, "a.1", "http://b/", "ON-BACK");
    // a answers to its name on back now: b finds it at its VIP there.
    let svc = c.cli_ok(0, &["service", "inspect", "a", "--format", "json"]).unwrap();
    let a_vip_back = svc["vips"]["back"].as_str().unwrap().to_string();
    wait_for(T, "a to resolve from b", || Ok((lookup(&c, "b.1", "a") == Some(vec![a_vip_back.clone()])).then_some(()))).unwrap();

    // And off back again.
    c.cli_ok(0, &["service", "update", "--detach", "--network-rm", "back", "a"]).unwrap();
    let a3 = replaced(&[&a[0], &a2], 1);
    assert!(a3["address"][0].as_str().unwrap().starts_with(&ip(&a[0], 0)[..7]), "front address: {a3}");
    wait_for(T, "a to have eth0 only", || Ok((interfaces(&c, "a.1") == ["eth0"]).then_some(()))).unwrap();
    wait_for(T, "a to leave b's DNS", || Ok(lookup(&c, "b.1", "a").is_none().then_some(()))).unwrap();
    assert_eq!(lookup(&c, "a.1", "b"), None);
    assert_eq!(fetch(&c, "a.1", &format!("http://{b_vip}/")), None, "a still reaches back");
    // Bad input changes nothing.
    for (args, want) in [
        (&["service", "update", "--detach", "--network-rm", "back", "a"][..], "not on network"),
        (&["service", "update", "--detach", "--network-add", "front", "a"], "already"),
        (&["service", "update", "--detach", "--network-add", "nosuch", "a"], "nosuch"),
    ] {
        let out = c.cli(0, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{args:?}: {err}");
    }
    let now: Vec<Value> = tasks(&c, "a").into_iter().filter(|t| t["desired_state"] == "running").collect();
    assert_eq!(now.len(), 1);
    assert_eq!(now[0]["id"], a3["id"], "a refused update replaced the task: {:#?}", tasks(&c, "a"));
}

/// Running out of room is a clear error that changes nothing: a pool
/// with no /20 left at `network create`, a network with no slice left for
/// another node at task start.
#[test]
fn exhausted_pools_and_networks_are_clear_errors() {
    let mut c = Cluster::hosts(2).unwrap();
    // Room for two networks of the pool.
    c.init(0, &DaemonOpts { extra: vec!["--address-pool".into(), "100.70.0.0/19".into()] }).unwrap();
    c.join(1, 0, "worker", &DaemonOpts::default()).unwrap();
    c.wait_converged(0, 1, 2).unwrap();
    c.import_busybox(0, "busybox:latest").unwrap();
    c.cli_ok(0, &["network", "create", "one"]).unwrap();
    c.cli_ok(0, &["network", "create", "two"]).unwrap();
    let before = c.cli_ok(0, &["network", "ls", "--format", "json"]).unwrap();
    let out = c.cli(0, &["network", "create", "three"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("the network pool 100.70.0.0/19 has no free /20 left"), "{err}");
    assert_eq!(c.cli_ok(0, &["network", "ls", "--format", "json"]).unwrap(), before);

    // A /25 has one slice for tasks (the other holds the VIPs): the first
    // node to run a task there takes it, another node has none.
    c.cli_ok(0, &["network", "create", "--subnet", "100.70.32.0/25", "small"]).unwrap();
    create(&c, &["--name", "first", "--network", "small", "--constraint", "node.name==n0", "busybox:latest", "sleep", "1d"]);
    running(&c, "first", 1);
    create(&c, &["--name", "late", "--network", "small", "--constraint", "node.name==n1", "--restart-condition", "none", "busybox:latest", "sleep", "1d"]);
    let rejected = wait_for(T, "late's task to be rejected", || {
        Ok(tasks(&c, "late").into_iter().find(|t| t["state"] == "rejected"))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails()));
    let error = rejected["error"].as_str().unwrap();
    assert!(error.contains("network \"small\" (100.70.32.0/25) has no free address"), "{rejected}");
    assert!(rejected["address"].as_array().is_none_or(Vec::is_empty), "{rejected}");
    // Nothing changed: n1 holds no slice, first still runs and resolves.
    let small = c.cli_ok(0, &["network", "inspect", "small", "--format", "json"]).unwrap();
    assert!(small["slices"]["n0"].is_array() && small["slices"].get("n1").is_none_or(Value::is_null), "{small}");
    assert_eq!(tasks(&c, "late").iter().filter(|t| t["state"] == "running").count(), 0);
    running(&c, "first", 1);
    assert!(lookup(&c, "first.1", "first").is_some());
}
