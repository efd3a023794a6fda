//! HTTP: the seed's routes, problem+json errors for every bad input, ETag / If-Match, Idempotency-Key.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use axum::{
    Json, Router,
    body::Bytes,
    extract::{FromRequest, Path, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, patch, post},
};
use cqrs_common::{FieldError, Problem};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    commands::{Command, CommandError, Meta},
    domain::{
        Email, Fields, MAX_DESCRIPTION_CHARS, MAX_NAME_CHARS, MAX_QUANTITY, Password, PriceCents,
    },
    group::{GroupCommit, IdemRequest, Reply, stored_response},
    metrics::Metrics,
    relay::{RelayShared, backlog},
};

/// argon2id on a few threads of its own: hashing is CPU- and memory-heavy (19 MiB per hash at the default cost),
/// so at most one hash per core runs at a time, queued in arrival order.
///
/// Why not the blocking pool: glibc keeps a freed 19 MiB block in the malloc arena of the thread that freed it,
/// and the blocking pool's threads come and go and spread over up to 8 arenas per core. A pod OOM-killed at
/// 512 MiB after a few hundred concurrent sign-ups (8 arenas × 57 MiB) is what the first run on a real cluster
/// showed. A fixed set of threads reuses its own blocks, so memory stays at about `threads × 3 × m`.
#[derive(Clone)]
pub struct Hasher {
    jobs: std::sync::mpsc::Sender<HashJob>,
}

type HashJob = Box<dyn FnOnce(&Argon2<'static>) + Send>;

impl Hasher {
    pub fn new(memory_kib: u32, iterations: u32) -> Result<Self, argon2::Error> {
        let params = Params::new(memory_kib, iterations, 1, None)?;
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let (jobs, queue) = std::sync::mpsc::channel::<HashJob>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for i in 0..threads {
            let queue = queue.clone();
            let argon2 = Self::argon2(params.clone());
            // Detached: the threads end when the last Hasher (the sending side) is dropped.
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    loop {
                        let job = match queue.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&argon2),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a password hashing thread");
            }
        }
        Ok(Self { jobs })
    }

    fn argon2(params: Params) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
    }

    /// Runs `f` on a hashing thread and waits for its answer (`None` when the threads are gone).
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Argon2<'static>) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: HashJob = Box::new(move |argon2| {
            let _ = tx.send(f(argon2));
        });
        self.jobs.send(job).ok()?;
        rx.await.ok()
    }

    pub async fn hash(&self, password: Password) -> Result<String, CommandError> {
        self.run(move |argon2| {
            argon2
                .hash_password(password.expose())
                .map(|h| h.to_string())
                .map_err(|_| CommandError::Internal("password hashing failed".into()))
        })
        .await
        .unwrap_or_else(|| Err(CommandError::Unavailable("shutting down".into())))
    }

    pub async fn verify(&self, password: Password, phc: String) -> bool {
        self.run(move |argon2| {
            argon2::password_hash::phc::PasswordHash::new(&phc)
                .map(|h| argon2.verify_password(password.expose(), &h).is_ok())
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false)
    }
}

pub struct Inner {
    pub pool: PgPool,
    pub group: GroupCommit,
    pub metrics: Metrics,
    pub hasher: Hasher,
    pub relay: Arc<RelayShared>,
    pub max_order_items: usize,
    pub idempotency_ttl: Duration,
}

pub type AppState = Arc<Inner>;

pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/user", post(create_user))
        .route("/user/{id}", patch(update_user).delete(delete_user))
        .route("/product", post(create_product))
        .route(
            "/product/{id}",
            patch(update_product).delete(delete_product),
        )
        .route("/order", post(create_order))
        .route("/order/{id}/cancel", post(cancel_order))
        .route("/relay/status", get(relay_status))
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "method not allowed on this route",
            )
        })
        .fallback(|| async { Problem::not_found("no such route") })
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// A JSON object body. Our own extractor so every rejection is problem+json: 415 for another content type,
/// 413 for a body over the limit, 400 for malformed JSON, 422 for JSON that is not an object.
pub struct JsonBody {
    pub object: Map<String, Value>,
    pub raw: Bytes,
}

