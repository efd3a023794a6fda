//! The read side: Kafka → version-guarded projections in MongoDB → reads, live streams and blue/green rebuilds.
//!
//! See `docs/READ-SIDE.md` for the design; [`Application`] is the whole service, built from a [`QueryConfig`].

pub mod config;
pub mod ctx;
pub mod dlq;
pub mod error;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod projector;
pub mod rebuild;
pub mod status;
pub mod store;
pub mod waiters;
pub mod watch;

use std::{future::Future, sync::Arc, time::Duration};

use axum::Router;
use cqrs_common::{HealthState, health::check_fn, health_router, serve};
use rdkafka::consumer::Consumer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::QueryConfig;
pub use ctx::Ctx;
pub use error::QueryError;

/// The query service: HTTP API + apply loops + rebuild supervisor.
pub struct Application {
    listener: TcpListener,
    port: u16,
    router: Router,
    ctx: Arc<Ctx>,
    sup: Arc<rebuild::Supervisor>,
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(config: QueryConfig) -> Result<Self, QueryError> {
        let metrics =
            metrics::Metrics::new().map_err(|e| QueryError::Config(format!("metrics: {e}")))?;
        let store =
            store::Store::connect(&config.mongo_url, &config.mongo_db, &config.write_concern)
                .await?;
        if config.create_topics {
            let topics = cqrs_events::Topics::new(config.topic_prefix.clone());
            let mut all = topics.event_topics();
            all.push(topics.dlq());
            kafka::ensure_topics(&config.kafka_bootstrap, &all, config.topic_partitions).await?;
        }
        let listen = config.listen.clone();
        let ctx = Arc::new(Ctx::new(config, store.clone(), metrics.clone(), 0)?);
        let sup = rebuild::Supervisor::init(ctx.clone()).await?;
        let shutdown = CancellationToken::new();
        let kafka_check = Arc::new(kafka::inspector(
            &ctx.config.kafka_bootstrap,
            "cqrs-query-health",
        )?);
        let health = HealthState::new(metrics.registry.clone())
            .with_check(check_fn("mongodb", move || {
                let store = store.clone();
                async move { store.ping().await.map_err(|e| e.to_string()) }
            }))
            // Reported, not required: reads need MongoDB alone; a Kafka outage shows as lag in /sync-status.
            .with_info_check(check_fn("kafka", move || {
                let kafka = kafka_check.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        kafka
                            .fetch_metadata(None, Duration::from_secs(1))
                            .map(|_| ())
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
                }
            }));
        let router = http::router(http::AppState {
            ctx: ctx.clone(),
            sup: sup.clone(),
            shutdown: shutdown.clone(),
        })
        .merge(health_router(health))
        .layer(tower_http::trace::TraceLayer::new_for_http());
        let listener = TcpListener::bind(&listen).await?;
        let port = listener.local_addr()?.port();
        Ok(Self {
            listener,
            port,
            router,
            ctx,
            sup,
            shutdown,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The projection supervisor (rebuilds, generation drops), for tests and tools.
    pub fn supervisor(&self) -> Arc<rebuild::Supervisor> {
        self.sup.clone()
    }

    /// Shared state, for tests and tools (metrics, the fault-injection flag, the serving generation).
    pub fn ctx(&self) -> Arc<Ctx> {
        self.ctx.clone()
    }

    /// Runs the apply loops and serves HTTP until `shutdown` resolves; then stops accepting, ends live streams,
    /// drains in-flight requests, and lets each apply loop finish and commit its current batch.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), QueryError> {
        let Self {
            listener,
            port: _,
            router,
            ctx,
            sup,
            shutdown: stop_streams,
        } = self;
        if let Err(e) = sup.start().await {
            tracing::error!(error = %e, "starting projections failed; the supervisor keeps retrying");
        }
        let ticker = CancellationToken::new();
        let every = Duration::from_millis(ctx.config.meta_poll_ms.max(50));
        let supervise = tokio::spawn(rebuild::supervise(sup.clone(), every, ticker.clone()));
        let watcher = ctx
            .config
            .change_streams
            .then(|| tokio::spawn(watch::run(ctx.clone(), ticker.clone())));
        let streams = stop_streams.clone();
        let result = serve(
            listener,
            router,
            async move {
                shutdown.await;
                streams.cancel();
            },
            Duration::from_secs(10),
        )
        .await;
        stop_streams.cancel();
        ticker.cancel();
        let _ = supervise.await;
        if let Some(w) = watcher {
            let _ = w.await;
        }
        sup.shutdown().await;
        tracing::info!("query service stopped");
        result.map_err(QueryError::from)
    }
}
