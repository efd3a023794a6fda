//! `bench`: a ramp of write rates (and a read mix) through the gateway, measuring accepted commands/s,
//! visibility latency (201 → readable) and projection lag over time; plus raw baselines of the same machine in
//! the same run: pgbench of the same transaction, a raw bulk insert into the Mongo-wire server, a raw Kafka
//! produce. Our figures are printed as ratios of them.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    E2eError,
    client::Gateway,
    stats::{PhaseSummary, Recorder, quantile},
    svg,
};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Target write rates (commands/s) of the ramp; 0 = closed loop at `max_concurrency` (as fast as accepted).
    pub rates: Vec<u32>,
    /// Seconds per step.
    pub step_secs: u64,
    /// Read mixes: reads issued per write, e.g. 0, 1, 4; every rate runs with every mix. Each read is of a
    /// product written earlier in the run, with `X-Min-Version: 1` (a just-written one waits until visible).
    pub read_ratios: Vec<u32>,
    pub max_concurrency: usize,
    /// Every n-th write also measures its visibility latency.
    pub visibility_every: u64,
    /// Client connections of pgbench: each count is run and the best rate is the baseline (a baseline run
    /// at a poor concurrency would flatter us).
    pub pgbench_clients: Vec<u32>,
    pub baseline_secs: u64,
    /// Documents of the raw Mongo insert, messages of the raw Kafka produce.
    pub mongo_docs: usize,
    pub kafka_msgs: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            rates: vec![100, 200, 400, 800, 0],
            step_secs: 10,
            read_ratios: vec![0, 4],
            max_concurrency: 64,
            visibility_every: 10,
            pgbench_clients: vec![8, 32, 128],
            baseline_secs: 10,
            mongo_docs: 20_000,
            kafka_msgs: 100_000,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub target_rate: u32,
    pub read_ratio: u32,
    pub writes: PhaseSummary,
    pub reads: PhaseSummary,
    pub accepted_per_s: f64,
    pub visibility_p50_ms: f64,
    pub visibility_p99_ms: f64,
    pub visibility_samples: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t: f64,
    pub accepted_per_s: f64,
    pub lag_messages: i64,
    pub relay_backlog: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Baselines {
    pub pgbench_tps: Option<f64>,
    pub pgbench_note: String,
    pub mongo_insert_docs_per_s: Option<f64>,
    pub kafka_produce_msgs_per_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub steps: Vec<Step>,
    pub series: Vec<Sample>,
    pub baselines: Baselines,
    pub best_accepted_per_s: f64,
    pub ratio_to_pgbench: Option<f64>,
    pub ratio_to_mongo_insert: Option<f64>,
    pub ratio_to_kafka_produce: Option<f64>,
}

impl BenchReport {
    pub fn print(&self) {
        println!("bench:");
        for s in &self.steps {
            println!(
                "  target {:>5}/s reads×{}: accepted {:>8.1}/s  write p50 {:>7.2}ms p99 {:>8.2}ms  visible p50 {:>7.2}ms p99 {:>8.2}ms  errors {:?}",
                if s.target_rate == 0 {
                    "max".to_owned()
                } else {
                    s.target_rate.to_string()
                },
                s.read_ratio,
                s.accepted_per_s,
                s.writes.p50_ms,
                s.writes.p99_ms,
                s.visibility_p50_ms,
                s.visibility_p99_ms,
                s.writes.errors
            );
        }
        let b = &self.baselines;
        let f = |x: Option<f64>| x.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.0}"));
        let r = |x: Option<f64>| x.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}×"));
        println!(
            "  raw pgbench (same transaction): {} tps ({})",
            f(b.pgbench_tps),
            b.pgbench_note
        );
        println!(
            "  raw Mongo-wire insert_many:     {} docs/s",
            f(b.mongo_insert_docs_per_s)
        );
        println!(
            "  raw Kafka produce (acks=all):   {} msgs/s",
            f(b.kafka_produce_msgs_per_s)
        );
        println!(
            "  ours: best {:.0} accepted creates/s = {} of pgbench, {} of Mongo insert, {} of Kafka produce",
            self.best_accepted_per_s,
            r(self.ratio_to_pgbench),
            r(self.ratio_to_mongo_insert),
            r(self.ratio_to_kafka_produce)
        );
    }

    pub fn svg(&self) -> String {
        svg::chart(
            "CQRS bench: accepted creates/s and projection lag",
            "seconds",
            &[
                svg::Series {
                    label: "accepted commands/s",
                    color: "#1f77b4",
                    points: self
                        .series
                        .iter()
                        .map(|s| (s.t, s.accepted_per_s))
                        .collect(),
                },
                svg::Series {
                    label: "projection lag (messages)",
                    color: "#d62728",
                    points: self
                        .series
                        .iter()
                        .map(|s| (s.t, s.lag_messages as f64))
                        .collect(),
                },
                svg::Series {
                    label: "relay backlog (events)",
                    color: "#2ca02c",
                    points: self
                        .series
                        .iter()
                        .map(|s| (s.t, s.relay_backlog as f64))
                        .collect(),
                },
            ],
        )
    }
}