fn is_json_content_type(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json_ct = is_json_content_type(req.headers());
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body-too-large",
                    "the request body is too large",
                )
            } else {
                Problem::bad_request("the request body could not be read")
            }
        })?;
        if !json_ct {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "send the body as Content-Type: application/json",
            ));
        }
        Self::parse(bytes)
    }
}

impl JsonBody {
    fn parse(raw: Bytes) -> Result<Self, Problem> {
        let value: Value = serde_json::from_slice(&raw).map_err(|e| {
            // serde_json's syntax errors name a line and column, never the body's content.
            Problem::bad_request(format!("malformed JSON: {e}"))
        })?;
        match value {
            Value::Object(object) => Ok(Self { object, raw }),
            _ => Err(Problem::unprocessable(
                "the body must be a JSON object",
                vec![FieldError {
                    field: "".into(),
                    message: "must be an object".into(),
                }],
            )),
        }
    }
}

/// `If-Match: "<n>"` (also `W/"<n>"` or a bare number; `*` means any version).
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, Problem> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let bad = || Problem::bad_request("If-Match must be a version ETag such as \"3\"");
    let s = v.to_str().map_err(|_| bad())?.trim();
    if s == "*" {
        return Ok(None);
    }
    let s = s.strip_prefix("W/").unwrap_or(s);
    let s = s
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s);
    s.parse::<i64>()
        .ok()
        .filter(|n| *n >= 1)
        .map(Some)
        .ok_or_else(bad)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= 255 && s.chars().all(|c| c.is_ascii_graphic()))
        .ok_or_else(|| {
            Problem::bad_request("Idempotency-Key must be 1–255 visible ASCII characters")
        })?;
    Ok(Some(s.to_owned()))
}

fn meta(headers: &HeaderMap) -> Meta {
    let causation_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| s.len() <= 200)
        .map(str::to_owned);
    // traceparent: version-traceid-parentid-flags
    let trace_id = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.split('-').nth(1))
        .filter(|t| t.len() == 32 && t.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_owned);
    Meta {
        trace_id,
        causation_id,
    }
}

fn parse_id(s: &str, entity: &'static str) -> Result<Uuid, Problem> {
    Uuid::parse_str(s)
        .map_err(|_| Problem::not_found(format!("{entity} {s:?} not found (not a UUID)")))
}

