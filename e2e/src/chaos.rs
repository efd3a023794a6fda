//! `chaos`: a steady load through the gateway while mutation, query, the Kafka broker and the Mongo-wire server
//! are each `kill -9`ed and restarted in turn; afterwards every acknowledged command must exist exactly once in
//! PostgreSQL, in Kafka (per-aggregate version order) and in the read model.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use cqrs_events::AggregateType;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::{
    E2eError,
    client::Gateway,
    stack::{Component, Stack},
    stats::{PhaseSummary, Recorder},
    verify::{self, Ack, ExactlyOnce},
};

/// The servers a chaos run may kill: its own Kafka and Mongo-wire server.
pub struct ChaosInfra {
    pub kafka: cqrs_devstack::Kafka,
    pub mongo: cqrs_devstack::Mongo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Mutation,
    Query,
    Kafka,
    /// `kill -9` of the Mongo-wire server.
    Mongo,
    /// A graceful stop (SIGTERM) and start of the Mongo-wire server.
    MongoStop,
}

#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Kills per component.
    pub rounds: usize,
    /// Commands per second of the steady load.
    pub rate: u32,
    /// Acknowledged commands to wait for between kills (the load keeps running meanwhile).
    pub acks_between: u64,
    pub targets: Vec<Target>,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        Self {
            rounds: 3,
            rate: 40,
            acks_between: 40,
            targets: vec![
                Target::Mutation,
                Target::Query,
                Target::Kafka,
                Target::Mongo,
            ],
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    pub target: Target,
    pub round: usize,
    /// From the kill until the component was up again (process ready / server accepting).
    pub restart_s: f64,
    /// From the kill until a new write was acknowledged and readable through the gateway.
    pub recovered_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub acknowledged: u64,
    pub load: PhaseSummary,
    pub recoveries: Vec<Recovery>,
    pub catch_up_s: f64,
    /// `postgres`, `kafka` and `read_model` tallies.
    #[serde(flatten)]
    pub checks: ExactlyOnce,
}

impl ChaosReport {
    pub fn lost(&self) -> u64 {
        self.checks.lost()
    }
    /// See [`ExactlyOnce::duplicated`].
    pub fn duplicated(&self) -> u64 {
        self.checks.duplicated()
    }
    /// See [`ExactlyOnce::kafka_redelivered`].
    pub fn kafka_redelivered(&self) -> u64 {
        self.checks.kafka_redelivered()
    }
    pub fn passed(&self) -> bool {
        self.checks.passed()
    }
    pub fn print(&self) {
        println!(
            "chaos: {} commands acknowledged under load",
            self.acknowledged
        );
        println!("  {}", self.load.line());
        for r in &self.recoveries {
            println!(
                "  {:<8} {:<10} round {}: back up in {:>6.2}s, writes+reads recovered in {:>6.2}s",
                if r.target == Target::MongoStop {
                    "stop"
                } else {
                    "kill -9"
                },
                format!("{:?}", r.target).to_lowercase(),
                r.round + 1,
                r.restart_s,
                r.recovered_s
            );
        }
        println!("  caught up {:.2}s after the load stopped", self.catch_up_s);
        self.checks.print();
        println!(
            "  LOST {} / DUPLICATED {} (Kafka redeliveries, at-least-once: {})",
            self.lost(),
            self.duplicated(),
            self.kafka_redelivered()
        );
    }
}

/// The shared state of the write load (also `cqrs-e2e load`'s, see [`crate::load`]).
pub(crate) struct Load {
    /// Every acknowledged command, in acknowledgement order.
    pub(crate) acks: Mutex<Vec<Ack>>,
    users: Mutex<Vec<Uuid>>,
    products: Mutex<Vec<(Uuid, u64)>>,
    pub(crate) acked: AtomicU64,
    pub(crate) stop: AtomicBool,
    /// The writes' outcomes.
    pub(crate) rec: Recorder,
}

impl Load {
    pub(crate) fn new(rec: Recorder) -> Self {
        Self {
            acks: Mutex::new(Vec::new()),
            users: Mutex::new(Vec::new()),
            products: Mutex::new(Vec::new()),
            acked: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            rec,
        }
    }

