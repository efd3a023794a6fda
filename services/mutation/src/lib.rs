//! The write side: commands → PostgreSQL (state + events + outbox, group-committed) → relay → Kafka.
//!
//! [`Application::build`] connects, migrates and binds; [`Application::run_until_stopped`] serves HTTP and
//! runs the relay until the shutdown future resolves, then drains: in-flight requests finish, the group-commit
//! queue empties, the relay stops after its current round.

#![allow(clippy::result_large_err, clippy::too_many_arguments)]

pub mod commands;
pub mod config;
pub mod domain;
pub mod group;
pub mod http;
pub mod metrics;
pub mod relay;

use std::{future::Future, sync::Arc, time::Duration};

use cqrs_common::{HealthState, health::check_fn, health_router, serve};
use cqrs_events::Topics;
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
};
use sqlx::postgres::PgPoolOptions;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Why the application could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("argon2 parameters: {0}")]
    Argon2(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(std::io::Error),
}

/// Aborts its task when dropped, so dropping (or aborting) a running application stops everything it spawned:
/// in particular the relay's dedicated connection closes and its lock frees.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct Application {
    listener: TcpListener,
    port: u16,
    router: axum::Router,
    relay: Option<(relay::RelaySettings, Arc<relay::RelayShared>)>,
    metrics: metrics::Metrics,
    workers: Vec<JoinHandle<()>>,
    pool: sqlx::PgPool,
    idempotency_ttl: Duration,
    shutdown_budget: Duration,
}

/// How the shutdown budget is split: requests and the group-commit queue get `requests` from the signal, the
/// relay's last round the rest of `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ShutdownPlan {
    total: Duration,
    requests: Duration,
}

impl ShutdownPlan {
    /// The relay keeps a fifth of the budget, at most 5 s: a round is one produce-and-ack.
    fn new(total: Duration) -> Self {
        let relay = (total / 5).min(Duration::from_secs(5));
        Self {
            total,
            requests: total.saturating_sub(relay),
        }
    }
}

