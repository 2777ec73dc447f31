//! Certificates with a lifecycle, through real daemons: revocation on
//! `node demote`/`node rm`/`client-cert rm` checked by every service,
//! servers proving their role, renewal past several expiries, client
//! identities, promotion through a follower, and an `--init` that resumes
//! after stopping halfway.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use shoal_proto::agent::agent_client::AgentClient;
use shoal_proto::agent::ExecRequest;
use shoal_proto::dispatcher::dispatcher_client::DispatcherClient;
use shoal_proto::dispatcher::AssignmentsRequest;
use shoal_proto::raft::raft_client::RaftClient;
use shoal_proto::raft::RaftPayload;
use shoal_security::pki::{self, PeerCert};
use shoal_tests::{cli_json, netns::in_netns, wait_for, Cluster, DaemonOpts};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn node_cert(c: &Cluster, i: usize) -> anyhow::Result<PeerCert> {
    let pem = std::fs::read_to_string(c.hosts[i].data_dir.join("tls/node.pem"))?;
    Ok(pki::pem_identity(&pem)?)
}

/// A copy of host `i`'s node credentials as a CLI cert dir, as they are now.
fn keep_credentials(c: &Cluster, i: usize, name: &str) -> anyhow::Result<PathBuf> {
    let dir = c.dir.join(name);
    std::fs::create_dir_all(&dir)?;
    let tls = c.hosts[i].data_dir.join("tls");
    std::fs::copy(tls.join("ca.pem"), dir.join("ca.pem"))?;
    std::fs::copy(tls.join("node.pem"), dir.join("cert.pem"))?;
    std::fs::copy(tls.join("node-key.pem"), dir.join("key.pem"))?;
    Ok(dir)
}

/// A channel to `addr` presenting the credentials in `dir`, expecting the
/// server to be `server_name`.
async fn channel(addr: &str, dir: &Path, server_name: &str) -> anyhow::Result<tonic::transport::Channel> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |f: &str| std::fs::read_to_string(dir.join(f));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(read("cert.pem")?, read("key.pem")?))
        .domain_name(server_name);
    Ok(Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?.connect().await?)
}

fn refusal<T>(r: Result<T, tonic::Status>) -> String {
    match r {
        Ok(_) => "accepted".into(),
        Err(s) => format!("{:?}: {}", s.code(), s.message()),
    }
}

fn node_id(c: &Cluster, via: usize, name: &str) -> anyhow::Result<String> {
    let n = c.cli_ok(via, &["node", "inspect", name, "--format", "json"])?;
    Ok(n["id"].as_str().context("id")?.to_string())
}

