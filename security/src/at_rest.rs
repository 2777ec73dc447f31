//! Keys at rest. A manager seals every Raft log entry and snapshot it
//! writes with its own data key (ChaCha20-Poly1305 from ring), so the
//! cluster's secrets — the CA key, the join-token secrets, every secret —
//! never sit in the clear in `raft.redb`. The data key lives in
//! `DATA/keys/raft.key` (0600): in the clear, or, with autolock, sealed
//! with the cluster's unlock key, which only the operator holds; such a
//! manager restarts locked until it is given the key.

use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

use crate::identity::{read_file, write_file, IdentityError};

#[derive(Debug, thiserror::Error)]
pub enum AtRestError {
    #[error(transparent)]
    File(#[from] IdentityError),
    #[error("{path}: not a shoal key file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("no random bytes from the operating system")]
    Random,
    #[error("sealed data is damaged or was sealed with another key")]
    Open,
    #[error("the unlock key is malformed: expected SHOALKEY-1-<64 hex digits>")]
    MalformedUnlockKey,
    #[error("wrong unlock key: it does not open this manager's data key")]
    WrongUnlockKey,
}

/// Sealed bytes start with this, so a file from before encryption (or
/// another format) is refused clearly rather than misread.
const MAGIC: &[u8; 4] = b"SHL1";

/// A 256-bit key.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl Key {
    pub fn random() -> Result<Key, AtRestError> {
        let mut k = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut k).map_err(|_| AtRestError::Random)?;
        Ok(Key(k))
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Seals and opens with one key: MAGIC, a random nonce, then the
/// ciphertext and its tag.
pub struct Sealer {
    key: LessSafeKey,
}

impl Sealer {
    pub fn new(key: &Key) -> Sealer {
        // CHACHA20_POLY1305 takes exactly 32 bytes; a Key is always 32.
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key.0).unwrap_or_else(|_| unreachable!("a 32-byte key"));
        Sealer { key: LessSafeKey::new(unbound) }
    }

    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, AtRestError> {
        let mut nonce = [0u8; NONCE_LEN];
        ring::rand::SystemRandom::new().fill(&mut nonce).map_err(|_| AtRestError::Random)?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + plain.len() + CHACHA20_POLY1305.tag_len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(MAGIC), &mut body)
            .map_err(|_| AtRestError::Open)?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, AtRestError> {
        let rest = sealed.strip_prefix(MAGIC.as_slice()).ok_or(AtRestError::Open)?;
        if rest.len() < NONCE_LEN {
            return Err(AtRestError::Open);
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| AtRestError::Open)?;
        let mut body = body.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::from(MAGIC), &mut body).map_err(|_| AtRestError::Open)?;
        let n = plain.len();
        body.truncate(n);
        Ok(body)
    }
}

/// `SHOALKEY-1-<hex>`: what `cluster update --autolock` prints and
/// `cluster unlock` takes.
pub fn format_unlock_key(k: &Key) -> String {
    format!("SHOALKEY-1-{}", hex::encode(k.0))
}

pub fn parse_unlock_key(s: &str) -> Result<Key, AtRestError> {
    let hex_part = s.trim().strip_prefix("SHOALKEY-1-").ok_or(AtRestError::MalformedUnlockKey)?;
    let bytes = hex::decode(hex_part).map_err(|_| AtRestError::MalformedUnlockKey)?;
    let k: [u8; 32] = bytes.try_into().map_err(|_| AtRestError::MalformedUnlockKey)?;
    Ok(Key(k))
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    version: u32,
    /// Sealed with the unlock key (autolock), or the key itself.
    sealed: bool,
    key: String,
}

fn key_path(dir: &Path) -> PathBuf {
    dir.join("keys/raft.key")
}

/// A manager's data key as found on disk.
pub enum DataKey {
    Open(Key),
    /// Autolock: the key is sealed with the unlock key.
    Locked,
}

/// Loads this manager's data key, making one on first use.
pub fn load_or_create(dir: &Path) -> Result<DataKey, AtRestError> {
    let path = key_path(dir);
    if !path.exists() {
        let k = Key::random()?;
        store(dir, &k, None)?;
        return Ok(DataKey::Open(k));
    }
    let f = read_key_file(&path)?;
    if f.sealed {
        return Ok(DataKey::Locked);
    }
    Ok(DataKey::Open(decode_key(&path, &f.key)?))
}

