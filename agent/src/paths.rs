//! Paths inside a container's root: resolving them as the container will
//! see them, and the PATH a container gets when its image sets none. Below
//! the image store and the runtime, which both use it.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

/// The PATH of a container whose image sets none (Docker's).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Resolves `path` inside `root` the way the container will see it:
/// symlinks are followed, but absolute targets and `..` never leave `root`.
pub fn resolve_in_root(root: &Path, path: &str) -> io::Result<PathBuf> {
    let mut out = root.to_path_buf();
    let mut pending: Vec<std::ffi::OsString> = Vec::new();
    let push_rev = |pending: &mut Vec<std::ffi::OsString>, p: &Path| {
        for c in p.components().rev() {
            match c {
                Component::Normal(s) => pending.push(s.to_os_string()),
                Component::ParentDir => pending.push("..".into()),
                _ => {}
            }
        }
    };
    push_rev(&mut pending, Path::new(path));
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            if out != root {
                out.pop();
            }
            continue;
        }
        let next = out.join(&c);
        match fs::symlink_metadata(&next) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = fs::read_link(&next)?;
                if target.is_absolute() {
                    out = root.to_path_buf();
                }
                push_rev(&mut pending, &target);
            }
            _ => out = next,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_in_root_never_leaves_root() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir_all(r.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("/etc", r.join("evil")).unwrap();
        std::os::unix::fs::symlink("../../../../..", r.join("up")).unwrap();
        std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
        assert_eq!(resolve_in_root(r, "/evil/passwd").unwrap(), r.join("etc/passwd"));
        assert_eq!(resolve_in_root(r, "/up/etc").unwrap(), r.join("etc"));
        assert_eq!(resolve_in_root(r, "../../x").unwrap(), r.join("x"));
        assert_eq!(resolve_in_root(r, "/lib/x").unwrap(), r.join("usr/lib/x"));
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        assert!(resolve_in_root(r, "/loop").is_err());
    }
}
