//! Prometheus metrics, all prefixed `cqrs_gateway_`, registered in the application's own registry.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    exponential_buckets,
};

#[derive(Clone)]
pub struct Metrics {
    /// Proxied requests by route class, method and final status (including the gateway's own refusals).
    pub requests: IntCounterVec,
    /// Time until the response head is ready, by route class and method.
    pub duration: HistogramVec,
    /// Failed upstream exchanges by upstream and kind (connect, timeout, reset, body_timeout, body).
    pub upstream_errors: IntCounterVec,
    /// Retried idempotent reads after a connect failure, by upstream.
    pub retries: IntCounterVec,
    /// Refused authentications/authorizations by reason.
    pub auth_failures: IntCounterVec,
    /// Requests refused by the per-client rate limit.
    pub rate_limited: IntCounter,
    /// Requests shed because `max_in_flight` were being handled.
    pub shed: IntCounter,
    /// Requests refused with 413.
    pub too_large: IntCounter,
    pub in_flight: IntGauge,
    pub open_connections: IntGauge,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "cqrs_gateway_requests_total",
                "Proxied requests by route class, method and status.",
            ),
            &["route", "method", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "cqrs_gateway_request_duration_seconds",
                "Time from request head to response head, by route class and method.",
            )
            // 100µs .. ~52s
            .buckets(exponential_buckets(0.0001, 2.0, 20)?),
            &["route", "method"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "cqrs_gateway_upstream_errors_total",
                "Failed upstream exchanges by upstream and kind.",
            ),
            &["upstream", "kind"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "cqrs_gateway_upstream_retries_total",
                "Reads retried after a connect failure.",
            ),
            &["upstream"],
        )?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "cqrs_gateway_auth_failures_total",
                "Refused requests by authentication/authorization reason.",
            ),
            &["reason"],
        )?;
        let rate_limited = IntCounter::new(
            "cqrs_gateway_rate_limited_total",
            "Requests refused with 429.",
        )?;
        let shed = IntCounter::new(
            "cqrs_gateway_load_shed_total",
            "Requests shed with 503 at max in-flight.",
        )?;
        let too_large = IntCounter::new(
            "cqrs_gateway_body_too_large_total",
            "Requests refused with 413.",
        )?;
        let in_flight =
            IntGauge::new("cqrs_gateway_in_flight_requests", "Requests being handled.")?;
        let open_connections =
            IntGauge::new("cqrs_gateway_open_connections", "Open client connections.")?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(auth_failures.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        registry.register(Box::new(too_large.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(open_connections.clone()))?;
        Ok(Self {
            requests,
            duration,
            upstream_errors,
            retries,
            auth_failures,
            rate_limited,
            shed,
            too_large,
            in_flight,
            open_connections,
        })
    }
}
