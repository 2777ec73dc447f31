//! The node's Agent service: task logs and exec, for managers only (the CLI
//! reaches it through a manager).

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use crate::supervisor::{State, Supervised};
use shoal_security::pki::CertRole;
use shoal_proto::agent::agent_server::Agent;
use shoal_proto::agent::{ExecRequest, ExecResponse, LogChunk, TaskLogsRequest};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tonic::{Request, Response, Status};

/// How long `exec` may run before it is killed.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of each of stdout and stderr `exec` returns by default (as
/// Docker caps what it keeps).
pub const EXEC_MAX_OUTPUT: usize = 4 << 20;

/// What a command run in a task printed, cut at the limit.
pub struct ExecOutput {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("could not run: {0}")]
    Spawn(std::io::Error),
}

/// Runs `cmd` in task `task`'s container through `shoal internal-exec`,
/// which joins the container's cgroup, namespaces and root and runs it as
/// the workload runs (user, env, working directory, Docker's capabilities,
/// no_new_privs, seccomp). Keeps at most `max_output` bytes of each stream
/// (the rest is read and dropped); on timeout kills the command and every
/// process it started (its own process group).
pub async fn exec_in_task(
    shoal_bin: &std::path::Path,
    data_dir: &std::path::Path,
    task: &str,
    cmd: &[String],
    timeout: Duration,
    max_output: usize,
) -> Result<ExecOutput, ExecError> {
    use tokio::io::AsyncRead;
    let mut child = tokio::process::Command::new(shoal_bin)
        .arg("internal-exec")
        .arg("--data-dir")
        .arg(data_dir)
        .arg(task)
        .arg("--")
        .args(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(ExecError::Spawn)?;
    async fn capped(r: Option<impl AsyncRead + Unpin>, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let Some(mut r) = r else { return out };
        let mut buf = vec![0u8; 16 << 10];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let keep = n.min(max.saturating_sub(out.len()));
            out.extend_from_slice(&buf[..keep]);
        }
        out
    }
    let pgid = child.id().map(|p| p as i32);
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let (o, e, status) = tokio::join!(capped(stdout, max_output), capped(stderr, max_output), child.wait());
        (o, e, status)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok((stdout, stderr, status)) => {
            let code = status.map_err(ExecError::Spawn)?.code().unwrap_or(128 + 9);
            Ok(ExecOutput { code, stdout, stderr })
        }
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
            }
            Err(ExecError::Timeout(timeout))
        }
    }
}

/// The Agent gRPC service of one node.
#[derive(Clone)]
pub struct AgentService {
    pub(crate) data_dir: PathBuf,
    /// Re-executed as `shoal internal-exec`.
    pub(crate) shoal_bin: PathBuf,
    /// How much of each of stdout and stderr `exec` returns.
    pub(crate) exec_max_output: usize,
    /// Whose certificates are accepted (and which are revoked).
    pub(crate) tls: std::sync::Arc<shoal_security::Trust>,
}

fn attach(data_dir: &std::path::Path, id: &str) -> Result<Supervised, Status> {
    Supervised::attach(data_dir, id).map_err(|_| Status::not_found(format!("task {id} has no container on this node")))
}

type LogStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<LogChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    type TaskLogsStream = LogStream;

    async fn task_logs(&self, req: Request<TaskLogsRequest>) -> Result<Response<LogStream>, Status> {
        self.tls.authorize(&req, &[CertRole::Manager])?;
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
        self.tls.authorize(&req, &[CertRole::Manager])?;
        let r = req.into_inner();
        if r.cmd.is_empty() {
            return Err(Status::invalid_argument("no command given"));
        }
        let sup = attach(&self.data_dir, &r.task_id)?;
        if !matches!(sup.state(), Ok(State::Running { init_pid }) if init_pid > 0) {
            return Err(Status::failed_precondition(format!("task {} is not running here", r.task_id)));
        }
        let out = exec_in_task(&self.shoal_bin, &self.data_dir, &r.task_id, &r.cmd, EXEC_TIMEOUT, self.exec_max_output).await.map_err(|e| match e {
            ExecError::Timeout(t) => Status::deadline_exceeded(format!("command still running after {t:?}: killed")),
            ExecError::Spawn(e) => Status::internal(format!("running the command: {e}")),
        })?;
        tracing::info!(task = %r.task_id, cmd = ?r.cmd, code = out.code, "exec in task");
        Ok(Response::new(ExecResponse { exit_code: out.code, stdout: out.stdout, stderr: out.stderr }))
    }
}
