//! Image blobs on a manager: content-addressed files under
//! `DATA/blobs/sha256/`, verified on write. An image is an OCI manifest,
//! its config and its layers, each a blob. Every manager holds every blob:
//! the replication loop (`replication.rs`) fetches what the store's images name and this manager
//! lacks, and drops blobs no image names any more.

use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal_proto::dispatcher::dispatcher_client::DispatcherClient;
use shoal_proto::dispatcher::BlobRef;
use tokio::io::AsyncWriteExt;

use crate::store::objects::ImageObj;


/// Largest blob (one layer) a manager accepts.
pub const MAX_BLOB: u64 = 4 << 30;
/// Largest manifest a manager reads.
pub use shoal_proto::limits::MAX_MANIFEST;
/// Most blobs (layers + 2) one image may name.
pub const MAX_IMAGE_BLOBS: usize = 1024;
/// An unreferenced blob younger than this may belong to an upload in
/// progress: garbage collection leaves it.
const GC_GRACE: Duration = Duration::from_secs(600);
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
    #[error("manifest {digest}: {message}")]
    Manifest { digest: String, message: String },
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

    /// Whether the blob is here; if so, marks it recently used so garbage
    /// collection leaves it to the push or image that counts on it.
    pub fn has_fresh(&self, digest: &str) -> bool {
        let Ok(p) = self.path(digest) else { return false };
        match std::fs::File::options().append(true).open(&p) {
            Ok(f) => {
                let _ = f.set_modified(std::time::SystemTime::now());
                true
            }
            Err(_) => false,
        }
    }

    /// The image `reference` whose manifest is the blob `manifest_digest`,
    /// after checking that this manager holds the manifest and every blob
    /// it names.
    pub async fn image(&self, reference: &str, manifest_digest: &str) -> Result<ImageObj, BlobError> {
        let path = self.path(manifest_digest)?;
        self.has_fresh(manifest_digest);
        let bad = |message: String| BlobError::Manifest { digest: manifest_digest.to_string(), message };
        let meta = tokio::fs::metadata(&path)
            .await
            .map_err(|_| BlobError::NotFound(format!("{manifest_digest} (the manifest): push it first")))?;
        if meta.len() > MAX_MANIFEST {
            return Err(bad(format!("{} bytes: a manifest may hold at most {MAX_MANIFEST}", meta.len())));
        }
        let bytes = tokio::fs::read(&path).await.map_err(io(&path))?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        let digest_of = |d: &serde_json::Value, what: &str| {
            d.get("digest").and_then(|x| x.as_str()).map(str::to_string).ok_or_else(|| bad(format!("{what} has no digest")))
        };
        let config = digest_of(&v["config"], "the config")?;
        let layers = v["layers"]
            .as_array()
            .ok_or_else(|| bad("no layers array".into()))?
            .iter()
            .map(|l| digest_of(l, "a layer"))
            .collect::<Result<Vec<_>, _>>()?;
        if layers.len() + 2 > MAX_IMAGE_BLOBS {
            return Err(bad(format!("{} layers: at most {}", layers.len(), MAX_IMAGE_BLOBS - 2)));
        }
        let mut size = meta.len();
        for d in std::iter::once(&config).chain(&layers) {
            if !self.has_fresh(d) {
                return Err(BlobError::NotFound(format!("{d} (named by manifest {manifest_digest}): push it first")));
            }
            size += tokio::fs::metadata(self.path(d)?).await.map_err(io(&self.path(d)?))?.len();
        }
        // What every agent will check, checked once here: the config is
        // small and its diff ids are the manifest's layers (uncompressed).
        let config_path = self.path(&config)?;
        let config_len = tokio::fs::metadata(&config_path).await.map_err(io(&config_path))?.len();
        if config_len > MAX_MANIFEST {
            return Err(bad(format!("config {config} is {config_len} bytes: at most {MAX_MANIFEST}")));
        }
        let cfg: serde_json::Value = serde_json::from_slice(&tokio::fs::read(&config_path).await.map_err(io(&config_path))?)
            .map_err(|e| bad(format!("config {config} is not JSON: {e}")))?;
        let diff_ids: Vec<&str> =
            cfg["rootfs"]["diff_ids"].as_array().into_iter().flatten().filter_map(|d| d.as_str()).collect();
        if diff_ids != layers.iter().map(String::as_str).collect::<Vec<_>>() {
            return Err(bad(format!("its layers are not config {config}'s rootfs.diff_ids (layers must be uncompressed tars)")));
        }
        Ok(ImageObj {
            reference: reference.to_string(),
            digest: manifest_digest.to_string(),
            config,
            layers,
            size,
            version: 0,
            created_at_ms: 0,
        })
    }

    /// Removes blobs that no image in `keep` names, unless they are young
    /// enough to belong to an upload in progress.
    pub fn gc(&self, keep: &std::collections::HashSet<String>) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if keep.contains(&format!("sha256:{name}")) {
                continue;
            }
            let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().unwrap_or_default() > GC_GRACE);
            if old && std::fs::remove_file(e.path()).is_ok() {
                tracing::info!(blob = %name, "removed an image blob no image uses");
            }
        }
    }

    /// A writer for a new blob; `finish` verifies and publishes it.
    pub async fn writer(&self) -> Result<BlobWriter, BlobError> {
        let tmp = self.dir.join(format!(".tmp-{}", shoal_security::pki::random_hex(8).unwrap_or_else(|_| "x".into())));
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
    tls: &std::sync::Arc<shoal_security::Trust>,
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

