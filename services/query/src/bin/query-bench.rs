//! `query-bench`: projection throughput at several batch sizes next to the Mongo-wire server's own raw
//! `insert_many` rate (measured in the same run), and end-to-end lag (produce → applied and visible) at a
//! steady produce rate. Not a test: it prints figures.
//!
//! `devstack start` prints the servers' addresses; then
//! `query-bench --mongo-url mongodb://127.0.0.1:P/?directConnection=true --kafka-bootstrap 127.0.0.1:Q`.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use cqrs_events::{Envelope, EventPayload, ProductCreated, ProductUpdated, Topics};
use cqrs_query::{Application, QueryConfig, ctx::Notice, kafka};
use mongodb::bson::doc;
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(name = "query-bench")]
struct Args {
    #[arg(long, env = "MONGO_URL")]
    mongo_url: String,
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    kafka_bootstrap: String,
    /// Events per throughput run (batch sizes 100 and 1000; batch size 1 uses a tenth).
    #[arg(long, env = "BENCH_EVENTS", default_value_t = 10_000)]
    events: usize,
    /// Steady produce rate for the lag measurement (events/s) and its duration (s).
    #[arg(long, env = "BENCH_RATE", default_value_t = 200)]
    rate: u64,
    #[arg(long, env = "BENCH_SECONDS", default_value_t = 10)]
    seconds: u64,
    /// `all` (throughput table and lag) or `waiters` (apply throughput with and without concurrent
    /// `X-Min-Version` waiters).
    #[arg(long, env = "BENCH_MODE", default_value = "all")]
    mode: String,
    /// Concurrent `X-Min-Version` waiters (mode `waiters`), one per product.
    #[arg(long, env = "BENCH_WAITERS", default_value_t = 2000)]
    waiters: usize,
    /// Updates per product during the waiters run (each waiter waits for the last one).
    #[arg(long, env = "BENCH_UPDATES", default_value_t = 5)]
    updates: u64,
}

/// The fallback re-read of the waiters run without it (longer than any run): only wake-ups read.
const NO_FALLBACK_MS: u64 = 3_600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Creates,
    Updates,
    Mixed,
}

fn product_doc(i: usize) -> mongodb::bson::Document {
    doc! {
        "_id": Uuid::new_v4().to_string(), "name": format!("product {i}"), "price": "19.99", "priceCents": 1999_i64,
        "description": mongodb::bson::Bson::Null, "version": 1_i64, "lastEventId": Uuid::now_v7().to_string(),
        "createdAt": "2026-11-24T00:00:00.000Z", "updatedAt": "2026-11-24T00:00:00.000Z",
    }
}

/// Creates only (`mixed == false`) or a create followed by two updates per product.
fn workload(n: usize, mixed: bool) -> Vec<Envelope> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let id = Uuid::new_v4();
        let i = out.len();
        out.push(Envelope::new(
            id,
            1,
            EventPayload::ProductCreated(ProductCreated {
                name: format!("p{i}"),
                price_cents: 1999,
                description: None,
            }),
        ));
        if mixed {
            for v in 2..=3 {
                if out.len() < n {
                    out.push(Envelope::new(
                        id,
                        v,
                        EventPayload::ProductUpdated(ProductUpdated {
                            name: format!("p{i}"),
                            price_cents: 1999 + v as i64,
                            description: None,
                        }),
                    ));
                }
            }
        }
    }
    out
}

async fn produce(p: &FutureProducer, topics: &Topics, events: &[Envelope]) -> anyhow::Result<()> {
    let topic = topics.for_aggregate(cqrs_events::AggregateType::Product);
    for chunk in events.chunks(2000) {
        let payloads: Vec<(String, Vec<u8>)> = chunk
            .iter()
            .map(|e| (e.aggregate_id.to_string(), e.to_json()))
            .collect();
        let sends = payloads.iter().map(|(k, v)| {
            p.send(
                FutureRecord::to(&topic).key(k).payload(v),
                Duration::from_secs(30),
            )
        });
        for r in futures::future::join_all(sends).await {
            r.map_err(|(e, _)| e).context("produce")?;
        }
    }
    Ok(())
}

async fn fresh(args: &Args, tag: &str) -> anyhow::Result<(QueryConfig, Topics)> {
    let unique = &Uuid::new_v4().simple().to_string()[..8];
    let prefix = format!("bench-{tag}-{unique}");
    let topics = Topics::new(prefix.clone());
    let mut all = topics.event_topics();
    all.push(topics.dlq());
    kafka::ensure_topics(&args.kafka_bootstrap, &all, 3).await?;
    let mut cfg = QueryConfig::new(args.mongo_url.clone(), args.kafka_bootstrap.clone());
    cfg.topic_prefix = prefix;
    cfg.mongo_db = format!("bench_{tag}_{unique}");
    cfg.mutation_url = "http://127.0.0.1:9".into();
    Ok((cfg, topics))
}

