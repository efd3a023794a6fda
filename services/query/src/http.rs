//! HTTP routes of the query service.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{MatchedPath, Path, Query, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use cqrs_common::Problem;
use cqrs_events::AggregateType;
use futures::{Stream, StreamExt};
use mongodb::bson::Document;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    ctx::{Ctx, Notice},
    error::QueryError,
    kafka,
    model::{self, doc_version},
    rebuild::{RebuildError, Supervisor},
    status,
};

pub const MIN_VERSION_HEADER: &str = "x-min-version";

#[derive(Clone)]
pub struct AppState {
    pub ctx: Arc<Ctx>,
    pub sup: Arc<Supervisor>,
    /// Cancelled at shutdown so that open event streams end and the server can drain.
    pub shutdown: CancellationToken,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/user", get(list_users))
        .route("/product", get(list_products))
        .route("/order", get(list_orders))
        .route("/user/{id}", get(get_user))
        .route("/product/{id}", get(get_product))
        .route("/order/{id}", get(get_order))
        .route("/user/{id}/stream", get(stream_user))
        .route("/product/{id}/stream", get(stream_product))
        .route("/order/{id}/stream", get(stream_order))
        .route("/stream", get(stream_type))
        .route("/sync-status", get(sync_status))
        .route("/admin/dlq", get(dlq_list))
        .route("/admin/dlq/replay", post(dlq_replay))
        .route("/admin/projections", get(projections))
        .route(
            "/admin/projections/rebuild",
            post(rebuild_start).delete(rebuild_cancel),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Read latency by route template and status.
async fn observe(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default();
    let started = std::time::Instant::now();
    let res = next.run(req).await;
    st.ctx
        .metrics
        .read_seconds
        .with_label_values(&[route.as_str(), res.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    res
}

fn parse_id(entity: AggregateType, raw: &str) -> Result<String, Box<Problem>> {
    // Ids are UUIDs; anything else (including `{"$gt":""}`-style injection attempts) never reaches a filter.
    Uuid::try_parse(raw)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| {
            Box::new(Problem::bad_request(format!(
                "{entity} id must be a UUID, got {raw:?}"
            )))
        })
}

fn entity_response(entity: AggregateType, id: &str, doc: Option<Document>) -> Response {
    match doc.as_ref().and_then(model::to_json) {
        Some(body) => {
            let version = doc.as_ref().map(doc_version).unwrap_or(0);
            let mut res = Json(body).into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
                res.headers_mut().insert(header::ETAG, v);
            }
            res
        }
        None => Problem::not_found(format!("no {entity} with id {id}")).into_response(),
    }
}

/// `Prefer: wait=<seconds>` (RFC 7240), capped by the configured maximum.
fn wait_bound(ctx: &Ctx, headers: &HeaderMap) -> Duration {
    let max = Duration::from_millis(ctx.config.min_version_wait_max_ms);
    let default = Duration::from_millis(ctx.config.min_version_wait_ms).min(max);
    headers
        .get_all(header::HeaderName::from_static("prefer"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().strip_prefix("wait="))
        .filter_map(|s| s.trim().parse::<f64>().ok())
        .find(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s).min(max))
        .unwrap_or(default)
}

async fn get_entity(
    st: AppState,
    entity: AggregateType,
    raw: String,
    headers: HeaderMap,
) -> Response {
    let id = match parse_id(entity, &raw) {
        Ok(id) => id,
        Err(p) => return p.into_response(),
    };
    let min = match headers
        .get(MIN_VERSION_HEADER)
        .map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()))
    {
        None => None,
        Some(Some(n)) => Some(n),
        Some(None) => {
            return Problem::bad_request("X-Min-Version must be a non-negative integer")
                .into_response();
        }
    };
    let Some(min) = min else {
        return match st.ctx.store.get(entity, st.ctx.serving(), &id).await {
            Ok(doc) => entity_response(entity, &id, doc),
            Err(e) => e.into_response(),
        };
    };
    let bound = wait_bound(&st.ctx, &headers);
    let deadline = tokio::time::Instant::now() + bound;
    let first = Duration::from_millis(st.ctx.config.min_version_recheck_ms.max(1));
    let mut recheck = first;
    loop {
        // Registered before reading, so that a write between the read and the wait still wakes this request.
        let mut waiting = st.ctx.waiters.register(entity, &id, min);
        st.ctx.metrics.min_version_reads.inc();
        let doc = match st.ctx.store.get(entity, st.ctx.serving(), &id).await {
            Ok(d) => d,
            Err(e) => return e.into_response(),
        };
        if doc.as_ref().map(doc_version).unwrap_or(0) >= min {
            return entity_response(entity, &id, doc);
        }
        // Woken when this replica applies (or, with change streams, sees) the version, or when every waiter must
        // re-read (generation switch, change-stream reset). The fallback re-read, backing off to 8× the first,
        // covers versions applied by another replica, which notifies only its own waiters.
        let until = (tokio::time::Instant::now() + recheck).min(deadline);
        tokio::select! {
            _ = &mut waiting.woken => {}
            _ = tokio::time::sleep_until(until) => {
                if until >= deadline {
                    return Problem::unavailable(
                        format!("{entity} {id} did not reach version {min} within {bound:?}; retry later"),
                        1,
                    )
                    .into_response();
                }
                recheck = (recheck * 2).min(first * 8);
            }
            _ = st.shutdown.cancelled() => {
                return Problem::unavailable("shutting down", 1).into_response();
            }
        }
    }
}