#[test]
fn revoked_certificates_are_refused_by_every_service() -> anyhow::Result<()> {
    let mut c = Cluster::start(3, 2)?;
    let leader = c.leader(0)?;
    let victim = (0..3).find(|i| *i != leader).context("a follower")?;
    let follower = (0..3).find(|i| *i != leader && *i != victim).context("another follower")?;
    let victim_name = c.hosts[victim].name.clone();
    let victim_id = u64::from_str_radix(&node_id(&c, leader, &victim_name)?, 16)?;
    let worker = 3;
    let worker_id = node_id(&c, leader, "n3")?;
    let old_manager = keep_credentials(&c, victim, "victim-manager")?;

    // Demote: the victim's manager certificate is revoked cluster-wide; the
    // node picks up a worker certificate and goes on as a worker.
    let out = c.cli(leader, &["node", "demote", &victim_name]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(Duration::from_secs(30), "the demoted node to switch to a worker certificate", || {
        Ok((node_cert(&c, victim)?.role == pki::CertRole::Worker).then_some(()))
    })?;
    c.wait_converged(leader, 2, 5)?;

    // Control, through the CLI.
    let addr = c.hosts[leader].addr();
    let out = c.cli_with(leader, &addr, &old_manager, &["service", "ls"]);
    assert!(!out.status.success() && stderr(&out).contains("revoked"), "control: {}", stderr(&out));
    // Raft, Dispatcher, and the Agent service of the leader and of a
    // worker (which learns the revocation from its heartbeat).
    let worker_addr = c.hosts[worker].addr();
    let node_name = pki::node_dns_name(&worker_id);
    let leader_name = pki::node_dns_name(&node_id(&c, leader, &c.hosts[leader].name)?);
    let dir = old_manager.clone();
    let refusals = in_netns(&c.hosts[leader].netns.clone(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let m = channel(&addr, &dir, pki::CLUSTER_DNS_NAME).await?;
            let raft = refusal(RaftClient::new(m.clone()).vote(RaftPayload { data: vec![] }).await);
            let dispatcher = refusal(DispatcherClient::new(m.clone()).assignments(AssignmentsRequest { node_id: victim_id, ..Default::default() }).await);
            let exec = |ch: tonic::transport::Channel| async move {
                let req = ExecRequest { task_id: "none".into(), cmd: vec!["true".into()], ..Default::default() };
                refusal(AgentClient::new(ch).exec(req).await)
            };
            let leader_agent = exec(channel(&addr, &dir, &leader_name).await?).await;
            // The worker hears of the revocation on its next heartbeat.
            let deadline = Instant::now() + Duration::from_secs(15);
            let worker_agent = loop {
                let r = exec(channel(&worker_addr, &dir, &node_name).await?).await;
                if r.contains("revoked") || Instant::now() > deadline {
                    break r;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            anyhow::Ok([("raft", raft), ("dispatcher", dispatcher), ("leader's agent", leader_agent), ("worker's agent", worker_agent)])
        })
    })?;
    for (what, r) in &refusals {
        assert!(r.starts_with("Unauthenticated") && r.contains("revoked"), "{what} accepted a revoked certificate: {r}");
    }

    // node rm: the removed node's (worker) certificate is revoked too.
    let old_worker = keep_credentials(&c, victim, "victim-worker")?;
    c.stop(victim);
    let out = c.cli(leader, &["node", "rm", "--force", &victim_name]);
    assert!(out.status.success(), "{}", stderr(&out));
    let addr = c.hosts[leader].addr();
    let r = in_netns(&c.hosts[leader].netns.clone(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let w = channel(&addr, &old_worker, pki::CLUSTER_DNS_NAME).await?;
            anyhow::Ok(refusal(DispatcherClient::new(w).assignments(AssignmentsRequest { node_id: victim_id, ..Default::default() }).await))
        })
    })?;
    assert!(r.contains("revoked"), "dispatcher accepted a removed node's certificate: {r}");

    // Promotion through a follower: the promoted node asks to join the
    // Raft group with its own certificate, wherever it lands.
    let out = c.cli(follower, &["node", "promote", "n4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.wait_converged(leader, 3, 4)?;
    Ok(())
}

#[test]
fn a_worker_certificate_cannot_pose_as_a_manager() -> anyhow::Result<()> {
    use shoal_security::{NodeTls, Trust};
    let c = Cluster::start(1, 1)?;
    let tls = c.hosts[1].data_dir.join("tls");
    let read = |f: &str| std::fs::read_to_string(tls.join(f));
    let worker = NodeTls { ca_pem: read("ca.pem")?, cert_pem: read("node.pem")?, key_pem: read("node-key.pem")? };
    let worker_id = node_cert(&c, 1)?.subject;
    let manager_tls = c.hosts[0].data_dir.join("tls");
    let read = |f: &str| std::fs::read_to_string(manager_tls.join(f));
    let manager = NodeTls { ca_pem: read("ca.pem")?, cert_pem: read("node.pem")?, key_pem: read("node-key.pem")? };
    // An impostor server on loopback with the worker's real certificate.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?.to_string();
    let impostor = Trust::new(worker)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming_shutdown(impostor.incoming(listener), async move {
                let _ = stopped.await;
            })
            .await
    });
    // The CLI refuses it.
    let out = std::process::Command::new(shoal_tests::shoal_bin())
        .args(["--host", &addr, "--cert-dir"])
        .arg(c.cert_dir())
        .args(["cluster", "status"])
        .output()?;
    assert!(!out.status.success(), "the CLI trusted a worker as a manager");
    assert!(stderr(&out).contains("cannot reach manager"), "{}", stderr(&out));
    // So does an agent (or a manager) looking for a manager; the same
    // certificate is fine as the node it names.
    let (as_manager, as_node) = rt.block_on(async {
        let me = Trust::new(manager)?;
        let ask = |ch: tonic::transport::Channel| async move {
            refusal(DispatcherClient::new(ch).assignments(AssignmentsRequest { node_id: 1, ..Default::default() }).await)
        };
        anyhow::Ok((ask(me.channel(&addr)?).await, ask(me.node_channel(&addr, &worker_id)?).await))
    })?;
    assert!(as_manager.contains("NotValidForName") || as_manager.contains("not valid for name"), "{as_manager}");
    assert!(as_node.starts_with("Unimplemented"), "the worker's own name must pass TLS: {as_node}");
    let _ = stop.send(());
    rt.block_on(server)??;
    Ok(())
}

