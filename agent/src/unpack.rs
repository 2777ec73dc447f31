//! Unpacking one layer tarball into a directory, refusing anything that
//! could write outside it: absolute or `..` paths, writes through symlinks,
//! hard links that leave the tree. OCI whiteouts become overlayfs whiteouts
//! (a 0:0 character device) and opaque markers become the
//! `trusted.overlay.opaque` xattr, so the directory can be an overlay lower
//! dir as is.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{Gid, Uid};
use sha2::{Digest, Sha256};

use crate::sys;

/// Why a layer was refused.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("entry {entry:?} has an absolute path")]
    AbsolutePath { entry: PathBuf },
    #[error("entry {entry:?} climbs out of the tree with '..'")]
    ParentPath { entry: PathBuf },
    #[error("entry {entry:?} would write through the symlink {link:?}")]
    ThroughSymlink { entry: PathBuf, link: PathBuf },
    #[error("hard link {entry:?} points out of the layer: {target:?}")]
    HardLinkOut { entry: PathBuf, target: PathBuf },
    #[error("hard link {entry:?} names {target:?}, which the layer doesn't hold")]
    HardLinkMissing { entry: PathBuf, target: PathBuf },
    #[error("whiteout {entry:?} names no single entry of its directory")]
    BadWhiteout { entry: PathBuf },
    #[error("reading the archive (truncated or corrupt?): {0}")]
    Read(io::Error),
    #[error("writing {path:?}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

fn werr(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Write { path: path.to_path_buf(), source }
}

fn nerr(path: &Path) -> impl FnOnce(nix::Error) -> UnpackError + '_ {
    move |e| UnpackError::Write { path: path.to_path_buf(), source: io::Error::from(e) }
}

/// A reader that hashes what passes through it.
pub struct HashReader<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> HashReader<R> {
    pub fn new(inner: R) -> Self {
        HashReader { inner, hasher: Sha256::new(), len: 0 }
    }

