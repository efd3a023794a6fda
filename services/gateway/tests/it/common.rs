//! Test harness: real upstream servers (each on its own runtime thread so it can be killed outright), a gateway
//! on an ephemeral port, tokens, raw HTTP and metrics helpers.

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::Body,
    extract::{Query, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use cqrs_gateway::{Application, AuthSettings, Config, JwtSettings};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
};

pub const SECRET: &[u8] = b"test-secret-that-is-at-least-32-bytes-long!";
pub const ISSUER: &str = "https://issuer.test";
pub const AUDIENCE: &str = "cqrs-test";

/// Upper bound on any single wait in a test; a hit means the test failed, not that it should retry.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// What a test upstream observed, shared with the test.
pub struct Observed {
    pub name: &'static str,
    /// Requests that reached a handler (excluding /readyz).
    pub hits: AtomicUsize,
    pub ready: AtomicBool,
    /// Requests parked in `/slow` or `/killme` so far.
    pub parked: watch::Sender<usize>,
    /// Opens the gate for parked requests and SSE second events.
    pub release: watch::Sender<bool>,
    /// Bytes received by `/upload` so far.
    pub uploaded: watch::Sender<u64>,
}

impl Observed {
    fn new(name: &'static str) -> Arc<Self> {
        Arc::new(Self {
            name,
            hits: AtomicUsize::new(0),
            ready: AtomicBool::new(true),
            parked: watch::Sender::new(0),
            release: watch::Sender::new(false),
            uploaded: watch::Sender::new(0),
        })
    }
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    pub async fn wait_parked(&self, n: usize) {
        let mut rx = self.parked.subscribe();
        tokio::time::timeout(PATIENCE, rx.wait_for(|p| *p >= n))
            .await
            .expect("requests parked")
            .expect("open");
    }
    pub fn open_gate(&self) {
        self.release.send_replace(true);
    }
}

/// A real HTTP server on 127.0.0.1 playing query or mutation.
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Observed>,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestUpstream {
    pub fn start(name: &'static str) -> Self {
        Self::start_on(
            name,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Observed::new(name),
        )
    }

    fn start_on(name: &'static str, addr: SocketAddr, seen: Arc<Observed>) -> Self {
        let _ = name;
        let std_listener = bind_reuse(addr);
        let addr = std_listener.local_addr().expect("addr");
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let app = upstream_router(seen.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                let server = axum::serve(listener, app);
                tokio::select! {
                    _ = server => {}
                    _ = killed => {}
                }
            });
            // Dropping the runtime drops every connection task: sockets close as if the process died.
            drop(rt);
        });
        Self {
            addr,
            seen,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills the server and every open connection, abruptly.
    pub fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("upstream thread");
        }
    }

    /// Starts again on the same port (after [`kill`](Self::kill)).
    pub fn restart(&mut self) {
        self.kill();
        let seen = self.seen.clone();
        *self = Self::start_on(seen.name, self.addr, seen);
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.kill();
    }
}

fn bind_reuse(addr: SocketAddr) -> std::net::TcpListener {
    // std sets SO_REUSEADDR on Unix, so a restarted upstream can take its old port despite TIME_WAIT.
    let l = std::net::TcpListener::bind(addr).expect("bind upstream");
    l.set_nonblocking(true).expect("nonblocking");
    l
}

fn upstream_router(seen: Arc<Observed>) -> Router {
    Router::new()
        .route("/readyz", get(readyz))
        .route("/slow", get(slow).post(slow))
        .route("/killme", get(slow).post(slow))
        .route("/upload", post(upload))
        .route("/big", get(big))
        .route("/hang-body", get(hang_body))
        .route("/stall-small", get(stall_small))
        .route("/hop", get(hop))
        .route("/product/{id}/stream", get(sse))
        .fallback(echo)
        .with_state(seen)
}

fn hit(seen: &Observed) {
    seen.hits.fetch_add(1, Ordering::SeqCst);
}

async fn readyz(State(seen): State<Arc<Observed>>) -> StatusCode {
    if seen.ready.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Parks until the gate opens.
async fn slow(State(seen): State<Arc<Observed>>) -> Json<Value> {
    hit(&seen);
    seen.parked.send_modify(|n| *n += 1);
    let mut rx = seen.release.subscribe();
    let _ = rx.wait_for(|open| *open).await;
    Json(json!({"upstream": seen.name, "released": true}))
}

/// Counts the streamed body without keeping it.
async fn upload(State(seen): State<Arc<Observed>>, body: Body) -> Json<Value> {
    hit(&seen);
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                total += c.len() as u64;
                seen.uploaded.send_replace(total);
            }
            Err(e) => return Json(json!({"error": e.to_string(), "received": total})),
        }
    }
    Json(json!({"upstream": seen.name, "received": total}))
}