#[test]
fn nodes_renew_their_certificates_and_keep_working_past_several_expiries() -> anyhow::Result<()> {
    let mut c = Cluster::start(1, 1)?;
    c.import_busybox(0, "bb:1")?;
    let v = c.cli_ok(0, &["cluster", "update", "--cert-expiry", "30s", "--format", "json"])?;
    assert_eq!(v["cert_expiry_s"], 30, "{v}");
    let start = Instant::now();
    // Each node switches to a 30 s certificate at once (its 90-day one
    // outlives the policy), then renews at two thirds of it, again and
    // again: four serials each means the first two have expired.
    let mut seen: Vec<std::collections::BTreeSet<String>> = vec![Default::default(); 2];
    let initial: Vec<String> = (0..2).map(|i| node_cert(&c, i).map(|p| p.serial)).collect::<Result<_, _>>()?;
    wait_for(Duration::from_secs(150), "four renewals on every node", || {
        for (i, s) in seen.iter_mut().enumerate() {
            let p = node_cert(&c, i)?;
            if p.serial != initial[i] {
                assert!(p.not_after_ms - p.not_before_ms <= 95_000, "node {i} got a certificate beyond the policy: {p:?}");
                s.insert(p.serial);
            }
        }
        // The cluster answers all along.
        c.cli_ok(0, &["cluster", "status", "--format", "json"])?;
        Ok(seen.iter().all(|s| s.len() >= 4).then_some(()))
    })
    .with_context(|| c.log_tails())?;
    assert!(start.elapsed() > Duration::from_secs(50), "renewals came faster than two thirds of 30 s: {:?}", start.elapsed());
    // New connections everywhere: a service on both nodes, exec into the
    // worker's task (manager → agent), and the worker restarted on its
    // renewed certificate from disk.
    c.cli_ok(0, &["service", "create", "--detach", "--name", "web", "--replicas", "2", "--format", "json", "bb:1", "sleep", "3600"])?;
    let tasks = wait_for(Duration::from_secs(60), "both tasks running", || {
        let t = c.cli_ok(0, &["service", "ps", "web", "--format", "json"])?;
        let running = t.as_array().map(|a| a.iter().filter(|t| t["state"] == "running").count()).unwrap_or(0);
        Ok((running == 2).then_some(t))
    })?;
    let on_worker = tasks.as_array().context("tasks")?.iter().find(|t| t["node"] == "n1").context("a task on n1")?;
    let id = on_worker["id"].as_str().context("id")?;
    let out = c.cli(0, &["exec", id, "echo", "renewed"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("renewed"), "{}", stderr(&out));
    c.stop(1);
    c.restart(1)?;
    wait_for(Duration::from_secs(30), "the restarted worker to heartbeat again", || {
        let n = c.cli_ok(0, &["node", "inspect", "n1", "--format", "json"])?;
        let t = c.cli_ok(0, &["service", "ps", "web", "--format", "json"])?;
        let running = t.as_array().map(|a| a.iter().filter(|t| t["state"] == "running" && t["node"] == "n1").count()).unwrap_or(0);
        Ok((n["status"] == "ready" && running == 1).then_some(()))
    })
    .with_context(|| c.log_tails())?;
    let out = c.cli(0, &["cluster", "update", "--cert-expiry", "1s"]);
    assert!(!out.status.success() && stderr(&out).contains("too short"), "{}", stderr(&out));
    Ok(())
}

#[test]
fn client_identities_are_issued_used_and_revoked() -> anyhow::Result<()> {
    let c = Cluster::start(1, 0)?;
    let addr = c.hosts[0].addr();
    let ops = c.dir.join("ops");
    let v = c.cli_ok(0, &["client-cert", "create", "ops", "--out", &ops.display().to_string(), "--format", "json"])?;
    assert_eq!(v["name"], "ops");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ops.join("key.pem"))?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key is private");
    }
    cli_json(&["service", "ls"], c.cli_with(0, &addr, &ops, &["service", "ls", "--format", "json"]))?;
    let names: Vec<String> = c.cli_ok(0, &["client-cert", "ls", "--format", "json"])?
        .as_array()
        .context("list")?
        .iter()
        .filter_map(|x| x["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, ["admin", "ops"]);
    // Only the admin identity manages identities.
    let more = c.dir.join("more");
    let out = c.cli_with(0, &addr, &ops, &["client-cert", "create", "more", "--out", &more.display().to_string()]);
    assert!(!out.status.success() && stderr(&out).contains("only the admin"), "{}", stderr(&out));
    for (args, want) in [
        (vec!["client-cert", "create", "ops", "--out", "/nonexistent-x"], "already exists"),
        (vec!["client-cert", "create", "Bad Name", "--out", "/nonexistent-y"], "invalid client name"),
        (vec!["client-cert", "rm", "admin"], "can't be removed"),
        (vec!["client-cert", "rm", "ghost"], "not found"),
    ] {
        let out = c.cli(0, &args);
        assert!(!out.status.success() && stderr(&out).to_lowercase().contains(want), "{args:?}: {}", stderr(&out));
    }
    c.cli(0, &["client-cert", "rm", "ops"]).status.success().then_some(()).context("client-cert rm")?;
    let out = c.cli_with(0, &addr, &ops, &["service", "ls"]);
    assert!(!out.status.success() && stderr(&out).contains("revoked"), "{}", stderr(&out));
    Ok(())
}

#[test]
fn an_init_stopped_halfway_finishes_on_the_next_start() -> anyhow::Result<()> {
    let mut c = Cluster::hosts(1)?;
    c.spawn_init(0, &DaemonOpts { extra: vec!["--fault-stop-init-after-bootstrap".into()] })?;
    let status = c.wait_exit(0, Duration::from_secs(30))?;
    assert!(!status.success(), "the fault must stop the daemon");
    assert!(c.log_tail(0).contains("fault injected"), "{}", c.log_tail(0));
    // Started again, without --init: it finishes initialising.
    c.restart(0)?;
    wait_for(Duration::from_secs(30), "the resumed cluster to answer", || {
        let st = c.cli_ok(0, &["cluster", "status", "--format", "json"])?;
        let token = c.cli_ok(0, &["join-token", "worker", "--format", "json"])?;
        Ok((st["leader"] == "n0" && token["token"].as_str().is_some_and(|t| t.starts_with("SHOAL-1-"))).then_some(()))
    })
    .with_context(|| c.log_tail(0))?;
    assert!(!c.hosts[0].data_dir.join("tls/ca-key.pem").exists(), "the CA key's bootstrap copy is gone once the state holds it");
    let nodes = c.cli_ok(0, &["node", "ls", "--format", "json"])?;
    assert_eq!(nodes.as_array().map(Vec::len), Some(1), "{nodes}");
    Ok(())
}

/// Runs the CLI in host `i`'s namespace with `input` on its stdin.
fn cli_stdin(c: &Cluster, i: usize, args: &[&str], input: &str) -> anyhow::Result<std::process::Output> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("timeout")
        .args(["--kill-after=5", "60", "nsenter"])
        .arg(format!("--net=/run/netns/{}", c.hosts[i].netns))
        .arg(shoal_tests::shoal_bin())
        .args(["--host", &c.hosts[i].addr(), "--cert-dir"])
        .arg(c.cert_dir())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(format!("{input}\n").as_bytes())?;
    Ok(child.wait_with_output()?)
}