    /// Reads the rest of the stream, then returns `sha256:<hex>` of all of it.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((format!("sha256:{}", hex::encode(self.hasher.finalize())), self.len))
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// Options of one unpack.
#[derive(Clone, Copy)]
pub struct UnpackOptions {
    /// Turn `.wh.` entries into overlay whiteouts (layers) or refuse to
    /// interpret them (outer image archives, which have none).
    pub whiteouts: bool,
    /// Keep owners and device nodes (layers) or skip them (outer archives).
    pub preserve_owners: bool,
}

/// Unpacks the tar stream `reader` into `dest` (which must exist). On error
/// `dest` may hold part of the layer: the caller removes it.
pub fn unpack<R: Read>(reader: R, dest: &Path, opts: UnpackOptions) -> Result<(), UnpackError> {
    let mut ar = tar::Archive::new(reader);
    for entry in ar.entries().map_err(UnpackError::Read)? {
        let mut e = entry.map_err(UnpackError::Read)?;
        let raw = e.path().map_err(UnpackError::Read)?.into_owned();
        let rel = clean(&raw)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let Some(name) = rel.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        let parent_rel = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        if opts.whiteouts && name.starts_with(".wh.") {
            // The whited-out name is one entry of this directory: never
            // `.`, `..` or empty (`.wh...` would remove the parent).
            let gone = &name[4..];
            if name != ".wh..wh..opq" && (gone.is_empty() || gone == "." || gone == ".." || gone.contains('/')) {
                return Err(UnpackError::BadWhiteout { entry: rel.clone() });
            }
            let parent = ensure_parents(dest, &rel, &raw)?;
            if name == ".wh..wh..opq" {
                sys::set_xattr(&parent, "trusted.overlay.opaque", b"y").map_err(werr(&parent))?;
            } else {
                let target = parent.join(gone);
                remove_existing(&target)?;
                mknod(&target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).map_err(nerr(&target))?;
            }
            let _ = parent_rel;
            continue;
        }
        ensure_parents(dest, &rel, &raw)?;
        let full = dest.join(&rel);
        let header = e.header();
        let mode = header.mode().map_err(UnpackError::Read)? & 0o7777;
        let uid = header.uid().map_err(UnpackError::Read)? as u32;
        let gid = header.gid().map_err(UnpackError::Read)? as u32;
        let kind = header.entry_type();
        match kind {
            tar::EntryType::Directory => match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    remove_existing(&full)?;
                    fs::DirBuilder::new().mode(0o755).create(&full).map_err(werr(&full))?;
                }
                Err(_) => fs::DirBuilder::new().mode(0o755).create(&full).map_err(werr(&full))?,
            },
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                remove_existing(&full)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&full)
                    .map_err(werr(&full))?;
                io::copy(&mut e, &mut f).map_err(UnpackError::Read)?;
            }
            tar::EntryType::Symlink => {
                let target = e.link_name().map_err(UnpackError::Read)?.unwrap_or_default().into_owned();
                remove_existing(&full)?;
                // The target is not checked: the container resolves it in its
                // own root. What matters is that we never write through it,
                // which ensure_parents enforces for every later entry.
                std::os::unix::fs::symlink(&target, &full).map_err(werr(&full))?;
            }
            tar::EntryType::Link => {
                let target_raw = e.link_name().map_err(UnpackError::Read)?.unwrap_or_default().into_owned();
                let target_rel = match clean(&target_raw) {
                    Ok(t) if !t.as_os_str().is_empty() => t,
                    _ => return Err(UnpackError::HardLinkOut { entry: raw, target: target_raw }),
                };
                ensure_parents(dest, &target_rel, &target_raw)
                    .map_err(|_| UnpackError::HardLinkOut { entry: raw.clone(), target: target_raw.clone() })?;
                let src = dest.join(&target_rel);
                match fs::symlink_metadata(&src) {
                    Ok(m) if !m.is_dir() => {}
                    _ => return Err(UnpackError::HardLinkMissing { entry: raw, target: target_raw }),
                }
                remove_existing(&full)?;
                fs::hard_link(&src, &full).map_err(werr(&full))?;
                continue;
            }
            tar::EntryType::Char | tar::EntryType::Block if opts.preserve_owners => {
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let flag = if kind == tar::EntryType::Char { SFlag::S_IFCHR } else { SFlag::S_IFBLK };
                remove_existing(&full)?;
                mknod(&full, flag, Mode::from_bits_truncate(mode), makedev(major.into(), minor.into()))
                    .map_err(nerr(&full))?;
            }
            tar::EntryType::Fifo if opts.preserve_owners => {
                remove_existing(&full)?;
                nix::unistd::mkfifo(&full, Mode::from_bits_truncate(mode)).map_err(nerr(&full))?;
            }
            other => {
                tracing::debug!(entry = ?raw, kind = ?other, "skipping tar entry");
                continue;
            }
        }
        if opts.preserve_owners {
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                &full,
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(nerr(&full))?;
        }
        if kind != tar::EntryType::Symlink {
            // After chown, which clears setuid bits.
            fs::set_permissions(&full, fs::Permissions::from_mode(mode)).map_err(werr(&full))?;
        }
    }
    Ok(())
}

/// Normalises an entry path: strips `./`, refuses absolute paths and `..`.
fn clean(raw: &Path) -> Result<PathBuf, UnpackError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(UnpackError::AbsolutePath { entry: raw.to_path_buf() });
            }
            Component::ParentDir => return Err(UnpackError::ParentPath { entry: raw.to_path_buf() }),
        }
    }
    Ok(out)
}

/// Makes sure every ancestor of `rel` under `dest` is a real directory
/// (creating missing ones), never a symlink. Returns the parent directory.
fn ensure_parents(dest: &Path, rel: &Path, raw: &Path) -> Result<PathBuf, UnpackError> {
    let mut cur = dest.to_path_buf();
    let mut cur_rel = PathBuf::new();
    let Some(parent) = rel.parent() else { return Ok(cur) };
    for c in parent.components() {
        cur.push(c);
        cur_rel.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(UnpackError::ThroughSymlink { entry: raw.to_path_buf(), link: cur_rel });
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                fs::remove_file(&cur).map_err(werr(&cur))?;
                fs::DirBuilder::new().mode(0o755).create(&cur).map_err(werr(&cur))?;
            }
            Err(_) => fs::DirBuilder::new().mode(0o755).create(&cur).map_err(werr(&cur))?,
        }
    }
    Ok(cur)
}

