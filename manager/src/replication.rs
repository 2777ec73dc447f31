//! Blob replication between managers: every manager holds every image blob
//! the store names. This loop sits above the blob store and the manager; the
//! blob store itself knows neither.

use std::sync::Arc;
use std::time::Duration;

use crate::blobs::fetch_from;
use crate::manager::Manager;
use crate::store::Change;

/// Keeps this manager's blob store complete: fetches every image blob the
/// store names from another manager that has it, and every minute drops
/// the blobs no image names.
pub async fn replicate(manager: Arc<Manager>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut events = manager.store.watch();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut last_gc = std::time::Instant::now();
    loop {
        let wanted: std::collections::HashSet<String> =
            manager.store.read(|s| s.images.values().flat_map(|i| i.blobs().cloned()).collect());
        // Only the leader's applied state is surely current: a lagging
        // follower must not drop blobs of images it has not applied yet.
        if last_gc.elapsed() > Duration::from_secs(60) && manager.is_leader() {
            last_gc = std::time::Instant::now();
            let (blobs, keep) = (manager.blobs.clone(), wanted.clone());
            let _ = tokio::task::spawn_blocking(move || blobs.gc(&keep)).await;
        }
        let missing: Vec<String> = wanted.into_iter().filter(|d| !manager.blobs.has(d)).collect();
        for digest in missing {
            let peers: Vec<String> = manager
                .members()
                .into_iter()
                .filter(|(id, _, _)| *id != manager.id)
                .map(|(_, addr, _)| addr)
                .collect();
            for addr in peers {
                match fetch_from(&manager.tls, &manager.blobs, &addr, &digest).await {
                    Ok(()) => {
                        tracing::info!(blob = %digest, from = %addr, "image blob replicated to this manager");
                        break;
                    }
                    Err(e) => tracing::debug!(blob = %digest, from = %addr, error = %e, "blob fetch failed"),
                }
            }
        }
        // Next pass: on the tick, or as soon as an image changes.
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => break,
                ev = events.recv() => match ev {
                    Ok(ev) if !ev.changes.iter().any(|c| matches!(c, Change::Image(_))) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    _ => break,
                },
            }
        }
    }
}

