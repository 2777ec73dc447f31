//! The host's image store, content-addressed:
//!
//! ```text
//! DATA/images/blobs/sha256/<hex>     manifests and configs, verified on write
//! DATA/images/layers/<diff-id hex>/  each layer unpacked once, shared by every
//!                                    image and container that uses it
//! DATA/images/index.json             names and source files -> manifest digest
//! DATA/images/tmp/                   work space of loads in progress
//! ```
//!
//! Images come from a rootfs tarball (one layer, like `docker import`), an
//! OCI image-layout archive or a `docker save` archive (plain or gzip).
//! Layers are keyed by diff id (the digest of the uncompressed tar), so two
//! images with the same base layer share one unpacked copy whatever their
//! compression. Anything wrong in an archive fails the whole load, and the
//! load's work space is removed: nothing is written outside the store and
//! nothing half-loaded is left in it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use nix::fcntl::{Flock, FlockArg};
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use sha2::{Digest, Sha256};

use crate::unpack::{self, HashReader, UnpackError, UnpackOptions};

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("layer {what}: {source}")]
    Unpack { what: String, source: UnpackError },
    #[error("{what}: unpacks to more than {limit} bytes, the {which} limit (a gzip bomb, or raise it with --max-{which}-size)")]
    TooLarge { what: String, limit: u64, which: &'static str },
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { what: String, expected: String, actual: String },
    #[error("invalid digest {0:?}: want sha256:<64 hex digits>")]
    InvalidDigest(String),
    #[error("the archive's manifest names a missing blob: {0}")]
    MissingBlob(String),
    #[error("invalid image reference {0:?}")]
    InvalidReference(String),
    #[error("no such image: {0}")]
    NotFound(String),
    #[error("{what}: {message}")]
    Format { what: String, message: String },
    #[error("image {image}: layer {diff_id} is not in the store")]
    MissingLayer { image: String, diff_id: String },
}

fn ioe(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_path_buf(), source }
}

fn fmt_err(what: impl Into<String>, e: impl std::fmt::Display) -> ImageError {
    ImageError::Format { what: what.into(), message: e.to_string() }
}

/// What the image's config asks of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
    pub exposed_ports: Vec<String>,
}

/// An image in the store.
#[derive(Debug, Clone)]
pub struct Image {
    /// Names that point at it.
    pub names: Vec<String>,
    pub manifest_digest: String,
    pub config_digest: String,
    /// Unpacked layer directories, bottom first.
    pub layers: Vec<PathBuf>,
    pub config: RunConfig,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Index {
    /// name:tag -> manifest digest
    images: BTreeMap<String, String>,
    /// sha256 of an imported file -> manifest digest, so a path given to
    /// `shoal run` is imported once and reused.
    sources: BTreeMap<String, String>,
}

/// The host's image store.
pub struct ImageStore {
    root: PathBuf,
    limits: SizeLimits,
    /// Also keep each layer's uncompressed tar as a blob named by its diff
    /// id (an export store: what `shoal image import|load` sends the
    /// managers).
    keep_layer_blobs: bool,
}

/// What the cluster holds of one image: an OCI manifest whose layers are
/// the uncompressed tars (so a layer's blob digest is its diff id), the
/// config, and the layers.
#[derive(Debug, Clone)]
pub struct ImageParts {
    pub manifest_digest: String,
    pub config_digest: String,
    /// Diff ids, bottom first.
    pub layers: Vec<String>,
}

/// The fields of an OCI manifest the cluster needs.
#[derive(Debug, serde::Deserialize)]
pub struct ManifestRefs {
    pub config: BlobDesc,
    pub layers: Vec<BlobDesc>,
}

#[derive(Debug, serde::Deserialize)]
pub struct BlobDesc {
    pub digest: String,
    /// As the manifest says (0 when it doesn't); checked as it streams.
    #[serde(default)]
    pub size: u64,
}

impl ManifestRefs {
    /// Parses a manifest and checks every digest it names.
    pub fn parse(bytes: &[u8]) -> Result<Self, ImageError> {
        let m: ManifestRefs = serde_json::from_slice(bytes).map_err(|e| fmt_err("image manifest", e))?;
        for d in std::iter::once(&m.config).chain(&m.layers) {
            digest_hex(&d.digest)?;
        }
        Ok(m)
    }
}

/// Removes a work directory unless it was kept.
struct TmpDir(Option<PathBuf>);

impl TmpDir {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new("/nonexistent"))
    }
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

