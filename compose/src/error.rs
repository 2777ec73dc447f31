//! What can be wrong with a set of compose files. Every error about the
//! files' content starts with `FILE:LINE: KEY.PATH:`, the place to fix.

use std::fmt;
use std::path::PathBuf;

/// A place in a compose file: the file as the operator named it, the line
/// (1-based) and the key path (`services.web.deploy.replicas`,
/// `services.web.ports[0]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct At {
    pub file: String,
    pub line: usize,
    pub key: String,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}:{}", self.file, self.line)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.key)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("no compose file given")]
    NoFiles,
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{file}:{line}: invalid YAML: {message}")]
    Yaml { file: String, line: usize, message: String },
    #[error("{file}:{line}: invalid line in env file: {reason}")]
    EnvFile { file: String, line: usize, reason: &'static str },
    #[error("invalid stack name {name:?}: must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit")]
    StackName { name: String },
    #[error("{}: no services defined", files.join(", "))]
    NoServices { files: Vec<String> },
    #[error("{at}: unknown key")]
    UnknownKey { at: At },
    #[error("{at}: expected {expected}, found {found}")]
    WrongType { at: At, expected: &'static str, found: String },
    #[error("{at}: {reason}")]
    Invalid { at: At, reason: String },
    /// A compose or Swarm feature shoal can't honour.
    #[error("{at}: not supported by shoal: {reason}")]
    Unsupported { at: At, reason: String },
    #[error("{at}: undefined {kind} {name:?}: declare it under the top-level `{kind}s:`")]
    Undefined { at: At, kind: &'static str, name: String },
    #[error("{at}: {path:?} leads outside the directory of {} ({}); use an absolute path for files elsewhere", at.file, dir.display())]
    PathEscape { at: At, path: String, dir: PathBuf },
    #[error("{at}: cannot read {}: {source}", path.display())]
    ReadReferenced { at: At, path: PathBuf, source: std::io::Error },
    #[error("{at}: required variable {var} is missing a value{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    MissingVariable { at: At, var: String, message: String },
    #[error("{at}: invalid interpolation: {reason}")]
    Interpolation { at: At, reason: String },
}

impl ComposeError {
    /// Where in the files the error is, when it is about their content.
    pub fn at(&self) -> Option<&At> {
        match self {
            ComposeError::UnknownKey { at }
            | ComposeError::WrongType { at, .. }
            | ComposeError::Invalid { at, .. }
            | ComposeError::Unsupported { at, .. }
            | ComposeError::Undefined { at, .. }
            | ComposeError::PathEscape { at, .. }
            | ComposeError::ReadReferenced { at, .. }
            | ComposeError::MissingVariable { at, .. }
            | ComposeError::Interpolation { at, .. } => Some(at),
            _ => None,
        }
    }
}
