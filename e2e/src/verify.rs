//! Exactly-once checks of acknowledged commands: in PostgreSQL's `events`, in Kafka (per-aggregate version
//! order), and in the read model (through the gateway).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use cqrs_events::{AggregateType, Topics};
use futures::StreamExt;
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};
use serde::Serialize;
use uuid::Uuid;

use crate::{E2eError, client::Gateway};

/// A command the API acknowledged (2xx): the aggregate it wrote and the version it reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ack {
    pub aggregate: AggregateType,
    pub id: Uuid,
    pub version: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    pub checked: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Kafka only: an aggregate whose events do not appear in strictly increasing version order 1, 2, 3, …
    /// (first occurrences; redeliveries of an already seen version are counted as duplicated).
    pub out_of_order: u64,
    pub examples: Vec<String>,
}

impl Tally {
    fn note(&mut self, s: String) {
        if self.examples.len() < 10 {
            self.examples.push(s);
        }
    }
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0
    }
}

/// Every acknowledged (aggregate id, version) exists exactly once in `events`.
pub async fn check_postgres(pg_url: &str, acks: &[Ack]) -> Result<Tally, E2eError> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(pg_url)
        .await
        .map_err(|e| E2eError::Infra(format!("postgres: {e}")))?;
    let rows: Vec<(Uuid, i64, String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, version, aggregate_type, count(*) FROM events GROUP BY aggregate_id, version, aggregate_type",
    )
    .fetch_all(&mut conn)
    .await
    .map_err(|e| E2eError::Infra(format!("postgres: {e}")))?;
    let _ = conn.close().await;
    let mut have: HashMap<(Uuid, u64), (String, i64)> = HashMap::with_capacity(rows.len());
    for (id, v, t, n) in rows {
        have.insert((id, u64::try_from(v).unwrap_or(0)), (t, n));
    }
    let mut t = Tally::default();
    for a in acks {
        t.checked += 1;
        match have.get(&(a.id, a.version)) {
            None => {
                t.lost += 1;
                t.note(format!(
                    "postgres: {} {} v{} missing",
                    a.aggregate, a.id, a.version
                ));
            }
            Some((ty, n)) => {
                if *n > 1 {
                    t.duplicated += 1;
                    t.note(format!(
                        "postgres: {} {} v{} ×{n}",
                        a.aggregate, a.id, a.version
                    ));
                }
                if ty != a.aggregate.as_str() {
                    t.lost += 1;
                    t.note(format!("postgres: {} v{} has type {ty}", a.id, a.version));
                }
            }
        }
    }
    Ok(t)
}

/// All events of the three topics, as (aggregate id, version) in partition order per aggregate.
pub fn read_topics(
    bootstrap: &str,
    prefix: &str,
    timeout: Duration,
) -> Result<HashMap<Uuid, Vec<u64>>, E2eError> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("cqrs-e2e-verify-{}", Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| E2eError::Infra(format!("kafka consumer: {e}")))?;
    let topics = Topics::new(prefix);
    let mut tpl = TopicPartitionList::new();
    let mut remaining: HashMap<(String, i32), i64> = HashMap::new();
    for topic in topics.event_topics() {
        let md = c
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .map_err(|e| E2eError::Infra(format!("kafka metadata {topic}: {e}")))?;
        for t in md.topics() {
            for p in t.partitions() {
                let (low, high) = c
                    .fetch_watermarks(&topic, p.id(), Duration::from_secs(10))
                    .map_err(|e| E2eError::Infra(format!("kafka watermarks: {e}")))?;
                if high > low {
                    remaining.insert((topic.clone(), p.id()), high);
                    tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)
                        .map_err(|e| E2eError::Infra(e.to_string()))?;
                }
            }
        }
    }
    let mut out: HashMap<Uuid, Vec<u64>> = HashMap::new();
    if remaining.is_empty() {
        return Ok(out);
    }
    c.assign(&tpl)
        .map_err(|e| E2eError::Infra(format!("kafka assign: {e}")))?;
    let deadline = Instant::now() + timeout;
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            return Err(E2eError::Timeout(format!(
                "reading topics: {} partitions not read to the end",
                remaining.len()
            )));
        }
        let Some(msg) = c.poll(Duration::from_millis(500)) else {
            continue;
        };
        let msg = msg.map_err(|e| E2eError::Infra(format!("kafka: {e}")))?;
        let key = (msg.topic().to_owned(), msg.partition());
        if let Some(payload) = msg.payload() {
            match cqrs_events::decode(payload) {
                Ok(env) => out.entry(env.aggregate_id).or_default().push(env.version),
                Err(e) => {
                    return Err(E2eError::Check(format!(
                        "undecodable event at {}/{}@{}: {e}",
                        key.0,
                        key.1,
                        msg.offset()
                    )));
                }
            }
        }
        if let Some(high) = remaining.get(&key)
            && msg.offset() + 1 >= *high
        {
            remaining.remove(&key);
        }
    }
    Ok(out)
}

