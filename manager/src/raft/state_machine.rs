//! The Raft state machine: applies entries to the [`Store`] and builds,
//! persists and installs snapshots of it. The state lives in memory; the
//! latest snapshot lives in redb, so a restart loads the snapshot and
//! openraft re-applies the log after it.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{BasicNode, Entry, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError, StoredMembership};
use redb::{Database, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{LogId, NodeId, StorageError, TypeConfig};
use crate::store::{Response, State, Store};
use shoal_security::at_rest::Sealer;

const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
const KEY_SNAPSHOT: &str = "current";

/// The snapshot as stored and sent: openraft's metadata plus the state.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    /// Snapshots are sealed with the manager's data key in redb.
    sealer: Arc<Sealer>,
    store: Store,
    inner: Arc<tokio::sync::Mutex<Progress>>,
}

/// What the state machine tracks besides the state itself.
#[derive(Default)]
struct Progress {
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, BasicNode>,
    snapshot_index: u64,
    snapshot_seq: u64,
}

fn sm_read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(&e).into()
}
fn sm_write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}

impl StateMachine {
    /// Opens the state machine and loads the latest persisted snapshot.
    pub fn open(db: Arc<Database>, store: Store, sealer: Arc<Sealer>) -> Result<Self, StorageError> {
        let txn = db.begin_write().map_err(|e| sm_write_err(redb::Error::from(e)))?;
        txn.open_table(SNAPSHOT).map_err(|e| sm_write_err(redb::Error::from(e)))?;
        txn.commit().map_err(|e| sm_write_err(redb::Error::from(e)))?;
        let sm = StateMachine { db, sealer, store, inner: Default::default() };
        if let Some(snap) = sm.read_snapshot()? {
            let state: State = crate::raft::decode(&snap.data).map_err(sm_read_err)?;
            sm.store.replace(state);
            let mut inner = sm.inner.try_lock().map_err(sm_read_err)?;
            inner.last_applied = snap.meta.last_log_id;
            inner.membership = snap.meta.last_membership.clone();
            inner.snapshot_index = snap.meta.last_log_id.map(|l| l.index).unwrap_or(0);
        }
        Ok(sm)
    }

    fn read_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        let txn = self.db.begin_read().map_err(|e| sm_read_err(redb::Error::from(e)))?;
        let table = txn.open_table(SNAPSHOT).map_err(|e| sm_read_err(redb::Error::from(e)))?;
        let Some(v) = table.get(KEY_SNAPSHOT).map_err(|e| sm_read_err(redb::Error::from(e)))? else {
            return Ok(None);
        };
        let plain = self.sealer.open(v.value()).map_err(sm_read_err)?;
        Ok(Some(crate::raft::decode(&plain).map_err(sm_read_err)?))
    }

    fn write_snapshot(db: &Database, sealer: &Sealer, snap: &StoredSnapshot) -> Result<(), StorageError> {
        let bytes = sealer.seal(&crate::raft::encode(snap).map_err(sm_write_err)?).map_err(sm_write_err)?;
        let txn = db.begin_write().map_err(|e| sm_write_err(redb::Error::from(e)))?;
        {
            let mut table = txn.open_table(SNAPSHOT).map_err(|e| sm_write_err(redb::Error::from(e)))?;
            table
                .insert(KEY_SNAPSHOT, bytes.as_slice())
                .map_err(|e| sm_write_err(redb::Error::from(e)))?;
        }
        txn.commit().map_err(|e| sm_write_err(redb::Error::from(e)))
    }

    /// The index of the last snapshot taken or installed.
    pub async fn snapshot_index(&self) -> u64 {
        self.inner.lock().await.snapshot_index
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Serialize under the lock so the state matches last_applied.
        let (meta, data) = {
            let mut inner = self.inner.lock().await;
            // Encoding a large state takes a while: off the Raft threads.
            let store = self.store.clone();
            let data = tokio::task::spawn_blocking(move || store.snapshot_bytes()).await.map_err(sm_read_err)?.map_err(sm_read_err)?;
            inner.snapshot_seq += 1;
            let snapshot_id = match inner.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, inner.snapshot_seq),
                None => format!("none-{}", inner.snapshot_seq),
            };
            let meta = SnapshotMeta {
                last_log_id: inner.last_applied,
                last_membership: inner.membership.clone(),
                snapshot_id,
            };
            inner.snapshot_index = inner.last_applied.map(|l| l.index).unwrap_or(0);
            (meta, data)
        };
        let stored = StoredSnapshot { meta: meta.clone(), data };
        let (db, sealer) = (self.db.clone(), self.sealer.clone());
        let stored = tokio::task::spawn_blocking(move || Self::write_snapshot(&db, &sealer, &stored).map(|_| stored))
            .await
            .map_err(sm_write_err)??;
        tracing::info!(index = stored.meta.last_log_id.map(|l| l.index), bytes = stored.data.len(), "raft snapshot built");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(stored.data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), StorageError> {
        let inner = self.inner.lock().await;
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.inner.lock().await;
        let mut out = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            let index = entry.log_id.index;
            match entry.payload {
                EntryPayload::Blank => out.push(Vec::new()),
                EntryPayload::Normal(req) => out.push(self.store.apply(index, req)),
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), m);
                    out.push(Vec::new());
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state: State = crate::raft::decode(&data)
            .map_err(|e| StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e)))?;
        let mut inner = self.inner.lock().await;
        let stored = StoredSnapshot { meta: meta.clone(), data };
        let (db, sealer) = (self.db.clone(), self.sealer.clone());
        tokio::task::spawn_blocking(move || Self::write_snapshot(&db, &sealer, &stored))
            .await
            .map_err(sm_write_err)??;
        self.store.replace(state);
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot_index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        tracing::info!(index = inner.snapshot_index, "raft snapshot installed from leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let this = self.clone();
        let snap = tokio::task::spawn_blocking(move || this.read_snapshot())
            .await
            .map_err(sm_read_err)??;
        Ok(snap.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}