/// Streams `bytes` bytes in 64 KiB chunks; after the first MiB it waits for the gate, so a client can only
/// see data before the gate opens if nobody in between buffers the whole body.
async fn big(
    State(seen): State<Arc<Observed>>,
    Query(q): Query<BTreeMap<String, u64>>,
) -> Response {
    hit(&seen);
    let total = q.get("bytes").copied().unwrap_or(1024 * 1024);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let seen2 = seen.clone();
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let mut sent = 0u64;
        let mut gate = seen2.release.subscribe();
        while sent < total {
            if sent >= 1024 * 1024 {
                let _ = gate.wait_for(|open| *open).await;
            }
            let n = (total - sent).min(chunk.len() as u64) as usize;
            if tx.send(Ok(chunk.slice(..n))).await.is_err() {
                return;
            }
            sent += n as u64;
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    (
        [("content-length", total.to_string())],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Sends a head and one chunk, then never finishes.
async fn hang_body(State(seen): State<Arc<Observed>>) -> Response {
    hit(&seen);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    tokio::spawn(async move {
        let _ = tx.send(Ok(Bytes::from_static(b"partial"))).await;
        tx.closed().await;
    });
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).into_response()
}

/// Declares a small body, sends part of it, then never finishes.
async fn stall_small(State(seen): State<Arc<Observed>>) -> Response {
    hit(&seen);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    tokio::spawn(async move {
        let _ = tx.send(Ok(Bytes::from_static(b"{\"partial\":"))).await;
        tx.closed().await;
    });
    (
        [("content-length", "100")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response()
}

/// Answers with hop-by-hop headers that must not reach the client.
async fn hop(State(seen): State<Arc<Observed>>) -> Response {
    hit(&seen);
    (
        [
            ("connection", "x-up-hop"),
            ("x-up-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("x-up-ok", "1"),
        ],
        "hop",
    )
        .into_response()
}

/// Server-Sent Events: one event now, the second only after the gate opens, then the end.
async fn sse(State(seen): State<Arc<Observed>>) -> Response {
    hit(&seen);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let mut gate = seen.release.subscribe();
    tokio::spawn(async move {
        let _ = tx
            .send(Ok(Bytes::from_static(
                b"event: change\ndata: {\"n\":1}\n\n",
            )))
            .await;
        let _ = gate.wait_for(|open| *open).await;
        let _ = tx
            .send(Ok(Bytes::from_static(
                b"event: change\ndata: {\"n\":2}\n\n",
            )))
            .await;
    });
    (
        [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response()
}

/// Describes the request it got.
async fn echo(
    State(seen): State<Arc<Observed>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    hit(&seen);
    let headers: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    Json(json!({
        "upstream": seen.name,
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "headers": headers,
        "bodyLen": body.len(),
    }))
    .into_response()
}

/// A gateway running on the test's runtime.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub registry: prometheus::Registry,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestGateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    /// Asks the gateway to shut down (it drains, bounded).
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
    /// Sum of a metric's samples whose labels include all of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.registry, name, labels)
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for family in registry.gather() {
        if family.name() != name {
            continue;
        }
        for m in family.get_metric() {
            let matches = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if matches {
                total += match family.get_field_type() {
                    prometheus::proto::MetricType::COUNTER => m.get_counter().get_value(),
                    prometheus::proto::MetricType::GAUGE => m.get_gauge().get_value(),
                    _ => m.get_histogram().get_sample_count() as f64,
                };
            }
        }
    }
    total
}

/// Auth on (HS256 + issuer + audience), small timeouts, default limits.
pub fn config(mutation: &TestUpstream, query: &TestUpstream) -> Config {
    let mut c = Config::new(mutation.url(), query.url(), jwt_auth());
    c.read_timeout = Duration::from_secs(5);
    c.write_timeout = Duration::from_secs(5);
    c.admin_timeout = Duration::from_secs(5);
    c.connect_timeout = Duration::from_secs(1);
    c.drain_timeout = Duration::from_secs(5);
    c
}

pub fn jwt_auth() -> AuthSettings {
    AuthSettings::Jwt(JwtSettings {
        hs256_secret: Some(SECRET.to_vec()),
        public_keys_pem: None,
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
        leeway: Duration::from_secs(0),
    })
}

pub async fn spawn_gateway(config: Config) -> TestGateway {
    let app = Application::build(config).await.expect("gateway builds");
    let addr = app.local_addr();
    let registry = app.registry();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestGateway {
        addr,
        registry,
        stop: Some(stop),
        handle: Some(handle),
    }
}

pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Valid HS256 claims for `roles`, overridable field by field.
pub fn claims(roles: &[&str]) -> Value {
    json!({"sub": "alice", "roles": roles, "iss": ISSUER, "aud": AUDIENCE, "iat": now(), "exp": now() + 3600})
}

pub fn sign_hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("sign")
}

pub fn token(roles: &[&str]) -> String {
    sign_hs256(&claims(roles), SECRET)
}

pub fn bearer(roles: &[&str]) -> String {
    format!("Bearer {}", token(roles))
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

pub async fn json_body(res: reqwest::Response) -> Value {
    res.json().await.expect("json body")
}

/// Sends raw bytes on a fresh connection and returns everything the gateway answers until it closes the
/// connection (or `PATIENCE` passes).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("gateway closes the connection");
    out
}

/// The status code of a raw HTTP/1.1 response, if it has one.
pub fn raw_status(resp: &[u8]) -> Option<u16> {
    let s = std::str::from_utf8(resp.get(..12)?).ok()?;
    s.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}
