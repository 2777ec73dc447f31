//! Cluster foundation, end to end: real `shoal daemon` processes in network
//! namespaces, driven through the `shoal` CLI.

use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use shoal_tests::{wait_for, Cluster, DaemonOpts};

const T: Duration = Duration::from_secs(60);

fn services(c: &Cluster, via: usize) -> anyhow::Result<Vec<(String, u64)>> {
    let v = c.cli_ok(via, &["service", "ls", "--format", "json"])?;
    let mut out: Vec<(String, u64)> = v
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|s| (s["name"].as_str().unwrap_or_default().to_string(), s["replicas_desired"].as_u64().unwrap_or(0)))
        .collect();
    out.sort();
    Ok(out)
}

fn expect_services(c: &Cluster, via: usize, want: &[(&str, u64)]) -> anyhow::Result<()> {
    let want: Vec<(String, u64)> = want.iter().map(|(n, r)| (n.to_string(), *r)).collect();
    wait_for(T, &format!("services {want:?} on host {via}"), || {
        let got = services(c, via)?;
        if got == want { Ok(Some(())) } else { anyhow::bail!("got {got:?}") }
    })
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn three_managers_form_a_cluster() -> anyhow::Result<()> {
    let c = Cluster::start(3, 0)?;
    let st = c.cli_ok(1, &["cluster", "status", "--format", "json"])?;
    let members = st["members"].as_array().context("members")?;
    assert_eq!(members.len(), 3, "{st}");
    assert!(members.iter().all(|m| m["voter"] == true && m["reachable"] == true), "{st}");
    assert!(st["term"].as_u64().unwrap_or(0) >= 1 && st["commit_index"].as_u64().unwrap_or(0) > 0, "{st}");
    let nodes = c.cli_ok(2, &["node", "ls", "--format", "json"])?;
    let nodes = nodes.as_array().context("nodes")?;
    assert_eq!(nodes.len(), 3);
    assert_eq!(nodes.iter().filter(|n| n["leader"] == true).count(), 1, "{nodes:?}");
    assert!(nodes.iter().all(|n| n["role"] == "manager" && n["status"] == "ready" && n["availability"] == "active"));
    // Asked of a follower, every manager is reachable (the leader's view).
    let follower = (c.leader(0)? + 1) % 3;
    let nodes = c.cli_ok(follower, &["node", "ls", "--format", "json"])?;
    assert!(nodes.as_array().is_some_and(|a| a.iter().all(|n| n["reachable"] == true)), "{nodes}");
    // The commit index is the quorum's, at least what this manager applied.
    let st = c.cli_ok(follower, &["cluster", "status", "--format", "json"])?;
    assert!(st["commit_index"].as_u64() >= st["last_applied"].as_u64(), "{st}");
    for key in ["id", "name", "address", "labels"] {
        assert!(nodes[0].get(key).is_some(), "node ls lacks {key}");
    }
    // At rest: no other user may read a manager's data dir or its log.
    use std::os::unix::fs::PermissionsExt;
    for h in &c.hosts {
        let mode = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode(&h.data_dir)?, 0o700, "{}", h.data_dir.display());
        assert_eq!(mode(&h.data_dir.join("raft.redb"))?, 0o600);
    }
    Ok(())
}

#[test]
fn leader_loss_keeps_every_committed_write() -> anyhow::Result<()> {
    let mut c = Cluster::start(3, 0)?;
    c.import_busybox(0, "bb:1")?;
    c.cli_ok(0, &["service", "create", "--detach", "--name", "web", "--replicas", "2", "bb:1", "httpd", "-f"])?;
    c.cli_ok(1, &["service", "create", "--detach", "--name", "api", "--replicas", "3", "bb:1", "sleep", "3600"])?;
    let old = c.leader(0)?;
    c.kill(old);
    let survivor = (old + 1) % 3;
    let new = wait_for(T, "a new leader", || Ok(c.leader(survivor).ok().filter(|l| *l != old)))?;
    assert_ne!(new, old);
    c.cli_ok(survivor, &["service", "scale", "--detach", "web=5"])?;
    expect_services(&c, survivor, &[("api", 3), ("web", 5)])?;
    // The old leader comes back from its data dir and catches up.
    c.restart(old)?;
    expect_services(&c, old, &[("api", 3), ("web", 5)])?;
    c.wait_converged(survivor, 3, 3)?;
    Ok(())
}

