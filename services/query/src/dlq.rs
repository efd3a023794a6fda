//! DLQ replay: re-publishing dead-lettered events to their source topics, each entry once.
//!
//! The DLQ is a log and entries stay in it. What replay-all has done is a cursor per DLQ partition (the next
//! offset to replay), stored in MongoDB (`_meta`, `_id: "dlqReplay"`), advanced after the broker acknowledged
//! the re-published events. A replay-all replays `[max(low, cursor), high)` of each partition, where `high` is
//! the watermark when the request started: entries that are dead-lettered again while it runs (still poison)
//! are new entries, for the next replay-all. One replay-all runs at a time across replicas (a lease on the same
//! document). A request does at most `max` entries and stops after [`REPLAY_BUDGET`]; it then says
//! `complete: false` with what remains, and the next request resumes at the cursor.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use mongodb::bson::{Document, doc};
use rdkafka::{
    Message,
    message::{Header, Headers, OwnedHeaders},
    producer::FutureRecord,
};
use serde_json::{Value, json};

use crate::{
    ctx::Ctx,
    error::QueryError,
    kafka::{self, DlqEntry, H_DLQ_REPLAYED_FROM},
};

const CURSOR_ID: &str = "dlqReplay";
/// One replay request works at most this long, then reports what it did and what remains.
pub const REPLAY_BUDGET: Duration = Duration::from_secs(15);
/// Entries read and re-published per round (the cursor is stored after each round).
const CHUNK: usize = 1000;
/// A replay-all lease not renewed for this long belongs to a replica that died.
const LEASE: Duration = Duration::from_secs(60);
/// How many replayed and skipped entries a response lists (the counts are complete).
const LISTED: usize = 1000;

/// The outcome of one replay request.
#[derive(Debug, Default)]
pub struct Replay {
    pub complete: bool,
    pub replayed: usize,
    pub skipped: usize,
    /// Entries of the request's range not replayed yet (replay-all), or not found (explicit entries).
    pub remaining: i64,
    pub replayed_list: Vec<Value>,
    pub skipped_list: Vec<Value>,
    /// Per DLQ partition, the next offset replay-all will replay.
    pub cursor: BTreeMap<i32, i64>,
}

impl Replay {
    pub fn to_json(&self) -> Value {
        let cursor: Vec<Value> = self
            .cursor
            .iter()
            .map(|(p, o)| json!({"partition": p, "nextOffset": o}))
            .collect();
        json!({
            "complete": self.complete,
            "counts": {"replayed": self.replayed, "skipped": self.skipped, "remaining": self.remaining},
            "replayed": self.replayed_list,
            "skipped": self.skipped_list,
            "listed": LISTED,
            "cursor": cursor,
        })
    }

    fn skip(&mut self, e: &DlqEntry, reason: &str) {
        self.skipped += 1;
        if self.skipped_list.len() < LISTED {
            self.skipped_list
                .push(json!({"partition": e.partition, "offset": e.offset, "reason": reason}));
        }
    }
}

fn as_i64(v: Option<&mongodb::bson::Bson>) -> Option<i64> {
    match v {
        Some(mongodb::bson::Bson::Int32(i)) => Some(i64::from(*i)),
        Some(mongodb::bson::Bson::Int64(i)) => Some(*i),
        _ => None,
    }
}

/// The stored replay-all cursor: next offset per DLQ partition.
pub async fn cursor(ctx: &Ctx) -> Result<BTreeMap<i32, i64>, QueryError> {
    let d = ctx.store.meta().find_one(doc! {"_id": CURSOR_ID}).await?;
    let mut out = BTreeMap::new();
    if let Some(next) = d.as_ref().and_then(|d| d.get_document("next").ok()) {
        for (k, v) in next {
            if let (Ok(p), Some(o)) = (k.parse::<i32>(), as_i64(Some(v))) {
                out.insert(p, o);
            }
        }
    }
    Ok(out)
}

