//! The apply loop of one projection generation: consume the three event topics in one consumer group, apply
//! batches to MongoDB with version guards, dead-letter poison events, and commit offsets only after the write
//! (and the dead-lettering) is durable. At-least-once delivery + version guards = exactly-once effect.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use cqrs_events::{AggregateType, Envelope, decode};
use mongodb::bson::Document;
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, StreamConsumer},
    message::{Header, Headers, OwnedHeaders, OwnedMessage},
    producer::FutureRecord,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    ctx::{Change, Ctx},
    error::QueryError,
    kafka::{
        self, H_DLQ_GROUP, H_DLQ_OFFSET, H_DLQ_PARTITION, H_DLQ_REASON, H_DLQ_REPLAYED_FROM,
        H_DLQ_TOPIC,
    },
    model,
};

/// A running apply loop.
pub struct Projector {
    pub generation: u32,
    pub group: String,
    cancel: CancellationToken,
    join: JoinHandle<()>,
}

impl Projector {
    pub fn spawn(ctx: Arc<Ctx>, generation: u32, group: String) -> Self {
        let cancel = CancellationToken::new();
        let join = tokio::spawn(run(ctx, generation, group.clone(), cancel.clone()));
        Self {
            generation,
            group,
            cancel,
            join,
        }
    }

    /// Stops after the batch in progress has been applied and committed.
    pub async fn stop(self) {
        self.cancel.cancel();
        if let Err(e) = self.join.await {
            tracing::error!(error = %e, "projector task failed");
        }
    }

    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}

