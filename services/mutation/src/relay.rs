//! The relay: publishes committed events from the outbox to Kafka, exactly one active per database.
//!
//! Leadership is `pg_try_advisory_lock` on a dedicated connection: when the holder's process or connection
//! dies, PostgreSQL frees the lock and a stand-by replica takes it on its next try. The leader reads the
//! outbox (joined with the events) in position order, publishes a batch with an idempotent producer
//! (`acks=all`), waits for every acknowledgement, and only then deletes those outbox rows. On any Kafka error
//! it keeps the rows and retries with capped exponential back-off: at-least-once, and nothing is skipped.
//!
//! Why it is gap-free: an event's outbox row commits atomically with the event. A transaction that committed
//! late with a low position is simply still in the outbox when it becomes visible, so the next read finds it;
//! nothing depends on "everything after the last position seen".
//! Per-aggregate order holds because a command locks its aggregate row before appending, so a later version
//! can only commit after the earlier one, and gets a higher position.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use cqrs_events::{
    AggregateType, HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_SCHEMA_VERSION, Topics,
};
use rdkafka::{
    ClientConfig,
    admin::{
        AdminClient, AdminOptions, AlterConfig, ConfigSource, NewTopic, ResourceSpecifier,
        TopicReplication,
    },
    client::DefaultClientContext,
    error::KafkaError,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord, Producer},
    types::RDKafkaErrorCode,
};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::Metrics;

/// The advisory lock key of the relay ("cqrsrela" as bytes). Advisory locks are per database.
pub const RELAY_LOCK_KEY: i64 = 0x6371_7273_7265_6c61;

/// State shared between the relay task and the HTTP handlers.
#[derive(Default)]
pub struct RelayShared {
    pub leader: AtomicBool,
    pub published: AtomicU64,
    /// Signalled after each group commit so an idle leader publishes at once.
    pub wake: Arc<Notify>,
}

#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub database_url: String,
    pub kafka_bootstrap: String,
    pub topics: Topics,
    pub partitions: i32,
    pub replication: i32,
    /// The topic-level configuration topics are created with and reconciled to ([`topic_config`]).
    pub topic_config: BTreeMap<String, String>,
    pub create_topics: bool,
    pub batch_size: i64,
    pub poll: Duration,
    pub max_backoff: Duration,
    pub message_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// Runs until `stop` is cancelled: stand by for the lock, lead while holding it, stand by again if the
/// connection is lost.
pub async fn run(
    s: RelaySettings,
    shared: Arc<RelayShared>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let mut conn = match PgConnection::connect(&s.database_url).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "relay cannot connect to PostgreSQL; retrying");
                if sleep_or_stop(s.poll, &stop).await {
                    return;
                }
                continue;
            }
        };
        // Stand by until the lock is ours (or the connection fails).
        let locked = loop {
            match sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                .bind(RELAY_LOCK_KEY)
                .fetch_one(&mut conn)
                .await
            {
                Ok(true) => break true,
                Ok(false) => {
                    if sleep_or_stop(s.poll, &stop).await {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay lock attempt failed; reconnecting");
                    break false;
                }
            }
        };
        if !locked {
            if sleep_or_stop(s.poll, &stop).await {
                return;
            }
            continue;
        }
        tracing::info!("relay: this replica holds the relay lock and publishes");
        shared.leader.store(true, Ordering::SeqCst);
        metrics.relay_leader.set(1);
        let r = lead(&s, &mut conn, &shared, &metrics, &stop).await;
        shared.leader.store(false, Ordering::SeqCst);
        metrics.relay_leader.set(0);
        // Closing the connection releases the lock.
        let _ = conn.close().await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "relay stopped leading; standing by");
            if sleep_or_stop(s.poll, &stop).await {
                return;
            }
        }
    }
}

/// Sleeps; true when stopped meanwhile.
async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = stop.cancelled() => true,
    }
}

fn producer(s: &RelaySettings) -> Result<FutureProducer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", &s.kafka_bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set(
            "message.timeout.ms",
            s.message_timeout.as_millis().to_string(),
        )
        .set("client.id", "cqrs-mutation-relay")
        .create()
}