fn lag_of(status: &Value) -> (i64, i64) {
    let lag = status["projections"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["lagMessages"].as_i64()).sum())
        .unwrap_or(0);
    let backlog = status["relay"]["backlog"].as_i64().unwrap_or(0);
    (lag, backlog)
}

/// Visibility probes waiting at once, at most.
const PROBES: usize = 64;

async fn run_step(
    gw: &Gateway,
    o: &BenchOptions,
    rate: u32,
    read_ratio: u32,
    acked: Arc<AtomicU64>,
    ids: Arc<Mutex<Vec<String>>>,
) -> Step {
    let writes = Arc::new(Recorder::new("writes"));
    let reads = Arc::new(Recorder::new("reads"));
    let vis = Arc::new(Mutex::new(Vec::<f64>::new()));
    let end = Instant::now() + Duration::from_secs(o.step_secs);
    let seq = Arc::new(AtomicU64::new(0));
    let probes = Arc::new(Mutex::new(Vec::<tokio::task::JoinHandle<()>>::new()));
    let probe_slots = Arc::new(tokio::sync::Semaphore::new(PROBES));
    let one = {
        let (gw, writes, reads, vis, acked, ids, seq, probes, probe_slots) = (
            gw.clone(),
            writes.clone(),
            reads.clone(),
            vis.clone(),
            acked.clone(),
            ids.clone(),
            seq.clone(),
            probes.clone(),
            probe_slots.clone(),
        );
        let (every, ratio) = (o.visibility_every.max(1), read_ratio);
        move || {
            let (gw, writes, reads, vis, acked, ids, seq, probes, probe_slots) = (
                gw.clone(),
                writes.clone(),
                reads.clone(),
                vis.clone(),
                acked.clone(),
                ids.clone(),
                seq.clone(),
                probes.clone(),
                probe_slots.clone(),
            );
            async move {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let body = json!({"name": format!("bench {n}"), "price": format!("{}.{:02}", 1 + n % 997, n % 100), "description": "bench"});
                match gw.post("/product", &body).await {
                    Ok(r) if r.status.as_u16() == 201 => {
                        writes.ok(r.latency);
                        acked.fetch_add(1, Ordering::Relaxed);
                        if let (Some(id), Some(v)) = (r.id(), r.version()) {
                            if n % every == 0
                                && let Ok(slot) = probe_slots.clone().try_acquire_owned()
                            {
                                // Beside the write loop, not in it: a client waiting for visibility would
                                // otherwise stop writing, and the step would measure its own probes. At most
                                // `PROBES` wait at once (a sample is skipped when all are busy), so a lagging
                                // read model cannot pile up waiting requests in front of the gateway.
                                let t = Instant::now();
                                let (gw, vis, path) =
                                    (gw.clone(), vis.clone(), format!("/product/{id}"));
                                let probe = tokio::spawn(async move {
                                    let _slot = slot;
                                    if let Ok(g) = gw.get_waiting(&path, Some(v), Some(8)).await
                                        && g.ok()
                                        && let Ok(mut vv) = vis.lock()
                                    {
                                        vv.push(t.elapsed().as_secs_f64() * 1000.0);
                                    }
                                });
                                if let Ok(mut p) = probes.lock() {
                                    p.push(probe);
                                }
                            }
                            if let Ok(mut i) = ids.lock()
                                && i.len() < 100_000
                            {
                                i.push(id);
                            }
                        }
                    }
                    Ok(r) => writes.error(r.status.as_str(), Some(r.latency)),
                    Err(_) => writes.error("transport", None),
                }
                for k in 0..ratio {
                    let id = ids.lock().ok().and_then(|i| {
                        (!i.is_empty())
                            .then(|| i[(n as usize + k as usize * 7919) % i.len()].clone())
                    });
                    if let Some(id) = id {
                        match gw.get(&format!("/product/{id}"), Some(1)).await {
                            Ok(r) if r.ok() => reads.ok(r.latency),
                            Ok(r) => reads.error(r.status.as_str(), Some(r.latency)),
                            Err(_) => reads.error("transport", None),
                        }
                    }
                }
            }
        }
    };
    if rate == 0 {
        // Closed loop: max_concurrency clients as fast as they are answered.
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..o.max_concurrency {
            let one = one.clone();
            set.spawn(async move {
                while Instant::now() < end {
                    one().await;
                }
            });
        }
        while set.join_next().await.is_some() {}
    } else {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let sem = Arc::new(tokio::sync::Semaphore::new(o.max_concurrency * 4));
        let mut set = tokio::task::JoinSet::new();
        while Instant::now() < end {
            tick.tick().await;
            let Ok(p) = sem.clone().acquire_owned().await else {
                break;
            };
            let f = one();
            set.spawn(async move {
                f.await;
                drop(p);
            });
            while set.try_join_next().is_some() {}
        }
        while set.join_next().await.is_some() {}
    }
    writes.finish();
    reads.finish();
    let pending: Vec<_> = probes
        .lock()
        .map(|mut p| p.drain(..).collect())
        .unwrap_or_default();
    for p in pending {
        let _ = p.await;
    }
    let v = vis.lock().map(|v| v.clone()).unwrap_or_default();
    let ws = writes.summary();
    Step {
        target_rate: rate,
        read_ratio,
        accepted_per_s: ws.ok as f64 / ws.duration_s.max(0.001),
        writes: ws,
        reads: reads.summary(),
        visibility_p50_ms: quantile(&v, 0.5),
        visibility_p99_ms: quantile(&v, 0.99),
        visibility_samples: v.len(),
    }
}