/// Recursively key-sorted JSON: the same body with keys in another order hashes the same.
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(x) = m.get(k) {
                    canonical(x, out);
                }
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// sha256 of method, path and body (every command's: a bodiless one hashes as `{}`). The password is left out
/// (a fast hash of it must never be stored); a replayed user creation instead verifies the password against
/// the user's argon2id hash.
fn request_hash(method: &Method, path: &str, body: &Map<String, Value>) -> String {
    let mut text = format!("{method} {path}\n");
    let mut b = body.clone();
    b.remove("password");
    canonical(&Value::Object(b), &mut text);
    hex(&Sha256::digest(text.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The verified caller the gateway forwards after checking the JWT (it always strips a client-sent one).
const AUTH_SUBJECT: &str = "x-auth-subject";

/// The stored form of an `Idempotency-Key`: scoped by the caller, so one caller can never replay (or block)
/// another's request by reusing its key. `<sha256 of the subject>:<key>`; without a subject (auth disabled,
/// or a direct call inside the cluster) the scope is the empty subject's.
fn scoped_key(headers: &HeaderMap, key: &str) -> String {
    let subject = headers
        .get(AUTH_SUBJECT)
        .map_or(&[][..], HeaderValue::as_bytes);
    format!("{}:{key}", hex(&Sha256::digest(subject)))
}

fn entity_response(status: StatusCode, body: &Value, replayed: bool) -> Response {
    let mut res = (status, Json(body)).into_response();
    if let Some(v) = body.get("version").and_then(Value::as_i64)
        && let Ok(h) = HeaderValue::from_str(&format!("\"{v}\""))
    {
        res.headers_mut().insert(header::ETAG, h);
    }
    if replayed {
        res.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    res
}

/// Records the command's metrics around its whole handling.
struct Timer<'a> {
    metrics: &'a Metrics,
    kind: &'static str,
    started: Instant,
}

impl<'a> Timer<'a> {
    fn new(metrics: &'a Metrics, kind: &'static str) -> Self {
        Self {
            metrics,
            kind,
            started: Instant::now(),
        }
    }
    fn finish(self, outcome: &str, res: Response) -> Response {
        self.metrics
            .commands
            .with_label_values(&[self.kind, outcome])
            .inc();
        self.metrics
            .command_seconds
            .with_label_values(&[self.kind])
            .observe(self.started.elapsed().as_secs_f64());
        res
    }
    fn fail(self, p: Problem) -> Response {
        let outcome = match p.status {
            400 | 413 | 415 => "malformed",
            404 => "not_found",
            412 => "version_mismatch",
            422 => "invalid",
            _ => "error",
        };
        self.finish(outcome, p.into_response())
    }
}

/// What to do with an idempotent request once its key is known to be taken.
async fn replay(
    s: &Inner,
    key: &str,
    hash: &str,
    password: Option<Password>,
) -> Result<Option<Response>, CommandError> {
    let stored = stored_response(&s.pool, key, s.idempotency_ttl)
        .await
        .map_err(|_| CommandError::Unavailable("database unavailable".into()))?;
    let Some(stored) = stored else {
        return Ok(None);
    };
    if stored.request_hash != hash {
        return Err(CommandError::IdempotencyMismatch);
    }
    if let Some(password) = password {
        // The hash left the password out; check it against the created user's argon2id hash.
        let id = stored
            .body
            .get("id")
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok());
        let phc: Option<String> = match id {
            Some(id) => sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
                .bind(id)
                .fetch_optional(&s.pool)
                .await
                .map_err(|_| CommandError::Unavailable("database unavailable".into()))?,
            None => None,
        };
        let same = match phc {
            Some(phc) => s.hasher.verify(password, phc).await,
            None => false,
        };
        if !same {
            return Err(CommandError::IdempotencyMismatch);
        }
    }
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    Ok(Some(entity_response(status, &stored.body, true)))
}

/// Submits a command (with its optional idempotency key) and answers.
async fn run(
    s: &Inner,
    timer: Timer<'_>,
    cmd: Command,
    meta: Meta,
    idem: Option<IdemRequest>,
    password_for_replay: Option<Password>,
) -> Response {
    match s.group.submit(cmd, meta, idem.clone()).await {
        Ok(Reply::Done(o)) => timer.finish("ok", entity_response(o.status, &o.body, false)),
        Ok(Reply::KeyTaken) => {
            let Some(idem) = idem else {
                return timer.fail(Problem::internal("unexpected idempotency state"));
            };
            match replay(s, &idem.key, &idem.hash, password_for_replay).await {
                Ok(Some(res)) => timer.finish("replayed", res),
                Ok(None) => timer.finish(
                    "conflict",
                    Problem::new(
                        StatusCode::CONFLICT,
                        "idempotency-key-in-flight",
                        "a request with this Idempotency-Key is still being processed; retry",
                    )
                    .with_retry_after(1)
                    .into_response(),
                ),
                Err(e) => timer.finish(e.outcome(), e.to_problem().into_response()),
            }
        }
        Err(e) => timer.finish(e.outcome(), e.to_problem().into_response()),
    }
}

/// Shared front of every POST: the key, its hash, and a fast replay of an already committed request.
async fn idempotency_front(
    s: &Inner,
    headers: &HeaderMap,
    method: &Method,
    path: &str,
    body: &Map<String, Value>,
    password: Option<&str>,
) -> Result<(Option<IdemRequest>, Option<Response>), Response> {
    let key = idempotency_key(headers).map_err(IntoResponse::into_response)?;
    let Some(key) = key else {
        return Ok((None, None));
    };
    let key = scoped_key(headers, &key);
    let hash = request_hash(method, path, body);
    let pw = password.and_then(|p| Password::parse(p).ok());
    match replay(s, &key, &hash, pw).await {
        Ok(Some(res)) => Ok((None, Some(res))),
        Ok(None) => Ok((Some(IdemRequest { key, hash }), None)),
        Err(e) => Err(e.to_problem().into_response()),
    }
}

async fn create_user(State(s): State<AppState>, headers: HeaderMap, body: JsonBody) -> Response {
    let timer = Timer::new(&s.metrics, "create_user");
    let o = &body.object;
    let mut f = Fields::default();
    let email = match o.get("email") {
        Some(Value::String(e)) => Email::parse(e).map_err(|m| f.err("email", m)).ok(),
        None | Some(Value::Null) => {
            f.err("email", "is required");
            None
        }
        Some(_) => {
            f.err("email", "must be a string");
            None
        }
    };
    let password_text = match o.get("password") {
        Some(Value::String(p)) => Some(p.as_str()),
        None | Some(Value::Null) => {
            f.err("password", "is required");
            None
        }
        Some(_) => {
            f.err("password", "must be a string");
            None
        }
    };
    let password =
        password_text.and_then(|p| Password::parse(p).map_err(|m| f.err("password", m)).ok());
    let name = f.optional_string(o, "name", MAX_NAME_CHARS).flatten();
    if let Err(errors) = f.into_result() {
        return timer.fail(Problem::unprocessable("invalid user", errors));
    }
    let (Some(email), Some(password)) = (email, password) else {
        return timer.fail(Problem::internal("validation state"));
    };
    let (idem, replayed) =
        match idempotency_front(&s, &headers, &Method::POST, "/user", o, password_text).await {
            Ok(x) => x,
            Err(res) => return timer.finish("invalid", res),
        };
    if let Some(res) = replayed {
        return timer.finish("replayed", res);
    }
    let replay_pw = password_text.and_then(|p| Password::parse(p).ok());
    let started = Instant::now();
    let password_hash = match s.hasher.hash(password).await {
        Ok(h) => h,
        Err(e) => return timer.finish(e.outcome(), e.to_problem().into_response()),
    };
    s.metrics
        .password_hash_seconds
        .observe(started.elapsed().as_secs_f64());
    let cmd = Command::CreateUser {
        id: Uuid::now_v7(),
        email,
        password_hash,
        name,
    };
    run(&s, timer, cmd, meta(&headers), idem, replay_pw).await
}

async fn update_user(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonBody,
) -> Response {
    let timer = Timer::new(&s.metrics, "update_user");
    let id = match parse_id(&id, "user") {
        Ok(id) => id,
        Err(p) => return timer.fail(p),
    };
    let expected = match if_match(&headers) {
        Ok(e) => e,
        Err(p) => return timer.fail(p),
    };
    let o = &body.object;
    let mut f = Fields::default();
    let email = match o.get("email") {
        None => None,
        Some(Value::String(e)) => Email::parse(e).map_err(|m| f.err("email", m)).ok(),
        Some(_) => {
            f.err("email", "must be a string");
            None
        }
    };
    let password = match o.get("password") {
        None => None,
        Some(Value::String(p)) => Password::parse(p).map_err(|m| f.err("password", m)).ok(),
        Some(_) => {
            f.err("password", "must be a string");
            None
        }
    };
    let name = f.optional_string(o, "name", MAX_NAME_CHARS);
    if !o.contains_key("email") && !o.contains_key("password") && !o.contains_key("name") {
        f.err("", "nothing to change: send email, name or password");
    }
    if let Err(errors) = f.into_result() {
        return timer.fail(Problem::unprocessable("invalid user update", errors));
    }
    let password_hash = match password {
        Some(p) => match s.hasher.hash(p).await {
            Ok(h) => Some(h),
            Err(e) => return timer.finish(e.outcome(), e.to_problem().into_response()),
        },
        None => None,
    };
    let cmd = Command::UpdateUser {
        id,
        expected,
        email,
        name,
        password_hash,
    };
    run(&s, timer, cmd, meta(&headers), None, None).await
}

async fn delete_user(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let timer = Timer::new(&s.metrics, "delete_user");
    let (id, expected) = match parse_id(&id, "user").and_then(|id| Ok((id, if_match(&headers)?))) {
        Ok(x) => x,
        Err(p) => return timer.fail(p),
    };
    run(
        &s,
        timer,
        Command::DeleteUser { id, expected },
        meta(&headers),
        None,
        None,
    )
    .await
}

/// The raw JSON text of `price`, so it converts to cents from the client's digits.
fn raw_price(raw: &Bytes) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct PriceOnly<'a> {
        #[serde(borrow)]
        price: Option<&'a serde_json::value::RawValue>,
    }
    serde_json::from_slice::<PriceOnly<'_>>(raw)
        .ok()
        .and_then(|p| p.price.map(|r| r.get().to_owned()))
}

