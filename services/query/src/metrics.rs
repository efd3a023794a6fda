//! `cqrs_query_*` Prometheus metrics, registered on a per-application registry.

use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, exponential_buckets,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub events_applied: IntCounterVec,
    pub events_skipped: IntCounterVec,
    pub apply_failures: IntCounterVec,
    pub min_version_reads: IntCounter,
    pub batch_size: HistogramVec,
    pub apply_seconds: HistogramVec,
    pub end_to_end_seconds: HistogramVec,
    pub consumer_lag: IntGaugeVec,
    pub dlq_total: IntCounterVec,
    pub dlq_count: IntGauge,
    pub read_seconds: HistogramVec,
    pub serving_generation: IntGauge,
    pub rebuild_generation: IntGauge,
    pub rebuild_progress: Gauge,
    pub rebuild_lag: IntGauge,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are static and unique within this fresh registry, so registration cannot fail.
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    c
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        let lat = exponential_buckets(0.0005, 2.0, 18)?;
        Ok(Self {
            events_applied: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "cqrs_query_events_applied_total",
                        "Events applied to a read model, by type",
                    ),
                    &["generation", "type"],
                )?,
            ),
            events_skipped: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "cqrs_query_events_skipped_total",
                        "Events skipped (duplicates: version <= doc version)",
                    ),
                    &["generation", "reason"],
                )?,
            ),
            apply_failures: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "cqrs_query_apply_failures_total",
                        "Failed attempts to apply a batch (retried; offsets not committed), by kind",
                    ),
                    &["generation", "kind"],
                )?,
            ),
            min_version_reads: reg(
                &r,
                IntCounter::new(
                    "cqrs_query_min_version_reads_total",
                    "MongoDB reads made by X-Min-Version requests (first read, wake-ups and fallback re-reads)",
                )?,
            ),
            batch_size: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("cqrs_query_batch_size", "Messages per applied batch")
                        .buckets(exponential_buckets(1.0, 2.0, 12)?),
                    &["generation"],
                )?,
            ),
            apply_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "cqrs_query_apply_seconds",
                        "Time to apply one batch to MongoDB",
                    )
                    .buckets(lat.clone()),
                    &["generation"],
                )?,
            ),
            end_to_end_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "cqrs_query_end_to_end_lag_seconds",
                        "Event occurredAt → applied to the read model",
                    )
                    .buckets(exponential_buckets(0.001, 2.0, 18)?),
                    &["generation"],
                )?,
            ),
            consumer_lag: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "cqrs_query_consumer_lag",
                        "Messages not yet applied, per partition",
                    ),
                    &["generation", "topic", "partition"],
                )?,
            ),
            dlq_total: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "cqrs_query_dlq_total",
                        "Events sent to the dead-letter topic by this process",
                    ),
                    &["reason"],
                )?,
            ),
            dlq_count: reg(
                &r,
                IntGauge::new(
                    "cqrs_query_dlq_messages",
                    "Messages in the dead-letter topic",
                )?,
            ),
            read_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("cqrs_query_read_seconds", "HTTP read latency by route")
                        .buckets(lat),
                    &["route", "status"],
                )?,
            ),
            serving_generation: reg(
                &r,
                IntGauge::new(
                    "cqrs_query_serving_generation",
                    "Projection generation serving reads",
                )?,
            ),
            rebuild_generation: reg(
                &r,
                IntGauge::new(
                    "cqrs_query_rebuild_generation",
                    "Generation being rebuilt (0 = none)",
                )?,
            ),
            rebuild_progress: reg(
                &r,
                Gauge::new(
                    "cqrs_query_rebuild_progress",
                    "Progress of the running rebuild, 0..1",
                )?,
            ),
            rebuild_lag: reg(
                &r,
                IntGauge::new(
                    "cqrs_query_rebuild_lag",
                    "Messages the rebuild still has to apply",
                )?,
            ),
            registry: r,
        })
    }
}
