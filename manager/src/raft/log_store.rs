//! The Raft log and vote in redb. Appends go to one writer thread, in
//! order: it writes every append queued while it was busy in one durable
//! transaction (one fsync for many entries) and only then reports each
//! append flushed, so openraft never counts an entry durable before it is.
//! `append` itself returns at once: openraft hands us one entry per client
//! write, and waiting for its fsync stalled the Raft core (replication,
//! heartbeats) for every entry. Until written, entries are served from
//! memory ([`Pending`]), so a read right after an append sees it.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, mpsc};

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
    pending: Arc<Mutex<Pending>>,
    writer: mpsc::Sender<Job>,
}

/// Appended entries the writer has not yet made durable: index → (the
/// append's sequence number, the entry).
#[derive(Default)]
struct Pending {
    next_seq: u64,
    entries: BTreeMap<u64, (u64, usize, Entry<TypeConfig>)>,
}

/// The most entry bytes one AppendEntries carries (at least one entry):
/// openraft bounds a request by count only (`max_payload_entries`) and
/// gives it one heartbeat interval, and one command alone may make a
/// 1 MiB entry.
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;

/// Called once an append is durable (or failed).
type Flushed = Box<dyn FnOnce(Result<(), std::io::Error>) + Send>;

/// Work for the writer thread, done in the order sent.
enum Job {
    Append { seq: u64, entries: Vec<(u64, Vec<u8>)>, flushed: Flushed },
    /// Removes entries `from..` (truncate) or `..=upto` (purge).
    Remove { range: (Bound<u64>, Bound<u64>), done: tokio::sync::oneshot::Sender<Result<(), StorageError>> },
}

/// The most appends written in one transaction.
const MAX_GROUP: usize = 256;

