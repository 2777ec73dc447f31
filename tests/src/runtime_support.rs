//! Helpers for the container runtime tests (`tests/tests/runtime.rs`): a
//! throwaway data dir that cleans up after itself, a busybox rootfs built
//! from Debian's busybox-static, and builders for layer tarballs, OCI
//! image-layout archives and `docker save` archives.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::{shoal_bin, unique_id};

/// Where Debian's busybox-static puts the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// A data dir for one test. Dropping it kills whatever its containers left
/// running, removes their cgroups and deletes the directory, also when the
/// test panics.
pub struct RtHost {
    pub data_dir: PathBuf,
    pub prefix: String,
}

impl RtHost {
    pub fn new() -> anyhow::Result<Self> {
        let prefix = format!("rt{}", unique_id());
        let data_dir = std::env::temp_dir().join(format!("shoal-{prefix}"));
        fs::create_dir_all(&data_dir)?;
        Ok(RtHost { data_dir, prefix })
    }

    /// A container name unique to this test.
    pub fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    /// `shoal ARGS` with this data dir in the environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(shoal_bin());
        c.args(args).env("SHOAL_DATA_DIR", &self.data_dir).stdin(Stdio::null());
        c
    }

    /// Runs `shoal ARGS` to completion.
    pub fn shoal(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.cmd(args).output().context("running shoal")
    }

    /// `shoal run ARGS`.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        self.shoal(&all)
    }

    /// Imports the busybox rootfs as `name`.
    pub fn import_busybox(&self, name: &str) -> anyhow::Result<PathBuf> {
        let tar = self.data_dir.join(format!("{}.tar", name.replace([':', '/'], "_")));
        fs::write(&tar, busybox_layer(&[])?)?;
        let out = self.shoal(&["image", "import", tar.to_str().unwrap_or_default(), name])?;
        if !out.status.success() {
            bail!("import failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(tar)
    }

    /// Unpacked layer directories in the store.
    pub fn layer_count(&self) -> usize {
        fs::read_dir(self.data_dir.join("images/layers")).map(|d| d.count()).unwrap_or(0)
    }

    /// Entries left in the store's work space.
    pub fn store_tmp_count(&self) -> usize {
        fs::read_dir(self.data_dir.join("images/tmp")).map(|d| d.count()).unwrap_or(0)
    }

    /// What a container may have left on the host: its directory, cgroups,
    /// processes, mounts. Empty when it left nothing.
    pub fn leftovers(&self, id: &str) -> Vec<String> {
        let mut left = Vec::new();
        let dir = self.data_dir.join("containers").join(id);
        if dir.exists() {
            left.push(format!("directory {}", dir.display()));
        }
        for c in ["memory", "cpu", "pids", "devices", "unified"] {
            let p = Path::new("/sys/fs/cgroup").join(c).join("shoal").join(id);
            if p.exists() {
                left.push(format!("cgroup {}", p.display()));
            }
        }
        let p = Path::new("/sys/fs/cgroup/shoal").join(id);
        if p.exists() {
            left.push(format!("cgroup {}", p.display()));
        }
        let needle = format!("shoal/{id}");
        for pid in procs() {
            let cg = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            if cg.lines().any(|l| l.ends_with(&needle)) {
                left.push(format!("process {pid} in {needle}"));
            }
        }
        let mi = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for l in mi.lines() {
            if l.contains(&*dir.to_string_lossy()) {
                left.push(format!("mount {l}"));
            }
        }
        left
    }

    fn cleanup(&self) {
        let data = self.data_dir.to_string_lossy().into_owned();
        // Every process started for this data dir: supervisors name it in
        // their arguments, and so does every container init cloned from
        // `shoal run`.
        for pid in procs() {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let env = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let mine = String::from_utf8_lossy(&cmdline).contains(&data)
                || String::from_utf8_lossy(&env).contains(&format!("SHOAL_DATA_DIR={data}"));
            if mine && pid != std::process::id() {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
        }
        if let Ok(rd) = fs::read_dir(self.data_dir.join("containers")) {
            for e in rd.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                for c in ["memory", "cpu", "pids", "devices", "unified", "."] {
                    let p = Path::new("/sys/fs/cgroup").join(c).join("shoal").join(&id);
                    // The last processes may still be exiting: retry briefly.
                    for _ in 0..200 {
                        if fs::remove_dir(&p).is_ok() || !p.exists() {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            }
        }
        let _ = fs::remove_dir_all(&self.data_dir);
    }
}

/// A container's cgroup file, wherever this host keeps it: the unified
/// tree on a pure cgroup v2 host (`v2_file`), else the v1 `controller`'s
/// tree (`v1_file`). Read at run time so the tests run on both.
pub fn cgroup_file(controller: &str, id: &str, v1_file: &str, v2_file: &str) -> PathBuf {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        root.join("shoal").join(id).join(v2_file)
    } else {
        root.join(controller).join("shoal").join(id).join(v1_file)
    }
}

impl Drop for RtHost {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn procs() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// stdout of an Output as a String.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr of an Output as a String.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A tar stream written entry by entry; names are written raw so tests can
/// build the bad archives that `tar::Builder` itself refuses to make.
pub struct TarBuilder {
    b: tar::Builder<Vec<u8>>,
}

impl Default for TarBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TarBuilder {
    pub fn new() -> Self {
        TarBuilder { b: tar::Builder::new(Vec::new()) }
    }

    fn header(kind: tar::EntryType, path: &str, mode: u32, size: u64) -> anyhow::Result<tar::Header> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        let name = &mut h.as_old_mut().name;
        if path.len() > name.len() {
            bail!("test path {path} too long");
        }
        name[..path.len()].copy_from_slice(path.as_bytes());
        Ok(h)
    }

    pub fn file(mut self, path: &str, data: &[u8], mode: u32) -> anyhow::Result<Self> {
        let mut h = Self::header(tar::EntryType::Regular, path, mode, data.len() as u64)?;
        h.set_cksum();
        self.b.append(&h, data)?;
        Ok(self)
    }

    pub fn dir(mut self, path: &str) -> anyhow::Result<Self> {
        let mut h = Self::header(tar::EntryType::Directory, path, 0o755, 0)?;
        h.set_cksum();
        self.b.append(&h, &[][..])?;
        Ok(self)
    }

    fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> anyhow::Result<Self> {
        let mut h = Self::header(kind, path, 0o777, 0)?;
        let ln = &mut h.as_old_mut().linkname;
        ln[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        self.b.append(&h, &[][..])?;
        Ok(self)
    }

    /// A device node (`kind` is `tar::EntryType::Char` or `Block`).
    pub fn device(mut self, path: &str, kind: tar::EntryType, major: u32, minor: u32) -> anyhow::Result<Self> {
        let mut h = Self::header(kind, path, 0o666, 0)?;
        h.set_device_major(major)?;
        h.set_device_minor(minor)?;
        h.set_cksum();
        self.b.append(&h, &[][..])?;
        Ok(self)
    }

    pub fn symlink(self, path: &str, target: &str) -> anyhow::Result<Self> {
        self.link(tar::EntryType::Symlink, path, target)
    }

    pub fn hardlink(self, path: &str, target: &str) -> anyhow::Result<Self> {
        self.link(tar::EntryType::Link, path, target)
    }

    /// Appends a whole directory tree (symlinks kept as symlinks).
    pub fn tree(mut self, dir: &Path) -> anyhow::Result<Self> {
        self.b.follow_symlinks(false);
        self.b.append_dir_all(".", dir)?;
        Ok(self)
    }

    pub fn finish(self) -> anyhow::Result<Vec<u8>> {
        Ok(self.b.into_inner()?)
    }
}

/// A busybox rootfs (binary, applet links, /etc/passwd with root, nobody
/// and `app` (1000) who is also in group `extra` (2000)) plus `extra`
/// files, as a plain tar.
pub fn busybox_layer(extra: &[(&str, &[u8])]) -> anyhow::Result<Vec<u8>> {
    let t = tempfile::tempdir()?;
    let r = t.path();
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root", "home/app"] {
        fs::create_dir_all(r.join(d))?;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(r.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    }
    fs::copy(BUSYBOX, r.join("bin/busybox"))?;
    let list = Command::new(BUSYBOX).arg("--list").output()?;
    for a in String::from_utf8_lossy(&list.stdout).lines() {
        if a != "busybox" && !a.is_empty() {
            std::os::unix::fs::symlink("busybox", r.join("bin").join(a))?;
        }
    }
    fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\napp:x:1000:1000::/home/app:/bin/sh\n",
    )?;
    fs::write(r.join("etc/group"), "root:x:0:\nnogroup:x:65534:\napp:x:1000:\nextra:x:2000:app\n")?;
    for (p, data) in extra {
        let full = r.join(p);
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(full, data)?;
    }
    TarBuilder::new().tree(r)?.finish()
}

pub fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data)?;
    Ok(e.finish()?)
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// One layer of a test image: its tar, and whether to gzip it.
pub struct Layer {
    pub tar: Vec<u8>,
    pub gzip: bool,
}

/// An image config with `config` as its `config` section.
pub fn image_config(layers: &[Layer], config: serde_json::Value) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256(&l.tar)).collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap_or_default()
}

