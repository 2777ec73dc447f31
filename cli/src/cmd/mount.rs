//! `--mount` and `-v`, as `docker service create` and `docker run` take
//! them; services and `shoal run` share these parsers.

use anyhow::{anyhow, bail};
use shoal_agent::spec::parse_bytes;
use shoal_proto::control::Mount;

/// `type=volume|bind|tmpfs,src=..,dst=..[,readonly][,volume-nocopy]
/// [,volume-label=K=V][,tmpfs-size=64M][,tmpfs-mode=1777]`. Options Docker
/// has that shoal can't honour are refused by name, never ignored.
pub fn parse_mount(s: &str) -> anyhow::Result<Mount> {
    let bad = |why: String| anyhow!("invalid --mount {s:?}: {why}");
    let mut m = Mount::default();
    let flag = |v: Option<&str>, key: &str| -> anyhow::Result<bool> {
        match v {
            None | Some("true" | "1") => Ok(true),
            Some("false" | "0") => Ok(false),
            Some(v) => Err(anyhow!("invalid --mount {s:?}: {key}={v} (expected true or false)")),
        }
    };
    for part in s.split(',') {
        let (key, value) = match part.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (part, None),
        };
        let need = |what: &str| value.filter(|v| !v.is_empty()).ok_or_else(|| bad(format!("{what} needs a value")));
        match key {
            "type" => m.r#type = need("type")?.to_string(),
            "src" | "source" => m.source = need("source")?.to_string(),
            "dst" | "destination" | "target" => m.target = need("target")?.to_string(),
            "readonly" | "ro" => m.read_only = flag(value, key)?,
            "volume-nocopy" => m.volume_nocopy = flag(value, key)?,
            "volume-label" => {
                let (k, v) = need("volume-label")?.split_once('=').ok_or_else(|| bad("volume-label wants KEY=VALUE".into()))?;
                m.volume_labels.insert(k.to_string(), v.to_string());
            }
            "volume-driver" if value == Some("local") => {}
            "tmpfs-size" => m.tmpfs_size = parse_bytes(need("tmpfs-size")?).map_err(|e| bad(format!("tmpfs-size: {e}")))?,
            "tmpfs-mode" => {
                let v = need("tmpfs-mode")?;
                m.tmpfs_mode = u32::from_str_radix(v, 8).ok().filter(|m| *m <= 0o7777).ok_or_else(|| bad(format!("tmpfs-mode {v:?} is not octal permission bits")))?;
            }
            "volume-driver" | "volume-opt" | "bind-propagation" | "bind-nonrecursive" | "bind-recursive" | "consistency" => {
                bail!(
                    "invalid --mount {s:?}: {key} is not supported (volumes use the local driver; create one with options by `shoal volume create --opt`; binds are private and recursive)"
                )
            }
            _ => bail!("invalid --mount {s:?}: unknown option {part:?} (expected type, src, dst, readonly, volume-nocopy, volume-label, tmpfs-size, tmpfs-mode)"),
        }
    }
    if m.r#type.is_empty() {
        m.r#type = "volume".into();
    }
    if !["volume", "bind", "tmpfs"].contains(&m.r#type.as_str()) {
        bail!("invalid --mount {s:?}: type {:?} (expected volume, bind or tmpfs)", m.r#type);
    }
    if m.target.is_empty() {
        bail!("invalid --mount {s:?}: dst= is required");
    }
    Ok(m)
}

/// `-v SRC:DST[:ro|rw]` (`docker run -v`): an absolute SRC is a bind
/// mount, anything else a named volume.
pub fn parse_volume(v: &str) -> anyhow::Result<Mount> {
    let parts: Vec<&str> = v.split(':').collect();
    let (src, dst, mode) = match parts.as_slice() {
        [s, d] => (*s, *d, ""),
        [s, d, m] => (*s, *d, *m),
        _ => bail!("-v {v}: want SRC:DST[:ro]"),
    };
    let read_only = match mode {
        "" | "rw" => false,
        "ro" => true,
        m => bail!("-v {v}: unknown mode {m:?} (want ro or rw)"),
    };
    if src.is_empty() {
        bail!("-v {v}: anonymous volumes are not supported; name the volume (NAME:{dst})");
    }
    let r#type = if src.starts_with('/') {
        "bind"
    } else if src.starts_with('.') || src.contains('/') {
        bail!("-v {v}: a bind source must be an absolute path");
    } else {
        "volume"
    };
    Ok(Mount { r#type: r#type.into(), source: src.into(), target: dst.into(), read_only, ..Default::default() })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mounts_parse_as_docker_writes_them() {
        let m = parse_mount("type=volume,src=db,dst=/data,volume-nocopy,volume-label=tier=db").unwrap();
        assert_eq!((m.r#type.as_str(), m.source.as_str(), m.target.as_str()), ("volume", "db", "/data"));
        assert!(m.volume_nocopy && !m.read_only);
        assert_eq!(m.volume_labels.get("tier").map(String::as_str), Some("db"));
        let m = parse_mount("type=tmpfs,dst=/t,tmpfs-size=64M,tmpfs-mode=1770,readonly=true").unwrap();
        assert_eq!((m.tmpfs_size, m.tmpfs_mode, m.read_only), (64 << 20, 0o1770, true));
        let m = parse_mount("type=bind,source=/etc,target=/host-etc,ro").unwrap();
        assert!(m.read_only);
        for bad in ["type=nfs,dst=/x", "src=x", "type=bind,src=/x,dst=/y,bind-propagation=shared", "dst=/x,volume-opt=o=x", "dst=/x,tmpfs-mode=999", "dst=/x,bogus", "dst=/x,readonly=maybe"] {
            assert!(parse_mount(bad).is_err(), "{bad} should be refused");
        }
        assert_eq!(parse_volume("db:/data:ro").unwrap().r#type, "volume");
        assert_eq!(parse_volume("/srv:/data").unwrap().r#type, "bind");
        assert!(parse_volume("./x:/data").is_err());
        assert!(parse_volume(":/data").is_err());
        assert!(parse_volume("db:/data:rx").is_err());
    }
}