/// Takes (or renews) the replay-all lease for `token`; `Busy` when another replay holds it.
async fn lease(ctx: &Ctx, token: &str) -> Result<(), QueryError> {
    let now = chrono::Utc::now().timestamp_millis();
    let until = now + i64::try_from(LEASE.as_millis()).unwrap_or(60_000);
    let res = ctx
        .store
        .meta()
        .update_one(
            doc! {"_id": CURSOR_ID, "$or": [{"owner": null}, {"owner": token}, {"leaseUntil": {"$lt": now}}]},
            doc! {"$set": {"owner": token, "leaseUntil": until}},
        )
        .upsert(true)
        .await;
    match res {
        Ok(_) => Ok(()),
        // The filter did not match an existing document, so the upsert collided with it: the lease is held.
        Err(e) if is_duplicate_key(&e) => Err(QueryError::Busy(
            "a DLQ replay is already running (on this or another replica); retry later".into(),
        )),
        Err(e) => Err(e.into()),
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        _ => e.to_string().contains("E11000"),
    }
}

async fn release(ctx: &Ctx, token: &str) {
    if let Err(e) = ctx
        .store
        .meta()
        .update_one(
            doc! {"_id": CURSOR_ID, "owner": token},
            doc! {"$set": {"owner": null}},
        )
        .await
    {
        tracing::warn!(error = %e, "releasing the DLQ replay lease failed (it expires)");
    }
}