/// The topic configuration mutation creates topics with: events are kept forever (`retention.ms` and
/// `retention.bytes` -1: projections are rebuilt by replaying the topics from the beginning), and an
/// `acks=all` write is acknowledged only once `min.insync.replicas = max(RF − 1, 1)` replicas have it: from
/// RF 3 on, one broker can be lost without losing an acknowledged event and without stopping writes (with RF 2
/// or 1 the minimum is 1, which keeps writes going but does not survive the loss of that one replica).
/// `overrides` win. The operator's strimzi-mode
/// `KafkaTopic`s carry the same defaults (`operator/src/build.rs`, `topic_config`).
pub fn topic_config(
    replication: i32,
    overrides: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut config = BTreeMap::from([
        ("retention.ms".to_owned(), "-1".to_owned()),
        ("retention.bytes".to_owned(), "-1".to_owned()),
        (
            "min.insync.replicas".to_owned(),
            (replication - 1).max(1).to_string(),
        ),
    ]);
    config.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
    config
}

/// Creates the event topics and the DLQ if they are missing, with `config`, and reconciles `config` on those
/// that already exist.
pub async fn ensure_topics(
    bootstrap: &str,
    topics: &Topics,
    partitions: i32,
    replication: i32,
    config: &BTreeMap<String, String>,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let mut names = topics.event_topics();
    names.push(topics.dlq());
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| {
            config.iter().fold(
                NewTopic::new(n, partitions, TopicReplication::Fixed(replication)),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    let mut existing = Vec::new();
    for r in admin.create_topics(new.iter(), &opts).await? {
        match r {
            Ok(_) => {}
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => existing.push(name),
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::warn!(topic = %name, ?code, "topic creation failed");
                });
            }
        }
    }
    if !existing.is_empty() {
        reconcile_topic_config(&admin, &existing, config, &opts).await?;
    }
    Ok(())
}

