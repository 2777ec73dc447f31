//! Named volumes, local driver (as moby's `volume/local`): a volume is a
//! directory `DATA/volumes/NAME/_data` with its identity and options in
//! `meta.json` beside it. Cluster volumes carry the id of the cluster object
//! they were made for; `shoal run -v NAME:/dst` makes host-local ones (empty
//! id) that the cluster never reports nor deletes.
//!
//! The agent counts which volumes its tasks mount, so a volume the cluster
//! removed is deleted only once no local task uses it.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid volume name {0:?}: use [a-z0-9][a-z0-9_.-]*")]
    Name(String),
    #[error("volume {name}: {what}: {source}")]
    Io { name: String, what: String, source: io::Error },
    #[error("volume {name}: mounting {device} ({fstype}) failed: {source}")]
    Mount { name: String, device: String, fstype: String, source: nix::Error },
}

/// What `meta.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    /// The cluster object's id; empty for a host-local volume.
    pub id: String,
    /// Local driver options: type, device, o.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// A volume with data on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalVolume {
    pub name: String,
    pub id: String,
    /// Bytes on disk (st_blocks), summed over the tree.
    pub size: u64,
}

pub struct Volumes {
    root: PathBuf,
    in_use: Mutex<HashMap<String, usize>>,
}

/// Holds a volume in use while a task runs; dropping it releases it.
pub struct InUse {
    volumes: Arc<Volumes>,
    names: Vec<String>,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut m = self.volumes.in_use.lock().unwrap_or_else(|e| e.into_inner());
        for n in &self.names {
            if let Some(c) = m.get_mut(n) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    m.remove(n);
                }
            }
        }
    }
}

/// Volume names as Docker takes them (a superset of the cluster's).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl Volumes {
    pub fn new(data_dir: &Path) -> Self {
        Volumes { root: data_dir.join("volumes"), in_use: Mutex::new(HashMap::new()) }
    }

    fn dir(&self, name: &str) -> Result<PathBuf, VolumeError> {
        if !valid_name(name) {
            return Err(VolumeError::Name(name.to_string()));
        }
        Ok(self.root.join(name))
    }

    /// Marks `names` in use until the guard is dropped.
    pub fn hold(self: &Arc<Self>, names: Vec<String>) -> InUse {
        let mut m = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        for n in &names {
            *m.entry(n.clone()).or_default() += 1;
        }
        InUse { volumes: self.clone(), names }
    }

    fn used(&self, name: &str) -> bool {
        self.in_use.lock().unwrap_or_else(|e| e.into_inner()).contains_key(name)
    }

    /// The volume's data directory, made on first use. A volume left here
    /// by an earlier cluster object of the same name (another id) was
    /// removed from the cluster: its data goes and a new one starts.
    pub fn ensure(&self, name: &str, id: &str, options: &BTreeMap<String, String>) -> Result<PathBuf, VolumeError> {
        let dir = self.dir(name)?;
        let io_err = |what: &str| {
            let name = name.to_string();
            let what = what.to_string();
            move |source| VolumeError::Io { name, what, source }
        };
        let data = dir.join("_data");
        match self.meta(name) {
            Some(m) if m.id == id => {}
            Some(m) => {
                tracing::info!(volume = %name, old = %m.id, new = %id, "volume on this node belongs to a removed cluster volume: deleting its data");
                self.delete(name)?;
            }
            None => {}
        }
        if !data.exists() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io_err("create"))?;
            std::fs::DirBuilder::new().mode(0o755).create(&data).map_err(io_err("create _data"))?;
            let meta = Meta { id: id.to_string(), options: options.clone() };
            let json = serde_json::to_vec_pretty(&meta).map_err(|e| io_err("write meta.json")(io::Error::other(e)))?;
            std::fs::write(dir.join("meta.json"), json).map_err(io_err("write meta.json"))?;
            tracing::info!(volume = %name, id = %id, "volume created on this node");
        }
        if let (Some(fstype), Some(device)) = (options.get("type"), options.get("device"))
            && !crate::mounts::is_mount_point(&data).map_err(io_err("read mountinfo"))?
        {
            let o = options.get("o").map(String::as_str);
            mount(Some(device.as_str()), &data, Some(fstype.as_str()), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, o).map_err(
                |source| VolumeError::Mount { name: name.to_string(), device: device.clone(), fstype: fstype.clone(), source },
            )?;
        }
        Ok(data)
    }

    fn meta(&self, name: &str) -> Option<Meta> {
        let bytes = std::fs::read(self.root.join(name).join("meta.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Deletes a volume's data (unmounting it first when its options
    /// mounted something there).
    fn delete(&self, name: &str) -> Result<(), VolumeError> {
        let dir = self.dir(name)?;
        let data = dir.join("_data");
        if crate::mounts::is_mount_point(&data).unwrap_or(false)
            && let Err(e) = umount2(&data, MntFlags::MNT_DETACH)
        {
            return Err(VolumeError::Io { name: name.into(), what: "unmount".into(), source: e.into() });
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(VolumeError::Io { name: name.into(), what: "delete".into(), source }),
        }
    }

    /// The cluster volumes on this node with their sizes (host-local ones
    /// are not the cluster's business).
    pub fn list(&self) -> Vec<LocalVolume> {
        self.cluster_volumes().into_iter().map(|(name, id)| LocalVolume { size: disk_usage(&self.root.join(&name).join("_data")), name, id }).collect()
    }

    /// The cluster volumes on this node: (name, id), by name.
    fn cluster_volumes(&self) -> Vec<(String, String)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let mut out: Vec<(String, String)> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| valid_name(name))
            .filter_map(|name| self.meta(&name).filter(|m| !m.id.is_empty()).map(|m| (name, m.id)))
            .collect();
        out.sort();
        out
    }

    /// Deletes the cluster volumes with these ids, unless a local task still
    /// mounts one (it goes on a later report).
    pub fn remove_ids(&self, ids: &[String]) {
        for (name, id) in self.cluster_volumes().into_iter().filter(|(_, id)| ids.contains(id)) {
            let v = LocalVolume { size: disk_usage(&self.root.join(&name).join("_data")), name, id };
            if self.used(&v.name) {
                tracing::debug!(volume = %v.name, "volume removed from the cluster but still mounted by a task here: kept for now");
                continue;
            }
            match self.delete(&v.name) {
                Ok(()) => tracing::info!(volume = %v.name, id = %v.id, bytes = v.size, "volume removed from the cluster: its data on this node deleted"),
                Err(e) => tracing::warn!(volume = %v.name, error = %e, "could not delete a removed volume's data"),
            }
        }
    }
}