/// Removes a work file unless it was moved away.
struct TmpFile(PathBuf);

impl Drop for TmpFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Copies everything read through it to `out`.
struct TeeReader<'a, R> {
    inner: R,
    out: &'a fs::File,
}

impl<R: Read> Read for TeeReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// `count` random bytes as hex, from the kernel's generator.
pub fn random_hex(count: usize) -> String {
    let mut b = vec![0u8; count];
    let read = fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if read.is_err() {
        // Only uniqueness matters here: fall back on time and pid.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let seed = format!("{}{}", t.as_nanos(), std::process::id());
        b = Sha256::digest(seed.as_bytes())[..count.min(32)].to_vec();
    }
    hex::encode(b)
}

/// `sha256:<hex>` -> `<hex>`, checked.
fn digest_hex(d: &str) -> Result<&str, ImageError> {
    match d.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) => Ok(h),
        _ => Err(ImageError::InvalidDigest(d.to_string())),
    }
}

fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Normalises `name[:tag]` to `name:tag` (`latest` by default).
pub fn normalize_reference(r: &str) -> Result<String, ImageError> {
    let bad = || ImageError::InvalidReference(r.to_string());
    if r.is_empty() || r.len() > 255 || r.starts_with("sha256:") || r.contains(char::is_whitespace) {
        return Err(bad());
    }
    let last = r.rsplit('/').next().unwrap_or(r);
    let full = if last.contains(':') { r.to_string() } else { format!("{r}:latest") };
    let ok = full.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b));
    if ok { Ok(full) } else { Err(bad()) }
}

/// How much unpacking may write: a gzip bomb, or an endless tar, stops at
/// the limit with an error, and what it wrote is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeLimits {
    /// Uncompressed bytes of one layer.
    pub layer: u64,
    /// Uncompressed bytes of all of one image's layers.
    pub image: u64,
}

impl Default for SizeLimits {
    /// 4 GiB a layer (the largest blob the managers take), 16 GiB an image.
    fn default() -> Self {
        SizeLimits { layer: 4 << 30, image: 16 << 30 }
    }
}

/// Counts what passes; fails once more than `left` bytes came through
/// (and says so in `hit`).
struct Bounded<'a, R> {
    inner: R,
    left: u64,
    hit: &'a std::cell::Cell<bool>,
}

