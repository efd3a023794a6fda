//! `load`: a steady read/write load through a gateway that runs elsewhere (a Kubernetes cluster) while an outside
//! script performs a day-2 operation (scale, rolling update, pod kill, projection rebuild); then every failed
//! request is reported with its status and time, and, given PostgreSQL and Kafka, every acknowledged command is
//! checked to exist exactly once (as `chaos` does).
//!
//! The protocol with the orchestrator: the load starts; once `warmup_acks` writes are acknowledged it creates
//! the ready file; it runs until the stop file exists (polled every 100 ms), the `shutdown` future resolves
//! (SIGTERM/SIGINT in the binary) or `max` passes (a failure).

use std::{
    collections::BTreeMap,
    future::Future,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;

use crate::{
    E2eError,
    chaos::{Load, run_load},
    client::Gateway,
    stats::{PhaseSummary, Recorder},
    verify::{self, Ack, ExactlyOnce},
};

/// How often the stop file is looked for (and progress is counted).
const POLL: Duration = Duration::from_millis(100);
/// `Prefer: wait=` of the reads: how long the query service may wait for the acknowledged version.
const READ_WAIT_SECS: u64 = 5;
/// Reads in flight at most.
const MAX_READS_IN_FLIGHT: usize = 64;

/// Where the exactly-once checks look (the gateway's own `/sync-status` tells when to start).
#[derive(Debug, Clone)]
pub struct CheckTarget {
    pub pg_url: String,
    pub kafka_bootstrap: String,
    pub topic_prefix: String,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A label for the report and the printed lines (e.g. `scale-query`).
    pub name: String,
    /// Writes per second.
    pub rate: u32,
    /// Reads per write (0: no reads).
    pub reads_per_write: u32,
    /// The load runs until this file exists.
    pub stop_file: PathBuf,
    /// Created once `warmup_acks` writes are acknowledged.
    pub ready_file: Option<PathBuf>,
    pub warmup_acks: u64,
    /// Longest run; reaching it is a failure.
    pub max: Duration,
    /// Run the exactly-once checks after the load.
    pub checks: Option<CheckTarget>,
    /// How long the read model may take to catch up after the load.
    pub catch_up_timeout: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            name: "load".into(),
            rate: 40,
            reads_per_write: 2,
            stop_file: PathBuf::from("load.stop"),
            ready_file: None,
            warmup_acks: 20,
            max: Duration::from_secs(600),
            checks: None,
            catch_up_timeout: Duration::from_secs(180),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    StopFile,
    Signal,
    /// `max` passed before the stop file appeared: a failure.
    MaxDuration,
}

/// The outcome of the writes or of the reads.
#[derive(Debug, Clone, Serialize)]
pub struct Requests {
    /// 2xx answers.
    pub ok: u64,
    /// Non-2xx answers and transport errors.
    pub failed: u64,
    /// `failed` by HTTP status, or `transport`.
    pub by_status: BTreeMap<String, u64>,
    /// 2xx answers with wrong content (a write without id/version, a read below the acknowledged version).
    pub mismatched: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Seconds since the load started of the first and the last failure (or mismatch).
    pub first_failure_s: Option<f64>,
    pub last_failure_s: Option<f64>,
}

impl From<PhaseSummary> for Requests {
    fn from(s: PhaseSummary) -> Self {
        Self {
            ok: s.ok,
            failed: s.errors.values().sum(),
            by_status: s.errors,
            mismatched: s.mismatches,
            p50_ms: s.p50_ms,
            p99_ms: s.p99_ms,
            max_ms: s.max_ms,
            first_failure_s: s.first_failure_s,
            last_failure_s: s.last_failure_s,
        }
    }
}

impl Requests {
    pub fn clean(&self) -> bool {
        self.failed == 0 && self.mismatched == 0
    }

    fn line(&self, what: &str) -> String {
        let mut s = format!(
            "{what:<6}: {} ok, {} failed, {} mismatched; p50 {:.2}ms p99 {:.2}ms max {:.2}ms",
            self.ok, self.failed, self.mismatched, self.p50_ms, self.p99_ms, self.max_ms
        );
        if !self.by_status.is_empty() {
            let by: Vec<String> = self
                .by_status
                .iter()
                .map(|(k, v)| format!("{k}×{v}"))
                .collect();
            s.push_str(&format!(" [{}]", by.join(" ")));
        }
        if let (Some(a), Some(b)) = (self.first_failure_s, self.last_failure_s) {
            s.push_str(&format!(" failures from {a:.2}s to {b:.2}s"));
        }
        s
    }
}

/// The exactly-once checks after the load.
#[derive(Debug, Clone, Serialize)]
pub struct LoadChecks {
    #[serde(flatten)]
    pub tallies: ExactlyOnce,
    pub lost: u64,
    pub duplicated: u64,
    pub kafka_redelivered: u64,
    /// From the end of the load until `/sync-status` said caught up.
    pub catch_up_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub name: String,
    /// From the start of the load until it stopped (without the checks).
    pub duration_s: f64,
    pub stopped_by: StopReason,
    /// When `warmup_acks` writes were acknowledged and the ready file created (seconds since the start).
    pub ready_s: Option<f64>,
    pub writes: Requests,
    pub reads: Requests,
    /// Writes acknowledged (2xx with id and version).
    pub acknowledged: u64,
    /// `postgres`, `kafka`, `read_model`, `lost`, `duplicated`, `kafka_redelivered`, `catch_up_s` when the
    /// checks ran.
    #[serde(flatten)]
    pub checks: Option<LoadChecks>,
    /// Why the checks could not finish (e.g. not caught up in time); a failure.
    pub check_error: Option<String>,
}

impl LoadReport {
    /// No failed request, no check finding (Kafka redeliveries alone are fine), stopped in time.
    pub fn passed(&self) -> bool {
        self.writes.clean()
            && self.reads.clean()
            && self.stopped_by != StopReason::MaxDuration
            && self.check_error.is_none()
            && self.checks.as_ref().is_none_or(|c| c.tallies.passed())
    }

    pub fn print(&self) {
        let stopped = match self.stopped_by {
            StopReason::StopFile => "the stop file",
            StopReason::Signal => "a signal",
            StopReason::MaxDuration => "the maximum duration (FAILED)",
        };
        let ready = self
            .ready_s
            .map_or_else(|| "never ready".to_owned(), |r| format!("ready at {r:.2}s"));
        println!(
            "load {}: {:.2}s, stopped by {stopped}, {ready}, {} writes acknowledged",
            self.name, self.duration_s, self.acknowledged
        );
        println!("  {}", self.writes.line("writes"));
        println!("  {}", self.reads.line("reads"));
        if let Some(c) = &self.checks {
            println!("  caught up {:.2}s after the load stopped", c.catch_up_s);
            c.tallies.print();
            println!(
                "  LOST {} / DUPLICATED {} (Kafka redeliveries, at-least-once: {})",
                c.lost, c.duplicated, c.kafka_redelivered
            );
        }
        if let Some(e) = &self.check_error {
            println!("  checks FAILED: {e}");
        }
        let (lost, dup) = self.checks.as_ref().map_or_else(
            || ("n/a".to_owned(), "n/a".to_owned()),
            |c| (c.lost.to_string(), c.duplicated.to_string()),
        );
        println!(
            "load {}: {}/{} writes, {}/{} reads, lost {lost}, duplicated {dup}",
            self.name, self.writes.ok, self.writes.failed, self.reads.ok, self.reads.failed
        );
    }
}

/// One GET of an acknowledged aggregate with read-your-writes.
async fn read_one(gw: &Gateway, a: &Ack, rec: &Recorder) {
    let path = format!("/{}/{}", a.aggregate.as_str(), a.id);
    match gw
        .get_waiting(&path, Some(a.version), Some(READ_WAIT_SECS))
        .await
    {
        Ok(r) if r.ok() => {
            rec.ok(r.latency);
            if r.version().unwrap_or(0) < a.version {
                rec.mismatch();
            }
        }
        Ok(r) => rec.error(r.status.as_str(), Some(r.latency)),
        Err(_) => rec.error("transport", None),
    }
}

/// Reads random acknowledged aggregates at `per_s` until `load.stop`.
async fn run_reads(gw: Gateway, load: Arc<Load>, rec: Arc<Recorder>, per_s: u32) {
    if per_s == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(per_s)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let inflight = Arc::new(tokio::sync::Semaphore::new(MAX_READS_IN_FLIGHT));
    let mut rng = StdRng::from_os_rng();
    let mut tasks = tokio::task::JoinSet::new();
    while !load.stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let pick = load
            .acks
            .lock()
            .ok()
            .and_then(|a| (!a.is_empty()).then(|| a[rng.random_range(0..a.len())].clone()));
        let Some(ack) = pick else { continue };
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            break;
        };
        let (gw, rec) = (gw.clone(), rec.clone());
        tasks.spawn(async move {
            read_one(&gw, &ack, &rec).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

fn io_err(what: &str, p: &std::path::Path, e: std::io::Error) -> E2eError {
    E2eError::Setup(format!("{what} {}: {e}", p.display()))
}

/// Runs the load against `gw` until the stop file exists, `shutdown` resolves or `o.max` passes; then the
/// checks when `o.checks` is given. Errors only for setup problems (a stale stop file, an unwritable ready
/// file); failed requests and check findings are in the report.
pub async fn run<F>(gw: &Gateway, o: &LoadOptions, shutdown: F) -> Result<LoadReport, E2eError>
where
    F: Future<Output = ()>,
{
    let stale = o
        .stop_file
        .try_exists()
        .map_err(|e| io_err("checking", &o.stop_file, e))?;
    if stale {
        return Err(E2eError::Setup(format!(
            "the stop file {} exists already: remove it before starting the load",
            o.stop_file.display()
        )));
    }
    if let Some(r) = &o.ready_file {
        match std::fs::remove_file(r) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing the stale ready file", r, e)),
        }
    }

    let started = Instant::now();
    let load = Arc::new(Load::new(Recorder::started_at("writes", started)));
    let reads = Arc::new(Recorder::started_at("reads", started));
    let writer = tokio::spawn(run_load(gw.clone(), load.clone(), o.rate));
    let reader = tokio::spawn(run_reads(
        gw.clone(),
        load.clone(),
        reads.clone(),
        o.rate.saturating_mul(o.reads_per_write),
    ));

    let mut ready_s = None;
    let mut last_progress = started;
    let mut poll = tokio::time::interval(POLL);
    tokio::pin!(shutdown);
    let outcome = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(StopReason::Signal),
            _ = poll.tick() => {}
        }
        let acked = load.acked.load(Ordering::SeqCst);
        if ready_s.is_none() && acked >= o.warmup_acks {
            if let Some(r) = &o.ready_file
                && let Err(e) = std::fs::write(r, format!("{acked}\n"))
            {
                break Err(io_err("writing the ready file", r, e));
            }
            ready_s = Some(started.elapsed().as_secs_f64());
            eprintln!(
                "load {}: ready ({acked} writes acknowledged) at {:.2}s",
                o.name,
                started.elapsed().as_secs_f64()
            );
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            let (w_done, w_failed) = (load.rec.done(), load.rec.failed());
            let (r_done, r_failed) = (reads.done(), reads.failed());
            eprintln!(
                "load {}: t={:.1}s writes_ok={} writes_failed={w_failed} reads_ok={} reads_failed={r_failed} acked={acked}",
                o.name,
                started.elapsed().as_secs_f64(),
                w_done.saturating_sub(w_failed),
                r_done.saturating_sub(r_failed),
            );
        }
        match o.stop_file.try_exists() {
            Ok(true) => break Ok(StopReason::StopFile),
            Ok(false) => {}
            Err(e) => break Err(io_err("checking", &o.stop_file, e)),
        }
        if started.elapsed() >= o.max {
            eprintln!(
                "load {}: no stop file after {:?}: stopping (a failure)",
                o.name, o.max
            );
            break Ok(StopReason::MaxDuration);
        }
    };
    load.stop.store(true, Ordering::SeqCst);
    let _ = tokio::join!(writer, reader);
    load.rec.finish();
    reads.finish();
    let duration_s = started.elapsed().as_secs_f64();
    let stopped_by = outcome?;
    let acks = load.acks.lock().map(|a| a.clone()).unwrap_or_default();

    let (mut checks, mut check_error) = (None, None);
    if let Some(t) = &o.checks {
        eprintln!(
            "load {}: waiting for the read model, then checking {} acknowledged commands…",
            o.name,
            acks.len()
        );
        let r = async {
            let catch_up = gw.wait_caught_up(o.catch_up_timeout).await?;
            let tallies = verify::check_exactly_once(
                gw,
                &t.pg_url,
                &t.kafka_bootstrap,
                &t.topic_prefix,
                &acks,
            )
            .await?;
            Ok::<_, E2eError>(LoadChecks {
                lost: tallies.lost(),
                duplicated: tallies.duplicated(),
                kafka_redelivered: tallies.kafka_redelivered(),
                catch_up_s: catch_up.as_secs_f64(),
                tallies,
            })
        }
        .await;
        match r {
            Ok(c) => checks = Some(c),
            Err(e) => check_error = Some(e.to_string()),
        }
    }
    Ok(LoadReport {
        name: o.name.clone(),
        duration_s,
        stopped_by,
        ready_s,
        writes: load.rec.summary().into(),
        reads: reads.summary().into(),
        acknowledged: acks.len() as u64,
        checks,
        check_error,
    })
}
