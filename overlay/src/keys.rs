//! The node's WireGuard identity: an x25519 key made once and kept in the
//! data dir (mode 0600); its public half goes to the managers.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::OverlayError;

/// Loads the key at `path`, or makes one there (0600) if there is none.
pub fn load_or_create(path: &Path) -> Result<StaticSecret, OverlayError> {
    let io = |source| OverlayError::Io { what: format!("overlay key {}", path.display()), source };
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let raw = decode_key(text.trim()).map_err(|why| OverlayError::BadKey { path: path.display().to_string(), why })?;
            Ok(StaticSecret::from(raw))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = StaticSecret::random_from_rng(rand_core::OsRng);
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
            f.write_all(encode_key(&secret.to_bytes()).as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, path).map_err(io)?;
            tracing::info!(path = %path.display(), "overlay key created");
            Ok(secret)
        }
        Err(e) => Err(io(e)),
    }
}

pub fn public_key(secret: &StaticSecret) -> String {
    encode_key(PublicKey::from(secret).as_bytes())
}

pub fn encode_key(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// A 32-byte key from base64.
pub fn decode_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).map_err(|e| format!("not base64: {e}"))?;
    bytes.try_into().map_err(|b: Vec<u8>| format!("{} bytes, expected 32", b.len()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_persist_privately_and_round_trip() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("overlay.key");
        let a = load_or_create(&p).unwrap();
        let b = load_or_create(&p).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let pk = public_key(&a);
        assert_eq!(decode_key(&pk).unwrap(), *PublicKey::from(&a).as_bytes());
        assert!(decode_key("AAAA").is_err());
        std::fs::write(&p, "garbage").unwrap();
        assert!(matches!(load_or_create(&p), Err(OverlayError::BadKey { .. })));
    }
}