fn applied(ctx: &cqrs_query::Ctx) -> f64 {
    ctx.metrics
        .registry
        .gather()
        .iter()
        .filter(|f| f.name() == "cqrs_query_events_applied_total")
        .flat_map(|f| {
            f.get_metric()
                .iter()
                .map(|m| m.get_counter().get_value())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Applies `n` pre-produced events with `batch` and returns events/s from the first applied batch to the last.
/// `Updates`: n products are created first (not measured), then one update each is measured (no two events
/// of one aggregate in a batch, so nothing coalesces: every event is one guarded update).
async fn throughput(
    args: &Args,
    producer: &FutureProducer,
    batch: usize,
    n: usize,
    kind: Kind,
) -> anyhow::Result<f64> {
    let (mut cfg, topics) = fresh(args, &format!("b{batch}")).await?;
    cfg.batch_size = batch;
    cfg.batch_wait_ms = 20;
    let events = workload(n, kind == Kind::Mixed);
    produce(producer, &topics, &events).await?;
    let mut target = n as f64;
    let mut offset = 0.0;
    let app = Application::build(cfg).await?;
    let ctx = app.ctx();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    if kind == Kind::Updates {
        let deadline = Instant::now() + Duration::from_secs(900);
        while applied(&ctx) < n as f64 {
            anyhow::ensure!(Instant::now() < deadline, "creates not applied");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        offset = n as f64;
        target = 2.0 * n as f64;
        let updates: Vec<Envelope> = events
            .iter()
            .map(|e| {
                Envelope::new(
                    e.aggregate_id,
                    2,
                    EventPayload::ProductUpdated(ProductUpdated {
                        name: "u".into(),
                        price_cents: 1,
                        description: None,
                    }),
                )
            })
            .collect();
        produce(producer, &topics, &updates).await?;
    }
    let mut first: Option<(Instant, f64)> = None;
    let deadline = Instant::now() + Duration::from_secs(900);
    let rate = loop {
        let a = applied(&ctx);
        if a > offset && first.is_none() {
            first = Some((Instant::now(), a));
        }
        if a >= target {
            let (t0, a0) = first.unwrap_or((Instant::now(), 0.0));
            let secs = t0.elapsed().as_secs_f64().max(1e-3);
            break (a - a0) / secs;
        }
        anyhow::ensure!(Instant::now() < deadline, "only {a} of {n} applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let _ = tx.send(());
    run.await??;
    Ok(rate)
}

async fn raw_insert_rate(args: &Args, n: usize) -> anyhow::Result<f64> {
    let client = mongodb::Client::with_uri_str(&args.mongo_url).await?;
    let coll = client
        .database(&format!(
            "bench_raw_{}",
            &Uuid::new_v4().simple().to_string()[..8]
        ))
        .collection::<mongodb::bson::Document>("raw");
    let docs: Vec<_> = (0..n).map(product_doc).collect();
    // Create the database and collection first: the projection's rate excludes its first batch too.
    coll.insert_one(product_doc(n)).await?;
    let t = Instant::now();
    for chunk in docs.chunks(1000) {
        coll.insert_many(chunk.to_vec()).ordered(false).await?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// The same server's rate for the update path alone: one `update` command per 100 documents, each statement
/// guarded `{_id, version: {$lt: 2}}` with upsert, on documents that exist (what the projection sends).
async fn raw_guarded_update_rate(args: &Args, n: usize) -> anyhow::Result<f64> {
    let client = mongodb::Client::with_uri_str(&args.mongo_url).await?;
    let db = client.database(&format!(
        "bench_rawu_{}",
        &Uuid::new_v4().simple().to_string()[..8]
    ));
    let coll = db.collection::<mongodb::bson::Document>("raw");
    let docs: Vec<_> = (0..n).map(product_doc).collect();
    for chunk in docs.chunks(1000) {
        coll.insert_many(chunk.to_vec()).await?;
    }
    let t = Instant::now();
    for chunk in docs.chunks(100) {
        let updates: Vec<mongodb::bson::Bson> = chunk
            .iter()
            .map(|d| {
                let mut u = d.clone();
                u.insert("version", 2_i64);
                mongodb::bson::Bson::Document(doc! {
                    "q": {"_id": d.get("_id").cloned(), "version": {"$lt": 2_i64}}, "u": u, "upsert": true,
                })
            })
            .collect();
        db.run_command(doc! {"update": "raw", "updates": updates, "ordered": false})
            .await?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

async fn lag(args: &Args, producer: &FutureProducer) -> anyhow::Result<(f64, f64, usize)> {
    let (cfg, topics) = fresh(args, "lag").await?;
    let app = Application::build(cfg).await?;
    let ctx = app.ctx();
    let mut rx = ctx.notices.subscribe();
    let (tx, stop) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(app.run_until_stopped(async move {
        let _ = stop.await;
    }));
    // Wait until the consumer has joined its group: one warm-up event must come through.
    let warm = workload(1, false);
    produce(producer, &topics, &warm).await?;
    while let Ok(n) = rx.recv().await {
        if matches!(n, Notice::Changed(_)) {
            break;
        }
    }
    let total = usize::try_from(args.rate * args.seconds)?;
    let events = Arc::new(workload(total, false));
    let sent: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let (p, t, ev, s) = (
        producer.clone(),
        topics.clone(),
        events.clone(),
        sent.clone(),
    );
    let rate = args.rate;
    let producing = tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut pending = Vec::new();
        for (i, e) in ev.iter().enumerate() {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate as f64)).await;
            if let Ok(mut m) = s.lock() {
                m.insert(e.aggregate_id.to_string(), Instant::now());
            }
            let (p, t, e) = (p.clone(), t.clone(), e.clone());
            pending.push(tokio::spawn(async move {
                produce(&p, &t, std::slice::from_ref(&e)).await
            }));
        }
        for h in pending {
            h.await??;
        }
        anyhow::Ok(())
    });
    let mut lags = Vec::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(args.seconds * 10 + 60);
    while lags.len() < total && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Ok(Notice::Changed(c))) => {
                let at = sent.lock().ok().and_then(|m| m.get(&c.id).copied());
                if let Some(at) = at {
                    lags.push(at.elapsed().as_secs_f64());
                }
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => anyhow::bail!("notices: {e}"),
        }
    }
    producing.await??;
    let _ = tx.send(());
    run.await??;
    lags.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        lags.get(((lags.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok((pct(0.5), pct(0.99), lags.len()))
}

/// Outcome of one waiters run.
struct WaitersRun {
    rate: f64,
    ok: usize,
    other: usize,
    /// Waiters whose latency was measured.
    measured: usize,
    /// Waiter latency from its product's last version being applied to the answer: p50, p99 (s).
    p50: f64,
    p99: f64,
}

/// `products` products are created, then `updates` updates of each are produced while `waiters` clients (one
/// per product, none if 0) wait with `X-Min-Version` for its last version. Returns the apply rate of the
/// updates (first applied batch to last) and how the waiters fared.
async fn waiters_run(
    args: &Args,
    producer: &FutureProducer,
    products: usize,
    waiters: usize,
    updates: u64,
    recheck_ms: u64,
) -> anyhow::Result<WaitersRun> {
    let (mut cfg, topics) = fresh(args, "waiters").await?;
    cfg.listen = "127.0.0.1:0".into();
    cfg.min_version_recheck_ms = recheck_ms;
    cfg.min_version_wait_max_ms = 600_000;
    let creates = workload(products, false);
    produce(producer, &topics, &creates).await?;
    let app = Application::build(cfg).await?;
    let port = app.port();
    let ctx = app.ctx();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(900);
    while applied(&ctx) < products as f64 {
        anyhow::ensure!(Instant::now() < deadline, "creates not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = 1 + updates;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(waiters.max(1))
        .build()?;
    // When each product reached its last version (from the apply loop's notices; a lagging subscriber misses
    // some, which are then left out of the latency figures).
    let reached: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let listener = {
        let (mut rx, reached) = (ctx.notices.subscribe(), reached.clone());
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(Notice::Changed(c)) if c.version == last => {
                        if let Ok(mut m) = reached.lock() {
                            m.insert(c.id.clone(), Instant::now());
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        })
    };
    let mut pending = Vec::with_capacity(waiters);
    for e in creates.iter().take(waiters) {
        let (http, id, reached) = (http.clone(), e.aggregate_id, reached.clone());
        pending.push(tokio::spawn(async move {
            let r = http
                .get(format!("http://127.0.0.1:{port}/product/{id}"))
                .header("X-Min-Version", last.to_string())
                .header("Prefer", "wait=600")
                .send()
                .await;
            let answered = Instant::now();
            let at = reached
                .lock()
                .ok()
                .and_then(|m| m.get(&id.to_string()).copied());
            let latency = at.map(|t| answered.saturating_duration_since(t).as_secs_f64());
            (r.map(|r| r.status().as_u16()).unwrap_or(0), latency)
        }));
    }
    // Let the waiters connect and start waiting (a benchmark, not a test: a pause is good enough here).
    tokio::time::sleep(Duration::from_secs(3)).await;
    anyhow::ensure!(
        pending.iter().all(|h| !h.is_finished()),
        "a waiter returned before the updates"
    );
    let mut events = Vec::new();
    for v in 2..=last {
        events.extend(creates.iter().map(|e| {
            Envelope::new(
                e.aggregate_id,
                v,
                EventPayload::ProductUpdated(ProductUpdated {
                    name: format!("v{v}"),
                    price_cents: 1999 + v as i64,
                    description: None,
                }),
            )
        }));
    }
    let target = (products + events.len()) as f64;
    let measure = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut first: Option<(Instant, f64)> = None;
            let deadline = Instant::now() + Duration::from_secs(900);
            loop {
                let a = applied(&ctx);
                if a > products as f64 && first.is_none() {
                    first = Some((Instant::now(), a));
                }
                if a >= target {
                    let (t0, a0) = first.unwrap_or((Instant::now(), 0.0));
                    break Ok((a - a0) / t0.elapsed().as_secs_f64().max(1e-3));
                }
                if Instant::now() >= deadline {
                    break Err(anyhow::anyhow!("only {a} of {target} applied"));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    produce(producer, &topics, &events).await?;
    let rate = measure.await??;
    let (mut ok, mut other, mut lat) = (0, 0, Vec::new());
    for h in pending {
        let (status, latency) = h.await?;
        if status == 200 {
            ok += 1;
        } else {
            other += 1;
        }
        lat.extend(latency);
    }
    listener.abort();
    let _ = tx.send(());
    run.await??;
    let measured = lat.len();
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(WaitersRun {
        rate,
        ok,
        other,
        measured,
        p50: pct(0.5),
        p99: pct(0.99),
    })
}

async fn waiters_mode(args: &Args, producer: &FutureProducer) -> anyhow::Result<()> {
    let products = args.waiters.max(1);
    // Alternated, twice, so that the shared machine's drifting load hits both sides alike.
    for round in 1..=2 {
        let default = cqrs_query::QueryConfig::new("", "").min_version_recheck_ms;
        for (waiters, recheck) in [
            (0, default),
            (args.waiters, default),
            (args.waiters, NO_FALLBACK_MS),
        ] {
            let r = waiters_run(args, producer, products, waiters, args.updates, recheck).await?;
            let fallback = if recheck == NO_FALLBACK_MS {
                "no fallback re-read".to_owned()
            } else {
                format!("fallback re-read from {recheck} ms")
            };
            println!(
                "round {round}: {waiters:>5} waiters ({fallback}): apply {:>6.0} events/s ({} updates of {products} products); \
                 waiters: {} answered 200, {} other; applied → answered p50 {:.1} ms, p99 {:.1} ms (of {})",
                r.rate,
                products as u64 * args.updates,
                r.ok,
                r.other,
                r.p50 * 1000.0,
                r.p99 * 1000.0,
                r.measured
            );
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cqrs_common::telemetry::init(cqrs_common::LogFormat::Text);
    let producer: FutureProducer = kafka::client_config(&args.kafka_bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    if args.mode == "waiters" {
        return waiters_mode(&args, &producer).await;
    }
    let n = args.events;
    // The machine is shared and its load drifts, so every projection run is bracketed by raw measurements of
    // the same server (before and after) and compared with their mean.
    for kind in [Kind::Creates, Kind::Updates, Kind::Mixed] {
        let label = match kind {
            Kind::Creates => "creates only",
            Kind::Updates => "updates only (1 per product per batch)",
            Kind::Mixed => "mixed (create + 2 updates per product, coalesced per batch)",
        };
        for batch in [1usize, 100, 1000] {
            let count = if batch == 1 { (n / 10).max(100) } else { n };
            let before = raw_insert_rate(&args, n).await?;
            let before_u = raw_guarded_update_rate(&args, n / 5).await?;
            let rate = throughput(&args, &producer, batch, count, kind).await?;
            let after = raw_insert_rate(&args, n).await?;
            let after_u = raw_guarded_update_rate(&args, n / 5).await?;
            let (raw, rawu) = ((before + after) / 2.0, (before_u + after_u) / 2.0);
            println!(
                "{label}, batch {batch:>4}: {rate:>6.0} events/s | raw insert_many {raw:>6.0}/s ({before:.0}..{after:.0}) → {:.2}× | raw guarded update {rawu:>5.0}/s → {:.2}×",
                rate / raw,
                rate / rawu
            );
        }
    }
    let (p50, p99, n) = lag(&args, &producer).await?;
    println!(
        "end-to-end lag (produce → applied and visible) at {} events/s for {} s: p50 {:.1} ms, p99 {:.1} ms ({n} events)",
        args.rate,
        args.seconds,
        p50 * 1000.0,
        p99 * 1000.0
    );
    Ok(())
}
