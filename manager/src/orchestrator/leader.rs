//! What the leader-only loops (orchestrator, scheduler) share: waiting for
//! leadership, the new leader's read barrier, and writing through the local
//! Raft node only.

use tokio::sync::watch;

use crate::manager::{LocalError, Manager};
use crate::store::{ApplyError, Command};

#[derive(Debug, thiserror::Error)]
pub enum LeadError {
    #[error("this manager is no longer the leader")]
    NotLeader,
    #[error("the write was not committed in time: no quorum")]
    Timeout,
    #[error("raft: {0}")]
    Raft(String),
    #[error("no randomness for task ids")]
    Random,
    #[error("the planning thread failed: {0}")]
    Planner(String),
    #[error("{kind} refused: {source}")]
    Refused { kind: &'static str, source: ApplyError },
}

fn from_local(e: LocalError) -> LeadError {
    match e {
        LocalError::NotLeader(_) => LeadError::NotLeader,
        LocalError::Timeout => LeadError::Timeout,
        LocalError::Raft(r) => LeadError::Raft(r),
        LocalError::TooLarge(n) => LeadError::Raft(format!("a command of {n} bytes is too large for a raft entry")),
    }
}

/// Waits until this manager leads. False when shutting down.
pub(crate) async fn until_leader(manager: &Manager, shutdown: &mut watch::Receiver<bool>) -> bool {
    let mut metrics = manager.raft.metrics();
    loop {
        if *shutdown.borrow() {
            return false;
        }
        if manager.is_leader() {
            return true;
        }
        tokio::select! {
            r = metrics.changed() => if r.is_err() { return false },
            r = shutdown.changed() => if r.is_err() { return false },
        }
    }
}

/// A new leader's read barrier: once a no-op of its own term is applied
/// here, everything earlier leaders committed is in the store, so the
/// first decisions do not repeat work a previous leader already did.
pub(crate) async fn barrier(manager: &Manager) -> Result<(), LeadError> {
    propose_all(manager, vec![Command::Noop]).await
}

/// Proposes `cmds` together (they share Raft entries through the batcher)
/// on this node only: a leader-only loop that lost leadership must not
/// forward its stale decisions to the new leader.
pub(crate) async fn propose_all(manager: &Manager, cmds: Vec<Command>) -> Result<(), LeadError> {
    // Many-task commands go as runs that each fit in a Raft entry.
    let cmds: Vec<Command> = cmds.into_iter().flat_map(Command::split).collect();
    let kinds: Vec<&'static str> = cmds.iter().map(Command::kind).collect();
    let results = futures::future::join_all(cmds.into_iter().map(|c| manager.propose_local(c))).await;
    for (kind, r) in kinds.into_iter().zip(results) {
        r.map_err(from_local)?.map_err(|source| LeadError::Refused { kind, source })?;
    }
    Ok(())
}

/// Reads the store on a blocking thread: a pass over 100,000 tasks takes
/// long enough to stall every RPC sharing its runtime thread. Also returns
/// how long it waited for the store's read lock and how long it held it
/// (what a loop rests for: [`rest_after`]).
pub(crate) async fn plan<R: Send + 'static>(
    manager: &Manager,
    f: impl FnOnce(&crate::store::State) -> R + Send + 'static,
) -> Result<(R, Reading), LeadError> {
    let store = manager.store.clone();
    let asked = std::time::Instant::now();
    tokio::task::spawn_blocking(move || {
        store.read(|s| {
            let got = std::time::Instant::now();
            let r = f(s);
            (r, Reading { waited: got - asked, held: got.elapsed() })
        })
    })
    .await
    .map_err(|e| LeadError::Planner(e.to_string()))
}

/// How a planning read went.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Reading {
    /// From asking to holding the read lock (a blocking thread, then the
    /// writers queued ahead).
    pub waited: std::time::Duration,
    pub held: std::time::Duration,
}

/// Sleeps until `at`; never wakes for `None` (a `select!` branch that is off).
pub(crate) async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// When the next pass may start, after one that started at `started` and
/// held the store's read lock for `held`: a loop rests twice as long as it
/// read, so it holds the lock (which every writer waits behind) at most a
/// third of the time however big the cluster grows. Waiting for its writes
/// to commit holds nothing and counts as rest: resting after the commit
/// too made a 250,000-task burst wait ~2 s between 5,000-task passes.
/// Quick passes do not rest.
pub(crate) fn rest_after(started: tokio::time::Instant, held: std::time::Duration) -> Option<tokio::time::Instant> {
    (held >= std::time::Duration::from_millis(10)).then(|| started + held * 3)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_loop_rests_twice_as_long_as_a_slow_pass_took() {
        let t = tokio::time::Instant::now();
        assert_eq!(super::rest_after(t, Duration::from_millis(3)), None, "quick passes do not rest");
        assert_eq!(super::rest_after(t, Duration::from_millis(40)), Some(t + Duration::from_millis(120)));
    }
}