#[test]
fn secrets_are_sealed_at_rest_and_an_autolocked_manager_restarts_locked() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::start(1, 0)?;
    let dir = c.hosts[0].data_dir.clone();
    let plaintext = "correct-horse-battery-staple-4821";
    let file = c.dir.join("secret.txt");
    std::fs::write(&file, plaintext)?;
    c.cli_ok(0, &["secret", "create", "db_password", &file.display().to_string(), "--format", "json"])?;
    // The log holds the CA key, the token secrets and the secret: sealed.
    let db = std::fs::read(dir.join("raft.redb"))?;
    let has = |needle: &[u8]| db.windows(needle.len()).any(|w| w == needle);
    assert!(!has(b"PRIVATE KEY"), "a PEM private key is in the clear in raft.redb");
    assert!(!has(plaintext.as_bytes()), "the secret is in the clear in raft.redb");
    for (path, want) in [(dir.clone(), 0o700), (dir.join("raft.redb"), 0o600), (dir.join("keys/raft.key"), 0o600)] {
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, want, "{}", path.display());
    }
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(dir.join("raft.redb"))
        .output()?;
    assert!(!out.status.success(), "another user read raft.redb");

    // Autolock: the data key is sealed with the unlock key...
    let v = c.cli_ok(0, &["cluster", "update", "--autolock", "--format", "json"])?;
    let key = v["unlock_key"].as_str().context("unlock key")?.to_string();
    assert!(key.starts_with("SHOALKEY-1-"), "{v}");
    wait_for(Duration::from_secs(10), "the data key to be sealed", || {
        Ok(std::fs::read_to_string(dir.join("keys/raft.key"))?.contains("\"sealed\":true").then_some(()))
    })?;
    assert_eq!(c.cli_ok(0, &["cluster", "unlock-key", "--format", "json"])?["unlock_key"], key.as_str());
    // ...so a restarted manager is locked until it gets it.
    c.stop(0);
    c.restart(0)?;
    let locked = wait_for(Duration::from_secs(20), "the restarted manager to answer, locked", || {
        let out = c.cli(0, &["cluster", "status"]);
        Ok((!out.status.success() && stderr(&out).contains("autolock")).then(|| stderr(&out)))
    })?;
    assert!(locked.contains("shoal cluster unlock"), "{locked}");
    let wrong = shoal_security::at_rest::format_unlock_key(&shoal_security::at_rest::Key::random()?);
    let out = cli_stdin(&c, 0, &["cluster", "unlock"], &wrong)?;
    assert!(!out.status.success() && stderr(&out).contains("wrong unlock key"), "{}", stderr(&out));
    let out = cli_stdin(&c, 0, &["cluster", "unlock"], "not a key")?;
    assert!(!out.status.success() && stderr(&out).contains("malformed"), "{}", stderr(&out));
    let out = cli_stdin(&c, 0, &["cluster", "unlock"], &key)?;
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(Duration::from_secs(30), "the unlocked manager to lead again with its state", || {
        let st = c.cli_ok(0, &["cluster", "status", "--format", "json"])?;
        let secrets = c.cli_ok(0, &["secret", "ls", "--format", "json"])?;
        Ok((st["leader"] == "n0" && secrets.to_string().contains("db_password")).then_some(()))
    })
    .with_context(|| c.log_tail(0))?;
    // A rotated unlock key: the old one no longer opens a restarted manager.
    let sealed_before = std::fs::read_to_string(dir.join("keys/raft.key"))?;
    let rotated = c.cli_ok(0, &["cluster", "unlock-key", "--rotate", "--format", "json"])?["unlock_key"].as_str().context("key")?.to_string();
    assert_ne!(rotated, key);
    wait_for(Duration::from_secs(10), "the data key to be re-sealed", || {
        Ok((std::fs::read_to_string(dir.join("keys/raft.key"))? != sealed_before).then_some(()))
    })?;
    c.stop(0);
    c.restart(0)?;
    wait_for(Duration::from_secs(20), "the restarted manager to be locked", || {
        let out = c.cli(0, &["cluster", "status"]);
        Ok((!out.status.success() && stderr(&out).contains("autolock")).then_some(()))
    })?;
    let out = cli_stdin(&c, 0, &["cluster", "unlock"], &key)?;
    assert!(!out.status.success() && stderr(&out).contains("wrong unlock key"), "the old key still unlocks: {}", stderr(&out));
    let out = cli_stdin(&c, 0, &["cluster", "unlock"], &rotated)?;
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(Duration::from_secs(30), "the manager to lead again", || {
        Ok((c.cli_ok(0, &["cluster", "status", "--format", "json"])?["leader"] == "n0").then_some(()))
    })?;
    // Autolock off: the next restart needs no key.
    let v = c.cli_ok(0, &["cluster", "update", "--autolock=false", "--format", "json"])?;
    assert_eq!(v["autolock"], false);
    wait_for(Duration::from_secs(10), "the data key to be in the clear again", || {
        Ok(std::fs::read_to_string(dir.join("keys/raft.key"))?.contains("\"sealed\":false").then_some(()))
    })?;
    c.stop(0);
    c.restart(0)?;
    wait_for(Duration::from_secs(30), "the manager to restart unlocked", || {
        Ok((c.cli_ok(0, &["cluster", "status", "--format", "json"])?["leader"] == "n0").then_some(()))
    })?;
    Ok(())
}

