//! Optional (`QUERY_CHANGE_STREAMS=true`): live notices from MongoDB change streams instead of the in-process
//! apply loop, so every replica sees every change (SSE and `X-Min-Version` across replicas, and read-only
//! replicas with `QUERY_CONSUME=false`). Real MongoDB needs a replica set for change streams; SecantusDB has them.
//! One notice per write: several versions of one aggregate applied in one batch arrive as their final state.

use std::{sync::Arc, time::Duration};

use cqrs_events::AggregateType;
use futures::StreamExt;
use mongodb::{
    bson::{Document, doc},
    options::FullDocumentType,
};
use tokio_util::sync::CancellationToken;

use crate::{
    ctx::{Change, Ctx, Notice},
    model,
};

pub async fn run(ctx: Arc<Ctx>, cancel: CancellationToken) {
    while !cancel.is_cancelled() {
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
            .await;
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "change stream failed to open; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        tracing::info!(generation, "watching read-model changes");
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return,
                n = tokio::time::timeout(Duration::from_millis(500), stream.next()) => n,
            };
            match next {
                // Re-target the stream after a generation switch.
                Err(_) if ctx.serving() != generation => break,
                Err(_) => {}
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "change stream error; reopening");
                    break;
                }
                Ok(Some(Ok(ev))) => {
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
                    let _ = ctx.notices.send(Notice::Changed(Arc::new(change)));
                }
            }
        }
    }
}