/// Ways to break an archive.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Corrupt {
    None,
    /// A layer blob's content doesn't match its name.
    LayerDigest,
    /// The manifest names a layer blob that isn't in the archive.
    MissingLayer,
}

/// An OCI image-layout archive holding one image named `name`.
pub fn oci_archive(
    name: &str,
    layers: &[Layer],
    config: serde_json::Value,
    corrupt: Corrupt,
) -> anyhow::Result<Vec<u8>> {
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let cfg = image_config(layers, config);
    let cfg_digest = sha256(&cfg);
    let mut descs = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let blob = if l.gzip { gzip(&l.tar)? } else { l.tar.clone() };
        let d = sha256(&blob);
        let media = if l.gzip {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        descs.push(serde_json::json!({"mediaType": media, "digest": d, "size": blob.len()}));
        let last = i + 1 == layers.len();
        match corrupt {
            Corrupt::LayerDigest if last => {
                let mut bad = blob.clone();
                let n = bad.len();
                bad[n / 2] ^= 0xff;
                blobs.insert(d, bad);
            }
            Corrupt::MissingLayer if last => {}
            _ => {
                blobs.insert(d, blob);
            }
        }
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg.len()},
        "layers": descs,
    }))?;
    let md = sha256(&manifest);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": name},
        }],
    }))?;
    blobs.insert(cfg_digest, cfg);
    blobs.insert(md, manifest);
    let mut t = TarBuilder::new()
        .file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644)?
        .file("index.json", &index, 0o644)?
        .dir("blobs/")?
        .dir("blobs/sha256/")?;
    for (d, b) in &blobs {
        t = t.file(&format!("blobs/sha256/{}", d.trim_start_matches("sha256:")), b, 0o644)?;
    }
    t.finish()
}