    fn push(&self, a: Ack) {
        if let Ok(mut v) = self.acks.lock() {
            v.push(a);
        }
        self.acked.fetch_add(1, Ordering::SeqCst);
    }
}

/// One command of the mix (20 % new users, 30 % new products, 30 % orders, 20 % product PATCHes), recorded in
/// `load.rec` and, when acknowledged, in `load.acks`.
pub(crate) async fn one_command(gw: &Gateway, load: &Load, seq: u64, pick: u32) {
    let users: Vec<Uuid> = load.users.lock().map(|u| u.clone()).unwrap_or_default();
    let products: Vec<(Uuid, u64)> = load.products.lock().map(|p| p.clone()).unwrap_or_default();
    let mut rng = StdRng::seed_from_u64(seq);
    let (agg, path, method, body) = if pick < 20 || users.is_empty() {
        (
            AggregateType::User,
            "/user".to_owned(),
            reqwest::Method::POST,
            json!({"email": format!("chaos-{seq}-{}@e2e.example.com", Uuid::new_v4().simple()), "password": "chaos-password-1", "name": format!("Chaos {seq}")}),
        )
    } else if pick < 50 || products.is_empty() {
        (
            AggregateType::Product,
            "/product".to_owned(),
            reqwest::Method::POST,
            json!({"name": format!("Chaos product {seq}"), "price": format!("{}.{:02}", rng.random_range(1..500), rng.random_range(0..100))}),
        )
    } else if pick < 80 {
        let u = users[rng.random_range(0..users.len())];
        let items: Vec<_> = (0..rng.random_range(1..=3))
            .map(|_| json!({"productId": products[rng.random_range(0..products.len())].0, "quantity": rng.random_range(1..=4)}))
            .collect();
        (
            AggregateType::Order,
            "/order".to_owned(),
            reqwest::Method::POST,
            json!({"userId": u, "items": items}),
        )
    } else {
        let (p, _) = products[rng.random_range(0..products.len())];
        (
            AggregateType::Product,
            format!("/product/{p}"),
            reqwest::Method::PATCH,
            json!({"price": format!("{}.{:02}", rng.random_range(1..500), rng.random_range(0..100))}),
        )
    };
    match gw.send_json(method, &path, Some(&body), &[]).await {
        Ok(r) if r.ok() => {
            load.rec.ok(r.latency);
            let (Some(id), Some(version)) =
                (r.id().and_then(|s| Uuid::parse_str(&s).ok()), r.version())
            else {
                load.rec.mismatch();
                return;
            };
            load.push(Ack {
                aggregate: agg,
                id,
                version,
            });
            match agg {
                AggregateType::User => {
                    if let Ok(mut u) = load.users.lock() {
                        u.push(id);
                    }
                }
                AggregateType::Product if version == 1 => {
                    if let Ok(mut p) = load.products.lock() {
                        p.push((id, version));
                    }
                }
                _ => {}
            }
        }
        Ok(r) => load.rec.error(r.status.as_str(), Some(r.latency)),
        Err(_) => load.rec.error("transport", None),
    }
}

