//! User namespaces for containers (`--userns-remap`): container root is an
//! unprivileged uid on the host, from a range of `SIZE` ids at `START`.
//!
//! The container's other namespaces and its rootfs are set up by real root
//! as usual; image layers and bind mounts are mounted *idmapped* into the
//! container (`sys::idmapped_bind`), so one unpacked layer serves every
//! range, and volumes keep their owners as the container sees them. The
//! container's processes join the user namespace last, just before init
//! forks the workload. Its other namespaces stay owned by the host's user
//! namespace: container root has no capability over them (it can't
//! reconfigure its network or remount anything), and binding a low port or
//! ping is allowed through the per-namespace sysctls that exist for that.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

use crate::sys::{self, Forked};

/// The host ids container ids 0..size map to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdMap {
    pub uid: u32,
    pub gid: u32,
    pub size: u32,
}

/// The smallest range: every id a distribution image uses (nobody is 65534).
pub const MIN_SIZE: u32 = 65536;

impl IdMap {
    /// The host uid a container uid maps to, if it is in the range.
    pub fn host_uid(&self, uid: u32) -> Option<u32> {
        (uid < self.size).then(|| self.uid + uid)
    }
}

/// `--userns-remap`: `START:SIZE` (the same range for uids and gids), or
/// `default`: the `shoal` entries of /etc/subuid and /etc/subgid, added
/// (the first free 65536 ids from 1,000,000) when there are none, as
/// Docker adds `dockremap`'s.
pub fn parse_remap(s: &str) -> Result<IdMap, String> {
    if s == "default" {
        return default_range(Path::new("/etc/subuid"), Path::new("/etc/subgid"));
    }
    let bad = || format!("invalid --userns-remap {s:?}: expected default or START:SIZE (host ids, SIZE at least {MIN_SIZE})");
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let start: u32 = a.parse().map_err(|_| bad())?;
    let size: u32 = b.parse().map_err(|_| bad())?;
    check(start, start, size).map_err(|why| format!("invalid --userns-remap {s:?}: {why}"))
}

fn check(uid: u32, gid: u32, size: u32) -> Result<IdMap, String> {
    if uid == 0 || gid == 0 {
        return Err("the range must not start at 0: container root would be host root".into());
    }
    if size < MIN_SIZE {
        return Err(format!("a range of {size} ids is too small (at least {MIN_SIZE}: images use ids up to 65534)"));
    }
    if uid.checked_add(size).is_none() || gid.checked_add(size).is_none() {
        return Err("the range runs past the largest id".into());
    }
    Ok(IdMap { uid, gid, size })
}

/// The `shoal` entry of a subordinate id file, or, when there is none, the
/// first free range at or above 1,000,000, appended to the file.
fn sub_range(path: &Path) -> Result<(u32, u32), String> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let mut taken = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if let [name, start, count] = f[..]
            && let (Ok(start), Ok(count)) = (start.parse::<u64>(), count.parse::<u64>())
        {
            if name == "shoal" {
                return Ok((start as u32, count as u32));
            }
            taken.push((start, start + count));
        }
    }
    let mut start: u64 = 1_000_000;
    while let Some(&(_, end)) = taken.iter().find(|(s, e)| start < *e && *s < start + u64::from(MIN_SIZE)) {
        start = end;
    }
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("adding shoal's range to {}: {e}", path.display()))?;
    let sep = if text.is_empty() || text.ends_with('\n') { "" } else { "\n" };
    write!(f, "{sep}shoal:{start}:{MIN_SIZE}\n").map_err(|e| format!("adding shoal's range to {}: {e}", path.display()))?;
    Ok((start as u32, MIN_SIZE))
}

fn default_range(subuid: &Path, subgid: &Path) -> Result<IdMap, String> {
    let (uid, usize_) = sub_range(subuid)?;
    let (gid, gsize) = sub_range(subgid)?;
    check(uid, gid, usize_.min(gsize)).map_err(|why| format!("the shoal entries of /etc/subuid and /etc/subgid: {why}"))
}

/// Makes a user namespace mapping container ids `0..size` to `map`'s host
/// ranges and returns a descriptor of it. A helper process unshares it;
/// we write its maps (as real root, so setgroups stays allowed inside),
/// take the descriptor and let the helper go.
pub fn create(map: IdMap) -> io::Result<OwnedFd> {
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (hold_r, hold_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    match sys::fork()? {
        Forked::Child => {
            drop(ready_r);
            drop(hold_w);
            if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).is_err() {
                sys::exit_now(1);
            }
            let mut w = fs::File::from(ready_w);
            if w.write_all(b"1").is_err() {
                sys::exit_now(1);
            }
            drop(w);
            // Hold the namespace until the parent has its descriptor.
            let mut b = [0u8; 1];
            let _ = fs::File::from(hold_r).read(&mut b);
            sys::exit_now(0)
        }
        Forked::Parent(pid) => {
            drop(ready_w);
            drop(hold_r);
            let reap = || {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            };
            let mut b = [0u8; 1];
            let ready = fs::File::from(ready_r).read(&mut b);
            let result = match ready {
                Ok(1) => (|| {
                    let proc = Path::new("/proc").join(pid.to_string());
                    fs::write(proc.join("uid_map"), format!("0 {} {}\n", map.uid, map.size))?;
                    fs::write(proc.join("gid_map"), format!("0 {} {}\n", map.gid, map.size))?;
                    Ok(OwnedFd::from(fs::File::open(proc.join("ns/user"))?))
                })(),
                Ok(_) => Err(io::Error::other("the kernel refused a new user namespace (user.max_user_namespaces?)")),
                Err(e) => Err(e),
            };
            drop(hold_w);
            reap();
            result
        }
    }
}

/// Joins the user namespace `ns` and becomes its root: the caller keeps
/// every capability there, none over the host.
pub fn enter(ns: &OwnedFd) -> nix::Result<()> {
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWUSER)?;
    let root_g = nix::unistd::Gid::from_raw(0);
    let root_u = nix::unistd::Uid::from_raw(0);
    nix::unistd::setresgid(root_g, root_g, root_g)?;
    nix::unistd::setresuid(root_u, root_u, root_u)?;
    nix::unistd::setgroups(&[])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ranges_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_remap("1000000:65536").unwrap(), IdMap { uid: 1_000_000, gid: 1_000_000, size: 65536 });
        for (bad, why) in [("0:65536", "host root"), ("100000:10", "too small"), ("x", "START:SIZE"), ("4294967000:65536", "largest id")] {
            let e = parse_remap(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn default_takes_or_adds_the_shoal_entry() {
        let t = tempfile::tempdir().unwrap();
        let (u, g) = (t.path().join("subuid"), t.path().join("subgid"));
        fs::write(&u, "alice:1000000:65536\nbob:1065536:65536").unwrap();
        let m = default_range(&u, &g).unwrap();
        assert_eq!((m.uid, m.gid, m.size), (1_131_072, 1_000_000, 65536));
        assert!(fs::read_to_string(&u).unwrap().ends_with("\nshoal:1131072:65536\n"));
        // Found, not added, the second time.
        assert_eq!(default_range(&u, &g).unwrap(), m);
        assert_eq!(fs::read_to_string(&u).unwrap().matches("shoal:").count(), 1);
    }
}
