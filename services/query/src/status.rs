//! `GET /sync-status`: how far the read side is behind the write side, exactly.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    ctx::Ctx,
    error::QueryError,
    kafka::{self, PartitionLag},
};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectionStatus {
    pub name: String,
    pub generation: u32,
    pub consumer_group: String,
    pub partitions: Vec<PartitionLag>,
    pub lag_messages: i64,
    /// 0 when no partition lags; otherwise an upper bound: the age of the last message this process applied on
    /// a lagging partition (the oldest unapplied message is younger than that), or `null` when unknown here.
    pub lag_seconds: Option<f64>,
}

/// Lag of one consumer group over the three event topics.
pub async fn projection_lag(
    ctx: &Arc<Ctx>,
    name: &str,
    generation: u32,
    group: &str,
) -> Result<ProjectionStatus, QueryError> {
    let inspector = ctx.inspector(group)?;
    let topics = ctx.topics.event_topics();
    let partitions = tokio::task::spawn_blocking(move || kafka::group_lag(&inspector, &topics))
        .await
        .map_err(|e| QueryError::Other(e.to_string()))??;
    let lag_messages = partitions.iter().map(|p| p.lag).sum();
    let now = chrono::Utc::now().timestamp_millis();
    let mut lag_seconds = Some(0.0f64);
    if let Ok(ts) = ctx.last_applied_ts.lock() {
        for p in partitions.iter().filter(|p| p.lag > 0) {
            let age = ts
                .get(&(group.to_owned(), p.topic.clone(), p.partition))
                .map(|t| (now - t).max(0) as f64 / 1000.0);
            lag_seconds = match (lag_seconds, age) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
    }
    let g = generation.to_string();
    for p in &partitions {
        ctx.metrics
            .consumer_lag
            .with_label_values(&[
                g.as_str(),
                p.topic.as_str(),
                p.partition.to_string().as_str(),
            ])
            .set(p.lag);
    }
    Ok(ProjectionStatus {
        name: name.to_owned(),
        generation,
        consumer_group: group.to_owned(),
        partitions,
        lag_messages,
        lag_seconds,
    })
}

/// The relay's state from mutation's `GET /relay/status`; `None` when unreachable or unintelligible.
pub async fn relay_status(ctx: &Arc<Ctx>) -> Result<Value, String> {
    let url = format!(
        "{}/relay/status",
        ctx.config.mutation_url.trim_end_matches('/')
    );
    let res = ctx
        .http
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !res.status().is_success() {
        return Err(format!("{url}: HTTP {}", res.status()));
    }
    let v: Value = res.json().await.map_err(|e| format!("{url}: {e}"))?;
    if v.get("backlog").and_then(Value::as_i64).is_none() {
        return Err(format!("{url}: no backlog in {v}"));
    }
    Ok(v)
}

pub async fn dlq_count(ctx: &Arc<Ctx>) -> Result<i64, QueryError> {
    let inspector = ctx.inspector(&ctx.base_group(0))?;
    let topic = ctx.topics.dlq();
    let n = tokio::task::spawn_blocking(move || kafka::topic_count(&inspector, &topic))
        .await
        .map_err(|e| QueryError::Other(e.to_string()))??;
    ctx.metrics.dlq_count.set(n);
    Ok(n)
}

/// The whole `/sync-status` body. `caughtUp` is true only when the relay reports an empty backlog and every
/// partition of the serving projection has lag 0 (committed offsets = high watermarks: nothing unapplied and
/// nothing in flight, since offsets are committed only after the write). The DLQ count is reported but does not
/// make `caughtUp` false: dead-lettered events are handled (skipped, kept for replay), and the topic keeps them.
///
/// The three figures are read one after the other, downstream last: the relay backlog, then (in
/// [`kafka::group_lag`]) the high watermarks, then the committed offsets. An event whose outbox row is gone when
/// the backlog is read is already in Kafka (the relay deletes a row only after the broker acknowledged it), so it
/// is below the high watermark read afterwards, and lag 0 against that watermark means it was applied. Read in
/// any other order (or concurrently), the relay can publish and delete the row between the watermark read and
/// the backlog read, and `caughtUp` would be true for an unapplied event (docs/READ-SIDE.md, `/sync-status`).
pub async fn sync_status(
    ctx: &Arc<Ctx>,
    serving: (u32, String),
    rebuild: Option<(u32, String)>,
) -> Value {
    let upstream_first = async {
        // The order of these two is the guarantee; the DLQ count is independent of both.
        let relay = relay_status(ctx).await;
        let lag = projection_lag(ctx, "serving", serving.0, &serving.1).await;
        (relay, lag)
    };
    let ((relay, serving_lag), dlq) = tokio::join!(upstream_first, dlq_count(ctx));
    let mut caught_up = true;
    let relay_json = match relay {
        Ok(v) => {
            if v.get("backlog").and_then(Value::as_i64) != Some(0) {
                caught_up = false;
            }
            json!({
                "reachable": true,
                "backlog": v.get("backlog"),
                "oldestAgeSeconds": v.get("oldestAgeSeconds"),
                "leader": v.get("leader"),
                "publishedTotal": v.get("publishedTotal"),
            })
        }
        Err(e) => {
            caught_up = false;
            json!({"reachable": false, "backlog": null, "oldestAgeSeconds": null, "error": e})
        }
    };
    let mut projections = Vec::new();
    match serving_lag {
        Ok(p) => {
            if p.lag_messages != 0 {
                caught_up = false;
            }
            projections.push(json!(p));
        }
        Err(e) => {
            caught_up = false;
            projections
                .push(json!({"name": "serving", "generation": serving.0, "error": e.to_string()}));
        }
    }
    if let Some((g, group)) = rebuild {
        match projection_lag(ctx, "rebuild", g, &group).await {
            Ok(p) => projections.push(json!(p)),
            Err(e) => projections
                .push(json!({"name": "rebuild", "generation": g, "error": e.to_string()})),
        }
    }
    let dlq_json = match dlq {
        Ok(n) => json!({"count": n, "topic": ctx.topics.dlq()}),
        Err(e) => json!({"count": null, "topic": ctx.topics.dlq(), "error": e.to_string()}),
    };
    json!({"caughtUp": caught_up, "servingGeneration": serving.0, "projections": projections,
           "relay": relay_json, "dlq": dlq_json})
}