fn lock(p: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    // The map stays consistent between statements: a panic elsewhere
    // while it was held leaves nothing half-done.
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// The writer thread: one transaction per run of queued appends.
fn write_loop(db: Arc<Database>, pending: Arc<Mutex<Pending>>, jobs: mpsc::Receiver<Job>) {
    let mut carry: Option<Job> = None;
    loop {
        let job = match carry.take() {
            Some(j) => j,
            None => match jobs.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        match job {
            Job::Remove { range, done } => {
                let r = (|| {
                    let txn = db.begin_write().map_err(write_err)?;
                    {
                        let mut table = txn.open_table(LOGS).map_err(write_err)?;
                        table.retain_in(range, |_, _| false).map_err(write_err)?;
                    }
                    txn.commit().map_err(write_err)
                })();
                // The caller may have given up waiting: nothing to tell.
                let _ = done.send(r);
            }
            Job::Append { seq, entries, flushed } => {
                let mut group = vec![(seq, entries, flushed)];
                while group.len() < MAX_GROUP {
                    match jobs.try_recv() {
                        Ok(Job::Append { seq, entries, flushed }) => group.push((seq, entries, flushed)),
                        Ok(other) => {
                            carry = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let r = (|| {
                    let txn = db.begin_write().map_err(write_err)?;
                    {
                        let mut table = txn.open_table(LOGS).map_err(write_err)?;
                        for (idx, bytes) in group.iter().flat_map(|(_, e, _)| e) {
                            table.insert(*idx, bytes.as_slice()).map_err(write_err)?;
                        }
                    }
                    txn.commit().map_err(write_err)
                })();
                if r.is_ok() {
                    // Durable now: reads find them in redb. An entry a later
                    // truncate replaced in memory stays.
                    let mut p = lock(&pending);
                    for (seq, entries, _) in &group {
                        for (idx, _) in entries {
                            if p.entries.get(idx).is_some_and(|(s, _, _)| s == seq) {
                                p.entries.remove(idx);
                            }
                        }
                    }
                }
                for (_, _, flushed) in group {
                    flushed(r.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
                }
            }
        }
    }
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
        let pending = Arc::new(Mutex::new(Pending::default()));
        let (writer, jobs) = mpsc::channel();
        let (d, p) = (db.clone(), pending.clone());
        std::thread::Builder::new()
            .name("raft-log".into())
            .spawn(move || write_loop(d, p, jobs))
            .map_err(|e| redb::Error::Io(e))?;
        Ok(LogStore { db, sealer, pending, writer })
    }

    /// Queues `entries` for the writer; `flushed` runs once they are
    /// durable. Readable at once.
    fn append_entries(&self, entries: Vec<Entry<TypeConfig>>, flushed: Flushed) -> Result<(), StorageError> {
        let mut encoded = Vec::with_capacity(entries.len());
        for e in &entries {
            let bytes = crate::raft::encode(e).map_err(|err| StorageError::from(StorageIOError::write_logs(&err)))?;
            encoded.push((e.log_id.index, seal(&self.sealer, &bytes)?));
        }
        let seq = {
            let mut p = lock(&self.pending);
            p.next_seq += 1;
            let seq = p.next_seq;
            for (e, (_, bytes)) in entries.into_iter().zip(&encoded) {
                p.entries.insert(e.log_id.index, (seq, bytes.len(), e));
            }
            seq
        };
        // Sent under no lock, but in the order of the sequence numbers:
        // openraft calls `append` from one task at a time.
        self.writer.send(Job::Append { seq, entries: encoded, flushed }).map_err(|_| {
            StorageError::from(StorageIOError::write_logs(&std::io::Error::other("the raft log writer stopped")))
        })
    }

    /// Removes `range` from the log, after every append queued before.
    async fn remove(&self, range: (Bound<u64>, Bound<u64>)) -> Result<(), StorageError> {
        {
            let mut p = lock(&self.pending);
            let gone: Vec<u64> = p.entries.range(range).map(|(i, _)| *i).collect();
            for i in gone {
                p.entries.remove(&i);
            }
        }
        let (done, wait) = tokio::sync::oneshot::channel();
        let stopped = || StorageError::from(StorageIOError::write_logs(&std::io::Error::other("the raft log writer stopped")));
        self.writer.send(Job::Remove { range, done }).map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())?
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

impl LogStore {
    /// Entries `start..=end`, stopping once they hold `budget` bytes (at
    /// least one entry).
    async fn read_range(&self, start: u64, end: u64, budget: usize) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        if end < start {
            return Ok(Vec::new());
        }
        // Entries not yet written are read from memory, and win over what
        // redb holds at their index. Copied before reading redb: the writer
        // drops them from memory only after they are durable.
        let unwritten: Vec<(u64, usize, Entry<TypeConfig>)> =
            lock(&self.pending).entries.range(start..=end).map(|(i, (_, n, e))| (*i, *n, e.clone())).collect();
        let first_unwritten = unwritten.first().map(|(i, _, _)| *i);
        let (db, sealer) = (self.db.clone(), self.sealer.clone());
        blocking(move || {
            let mut out = Vec::new();
            let mut bytes = 0usize;
            // Up to the first entry in memory: anything after it that is
            // not in memory is older than a truncate still being written.
            let db_end = first_unwritten.map_or(Some(end), |f| f.checked_sub(1));
            if let Some(db_end) = db_end.filter(|e| *e >= start) {
                let txn = db.begin_read().map_err(read_err)?;
                let table = txn.open_table(LOGS).map_err(read_err)?;
                for item in table.range(start..=db_end).map_err(read_err)? {
                    let (_, v) = item.map_err(read_err)?;
                    if !out.is_empty() && bytes + v.value().len() > budget {
                        return Ok(out);
                    }
                    bytes += v.value().len();
                    out.push(open_entry(&sealer, v.value())?);
                }
            }
            for (_, n, e) in unwritten {
                if !out.is_empty() && bytes + n > budget {
                    break;
                }
                bytes += n;
                out.push(e);
            }
            Ok(out)
        })
        .await
    }
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
        self.read_range(start, end, usize::MAX).await
    }

    /// Replication's read: a prefix of `start..end` of at most
    /// [`MAX_PAYLOAD_BYTES`].
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let Some(last) = end.checked_sub(1) else { return Ok(Vec::new()) };
        self.read_range(start, last, MAX_PAYLOAD_BYTES).await
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
            let written = match table.last().map_err(read_err)? {
                Some((_, v)) => Some(open_entry(&this.sealer, v.value())?.log_id),
                None => last_purged,
            };
            // Read after redb: an entry leaves memory only once written.
            let unwritten = lock(&this.pending).entries.last_key_value().map(|(_, (_, _, e))| e.log_id);
            let last = unwritten.max(written);
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
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        self.append_entries(entries, Box::new(move |r| callback.log_io_completed(r)))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.remove((Bound::Included(log_id.index), Bound::Unbounded)).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let this = self.clone();
        blocking(move || {
            // Record the purge point first: if we crash in between, the
            // entries still present below it are simply ignored.
            this.put_meta(KEY_PURGED, &log_id, true)
        })
        .await?;
        self.remove((Bound::Unbounded, Bound::Included(log_id.index))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry { log_id: LogId::new(CommittedLeaderId::new(term, 1), index), payload: EntryPayload::Blank }
    }

    fn open(path: &std::path::Path, key: &shoal_security::at_rest::Key) -> LogStore {
        let db = Arc::new(Database::create(path).expect("create the database"));
        LogStore::new(db, Arc::new(Sealer::new(key))).expect("open the log")
    }

    fn ids(es: &[Entry<TypeConfig>]) -> Vec<(u64, u64)> {
        es.iter().map(|e| (e.log_id.leader_id.term, e.log_id.index)).collect()
    }

    /// Appends not yet durable are readable at once; each is reported
    /// flushed in order; after a truncate the new entries win, and the log
    /// read back from disk is what was reported durable.
    #[tokio::test]
    async fn appends_are_readable_before_they_are_durable_and_flushed_in_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("raft.redb");
        let key = shoal_security::at_rest::Key::random().expect("key");
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut log = open(&path, &key);
            for i in 1..=50 {
                let tx = tx.clone();
                log.append_entries(vec![entry(1, i)], Box::new(move |r| tx.send((i, r.is_ok())).expect("send"))).expect("append");
            }
            // Readable before the flushes are awaited.
            let got = log.try_get_log_entries(1..=50).await.expect("read");
            assert_eq!(ids(&got), (1..=50).map(|i| (1, i)).collect::<Vec<_>>());
            assert_eq!(log.get_log_state().await.expect("state").last_log_id.map(|l| l.index), Some(50));
            // Replication's reads stop at a byte budget, never below one entry.
            // (The writer may already have written entry 1: its size is
            // computed the way append computes it, not read from memory.)
            let one = seal(&log.sealer, &crate::raft::encode(&entry(1, 1)).expect("encode")).expect("seal").len();
            assert_eq!(log.read_range(1, 50, 3 * one).await.expect("read").len(), 3);
            assert_eq!(log.read_range(1, 50, 0).await.expect("read").len(), 1);
            let flushed: Vec<(u64, bool)> = (0..50).map(|_| rx.recv().expect("flushed")).collect();
            assert_eq!(flushed, (1..=50).map(|i| (i, true)).collect::<Vec<_>>(), "one report per append, in order");
            assert!(lock(&log.pending).entries.is_empty(), "written entries leave memory");
            assert_eq!(log.read_range(1, 50, 3 * one).await.expect("read").len(), 3, "the same budget from redb");
            assert_eq!(ids(&log.limited_get_log_entries(5, 9).await.expect("read")), (5..9).map(|i| (1, i)).collect::<Vec<_>>());

            // A new leader's entries replace 41.. .
            log.truncate(LogId::new(CommittedLeaderId::new(1, 1), 41)).await.expect("truncate");
            let tx2 = tx.clone();
            log.append_entries(vec![entry(2, 41), entry(2, 42)], Box::new(move |r| tx2.send((42, r.is_ok())).expect("send"))).expect("append");
            let got = log.try_get_log_entries(38..=45).await.expect("read");
            assert_eq!(ids(&got), vec![(1, 38), (1, 39), (1, 40), (2, 41), (2, 42)]);
            assert_eq!(rx.recv().expect("flushed"), (42, true));
            log.purge(LogId::new(CommittedLeaderId::new(1, 1), 10)).await.expect("purge");
            let state = log.get_log_state().await.expect("state");
            assert_eq!((state.last_purged_log_id.map(|l| l.index), state.last_log_id.map(|l| (l.leader_id.term, l.index))), (Some(10), Some((2, 42))));
        }
        // What was reported durable is on disk. The writer thread lets go
        // of the database once the store is dropped: poll for that, up to
        // a deadline.
        let mut reopened = None;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            match Database::create(&path) {
                Ok(db) => {
                    reopened = Some(db);
                    break;
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        let mut log = LogStore::new(Arc::new(reopened.expect("reopen the database")), Arc::new(Sealer::new(&key))).expect("open the log");
        let got = log.try_get_log_entries(0..=100).await.expect("read");
        assert_eq!(ids(&got), (11..=40).map(|i| (1, i)).chain([(2, 41), (2, 42)]).collect::<Vec<_>>());
        drop(log);
    }
}
