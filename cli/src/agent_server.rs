//! The node's Agent service: task logs and exec, for managers only (the CLI
//! reaches it through a manager).
// TODO: move into `shoal-agent` with the session and task runner.

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use shoal_agent::supervisor::{State, Supervised};
use shoal_manager::pki::CertRole;
use shoal_manager::tls::authorize;
use shoal_proto::agent::agent_server::Agent;
use shoal_proto::agent::{ExecRequest, ExecResponse, LogChunk, TaskLogsRequest};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tonic::{Request, Response, Status};

/// How long `exec` may run before it is killed.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

pub struct AgentService {
    pub data_dir: PathBuf,
}

fn attach(data_dir: &std::path::Path, id: &str) -> Result<Supervised, Status> {
    Supervised::attach(data_dir, id).map_err(|_| Status::not_found(format!("task {id} has no container on this node")))
}

type LogStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<LogChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    type TaskLogsStream = LogStream;

    async fn task_logs(&self, req: Request<TaskLogsRequest>) -> Result<Response<LogStream>, Status> {
        authorize(&req, &[CertRole::Manager])?;
        let r = req.into_inner();
        let sup = attach(&self.data_dir, &r.task_id)?;
        let path = sup.log_path();
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|_| Status::not_found(format!("task {} has no log yet", r.task_id)))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            let mut pos = 0u64;
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => {
                        let running = matches!(sup.state(), Ok(State::Running { .. }));
                        if !r.follow || !running {
                            return;
                        }
                        // Rotation replaced the file: start on the new one.
                        let len = tokio::fs::metadata(&path).await.map(|m| m.len()).unwrap_or(0);
                        if len < pos {
                            match tokio::fs::File::open(&path).await {
                                Ok(f) => {
                                    file = f;
                                    pos = 0;
                                }
                                Err(_) => return,
                            }
                        }
                        tokio::select! {
                            _ = tx.closed() => return,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                        let _ = file.seek(std::io::SeekFrom::Start(pos)).await;
                    }
                    Ok(n) => {
                        pos += n as u64;
                        if tx.send(Ok(LogChunk { data: buf[..n].to_vec() })).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("reading log: {e}")))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn exec(&self, req: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        authorize(&req, &[CertRole::Manager])?;
        let r = req.into_inner();
        if r.cmd.is_empty() {
            return Err(Status::invalid_argument("no command given"));
        }
        let sup = attach(&self.data_dir, &r.task_id)?;
        if !matches!(sup.state(), Ok(State::Running { init_pid }) if init_pid > 0) {
            return Err(Status::failed_precondition(format!("task {} is not running here", r.task_id)));
        }
        // `shoal internal-exec` joins the container's cgroup, namespaces and
        // root and runs the command as the workload runs: its user, env and
        // working directory, Docker's capabilities, no_new_privs, seccomp.
        let shoal = std::env::current_exe().map_err(|e| Status::internal(format!("locating the shoal binary: {e}")))?;
        let mut cmd = tokio::process::Command::new(shoal);
        cmd.arg("internal-exec")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg(&r.task_id)
            .arg("--")
            .args(&r.cmd)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(EXEC_TIMEOUT, cmd.output())
            .await
            .map_err(|_| Status::deadline_exceeded(format!("command still running after {EXEC_TIMEOUT:?}: killed")))?
            .map_err(|e| Status::internal(format!("running the command: {e}")))?;
        tracing::info!(task = %r.task_id, cmd = ?r.cmd, code = out.status.code(), "exec in task");
        Ok(Response::new(ExecResponse {
            exit_code: out.status.code().unwrap_or(128 + 9),
            stdout: out.stdout,
            stderr: out.stderr,
        }))
    }
}