/// Every acknowledged event is in Kafka once, and each aggregate's events come in version order.
pub fn check_kafka(bootstrap: &str, prefix: &str, acks: &[Ack]) -> Result<Tally, E2eError> {
    let seen = read_topics(bootstrap, prefix, Duration::from_secs(120))?;
    let mut t = Tally::default();
    // Order: first occurrences must be 1, 2, 3, … in partition order.
    let mut counts: HashMap<(Uuid, u64), u64> = HashMap::new();
    for (id, versions) in &seen {
        let mut next = 1u64;
        for v in versions {
            *counts.entry((*id, *v)).or_default() += 1;
            if *v == next {
                next += 1;
            } else if *v > next {
                t.out_of_order += 1;
                t.note(format!(
                    "kafka: {id}: v{v} before v{next} (sequence {versions:?})"
                ));
                next = v + 1;
            }
        }
    }
    for a in acks {
        t.checked += 1;
        match counts.get(&(a.id, a.version)).copied().unwrap_or(0) {
            0 => {
                t.lost += 1;
                t.note(format!(
                    "kafka: {} {} v{} missing",
                    a.aggregate, a.id, a.version
                ));
            }
            1 => {}
            n => {
                t.duplicated += 1;
                t.note(format!(
                    "kafka: {} {} v{} ×{n}",
                    a.aggregate, a.id, a.version
                ));
            }
        }
    }
    Ok(t)
}

