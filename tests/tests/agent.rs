//! The agent as a library: a real `Agent` against a real manager in this
//! process (see `shoal_tests::inprocess`), or against a misbehaving
//! manager the test plays itself. Real containers from busybox.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use shoal_proto::dispatcher::dispatcher_client::DispatcherClient;
use shoal_proto::dispatcher::{AssignmentsRequest, AssignmentsMessage};
use shoal_tests::inprocess::InProcessNode;
use shoal_tests::wait_for;

fn tasks(node: &InProcessNode, service: &str) -> Vec<Value> {
    node.cli_ok(&["service", "ps", service, "--format", "json"]).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

fn wait_running(node: &InProcessNode, service: &str) {
    wait_for(Duration::from_secs(60), &format!("{service} to run"), || {
        let t = tasks(node, service);
        Ok(t.iter().any(|t| t["state"] == "running").then_some(()))
    })
    .unwrap();
}

fn secret_file(node: &InProcessNode, name: &str, data: &str) {
    let path = node.dir.join(format!("{name}.txt"));
    std::fs::write(&path, data).unwrap();
    node.cli_ok(&["secret", "create", name, path.to_str().unwrap()]).unwrap();
}

/// `exec` keeps at most the agent's cap of each output stream.
#[test]
fn exec_output_is_capped() {
    let node = InProcessNode::start(|_| {}, |cfg| cfg.exec_max_output = 1000).unwrap();
    node.import_busybox("busybox:latest").unwrap();
    node.cli_ok(&["service", "create", "--name", "capped", "--detach", "busybox:latest", "sleep", "1d"]).unwrap();
    wait_running(&node, "capped");
    let out = node.cli(&["exec", "capped.1", "sh", "-c", "yes | head -c 100000; echo done >&2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout.len(), 1000);
    assert!(out.stdout.iter().all(|b| *b == b'y' || *b == b'\n'));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "done\n");
}

/// Without a tmpfs for task data, a task that uses a secret is rejected
/// (secrets never touch the node's disk); other tasks still run.
#[test]
fn a_task_with_secrets_is_rejected_on_a_node_without_the_tmpfs() {
    // A file where the tmpfs would be mounted: the agent cannot mount it.
    let node = InProcessNode::start(|dir| std::fs::write(dir.join("taskdata"), "not a directory").unwrap(), |_| {}).unwrap();
    node.import_busybox("busybox:latest").unwrap();
    secret_file(&node, "pw", "hunter2");
    node.cli_ok(&["service", "create", "--name", "withsecret", "--secret", "pw", "--detach", "busybox:latest", "sleep", "1d"])
        .unwrap();
    let rejected = wait_for(Duration::from_secs(60), "the task to be rejected", || {
        Ok(tasks(&node, "withsecret").into_iter().find(|t| t["state"] == "rejected"))
    })
    .unwrap();
    assert!(rejected["error"].as_str().unwrap().contains("no tmpfs for secrets"), "{rejected}");
    assert_eq!(std::fs::read_to_string(node.dir.join("taskdata")).unwrap(), "not a directory");
    node.cli_ok(&["service", "create", "--name", "plain", "--detach", "busybox:latest", "sleep", "1d"]).unwrap();
    wait_running(&node, "plain");
}

/// A stream carries a task's secret data the first time it sends the task,
/// and never again (a desired-state change resends the task without it).
#[test]
fn assignments_carry_secret_data_only_the_first_time() {
    let node = InProcessNode::start(|_| {}, |_| {}).unwrap();
    node.import_busybox("busybox:latest").unwrap();
    secret_file(&node, "token", "s3cr3t");
    node.cli_ok(&["service", "create", "--name", "sec", "--secret", "token", "--detach", "busybox:latest", "sleep", "1d"])
        .unwrap();
    wait_running(&node, "sec");
    let task_id = tasks(&node, "sec")[0]["id"].as_str().unwrap().to_string();

    // Read the node's assignments as its agent does, on a stream of our own.
    let (tls, addr, node_id) = (node.tls.clone(), node.addr.clone(), node.identity.id);
    let seen: Arc<Mutex<Vec<(String, usize)>>> = Default::default();
    let reader = {
        let seen = seen.clone();
        let task_id = task_id.clone();
        node.rt.spawn(async move {
            let mut stream = DispatcherClient::new(tls.channel(&addr).unwrap())
                .assignments(AssignmentsRequest { node_id, ..Default::default() })
                .await
                .unwrap()
                .into_inner();
            while let Ok(Some(AssignmentsMessage { updated, .. })) = stream.message().await {
                for a in updated.into_iter().filter(|a| a.task_id == task_id) {
                    let bytes = a.data.iter().map(|d| d.data.len()).sum();
                    seen.lock().unwrap().push((a.desired_state, bytes));
                }
            }
        })
    };
    wait_for(Duration::from_secs(10), "the first send", || Ok((!seen.lock().unwrap().is_empty()).then_some(()))).unwrap();
    node.cli_ok(&["service", "scale", "--detach", "sec=0"]).unwrap();
    wait_for(Duration::from_secs(10), "the task sent again", || {
        Ok(seen.lock().unwrap().iter().any(|(d, _)| d != "running").then_some(()))
    })
    .unwrap();
    reader.abort();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0], ("running".to_string(), "s3cr3t".len()), "{seen:?}");
    assert!(seen[1..].iter().all(|(_, bytes)| *bytes == 0), "secret data sent again: {seen:?}");
}