async fn get_user(State(st): State<AppState>, Path(id): Path<String>, h: HeaderMap) -> Response {
    get_entity(st, AggregateType::User, id, h).await
}
async fn get_product(State(st): State<AppState>, Path(id): Path<String>, h: HeaderMap) -> Response {
    get_entity(st, AggregateType::Product, id, h).await
}
async fn get_order(State(st): State<AppState>, Path(id): Path<String>, h: HeaderMap) -> Response {
    get_entity(st, AggregateType::Order, id, h).await
}

#[derive(Debug, Deserialize)]
pub struct ListParams {
    limit: Option<String>,
    cursor: Option<String>,
}

fn encode_cursor(id: &str) -> String {
    id.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(c: &str) -> Option<String> {
    if !c.len().is_multiple_of(2) || c.len() > 128 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..c.len())
        .step_by(2)
        .map(|i| c.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    let s = String::from_utf8(bytes?).ok()?;
    Uuid::try_parse(&s).ok().map(|u| u.hyphenated().to_string())
}

type Q<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

fn query_params<T>(q: Q<T>) -> Result<T, Box<Response>> {
    q.map(|Query(t)| t).map_err(|e| {
        Box::new(Problem::bad_request(format!("invalid query string: {e}")).into_response())
    })
}

async fn list(st: AppState, entity: AggregateType, p: Q<ListParams>) -> Response {
    let p = match query_params(p) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let limit = match p.limit.as_deref() {
        None | Some("") => st.ctx.config.page_default,
        Some(s) => match s.parse::<u32>() {
            Ok(n) if n >= 1 => n.min(st.ctx.config.page_max),
            _ => {
                return Problem::bad_request(format!(
                    "limit must be an integer from 1 to {} (larger values are capped)",
                    st.ctx.config.page_max
                ))
                .into_response();
            }
        },
    };
    let after = match p.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => match decode_cursor(c) {
            Some(a) => Some(a),
            None => {
                return Problem::bad_request("cursor is not one this service issued")
                    .into_response();
            }
        },
    };
    let docs = match st
        .ctx
        .store
        .list(entity, st.ctx.serving(), after.as_deref(), limit)
        .await
    {
        Ok(d) => d,
        Err(e) => return e.into_response(),
    };
    let next = if docs.len() == limit as usize {
        docs.last()
            .and_then(|d| d.get_str("_id").ok())
            .map(encode_cursor)
    } else {
        None
    };
    let items: Vec<Value> = docs.iter().filter_map(model::to_json).collect();
    Json(json!({"items": items, "nextCursor": next, "limit": limit})).into_response()
}