#[test]
fn full_restart_brings_back_the_same_state() -> anyhow::Result<()> {
    let mut c = Cluster::start(3, 0)?;
    c.import_busybox(0, "bb:1")?;
    c.cli_ok(0, &["service", "create", "--detach", "--name", "web", "--replicas", "2", "bb:1", "sleep", "3600"])?;
    c.cli_ok(0, &["service", "create", "--detach", "--name", "db", "--replicas", "1", "--limit-memory", "64M", "bb:1", "sleep", "3600"])?;
    c.cli_ok(1, &["service", "scale", "--detach", "web=7", "db=0"])?;
    let before = c.cli_ok(0, &["service", "inspect", "db", "--format", "json"])?;
    let ids_before: Vec<Value> = c.cli_ok(0, &["node", "ls", "--format", "json"])?.as_array().cloned().unwrap_or_default().iter().map(|n| n["id"].clone()).collect();
    for i in 0..3 {
        c.stop(i);
    }
    for i in 0..3 {
        c.restart(i)?;
    }
    c.wait_converged(2, 3, 3)?;
    expect_services(&c, 2, &[("db", 0), ("web", 7)])?;
    let after = c.cli_ok(0, &["service", "inspect", "db", "--format", "json"])?;
    assert_eq!(before["id"], after["id"]);
    assert_eq!(after["limits"]["memory_bytes"], 64 << 20);
    let mut ids_after: Vec<Value> = c.cli_ok(0, &["node", "ls", "--format", "json"])?.as_array().cloned().unwrap_or_default().iter().map(|n| n["id"].clone()).collect();
    let mut ids_before = ids_before;
    ids_before.sort_by_key(|v| v.to_string());
    ids_after.sort_by_key(|v| v.to_string());
    assert_eq!(ids_before, ids_after, "nodes rejoin as themselves");
    Ok(())
}

#[test]
fn partitioned_manager_refuses_writes_and_catches_up() -> anyhow::Result<()> {
    let c = Cluster::start(3, 0)?;
    c.import_busybox(0, "bb:1")?;
    c.cli_ok(0, &["service", "create", "--detach", "--name", "web", "--replicas", "1", "bb:1", "sleep", "3600"])?;
    // Cut off the leader: the hardest case, it believed it could commit.
    let cut = c.leader(0)?;
    c.set_link(cut, false)?;
    let out = c.cli(cut, &["service", "scale", "--detach", "web=9"]);
    assert!(!out.status.success(), "a cut-off manager must not accept a write");
    let err = stderr(&out);
    assert!(err.contains("not committed") || err.contains("quorum") || err.contains("unreachable"), "{err}");
    // The other two elect a leader and carry on.
    let other = (cut + 1) % 3;
    wait_for(T, "a leader among the connected managers", || Ok(c.leader(other).ok().filter(|l| *l != cut)))?;
    c.cli_ok(other, &["service", "scale", "--detach", "web=4"])?;
    c.cli_ok(other, &["service", "create", "--detach", "--name", "api", "bb:1", "sleep", "3600"])?;
    expect_services(&c, other, &[("api", 1), ("web", 4)])?;
    // Reads through the cut-off manager: refused by default (it can't know
    // what it missed), its own stale state with --consistency local.
    let out = c.cli(cut, &["service", "ls", "--format", "json"]);
    assert!(!out.status.success(), "a partitioned manager must not answer a linearizable read");
    assert!(stderr(&out).contains("--consistency local"), "{}", stderr(&out));
    let stale = c.cli_ok(cut, &["service", "ls", "--consistency", "local", "--format", "json"])?;
    assert_eq!(stale.as_array().map(Vec::len), Some(1), "the stale view has only web: {stale}");
    c.set_link(cut, true)?;
    expect_services(&c, cut, &[("api", 1), ("web", 4)])?;
    c.wait_converged(other, 3, 3)?;
    Ok(())
}