fn ca_cns(pem: &str) -> Vec<String> {
    pki::pem_common_names(pem)
}

#[test]
fn the_ca_rotates_without_the_cluster_stopping() -> anyhow::Result<()> {
    let mut c = Cluster::start(2, 1)?;
    c.import_busybox(0, "bb:1")?;
    let addr = c.hosts[0].addr();
    let old_ca = ca_cns(&std::fs::read_to_string(c.cert_dir().join("ca.pem"))?);
    // A second client identity, and a copy of the admin's as it is now.
    let ops = c.dir.join("ops");
    c.cli_ok(0, &["client-cert", "create", "ops", "--out", &ops.display().to_string(), "--format", "json"])?;
    let old_admin = c.dir.join("old-admin");
    std::fs::create_dir_all(&old_admin)?;
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        std::fs::copy(c.cert_dir().join(f), old_admin.join(f))?;
    }

    // Rotate: the CLI that asked renews its own identity on the way.
    let v = c.cli_ok(0, &["cluster", "ca", "--rotate", "--format", "json"])?;
    let new_ca = v["ca"].as_str().context("new CA name")?.to_string();
    assert!(!old_ca.contains(&new_ca), "{v}");
    let st = c.cli_ok(0, &["cluster", "status", "--format", "json"])?;
    assert_eq!(st["settings"]["ca_rotating"], true, "the ops identity still holds an old certificate: {st}");
    // The other identity renews itself while both CAs are trusted.
    cli_json(&["client-cert", "renew"], c.cli_with(0, &addr, &ops, &["client-cert", "renew", "--format", "json"]))?;
    // Every node switches to a certificate from the new CA; then the old
    // CA is dropped everywhere.
    wait_for(Duration::from_secs(60), "the rotation to complete on every node", || {
        let st = c.cli_ok(0, &["cluster", "status", "--format", "json"])?;
        let mut done = st["settings"]["ca_rotating"] == false;
        for i in 0..3 {
            let tls = c.hosts[i].data_dir.join("tls");
            done &= node_cert(&c, i)?.issuer == new_ca;
            done &= ca_cns(&std::fs::read_to_string(tls.join("ca.pem"))?) == [new_ca.clone()];
        }
        Ok(done.then_some(()))
    })
    .with_context(|| c.log_tails())?;
    // The cluster works on the new CA: a service on every node, exec into
    // the worker's task, the worker restarted on its new certificate.
    c.cli_ok(0, &["service", "create", "--detach", "--name", "web", "--mode", "global", "--format", "json", "bb:1", "sleep", "3600"])?;
    let tasks = wait_for(Duration::from_secs(60), "a task on every node", || {
        let t = c.cli_ok(1, &["service", "ps", "web", "--format", "json"])?;
        let running = t.as_array().map(|a| a.iter().filter(|t| t["state"] == "running").count()).unwrap_or(0);
        Ok((running == 3).then_some(t))
    })?;
    let on_worker = tasks.as_array().context("tasks")?.iter().find(|t| t["node"] == "n2").context("a task on n2")?;
    let out = c.cli(0, &["exec", on_worker["id"].as_str().context("id")?, "echo", "rotated"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("rotated"), "{}", stderr(&out));
    c.stop(2);
    c.restart(2)?;
    c.wait_converged(0, 2, 3)?;
    // Renewed identities work; the old CA's certificate does not.
    cli_json(&["service", "ls"], c.cli_with(0, &addr, &ops, &["service", "ls", "--format", "json"]))?;
    let out = c.cli_with(0, &addr, &old_admin, &["service", "ls"]);
    assert!(!out.status.success(), "a certificate from the old CA still works");
    // New nodes join with a token naming the new CA.
    let token = c.cli_ok(0, &["join-token", "worker", "--format", "json"])?;
    let new_fp = pki::fingerprint(&std::fs::read_to_string(c.hosts[0].data_dir.join("tls/ca.pem"))?)?;
    assert!(token["token"].as_str().is_some_and(|t| t.contains(&new_fp)), "{token}");
    let i = c.add_host()?;
    c.join(i, 0, "worker", &DaemonOpts::default())?;
    c.wait_converged(0, 2, 4)?;
    Ok(())
}
