//! `/healthz`, `/readyz` and `/metrics`, identical on every binary.
//!
//! `/healthz` answers 200 while the process runs. `/readyz` runs every registered [`ReadinessCheck`] (real
//! round trips to PostgreSQL, Kafka, MongoDB or upstream services) and reports each in its JSON body. Only the
//! *required* checks decide the status: readiness means "this pod can serve its own requests", so a dependency
//! whose outage the service absorbs (Kafka for mutation, whose outbox holds the events; the upstreams for the
//! gateway) is registered with [`HealthState::with_info_check`] and never takes the pod out of its Service.
//! Every check's last result is also the gauge `cqrs_dependency_up{dependency}` (1 up, 0 down), refreshed by
//! each `/readyz` and each `/metrics` scrape.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};
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

/// A registered check and whether readiness depends on it.
#[derive(Clone)]
struct Dependency {
    check: Arc<dyn ReadinessCheck>,
    required: bool,
}

#[derive(Clone)]
pub struct HealthState {
    pub registry: Registry,
    checks: Vec<Dependency>,
    /// Bound on each check, so a hung dependency makes `/readyz` fail instead of hang.
    pub check_timeout: Duration,
    /// `cqrs_dependency_up{dependency}`; `None` if it could not be registered (then only the JSON reports).
    up: Option<IntGaugeVec>,
}

impl HealthState {
    pub fn new(registry: Registry) -> Self {
        let up = IntGaugeVec::new(
            Opts::new(
                "cqrs_dependency_up",
                "1 when the last round trip to the dependency succeeded, else 0",
            ),
            &["dependency"],
        )
        .and_then(|g| registry.register(Box::new(g.clone())).map(|()| g));
        let up = match up {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::warn!(error = %e, "cqrs_dependency_up not registered");
                None
            }
        };
        Self {
            registry,
            checks: Vec::new(),
            check_timeout: Duration::from_secs(2),
            up,
        }
    }

    /// A dependency without which this process cannot serve its own requests: failing, `/readyz` is 503.
    pub fn with_check(mut self, check: Arc<dyn ReadinessCheck>) -> Self {
        self.checks.push(Dependency {
            check,
            required: true,
        });
        self
    }

    /// A dependency that is reported (JSON body, gauge) but does not decide readiness.
    pub fn with_info_check(mut self, check: Arc<dyn ReadinessCheck>) -> Self {
        self.checks.push(Dependency {
            check,
            required: false,
        });
        self
    }

    /// Runs every check (concurrently, each bounded) and updates the gauge; returns (ready, JSON body).
    async fn evaluate(&self) -> (bool, serde_json::Value) {
        let results = futures::future::join_all(self.checks.iter().map(|d| async {
            let r = match tokio::time::timeout(self.check_timeout, d.check.check()).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {:?}", self.check_timeout)),
            };
            (d.check.name().to_owned(), d.required, r)
        }))
        .await;
        let mut ready = true;
        let mut deps = serde_json::Map::new();
        for (name, required, r) in results {
            if let Some(up) = &self.up {
                up.with_label_values(&[name.as_str()])
                    .set(i64::from(r.is_ok()));
            }
            match r {
                Ok(()) => {
                    deps.insert(name, json!({"status": "ok", "required": required}));
                }
                Err(e) => {
                    ready &= !required;
                    deps.insert(
                        name,
                        json!({"status": "failing", "required": required, "error": e}),
                    );
                }
            }
        }
        let body = json!({"status": if ready {"ready"} else {"not-ready"}, "dependencies": deps});
        (ready, body)
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
    let (ready, body) = state.evaluate().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<HealthState>>) -> Response {
    // Fresh dependency gauges on every scrape, whether or not anything polls /readyz.
    let _ = state.evaluate().await;
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