/// Removes whatever is at `path` (a later entry replaces an earlier one).
fn remove_existing(path: &Path) -> Result<(), UnpackError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(werr(path)),
        Ok(_) => fs::remove_file(path).map_err(werr(path)),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        // set_path refuses '..' and absolute paths: write the raw name.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o777);
        h.set_entry_type(kind);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }

    const OPTS: UnpackOptions = UnpackOptions { whiteouts: true, preserve_owners: true };

    #[test]
    fn refuses_escapes() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (layer(|b| file(b, "../escape", b"x")), "'..'"),
            (layer(|b| file(b, &victim.display().to_string(), b"x")), "absolute"),
            (
                layer(|b| {
                    link(b, tar::EntryType::Symlink, "ln", &outside.path().display().to_string());
                    file(b, "ln/victim", b"x");
                }),
                "symlink",
            ),
            (layer(|b| link(b, tar::EntryType::Link, "hl", "/etc/passwd")), "out of the layer"),
            (layer(|b| link(b, tar::EntryType::Link, "hl", "../../etc/passwd")), "out of the layer"),
        ];
        for (bytes, want) in cases {
            let d = tempfile::tempdir().unwrap();
            let err = unpack(&bytes[..], d.path(), OPTS).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
            assert!(!victim.exists());
            assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        }
    }

    #[test]
    fn unpacks_files_links_and_whiteouts() {
        let bytes = layer(|b| {
            file(b, "./etc/hosts", b"127.0.0.1 localhost\n");
            link(b, tar::EntryType::Symlink, "bin/sh", "/bin/busybox");
            link(b, tar::EntryType::Link, "etc/hosts2", "etc/hosts");
            file(b, "gone/.wh.file", b"");
            file(b, "opaque/.wh..wh..opq", b"");
        });
        let d = tempfile::tempdir().unwrap();
        unpack(&bytes[..], d.path(), OPTS).unwrap();
        assert_eq!(fs::read_to_string(d.path().join("etc/hosts2")).unwrap(), "127.0.0.1 localhost\n");
        assert_eq!(fs::read_link(d.path().join("bin/sh")).unwrap(), Path::new("/bin/busybox"));
        use std::os::unix::fs::FileTypeExt;
        assert!(fs::symlink_metadata(d.path().join("gone/file")).unwrap().file_type().is_char_device());
        assert!(!d.path().join("gone/.wh.file").exists());
        assert!(d.path().join("opaque").is_dir());
    }

    #[test]
    fn a_whiteout_naming_its_parent_is_refused_and_deletes_nothing() {
        for name in ["dir/.wh...", "dir/.wh..", "dir/.wh.", ".wh..."] {
            let bytes = layer(|b| {
                file(b, "dir/keep", b"still here");
                file(b, name, b"");
            });
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join("sibling"), b"x").unwrap();
            let err = unpack(&bytes[..], d.path(), OPTS).unwrap_err().to_string();
            assert!(err.contains("whiteout"), "{name}: {err}");
            assert_eq!(fs::read_to_string(d.path().join("dir/keep")).unwrap(), "still here", "{name}");
            assert!(d.path().join("sibling").exists(), "{name}");
        }
    }

    #[test]
    fn truncated_tar_is_an_error() {
        let bytes = layer(|b| file(b, "big", &[7u8; 4096]));
        let d = tempfile::tempdir().unwrap();
        let err = unpack(&bytes[..1024], d.path(), OPTS).unwrap_err();
        assert!(matches!(err, UnpackError::Read(_)), "{err}");
    }
}