/// The embedded migrations (also used by tools that prepare a database).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Application {
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let Config {
            listen,
            database_url,
            kafka_bootstrap,
            topic_prefix,
            topic_partitions,
            topic_replication,
            topic_config,
            create_topics,
            db_pool_size,
            group_commit_window_us,
            group_commit_max,
            group_commit_workers,
            idempotency_ttl_secs,
            max_order_items,
            max_body_bytes,
            relay_enabled,
            relay_batch_size,
            relay_poll_ms,
            relay_max_backoff_ms,
            kafka_message_timeout_ms,
            argon2_memory_kib,
            argon2_iterations,
            shutdown_timeout_secs,
            telemetry: _,
        } = config;
        let pool = PgPoolOptions::new()
            .max_connections(db_pool_size.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .connect(&database_url)
            .await?;
        MIGRATOR.run(&pool).await?;

        let registry = prometheus::Registry::new();
        let metrics = metrics::Metrics::new(&registry)?;
        let shared = Arc::new(relay::RelayShared::default());
        let workers = if group_commit_workers == 0 {
            usize::try_from(db_pool_size)
                .unwrap_or(8)
                .saturating_sub(1)
                .max(1)
        } else {
            group_commit_workers
        };
        let idempotency_ttl = Duration::from_secs(idempotency_ttl_secs.max(1));
        let (group, worker_handles) = group::GroupCommit::start(
            pool.clone(),
            group::Settings {
                window: Duration::from_micros(group_commit_window_us),
                max: group_commit_max.max(1),
                workers,
                idempotency_ttl,
            },
            metrics.clone(),
            shared.wake.clone(),
        );
        let hasher = http::Hasher::new(argon2_memory_kib, argon2_iterations)
            .map_err(|e| AppError::Argon2(e.to_string()))?;

        let kafka: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &kafka_bootstrap)
            .create()?;
        let kafka = Arc::new(kafka);
        let check_pool = pool.clone();
        let health = HealthState::new(registry)
            .with_check(check_fn("postgres", move || {
                let pool = check_pool.clone();
                async move {
                    sqlx::query("select 1")
                        .execute(&pool)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            }))
            // Reported, not required: commands need PostgreSQL alone (the outbox holds the events while Kafka
            // is away; the backlog shows in /relay/status, /sync-status and cqrs_mutation_outbox_backlog).
            .with_info_check(check_fn("kafka", move || {
                let kafka = kafka.clone();
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

        let state = Arc::new(http::Inner {
            pool: pool.clone(),
            group,
            metrics: metrics.clone(),
            hasher,
            relay: shared.clone(),
            max_order_items: max_order_items.max(1),
            idempotency_ttl,
        });
        let router = http::router(state, max_body_bytes).merge(health_router(health));

        let listener = TcpListener::bind(&listen)
            .await
            .map_err(|source| AppError::Bind {
                addr: listen.clone(),
                source,
            })?;
        let port = listener
            .local_addr()
            .map_err(|source| AppError::Bind {
                addr: listen,
                source,
            })?
            .port();

        let relay = relay_enabled.then(|| {
            (
                relay::RelaySettings {
                    database_url,
                    kafka_bootstrap,
                    topics: Topics::new(topic_prefix),
                    partitions: topic_partitions.max(1),
                    replication: topic_replication.max(1),
                    topic_config: relay::topic_config(topic_replication.max(1), &topic_config.0),
                    create_topics,
                    batch_size: relay_batch_size.max(1),
                    poll: Duration::from_millis(relay_poll_ms.max(1)),
                    max_backoff: Duration::from_millis(relay_max_backoff_ms.max(100)),
                    message_timeout: Duration::from_millis(kafka_message_timeout_ms.max(1000)),
                },
                shared,
            )
        });
        Ok(Self {
            listener,
            port,
            router,
            relay,
            metrics,
            workers: worker_handles,
            pool,
            idempotency_ttl,
            shutdown_budget: Duration::from_secs(shutdown_timeout_secs),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let Self {
            listener,
            port: _,
            router,
            relay,
            metrics,
            workers,
            pool,
            idempotency_ttl,
            shutdown_budget,
        } = self;
        let stop = CancellationToken::new();
        let relay_task = relay.map(|(settings, shared)| {
            AbortOnDrop(tokio::spawn(relay::run(
                settings,
                shared,
                metrics.clone(),
                stop.clone(),
            )))
        });
        let _expiry = AbortOnDrop(tokio::spawn(group::expire_keys(
            pool.clone(),
            idempotency_ttl,
        )));
        let gauges_pool = pool.clone();
        let gauges_metrics = metrics.clone();
        let _gauges = AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                if let Ok(b) = relay::backlog(&gauges_pool).await {
                    gauges_metrics.outbox_backlog.set(b.count);
                    gauges_metrics
                        .outbox_oldest_age_seconds
                        .set(b.oldest_age_seconds);
                }
            }
        }));
        let mut workers: Vec<AbortOnDrop> = workers.into_iter().map(AbortOnDrop).collect();
        // One budget for the whole shutdown, counted from the signal: in-flight requests and the queue share
        // all but the relay's reserve; the relay's last round gets what is left. Whatever still runs at the
        // deadline is aborted (an unanswered command rolls back with its connection; an unacknowledged batch
        // stays in the outbox and is published again).
        let plan = ShutdownPlan::new(shutdown_budget);
        let signalled = Arc::new(std::sync::OnceLock::new());
        let mark = signalled.clone();
        let shutdown = async move {
            shutdown.await;
            let _ = mark.set(tokio::time::Instant::now());
        };
        let served = serve(listener, router, shutdown, plan.requests).await;
        let start = signalled
            .get()
            .copied()
            .unwrap_or_else(tokio::time::Instant::now);
        // The router (and with it every queue sender) is gone: the workers finish what is queued and exit.
        // One deadline for all of them (a lingering keep-alive connection can hold a queue sender).
        if tokio::time::timeout_at(
            start + plan.requests,
            futures::future::join_all(workers.iter_mut().map(|w| &mut w.0)),
        )
        .await
        .is_err()
        {
            tracing::warn!(budget = ?shutdown_budget, "group-commit workers still busy at their deadline; aborting");
        }
        drop(workers);
        stop.cancel();
        if let Some(mut r) = relay_task
            && tokio::time::timeout_at(start + plan.total, &mut r.0)
                .await
                .is_err()
        {
            tracing::warn!(budget = ?shutdown_budget, "relay still publishing at the shutdown deadline; aborting");
        }
        tracing::info!(
            elapsed = ?start.elapsed(),
            budget = ?shutdown_budget,
            "mutation stopped"
        );
        served.map_err(AppError::Serve)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shutdown_phases_share_one_budget() {
        let p = ShutdownPlan::new(Duration::from_secs(25));
        assert_eq!(p.requests, Duration::from_secs(20));
        assert_eq!(p.total, Duration::from_secs(25));
        let p = ShutdownPlan::new(Duration::from_secs(60));
        assert_eq!(
            p.requests,
            Duration::from_secs(55),
            "the relay's reserve is capped"
        );
        let p = ShutdownPlan::new(Duration::from_secs(3));
        assert!(p.requests < p.total);
        assert_eq!(ShutdownPlan::new(Duration::ZERO).requests, Duration::ZERO);
    }
}
