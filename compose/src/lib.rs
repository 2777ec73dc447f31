//! Compose files → what `shoal stack deploy` creates: networks, volumes,
//! secrets, configs and services, as shoal's own Control API requests.
//!
//! This crate only reads: it parses, interpolates, merges and converts,
//! and every problem is found before the CLI creates anything. Each error
//! about the files names the file, the line and the key path:
//! `compose.yml:12: services.web.deploy.replicaz: unknown key`.
//!
//! - **Several files** (`-c base.yml -c prod.yml`): each is parsed and
//!   interpolated on its own, then each later file is laid over the ones
//!   before it: mappings merge key by key, recursively; scalars and lists
//!   (`ports`, `command`, `environment` written as a list, …) are replaced
//!   whole by the later file's. Relative paths are relative to the file
//!   they are written in.
//! - **Variables**: `${VAR}`, `$VAR`, `${VAR:-default}`, `${VAR-default}`,
//!   `${VAR:?error}`, `${VAR?error}`, `${VAR:+alt}`, `${VAR+alt}` and `$$`
//!   in every value, from the process environment over a `.env` file in
//!   the directory of the first compose file. An unset variable is blank,
//!   with a warning.
//! - **Names**, as Docker's: an object `key` of stack `shop` is
//!   `shop_key`, unless it is `external` (then `name:` or the key) or has
//!   a `name:`. Everything created, services included, carries the label
//!   `com.docker.stack.namespace=shop`. A service also answers to its short
//!   key in DNS (`backend`) on its networks. Services that list no
//!   networks join `shop_default`.
//! - **Ignored** keys that `docker stack deploy` also ignores (`build`,
//!   `restart`, `depends_on`, …) give one warning each, as Docker prints
//!   them; keys nobody knows, and features shoal can't honour, are errors.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use sha2::Digest;
use shoal_proto::control::{CreateDataRequest, CreateNetworkRequest, CreateVolumeRequest, ServiceSpec};

mod envfile;
mod error;
mod interpolate;
mod objects;
mod read;
mod service;
mod units;
mod yaml;

#[cfg(test)]
mod tests;

pub use error::{At, ComposeError};

/// The label every object and service of a stack carries, with the
/// stack's name as its value (Docker's).
pub const NAMESPACE_LABEL: &str = "com.docker.stack.namespace";

/// Everything a stack is made of, in the order to create it.
#[derive(Debug)]
pub struct Stack {
    pub name: String,
    /// (short compose key, spec whose name is `STACK_key`), in file order.
    pub services: Vec<(String, ServiceSpec)>,
    /// The networks services use.
    pub networks: Vec<StackNetwork>,
    /// The volumes services mount.
    pub volumes: Vec<StackVolume>,
    /// Every declared secret but external ones no service uses; a
    /// non-external one carries its file's bytes in `req.data`.
    pub secrets: Vec<StackData>,
    pub configs: Vec<StackData>,
    /// Printed to stderr by the CLI: ignored options, unset variables.
    pub warnings: Vec<String>,
}

/// One cluster object of a stack: its compose key, its cluster name, and
/// for one that isn't external, how to create it (labels included).
#[derive(Debug, Clone)]
pub struct StackObject<R> {
    pub key: String,
    pub name: String,
    /// Must exist already; never created nor removed by the stack.
    pub external: bool,
    pub req: R,
}

pub type StackNetwork = StackObject<CreateNetworkRequest>;
pub type StackVolume = StackObject<CreateVolumeRequest>;
pub type StackData = StackObject<CreateDataRequest>;

impl StackData {
    /// `sha256:<hex>` of the data, the form the managers report.
    pub fn digest(&self) -> String {
        let d = sha2::Sha256::digest(&self.req.data);
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }
}

