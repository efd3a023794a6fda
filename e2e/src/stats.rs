//! Latency and outcome bookkeeping for one phase of a run.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::Serialize;

/// Collects per-request latencies and outcomes of one phase (shared between concurrent tasks).
#[derive(Debug)]
pub struct Recorder {
    name: String,
    started: Instant,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    latencies_us: Vec<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    mismatches: u64,
    /// When the first and the last error or mismatch happened.
    first_failure: Option<Instant>,
    last_failure: Option<Instant>,
    ended: Option<Instant>,
}

impl Inner {
    fn failed_now(&mut self) {
        let now = Instant::now();
        self.first_failure.get_or_insert(now);
        self.last_failure = Some(now);
    }
}

/// What a phase did.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseSummary {
    pub phase: String,
    pub count: u64,
    pub ok: u64,
    pub duration_s: f64,
    pub rate_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// By HTTP status (or `transport` for connection failures).
    pub errors: BTreeMap<String, u64>,
    /// Answers that arrived but whose content was wrong.
    pub mismatches: u64,
    /// Seconds from the recorder's start to its first and its last error or mismatch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_failure_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure_s: Option<f64>,
}

impl Recorder {
    pub fn new(name: &str) -> Self {
        Self::started_at(name, Instant::now())
    }

    /// A recorder whose durations and failure times count from `started` (several recorders of one run).
    pub fn started_at(name: &str, started: Instant) -> Self {
        Self {
            name: name.to_owned(),
            started,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g)
    }

    pub fn ok(&self, latency: Duration) {
        self.with(|i| {
            i.ok += 1;
            i.latencies_us.push(latency.as_micros() as u64);
        });
    }

    /// `n` records settled by one request of this `latency` (a list page).
    pub fn ok_many(&self, n: u64, latency: Duration) {
        self.with(|i| {
            i.ok += n;
            i.latencies_us.push(latency.as_micros() as u64);
        });
    }

    pub fn error(&self, kind: &str, latency: Option<Duration>) {
        self.with(|i| {
            *i.errors.entry(kind.to_owned()).or_default() += 1;
            i.failed_now();
            if let Some(l) = latency {
                i.latencies_us.push(l.as_micros() as u64);
            }
        });
    }

    pub fn mismatch(&self) {
        self.with(|i| {
            i.mismatches += 1;
            i.failed_now();
        });
    }

    /// Errors and mismatches so far (for progress lines).
    pub fn failed(&self) -> u64 {
        self.with(|i| i.errors.values().sum::<u64>() + i.mismatches)
    }

    /// Requests answered so far (for progress lines).
    pub fn done(&self) -> u64 {
        self.with(|i| i.ok + i.errors.values().sum::<u64>())
    }

    pub fn finish(&self) {
        self.with(|i| i.ended = Some(Instant::now()));
    }

    pub fn summary(&self) -> PhaseSummary {
        self.with(|i| {
            let mut l = i.latencies_us.clone();
            l.sort_unstable();
            let pct = |p: f64| -> f64 {
                if l.is_empty() {
                    return 0.0;
                }
                let idx = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
                l[idx] as f64 / 1000.0
            };
            let duration = i
                .ended
                .unwrap_or_else(Instant::now)
                .duration_since(self.started)
                .as_secs_f64();
            let count = i.ok + i.errors.values().sum::<u64>();
            PhaseSummary {
                phase: self.name.clone(),
                count,
                ok: i.ok,
                duration_s: duration,
                rate_per_s: if duration > 0.0 {
                    count as f64 / duration
                } else {
                    0.0
                },
                p50_ms: pct(0.50),
                p99_ms: pct(0.99),
                max_ms: l.last().map_or(0.0, |m| *m as f64 / 1000.0),
                errors: i.errors.clone(),
                mismatches: i.mismatches,
                first_failure_s: i
                    .first_failure
                    .map(|t| t.duration_since(self.started).as_secs_f64()),
                last_failure_s: i
                    .last_failure
                    .map(|t| t.duration_since(self.started).as_secs_f64()),
            }
        })
    }
}

impl PhaseSummary {
    pub fn line(&self) -> String {
        let errors = if self.errors.is_empty() {
            "none".to_owned()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k}×{v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            "{:<16} {:>8} in {:>8.2}s = {:>9.1}/s  p50 {:>8.2}ms  p99 {:>8.2}ms  max {:>8.2}ms  errors: {}  mismatches: {}",
            self.phase,
            self.count,
            self.duration_s,
            self.rate_per_s,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            errors,
            self.mismatches
        )
    }
}

/// The `p`-quantile (0..=1) of unsorted samples.
pub fn quantile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let idx = ((s.len() as f64 * p).ceil() as usize).clamp(1, s.len()) - 1;
    s[idx]
}

/// Prints `label: done/total` about once a second until `stop` resolves.
pub async fn progress<F>(
    label: String,
    total: u64,
    done: F,
    stop: tokio::sync::watch::Receiver<bool>,
) where
    F: Fn() -> u64 + Send + 'static,
{
    let mut stop = stop;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let d = done();
                let secs = started.elapsed().as_secs_f64();
                eprintln!("  {label}: {d}/{total} ({:.0}/s)", d as f64 / secs.max(0.001));
            }
            r = stop.changed() => { if r.is_err() || *stop.borrow() { return; } }
        }
    }
}