/// The runtime's mounts for a task's (or `shoal run`'s) `--mount`s: named
/// volumes become binds of their data directories (made on first use),
/// bind sources are checked on this host. `known` are the cluster's
/// volumes; a volume not among them is host-local (`shoal run`). Returns
/// the mounts and the volume names they use.
pub fn resolve_mounts(
    volumes: &Volumes,
    data_dir: &Path,
    mounts: &[shoal_proto::control::Mount],
    known: &[shoal_proto::dispatcher::VolumeAttachment],
    cluster: bool,
) -> Result<(Vec<crate::spec::Mount>, Vec<String>), String> {
    use crate::spec::Mount;
    let mut out = Vec::with_capacity(mounts.len());
    let mut names = Vec::new();
    for m in mounts {
        match m.r#type.as_str() {
            "volume" => {
                let (id, options) = match known.iter().find(|k| k.name == m.source) {
                    Some(k) => (k.id.as_str(), k.options.clone().into_iter().collect()),
                    None if cluster => return Err(format!("volume {:?} is not known to the cluster", m.source)),
                    None => ("", BTreeMap::new()),
                };
                let source = volumes.ensure(&m.source, id, &options).map_err(|e| e.to_string())?;
                names.push(m.source.clone());
                out.push(Mount::Bind { source, destination: m.target.clone(), read_only: m.read_only, seed: !m.volume_nocopy });
            }
            "bind" => {
                let source = check_bind_source(&m.source, data_dir)?;
                out.push(Mount::Bind { source, destination: m.target.clone(), read_only: m.read_only, seed: false });
            }
            "tmpfs" => out.push(Mount::Tmpfs {
                destination: m.target.clone(),
                size_bytes: (m.tmpfs_size > 0).then_some(m.tmpfs_size),
                mode: (m.tmpfs_mode > 0).then_some(m.tmpfs_mode),
                read_only: m.read_only,
            }),
            other => return Err(format!("mount type {other:?} is not volume, bind or tmpfs")),
        }
    }
    Ok((out, names))
}