/// A stack's own name: 1-63 lowercase letters, digits or '-', starting and
/// ending with a letter or digit (its objects are named `STACK_key`).
pub fn validate_stack_name(name: &str) -> Result<(), ComposeError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok { Ok(()) } else { Err(ComposeError::StackName { name: name.to_string() }) }
}

/// Reads `files` (later ones over earlier ones) for stack `stack`, with
/// `env` (the process environment) for interpolation.
pub fn load(files: &[PathBuf], env: &HashMap<String, String>, stack: &str) -> Result<Stack, ComposeError> {
    validate_stack_name(stack)?;
    let first = files.first().ok_or(ComposeError::NoFiles)?;
    let vars = variables(first, env)?;
    let mut warnings = Warnings::default();
    let mut merged: Option<yaml::Node> = None;
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|source| ComposeError::Read { path: f.clone(), source })?;
        let abs = std::path::absolute(f).map_err(|source| ComposeError::Read { path: f.clone(), source })?;
        let dir = abs.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
        let src = Rc::new(yaml::Source { name: f.display().to_string(), dir });
        let mut tree = yaml::parse(src, &text)?;
        interpolate_tree(&mut tree, "", &vars, &mut warnings)?;
        merged = Some(match merged {
            None => tree,
            Some(base) => yaml::merge(base, tree),
        });
    }
    let root = merged.ok_or(ComposeError::NoFiles)?;
    let mut cx = Cx { stack, vars: &vars, warnings };
    let mut stack_ = convert(&mut cx, &root)?;
    if stack_.services.is_empty() {
        return Err(ComposeError::NoServices { files: files.iter().map(|f| f.display().to_string()).collect() });
    }
    stack_.warnings = cx.warnings.finish();
    Ok(stack_)
}