fn price_field(f: &mut Fields, body: &JsonBody, required: bool) -> Option<PriceCents> {
    match body.object.get("price") {
        None | Some(Value::Null) => {
            if required {
                f.err("price", "is required");
            } else if body.object.contains_key("price") {
                f.err("price", "must not be null");
            }
            None
        }
        Some(_) => match raw_price(&body.raw) {
            Some(text) => PriceCents::parse_json(&text)
                .map_err(|m| f.err("price", m))
                .ok(),
            None => {
                f.err("price", "must be a decimal amount such as 19.99");
                None
            }
        },
    }
}

async fn create_product(State(s): State<AppState>, headers: HeaderMap, body: JsonBody) -> Response {
    let timer = Timer::new(&s.metrics, "create_product");
    let o = &body.object;
    let mut f = Fields::default();
    let name = f.string(o, "name", MAX_NAME_CHARS);
    let price = price_field(&mut f, &body, true);
    let description = f
        .optional_string(o, "description", MAX_DESCRIPTION_CHARS)
        .flatten();
    if let Err(errors) = f.into_result() {
        return timer.fail(Problem::unprocessable("invalid product", errors));
    }
    let (Some(name), Some(price)) = (name, price) else {
        return timer.fail(Problem::internal("validation state"));
    };
    let (idem, replayed) =
        match idempotency_front(&s, &headers, &Method::POST, "/product", o, None).await {
            Ok(x) => x,
            Err(res) => return timer.finish("invalid", res),
        };
    if let Some(res) = replayed {
        return timer.finish("replayed", res);
    }
    let cmd = Command::CreateProduct {
        id: Uuid::now_v7(),
        name,
        price,
        description,
    };
    run(&s, timer, cmd, meta(&headers), idem, None).await
}