/// Whether this manager restarts locked.
pub fn is_locked(dir: &Path) -> Result<bool, AtRestError> {
    let path = key_path(dir);
    Ok(path.exists() && read_key_file(&path)?.sealed)
}

/// Opens the sealed data key with the operator's unlock key.
pub fn unlock(dir: &Path, unlock_key: &str) -> Result<Key, AtRestError> {
    let kek = parse_unlock_key(unlock_key)?;
    let path = key_path(dir);
    let f = read_key_file(&path)?;
    if !f.sealed {
        return decode_key(&path, &f.key);
    }
    let sealed = hex::decode(&f.key).map_err(|e| AtRestError::Format { path: path.clone(), reason: e.to_string() })?;
    let plain = Sealer::new(&kek).open(&sealed).map_err(|_| AtRestError::WrongUnlockKey)?;
    let k: [u8; 32] = plain.try_into().map_err(|_| AtRestError::Format { path, reason: "sealed key is not 32 bytes".into() })?;
    Ok(Key(k))
}

/// Writes the data key: in the clear, or sealed with `unlock_key`.
pub fn store(dir: &Path, key: &Key, unlock_key: Option<&str>) -> Result<(), AtRestError> {
    let f = match unlock_key {
        None => KeyFile { version: 1, sealed: false, key: hex::encode(key.0) },
        Some(u) => {
            let kek = parse_unlock_key(u)?;
            KeyFile { version: 1, sealed: true, key: hex::encode(Sealer::new(&kek).seal(&key.0)?) }
        }
    };
    let path = key_path(dir);
    let text = serde_json::to_string(&f).map_err(|e| AtRestError::Format { path: path.clone(), reason: e.to_string() })?;
    write_file(&path, &text, true)?;
    Ok(())
}

fn read_key_file(path: &Path) -> Result<KeyFile, AtRestError> {
    let text = read_file(path)?;
    serde_json::from_str(&text).map_err(|e| AtRestError::Format { path: path.to_path_buf(), reason: e.to_string() })
}

fn decode_key(path: &Path, hex_key: &str) -> Result<Key, AtRestError> {
    let bytes = hex::decode(hex_key).map_err(|e| AtRestError::Format { path: path.to_path_buf(), reason: e.to_string() })?;
    let k: [u8; 32] = bytes.try_into().map_err(|_| AtRestError::Format { path: path.to_path_buf(), reason: "key is not 32 bytes".into() })?;
    Ok(Key(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_round_trips_and_detects_tampering() {
        let s = Sealer::new(&Key::random().unwrap());
        let sealed = s.seal(b"-----BEGIN PRIVATE KEY-----").unwrap();
        assert!(!sealed.windows(5).any(|w| w == b"BEGIN"));
        assert_eq!(s.open(&sealed).unwrap(), b"-----BEGIN PRIVATE KEY-----");
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(s.open(&bad).is_err());
        assert!(Sealer::new(&Key::random().unwrap()).open(&sealed).is_err());
        assert!(s.open(b"plain").is_err());
    }

    #[test]
    fn a_locked_key_opens_only_with_its_unlock_key() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let DataKey::Open(k) = load_or_create(t.path()).unwrap() else { panic!("a new key is open") };
        let mode = std::fs::metadata(key_path(t.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let unlock_key = format_unlock_key(&Key::random().unwrap());
        store(t.path(), &k, Some(&unlock_key)).unwrap();
        assert!(is_locked(t.path()).unwrap());
        assert!(matches!(load_or_create(t.path()).unwrap(), DataKey::Locked));
        let other = format_unlock_key(&Key::random().unwrap());
        assert!(matches!(unlock(t.path(), &other), Err(AtRestError::WrongUnlockKey)));
        assert!(matches!(unlock(t.path(), "SHOALKEY-1-zz"), Err(AtRestError::MalformedUnlockKey)));
        assert_eq!(unlock(t.path(), &unlock_key).unwrap().0, k.0);
    }
}
