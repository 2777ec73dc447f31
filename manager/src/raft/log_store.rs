//! The Raft log and vote in redb. Every append is one durable write
//! transaction; openraft hands us entries in batches, so a burst of client
//! writes costs one fsync per batch, not per entry.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, OptionalSend, RaftLogReader, StorageIOError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use shoal_security::at_rest::Sealer;

use super::{LogId, NodeId, StorageError, TypeConfig};

pub(crate) const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const KEY_VOTE: &str = "vote";
const KEY_PURGED: &str = "last_purged";

/// Entries are sealed with the manager's data key before they reach redb
/// (see [`shoal_security::at_rest`]).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    sealer: Arc<Sealer>,
}

fn seal(sealer: &Sealer, bytes: &[u8]) -> Result<Vec<u8>, StorageError> {
    sealer.seal(bytes).map_err(|e| StorageError::from(StorageIOError::write_logs(&e)))
}

fn open_entry(sealer: &Sealer, bytes: &[u8]) -> Result<Entry<TypeConfig>, StorageError> {
    let plain = sealer.open(bytes).map_err(|e| StorageError::from(StorageIOError::read_logs(&e)))?;
    crate::raft::decode(&plain).map_err(decode_err)
}

fn read_err(e: impl Into<redb::Error>) -> StorageError {
    StorageIOError::read_logs(&e.into()).into()
}
fn write_err(e: impl Into<redb::Error>) -> StorageError {
    StorageIOError::write_logs(&e.into()).into()
}
fn decode_err(e: postcard::Error) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

impl LogStore {
    pub fn new(db: Arc<Database>, sealer: Arc<Sealer>) -> Result<Self, redb::Error> {
        let txn = db.begin_write()?;
        txn.open_table(LOGS)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(LogStore { db, sealer })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(META).map_err(read_err)?;
        match table.get(key).map_err(read_err)? {
            Some(v) => Ok(Some(crate::raft::decode(v.value()).map_err(decode_err)?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &str, value: &T, durable: bool) -> Result<(), StorageError> {
        let bytes = crate::raft::encode(value).map_err(|e| StorageError::from(StorageIOError::write_logs(&e)))?;
        let mut txn = self.db.begin_write().map_err(write_err)?;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StorageError::from(StorageIOError::write_logs(&e)))?;
        }
        {
            let mut table = txn.open_table(META).map_err(write_err)?;
            table.insert(key, bytes.as_slice()).map_err(write_err)?;
        }
        txn.commit().map_err(write_err)
    }

    /// First and last index present in the log, for `cluster status`.
    pub fn bounds(&self) -> Result<(u64, u64), StorageError> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOGS).map_err(read_err)?;
        let first = table.first().map_err(read_err)?.map(|(k, _)| k.value()).unwrap_or(0);
        let last = table.last().map_err(read_err)?.map(|(k, _)| k.value()).unwrap_or(0);
        Ok((first, last))
    }
}

/// Runs blocking redb work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::from(StorageIOError::write_logs(&e)))?
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Some(*i),
            Bound::Excluded(i) => i.checked_sub(1),
            Bound::Unbounded => Some(u64::MAX),
        };
        let Some(end) = end else { return Ok(Vec::new()) };
        if end < start {
            return Ok(Vec::new());
        }
        let (db, sealer) = (self.db.clone(), self.sealer.clone());
        blocking(move || {
            let txn = db.begin_read().map_err(read_err)?;
            let table = txn.open_table(LOGS).map_err(read_err)?;
            let mut out = Vec::new();
            for item in table.range(start..=end).map_err(read_err)? {
                let (_, v) = item.map_err(read_err)?;
                out.push(open_entry(&sealer, v.value())?);
            }
            Ok(out)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let this = self.clone();
        blocking(move || {
            let last_purged: Option<LogId> = this.get_meta(KEY_PURGED)?;
            let txn = this.db.begin_read().map_err(read_err)?;
            let table = txn.open_table(LOGS).map_err(read_err)?;
            let last = match table.last().map_err(read_err)? {
                Some((_, v)) => Some(open_entry(&this.sealer, v.value())?.log_id),
                None => last_purged,
            };
            Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let this = self.clone();
        let vote = *vote;
        blocking(move || this.put_meta(KEY_VOTE, &vote, true)).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        let this = self.clone();
        blocking(move || this.get_meta(KEY_VOTE)).await
    }

    // save_committed/read_committed keep openraft's defaults (not stored):
    // a restarted manager learns the commit index from the leader's next
    // heartbeat, and skipping the write keeps it off every commit's path.

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for e in entries {
            let bytes = crate::raft::encode(&e).map_err(|err| StorageError::from(StorageIOError::write_logs(&err)))?;
            encoded.push((e.log_id.index, seal(&self.sealer, &bytes)?));
        }
        let db = self.db.clone();
        let res = blocking(move || {
            let txn = db.begin_write().map_err(write_err)?;
            {
                let mut table = txn.open_table(LOGS).map_err(write_err)?;
                for (idx, bytes) in &encoded {
                    table.insert(*idx, bytes.as_slice()).map_err(write_err)?;
                }
            }
            txn.commit().map_err(write_err)
        })
        .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write().map_err(write_err)?;
            {
                let mut table = txn.open_table(LOGS).map_err(write_err)?;
                table.retain_in(log_id.index.., |_, _| false).map_err(write_err)?;
            }
            txn.commit().map_err(write_err)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let this = self.clone();
        blocking(move || {
            // Record the purge point first: if we crash in between, the
            // entries still present below it are simply ignored.
            this.put_meta(KEY_PURGED, &log_id, true)?;
            let txn = this.db.begin_write().map_err(write_err)?;
            {
                let mut table = txn.open_table(LOGS).map_err(write_err)?;
                table.retain_in(..=log_id.index, |_, _| false).map_err(write_err)?;
            }
            txn.commit().map_err(write_err)
        })
        .await
    }
}