#[test]
fn compaction_bounds_the_log_across_restarts() -> anyhow::Result<()> {
    let mut c = Cluster::start(3, 0)?;
    let addr = c.hosts[0].addr();
    let certs = c.cert_dir();
    const WRITES: u64 = 10_000;
    shoal_tests::netns::in_netns(&c.hosts[0].netns.clone(), move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(async move {
            let client = shoal_tests::control_client(&addr, &certs).await?;
            let mut tasks = Vec::new();
            // At most 8 writes in flight: group commit puts at most 8 in one
            // entry, so 10,000 writes make more than 1,000 entries and the
            // snapshot policy (every 1,000) must kick in.
            const CLIENTS: u64 = 8;
            for w in 0..CLIENTS {
                let mut client = client.clone();
                tasks.push(tokio::spawn(async move {
                    let mut i = w;
                    while i < WRITES {
                        // A label write: replicated like any other, and it
                        // makes the orchestrator do no work.
                        let req = shoal_proto::control::UpdateNodeRequest {
                            node: "n0".into(),
                            label_add: [("round".to_string(), i.to_string())].into(),
                            ..Default::default()
                        };
                        client.update_node(req).await?;
                        i += CLIENTS;
                    }
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            anyhow::Ok(())
        })
    })?;
    // One last write with a known value.
    c.cli_ok(1, &["node", "update", "n0", "--label-add", "round=final"])?;
    for i in 0..3 {
        c.stop(i);
    }
    for i in 0..3 {
        c.restart(i)?;
    }
    c.wait_converged(0, 3, 3)?;
    for i in 0..3 {
        wait_for(T, "the last label on every manager", || {
            let n = c.cli_ok(i, &["node", "inspect", "n0", "--format", "json"])?;
            Ok((n["labels"]["round"] == "final").then_some(()))
        })?;
        let st = c.cli_ok(i, &["cluster", "status", "--format", "json"])?;
        let first = st["log_first_index"].as_u64().unwrap_or(0);
        let last = st["log_last_index"].as_u64().unwrap_or(0);
        let snap = st["snapshot_index"].as_u64().unwrap_or(0);
        assert!(last >= WRITES / 8, "{st}");
        assert!(snap > 0, "a snapshot was taken: {st}");
        assert!(last - first < 2_500, "log on host {i} is bounded: {st}");
    }
    Ok(())
}

#[test]
fn forged_and_rotated_tokens_cannot_join_and_workers_cannot_administer() -> anyhow::Result<()> {
    let mut c = Cluster::hosts(5)?;
    let opts = DaemonOpts::default();
    c.init(0, &opts)?;
    let good = c.cli_ok(0, &["join-token", "worker", "--format", "json"])?["token"].as_str().context("token")?.to_string();
    let parts: Vec<&str> = good.split('-').collect();
    let (fp, secret) = (parts[2], parts[3]);
    // Wrong CA fingerprint: the joiner refuses to trust the manager.
    let forged_ca = format!("SHOAL-1-{}-{secret}", "ab".repeat(32));
    // Right CA, made-up secret: the manager refuses the joiner.
    let forged_secret = format!("SHOAL-1-{fp}-{}", "cd".repeat(16));
    for (i, token, want) in [(1, forged_ca.as_str(), "fingerprint"), (2, forged_secret.as_str(), "not valid")] {
        let out = join_once(&c, i, token);
        assert!(!out.status.success(), "join with {token} must fail");
        assert!(stderr(&out).contains(want), "{}", stderr(&out));
    }
    // Rotation: the old token stops working, the new one works.
    let rotated = c.cli_ok(0, &["join-token", "worker", "--rotate", "--format", "json"])?["token"].as_str().context("token")?.to_string();
    assert_ne!(rotated, good);
    let out = join_once(&c, 3, &good);
    assert!(!out.status.success() && stderr(&out).contains("not valid"), "{}", stderr(&out));
    c.join(4, 0, "worker", &opts)?;
    c.wait_converged(0, 1, 2)?;
    let nodes = c.cli_ok(0, &["node", "ls", "--format", "json"])?;
    assert_eq!(nodes.as_array().map(Vec::len), Some(2), "only the good join added a node: {nodes}");
    // A worker's certificate is refused by the Control API.
    let w = &c.hosts[4].data_dir;
    let certs = c.dir.join("worker-certs");
    std::fs::create_dir_all(&certs)?;
    std::fs::copy(w.join("tls/ca.pem"), certs.join("ca.pem"))?;
    std::fs::copy(w.join("tls/node.pem"), certs.join("cert.pem"))?;
    std::fs::copy(w.join("tls/node-key.pem"), certs.join("key.pem"))?;
    let out = c.cli_with(0, &c.hosts[0].addr(), &certs, &["service", "create", "--detach", "--name", "evil", "bb:1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("worker certificate may not call"), "{}", stderr(&out));
    assert_eq!(services(&c, 0)?, vec![]);
    Ok(())
}

/// Runs a daemon that joins with `token` and returns when it exits.
fn join_once(c: &Cluster, i: usize, token: &str) -> std::process::Output {
    let h = &c.hosts[i];
    std::process::Command::new("timeout")
        .args(["30", "nsenter", &format!("--net=/run/netns/{}", h.netns)])
        .arg(shoal_tests::shoal_bin())
        .args(["daemon", "--data-dir"])
        .arg(&h.data_dir)
        .args(["--listen", &h.addr(), "--join", &c.hosts[0].addr(), "--token", token])
        .output()
        .expect("running shoal daemon")
}

#[test]
fn bad_input_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    let c = Cluster::start(1, 0)?;
    c.import_busybox(0, "bb:1")?;
    c.cli_ok(0, &["service", "create", "--detach", "--name", "web", "--replicas", "0", "bb:1", "sleep", "3600"])?;
    let before = c.cli_ok(0, &["service", "ls", "--format", "json"])?;
    let cases: &[(&[&str], &str)] = &[
        (&["service", "create", "--detach", "--name", "Bad_Name", "bb:1"], "Bad_Name"),
        (&["service", "create", "--detach", "--name", "-x", "bb:1"], "-x"),
        (&["service", "create", "--detach", "--name", "web", "bb:1", "sleep", "3600"], "already exists"),
        (&["service", "create", "--detach", "--name", "ghost", "nosuchimage:1"], "nosuchimage:1"),
        (&["service", "create", "--detach", "--name", "neg", "--replicas", "-1", "bb:1"], "-1"),
        (&["service", "create", "--detach", "--name", "nan", "--replicas", "many", "bb:1"], "many"),
        (&["service", "create", "--detach", "--name", "mem", "--limit-memory", "lots", "bb:1"], "lots"),
        (&["service", "create", "--detach", "--name", "con", "--constraint", "zone=a", "bb:1"], "zone=a"),
        (&["service", "scale", "--detach", "web=-3"], "-3"),
        (&["service", "scale", "--detach", "web=ten"], "ten"),
        (&["service", "scale", "--detach", "nope=3"], "nope"),
        (&["service", "scale", "--detach", "web=4", "nope=3"], "nope"),
        (&["service", "inspect", "nope"], "nope"),
        (&["service", "rm", "web", "nope"], "nope"),
        (&["node", "update", "ghost", "--availability", "drain"], "ghost"),
    ];
    for (args, needle) in cases {
        let out = c.cli(0, args);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(stderr(&out).contains(needle), "{args:?}: error should name {needle:?}: {}", stderr(&out));
        assert_eq!(c.cli_ok(0, &["service", "ls", "--format", "json"])?, before, "{args:?} changed state");
    }
    Ok(())
}

#[test]
fn workers_are_promoted_into_raft_and_demoted_out_of_it() -> anyhow::Result<()> {
    let c = Cluster::start(1, 2)?;
    for n in ["n1", "n2"] {
        let out = c.cli(0, &["node", "promote", n]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    c.wait_converged(0, 3, 3)?;
    let nodes = c.cli_ok(1, &["node", "ls", "--format", "json"])?;
    assert!(nodes.as_array().context("nodes")?.iter().all(|n| n["role"] == "manager"), "{nodes}");
    // The promoted node now answers the Control API itself.
    let st = c.cli_ok(2, &["cluster", "status", "--format", "json"])?;
    assert_eq!(st["members"].as_array().map(Vec::len), Some(3), "{st}");
    // Demote a follower: out of the Raft group, back to a worker.
    let leader = c.leader(0)?;
    let victim = (1..3).find(|i| *i != leader).context("a follower")?;
    let name = c.hosts[victim].name.clone();
    let out = c.cli(leader, &["node", "demote", &name]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.wait_converged(leader, 2, 3)?;
    let n = c.cli_ok(leader, &["node", "inspect", &name, "--format", "json"])?;
    assert_eq!(n["role"], "worker");
    let st = c.cli_ok(leader, &["cluster", "status", "--format", "json"])?;
    assert_eq!(st["members"].as_array().map(Vec::len), Some(2), "{st}");
    // Refusals: promoting a manager, demoting the leader.
    let leader_name = c.hosts[leader].name.clone();
    for (args, want) in [(["node", "promote", leader_name.as_str()], "already a manager"), (["node", "demote", leader_name.as_str()], "leader")] {
        let out = c.cli(leader, &args);
        assert!(!out.status.success() && stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
    Ok(())
}

/// A TLS channel to `addr` with the credentials in a node's `tls/` dir.
async fn node_channel(addr: &str, tls_dir: &std::path::Path) -> anyhow::Result<tonic::transport::Channel> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |f: &str| std::fs::read_to_string(tls_dir.join(f));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(read("node.pem")?, read("node-key.pem")?))
        .domain_name("manager.shoal.cluster");
    Ok(Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?.connect().await?)
}

#[test]
fn misbehaving_peers_get_clear_errors_and_change_nothing() -> anyhow::Result<()> {
    use shoal_proto::dispatcher::dispatcher_client::DispatcherClient;
    use shoal_proto::dispatcher::{HeartbeatRequest, TaskStatus, TaskStatusBatch};
    use shoal_proto::raft::raft_client::RaftClient;
    use shoal_proto::raft::RaftPayload;
    use shoal_proto::control::control_client::ControlClient;
    use shoal_proto::control::{BlobList, BlobUpload, PutImageRequest};
    let sha256 = |b: &[u8]| shoal_tests::runtime_support::sha256(b);
    let c = Cluster::start(1, 1)?;
    c.import_busybox(0, "bb:1")?;
    c.cli_ok(0, &["service", "create", "--detach", "--name", "web", "--replicas", "0", "bb:1", "sleep", "3600"])?;
    let before = c.cli_ok(0, &["service", "ls", "--format", "json"])?;
    let nodes = c.cli_ok(0, &["node", "ls", "--format", "json"])?;
    let worker_id = nodes.as_array().context("nodes")?.iter().find(|n| n["name"] == "n1").context("n1")?["id"]
        .as_str()
        .context("id")?
        .to_string();
    let worker_id = u64::from_str_radix(&worker_id, 16)?;
    let addr = c.hosts[0].addr();
    let worker_tls = c.hosts[1].data_dir.join("tls");
    let manager_tls = c.hosts[0].data_dir.join("tls");
    let codes = shoal_tests::netns::in_netns(&c.hosts[0].netns.clone(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let w = node_channel(&addr, &worker_tls).await?;
            let m = node_channel(&addr, &manager_tls).await?;
            let mut out = Vec::new();
            let mut d = DispatcherClient::new(w.clone());
            // Speaking for another node.
            let r = d.heartbeat(HeartbeatRequest { node_id: worker_id ^ 1, ..Default::default() }).await;
            out.push(("heartbeat for another node", r.err().map(|s| (s.code(), s.message().to_string()))));
            // A state that does not exist, and one an agent may not set.
            for state in ["bogus", "new"] {
                let batch = TaskStatusBatch {
                    node_id: worker_id,
                    statuses: vec![TaskStatus { task_id: "x".into(), state: state.into(), ..Default::default() }],
                };
                let r = d.update_task_status(batch).await;
                out.push(("bad task state", r.err().map(|s| (s.code(), s.message().to_string()))));
            }
            // A worker on the Raft transport.
            let r = RaftClient::new(w).append_entries(RaftPayload { data: vec![1, 2, 3] }).await;
            out.push(("worker on raft", r.err().map(|s| (s.code(), s.message().to_string()))));
            // A manager sending garbage.
            let r = RaftClient::new(m.clone()).propose(RaftPayload { data: vec![0xff; 7] }).await;
            out.push(("garbage proposal", r.err().map(|s| (s.code(), s.message().to_string()))));
            // Image blobs: a digest that is not one, bytes that don't match
            // their digest, a manifest never pushed, a manifest that isn't one.
            let mut ctl = ControlClient::new(m);
            let r = ctl.missing_blobs(BlobList { digests: vec!["sha256:../../etc/passwd".into()] }).await;
            out.push(("bad blob digest", r.err().map(|s| (s.code(), s.message().to_string()))));
            let push = |digest: String, data: &[u8]| {
                tokio_stream::iter(vec![BlobUpload { digest, data: data.to_vec() }])
            };
            let r = ctl.push_blob(push(sha256(b"these bytes"), b"other bytes")).await;
            out.push(("mismatched blob", r.err().map(|s| (s.code(), s.message().to_string()))));
            let r = ctl.put_image(PutImageRequest { reference: "ghost:1".into(), manifest_digest: sha256(b"never") }).await;
            out.push(("manifest never pushed", r.err().map(|s| (s.code(), s.message().to_string()))));
            ctl.push_blob(push(sha256(b"not json"), b"not json")).await?;
            let r = ctl.put_image(PutImageRequest { reference: "ghost:1".into(), manifest_digest: sha256(b"not json") }).await;
            out.push(("manifest not json", r.err().map(|s| (s.code(), s.message().to_string()))));
            // Every blob present, but the manifest's layer is not one of the
            // config's diff ids: every agent would refuse it, so the manager does.
            let config = br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#;
            let layer = b"not the layer the config names";
            let manifest = format!(
                r#"{{"schemaVersion":2,"config":{{"digest":"{}","size":{}}},"layers":[{{"digest":"{}","size":{}}}]}}"#,
                sha256(config),
                config.len(),
                sha256(layer),
                layer.len()
            );
            for b in [&config[..], &layer[..], manifest.as_bytes()] {
                ctl.push_blob(push(sha256(b), b)).await?;
            }
            let r = ctl.put_image(PutImageRequest { reference: "ghost:1".into(), manifest_digest: sha256(manifest.as_bytes()) }).await;
            out.push(("layers not the config's", r.err().map(|s| (s.code(), s.message().to_string()))));
            anyhow::Ok(out)
        })
    })?;
    let want = [
        ("heartbeat for another node", tonic::Code::PermissionDenied, "itself"),
        ("bad task state", tonic::Code::InvalidArgument, "bogus"),
        ("bad task state", tonic::Code::InvalidArgument, "new"),
        ("worker on raft", tonic::Code::PermissionDenied, "worker certificate"),
        ("garbage proposal", tonic::Code::InvalidArgument, "malformed raft payload"),
        ("bad blob digest", tonic::Code::InvalidArgument, "invalid blob digest"),
        ("mismatched blob", tonic::Code::InvalidArgument, "digest mismatch"),
        ("manifest never pushed", tonic::Code::FailedPrecondition, "push it first"),
        ("manifest not json", tonic::Code::InvalidArgument, "not JSON"),
        ("layers not the config's", tonic::Code::InvalidArgument, "rootfs.diff_ids"),
    ];
    for ((what, got), (_, code, needle)) in codes.iter().zip(want) {
        let (c_, msg) = got.clone().with_context(|| format!("{what}: accepted"))?;
        assert_eq!(c_, code, "{what}: {msg}");
        assert!(msg.contains(needle), "{what}: {msg}");
    }
    assert_eq!(codes.len(), 10);
    assert_eq!(c.cli_ok(0, &["service", "ls", "--format", "json"])?, before);
    let images = c.cli_ok(0, &["image", "ls", "--format", "json"])?;
    assert_eq!(images.as_array().map(Vec::len), Some(1), "{images}");
    c.wait_converged(0, 1, 2)?;
    Ok(())
}

/// A service too big for one Raft entry is created in runs of entries:
/// the cluster keeps committing other writes (through any manager) and
/// keeps its leader; past the replica limit, a clear error and nothing.
#[test]
fn a_huge_service_neither_wedges_the_cluster_nor_loses_its_leader() -> anyhow::Result<()> {
    let c = Cluster::start(3, 0)?;
    c.import_busybox(0, "busybox:latest")?;
    let out = c.cli(0, &["service", "create", "--detach", "--name", "toobig", "--replicas", "200000", "busybox:latest", "sleep", "1"]);
    assert!(!out.status.success() && stderr(&out).contains("at most 100000"), "{}", stderr(&out));
    let out = c.cli(0, &["service", "scale", "--detach", "toobig=200000"]);
    assert!(!out.status.success() && stderr(&out).contains("at most 100000"), "{}", stderr(&out));
    let before = c.cli_ok(0, &["cluster", "status", "--format", "json"])?;

    // 12,000 tasks that can go nowhere: several MB of tasks, more than one
    // Raft entry may carry, created over a few orchestrator passes.
    const N: usize = 12_000;
    let n = N.to_string();
    c.cli_ok(0, &["service", "create", "--detach", "--name", "big", "--replicas", &n, "--constraint", "node.labels.nope==x", "busybox:latest", "sleep", "1"])?;
    // Meanwhile other writes commit, through the leader and a follower.
    c.cli_ok(1, &["service", "create", "--detach", "--name", "small", "busybox:latest", "sleep", "1d"])?;
    c.cli_ok(2, &["network", "create", "side"])?;
    let ps = wait_for(Duration::from_secs(120), "every task of big to exist, pending with the reason", || {
        let ps = c.cli_ok(0, &["service", "ps", "big", "--format", "json"])?;
        let tasks = ps.as_array().cloned().unwrap_or_default();
        let pending = tasks.iter().filter(|t| t["state"] == "pending").count();
        Ok((tasks.len() == N && pending == N).then_some(tasks))
    })
    .with_context(|| c.log_tails())?;
    let msg = ps[0]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("node.labels.nope==x"), "{msg}");
    wait_for(T, "small to run", || {
        let s = c.cli_ok(0, &["service", "inspect", "small", "--format", "json"])?;
        Ok((s["replicas_running"] == 1).then_some(()))
    })?;
    // Still the same leader, in the same term.
    let after = c.cli_ok(0, &["cluster", "status", "--format", "json"])?;
    assert_eq!((&before["leader"], &before["term"]), (&after["leader"], &after["term"]), "{after:#}");
    // And it goes away as it came.
    c.cli_ok(0, &["service", "rm", "big"])?;
    wait_for(Duration::from_secs(120), "big's tasks to be forgotten", || {
        let ps = c.cli(0, &["service", "ps", "big", "--format", "json"]);
        Ok((!ps.status.success()).then_some(()))
    })?;
    // The log was compacted all along: each manager's database holds a
    // bounded log and a snapshot, not every entry of the 12,000 tasks.
    for h in &c.hosts {
        let size = std::fs::metadata(h.data_dir.join("raft.redb"))?.len();
        eprintln!("{}: raft.redb is {} MiB", h.name, size >> 20);
        assert!(size < 64 << 20, "{}'s raft.redb grew to {} MiB", h.name, size >> 20);
    }
    Ok(())
}

/// A write forwarded from a follower whose answer is lost is retried with
/// the same request id: applied once, and the retry gets the first answer
/// (not "already exists"); it stays applied once after that leader dies.
#[test]
fn a_forwarded_write_whose_answer_is_lost_is_applied_once() -> anyhow::Result<()> {
    let mut c = Cluster::hosts(3)?;
    // The first manager (the leader) drops its answer to the first write
    // forwarded to it, after applying it.
    c.init(0, &DaemonOpts { extra: vec!["--fault-drop-forwarded-replies".into(), "1".into()] })?;
    for i in 1..3 {
        c.join(i, 0, "manager", &DaemonOpts::default())?;
    }
    c.wait_converged(0, 3, 3)?;
    assert_eq!(c.leader(1)?, 0);
    c.import_busybox(0, "bb:1")?;
    // Through a follower: forwarded, applied, answer dropped, retried.
    let out = c.cli(1, &["service", "create", "--detach", "--name", "once", "bb:1", "sleep", "3600"]);
    assert!(out.status.success(), "the retried create must get the first answer: {}", stderr(&out));
    assert!(c.log_tail(0).contains("fault injected"), "the fault must have fired:\n{}", c.log_tail(0));
    expect_services(&c, 1, &[("once", 1)])?;
    // The leader dies; the write stays, once.
    c.kill(0);
    wait_for(T, "a new leader", || Ok(c.leader(1).ok().filter(|l| *l != 0)))?;
    expect_services(&c, 2, &[("once", 1)])?;
    let tasks = c.cli_ok(1, &["service", "ps", "once", "--format", "json"])?;
    assert!(tasks.as_array().is_some_and(|t| t.len() == 1), "one service, one task: {tasks}");
    Ok(())
}

/// Run only by `a_test_ended_by_sigterm_leaves_nothing`, as a child: a
/// one-manager cluster that says where it is, then waits on stdin (which
/// the parent never writes) until a signal ends it.
#[test]
#[ignore = "a helper: a_test_ended_by_sigterm_leaves_nothing runs it"]
fn helper_a_cluster_waiting_for_a_signal() -> anyhow::Result<()> {
    use std::io::Read;
    let c = Cluster::start(1, 0)?;
    println!("READY {} {}", c.id, c.dir.display());
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    drop(c);
    Ok(())
}

/// nextest ends a test that runs too long with SIGTERM, which skips Drop:
/// the cluster must still go (its namespaces, bridge, mounts, daemons and
/// directory). The test thread here is not the one that gets the signal.
#[test]
fn a_test_ended_by_sigterm_leaves_nothing() -> anyhow::Result<()> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--ignored", "--exact", "helper_a_cluster_waiting_for_a_signal", "--nocapture", "--test-threads", "2"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("READY ") {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(120));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    let Ok(ready) = ready else {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let out = child.wait_with_output()?;
        anyhow::bail!("the helper never came up: {}", String::from_utf8_lossy(&out.stderr));
    };
    let (id, dir) = ready.split_once(' ').context("READY line")?;
    let netns_prefix = format!("sh{id}-");
    let has_netns = || shoal_tests::sh("ip", &["netns", "list"]).map(|l| l.lines().any(|n| n.starts_with(&netns_prefix)));
    assert!(has_netns()?, "the helper's namespaces exist before the signal");
    // The helper's stdin stays open until it has exited: `wait_with_output`
    // would close it first, and the helper's read would then return (EOF)
    // and let the test end normally (exit 0, Drop cleaning up) in a race
    // with the signal this test is about.
    let stdin = child.stdin.take();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let out = child.wait_with_output()?;
    drop(stdin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 15), "{stderr}");
    assert!(!has_netns()?, "namespaces left: {stderr}");
    assert!(!std::path::Path::new(dir).exists(), "{dir} left: {stderr}");
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    assert!(!mounts.contains(dir), "mounts left under {dir}: {stderr}");
    let links = shoal_tests::sh("ip", &["-o", "link", "show"])?;
    assert!(!links.contains(&format!("shb{id}")), "bridge left: {stderr}");
    Ok(())
}