/// A bind mount's source must be an absolute path that exists on this
/// host (it is never created) and lies outside shoal's data dir.
pub fn check_bind_source(source: &str, data_dir: &Path) -> Result<PathBuf, String> {
    let p = Path::new(source);
    if !p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir | std::path::Component::CurDir)) {
        return Err(format!("bind source {source:?} must be a clean absolute path"));
    }
    let real = match p.canonicalize() {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("bind source path {source} does not exist on this node (shoal never creates it)"));
        }
        Err(e) => return Err(format!("bind source path {source}: {e}")),
    };
    let data = data_dir.canonicalize().unwrap_or_else(|_| data_dir.to_path_buf());
    if real.starts_with(&data) || data.starts_with(&real) && real != Path::new("/") {
        return Err(format!("bind source {source} is or holds shoal's data dir {}: refused", data.display()));
    }
    Ok(real)
}

/// Whether `dir` has no entries.
pub fn is_empty_dir(dir: &Path) -> io::Result<bool> {
    Ok(std::fs::read_dir(dir)?.next().is_none())
}

/// Copies the tree at `from` into the existing directory `to`: files,
/// directories and symlinks with their owners and modes (symlinks are
/// copied, never followed); other file types are skipped. `to` takes the
/// owner and mode of `from`.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::fs::{PermissionsExt, lchown};
    let top = std::fs::symlink_metadata(from)?;
    lchown(to, Some(top.uid()), Some(top.gid()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(top.mode() & 0o7777))?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let m = std::fs::symlink_metadata(&src)?;
        let ft = m.file_type();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if ft.is_dir() {
            std::fs::create_dir(&dst)?;
            copy_tree(&src, &dst)?;
            continue;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst)?;
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
        } else {
            continue;
        }
        lchown(&dst, Some(m.uid()), Some(m.gid()))?;
    }
    Ok(())
}

/// Bytes on disk under `dir`, not following symlinks nor crossing into
/// other filesystems.
pub fn disk_usage(dir: &Path) -> u64 {
    let Ok(top) = std::fs::symlink_metadata(dir) else { return 0 };
    let dev = top.dev();
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            total = total.saturating_add(m.blocks().saturating_mul(512));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn volumes_are_made_listed_and_removed_by_id() {
        let t = tempfile::tempdir().unwrap();
        let v = Arc::new(Volumes::new(t.path()));
        let data = v.ensure("db", "id1", &BTreeMap::new()).unwrap();
        std::fs::write(data.join("f"), vec![7u8; 10_000]).unwrap();
        v.ensure("local", "", &BTreeMap::new()).unwrap();
        let l = v.list();
        assert_eq!(l.len(), 1, "host-local volumes are not listed: {l:?}");
        assert_eq!((l[0].name.as_str(), l[0].id.as_str()), ("db", "id1"));
        assert!(l[0].size >= 10_000);
        // Same id: the data stays.
        assert!(v.ensure("db", "id1", &BTreeMap::new()).unwrap().join("f").exists());
        // In use: kept; released: deleted.
        let held = v.hold(vec!["db".into()]);
        v.remove_ids(&["id1".into()]);
        assert!(data.join("f").exists());
        drop(held);
        v.remove_ids(&["id1".into()]);
        assert!(!data.exists());
        // A new object with the same name starts empty.
        let data = v.ensure("db", "id1", &BTreeMap::new()).unwrap();
        std::fs::write(data.join("f"), b"x").unwrap();
        let data = v.ensure("db", "id2", &BTreeMap::new()).unwrap();
        assert!(!data.join("f").exists());
        assert!(v.ensure("../x", "", &BTreeMap::new()).is_err());
    }

    #[test]
    fn copy_tree_keeps_files_links_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let (from, to) = (t.path().join("a"), t.path().join("b"));
        std::fs::create_dir_all(from.join("sub")).unwrap();
        std::fs::write(from.join("sub/f"), b"hello").unwrap();
        std::fs::set_permissions(from.join("sub/f"), std::fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink("sub/f", from.join("l")).unwrap();
        std::fs::set_permissions(&from, std::fs::Permissions::from_mode(0o750)).unwrap();
        std::fs::create_dir(&to).unwrap();
        assert!(is_empty_dir(&to).unwrap());
        copy_tree(&from, &to).unwrap();
        assert_eq!(std::fs::read(to.join("sub/f")).unwrap(), b"hello");
        assert_eq!(std::fs::metadata(to.join("sub/f")).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_link(to.join("l")).unwrap(), Path::new("sub/f"));
        assert_eq!(std::fs::metadata(&to).unwrap().permissions().mode() & 0o777, 0o750);
    }
}