/// Re-publishes `entries` to their source topics and waits for every acknowledgement. Returns the entries that
/// were published (the others are recorded as skipped in `out`).
async fn publish(ctx: &Arc<Ctx>, entries: &[DlqEntry], out: &mut Replay) -> Result<(), QueryError> {
    let mut sends = Vec::new();
    for e in entries {
        let (Some(src), Some(raw)) = (e.source_topic.as_deref(), e.raw.as_ref()) else {
            out.skip(e, "no source topic");
            continue;
        };
        if ctx.topics.aggregate_of(src).is_none() {
            out.skip(e, "source is not an event topic");
            continue;
        }
        let mut headers = OwnedHeaders::new();
        if let Some(hs) = raw.headers() {
            for h in hs.iter().filter(|h| !h.key.starts_with("dlq-")) {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let from = format!("{}:{}", e.partition, e.offset);
        headers = headers.insert(Header {
            key: H_DLQ_REPLAYED_FROM,
            value: Some(from.as_str()),
        });
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(src).headers(headers);
        if let Some(k) = raw.key() {
            rec = rec.key(k);
        }
        if let Some(v) = raw.payload() {
            rec = rec.payload(v);
        }
        sends.push((e, src, ctx.producer.send(rec, kafka::TIMEOUT)));
    }
    let (meta, futs): (Vec<_>, Vec<_>) = sends.into_iter().map(|(e, s, f)| ((e, s), f)).unzip();
    let results = futures::future::join_all(futs).await;
    let mut failed = None;
    for ((e, src), r) in meta.into_iter().zip(results) {
        match r {
            Ok(_) => {
                out.replayed += 1;
                if out.replayed_list.len() < LISTED {
                    out.replayed_list
                        .push(json!({"partition": e.partition, "offset": e.offset, "topic": src}));
                }
            }
            Err((err, _)) => failed = Some(err),
        }
    }
    match failed {
        Some(e) => Err(QueryError::Kafka(e)),
        None => Ok(()),
    }
}

/// `(partition, low, high)` of the DLQ's partitions.
async fn dlq_marks(ctx: &Arc<Ctx>) -> Result<Vec<(i32, i64, i64)>, QueryError> {
    let inspector = ctx.inspector(&ctx.base_group(0))?;
    let topic = ctx.topics.dlq();
    tokio::task::spawn_blocking(move || kafka::watermarks(&inspector, &topic))
        .await
        .map_err(|e| QueryError::Other(e.to_string()))?
}

/// Replay-all: every entry after the stored cursor, up to the watermarks at the start, each once.
pub async fn replay_all(ctx: &Arc<Ctx>, max: usize) -> Result<Replay, QueryError> {
    let token = uuid::Uuid::new_v4().to_string();
    lease(ctx, &token).await?;
    let result = replay_all_leased(ctx, &token, max).await;
    release(ctx, &token).await;
    result
}

async fn replay_all_leased(ctx: &Arc<Ctx>, token: &str, max: usize) -> Result<Replay, QueryError> {
    let started = Instant::now();
    let (bootstrap, topic) = (ctx.config.kafka_bootstrap.clone(), ctx.topics.dlq());
    let marks = dlq_marks(ctx).await?;
    let stored = cursor(ctx).await?;
    // [next, end) per partition; `end` is fixed at the start.
    let mut ranges: Vec<(i32, i64, i64)> = marks
        .iter()
        .map(|(p, low, high)| (*p, stored.get(p).copied().unwrap_or(*low).max(*low), *high))
        .collect();
    let mut out = Replay::default();
    loop {
        let left = max.saturating_sub(out.replayed + out.skipped);
        let pending: i64 = ranges.iter().map(|(_, from, to)| (to - from).max(0)).sum();
        if pending == 0 || left == 0 || started.elapsed() >= REPLAY_BUDGET {
            break;
        }
        let deadline = std::time::Instant::now() + REPLAY_BUDGET.saturating_sub(started.elapsed());
        let (entries, reached) = {
            let (bootstrap, topic, r) = (bootstrap.clone(), topic.clone(), ranges.clone());
            tokio::task::spawn_blocking(move || {
                kafka::read_range(&bootstrap, &topic, &r, left.min(CHUNK), deadline)
            })
            .await
            .map_err(|e| QueryError::Other(e.to_string()))??
        };
        // Publish everything read; the cursor moves only after every acknowledgement. A failure leaves the
        // cursor where it was, so the entries of this round are replayed again by the next request.
        publish(ctx, &entries, &mut out).await?;
        let mut set = Document::new();
        for (p, at) in &reached {
            set.insert(format!("next.{p}"), *at);
        }
        ctx.store
            .meta()
            .update_one(
                doc! {"_id": CURSOR_ID, "owner": token},
                doc! {"$max": set, "$set": {"leaseUntil": chrono::Utc::now().timestamp_millis()
                + i64::try_from(LEASE.as_millis()).unwrap_or(60_000)}},
            )
            .await?;
        let before: i64 = ranges.iter().map(|(_, from, _)| *from).sum();
        for (r, (_, at)) in ranges.iter_mut().zip(&reached) {
            r.1 = r.1.max(*at);
        }
        if ranges.iter().map(|(_, from, _)| *from).sum::<i64>() == before {
            // Nothing could be read before the deadline.
            break;
        }
    }
    out.remaining = ranges.iter().map(|(_, from, to)| (to - from).max(0)).sum();
    out.complete = out.remaining == 0;
    out.cursor = ranges.iter().map(|(p, from, _)| (*p, *from)).collect();
    Ok(out)
}

/// Replays the given entries (by DLQ partition and offset), whether or not replay-all did already; the cursor is
/// not moved. Entries that are not in the DLQ (any more) count as remaining.
pub async fn replay_entries(ctx: &Arc<Ctx>, wanted: &[(i32, i64)]) -> Result<Replay, QueryError> {
    let started = Instant::now();
    let (bootstrap, topic) = (ctx.config.kafka_bootstrap.clone(), ctx.topics.dlq());
    let marks = dlq_marks(ctx).await?;
    let mut out = Replay::default();
    let mut found = Vec::new();
    for (p, o) in wanted {
        let present = marks
            .iter()
            .any(|(mp, low, high)| mp == p && (*low..*high).contains(o));
        if !present {
            out.remaining += 1;
            if out.skipped_list.len() < LISTED {
                out.skipped_list.push(json!({"partition": p, "offset": o,
                                             "reason": "not in the DLQ (never was, or removed by retention)"}));
            }
            continue;
        }
        let deadline = std::time::Instant::now() + REPLAY_BUDGET.saturating_sub(started.elapsed());
        let (bootstrap, topic, r) = (bootstrap.clone(), topic.clone(), vec![(*p, *o, *o + 1)]);
        let (mut entries, _) = tokio::task::spawn_blocking(move || {
            kafka::read_range(&bootstrap, &topic, &r, 1, deadline)
        })
        .await
        .map_err(|e| QueryError::Other(e.to_string()))??;
        match entries.pop() {
            Some(e) if e.partition == *p && e.offset == *o => found.push(e),
            _ => {
                out.remaining += 1;
                if out.skipped_list.len() < LISTED {
                    out.skipped_list.push(json!({"partition": p, "offset": o,
                                                 "reason": "not in the DLQ (never was, or removed by retention)"}));
                }
            }
        }
    }
    publish(ctx, &found, &mut out).await?;
    out.complete = out.remaining == 0;
    out.cursor = cursor(ctx).await?;
    Ok(out)
}
