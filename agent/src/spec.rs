//! What to run: the container's spec, as the runtime takes it and as the
//! supervisor reads it back from the container's directory (config.json).

use std::path::PathBuf;

use crate::cgroup::Limits;

/// One container, fully resolved: layers are paths, volumes are bind mounts.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ContainerSpec {
    /// Unique on this host; names the container's directory and cgroup.
    pub id: String,
    pub hostname: String,
    /// Unpacked layer directories, bottom first.
    pub layers: Vec<PathBuf>,
    /// argv; the program is looked up in the container's PATH.
    pub args: Vec<String>,
    /// `K=V` pairs.
    pub env: Vec<String>,
    /// Working directory inside the container (created when missing).
    pub cwd: String,
    /// `uid[:gid]` or `name[:group]`, resolved in the container's /etc.
    pub user: Option<String>,
    pub read_only: bool,
    pub mounts: Vec<Mount>,
    pub limits: Limits,
    /// Run shoal's minimal init as pid 1 (forwards signals, reaps zombies).
    pub init: bool,
    /// A network namespace to join (pinned at this path) instead of a new
    /// one with only `lo`.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Capabilities, seccomp and rlimits; absent in a spec written by an
    /// older shoal: Docker's defaults.
    #[serde(default)]
    pub security: Security,
    /// Run in a user namespace: container ids 0.. are these host ids.
    #[serde(default)]
    pub userns: Option<crate::userns::IdMap>,
}

/// What confines the workload beyond namespaces and cgroups.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Security {
    /// On top of Docker's default capabilities (names, or `ALL`).
    #[serde(default)]
    pub cap_add: Vec<String>,
    /// Taken from them (names, or `ALL`).
    #[serde(default)]
    pub cap_drop: Vec<String>,
    /// `""`: Docker's default profile; `"unconfined"`: none; else a profile
    /// as JSON.
    #[serde(default)]
    pub seccomp: String,
    /// (name, soft, hard); -1 is unlimited.
    #[serde(default)]
    pub ulimits: Vec<(String, i64, i64)>,
}

/// A mount on top of the rootfs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Mount {
    Bind {
        source: PathBuf,
        destination: String,
        read_only: bool,
        /// A volume: when `source` is empty, copy the image's files at
        /// `destination` into it first (Docker's copy-up).
        #[serde(default)]
        seed: bool,
    },
    Tmpfs {
        destination: String,
        size_bytes: Option<u64>,
        /// Permission bits of its root; `None`: 01777.
        #[serde(default)]
        mode: Option<u32>,
        #[serde(default)]
        read_only: bool,
    },
}

impl Mount {
    pub fn destination(&self) -> &str {
        match self {
            Mount::Bind { destination, .. } | Mount::Tmpfs { destination, .. } => destination,
        }
    }
}

/// What a caller (the agent for a task, `shoal run`) asks to run, before
/// the image's config fills in the rest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunRequest {
    pub id: String,
    /// Name in the store, digest, or path of a tarball/archive.
    pub image: String,
    /// Replaces the image's Entrypoint (`Some(vec![])` clears it).
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's Cmd when not empty.
    pub command: Vec<String>,
    /// `K=V`, on top of the image's Env.
    pub env: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub hostname: Option<String>,
    pub read_only: bool,
    pub mounts: Vec<Mount>,
    pub limits: Limits,
    pub no_init: bool,
    /// Join the network namespace pinned at this path (made and wired by
    /// the overlay) instead of a new one of the container's own.
    pub netns: Option<PathBuf>,
    pub security: Security,
    pub userns: Option<crate::userns::IdMap>,
}

/// Why a request can't become a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("container {id}: no command given and image {image} has no Cmd or Entrypoint")]
    NoCommand { id: String, image: String },
}

impl RunRequest {
    /// Merges the request with the image's config the way Docker does:
    /// argv = (entrypoint override or image Entrypoint) + (command or, when
    /// the entrypoint was not overridden, image Cmd); env = image Env with
    /// the request's variables replacing same-named ones.
    pub fn to_spec(&self, image: &crate::image::Image) -> Result<ContainerSpec, SpecError> {
        let cfg = &image.config;
        let mut args: Vec<String> = self.entrypoint.clone().unwrap_or_else(|| cfg.entrypoint.clone());
        if !self.command.is_empty() {
            args.extend(self.command.iter().cloned());
        } else if self.entrypoint.is_none() {
            args.extend(cfg.cmd.iter().cloned());
        }
        if args.is_empty() {
            return Err(SpecError::NoCommand { id: self.id.clone(), image: self.image.clone() });
        }
        let mut env = cfg.env.clone();
        for kv in &self.env {
            let key = kv.split('=').next().unwrap_or("");
            env.retain(|x| x.split('=').next() != Some(key));
            env.push(kv.clone());
        }
        Ok(ContainerSpec {
            id: self.id.clone(),
            hostname: self.hostname.clone().unwrap_or_else(|| self.id.chars().take(12).collect()),
            layers: image.layers.clone(),
            args,
            env,
            cwd: self.workdir.clone().or_else(|| cfg.working_dir.clone()).unwrap_or_else(|| "/".into()),
            user: self.user.clone().or_else(|| cfg.user.clone()),
            read_only: self.read_only,
            mounts: self.mounts.clone(),
            limits: self.limits.clone(),
            init: !self.no_init,
            netns: self.netns.clone(),
            security: self.security.clone(),
            userns: self.userns,
        })
    }
}

/// Default pids limit: stops fork bombs while leaving room for any normal
/// service (Docker has none by default; the issue asks for one).
pub const DEFAULT_PIDS_LIMIT: u64 = 4096;

/// PATH when neither the image nor the caller sets one (Docker's default).
pub use crate::paths::DEFAULT_PATH;

/// Parses a size like `64M`, `512k`, `1g`, `1048576` or `64MiB` into bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: f64 =
        num.parse().map_err(|_| format!("invalid size {s:?}: want a number with an optional unit (k, m, g)"))?;
    let mult: u64 = match unit.to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("invalid size {s:?}: unknown unit {unit:?}")),
    };
    let v = n * mult as f64;
    if !(v.is_finite() && v >= 1.0) {
        return Err(format!("invalid size {s:?}"));
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("32M").unwrap(), 32 << 20);
        assert_eq!(parse_bytes("64m").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1g").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("512k").unwrap(), 512 << 10);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert_eq!(parse_bytes("64MiB").unwrap(), 64 << 20);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5q").is_err());
    }
}

/// The layer directories of every container under `containers_dir` (each
/// keeps its spec in `config.json`): what image garbage collection must
/// leave, since they are mounted.
pub fn layers_in_use(containers_dir: &std::path::Path) -> std::collections::BTreeSet<PathBuf> {
    let mut layers = std::collections::BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir(containers_dir) {
        for c in rd.flatten() {
            if let Ok(b) = std::fs::read(c.path().join("config.json"))
                && let Ok(spec) = serde_json::from_slice::<ContainerSpec>(&b)
            {
                layers.extend(spec.layers);
            }
        }
    }
    layers
}
