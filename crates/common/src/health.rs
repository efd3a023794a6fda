//! `/healthz`, `/readyz` and `/metrics`, identical on every binary.
//!
//! `/healthz` answers 200 while the process runs. `/readyz` runs every registered [`ReadinessCheck`]
//! (real round trips to PostgreSQL, Kafka, MongoDB or upstream services) and answers 503 with the failing
//! ones when any fails, so Kubernetes stops routing to a pod that cannot serve.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus::{Encoder, Registry, TextEncoder};
use serde_json::json;

pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// A dependency whose reachability decides readiness.
pub trait ReadinessCheck: Send + Sync {
    fn name(&self) -> &str;
    fn check(&self) -> CheckFuture<'_>;
}

/// A readiness check from a closure.
pub struct FnCheck<F> {
    name: String,
    f: F,
}

impl<F, Fut> ReadinessCheck for FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn check(&self) -> CheckFuture<'_> {
        Box::pin((self.f)())
    }
}

pub fn check_fn<F, Fut>(name: impl Into<String>, f: F) -> Arc<dyn ReadinessCheck>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    Arc::new(FnCheck {
        name: name.into(),
        f,
    })
}

#[derive(Clone)]
pub struct HealthState {
    pub registry: Registry,
    pub checks: Vec<Arc<dyn ReadinessCheck>>,
    /// Bound on each check, so a hung dependency makes `/readyz` fail instead of hang.
    pub check_timeout: Duration,
}

impl HealthState {
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            checks: Vec::new(),
            check_timeout: Duration::from_secs(2),
        }
    }
    pub fn with_check(mut self, check: Arc<dyn ReadinessCheck>) -> Self {
        self.checks.push(check);
        self
    }
}

/// A router with the three endpoints; merge it into the service's router.
pub fn health_router(state: HealthState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Arc::new(state))
}

async fn readyz(State(state): State<Arc<HealthState>>) -> Response {
    let results = futures::future::join_all(state.checks.iter().map(|c| async {
        let r = match tokio::time::timeout(state.check_timeout, c.check()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", state.check_timeout)),
        };
        (c.name().to_owned(), r)
    }))
    .await;
    let mut ok = true;
    let mut deps = serde_json::Map::new();
    for (name, r) in results {
        match r {
            Ok(()) => {
                deps.insert(name, json!({"status": "ok"}));
            }
            Err(e) => {
                ok = false;
                deps.insert(name, json!({"status": "failing", "error": e}));
            }
        }
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"status": if ok {"ready"} else {"not-ready"}, "dependencies": deps})),
    )
        .into_response()
}

async fn metrics(State(state): State<Arc<HealthState>>) -> Response {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    let mut families = state.registry.gather();
    families.extend(prometheus::gather());
    if let Err(e) = encoder.encode(&families, &mut buf) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
        buf,
    )
        .into_response()
}
