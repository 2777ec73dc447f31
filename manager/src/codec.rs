//! The encoding of everything Raft stores or sends: log entries, votes,
//! snapshots and transport payloads. postcard is compact and fast; both
//! ends of a connection run the same shoal version. The store and the Raft
//! node both use it, so it sits below both.

pub fn encode<T: serde::Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(v)
}

pub fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}
