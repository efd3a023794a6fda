//! Prometheus metrics of the operator (`cqrs_operator_*`).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub reconciles: IntCounterVec,
    pub failures: IntCounterVec,
    pub duration: HistogramVec,
    pub stack_ready: IntGaugeVec,
    pub rebuild_progress: prometheus::GaugeVec,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reconciles = IntCounterVec::new(
            Opts::new(
                "cqrs_operator_reconciles_total",
                "Reconciliations of CqrsStack objects by result",
            ),
            &["result"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "cqrs_operator_reconcile_failures_total",
                "Failed reconciliations by reason",
            ),
            &["reason"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "cqrs_operator_reconcile_duration_seconds",
                "Duration of one reconciliation",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &[],
        )?;
        let stack_ready = IntGaugeVec::new(
            Opts::new(
                "cqrs_operator_stack_ready",
                "1 when the CqrsStack's Ready condition is True",
            ),
            &["namespace", "name"],
        )?;
        let rebuild_progress = prometheus::GaugeVec::new(
            Opts::new(
                "cqrs_operator_rebuild_progress",
                "Progress (0..1) of a running projection rebuild",
            ),
            &["namespace", "name", "generation"],
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(stack_ready.clone()))?;
        registry.register(Box::new(rebuild_progress.clone()))?;
        Ok(Self {
            reconciles,
            failures,
            duration,
            stack_ready,
            rebuild_progress,
        })
    }
}