async fn list_users(State(st): State<AppState>, p: Q<ListParams>) -> Response {
    list(st, AggregateType::User, p).await
}
async fn list_products(State(st): State<AppState>, p: Q<ListParams>) -> Response {
    list(st, AggregateType::Product, p).await
}
async fn list_orders(State(st): State<AppState>, p: Q<ListParams>) -> Response {
    list(st, AggregateType::Order, p).await
}

fn change_event(c: &crate::ctx::Change) -> Event {
    let data = json!({
        "type": c.entity.as_str(), "id": c.id, "version": c.version, "deleted": c.doc.is_none(), "doc": c.doc,
    });
    Event::default()
        .event("change")
        .id(c.version.to_string())
        .data(data.to_string())
}

/// Read-model changes of this replica's apply loop (each replica streams what it applies itself).
fn changes(
    st: &AppState,
    filter: impl Fn(&crate::ctx::Change) -> bool + Send + 'static,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let shutdown = st.shutdown.clone();
    BroadcastStream::new(st.ctx.notices.subscribe())
        .filter_map(move |n| {
            let ev = match n {
                Ok(Notice::Changed(c)) if filter(&c) => Some(change_event(&c)),
                Ok(Notice::Changed(_)) => None,
                // Changes were missed: the client re-reads (a GET, or a new stream for a snapshot).
                Ok(Notice::Reset(reason)) => Some(
                    Event::default()
                        .event("reset")
                        .data(json!({"reason": reason.as_str()}).to_string()),
                ),
                Ok(Notice::Switched(g)) => Some(
                    Event::default()
                        .event("generation")
                        .data(json!({"serving": g}).to_string()),
                ),
                Err(BroadcastStreamRecvError::Lagged(n)) => Some(
                    Event::default()
                        .event("lagged")
                        .data(json!({"missed": n}).to_string()),
                ),
            };
            std::future::ready(ev.map(Ok))
        })
        .take_until(shutdown.cancelled_owned())
}

