//! `cqrs_mutation_*` Prometheus metrics, registered in the application's own registry (tests run several
//! applications in one process).

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub commands: IntCounterVec,
    pub command_seconds: HistogramVec,
    pub batch_size: Histogram,
    pub batch_seconds: Histogram,
    /// Creations written by a statement shared with the rest of their batch, by entity: shows whether the
    /// batched path carries the load.
    pub bulk_created: IntCounterVec,
    pub password_hash_seconds: Histogram,
    pub outbox_backlog: IntGauge,
    pub outbox_oldest_age_seconds: Gauge,
    pub relay_published: IntCounter,
    pub relay_errors: IntCounter,
    pub relay_batch_seconds: Histogram,
    pub relay_leader: IntGauge,
}

fn buckets_seconds() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
    ]
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let commands = IntCounterVec::new(
            Opts::new(
                "cqrs_mutation_commands_total",
                "Commands by type and outcome",
            ),
            &["type", "outcome"],
        )?;
        let command_seconds = HistogramVec::new(
            HistogramOpts::new(
                "cqrs_mutation_command_duration_seconds",
                "Command latency, request to answer",
            )
            .buckets(buckets_seconds()),
            &["type"],
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "cqrs_mutation_group_commit_batch_size",
                "Commands per group-commit transaction",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
        )?;
        let batch_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cqrs_mutation_group_commit_duration_seconds",
                "Duration of one group-commit transaction",
            )
            .buckets(buckets_seconds()),
        )?;
        let bulk_created = IntCounterVec::new(
            Opts::new(
                "cqrs_mutation_bulk_created_total",
                "Creations written by one statement shared with their batch",
            ),
            &["entity"],
        )?;
        let password_hash_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cqrs_mutation_password_hash_seconds",
                "argon2id hashing time per password",
            )
            .buckets(buckets_seconds()),
        )?;
        let outbox_backlog = IntGauge::new(
            "cqrs_mutation_outbox_backlog",
            "Events not yet acknowledged by Kafka",
        )?;
        let outbox_oldest_age_seconds = Gauge::new(
            "cqrs_mutation_outbox_oldest_age_seconds",
            "Age of the oldest unpublished event",
        )?;
        let relay_published = IntCounter::new(
            "cqrs_mutation_relay_published_total",
            "Events acknowledged by Kafka",
        )?;
        let relay_errors =
            IntCounter::new("cqrs_mutation_relay_errors_total", "Failed relay rounds")?;
        let relay_batch_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cqrs_mutation_relay_batch_duration_seconds",
                "Read, publish, ack and delete of one batch",
            )
            .buckets(buckets_seconds()),
        )?;
        let relay_leader = IntGauge::new(
            "cqrs_mutation_relay_leader",
            "1 while this replica holds the relay lock",
        )?;
        registry.register(Box::new(commands.clone()))?;
        registry.register(Box::new(command_seconds.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(batch_seconds.clone()))?;
        registry.register(Box::new(bulk_created.clone()))?;
        registry.register(Box::new(password_hash_seconds.clone()))?;
        registry.register(Box::new(outbox_backlog.clone()))?;
        registry.register(Box::new(outbox_oldest_age_seconds.clone()))?;
        registry.register(Box::new(relay_published.clone()))?;
        registry.register(Box::new(relay_errors.clone()))?;
        registry.register(Box::new(relay_batch_seconds.clone()))?;
        registry.register(Box::new(relay_leader.clone()))?;
        Ok(Self {
            commands,
            command_seconds,
            batch_size,
            batch_seconds,
            bulk_created,
            password_hash_seconds,
            outbox_backlog,
            outbox_oldest_age_seconds,
            relay_published,
            relay_errors,
            relay_batch_seconds,
            relay_leader,
        })
    }
}