async fn update_product(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonBody,
) -> Response {
    let timer = Timer::new(&s.metrics, "update_product");
    let (id, expected) = match parse_id(&id, "product").and_then(|id| Ok((id, if_match(&headers)?)))
    {
        Ok(x) => x,
        Err(p) => return timer.fail(p),
    };
    let o = &body.object;
    let mut f = Fields::default();
    let name = match o.get("name") {
        None => None,
        Some(v) => f.string_value("name", v, MAX_NAME_CHARS),
    };
    let price = price_field(&mut f, &body, false);
    let description = f.optional_string(o, "description", MAX_DESCRIPTION_CHARS);
    if !["name", "price", "description"]
        .iter()
        .any(|k| o.contains_key(*k))
    {
        f.err("", "nothing to change: send name, price or description");
    }
    if let Err(errors) = f.into_result() {
        return timer.fail(Problem::unprocessable("invalid product update", errors));
    }
    let cmd = Command::UpdateProduct {
        id,
        expected,
        name,
        price,
        description,
    };
    run(&s, timer, cmd, meta(&headers), None, None).await
}

async fn delete_product(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let timer = Timer::new(&s.metrics, "delete_product");
    let (id, expected) = match parse_id(&id, "product").and_then(|id| Ok((id, if_match(&headers)?)))
    {
        Ok(x) => x,
        Err(p) => return timer.fail(p),
    };
    run(
        &s,
        timer,
        Command::DeleteProduct { id, expected },
        meta(&headers),
        None,
        None,
    )
    .await
}