/// Each acknowledged aggregate is readable at (at least) its highest acknowledged version, exactly at the
/// version PostgreSQL holds for it, and each list has as many records as PostgreSQL has live aggregates.
pub async fn check_read_model(
    gw: &Gateway,
    pg_url: &str,
    acks: &[Ack],
    concurrency: usize,
) -> Result<Tally, E2eError> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(pg_url)
        .await
        .map_err(|e| E2eError::Infra(format!("postgres: {e}")))?;
    let rows: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT aggregate_id, max(version) FROM events GROUP BY aggregate_id")
            .fetch_all(&mut conn)
            .await
            .map_err(|e| E2eError::Infra(format!("postgres: {e}")))?;
    let pg_version: HashMap<Uuid, u64> = rows
        .into_iter()
        .map(|(id, v)| (id, u64::try_from(v).unwrap_or(0)))
        .collect();
    let live: Vec<(String, i64)> = sqlx::query_as(
        "SELECT 'user', count(*) FROM users WHERE deleted_at IS NULL
         UNION ALL SELECT 'product', count(*) FROM products WHERE deleted_at IS NULL
         UNION ALL SELECT 'order', count(*) FROM orders",
    )
    .fetch_all(&mut conn)
    .await
    .map_err(|e| E2eError::Infra(format!("postgres: {e}")))?;
    let _ = conn.close().await;

    let mut latest: HashMap<Uuid, (AggregateType, u64)> = HashMap::new();
    for a in acks {
        let e = latest.entry(a.id).or_insert((a.aggregate, 0));
        e.1 = e.1.max(a.version);
    }
    let results: Vec<Result<(), String>> = futures::stream::iter(latest)
        .map(|(id, (agg, v))| {
            let want = pg_version.get(&id).copied().unwrap_or(0);
            async move {
                let path = format!("/{}/{id}", agg.as_str());
                for _ in 0..5 {
                    match gw.get_waiting(&path, Some(want.max(v)), Some(8)).await {
                        Ok(r) if r.ok() => {
                            let got = r.version().unwrap_or(0);
                            return if got == want {
                                Ok(())
                            } else {
                                Err(format!(
                                    "read model: {path} at v{got}, postgres has v{want}"
                                ))
                            };
                        }
                        Ok(r) if r.status.as_u16() == 503 => continue,
                        Ok(r) => {
                            return Err(format!("read model: {path}: {} {}", r.status, r.text));
                        }
                        Err(e) => return Err(format!("read model: {path}: {e}")),
                    }
                }
                Err(format!("read model: {path} never reached v{want}"))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut t = Tally::default();
    for r in results {
        t.checked += 1;
        if let Err(e) = r {
            t.lost += 1;
            t.note(e);
        }
    }
    // Whole-list counts also catch records of commands whose answer never arrived (committed, unacknowledged).
    // A missing record is counted once: as the larger of the per-record and the list shortfall.
    let mut short = 0u64;
    for (kind, n) in live {
        let listed = gw.count(&format!("/{kind}")).await?;
        let n = u64::try_from(n).unwrap_or(0);
        if listed > n {
            t.duplicated += listed - n;
            t.note(format!(
                "read model lists {listed} {kind}s, postgres has {n}"
            ));
        } else if listed < n {
            short += n - listed;
            t.note(format!(
                "read model lists {listed} {kind}s, postgres has {n}"
            ));
        }
    }
    t.lost = t.lost.max(short);
    Ok(t)
}

/// The three exactly-once checks of one run's acknowledged commands.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExactlyOnce {
    pub postgres: Tally,
    pub kafka: Tally,
    pub read_model: Tally,
}

impl ExactlyOnce {
    pub fn lost(&self) -> u64 {
        self.postgres.lost + self.kafka.lost + self.read_model.lost
    }
    /// Commands applied more than once: in PostgreSQL or in the read model.
    pub fn duplicated(&self) -> u64 {
        self.postgres.duplicated + self.read_model.duplicated
    }
    /// Events Kafka holds more than once. The relay is at-least-once by design (a relay killed between the
    /// broker's ack and deleting its outbox rows publishes them again; the read model's version guard skips
    /// them), so these are reported separately from `duplicated`.
    pub fn kafka_redelivered(&self) -> u64 {
        self.kafka.duplicated
    }
    pub fn passed(&self) -> bool {
        self.postgres.clean()
            && self.read_model.clean()
            && self.kafka.lost == 0
            && self.kafka.out_of_order == 0
    }
    /// One line per check, with its examples.
    pub fn print(&self) {
        for (name, t) in [
            ("postgres", &self.postgres),
            ("kafka", &self.kafka),
            ("read model", &self.read_model),
        ] {
            println!(
                "  {name:<10}: checked {:>6}, lost {}, duplicated {}, out of order {}",
                t.checked, t.lost, t.duplicated, t.out_of_order
            );
            for e in &t.examples {
                println!("      {e}");
            }
        }
    }
}

/// [`check_postgres`], [`check_kafka`] and [`check_read_model`] of `acks` (call once the read model caught up).
pub async fn check_exactly_once(
    gw: &Gateway,
    pg_url: &str,
    kafka_bootstrap: &str,
    topic_prefix: &str,
    acks: &[Ack],
) -> Result<ExactlyOnce, E2eError> {
    let postgres = check_postgres(pg_url, acks).await?;
    let (bootstrap, prefix, acks2) = (
        kafka_bootstrap.to_owned(),
        topic_prefix.to_owned(),
        acks.to_vec(),
    );
    let kafka = tokio::task::spawn_blocking(move || check_kafka(&bootstrap, &prefix, &acks2))
        .await
        .map_err(|e| E2eError::Infra(e.to_string()))??;
    let read_model = check_read_model(gw, pg_url, acks, 16).await?;
    Ok(ExactlyOnce {
        postgres,
        kafka,
        read_model,
    })
}
