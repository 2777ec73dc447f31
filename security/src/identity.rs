//! What a node remembers about itself across restarts (`DATA/node.json`)
//! and its TLS material (`DATA/tls/`), with the file modes they need: keys
//! are 0600, everything is written to a temporary file and renamed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tls::NodeTls;

/// A node's role in the cluster: a manager is a Raft member (and runs
/// tasks unless drained); a worker only runs tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Manager,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "manager" => Some(Role::Manager),
            "worker" => Some(Role::Worker),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a node identity: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io { path: path.to_path_buf(), source }
}

/// `DATA/node.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    pub id: u64,
    pub name: String,
    pub role: Role,
    pub advertise: String,
    /// Managers last heard of, for an agent to reconnect to.
    pub managers: Vec<String>,
}

impl Identity {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("node.json")
    }

    pub fn exists(dir: &Path) -> bool {
        Self::path(dir).exists()
    }

    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        serde_json::from_str(&text).map_err(|source| IdentityError::Parse { path, source })
    }

    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        let path = Self::path(dir);
        let text = serde_json::to_string_pretty(self).map_err(|source| IdentityError::Parse { path: path.clone(), source })?;
        write_file(&path, &text, false)
    }
}

/// Writes `contents` to `path` atomically (temporary file, fsync, rename),
/// mode 0600 when `private`, else 0644; creates missing parents (0700).
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(p) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(p).map_err(io(p))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

pub fn read_file(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// `DATA/tls/{ca,node}.pem` and the node's key (0600).
pub fn save_tls(dir: &Path, tls: &NodeTls) -> Result<(), IdentityError> {
    write_file(&dir.join("tls/ca.pem"), &tls.ca_pem, false)?;
    write_file(&dir.join("tls/node.pem"), &tls.cert_pem, false)?;
    write_file(&dir.join("tls/node-key.pem"), &tls.key_pem, true)
}

pub fn load_tls(dir: &Path) -> Result<NodeTls, IdentityError> {
    Ok(NodeTls {
        ca_pem: read_file(&dir.join("tls/ca.pem"))?,
        cert_pem: read_file(&dir.join("tls/node.pem"))?,
        key_pem: read_file(&dir.join("tls/node-key.pem"))?,
    })
}

/// Records a role change the managers announced: the new certificate and
/// role, so the restarted components (and a restarted daemon) use them.
pub fn apply_role_change(dir: &Path, role: Role, cert_pem: &str) -> Result<(), IdentityError> {
    write_file(&dir.join("tls/node.pem"), cert_pem, false)?;
    let mut id = Identity::load(dir)?;
    id.role = role;
    id.save(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let id = Identity { id: 7, name: "n1".into(), role: Role::Worker, advertise: "198.18.0.2:7700".into(), managers: vec![] };
        id.save(t.path()).unwrap();
        let back = Identity::load(t.path()).unwrap();
        assert_eq!((back.id, back.role), (7, Role::Worker));
        // The file format is what earlier versions wrote.
        assert!(read_file(&Identity::path(t.path())).unwrap().contains("\"role\": \"worker\""));
        save_tls(t.path(), &NodeTls { ca_pem: "a".into(), cert_pem: "b".into(), key_pem: "c".into() }).unwrap();
        let mode = std::fs::metadata(t.path().join("tls/node-key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        apply_role_change(t.path(), Role::Manager, "new").unwrap();
        assert_eq!(Identity::load(t.path()).unwrap().role, Role::Manager);
        assert_eq!(load_tls(t.path()).unwrap().cert_pem, "new");
    }
}