impl<R: Read> Read for Bounded<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.hit.set(true);
            return Err(io::Error::other("size limit reached"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// One image found in an archive, before it is committed to the index.
struct Loaded {
    names: Vec<String>,
    manifest_digest: String,
}

const LAYER_OPTS: UnpackOptions = UnpackOptions { whiteouts: true, preserve_owners: true };
const ARCHIVE_OPTS: UnpackOptions = UnpackOptions { whiteouts: false, preserve_owners: false };

impl ImageStore {
    /// Opens (creating) the store under `data_dir/images`.
    pub fn open(data_dir: &Path) -> Result<Self, ImageError> {
        let root = data_dir.join("images");
        for d in [root.join("blobs/sha256"), root.join("layers"), root.join("tmp")] {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&d).map_err(ioe(&d))?;
        }
        Ok(ImageStore { root, limits: SizeLimits::default(), keep_layer_blobs: false })
    }

    /// Opens a store that also keeps every layer's uncompressed tar as a
    /// blob, for sending images to the cluster.
    pub fn open_export(data_dir: &Path) -> Result<Self, ImageError> {
        Ok(ImageStore { keep_layer_blobs: true, ..Self::open(data_dir)? })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The same store with these size limits.
    pub fn with_limits(self, limits: SizeLimits) -> Self {
        ImageStore { limits, ..self }
    }

    pub fn limits(&self) -> SizeLimits {
        self.limits
    }

    fn lock(&self) -> Result<Flock<fs::File>, ImageError> {
        let p = self.root.join("lock");
        let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p).map_err(ioe(&p))?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| ImageError::Io { path: p, source: e.into() })
    }

    fn read_index(&self) -> Result<Index, ImageError> {
        let p = self.root.join("index.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| fmt_err(p.display().to_string(), e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(ioe(&p)(e)),
        }
    }

    fn write_index(&self, idx: &Index) -> Result<(), ImageError> {
        let p = self.root.join("index.json");
        let tmp = self.root.join(format!("index.json.{}", random_hex(4)));
        let bytes = serde_json::to_vec_pretty(idx).map_err(|e| fmt_err("index", e))?;
        fs::write(&tmp, bytes).map_err(ioe(&tmp))?;
        fs::rename(&tmp, &p).map_err(ioe(&p))
    }

    fn tmp_dir(&self, kind: &str) -> Result<TmpDir, ImageError> {
        let p = self.root.join("tmp").join(format!("{kind}-{}", random_hex(8)));
        fs::DirBuilder::new().mode(0o700).create(&p).map_err(ioe(&p))?;
        Ok(TmpDir(Some(p)))
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    /// Stores `bytes` under their digest; returns it.
    fn put_blob(&self, bytes: &[u8]) -> Result<String, ImageError> {
        let d = sha256_of(bytes);
        let p = self.blob_path(&d)?;
        if !p.exists() {
            let tmp = self.root.join("tmp").join(format!("blob-{}", random_hex(8)));
            fs::write(&tmp, bytes).map_err(ioe(&tmp))?;
            fs::rename(&tmp, &p).map_err(ioe(&p))?;
        }
        Ok(d)
    }

    /// Reads a stored blob and checks it against its digest.
    fn read_blob(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let p = self.blob_path(digest)?;
        let b = fs::read(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::MissingBlob(digest.to_string()),
            _ => ioe(&p)(e),
        })?;
        let actual = sha256_of(&b);
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                what: format!("stored blob {digest}"),
                expected: digest.into(),
                actual,
            });
        }
        Ok(b)
    }

    /// The unpacked directory of a layer.
    pub fn layer_dir(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("layers").join(digest_hex(diff_id)?))
    }

    /// Unpacks one layer blob (plain or gzip tar) unless its diff id is
    /// already in the store; checks the blob's digest and the diff id when
    /// they are known. Returns the diff id.
    /// `image_left` is what the image's earlier layers left of its limit;
    /// returns the diff id and the layer's uncompressed size.
    fn add_layer<R: Read>(
        &self,
        reader: R,
        what: &str,
        blob_digest: Option<&str>,
        diff_id: Option<&str>,
        image_left: u64,
    ) -> Result<(String, u64), ImageError> {
        let src = PathBuf::from(what);
        let mut buf = BufReader::new(HashReader::new(reader));
        let gz = buf.fill_buf().map_err(ioe(&src))?.starts_with(&[0x1f, 0x8b]);
        let existing = match diff_id {
            Some(d) => Some(self.layer_dir(d)?).filter(|p| p.is_dir()),
            None => None,
        };
        let tmp = match existing {
            Some(_) => None,
            None => Some(self.tmp_dir("layer")?),
        };
        let kept = match (&tmp, self.keep_layer_blobs) {
            (Some(t), true) => {
                let p = t.path().with_extension("tar");
                Some((fs::File::create(&p).map_err(ioe(&p))?, TmpFile(p)))
            }
            _ => None,
        };
        let (limit, which) =
            if image_left < self.limits.layer { (image_left, "image") } else { (self.limits.layer, "layer") };
        let hit = std::cell::Cell::new(false);
        let too_large = || ImageError::TooLarge { what: what.to_string(), limit, which };
        let (actual_diff, size) = {
            let inner: Box<dyn Read + '_> = if gz { Box::new(GzDecoder::new(&mut buf)) } else { Box::new(&mut buf) };
            let inner: Box<dyn Read + '_> = Box::new(Bounded { inner, left: limit, hit: &hit });
            let inner: Box<dyn Read + '_> = match &kept {
                Some((f, _)) => Box::new(TeeReader { inner, out: f }),
                None => inner,
            };
            let mut hr = HashReader::new(inner);
            if let Some(t) = &tmp
                && let Err(source) = unpack::unpack(&mut hr, t.path(), LAYER_OPTS)
            {
                return Err(if hit.get() { too_large() } else { ImageError::Unpack { what: what.to_string(), source } });
            }
            hr.finish().map_err(|e| {
                if hit.get() { too_large() } else { ImageError::Unpack { what: what.to_string(), source: UnpackError::Read(e) } }
            })?
        };
        let (actual_blob, _) = buf
            .into_inner()
            .finish()
            .map_err(|e| ImageError::Unpack { what: what.to_string(), source: UnpackError::Read(e) })?;
        if let Some(b) = blob_digest
            && b != actual_blob
        {
            return Err(ImageError::DigestMismatch { what: what.to_string(), expected: b.into(), actual: actual_blob });
        }
        if let Some(d) = diff_id
            && d != actual_diff
        {
            return Err(ImageError::DigestMismatch {
                what: format!("{what} (uncompressed)"),
                expected: d.into(),
                actual: actual_diff,
            });
        }
        if let Some((_, kept)) = kept {
            let dest = self.blob_path(&actual_diff)?;
            fs::rename(&kept.0, &dest).map_err(ioe(&dest))?;
        }
        if let Some(t) = tmp {
            let dest = self.layer_dir(&actual_diff)?;
            match fs::rename(t.path(), &dest) {
                Ok(()) => t.keep(),
                // Another load unpacked the same layer first: use theirs.
                Err(_) if dest.is_dir() => {}
                Err(e) => return Err(ioe(&dest)(e)),
            }
        }
        Ok((actual_diff, size))
    }

    /// A layer's size for the manifests this store writes: known when the
    /// store keeps the layer's tar (an export store), else 0.
    fn layer_size(&self, diff_id: &str) -> u64 {
        self.blob_path(diff_id).ok().and_then(|p| fs::metadata(p).ok()).map_or(0, |m| m.len())
    }

    /// Stores a config and a manifest for `diff_ids`; returns the manifest digest.
    fn put_image(&self, config: &[u8], diff_ids: &[String]) -> Result<String, ImageError> {
        let config_digest = self.put_blob(config)?;
        let layers: Vec<serde_json::Value> = diff_ids
            .iter()
            .map(|d| {
                serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": self.layer_size(d)})
            })
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": layers,
        });
        let bytes = serde_json::to_vec(&manifest).map_err(|e| fmt_err("manifest", e))?;
        self.put_blob(&bytes)
    }

    /// `shoal image import ROOTFS.tar NAME:TAG`: a one-layer image.
    pub fn import_rootfs(&self, tar: &Path, reference: &str) -> Result<Image, ImageError> {
        let name = normalize_reference(reference)?;
        let _lock = self.lock()?;
        let digest = self.import_rootfs_locked(tar)?;
        let mut idx = self.read_index()?;
        idx.images.insert(name, digest.clone());
        self.write_index(&idx)?;
        self.get(&digest)
    }

    fn import_rootfs_locked(&self, tar: &Path) -> Result<String, ImageError> {
        let f = fs::File::open(tar).map_err(ioe(tar))?;
        let (diff, _) = self.add_layer(f, &tar.display().to_string(), None, None, self.limits.image)?;
        let config = serde_json::json!({
            "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            "os": "linux",
            "config": {"Env": [crate::paths::DEFAULT_PATH]},
            "rootfs": {"type": "layers", "diff_ids": [diff]},
            "history": [{"created_by": format!("shoal image import {}", tar.display())}],
        });
        let bytes = serde_json::to_vec(&config).map_err(|e| fmt_err("config", e))?;
        self.put_image(&bytes, &[diff])
    }

    /// `shoal image load ARCHIVE.tar`: an OCI image layout or `docker save`
    /// archive, plain or gzip. Returns the images it held.
    pub fn load(&self, archive: &Path) -> Result<Vec<Image>, ImageError> {
        let _lock = self.lock()?;
        let loaded = self.load_locked(archive)?;
        let mut idx = self.read_index()?;
        for l in &loaded {
            for n in &l.names {
                idx.images.insert(n.clone(), l.manifest_digest.clone());
            }
        }
        self.write_index(&idx)?;
        loaded.iter().map(|l| self.get(&l.manifest_digest)).collect()
    }

    fn load_locked(&self, archive: &Path) -> Result<Vec<Loaded>, ImageError> {
        let work = self.tmp_dir("load")?;
        let f = fs::File::open(archive).map_err(ioe(archive))?;
        let mut buf = BufReader::new(f);
        let gz = buf.fill_buf().map_err(ioe(archive))?.starts_with(&[0x1f, 0x8b]);
        let inner: Box<dyn Read> = if gz { Box::new(GzDecoder::new(buf)) } else { Box::new(buf) };
        // The archive holds at least its images' layers (compressed or
        // not) and a little metadata: bounded by the image limit, with room
        // for a few images' manifests and configs.
        let hit = std::cell::Cell::new(false);
        let limit = self.limits.image.saturating_add(64 << 20);
        if let Err(source) = unpack::unpack(Bounded { inner, left: limit, hit: &hit }, work.path(), ARCHIVE_OPTS) {
            let what = archive.display().to_string();
            return Err(if hit.get() { ImageError::TooLarge { what, limit, which: "image" } } else { ImageError::Unpack { what, source } });
        }
        let dir = work.path();
        if dir.join("manifest.json").is_file() {
            self.load_docker(dir)
        } else if dir.join("index.json").is_file() {
            self.load_oci(dir)
        } else {
            Err(fmt_err(
                archive.display().to_string(),
                "neither manifest.json (docker save) nor index.json (OCI layout) found",
            ))
        }
    }

    /// Opens a file of the unpacked archive; never follows a link out of it.
    fn archive_file(dir: &Path, rel: &str) -> Result<fs::File, ImageError> {
        let p = crate::paths::resolve_in_root(dir, rel).map_err(ioe(Path::new(rel)))?;
        match fs::metadata(&p) {
            Ok(m) if m.is_file() => fs::File::open(&p).map_err(ioe(&p)),
            _ => Err(ImageError::MissingBlob(rel.to_string())),
        }
    }

    fn archive_bytes(dir: &Path, rel: &str) -> Result<Vec<u8>, ImageError> {
        let mut b = Vec::new();
        Self::archive_file(dir, rel)?.read_to_end(&mut b).map_err(ioe(Path::new(rel)))?;
        Ok(b)
    }

    /// An OCI blob of the archive, checked against its digest.
    fn oci_blob(dir: &Path, digest: &str) -> Result<Vec<u8>, ImageError> {
        let rel = format!("blobs/sha256/{}", digest_hex(digest)?);
        let b = Self::archive_bytes(dir, &rel).map_err(|e| match e {
            ImageError::MissingBlob(_) => ImageError::MissingBlob(digest.to_string()),
            e => e,
        })?;
        let actual = sha256_of(&b);
        if actual != digest {
            return Err(ImageError::DigestMismatch { what: format!("blob {rel}"), expected: digest.into(), actual });
        }
        Ok(b)
    }

    fn diff_ids(config: &[u8], what: &str) -> Result<Vec<String>, ImageError> {
        let c = ImageConfiguration::from_reader(config).map_err(|e| fmt_err(what, e))?;
        Ok(c.rootfs().diff_ids().clone())
    }

    fn load_oci(&self, dir: &Path) -> Result<Vec<Loaded>, ImageError> {
        let index = ImageIndex::from_reader(&Self::archive_bytes(dir, "index.json")?[..])
            .map_err(|e| fmt_err("index.json", e))?;
        let mut out = Vec::new();
        let mut todo: Vec<oci_spec::image::Descriptor> = index.manifests().clone();
        while let Some(desc) = todo.pop() {
            let digest = desc.digest().to_string();
            let bytes = Self::oci_blob(dir, &digest)?;
            let media = desc.media_type().to_string();
            if media.contains("image.index") || media.contains("manifest.list") {
                let nested = ImageIndex::from_reader(&bytes[..]).map_err(|e| fmt_err(&digest, e))?;
                todo.extend(nested.manifests().iter().cloned());
                continue;
            }
            let manifest = ImageManifest::from_reader(&bytes[..]).map_err(|e| fmt_err(&digest, e))?;
            let config_digest = manifest.config().digest().to_string();
            let config = Self::oci_blob(dir, &config_digest)?;
            let diff_ids = Self::diff_ids(&config, &config_digest)?;
            if diff_ids.len() != manifest.layers().len() {
                return Err(fmt_err(&digest, "manifest and config disagree on the number of layers"));
            }
            let mut left = self.limits.image;
            for (layer, diff) in manifest.layers().iter().zip(&diff_ids) {
                let ld = layer.digest().to_string();
                let rel = format!("blobs/sha256/{}", digest_hex(&ld)?);
                let f = Self::archive_file(dir, &rel).map_err(|e| match e {
                    ImageError::MissingBlob(_) => ImageError::MissingBlob(ld.clone()),
                    e => e,
                })?;
                // Check the blob before parsing any of it.
                let f = verify_file(f, &rel, &ld)?;
                let (_, size) = self.add_layer(f, &rel, Some(&ld), Some(diff), left)?;
                left -= size.min(left);
            }
            let manifest_digest = self.put_image(&config, &diff_ids)?;
            let annotations = desc.annotations().clone().unwrap_or_default();
            let names = annotations
                .get("io.containerd.image.name")
                .or_else(|| annotations.get("org.opencontainers.image.ref.name"))
                .map(|n| normalize_reference(n))
                .transpose()?
                .into_iter()
                .collect();
            out.push(Loaded { names, manifest_digest });
        }
        Ok(out)
    }

    fn load_docker(&self, dir: &Path) -> Result<Vec<Loaded>, ImageError> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            config: String,
            #[serde(default)]
            repo_tags: Option<Vec<String>>,
            layers: Vec<String>,
        }
        let entries: Vec<Entry> = serde_json::from_slice(&Self::archive_bytes(dir, "manifest.json")?)
            .map_err(|e| fmt_err("manifest.json", e))?;
        let mut out = Vec::new();
        for e in entries {
            let config = Self::archive_bytes(dir, &e.config)?;
            let actual = sha256_of(&config);
            // The config's file name is its digest ("<hex>.json" or
            // "blobs/sha256/<hex>"): check it.
            let stem = Path::new(&e.config).file_name().and_then(|s| s.to_str()).unwrap_or("");
            let stem = stem.strip_suffix(".json").unwrap_or(stem);
            if stem.len() == 64 && format!("sha256:{stem}") != actual {
                return Err(ImageError::DigestMismatch {
                    what: e.config.clone(),
                    expected: format!("sha256:{stem}"),
                    actual,
                });
            }
            let diff_ids = Self::diff_ids(&config, &e.config)?;
            if diff_ids.len() != e.layers.len() {
                return Err(fmt_err(&e.config, "manifest.json and config disagree on the number of layers"));
            }
            let mut left = self.limits.image;
            for (rel, diff) in e.layers.iter().zip(&diff_ids) {
                let f = Self::archive_file(dir, rel)?;
                // Newer docker names layers blobs/sha256/<digest>: check that too.
                let named = rel.strip_prefix("blobs/sha256/").map(|h| format!("sha256:{h}"));
                let f = match &named {
                    Some(d) => verify_file(f, rel, d)?,
                    None => f,
                };
                let (_, size) = self.add_layer(f, rel, named.as_deref(), Some(diff), left)?;
                left -= size.min(left);
            }
            let manifest_digest = self.put_image(&config, &diff_ids)?;
            let names =
                e.repo_tags.unwrap_or_default().iter().map(|n| normalize_reference(n)).collect::<Result<_, _>>()?;
            out.push(Loaded { names, manifest_digest });
        }
        Ok(out)
    }

    /// The cluster's view of an image in an export store: its manifest,
    /// config and layer blobs (see [`ImageStore::open_export`]).
    pub fn parts(&self, reference: &str) -> Result<ImageParts, ImageError> {
        let img = self.get(reference)?;
        let manifest = ManifestRefs::parse(&self.read_blob(&img.manifest_digest)?)?;
        let layers: Vec<String> = manifest.layers.into_iter().map(|l| l.digest).collect();
        for l in &layers {
            if !self.blob_path(l)?.is_file() {
                return Err(ImageError::MissingBlob(l.clone()));
            }
        }
        Ok(ImageParts { manifest_digest: img.manifest_digest, config_digest: img.config_digest, layers })
    }

    /// The file of a blob this store holds.
    pub fn blob_file(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let p = self.blob_path(digest)?;
        if p.is_file() { Ok(p) } else { Err(ImageError::MissingBlob(digest.to_string())) }
    }

    /// Whether the layer with this diff id is unpacked here.
    pub fn has_layer(&self, diff_id: &str) -> bool {
        self.layer_dir(diff_id).is_ok_and(|p| p.is_dir())
    }

    /// Unpacks a layer fetched from the cluster: an uncompressed tar whose
    /// digest must be `diff_id`.
    pub fn add_layer_tar(&self, tar: &Path, diff_id: &str) -> Result<(), ImageError> {
        let _lock = self.lock()?;
        let f = fs::File::open(tar).map_err(ioe(tar))?;
        self.add_layer(f, diff_id, Some(diff_id), Some(diff_id), self.limits.image).map(|_| ())
    }

    /// Records an image fetched from the cluster under `reference`, once
    /// its layers are here: the manifest and config are kept as they are,
    /// so the image has the same digest on every node.
    pub fn add_image(&self, reference: &str, manifest: &[u8], config: &[u8]) -> Result<Image, ImageError> {
        let name = normalize_reference(reference)?;
        let refs = ManifestRefs::parse(manifest)?;
        let config_digest = sha256_of(config);
        if refs.config.digest != config_digest {
            return Err(ImageError::DigestMismatch {
                what: "image config".into(),
                expected: refs.config.digest,
                actual: config_digest,
            });
        }
        let diff_ids = Self::diff_ids(config, &config_digest)?;
        let layers: Vec<&String> = refs.layers.iter().map(|l| &l.digest).collect();
        if diff_ids.iter().collect::<Vec<_>>() != layers {
            return Err(fmt_err(&config_digest, "the manifest's layers are not the config's diff ids"));
        }
        let _lock = self.lock()?;
        for d in &diff_ids {
            if !self.has_layer(d) {
                return Err(ImageError::MissingLayer { image: name, diff_id: d.clone() });
            }
        }
        self.put_blob(config)?;
        let digest = self.put_blob(manifest)?;
        let mut idx = self.read_index()?;
        idx.images.insert(name, digest.clone());
        self.write_index(&idx)?;
        self.get(&digest)
    }

    /// An image by `name[:tag]` or manifest digest.
    pub fn get(&self, reference: &str) -> Result<Image, ImageError> {
        let idx = self.read_index()?;
        let digest = if reference.starts_with("sha256:") {
            reference.to_string()
        } else {
            let n = normalize_reference(reference)?;
            idx.images.get(&n).cloned().ok_or_else(|| ImageError::NotFound(reference.to_string()))?
        };
        let manifest = self.read_blob(&digest).map_err(|e| match e {
            ImageError::MissingBlob(_) => ImageError::NotFound(reference.to_string()),
            e => e,
        })?;
        let manifest = ImageManifest::from_reader(&manifest[..]).map_err(|e| fmt_err(&digest, e))?;
        let config_digest = manifest.config().digest().to_string();
        let cfg_bytes = self.read_blob(&config_digest)?;
        let cfg = ImageConfiguration::from_reader(&cfg_bytes[..]).map_err(|e| fmt_err(&config_digest, e))?;
        let mut layers = Vec::new();
        for d in cfg.rootfs().diff_ids() {
            let p = self.layer_dir(d)?;
            if !p.is_dir() {
                return Err(ImageError::MissingLayer { image: reference.into(), diff_id: d.clone() });
            }
            layers.push(p);
        }
        let c = cfg.config().clone().unwrap_or_default();
        let config = RunConfig {
            env: c.env().clone().unwrap_or_default(),
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            user: c.user().clone().filter(|u| !u.is_empty()),
            working_dir: c.working_dir().clone().filter(|w| !w.is_empty()),
            exposed_ports: c.exposed_ports().clone().unwrap_or_default(),
        };
        let names = idx.images.iter().filter(|(_, d)| **d == digest).map(|(n, _)| n.clone()).collect();
        Ok(Image { names, manifest_digest: digest, config_digest, layers, config })
    }

    /// What `shoal run IMAGE` means by IMAGE: a name or digest in the store,
    /// or the path of a rootfs tarball or image archive, imported once and
    /// found again by the file's digest afterwards.
    pub fn resolve(&self, image: &str) -> Result<Image, ImageError> {
        let path = Path::new(image);
        let looks_like_path =
            image.contains('/') || image.ends_with(".tar") || image.ends_with(".tgz") || image.ends_with(".gz");
        if !(looks_like_path && path.is_file()) {
            return self.get(image);
        }
        let mut f = fs::File::open(path).map_err(ioe(path))?;
        let mut h = Sha256::new();
        io::copy(&mut f, &mut HashWriter(&mut h)).map_err(ioe(path))?;
        let source = format!("sha256:{}", hex::encode(h.finalize()));
        if let Some(d) = self.read_index()?.sources.get(&source)
            && let Ok(img) = self.get(d)
        {
            return Ok(img);
        }
        let _lock = self.lock()?;
        // Another run may have imported it while we waited for the lock.
        if let Some(d) = self.read_index()?.sources.get(&source)
            && let Ok(img) = self.get(d)
        {
            return Ok(img);
        }
        let digest = if is_image_archive(path)? {
            let loaded = self.load_locked(path)?;
            let mut idx = self.read_index()?;
            for l in &loaded {
                for n in &l.names {
                    idx.images.insert(n.clone(), l.manifest_digest.clone());
                }
            }
            self.write_index(&idx)?;
            loaded
                .into_iter()
                .next()
                .map(|l| l.manifest_digest)
                .ok_or_else(|| fmt_err(image, "the archive holds no image"))?
        } else {
            self.import_rootfs_locked(path)?
        };
        let mut idx = self.read_index()?;
        idx.sources.insert(source, digest.clone());
        self.write_index(&idx)?;
        self.get(&digest)
    }

    /// Every named image, by name.
    pub fn list(&self) -> Result<Vec<(String, Image)>, ImageError> {
        let idx = self.read_index()?;
        idx.images.keys().map(|n| Ok((n.clone(), self.get(n)?))).collect()
    }

    /// Removes a name, then every blob and layer no image or container
    /// still uses.
    /// `in_use`: the layer directories of containers that still exist
    /// (they are mounted), which garbage collection leaves.
    pub fn remove(&self, reference: &str, in_use: &BTreeSet<PathBuf>) -> Result<(), ImageError> {
        let _lock = self.lock()?;
        let mut idx = self.read_index()?;
        let name = normalize_reference(reference)?;
        let digest = idx.images.remove(&name).ok_or_else(|| ImageError::NotFound(reference.to_string()))?;
        if !idx.images.values().any(|d| *d == digest) {
            idx.sources.retain(|_, d| *d != digest);
        }
        self.write_index(&idx)?;
        self.gc(&idx, in_use)
    }

    fn gc(&self, idx: &Index, in_use: &BTreeSet<PathBuf>) -> Result<(), ImageError> {
        let mut blobs = BTreeSet::new();
        let mut layers: BTreeSet<PathBuf> = BTreeSet::new();
        for d in idx.images.values().chain(idx.sources.values()) {
            let img = self.get(d)?;
            blobs.insert(digest_hex(&img.manifest_digest)?.to_string());
            blobs.insert(digest_hex(&img.config_digest)?.to_string());
            layers.extend(img.layers);
        }
        // Layers of containers that still exist stay: they are mounted.
        layers.extend(in_use.iter().cloned());
        let bdir = self.root.join("blobs/sha256");
        for e in fs::read_dir(&bdir).map_err(ioe(&bdir))?.flatten() {
            if !blobs.contains(e.file_name().to_string_lossy().as_ref()) {
                let _ = fs::remove_file(e.path());
            }
        }
        let ldir = self.root.join("layers");
        for e in fs::read_dir(&ldir).map_err(ioe(&ldir))?.flatten() {
            if !layers.contains(&e.path()) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        Ok(())
    }
}