/// The ramp through the gateway, with a lag sampler running alongside.
pub async fn run_ramp(gw: &Gateway, o: &BenchOptions) -> (Vec<Step>, Vec<Sample>) {
    let acked = Arc::new(AtomicU64::new(0));
    let ids = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (gw, acked, stop) = (gw.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut out = Vec::new();
            let mut last = (0.0f64, 0u64);
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                let (lag, backlog) = gw
                    .sync_status()
                    .await
                    .map(|s| lag_of(&s))
                    .unwrap_or((-1, -1));
                let t = t0.elapsed().as_secs_f64();
                let a = acked.load(Ordering::Relaxed);
                let rate = if t > last.0 {
                    (a - last.1) as f64 / (t - last.0)
                } else {
                    0.0
                };
                last = (t, a);
                out.push(Sample {
                    t,
                    accepted_per_s: rate,
                    lag_messages: lag,
                    relay_backlog: backlog,
                });
            }
            out
        })
    };
    let mut steps = Vec::new();
    for &ratio in &o.read_ratios {
        for &rate in &o.rates {
            let label = if rate == 0 {
                "max".to_owned()
            } else {
                rate.to_string()
            };
            eprintln!("  bench: step {label} writes/s, {ratio} reads per write");
            steps.push(run_step(gw, o, rate, ratio, acked.clone(), ids.clone()).await);
            // Let the projection catch up between steps (bounded), so each step starts level.
            let _ = gw.wait_caught_up(Duration::from_secs(120)).await;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let series = sampler.await.unwrap_or_default();
    (steps, series)
}

/// pgbench of the product-creation transaction (state row + event row + outbox row) on a scratch database of
/// the same server, with the same columns and indexes.
pub async fn pgbench(
    pg_admin_url: &str,
    clients: u32,
    secs: u64,
) -> Result<(f64, String), E2eError> {
    use sqlx::Connection;
    let db = format!(
        "pgbench_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut admin = sqlx::PgConnection::connect(pg_admin_url)
        .await
        .map_err(|e| E2eError::Infra(e.to_string()))?;
    sqlx::query(sqlx::AssertSqlSafe(format!("create database \"{db}\"")))
        .execute(&mut admin)
        .await
        .map_err(|e| E2eError::Infra(e.to_string()))?;
    let base = pg_admin_url
        .rsplit_once('/')
        .map_or(pg_admin_url, |(b, _)| b);
    let url = format!("{base}/{db}");
    let mut c = sqlx::PgConnection::connect(&url)
        .await
        .map_err(|e| E2eError::Infra(e.to_string()))?;
    for ddl in [
        "CREATE TABLE products (id uuid PRIMARY KEY, name text NOT NULL, price_cents bigint NOT NULL CHECK (price_cents >= 0), description text, version bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(), deleted_at timestamptz)",
        "CREATE TABLE events (position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, event_id uuid NOT NULL UNIQUE, aggregate_type text NOT NULL, aggregate_id uuid NOT NULL, version bigint NOT NULL CHECK (version >= 1), type text NOT NULL, schema_version int NOT NULL, data jsonb NOT NULL, metadata jsonb NOT NULL DEFAULT '{}'::jsonb, occurred_at timestamptz NOT NULL, UNIQUE (aggregate_id, version))",
        "CREATE TABLE outbox (position bigint PRIMARY KEY REFERENCES events (position), created_at timestamptz NOT NULL DEFAULT now())",
    ] {
        sqlx::query(ddl)
            .execute(&mut c)
            .await
            .map_err(|e| E2eError::Infra(e.to_string()))?;
    }
    let _ = c.close().await;
    let script = "\\set cents random(100, 99999)\n\
BEGIN;\n\
WITH p AS (INSERT INTO products (id, name, price_cents, description, version) VALUES (gen_random_uuid(), 'bench product', :cents, 'bench', 1) RETURNING id),\n\
 e AS (INSERT INTO events (event_id, aggregate_type, aggregate_id, version, type, schema_version, data, occurred_at) SELECT gen_random_uuid(), 'product', p.id, 1, 'PRODUCT-CREATED', 1, jsonb_build_object('name', 'bench product', 'priceCents', :cents, 'description', 'bench'), now() FROM p RETURNING position)\n\
INSERT INTO outbox (position) SELECT position FROM e;\n\
COMMIT;\n";
    let dir = tempfile::tempdir().map_err(|e| E2eError::Infra(e.to_string()))?;
    let file = dir.path().join("create_product.sql");
    std::fs::write(&file, script).map_err(|e| E2eError::Infra(e.to_string()))?;
    let exe = ["/usr/lib/postgresql/15/bin/pgbench", "pgbench"]
        .into_iter()
        .find(|p| !p.contains('/') || std::path::Path::new(p).exists())
        .unwrap_or("pgbench");
    let out = tokio::process::Command::new(exe)
        .args([
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &secs.to_string(),
            "-f",
        ])
        .arg(&file)
        .arg(&url)
        .output()
        .await
        .map_err(|e| E2eError::Infra(format!("pgbench: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "drop database \"{db}\" with (force)"
    )))
    .execute(&mut admin)
    .await;
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps ="))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|s| s.parse::<f64>().ok())
        .ok_or_else(|| {
            E2eError::Infra(format!(
                "pgbench output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        })?;
    Ok((
        tps,
        format!("{clients} clients, {secs}s, 3-row transaction: product + event + outbox"),
    ))
}

/// Raw `insert_many` of product-shaped documents in batches of 500.
pub async fn mongo_insert(url: &str, docs: usize) -> Result<f64, E2eError> {
    let client = mongodb::Client::with_uri_str(url)
        .await
        .map_err(|e| E2eError::Infra(e.to_string()))?;
    let db = client.database(&format!(
        "rawbench_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let coll = db.collection::<mongodb::bson::Document>("products");
    let t = Instant::now();
    let mut n = 0;
    while n < docs {
        let batch: Vec<_> = (n..(n + 500).min(docs))
            .map(|i| mongodb::bson::doc! {"_id": uuid::Uuid::new_v4().to_string(), "name": format!("raw {i}"), "price": "19.99", "priceCents": 1999i64, "description": "bench", "version": 1i64, "lastEventId": uuid::Uuid::new_v4().to_string()})
            .collect();
        coll.insert_many(batch)
            .await
            .map_err(|e| E2eError::Infra(e.to_string()))?;
        n += 500;
    }
    let rate = docs as f64 / t.elapsed().as_secs_f64();
    let _ = db.drop().await;
    Ok(rate)
}

/// Raw idempotent (`acks=all`) produce of envelope-sized messages to a scratch topic.
pub async fn kafka_produce(bootstrap: &str, msgs: usize) -> Result<f64, E2eError> {
    use rdkafka::{
        ClientConfig,
        admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
        client::DefaultClientContext,
        producer::{FutureProducer, FutureRecord},
    };
    let topic = format!(
        "rawbench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| E2eError::Infra(e.to_string()))?;
    admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .map_err(|e| E2eError::Infra(e.to_string()))?;
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .map_err(|e| E2eError::Infra(e.to_string()))?;
    let payload = vec![b'x'; 400];
    let t = Instant::now();
    let results: Vec<bool> = futures::stream::iter(0..msgs)
        .map(|i| {
            let (p, topic, payload) = (p.clone(), topic.clone(), payload.clone());
            async move {
                let key = format!("k{}", i % 1000);
                p.send(
                    FutureRecord::to(&topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .is_ok()
            }
        })
        .buffer_unordered(2000)
        .collect()
        .await;
    let rate = results.iter().filter(|ok| **ok).count() as f64 / t.elapsed().as_secs_f64();
    let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;
    Ok(rate)
}

/// Runs the baselines, then the ramp, and puts the ratios together.
pub async fn run(
    gw: &Gateway,
    pg_admin_url: &str,
    kafka_bootstrap: &str,
    mongo_url: &str,
    o: &BenchOptions,
) -> Result<BenchReport, E2eError> {
    let mut b = Baselines::default();
    eprintln!("  bench: raw pgbench");
    let mut notes = Vec::new();
    for &clients in &o.pgbench_clients {
        match pgbench(pg_admin_url, clients, o.baseline_secs).await {
            Ok((tps, note)) => {
                notes.push(format!("{tps:.0} tps with {note}"));
                if b.pgbench_tps.is_none_or(|best| tps > best) {
                    b.pgbench_tps = Some(tps);
                }
            }
            Err(e) => notes.push(format!("{clients} clients failed: {e}")),
        }
    }
    b.pgbench_note = format!("best of: {}", notes.join("; "));
    eprintln!("  bench: raw Mongo insert");
    b.mongo_insert_docs_per_s = mongo_insert(mongo_url, o.mongo_docs).await.ok();
    eprintln!("  bench: raw Kafka produce");
    b.kafka_produce_msgs_per_s = kafka_produce(kafka_bootstrap, o.kafka_msgs).await.ok();
    let (steps, series) = run_ramp(gw, o).await;
    let best = steps.iter().map(|s| s.accepted_per_s).fold(0.0, f64::max);
    let ratio = |x: Option<f64>| x.filter(|v| *v > 0.0).map(|v| best / v);
    Ok(BenchReport {
        ratio_to_pgbench: ratio(b.pgbench_tps),
        ratio_to_mongo_insert: ratio(b.mongo_insert_docs_per_s),
        ratio_to_kafka_produce: ratio(b.kafka_produce_msgs_per_s),
        best_accepted_per_s: best,
        steps,
        series,
        baselines: b,
    })
}