async fn create_order(State(s): State<AppState>, headers: HeaderMap, body: JsonBody) -> Response {
    let timer = Timer::new(&s.metrics, "create_order");
    let o = &body.object;
    let mut f = Fields::default();
    let user_id = match o.get("userId") {
        Some(Value::String(u)) => Uuid::parse_str(u)
            .map_err(|_| f.err("userId", "must be a UUID"))
            .ok(),
        None | Some(Value::Null) => {
            f.err("userId", "is required");
            None
        }
        Some(_) => {
            f.err("userId", "must be a UUID string");
            None
        }
    };
    let mut items = Vec::new();
    match o.get("items") {
        Some(Value::Array(a)) if a.is_empty() => f.err("items", "must contain at least one item"),
        Some(Value::Array(a)) if a.len() > s.max_order_items => f.err(
            "items",
            format!("must contain at most {} items", s.max_order_items),
        ),
        Some(Value::Array(a)) => {
            for (i, it) in a.iter().enumerate() {
                let Some(it) = it.as_object() else {
                    f.err(format!("items[{i}]"), "must be an object");
                    continue;
                };
                let pid = match it.get("productId") {
                    Some(Value::String(p)) => Uuid::parse_str(p)
                        .map_err(|_| f.err(format!("items[{i}].productId"), "must be a UUID"))
                        .ok(),
                    _ => {
                        f.err(
                            format!("items[{i}].productId"),
                            "is required (a UUID string)",
                        );
                        None
                    }
                };
                let qty = match it.get("quantity") {
                    Some(Value::Number(n)) => match n.as_u64() {
                        Some(q) if q >= 1 && q <= u64::from(MAX_QUANTITY) => u32::try_from(q).ok(),
                        _ => {
                            f.err(
                                format!("items[{i}].quantity"),
                                format!("must be a whole number from 1 to {MAX_QUANTITY}"),
                            );
                            None
                        }
                    },
                    _ => {
                        f.err(
                            format!("items[{i}].quantity"),
                            "is required (a whole number ≥ 1)",
                        );
                        None
                    }
                };
                // A client-sent price is ignored: prices come from the products table.
                if let (Some(p), Some(q)) = (pid, qty) {
                    items.push((p, q));
                }
            }
        }
        None | Some(Value::Null) => f.err("items", "is required"),
        Some(_) => f.err("items", "must be an array"),
    }
    if let Err(errors) = f.into_result() {
        return timer.fail(Problem::unprocessable("invalid order", errors));
    }
    let Some(user_id) = user_id else {
        return timer.fail(Problem::internal("validation state"));
    };
    let (idem, replayed) =
        match idempotency_front(&s, &headers, &Method::POST, "/order", o, None).await {
            Ok(x) => x,
            Err(res) => return timer.finish("invalid", res),
        };
    if let Some(res) = replayed {
        return timer.finish("replayed", res);
    }
    let cmd = Command::CreateOrder {
        id: Uuid::now_v7(),
        user_id,
        items,
    };
    run(&s, timer, cmd, meta(&headers), idem, None).await
}

async fn cancel_order(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    let timer = Timer::new(&s.metrics, "cancel_order");
    let (id, expected) = match parse_id(&id, "order").and_then(|id| Ok((id, if_match(&headers)?))) {
        Ok(x) => x,
        Err(p) => return timer.fail(p),
    };
    // The body is optional: `{"reason": "..."}`; no body hashes as `{}`.
    let mut reason = None;
    let mut object = Map::new();
    if !raw.iter().all(u8::is_ascii_whitespace) {
        if !is_json_content_type(&headers) {
            return timer.fail(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "send the body as Content-Type: application/json",
            ));
        }
        let body = match JsonBody::parse(raw) {
            Ok(b) => b,
            Err(p) => return timer.fail(p),
        };
        let mut f = Fields::default();
        reason = f
            .optional_string(&body.object, "reason", MAX_DESCRIPTION_CHARS)
            .flatten();
        if let Err(errors) = f.into_result() {
            return timer.fail(Problem::unprocessable("invalid cancellation", errors));
        }
        object = body.object;
    }
    let path = format!("/order/{id}/cancel");
    let (idem, replayed) =
        match idempotency_front(&s, &headers, &Method::POST, &path, &object, None).await {
            Ok(x) => x,
            Err(res) => return timer.finish("invalid", res),
        };
    if let Some(res) = replayed {
        return timer.finish("replayed", res);
    }
    run(
        &s,
        timer,
        Command::CancelOrder {
            id,
            expected,
            reason,
        },
        meta(&headers),
        idem,
        None,
    )
    .await
}

