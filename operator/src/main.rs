//! The CqrsStack operator binary: the controller plus `/healthz`, `/readyz` and `/metrics`.
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use cqrs_common::{
    HealthState, TelemetryArgs, health::check_fn, health_router, serve, shutdown_signal,
};
use cqrs_operator::{Config, Metrics};

#[derive(Debug, Parser)]
#[command(
    about = "Reconciles CqrsStack resources into Deployments, Services, KafkaTopics and rebuilds"
)]
struct Args {
    /// Address of the health and metrics endpoints.
    #[arg(long, env = "OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    listen: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Base URL of a stack's query service; `{name}` and `{namespace}` are substituted.
    #[arg(
        long,
        env = "QUERY_URL_TEMPLATE",
        default_value = "http://{name}-query.{namespace}.svc:3125"
    )]
    query_url_template: String,
    /// Seconds between polls of a running projection rebuild.
    #[arg(long, env = "REBUILD_POLL_SECONDS", default_value_t = 5)]
    rebuild_poll_seconds: u64,
    /// Seconds between periodic re-checks of a stack.
    #[arg(long, env = "RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// Seconds between refreshes of the serving projection's lag in the status (the Lag column) when no rebuild
    /// runs.
    #[arg(long, env = "LAG_POLL_SECONDS", default_value_t = 30)]
    lag_poll_seconds: u64,
    /// Watch Strimzi KafkaTopics (disable when the Strimzi CRDs are not installed and no stack uses strimzi mode).
    #[arg(long, env = "WATCH_KAFKA_TOPICS", default_value_t = true, action = clap::ArgAction::Set)]
    watch_kafka_topics: bool,
    /// Pod name, reported as the instance of Events.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.telemetry.init();
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry).context("registering metrics")?;
    let config = Config {
        namespace: args.namespace,
        query_url_template: args.query_url_template,
        rebuild_poll: Duration::from_secs(args.rebuild_poll_seconds),
        resync: Duration::from_secs(args.resync_seconds),
        lag_poll: Duration::from_secs(args.lag_poll_seconds),
        watch_kafka_topics: args.watch_kafka_topics,
        watch_service_monitor_cleanup: true,
        instance: args.pod_name,
    };
    let api_client = client.clone();
    let health = HealthState::new(registry).with_check(check_fn("kubernetes-api", move || {
        let c = api_client.clone();
        async move {
            c.apiserver_version()
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }));
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %args.listen, "operator starting");

    // One signal stops both the controller (in-flight reconciles finish) and the HTTP server.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let mut rx1 = stop_rx.clone();
    let mut rx2 = stop_rx;
    let server = tokio::spawn(serve(
        listener,
        health_router(health),
        async move {
            let _ = rx1.wait_for(|s| *s).await;
        },
        Duration::from_secs(5),
    ));
    cqrs_operator::run(client, config, metrics, async move {
        let _ = rx2.wait_for(|s| *s).await;
    })
    .await
    .context("controller")?;
    server
        .await
        .context("health server task")?
        .context("health server")?;
    Ok(())
}