/// Hashes a whole file and checks it against `digest`; returns the file
/// rewound, ready to be read again.
fn verify_file(mut f: fs::File, what: &str, digest: &str) -> Result<fs::File, ImageError> {
    use std::io::Seek;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut HashWriter(&mut h)).map_err(ioe(Path::new(what)))?;
    let actual = format!("sha256:{}", hex::encode(h.finalize()));
    if actual != digest {
        return Err(ImageError::DigestMismatch { what: what.to_string(), expected: digest.to_string(), actual });
    }
    f.rewind().map_err(ioe(Path::new(what)))?;
    Ok(f)
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether a tarball is an image archive (OCI layout or docker save) rather
/// than a rootfs: it has index.json, oci-layout or manifest.json at its top.
fn is_image_archive(path: &Path) -> Result<bool, ImageError> {
    let f = fs::File::open(path).map_err(ioe(path))?;
    let mut buf = BufReader::new(f);
    let gz = buf.fill_buf().map_err(ioe(path))?.starts_with(&[0x1f, 0x8b]);
    let inner: Box<dyn Read> = if gz { Box::new(GzDecoder::new(buf)) } else { Box::new(buf) };
    let mut ar = tar::Archive::new(inner);
    let entries = ar.entries().map_err(ioe(path))?;
    for e in entries {
        let e = e.map_err(|e| ImageError::Unpack { what: path.display().to_string(), source: UnpackError::Read(e) })?;
        let p = e.path().map_err(ioe(path))?;
        let p = p.strip_prefix("./").unwrap_or(&p);
        if p == Path::new("oci-layout") || p == Path::new("index.json") || p == Path::new("manifest.json") {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn references_are_normalised() {
        assert_eq!(normalize_reference("busybox").unwrap(), "busybox:latest");
        assert_eq!(normalize_reference("reg:5000/a/b").unwrap(), "reg:5000/a/b:latest");
        assert_eq!(normalize_reference("a/b:1.2").unwrap(), "a/b:1.2");
        assert!(normalize_reference("a b").is_err());
        assert!(normalize_reference("").is_err());
    }

    #[test]
    fn digests_are_checked() {
        assert!(digest_hex(&sha256_of(b"x")).is_ok());
        assert!(digest_hex("sha256:../../etc").is_err());
        assert!(digest_hex("md5:00").is_err());
    }
}
