//! Reading typed values out of the tree, each failure naming the file,
//! the line and the key path.

use std::path::{Component, Path, PathBuf};

use crate::error::{At, ComposeError};
use crate::units;
use crate::yaml::{Entry, Key, Node, Value};

pub fn at(n: &Node, path: &str) -> At {
    At { file: n.src.name.clone(), line: n.line, key: path.to_string() }
}

pub fn key_at(k: &Key, path: &str) -> At {
    At { file: k.src.name.clone(), line: k.line, key: path.to_string() }
}

pub fn child(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

pub fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

pub fn wrong(n: &Node, path: &str, expected: &'static str) -> ComposeError {
    ComposeError::WrongType { at: at(n, path), expected, found: n.describe() }
}

pub fn invalid(n: &Node, path: &str, reason: impl Into<String>) -> ComposeError {
    ComposeError::Invalid { at: at(n, path), reason: reason.into() }
}

pub fn unsupported(n: &Node, path: &str, reason: impl Into<String>) -> ComposeError {
    ComposeError::Unsupported { at: at(n, path), reason: reason.into() }
}

pub fn unknown(e: &Entry, path: &str) -> ComposeError {
    ComposeError::UnknownKey { at: key_at(&e.key, path) }
}

/// A mapping's entries; nothing (`key:`) is an empty mapping.
pub fn entries<'a>(n: &'a Node, path: &str) -> Result<&'a [Entry], ComposeError> {
    match &n.value {
        Value::Map(m) => Ok(m),
        Value::Null => Ok(&[]),
        _ => Err(wrong(n, path, "a mapping")),
    }
}

/// A list's items; nothing is an empty list.
pub fn items<'a>(n: &'a Node, path: &str) -> Result<&'a [Node], ComposeError> {
    match &n.value {
        Value::Seq(s) => Ok(s),
        Value::Null => Ok(&[]),
        _ => Err(wrong(n, path, "a list")),
    }
}

pub fn string(n: &Node, path: &str) -> Result<String, ComposeError> {
    match &n.value {
        Value::Scalar(s) => Ok(s.clone()),
        _ => Err(wrong(n, path, "a string")),
    }
}

pub fn boolean(n: &Node, path: &str) -> Result<bool, ComposeError> {
    match &n.value {
        Value::Scalar(s) => match s.as_str() {
            "true" | "True" | "TRUE" => Ok(true),
            "false" | "False" | "FALSE" => Ok(false),
            _ => Err(wrong(n, path, "true or false")),
        },
        _ => Err(wrong(n, path, "true or false")),
    }
}

pub fn uint(n: &Node, path: &str) -> Result<u64, ComposeError> {
    match &n.value {
        Value::Scalar(s) => s.trim().parse::<u64>().map_err(|_| wrong(n, path, "a whole number")),
        _ => Err(wrong(n, path, "a whole number")),
    }
}

pub fn duration_ms(n: &Node, path: &str) -> Result<u64, ComposeError> {
    let s = string(n, path).map_err(|_| wrong(n, path, "a duration such as 1m30s or 500ms"))?;
    units::parse_duration(&s)
        .map(|d| d.as_millis().min(u64::MAX as u128) as u64)
        .ok_or_else(|| wrong(n, path, "a duration such as 1m30s or 500ms"))
}

pub fn size(n: &Node, path: &str) -> Result<u64, ComposeError> {
    let s = string(n, path).map_err(|_| wrong(n, path, "a size such as 64M, 1g or a byte count"))?;
    units::parse_size(&s).ok_or_else(|| wrong(n, path, "a size such as 64M, 1g or a byte count"))
}

pub fn cpus(n: &Node, path: &str) -> Result<u64, ComposeError> {
    let s = string(n, path).map_err(|_| wrong(n, path, "a number of CPUs such as 0.5"))?;
    units::parse_cpus(&s).ok_or_else(|| wrong(n, path, "a number of CPUs such as 0.5"))
}

/// A list of strings.
pub fn strings(n: &Node, path: &str) -> Result<Vec<String>, ComposeError> {
    items(n, path)?
        .iter()
        .enumerate()
        .map(|(i, item)| string(item, &index(path, i)))
        .collect()
}

/// `KEY: VALUE` mapping or `- KEY=VALUE` list (environment, labels); a
/// value of nothing (`KEY:` or `- KEY`) is None.
pub fn key_values(n: &Node, path: &str) -> Result<Vec<(String, Option<String>, At)>, ComposeError> {
    let mut out = Vec::new();
    match &n.value {
        Value::Null => {}
        Value::Map(entries) => {
            for e in entries {
                let p = child(path, &e.key.name);
                let v = match &e.value.value {
                    Value::Null => None,
                    Value::Scalar(s) => Some(s.clone()),
                    _ => return Err(wrong(&e.value, &p, "a string, a number or a boolean")),
                };
                if e.key.name.is_empty() {
                    return Err(ComposeError::Invalid { at: key_at(&e.key, &p), reason: "empty key".into() });
                }
                out.push((e.key.name.clone(), v, key_at(&e.key, &p)));
            }
        }
        Value::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                let p = index(path, i);
                let s = string(item, &p)?;
                let (k, v) = match s.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (s.clone(), None),
                };
                if k.is_empty() {
                    return Err(invalid(item, &p, format!("{s:?}: expected KEY=VALUE")));
                }
                out.push((k, v, at(item, &p)));
            }
        }
        Value::Scalar(_) => return Err(wrong(n, path, "a mapping or a list of KEY=VALUE")),
    }
    Ok(out)
}

/// A path in a compose file: absolute as it is, relative against the
/// directory of the file it is written in, and then never outside it
/// (`../` that climbs above it is refused).
pub fn file_path(n: &Node, path: &str, value: &str) -> Result<PathBuf, ComposeError> {
    if value.is_empty() {
        return Err(invalid(n, path, "empty path"));
    }
    if value.starts_with('~') {
        return Err(invalid(n, path, format!("{value:?}: '~' is not expanded; use an absolute path or one relative to the compose file")));
    }
    let p = Path::new(value);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let mut rel = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !rel.pop() {
                    return Err(ComposeError::PathEscape { at: at(n, path), path: value.to_string(), dir: n.src.dir.clone() });
                }
            }
            Component::Normal(x) => rel.push(x),
            Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Ok(n.src.dir.join(rel))
}

/// DNS-label rules, as the managers check names: 1-63 of `a-z 0-9 - _`,
/// starting and ending with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !name.starts_with(['-', '_'])
        && !name.ends_with(['-', '_'])
}

pub const NAME_RULE: &str = "1-63 lowercase letters, digits, '-' or '_', starting and ending with a letter or digit";

/// An absolute path without `.`/`..` or empty components.
pub fn clean_absolute(p: &str) -> bool {
    p.starts_with('/') && !p.contains('\0') && (p == "/" || p[1..].split('/').all(|c| !c.is_empty() && c != "." && c != ".."))
}