/// The `.env` beside the first file, with the process environment over it.
fn variables(first: &Path, env: &HashMap<String, String>) -> Result<HashMap<String, String>, ComposeError> {
    let dotenv = first.parent().unwrap_or(Path::new("")).join(".env");
    let mut vars = HashMap::new();
    match std::fs::read_to_string(&dotenv) {
        Ok(text) => {
            for (k, v) in envfile::parse(&dotenv.display().to_string(), &text)? {
                if let Some(v) = v.or_else(|| env.get(&k).cloned()) {
                    vars.insert(k, v);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ComposeError::Read { path: dotenv, source }),
    }
    vars.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(vars)
}

/// Substitutes variables in every scalar value (keys are left alone).
fn interpolate_tree(n: &mut yaml::Node, path: &str, vars: &HashMap<String, String>, warnings: &mut Warnings) -> Result<(), ComposeError> {
    match &mut n.value {
        yaml::Value::Scalar(s) => {
            let lookup = |k: &str| vars.get(k).cloned();
            let mut unset = Vec::new();
            let at = || At { file: n.src.name.clone(), line: n.line, key: path.to_string() };
            let out = interpolate::interpolate(s, &lookup, &mut unset).map_err(|p| match p {
                interpolate::Problem::Invalid(reason) => ComposeError::Interpolation { at: at(), reason },
                interpolate::Problem::Missing { var, message } => ComposeError::MissingVariable { at: at(), var, message },
            })?;
            for u in unset {
                warnings.other(format!("The {u:?} variable is not set. Defaulting to a blank string."));
            }
            *s = out;
        }
        yaml::Value::Seq(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_tree(item, &read::index(path, i), vars, warnings)?;
            }
        }
        yaml::Value::Map(entries) => {
            for e in entries.iter_mut() {
                interpolate_tree(&mut e.value, &read::child(path, &e.key.name), vars, warnings)?;
            }
        }
        yaml::Value::Null => {}
    }
    Ok(())
}

/// Warnings, each printed once.
#[derive(Default)]
struct Warnings {
    other: Vec<String>,
    ignored: BTreeSet<String>,
    deprecated: Vec<(String, &'static str)>,
}

impl Warnings {
    fn other(&mut self, w: String) {
        if !self.other.contains(&w) {
            self.other.push(w);
        }
    }

    fn ignore(&mut self, key: &str) {
        self.ignored.insert(key.to_string());
    }

    fn deprecated(&mut self, key: &str, why: &'static str) {
        if !self.deprecated.iter().any(|(k, _)| k == key) {
            self.deprecated.push((key.to_string(), why));
        }
    }

    fn finish(&mut self) -> Vec<String> {
        let mut out = std::mem::take(&mut self.other);
        out.extend(self.ignored.iter().map(|k| format!("Ignoring unsupported options: {k}")));
        out.extend(self.deprecated.iter().map(|(k, why)| format!("Ignoring deprecated options: {k}: {why}")));
        out
    }
}

/// What the conversion reads from beside the tree.
struct Cx<'a> {
    stack: &'a str,
    vars: &'a HashMap<String, String>,
    warnings: Warnings,
}

/// The top-level objects, marked as services use them.
struct Tops {
    networks: Vec<objects::Declared<CreateNetworkRequest>>,
    volumes: Vec<objects::Declared<CreateVolumeRequest>>,
    secrets: Vec<objects::Declared<CreateDataRequest>>,
    configs: Vec<objects::Declared<CreateDataRequest>>,
    /// `STACK_default`, for services that name no network when the file
    /// doesn't declare `default` itself.
    default_name: String,
    default_used: bool,
}

fn object<R>(d: objects::Declared<R>) -> StackObject<R> {
    StackObject { key: d.key, name: d.name, external: d.external, req: d.req }
}

fn convert(cx: &mut Cx, root: &yaml::Node) -> Result<Stack, ComposeError> {
    let mut tops = Tops {
        networks: Vec::new(),
        volumes: Vec::new(),
        secrets: Vec::new(),
        configs: Vec::new(),
        default_name: format!("{}_default", cx.stack),
        default_used: false,
    };
    let mut services = None;
    // Top-level objects first: services refer to them.
    for e in read::entries(root, "")? {
        let k = e.key.name.as_str();
        match k {
            "version" => {}
            "name" => cx.warnings.ignore("name"),
            "services" => services = Some(e),
            "networks" => tops.networks = objects::networks(cx, &e.value)?,
            "volumes" => tops.volumes = objects::volumes(cx, &e.value)?,
            "secrets" => tops.secrets = objects::data(cx, "secret", &e.value)?,
            "configs" => tops.configs = objects::data(cx, "config", &e.value)?,
            "include" | "models" => {
                return Err(ComposeError::Unsupported { at: read::key_at(&e.key, k), reason: format!("`{k}`") });
            }
            _ if k.starts_with("x-") => {}
            _ => return Err(read::unknown(e, k)),
        }
    }
    let mut specs = Vec::new();
    if let Some(e) = services {
        for s in read::entries(&e.value, "services")? {
            let spec = service::service(cx, &s.key, &s.value, &mut tops)?;
            specs.push((s.key.name.clone(), spec));
        }
    }
    let mut networks: Vec<StackNetwork> = tops.networks.into_iter().filter(|d| d.used).map(object).collect();
    if tops.default_used {
        let mut labels = HashMap::new();
        labels.insert(NAMESPACE_LABEL.to_string(), cx.stack.to_string());
        networks.push(StackObject {
            key: "default".into(),
            name: tops.default_name.clone(),
            external: false,
            req: CreateNetworkRequest { name: tops.default_name, labels, ..Default::default() },
        });
    }
    Ok(Stack {
        name: cx.stack.to_string(),
        services: specs,
        networks,
        volumes: tops.volumes.into_iter().filter(|d| d.used).map(object).collect(),
        secrets: tops.secrets.into_iter().filter(|d| d.used || !d.external).map(object).collect(),
        configs: tops.configs.into_iter().filter(|d| d.used || !d.external).map(object).collect(),
        warnings: Vec::new(),
    })
}
