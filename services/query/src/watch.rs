//! Optional (`QUERY_CHANGE_STREAMS=true`): live notices from MongoDB change streams instead of the in-process
//! apply loop, so every replica sees every change (SSE and `X-Min-Version` across replicas, and read-only
//! replicas with `QUERY_CONSUME=false`). Real MongoDB needs a replica set for change streams; SecantusDB has them.
//! One notice per write: several versions of one aggregate applied in one batch arrive as their final state.
//!
//! The stream is reopened (after an error the driver could not resume by itself, the end of the stream, or a
//! generation switch) **from the last resume token**, so no change between the old stream and the new one is
//! missed. When the server no longer has that history (`ChangeStreamHistoryLost`), the stream starts afresh and
//! every live stream is told with a [`Notice::Reset`] (SSE `event: reset`): changes were missed, re-read.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use cqrs_events::AggregateType;
use futures::StreamExt;
use mongodb::{
    bson::{Document, doc},
    change_stream::event::ResumeToken,
    error::ErrorKind,
    options::FullDocumentType,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    ctx::{Change, Ctx},
    model,
};

/// Error codes that mean "this resume token can never be resumed from": the history is gone.
const HISTORY_LOST: [i32; 3] = [
    286, // ChangeStreamHistoryLost
    280, // ChangeStreamFatalError
    136, // CappedPositionLost
];

/// Hooks into the watcher, for tests: make it close its stream ([`WatchProbe::reopen`]), hold it closed
/// ([`WatchProbe::gate`]), and observe it. Inert unless used.
#[derive(Debug, Default)]
pub struct WatchProbe {
    /// Closes the current stream as an unresumable error would.
    pub reopen: Notify,
    /// Held while the watcher is about to (re)open a stream.
    pub gate: tokio::sync::Mutex<()>,
    /// Streams opened so far.
    pub opened: AtomicU64,
    /// Streams closed so far.
    pub closed: AtomicU64,
    /// Resets sent (history lost).
    pub resets: AtomicU64,
}

fn history_lost(e: &mongodb::error::Error) -> bool {
    matches!(e.kind.as_ref(), ErrorKind::Command(c) if HISTORY_LOST.contains(&c.code))
}

fn reset(ctx: &Ctx, reason: String) {
    tracing::warn!(%reason, "change stream history lost: live streams are told to re-read");
    ctx.watch_probe.resets.fetch_add(1, Ordering::SeqCst);
    ctx.reset(reason);
}

pub async fn run(ctx: Arc<Ctx>, cancel: CancellationToken) {
    let mut token: Option<ResumeToken> = None;
    while !cancel.is_cancelled() {
        let gate = ctx.watch_probe.gate.lock().await;
        let generation = ctx.serving();
        let names: Vec<String> = AggregateType::ALL
            .iter()
            .map(|e| model::collection_name(*e, generation))
            .collect();
        let pipeline = vec![doc! {"$match": {
            "ns.coll": {"$in": &names},
            "operationType": {"$in": ["insert", "replace", "update"]},
        }}];
        let stream = ctx
            .store
            .db
            .watch()
            .pipeline(pipeline)
            .full_document(FullDocumentType::UpdateLookup)
            .resume_after(token.clone())
            .await;
        drop(gate);
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) if token.is_some() && history_lost(&e) => {
                // Resuming is impossible: start from now and tell every live stream that it missed changes.
                token = None;
                reset(&ctx, e.to_string());
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "change stream failed to open; retrying from the same point");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        // The opening batch's token: a stream that closes before its first event resumes from here. (Later
        // tokens come from the events: the driver's own token cannot be read after a `next()` was cut short by
        // the timeout below.)
        token = stream.resume_token().or(token);
        ctx.watch_probe.opened.fetch_add(1, Ordering::SeqCst);
        tracing::info!(
            generation,
            resumed = token.is_some(),
            "watching read-model changes"
        );
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ctx.watch_probe.reopen.notified() => break,
                n = tokio::time::timeout(Duration::from_millis(500), stream.next()) => n,
            };
            match next {
                // Re-target the stream after a generation switch (resuming from the same point).
                Err(_) if ctx.serving() != generation => break,
                Err(_) => {}
                Ok(None) => break,
                Ok(Some(Err(e))) if history_lost(&e) => {
                    token = None;
                    reset(&ctx, e.to_string());
                    break;
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "change stream error; resuming");
                    break;
                }
                Ok(Some(Ok(ev))) => {
                    token = Some(ev.id.clone());
                    let coll = ev
                        .ns
                        .as_ref()
                        .and_then(|n| n.coll.clone())
                        .unwrap_or_default();
                    let Some(entity) = AggregateType::ALL
                        .into_iter()
                        .find(|e| model::collection_name(*e, generation) == coll)
                    else {
                        continue;
                    };
                    let Some(d): Option<Document> = ev.full_document else {
                        continue;
                    };
                    let Ok(id) = d.get_str("_id").map(str::to_owned) else {
                        continue;
                    };
                    let change = Change {
                        entity,
                        id,
                        version: model::doc_version(&d),
                        generation,
                        doc: model::to_json(&d),
                    };
                    ctx.publish(change);
                }
            }
        }
        ctx.watch_probe.closed.fetch_add(1, Ordering::SeqCst);
    }
}
