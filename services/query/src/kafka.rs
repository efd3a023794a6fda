//! Kafka helpers: client configuration, topic creation, consumer-group lag and the dead-letter topic.

use std::time::Duration;

use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    consumer::{BaseConsumer, Consumer},
    error::RDKafkaErrorCode,
    message::{Headers, OwnedMessage},
};
use serde::Serialize;

use crate::error::QueryError;

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// DLQ headers added to the original message's headers.
pub const H_DLQ_REASON: &str = "dlq-reason";
pub const H_DLQ_TOPIC: &str = "dlq-source-topic";
pub const H_DLQ_PARTITION: &str = "dlq-source-partition";
pub const H_DLQ_OFFSET: &str = "dlq-source-offset";
pub const H_DLQ_GROUP: &str = "dlq-consumer-group";
/// Set on an event re-published by a DLQ replay: `<dlq partition>:<dlq offset>` it came from. Kept when the
/// replayed event is dead-lettered again, so the new entry says which one it repeats.
pub const H_DLQ_REPLAYED_FROM: &str = "dlq-replayed-from";

pub fn client_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("client.id", "cqrs-query");
    c
}

/// Creates the topics that do not exist yet (replication 1: development and tests; the operator owns topics in
/// Kubernetes).
pub async fn ensure_topics(
    bootstrap: &str,
    topics: &[String],
    partitions: i32,
) -> Result<(), QueryError> {
    let admin: AdminClient<_> = client_config(bootstrap).create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(&new, &AdminOptions::new().operation_timeout(Some(TIMEOUT)))
        .await?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => return Err(QueryError::Other(format!("create topic {t}: {e}"))),
        }
    }
    Ok(())
}

/// A consumer used only for metadata, watermarks and a group's committed offsets (it never subscribes).
pub fn inspector(bootstrap: &str, group: &str) -> Result<BaseConsumer, QueryError> {
    Ok(client_config(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?)
}

pub fn partitions_of(c: &BaseConsumer, topic: &str) -> Result<Vec<i32>, QueryError> {
    let md = c.fetch_metadata(Some(topic), TIMEOUT)?;
    let mut ps: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    ps.sort_unstable();
    Ok(ps)
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// Next offset the group will read (the low watermark when it has committed nothing yet).
    pub committed: i64,
    pub low: i64,
    pub high: i64,
    pub lag: i64,
}

/// Lag of the inspector's group on `topics`, from the group's committed offsets (valid for every replica's
/// partitions, not only this process's). Every high watermark is read before the committed offsets, so lag 0
/// means every message below the watermark was applied by the time the offsets were read. Blocking: call from
/// `spawn_blocking`.
pub fn group_lag(c: &BaseConsumer, topics: &[String]) -> Result<Vec<PartitionLag>, QueryError> {
    let mut tpl = TopicPartitionList::new();
    let mut marks = Vec::new();
    for t in topics {
        for p in partitions_of(c, t)? {
            tpl.add_partition(t, p);
            let (low, high) = c.fetch_watermarks(t, p, TIMEOUT)?;
            marks.push((t.clone(), p, low, high));
        }
    }
    let committed = c.committed_offsets(tpl, TIMEOUT)?;
    Ok(marks
        .into_iter()
        .map(|(topic, partition, low, high)| {
            let c = match committed
                .find_partition(&topic, partition)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) => o.max(low),
                _ => low,
            };
            PartitionLag {
                lag: (high - c).max(0),
                topic,
                partition,
                committed: c,
                low,
                high,
            }
        })
        .collect())
}

/// Messages currently held by a topic (sum of high − low watermarks).
pub fn topic_count(c: &BaseConsumer, topic: &str) -> Result<i64, QueryError> {
    let mut n = 0;
    for p in partitions_of(c, topic)? {
        let (low, high) = c.fetch_watermarks(topic, p, TIMEOUT)?;
        n += high - low;
    }
    Ok(n)
}

/// One dead-letter entry as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DlqEntry {
    pub partition: i32,
    pub offset: i64,
    pub reason: Option<String>,
    pub source_topic: Option<String>,
    pub source_partition: Option<i32>,
    pub source_offset: Option<i64>,
    /// `<partition>:<offset>` of the DLQ entry this one repeats (a replayed event that was still poison).
    pub replayed_from: Option<String>,
    pub key: Option<String>,
    /// The original value as text (lossy for non-UTF-8 bytes).
    pub value: Option<String>,
    #[serde(skip)]
    pub raw: Option<OwnedMessage>,
}

