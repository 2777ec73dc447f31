//! Image blobs on a manager: content-addressed files under
//! `DATA/blobs/sha256/`, verified on write. Every manager holds every blob:
//! [`replicate`] fetches what the store names and this manager lacks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::dispatcher::dispatcher_client::DispatcherClient;
use shoal_proto::dispatcher::BlobRef;
use tokio::io::AsyncWriteExt;

use crate::manager::Manager;
use crate::store::Change;

/// Largest image archive a manager accepts.
pub const MAX_BLOB: u64 = 4 << 30;
/// Chunk size for streaming blobs.
pub const CHUNK: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("invalid blob digest {0:?}: expected sha256:<64 hex digits>")]
    BadDigest(String),
    #[error("blob {0} not found")]
    NotFound(String),
    #[error("blob is larger than {MAX_BLOB} bytes")]
    TooLarge,
    #[error("blob digest mismatch: expected {expected}, got {actual}")]
    Mismatch { expected: String, actual: String },
    #[error("blob store {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

#[derive(Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io { path: path.display().to_string(), source }
}

impl BlobStore {
    pub fn open(data_dir: &Path) -> Result<Self, BlobError> {
        let dir = data_dir.join("blobs/sha256");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(BlobStore { dir })
    }

    /// The file of `digest`, after checking the digest's syntax (it becomes
    /// a path: nothing but hex may reach the file system).
    pub fn path(&self, digest: &str) -> Result<PathBuf, BlobError> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .ok_or_else(|| BlobError::BadDigest(digest.to_string()))?;
        Ok(self.dir.join(hex))
    }

    pub fn has(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.exists())
    }

    /// A writer for a new blob; `finish` verifies and publishes it.
    pub async fn writer(&self) -> Result<BlobWriter, BlobError> {
        let tmp = self.dir.join(format!(".tmp-{}", crate::pki::random_hex(8).unwrap_or_else(|_| "x".into())));
        let file = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
        Ok(BlobWriter {
            store: self.clone(),
            tmp,
            file: Some(file),
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            size: 0,
        })
    }
}

pub struct BlobWriter {
    store: BlobStore,
    tmp: PathBuf,
    file: Option<tokio::fs::File>,
    hash: ring::digest::Context,
    size: u64,
}

impl BlobWriter {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        self.size += data.len() as u64;
        if self.size > MAX_BLOB {
            return Err(BlobError::TooLarge);
        }
        self.hash.update(data);
        if let Some(f) = self.file.as_mut() {
            f.write_all(data).await.map_err(io(&self.tmp))?;
        }
        Ok(())
    }

    /// Verifies against `expected` (if given) and moves the blob into place.
    /// Returns (digest, size).
    pub async fn finish(mut self, expected: Option<&str>) -> Result<(String, u64), BlobError> {
        let digest = format!("sha256:{}", hex::encode(self.hash.clone().finish()));
        if let Some(e) = expected {
            if e != digest {
                return Err(BlobError::Mismatch { expected: e.to_string(), actual: digest });
            }
        }
        if let Some(mut f) = self.file.take() {
            f.flush().await.map_err(io(&self.tmp))?;
            f.sync_all().await.map_err(io(&self.tmp))?;
        }
        let dst = self.store.path(&digest)?;
        tokio::fs::rename(&self.tmp, &dst).await.map_err(io(&dst))?;
        Ok((digest, self.size))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Unfinished or refused: leave nothing behind.
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Fetches `digest` from the manager at `addr` into `store`.
pub async fn fetch_from(
    tls: &crate::tls::NodeTls,
    store: &BlobStore,
    addr: &str,
    digest: &str,
) -> Result<(), String> {
    let channel = tls.channel(addr).map_err(|e| e.to_string())?;
    let mut stream = DispatcherClient::new(channel)
        .max_decoding_message_size(CHUNK * 2)
        .fetch_blob(BlobRef { digest: digest.to_string() })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let mut w = store.writer().await.map_err(|e| e.to_string())?;
    while let Some(chunk) = stream.message().await.map_err(|s| s.message().to_string())? {
        w.write(&chunk.data).await.map_err(|e| e.to_string())?;
    }
    w.finish(Some(digest)).await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Keeps this manager's blob store complete: fetches every image blob the
/// store names from another manager that has it.
pub async fn replicate(manager: Arc<Manager>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut events = manager.store.watch();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        let missing: Vec<String> = manager.store.read(|s| {
            s.images.values().map(|i| i.digest.clone()).filter(|d| !manager.blobs.has(d)).collect()
        });
        for digest in missing {
            let peers: Vec<String> = manager
                .members()
                .into_iter()
                .filter(|(id, _, _)| *id != manager.id)
                .map(|(_, addr, _)| addr)
                .collect();
            for addr in peers {
                match fetch_from(&manager.tls, &manager.blobs, &addr, &digest).await {
                    Ok(()) => {
                        tracing::info!(blob = %digest, from = %addr, "image blob replicated to this manager");
                        break;
                    }
                    Err(e) => tracing::debug!(blob = %digest, from = %addr, error = %e, "blob fetch failed"),
                }
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
            ev = events.recv() => {
                if let Ok(ev) = ev {
                    if !ev.changes.iter().any(|c| matches!(c, Change::Image(_))) {
                        continue;
                    }
                }
            }
        }
    }
}

/// A streaming sha256 for callers outside this crate (agents verifying the
/// blobs they fetch).
pub struct Sha256(ring::digest::Context);

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256 {
    pub fn new() -> Self {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    /// `sha256:<hex>`
    pub fn finish_digest(self) -> String {
        format!("sha256:{}", hex::encode(self.0.finish()))
    }
}
