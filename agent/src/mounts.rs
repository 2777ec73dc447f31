//! Host-side mounts the agent keeps: a tmpfs for the secrets and configs of
//! the tasks this node runs, so they never reach the node's disk.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use nix::mount::{MsFlags, mount};

/// Whether `dir` is a mount point, from /proc/self/mountinfo (field 5).
pub fn is_mount_point(dir: &Path) -> io::Result<bool> {
    let dir = dir.canonicalize()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info.lines().filter_map(|l| l.split(' ').nth(4)).any(|m| Path::new(&unescape(m)) == dir))
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> String {
    field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// Makes `dir` a private tmpfs (root only, no exec/suid/dev) of at most
/// `size_mb` MiB unless it already is a mount point. Returns whether it
/// mounted one.
pub fn ensure_tmpfs(dir: &Path, size_mb: u64) -> io::Result<bool> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    if is_mount_point(dir)? {
        return Ok(false);
    }
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let opts = format!("mode=0700,size={size_mb}m");
    mount(Some("tmpfs"), dir, Some("tmpfs"), flags, Some(opts.as_str())).map_err(io::Error::from)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mount_points_are_found() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        assert!(is_mount_point(Path::new("/proc")).unwrap());
        let t = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(t.path()).unwrap());
        assert_eq!(unescape("/a\\040b\\134c"), "/a b\\c");
    }
}