pub fn header_str(m: &OwnedMessage, name: &str) -> Option<String> {
    let hs = m.headers()?;
    hs.iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A DLQ entry from the message it is.
pub fn dlq_entry(m: OwnedMessage) -> DlqEntry {
    DlqEntry {
        partition: m.partition(),
        offset: m.offset(),
        reason: header_str(&m, H_DLQ_REASON),
        source_topic: header_str(&m, H_DLQ_TOPIC),
        source_partition: header_str(&m, H_DLQ_PARTITION).and_then(|s| s.parse().ok()),
        source_offset: header_str(&m, H_DLQ_OFFSET).and_then(|s| s.parse().ok()),
        replayed_from: header_str(&m, H_DLQ_REPLAYED_FROM),
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        value: m.payload().map(|v| String::from_utf8_lossy(v).into_owned()),
        raw: Some(m),
    }
}

/// `(partition, low, high)` of every partition of `topic`. Blocking.
pub fn watermarks(c: &BaseConsumer, topic: &str) -> Result<Vec<(i32, i64, i64)>, QueryError> {
    let mut out = Vec::new();
    for p in partitions_of(c, topic)? {
        let (low, high) = c.fetch_watermarks(topic, p, TIMEOUT)?;
        out.push((p, low, high));
    }
    Ok(out)
}

/// Per partition, the offset a read got to (exclusive).
pub type Reached = Vec<(i32, i64)>;

/// Reads the entries of `topic` in `[from, to)` of each given partition, in offset order per partition, at most
/// `max` in total, until `deadline`. Returns the entries (sorted by partition and offset) and, per partition, the
/// offset the read got to (exclusive): everything in `[from, reached)` was read, so a caller can resume there.
/// Blocking.
pub fn read_range(
    bootstrap: &str,
    topic: &str,
    ranges: &[(i32, i64, i64)],
    max: usize,
    deadline: std::time::Instant,
) -> Result<(Vec<DlqEntry>, Reached), QueryError> {
    let mut reached: std::collections::BTreeMap<i32, (i64, i64)> = ranges
        .iter()
        .filter(|(_, from, to)| from < to)
        .map(|(p, from, to)| (*p, (*from, *to)))
        .collect();
    let mut out = Vec::new();
    if reached.is_empty() || max == 0 {
        return Ok((out, ranges.iter().map(|(p, from, _)| (*p, *from)).collect()));
    }
    let c: BaseConsumer = client_config(bootstrap)
        .set("group.id", "cqrs-query-dlq-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for (p, (from, _)) in &reached {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*from))?;
    }
    c.assign(&tpl)?;
    let done =
        |r: &std::collections::BTreeMap<i32, (i64, i64)>| r.values().all(|(at, to)| at >= to);
    while !done(&reached) && out.len() < max && std::time::Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let m = m.detach();
                let Some((at, to)) = reached.get_mut(&m.partition()) else {
                    continue;
                };
                if m.offset() < *at || *at >= *to {
                    continue;
                }
                if m.offset() >= *to {
                    // Beyond the range (offsets may skip over compacted or control records).
                    *at = *to;
                    continue;
                }
                *at = m.offset() + 1;
                out.push(dlq_entry(m));
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    out.sort_by_key(|e| (e.partition, e.offset));
    let mut got = Vec::new();
    for (p, from, _) in ranges {
        got.push((*p, reached.get(p).map(|(at, _)| *at).unwrap_or(*from)));
    }
    Ok((out, got))
}

/// Reads up to `limit` entries of the DLQ from the beginning, without a consumer group. Blocking.
pub fn read_dlq(bootstrap: &str, topic: &str, limit: usize) -> Result<Vec<DlqEntry>, QueryError> {
    let c: BaseConsumer = client_config(bootstrap)
        .set("group.id", "cqrs-query-dlq-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0i64;
    for p in partitions_of(&c, topic)? {
        let (low, high) = c.fetch_watermarks(topic, p, TIMEOUT)?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
            remaining += high - low;
        }
    }
    let mut out = Vec::new();
    if remaining == 0 {
        return Ok(out);
    }
    c.assign(&tpl)?;
    let want = usize::try_from(remaining).unwrap_or(usize::MAX).min(limit);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while out.len() < want && std::time::Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(dlq_entry(m.detach())),
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    out.sort_by_key(|e| (e.partition, e.offset));
    Ok(out)
}