async fn run(ctx: Arc<Ctx>, generation: u32, group: String, cancel: CancellationToken) {
    tracing::info!(generation, %group, "projector starting");
    loop {
        match consume(&ctx, generation, &group, &cancel).await {
            Ok(()) => break,
            Err(e) => {
                tracing::error!(generation, error = %e, "projector failed; restarting");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    tracing::info!(generation, %group, "projector stopped");
}

async fn consume(
    ctx: &Arc<Ctx>,
    generation: u32,
    group: &str,
    cancel: &CancellationToken,
) -> Result<(), QueryError> {
    let mut cfg = kafka::client_config(&ctx.config.kafka_bootstrap);
    if let Some(id) = &ctx.config.instance_id {
        // Scoped to the group, so the serving and a rebuilding generation's consumers may share it.
        cfg.set("group.instance.id", id);
    }
    let consumer: StreamConsumer = cfg
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", "5000")
        .create()?;
    let topics = ctx.topics.event_topics();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&refs)?;
    let size = ctx.config.batch_size.max(1);
    let mut last_commit: Option<TopicPartitionList> = None;
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => {
                // Make sure the last batch's asynchronous commit is not lost when the consumer closes.
                if let Some(tpl) = &last_commit
                    && let Err(e) = consumer.commit(tpl, CommitMode::Sync)
                {
                    tracing::warn!(error = %e, "final offset commit failed");
                }
                return Ok(());
            }
            m = consumer.recv() => match m {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!(generation, error = %e, "consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + ctx.config.batch_wait();
        while batch.len() < size {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m.detach()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error while filling a batch");
                    break;
                }
                Err(_) => break,
            }
        }
        // Infrastructure failures (MongoDB or Kafka down) are retried with the same batch: nothing is committed
        // until it is applied. Only poison events are skipped, via the DLQ.
        let mut backoff = Duration::from_millis(100);
        loop {
            match apply_batch(ctx, generation, group, &batch).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(generation, error = %e, "applying a batch failed; retrying");
                    let kind = match &e {
                        QueryError::WriteConcern { .. } => "write_concern",
                        QueryError::Mongo(_) => "mongodb",
                        QueryError::Kafka(_) => "kafka",
                        _ => "other",
                    };
                    ctx.metrics
                        .apply_failures
                        .with_label_values(&[generation.to_string().as_str(), kind])
                        .inc();
                    if cancel.is_cancelled() {
                        // Not committed: the batch is redelivered to whoever consumes next.
                        return Ok(());
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let n = ctx.batches_written.fetch_add(1, Ordering::SeqCst) + 1;
        if ctx.config.fault_crash_after_write.is_some_and(|k| n >= k) {
            // Test hook: die between the durable write and the offset commit.
            tracing::warn!(
                generation,
                "fault injection: consumer dies before committing offsets"
            );
            ctx.fault_fired.store(true, Ordering::SeqCst);
            return Ok(());
        }
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for m in &batch {
            let e = next
                .entry((m.topic().to_owned(), m.partition()))
                .or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &next {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            // Not fatal: the events are applied; they will be redelivered and skipped as duplicates.
            tracing::warn!(error = %e, "offset commit failed");
        }
        last_commit = Some(tpl);
    }
}

/// A decoded event with the message it came from.
struct Item<'a> {
    msg: &'a OwnedMessage,
    env: Envelope,
}

type Key = (AggregateType, String);
/// Each applied version's client view (for live streams), for one aggregate.
type States = Vec<(u64, Option<serde_json::Value>)>;

/// Applies one batch. Returns only when every message is either applied, a duplicate, or durably dead-lettered.
async fn apply_batch(
    ctx: &Arc<Ctx>,
    generation: u32,
    group: &str,
    batch: &[OwnedMessage],
) -> Result<(), QueryError> {
    let started = Instant::now();
    let g = generation.to_string();
    ctx.metrics
        .batch_size
        .with_label_values(&[g.as_str()])
        .observe(batch.len() as f64);
    let mut poison: Vec<(&OwnedMessage, String)> = Vec::new();
    let mut groups: HashMap<Key, Vec<Item<'_>>> = HashMap::new();
    for m in batch {
        let Some(agg) = ctx.topics.aggregate_of(m.topic()) else {
            poison.push((m, format!("unexpected topic {}", m.topic())));
            continue;
        };
        let Some(bytes) = m.payload() else {
            poison.push((m, "empty message value".into()));
            continue;
        };
        let env = match decode(bytes) {
            Ok(e) => e,
            Err(e) => {
                poison.push((m, e.to_string()));
                continue;
            }
        };
        if env.aggregate_type != agg {
            poison.push((
                m,
                format!("{} event on topic {}", env.aggregate_type, m.topic()),
            ));
            continue;
        }
        if let Err(reason) = model::validate(&env) {
            poison.push((m, format!("validation failed: {reason}")));
            continue;
        }
        groups
            .entry((agg, env.aggregate_id.to_string()))
            .or_default()
            .push(Item { msg: m, env });
    }
    for items in groups.values_mut() {
        items.sort_by_key(|i| i.env.version);
    }

    let gap_deadline = Instant::now() + Duration::from_millis(ctx.config.gap_hold_ms);
    let mut pending: Vec<Key> = groups.keys().cloned().collect();
    let mut changes: Vec<Change> = Vec::new();
    let mut applied: Vec<&Envelope> = Vec::new();
    let mut duplicates = 0u64;
    let mut rounds = 0u32;
    let mut dups_counted: HashSet<Key> = HashSet::new();
    while !pending.is_empty() {
        rounds += 1;
        let mut gapped: Vec<Key> = Vec::new();
        let mut conflicted: Vec<Key> = Vec::new();
        for entity in AggregateType::ALL {
            let keys: Vec<&Key> = pending.iter().filter(|k| k.0 == entity).collect();
            if keys.is_empty() {
                continue;
            }
            // An aggregate whose batch starts at version 1 is new unless this is a redelivery: it is inserted
            // without reading first (most of a bulk load), and if the insert collides with an existing document
            // the key is planned again below, from the stored state. Everything else is read first.
            let ids: Vec<String> = keys
                .iter()
                .filter(|k| rounds > 1 || !starts_new(&groups, k))
                .map(|k| k.1.clone())
                .collect();
            let current = ctx.store.fetch(entity, generation, &ids).await?;
            let mut inserts = Vec::new();
            let mut updates = Vec::new();
            let mut planned: Vec<(&Key, States, Vec<&Envelope>)> = Vec::new();
            // Duplicates seen per key this round; counted below unless the key is planned again.
            let mut round_dups: Vec<(&Key, u64)> = Vec::new();
            for key in keys {
                let Some(items) = groups.get(key) else {
                    continue;
                };
                let base = current.get(&key.1);
                let mut version = base.map(model::doc_version).unwrap_or(0);
                let mut doc: Option<Document> = base.cloned();
                let mut these: Vec<&Envelope> = Vec::new();
                // Every intermediate state, for the live streams.
                let mut states: States = Vec::new();
                let mut dead: Option<u64> = None;
                let mut gap = false;
                let mut key_dups = 0u64;
                for item in items {
                    let v = item.env.version;
                    if let Some(dv) = dead {
                        poison.push((
                            item.msg,
                            format!("follows dead-lettered version {dv} of the same aggregate"),
                        ));
                        continue;
                    }
                    if v <= version {
                        key_dups += 1;
                        continue;
                    }
                    if v > version + 1 {
                        if Instant::now() >= gap_deadline {
                            poison.push((
                                item.msg,
                                format!("version gap: read model at version {version}, event version {v}"),
                            ));
                            dead = Some(v);
                        } else {
                            gap = true;
                            break;
                        }
                        continue;
                    }
                    match model::apply(doc.as_ref(), &item.env) {
                        Ok(d) => {
                            if ctx.serving() == generation && !ctx.config.change_streams {
                                states.push((v, model::to_json(&d)));
                            }
                            doc = Some(d);
                            version = v;
                            these.push(&item.env);
                        }
                        Err(reason) => {
                            poison.push((item.msg, reason));
                            dead = Some(v);
                        }
                    }
                }
                round_dups.push((key, key_dups));
                if gap {
                    gapped.push(key.clone());
                }
                if let (Some(d), false) = (doc, these.is_empty()) {
                    if base.is_none() {
                        inserts.push(d);
                    } else {
                        updates.push(d);
                    }
                    planned.push((key, states, these));
                }
            }
            let outcome = ctx
                .store
                .write_batch(entity, generation, inserts, updates)
                .await?;
            // A key's duplicates are counted once: in the first round whose plan stood. A blind insert that
            // collided did not stand (its next round reads the stored state and sees them again); a gapped key's
            // later rounds would count its own just-applied events.
            for (key, n) in round_dups {
                if !outcome.conflicted_inserts.contains(&key.1) && dups_counted.insert(key.clone())
                {
                    duplicates += n;
                }
            }
            for (key, states, these) in planned {
                if outcome.conflicted_inserts.contains(&key.1) {
                    // Another writer created it meanwhile (e.g. during a rebalance): plan again from its state.
                    conflicted.push(key.clone());
                    continue;
                }
                changes.extend(states.into_iter().map(|(version, doc)| Change {
                    entity,
                    id: key.1.clone(),
                    version,
                    generation,
                    doc,
                }));
                applied.extend(these);
            }
        }
        if !gapped.is_empty() && conflicted.is_empty() {
            // Hold the batch briefly: the missing version may be applied by another consumer (rebalance) or
            // redelivered. After `gap_hold_ms` the gapped events are dead-lettered (see the loop above).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if rounds > 1000 {
            return Err(QueryError::Other("batch did not converge".into()));
        }
        pending = gapped;
        pending.extend(conflicted);
        let mut seen = HashSet::new();
        pending.retain(|k| seen.insert(k.clone()));
    }

    dead_letter(ctx, group, &poison).await?;

    // Metrics and notifications, after everything is durable.
    let now = chrono::Utc::now();
    for env in &applied {
        ctx.metrics
            .events_applied
            .with_label_values(&[g.as_str(), env.event_type().as_str()])
            .inc();
        let lag = (now - env.occurred_at)
            .num_microseconds()
            .unwrap_or(0)
            .max(0) as f64
            / 1e6;
        ctx.metrics
            .end_to_end_seconds
            .with_label_values(&[g.as_str()])
            .observe(lag);
    }
    if duplicates > 0 {
        ctx.metrics
            .events_skipped
            .with_label_values(&[g.as_str(), "duplicate"])
            .inc_by(duplicates);
    }
    ctx.metrics
        .apply_seconds
        .with_label_values(&[g.as_str()])
        .observe(started.elapsed().as_secs_f64());
    if let Ok(mut ts) = ctx.last_applied_ts.lock() {
        for m in batch {
            if let Some(t) = m.timestamp().to_millis() {
                let e = ts
                    .entry((group.to_owned(), m.topic().to_owned(), m.partition()))
                    .or_insert(t);
                *e = (*e).max(t);
            }
        }
    }
    if ctx.serving() == generation && !ctx.config.change_streams {
        for c in changes {
            ctx.publish(c);
        }
    }
    Ok(())
}

/// Publishes poison messages to `<prefix>.dlq` (original key, value and headers, plus the reason and source)
/// and waits for the broker's acknowledgement of each.
async fn dead_letter(
    ctx: &Arc<Ctx>,
    group: &str,
    poison: &[(&OwnedMessage, String)],
) -> Result<(), QueryError> {
    if poison.is_empty() {
        return Ok(());
    }
    let dlq = ctx.topics.dlq();
    let sends = poison.iter().map(|(m, reason)| {
        let mut headers = OwnedHeaders::new();
        if let Some(hs) = m.headers() {
            // A replayed event keeps `dlq-replayed-from`: its new entry says which entry it repeats.
            for h in hs.iter().filter(|h| !h.key.starts_with("dlq-") || h.key == H_DLQ_REPLAYED_FROM) {
                headers = headers.insert(Header { key: h.key, value: h.value });
            }
        }
        let partition = m.partition().to_string();
        let offset = m.offset().to_string();
        headers = headers
            .insert(Header { key: H_DLQ_REASON, value: Some(reason.as_str()) })
            .insert(Header { key: H_DLQ_TOPIC, value: Some(m.topic()) })
            .insert(Header { key: H_DLQ_PARTITION, value: Some(partition.as_str()) })
            .insert(Header { key: H_DLQ_OFFSET, value: Some(offset.as_str()) })
            .insert(Header { key: H_DLQ_GROUP, value: Some(group) });
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&dlq).headers(headers);
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        if let Some(v) = m.payload() {
            rec = rec.payload(v);
        }
        tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), %reason, "dead-lettering");
        ctx.producer.send(rec, kafka::TIMEOUT)
    });
    let results = futures::future::join_all(sends).await;
    for (r, (_, reason)) in results.into_iter().zip(poison) {
        if let Err((e, _)) = r {
            return Err(QueryError::Kafka(e));
        }
        ctx.metrics
            .dlq_total
            .with_label_values(&[reason_class(reason)])
            .inc();
    }
    Ok(())
}

/// A small, bounded label value for the DLQ counter.
fn reason_class(reason: &str) -> &'static str {
    if reason.starts_with("version gap") {
        "version_gap"
    } else if reason.starts_with("validation") {
        "validation"
    } else if reason.starts_with("unknown event type") {
        "unknown_type"
    } else if reason.starts_with("follows dead-lettered") {
        "follows_dead_letter"
    } else if reason.starts_with("not a JSON") || reason.starts_with("empty") {
        "undecodable"
    } else {
        "invalid"
    }
}

/// Whether the batch's first event for `key` is its creation (version 1), so no stored state is expected.
fn starts_new(groups: &HashMap<Key, Vec<Item<'_>>>, key: &Key) -> bool {
    groups
        .get(key)
        .and_then(|items| items.first())
        .is_some_and(|i| i.env.version == 1)
}