async fn relay_status(State(s): State<AppState>) -> Response {
    match backlog(&s.pool).await {
        Ok(b) => {
            s.metrics.outbox_backlog.set(b.count);
            s.metrics
                .outbox_oldest_age_seconds
                .set(b.oldest_age_seconds);
            Json(json!({
                "backlog": b.count,
                "oldestAgeSeconds": b.oldest_age_seconds,
                "leader": s.relay.leader.load(Ordering::SeqCst),
                "publishedTotal": s.relay.published.load(Ordering::Relaxed),
            }))
            .into_response()
        }
        Err(_) => Problem::unavailable("database unavailable", 1).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many sign-ups at once queue on the hashing threads: every hash is made and verifies, none is lost or
    /// stuck, and a wrong password does not verify. (The memory bound itself is what the cluster e2e's seed
    /// checks: with the blocking pool a mutation pod was OOM-killed at 512 MiB.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_hashes_queue_on_the_hashing_threads() {
        let hasher = Hasher::new(1024, 1).expect("params");
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64 {
            let hasher = hasher.clone();
            tasks.spawn(async move {
                let pw = format!("password number {i}");
                let phc = hasher
                    .hash(Password::parse(&pw).expect("valid"))
                    .await
                    .expect("hash");
                let right = hasher
                    .verify(Password::parse(&pw).expect("valid"), phc.clone())
                    .await;
                let wrong = hasher
                    .verify(Password::parse("another password").expect("valid"), phc)
                    .await;
                (right, wrong)
            });
        }
        let mut n = 0;
        while let Some(r) = tasks.join_next().await {
            let (right, wrong) = r.expect("task");
            assert!(right && !wrong);
            n += 1;
        }
        assert_eq!(n, 64);
    }

    #[test]
    fn if_match_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(if_match(&h).ok(), Some(None));
        for (v, want) in [
            ("\"3\"", Some(Some(3))),
            ("W/\"4\"", Some(Some(4))),
            ("5", Some(Some(5))),
            ("*", Some(None)),
        ] {
            h.insert(header::IF_MATCH, HeaderValue::from_static(v));
            assert_eq!(if_match(&h).ok(), want, "{v}");
        }
        for v in ["\"x\"", "\"0\"", "\"-1\""] {
            h.insert(header::IF_MATCH, HeaderValue::from_static(v));
            assert!(if_match(&h).is_err(), "{v}");
        }
    }

    #[test]
    fn request_hash_ignores_key_order_and_password() {
        let a: Map<String, Value> =
            serde_json::from_str(r#"{"email":"a@b.io","name":"A","password":"x1234567"}"#)
                .unwrap_or_default();
        let b: Map<String, Value> =
            serde_json::from_str(r#"{"password":"other123","name":"A","email":"a@b.io"}"#)
                .unwrap_or_default();
        let c: Map<String, Value> =
            serde_json::from_str(r#"{"email":"c@b.io","name":"A","password":"x1234567"}"#)
                .unwrap_or_default();
        assert_eq!(
            request_hash(&Method::POST, "/user", &a),
            request_hash(&Method::POST, "/user", &b)
        );
        assert_ne!(
            request_hash(&Method::POST, "/user", &a),
            request_hash(&Method::POST, "/user", &c)
        );
        assert_ne!(
            request_hash(&Method::POST, "/user", &a),
            request_hash(&Method::POST, "/product", &a)
        );
    }

    #[test]
    fn keys_are_scoped_by_subject() {
        let mut alice = HeaderMap::new();
        alice.insert(AUTH_SUBJECT, HeaderValue::from_static("alice"));
        let mut bob = HeaderMap::new();
        bob.insert(AUTH_SUBJECT, HeaderValue::from_static("bob"));
        assert_eq!(scoped_key(&alice, "k"), scoped_key(&alice, "k"));
        assert_ne!(scoped_key(&alice, "k"), scoped_key(&bob, "k"));
        assert_ne!(scoped_key(&alice, "k"), scoped_key(&HeaderMap::new(), "k"));
        assert_ne!(scoped_key(&alice, "k"), scoped_key(&alice, "k2"));
    }

    #[test]
    fn raw_price_keeps_the_digits() {
        let raw = Bytes::from_static(br#"{"name":"x","price":19.999999999999999999}"#);
        assert_eq!(raw_price(&raw).as_deref(), Some("19.999999999999999999"));
    }
}