/// A legacy `docker save` archive (manifest.json, <id>/layer.tar, <hex>.json).
pub fn docker_archive(name: &str, layers: &[Layer], config: serde_json::Value) -> anyhow::Result<Vec<u8>> {
    let cfg = image_config(layers, config);
    let cfg_name = format!("{}.json", sha256(&cfg).trim_start_matches("sha256:"));
    let mut t = TarBuilder::new();
    let mut paths = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let dir = format!("layer{i}");
        let blob = if l.gzip { gzip(&l.tar)? } else { l.tar.clone() };
        t = t.dir(&format!("{dir}/"))?.file(&format!("{dir}/layer.tar"), &blob, 0o644)?;
        paths.push(format!("{dir}/layer.tar"));
    }
    let manifest = serde_json::to_vec(&serde_json::json!([{"Config": cfg_name, "RepoTags": [name], "Layers": paths}]))?;
    t.file(&cfg_name, &cfg, 0o644)?.file("manifest.json", &manifest, 0o644)?.finish()
}

/// A static x86_64 ELF executable (no libc, no sections) that makes one
/// system call, `nr(a0, a1, a2)`, and exits with its errno, or 0 when it
/// succeeded: a checker the tests run inside containers to see what the
/// seccomp profile lets through, by the raw call rather than a tool's
/// wrapper.
pub fn syscall_probe(nr: i32, a0: i32, a1: i32, a2: i32) -> Vec<u8> {
    let mut code = Vec::new();
    for (op, v) in [([0x48, 0xc7, 0xc0], nr), ([0x48, 0xc7, 0xc7], a0), ([0x48, 0xc7, 0xc6], a1), ([0x48, 0xc7, 0xc2], a2)] {
        code.extend_from_slice(&op); // mov r64, imm32
        code.extend_from_slice(&v.to_le_bytes());
    }
    code.extend_from_slice(&[
        0x0f, 0x05, // syscall
        0x48, 0x85, 0xc0, // test rax, rax
        0x79, 0x08, // jns ok
        0x48, 0xf7, 0xd8, // neg rax
        0x48, 0x89, 0xc7, // mov rdi, rax
        0xeb, 0x02, // jmp out
        0x31, 0xff, // ok: xor edi, edi
        0xb8, 0xe7, 0x00, 0x00, 0x00, // out: mov eax, exit_group
        0x0f, 0x05, // syscall
    ]);
    let base: u64 = 0x40_0000;
    let off: u64 = 64 + 56;
    let total = off + code.len() as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(base + off).to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes());
    for h in [64u16, 56, 1, 0, 0, 0] {
        elf.extend_from_slice(&h.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [0, base, base, total, total, 0x1000] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&code);
    elf
}

/// A static i386 ELF executable that writes "i386 ok\n" with `int 0x80`
/// and exits 0: how a 32-bit program reaches the kernel on x86_64.
pub fn i386_hello() -> Vec<u8> {
    let base: u32 = 0x0804_8000;
    let off: u32 = 52 + 32;
    let msg = b"i386 ok\n";
    let code_len: u32 = 31;
    let mut code = Vec::new();
    code.extend_from_slice(&[0xb8, 4, 0, 0, 0]); // mov eax, write
    code.extend_from_slice(&[0xbb, 1, 0, 0, 0]); // mov ebx, 1
    code.push(0xb9); // mov ecx, msg
    code.extend_from_slice(&(base + off + code_len).to_le_bytes());
    code.extend_from_slice(&[0xba, msg.len() as u8, 0, 0, 0]); // mov edx, len
    code.extend_from_slice(&[0xcd, 0x80]); // int 0x80
    code.extend_from_slice(&[0xb8, 1, 0, 0, 0]); // mov eax, exit
    code.extend_from_slice(&[0x31, 0xdb, 0xcd, 0x80]); // xor ebx, ebx; int 0x80
    debug_assert_eq!(code.len() as u32, code_len);
    code.extend_from_slice(msg);
    let total = off + code.len() as u32;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes());
    elf.extend_from_slice(&3u16.to_le_bytes()); // i386
    for v in [1u32, base + off, 52, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    for h in [52u16, 32, 1, 0, 0, 0] {
        elf.extend_from_slice(&h.to_le_bytes());
    }
    for v in [1u32, 0, base, base, total, total, 5, 0x1000] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&code);
    elf
}