/// Brings `config` onto existing topics, keeping their other topic-level settings.
///
/// rdkafka offers only the non-incremental AlterConfigs, which replaces a topic's whole set of dynamic
/// settings; so the current dynamic settings are read first (DescribeConfigs) and sent back with ours merged
/// in, and only topics where one of ours differs are altered.
async fn reconcile_topic_config(
    admin: &AdminClient<DefaultClientContext>,
    names: &[String],
    config: &BTreeMap<String, String>,
    opts: &AdminOptions,
) -> Result<(), KafkaError> {
    let specs: Vec<ResourceSpecifier<'_>> = names
        .iter()
        .map(|n| ResourceSpecifier::Topic(n.as_str()))
        .collect();
    let described = admin.describe_configs(specs.iter(), opts).await?;
    let mut wanted: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    for (name, r) in names.iter().zip(described) {
        let resource = r.map_err(KafkaError::AdminOp).inspect_err(|e| {
            tracing::warn!(topic = %name, error = %e, "describing the topic configuration failed");
        })?;
        let mut dynamic = BTreeMap::new();
        let mut differs = false;
        let mut unknown_secret = false;
        for e in &resource.entries {
            if e.source == ConfigSource::DynamicTopic {
                match &e.value {
                    Some(v) => {
                        dynamic.insert(e.name.clone(), v.clone());
                    }
                    None => unknown_secret = true,
                }
            }
        }
        for (k, v) in config {
            let current = resource.get(k).and_then(|e| e.value.as_deref());
            // A default that happens to equal ours is still set explicitly, so a later change of the
            // broker's defaults cannot change the topic.
            let explicit = dynamic.get(k).is_some_and(|d| d == v);
            if current != Some(v.as_str()) || !explicit {
                differs = true;
            }
        }
        if !differs {
            continue;
        }
        if unknown_secret {
            // A sensitive setting's value is not returned, and AlterConfigs would drop it: leave the topic be.
            tracing::warn!(topic = %name, "topic has a sensitive setting; its configuration is not reconciled");
            continue;
        }
        dynamic.extend(config.iter().map(|(k, v)| (k.clone(), v.clone())));
        wanted.push((name.clone(), dynamic));
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let alters: Vec<AlterConfig<'_>> = wanted
        .iter()
        .map(|(name, c)| {
            c.iter().fold(
                AlterConfig::new(ResourceSpecifier::Topic(name.as_str())),
                |a, (k, v)| a.set(k, v),
            )
        })
        .collect();
    for r in admin.alter_configs(alters.iter(), opts).await? {
        match r {
            Ok(spec) => tracing::info!(topic = ?spec, "topic configuration reconciled"),
            Err((spec, code)) => {
                tracing::warn!(topic = ?spec, ?code, "altering the topic configuration failed");
                return Err(KafkaError::AdminOp(code));
            }
        }
    }
    Ok(())
}

struct OutboxEvent {
    position: i64,
    aggregate_type: String,
    aggregate_id: Uuid,
    event_type: String,
    event_id: Uuid,
    schema_version: i32,
    value: Vec<u8>,
}

fn envelope_json(r: &sqlx::postgres::PgRow) -> Result<OutboxEvent, sqlx::Error> {
    let event_id: Uuid = r.try_get("event_id")?;
    let aggregate_type: String = r.try_get("aggregate_type")?;
    let aggregate_id: Uuid = r.try_get("aggregate_id")?;
    let version: i64 = r.try_get("version")?;
    let event_type: String = r.try_get("type")?;
    let schema_version: i32 = r.try_get("schema_version")?;
    let data: Value = r.try_get("data")?;
    let metadata: Value = r.try_get("metadata")?;
    let occurred_at: DateTime<Utc> = r.try_get("occurred_at")?;
    let mut env = json!({
        "id": event_id, "type": event_type, "schemaVersion": schema_version,
        "aggregateType": aggregate_type, "aggregateId": aggregate_id, "version": version,
        "occurredAt": occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "data": data,
    });
    for k in ["traceId", "causationId"] {
        if let Some(v) = metadata.get(k) {
            env[k] = v.clone();
        }
    }
    let raw = serde_json::to_vec(&env).unwrap_or_default();
    // Normalise through the shared contract; an event it cannot decode is still published as stored, so the
    // consumers' dead-letter path sees it instead of the relay stalling forever.
    let value = match cqrs_events::decode(&raw) {
        Ok(e) => e.to_json(),
        Err(e) => {
            tracing::error!(%event_id, error = %e, "stored event does not decode; publishing it as stored");
            raw
        }
    };
    Ok(OutboxEvent {
        position: r.try_get("position")?,
        aggregate_type,
        aggregate_id,
        event_type,
        event_id,
        schema_version,
        value,
    })
}

async fn lead(
    s: &RelaySettings,
    conn: &mut PgConnection,
    shared: &RelayShared,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> Result<(), RelayError> {
    let mut producer = producer(s)?;
    let mut topics_ready = !s.create_topics;
    let min_backoff = Duration::from_millis(100);
    let mut backoff = min_backoff;
    while !stop.is_cancelled() {
        if !topics_ready {
            match ensure_topics(
                &s.kafka_bootstrap,
                &s.topics,
                s.partitions,
                s.replication,
                &s.topic_config,
            )
            .await
            {
                Ok(()) => topics_ready = true,
                Err(e) => {
                    metrics.relay_errors.inc();
                    tracing::warn!(error = %e, ?backoff, "creating topics failed; retrying");
                    // Keep the session alive and notice a lost connection while waiting.
                    sqlx::query("SELECT 1").execute(&mut *conn).await?;
                    if sleep_or_stop(backoff, stop).await {
                        return Ok(());
                    }
                    backoff = (backoff * 2).min(s.max_backoff);
                    continue;
                }
            }
        }
        let started = Instant::now();
        let rows = sqlx::query(
            "SELECT e.position, e.event_id, e.aggregate_type, e.aggregate_id, e.version, e.type, e.schema_version,
                    e.data, e.metadata, e.occurred_at
             FROM outbox o JOIN events e ON e.position = o.position
             ORDER BY o.position LIMIT $1",
        )
        .bind(s.batch_size)
        .fetch_all(&mut *conn)
        .await?;
        if rows.is_empty() {
            tokio::select! {
                () = shared.wake.notified() => {}
                () = tokio::time::sleep(s.poll) => {}
                () = stop.cancelled() => return Ok(()),
            }
            continue;
        }
        let events = rows
            .iter()
            .map(envelope_json)
            .collect::<Result<Vec<_>, _>>()?;
        match publish(&producer, &s.topics, &events).await {
            Ok(()) => {
                let positions: Vec<i64> = events.iter().map(|e| e.position).collect();
                sqlx::query("DELETE FROM outbox WHERE position = ANY($1)")
                    .bind(&positions)
                    .execute(&mut *conn)
                    .await?;
                let n = positions.len() as u64;
                shared.published.fetch_add(n, Ordering::Relaxed);
                metrics.relay_published.inc_by(n);
                metrics
                    .relay_batch_seconds
                    .observe(started.elapsed().as_secs_f64());
                backoff = min_backoff;
            }
            Err(e) => {
                metrics.relay_errors.inc();
                tracing::warn!(error = %e, events = events.len(), ?backoff, "publishing failed; events kept, retrying");
                if let Some((code, reason)) = producer.client().fatal_error() {
                    tracing::warn!(?code, %reason, "producer hit a fatal error; creating a new one");
                    producer = self::producer(s)?;
                }
                sqlx::query("SELECT 1").execute(&mut *conn).await?;
                if sleep_or_stop(backoff, stop).await {
                    return Ok(());
                }
                backoff = (backoff * 2).min(s.max_backoff);
            }
        }
    }
    Ok(())
}

/// Sends every event and waits for every acknowledgement; any failure fails the whole batch (its rows stay
/// in the outbox and are sent again: duplicates are harmless downstream, loss is not).
async fn publish(
    producer: &FutureProducer,
    topics: &Topics,
    events: &[OutboxEvent],
) -> Result<(), KafkaError> {
    let mut pending = Vec::with_capacity(events.len());
    for e in events {
        let topic = match AggregateType::parse(&e.aggregate_type) {
            Some(a) => topics.for_aggregate(a),
            None => topics.dlq(),
        };
        let key = e.aggregate_id.to_string();
        let event_id = e.event_id.to_string();
        let schema_version = e.schema_version.to_string();
        let headers = OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: HEADER_EVENT_TYPE,
                value: Some(e.event_type.as_str()),
            })
            .insert(Header {
                key: HEADER_EVENT_ID,
                value: Some(event_id.as_str()),
            })
            .insert(Header {
                key: HEADER_SCHEMA_VERSION,
                value: Some(schema_version.as_str()),
            });
        let record = FutureRecord::to(&topic)
            .key(&key)
            .payload(&e.value)
            .headers(headers);
        match producer.send_result(record) {
            Ok(f) => pending.push(f),
            Err((err, _)) => return Err(err),
        }
    }
    let mut first_error = None;
    for r in futures::future::join_all(pending).await {
        match r {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(KafkaError::Canceled);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Backlog figures for `/relay/status` and the gauges.
pub struct Backlog {
    pub count: i64,
    pub oldest_age_seconds: f64,
}

pub async fn backlog(pool: &sqlx::PgPool) -> Result<Backlog, sqlx::Error> {
    let row = sqlx::query(
        "SELECT count(*) AS n, COALESCE(EXTRACT(EPOCH FROM (now() - min(created_at)))::float8, 0) AS age FROM outbox",
    )
    .fetch_one(pool)
    .await?;
    let count: i64 = row.try_get("n")?;
    let age: f64 = row.try_get("age")?;
    Ok(Backlog {
        count,
        oldest_age_seconds: if count == 0 { 0.0 } else { age.max(0.0) },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_keep_events_forever_on_rf_minus_one_in_sync_replicas() {
        let none = BTreeMap::new();
        let c = topic_config(3, &none);
        assert_eq!(c["retention.ms"], "-1");
        assert_eq!(c["retention.bytes"], "-1");
        assert_eq!(c["min.insync.replicas"], "2");
        assert_eq!(topic_config(1, &none)["min.insync.replicas"], "1");
        assert_eq!(topic_config(2, &none)["min.insync.replicas"], "1");
        assert_eq!(topic_config(5, &none)["min.insync.replicas"], "4");
        let over = BTreeMap::from([
            ("retention.ms".to_owned(), "604800000".to_owned()),
            ("min.insync.replicas".to_owned(), "3".to_owned()),
        ]);
        let c = topic_config(3, &over);
        assert_eq!(c["retention.ms"], "604800000");
        assert_eq!(c["retention.bytes"], "-1");
        assert_eq!(c["min.insync.replicas"], "3");
    }
}
