//! A manager that restarted locked (autolock) serves only the Lock service
//! until an operator gives it the unlock key: its Raft log is sealed with
//! a data key that only the unlock key opens.

use std::path::PathBuf;
use std::sync::Mutex;

use shoal_proto::control::lock_server::Lock;
use shoal_proto::control::{Empty, UnlockRequest};
use shoal_security::at_rest::{self, AtRestError, Key};
use shoal_security::pki::CertRole;
use shoal_security::Trust;
use tonic::{Request, Response, Status};

pub struct LockService {
    data_dir: PathBuf,
    tls: std::sync::Arc<Trust>,
    unlocked: Mutex<Option<tokio::sync::oneshot::Sender<Key>>>,
}

impl LockService {
    /// The service, and where the data key arrives once unlocked.
    pub fn new(data_dir: PathBuf, tls: std::sync::Arc<Trust>) -> (LockService, tokio::sync::oneshot::Receiver<Key>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (LockService { data_dir, tls, unlocked: Mutex::new(Some(tx)) }, rx)
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<Empty>, Status> {
        // A locked manager can't read the revocation list: the chain and
        // the role are what it can check.
        let (who, _) = self.tls.authorize(&req, &[CertRole::Client, CertRole::Manager])?;
        let key = at_rest::unlock(&self.data_dir, &req.get_ref().unlock_key).map_err(|e| match e {
            AtRestError::WrongUnlockKey | AtRestError::MalformedUnlockKey => Status::permission_denied(e.to_string()),
            e => Status::internal(e.to_string()),
        })?;
        let tx = self.unlocked.lock().unwrap_or_else(|e| e.into_inner()).take();
        match tx {
            Some(tx) => {
                if tx.send(key).is_err() {
                    return Err(Status::unavailable("the manager is shutting down"));
                }
                tracing::info!(by = %who, "manager unlocked");
                Ok(Response::new(Empty {}))
            }
            None => Err(Status::failed_precondition("this manager is already unlocked")),
        }
    }
}