/// Runs the write load at `rate` commands/s (at most 64 in flight) until `load.stop`.
pub(crate) async fn run_load(gw: Gateway, load: Arc<Load>, rate: u32) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let inflight = Arc::new(tokio::sync::Semaphore::new(64));
    let mut seq = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    while !load.stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            break;
        };
        seq += 1;
        let pick = (seq.wrapping_mul(2_654_435_761) % 100) as u32;
        let (gw, load) = (gw.clone(), load.clone());
        tasks.spawn(async move {
            one_command(&gw, &load, seq, pick).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Polls until a fresh write is acknowledged and readable with read-your-writes.
async fn probe_until_ok(gw: &Gateway, timeout: Duration) -> Result<(), E2eError> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let body = json!({"name": "chaos probe", "price": "1.00"});
        match gw.post("/product", &body).await {
            Ok(r) if r.ok() => {
                if let (Some(id), Some(v)) = (r.id(), r.version()) {
                    match gw
                        .get_waiting(&format!("/product/{id}"), Some(v), Some(5))
                        .await
                    {
                        Ok(g) if g.ok() => return Ok(()),
                        Ok(g) => last = format!("read {}", g.status),
                        Err(e) => last = e.to_string(),
                    }
                }
            }
            Ok(r) => last = format!("write {} {}", r.status, r.text),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(E2eError::Timeout(format!(
        "no recovery within {timeout:?}: {last}"
    )))
}

async fn wait_acks(load: &Load, n: u64, timeout: Duration) -> Result<(), E2eError> {
    let start = load.acked.load(Ordering::SeqCst);
    let deadline = Instant::now() + timeout;
    while load.acked.load(Ordering::SeqCst) < start + n {
        if Instant::now() > deadline {
            return Err(E2eError::Timeout(format!(
                "load made no progress: {n} acks not reached in {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Runs the chaos scenario against `stack` (whose Kafka and Mongo are `infra`'s).
pub async fn run(
    stack: &mut Stack,
    infra: &mut ChaosInfra,
    o: &ChaosOptions,
) -> Result<ChaosReport, E2eError> {
    let gw = stack.gateway.clone();
    let load = Arc::new(Load::new(Recorder::new("chaos load")));
    let loader = tokio::spawn(run_load(gw.clone(), load.clone(), o.rate));
    let mut recoveries = Vec::new();
    let result = async {
        wait_acks(&load, o.acks_between, Duration::from_secs(60)).await?;
        for round in 0..o.rounds {
            for target in &o.targets {
                let killed = Instant::now();
                eprintln!(
                    "  chaos: {} {target:?} (round {})",
                    if *target == Target::MongoStop {
                        "stop"
                    } else {
                        "kill -9"
                    },
                    round + 1
                );
                match target {
                    Target::Mutation => {
                        stack.kill(Component::Mutation)?;
                        stack.restart(Component::Mutation).await?;
                    }
                    Target::Query => {
                        stack.kill(Component::Query)?;
                        stack.restart(Component::Query).await?;
                    }
                    Target::Kafka => {
                        infra
                            .kafka
                            .kill()
                            .map_err(|e| E2eError::Infra(e.to_string()))?;
                        infra
                            .kafka
                            .start()
                            .await
                            .map_err(|e| E2eError::Infra(e.to_string()))?;
                    }
                    Target::Mongo => {
                        infra
                            .mongo
                            .kill()
                            .map_err(|e| E2eError::Infra(e.to_string()))?;
                        infra
                            .mongo
                            .start()
                            .await
                            .map_err(|e| E2eError::Infra(e.to_string()))?;
                    }
                    Target::MongoStop => {
                        infra
                            .mongo
                            .stop()
                            .await
                            .map_err(|e| E2eError::Infra(e.to_string()))?;
                        infra
                            .mongo
                            .start()
                            .await
                            .map_err(|e| E2eError::Infra(e.to_string()))?;
                    }
                }
                let restart_s = killed.elapsed().as_secs_f64();
                probe_until_ok(&gw, Duration::from_secs(120)).await?;
                let recovered_s = killed.elapsed().as_secs_f64();
                recoveries.push(Recovery {
                    target: *target,
                    round,
                    restart_s,
                    recovered_s,
                });
                wait_acks(&load, o.acks_between, Duration::from_secs(120)).await?;
            }
        }
        Ok::<_, E2eError>(())
    }
    .await;
    load.stop.store(true, Ordering::SeqCst);
    let _ = loader.await;
    load.rec.finish();
    result?;

    let catch_up = gw.wait_caught_up(Duration::from_secs(180)).await?;
    let acks = load.acks.lock().map(|a| a.clone()).unwrap_or_default();
    let checks = verify::check_exactly_once(
        &gw,
        &stack.config.pg_url,
        &stack.config.kafka_bootstrap,
        &stack.config.topic_prefix,
        &acks,
    )
    .await?;
    Ok(ChaosReport {
        acknowledged: acks.len() as u64,
        load: load.rec.summary(),
        recoveries,
        catch_up_s: catch_up.as_secs_f64(),
        checks,
    })
}