async fn stream_entity(st: AppState, entity: AggregateType, raw: String) -> Response {
    let id = match parse_id(entity, &raw) {
        Ok(id) => id,
        Err(p) => return p.into_response(),
    };
    let live = {
        let id = id.clone();
        changes(&st, move |c| c.entity == entity && c.id == id)
    };
    // The current state first, so a client needs no separate GET.
    let snapshot = match st.ctx.store.get(entity, st.ctx.serving(), &id).await {
        Ok(d) => d,
        Err(e) => return e.into_response(),
    };
    let first = Event::default().event("snapshot").data(
        json!({"type": entity.as_str(), "id": id,
                   "version": snapshot.as_ref().map(doc_version).unwrap_or(0),
                   "doc": snapshot.as_ref().and_then(model::to_json)})
        .to_string(),
    );
    let stream = futures::stream::once(async move { Ok::<_, Infallible>(first) }).chain(live);
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn stream_user(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    stream_entity(st, AggregateType::User, id).await
}
async fn stream_product(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    stream_entity(st, AggregateType::Product, id).await
}
async fn stream_order(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    stream_entity(st, AggregateType::Order, id).await
}

#[derive(Debug, Deserialize)]
pub struct StreamParams {
    #[serde(rename = "type")]
    kind: Option<String>,
}

async fn stream_type(State(st): State<AppState>, p: Q<StreamParams>) -> Response {
    let p = match query_params(p) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let Some(entity) = p.kind.as_deref().and_then(AggregateType::parse) else {
        return Problem::bad_request("type must be one of user, product, order").into_response();
    };
    Sse::new(changes(&st, move |c| c.entity == entity))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn sync_status(State(st): State<AppState>) -> Response {
    match st.sup.groups().await {
        Ok((serving, rebuild)) => {
            let generation = serving.0;
            let mut body = status::sync_status(&st.ctx, serving, rebuild).await;
            // A switch during the poll: the lag above is the old generation's, not the one reads now use.
            if st.sup.groups().await.map(|g| g.0.0).ok() != Some(generation)
                || st.ctx.serving() != generation
            {
                body["caughtUp"] = Value::Bool(false);
            }
            Json(body).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub struct DlqParams {
    limit: Option<String>,
}

async fn dlq_list(State(st): State<AppState>, p: Q<DlqParams>) -> Response {
    let p = match query_params(p) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let limit = match p.limit.as_deref().map(str::parse::<usize>) {
        None => 100,
        Some(Ok(n)) if (1..=10_000).contains(&n) => n,
        Some(_) => {
            return Problem::bad_request("limit must be an integer from 1 to 10000")
                .into_response();
        }
    };
    let (bootstrap, topic) = (st.ctx.config.kafka_bootstrap.clone(), st.ctx.topics.dlq());
    let (count, entries) = match tokio::task::spawn_blocking(move || {
        let c = kafka::inspector(&bootstrap, "cqrs-query-dlq-reader")?;
        Ok::<_, QueryError>((
            kafka::topic_count(&c, &topic)?,
            kafka::read_dlq(&bootstrap, &topic, limit)?,
        ))
    })
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return e.into_response(),
        Err(e) => return QueryError::Other(e.to_string()).into_response(),
    };
    Json(json!({"count": count, "items": entries})).into_response()
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// Entries to replay, by DLQ partition and offset; all entries not replayed yet when absent.
    entries: Option<Vec<ReplayEntry>>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReplayEntry {
    partition: i32,
    offset: i64,
}

#[derive(Debug, Deserialize)]
pub struct ReplayParams {
    max: Option<String>,
}

/// Re-publishes DLQ entries to their source topic with their original key, value and headers (e.g. after a
/// fix, or once a missing predecessor exists). Without `entries`, every entry after the durable replay cursor
/// (each entry once; see [`crate::dlq`]). `?max=n` bounds the entries of one request. 200 when the request's
/// range is done (`complete: true`); 202 with `complete: false` and `counts.remaining` when it stopped at `max`
/// or at the time budget (call again to continue); 503 when another replay is running.
async fn dlq_replay(
    State(st): State<AppState>,
    p: Q<ReplayParams>,
    body: Result<Option<Json<ReplayBody>>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let p = match query_params(p) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let max = match p.max.as_deref().map(str::parse::<usize>) {
        None => usize::MAX,
        Some(Ok(n)) if n >= 1 => n,
        Some(_) => return Problem::bad_request("max must be a positive integer").into_response(),
    };
    let body = match body {
        Ok(b) => b.map(|Json(b)| b).unwrap_or_default(),
        Err(e) => {
            return Problem::bad_request(format!(
                "expected {{\"entries\": [{{\"partition\": p, \"offset\": o}}, ...]}} or no body: {e}"
            ))
            .into_response();
        }
    };
    let result = match &body.entries {
        None => crate::dlq::replay_all(&st.ctx, max).await,
        Some(want) => {
            let wanted: Vec<(i32, i64)> = want.iter().map(|e| (e.partition, e.offset)).collect();
            crate::dlq::replay_entries(&st.ctx, &wanted).await
        }
    };
    match result {
        Ok(r) => {
            let status = if r.complete {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            (status, Json(r.to_json())).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn projections(State(st): State<AppState>) -> Response {
    match st.sup.status().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub struct RebuildBody {
    generation: u32,
}

async fn rebuild_start(
    State(st): State<AppState>,
    body: Result<Json<RebuildBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(RebuildBody { generation }) = match body {
        Ok(b) => b,
        Err(e) => {
            return Problem::bad_request(format!(
                "expected {{\"generation\": <positive integer>}}: {e}"
            ))
            .into_response();
        }
    };
    match st.sup.start_rebuild(generation).await {
        Ok(v) => (StatusCode::ACCEPTED, Json(v)).into_response(),
        Err(RebuildError::Invalid) => {
            Problem::unprocessable("generation must be at least 1", Vec::new()).into_response()
        }
        Err(e @ RebuildError::Older { .. }) => {
            Problem::new(StatusCode::CONFLICT, "generation-conflict", e.to_string()).into_response()
        }
        Err(RebuildError::Query(e)) => e.into_response(),
    }
}

async fn rebuild_cancel(State(st): State<AppState>) -> Response {
    match st.sup.cancel_rebuild().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