mod misbehaving_manager {
    //! A manager that sends what no real one would: the test serves the
    //! Dispatcher API itself, with a certificate from its own CA.

    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use shoal_agent::{Agent, AgentConfig};
    use shoal_proto::control::ServiceSpec;
    use shoal_proto::dispatcher::dispatcher_server::{Dispatcher, DispatcherServer};
    use shoal_proto::dispatcher::*;
    use shoal_security::pki::{self, CertRole};
    use shoal_security::{Identity, NodeTls, Role, Trust};
    use tonic::{Request, Response, Status};

    type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

    #[derive(Clone, Default)]
    struct Fake {
        assignments: Vec<Assignment>,
        reports: Arc<Mutex<Vec<TaskStatus>>>,
    }

    #[tonic::async_trait]
    impl Dispatcher for Fake {
        async fn heartbeat(&self, _: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
            Ok(Response::new(HeartbeatResponse { period_ms: 200, ..Default::default() }))
        }
        type AssignmentsStream = Stream<AssignmentsMessage>;
        async fn assignments(&self, _: Request<AssignmentsRequest>) -> Result<Response<Self::AssignmentsStream>, Status> {
            let first = AssignmentsMessage { full: true, updated: self.assignments.clone(), ..Default::default() };
            let stream = tokio_stream::StreamExt::chain(tokio_stream::iter([Ok(first)]), tokio_stream::pending());
            Ok(Response::new(Box::pin(stream)))
        }
        async fn update_task_status(&self, req: Request<TaskStatusBatch>) -> Result<Response<TaskStatusAck>, Status> {
            self.reports.lock().unwrap().extend(req.into_inner().statuses);
            Ok(Response::new(TaskStatusAck {}))
        }
        type ServicesStream = Stream<ServiceView>;
        async fn services(&self, _: Request<ServicesRequest>) -> Result<Response<Self::ServicesStream>, Status> {
            Ok(Response::new(Box::pin(tokio_stream::pending())))
        }
        type FetchBlobStream = Stream<BlobChunk>;
        async fn fetch_blob(&self, _: Request<BlobRef>) -> Result<Response<Self::FetchBlobStream>, Status> {
            Err(Status::not_found("this manager has no blobs"))
        }
    }

    /// Task ids name paths on the node (container dir, task data): ids
    /// like `..` are refused before they touch anything.
    #[test]
    fn task_ids_that_name_paths_are_refused() {
        let dir = std::env::temp_dir().join(format!("shoal-misbehaving-{}", shoal_tests::unique_id()));
        std::fs::create_dir_all(dir.join("containers")).unwrap();
        let _cleanup = shoal_tests::inprocess::RemoveOnDrop(dir.clone());
        std::fs::write(dir.join("marker"), "still here").unwrap();
        let ca = pki::new_ca().unwrap();
        let (server, _) = pki::issue(&ca, "00000000000000aa", CertRole::Manager, pki::DEFAULT_CERT_EXPIRY).unwrap();
        let (node, _) = pki::issue(&ca, "00000000000000bb", CertRole::Worker, pki::DEFAULT_CERT_EXPIRY).unwrap();
        let server_tls = Trust::new(NodeTls { ca_pem: ca.cert_pem.clone(), cert_pem: server.cert_pem, key_pem: server.key_pem }).unwrap();
        let node_tls = Trust::new(NodeTls { ca_pem: ca.cert_pem.clone(), cert_pem: node.cert_pem, key_pem: node.key_pem }).unwrap();

        let spec = ServiceSpec { image: "busybox:latest".into(), args: vec!["true".into()], ..Default::default() };
        let bad = ["..", ".", "../../etc", "a/b", ""];
        let fake = Fake {
            assignments: bad
                .iter()
                .map(|id| Assignment {
                    task_id: id.to_string(),
                    service: "evil".into(),
                    slot: 1,
                    spec: Some(spec.clone()),
                    desired_state: "running".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let reports = fake.reports.clone();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        rt.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(DispatcherServer::new(fake))
                .serve_with_incoming(server_tls.incoming(listener))
                .await
        });
        let identity = Identity { id: 0xbb, name: "victim".into(), role: Role::Worker, advertise: addr.clone(), managers: vec![addr] };
        let agent = Agent::new(AgentConfig::new(dir.clone(), identity, shoal_tests::shoal_bin()), node_tls).unwrap();
        let run = rt.spawn(agent.run(stop_rx));

        let got = shoal_tests::wait_for(Duration::from_secs(30), "every bad task to be rejected", || {
            let r = reports.lock().unwrap();
            let rejected: Vec<&TaskStatus> = r.iter().filter(|s| s.state == "rejected").collect();
            Ok((rejected.len() == bad.len()).then(|| r.clone()))
        })
        .unwrap();
        for s in &got {
            assert_eq!(s.state, "rejected", "a bad task went further: {got:?}");
            assert_eq!(s.message, "invalid task id", "{s:?}");
        }
        stop.send(true).unwrap();
        rt.block_on(run).unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("marker")).unwrap(), "still here");
        assert!(dir.join("containers").is_dir());
    }
}
