//! Benchmark of the write side (not a test): POST /user and POST /product at 1, 16, 64 and 256 concurrent
//! keep-alive clients against a DURABLE private PostgreSQL (fsync on, synchronous_commit on: the defaults),
//! next to pgbench's raw TPS of the same inserts on the same server in the same run.
//!
//! `cargo run --release -p cqrs-mutation --bin mutation-bench -- --seconds 8`
//!
//! The service runs in this process (relay off: Kafka is not part of the write path); the load generator
//! shares the machine's cores with it and with PostgreSQL, as pgbench does.

use std::{
    os::unix::fs::MetadataExt,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use cqrs_devstack::{Postgres, PostgresConfig, free_port};
use cqrs_mutation::{Application, Config};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "mutation-bench")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, env = "BENCH_SECONDS", default_value_t = 5)]
    seconds: u64,
    /// Concurrent clients to measure.
    #[arg(
        long,
        env = "BENCH_CONCURRENCY",
        value_delimiter = ',',
        default_value = "1,16,64,256"
    )]
    concurrency: Vec<usize>,
    /// Use this PostgreSQL (database must exist) instead of starting a durable private one.
    #[arg(long, env = "BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// pgbench executable.
    #[arg(
        long,
        env = "PGBENCH",
        default_value = "/usr/lib/postgresql/15/bin/pgbench"
    )]
    pgbench: PathBuf,
    /// Interleaved rounds per point (the median is reported).
    #[arg(long, env = "BENCH_ROUNDS", default_value_t = 3)]
    rounds: usize,
    /// Also measure the relay: drain the outbox the run filled into the devstack's shared Kafka for this many
    /// seconds (0 = skip).
    #[arg(long, env = "BENCH_RELAY_SECONDS", default_value_t = 0)]
    relay_seconds: u64,
    /// Skip the scenarios that hash with the OWASP argon2id parameters (they are CPU-bound by design).
    #[arg(long, env = "BENCH_SKIP_ARGON2", default_value_t = false)]
    skip_argon2: bool,
}

struct Level {
    rejected: u64,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Drives `path` with `clients` keep-alive clients for `seconds`.
async fn drive(
    base: &str,
    path: &'static str,
    clients: usize,
    seconds: u64,
    run_tag: &str,
) -> anyhow::Result<Level> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let rejected = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = client.clone();
        let url = format!("{base}{path}");
        let stop = stop.clone();
        let rejected = rejected.clone();
        let tag = run_tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = if path == "/user" {
                    json!({"email": format!("b-{tag}-{c}-{n}@bench.example"), "password": "bench-password-1", "name": "Bench"})
                } else {
                    json!({"name": format!("bench {tag} {c} {n}"), "price": "19.99"})
                };
                let t = Instant::now();
                match client.post(&url).json(&body).send().await {
                    Ok(r) if r.status().as_u16() == 201 => {
                        let _ = r.bytes().await;
                        lat.push(t.elapsed());
                    }
                    _ => {
                        rejected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    Ok(Level {
        rejected: rejected.load(Ordering::Relaxed),
        per_sec: all.len() as f64 / elapsed,
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
    })
}

/// A running service configured for one scenario.
struct Scenario {
    title: &'static str,
    path: &'static str,
    base: String,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), cqrs_mutation::AppError>>,
}

async fn start_scenario(
    db_url: &str,
    title: &'static str,
    path: &'static str,
    tweak: impl Fn(&mut Config),
) -> anyhow::Result<Scenario> {
    let mut c = Config::for_test(db_url, "127.0.0.1:1", "bench");
    c.relay_enabled = false;
    tweak(&mut c);
    let app = Application::build(c).await?;
    let base = format!("http://127.0.0.1:{}", app.port());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    Ok(Scenario {
        title,
        path,
        base,
        stop,
        handle,
    })
}

fn pgbench(
    args: &Args,
    url: &str,
    name: &str,
    script: &str,
    clients: usize,
) -> anyhow::Result<f64> {
    let file =
        std::env::temp_dir().join(format!("mutation-bench-{name}-{}.sql", std::process::id()));
    std::fs::write(&file, script)?;
    let out = Command::new(&args.pgbench)
        .args([
            "-n",
            "-M",
            "prepared",
            "-j",
            "2",
            "-c",
            &clients.to_string(),
            "-T",
            &args.seconds.to_string(),
            "-f",
        ])
        .arg(&file)
        .arg(url)
        .output()
        .with_context(|| format!("running {}", args.pgbench.display()))?;
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|t| t.parse::<f64>().ok())
        .context("no tps line in pgbench output")?;
    Ok(tps)
}

/// pgbench scripts: a single-row insert transaction, and the two-row transaction a user creation is made of
/// (user row + event row; the service also writes an outbox row, so it does strictly more work per command).
fn scripts() -> Vec<(&'static str, String)> {
    let single = "INSERT INTO users (id, email, password_hash, name, version) \
        SELECT u, 'pgb-' || u || '@bench.example', '$argon2id$placeholder', 'Bench', 1 FROM gen_random_uuid() AS u;\n"
        .to_owned();
    let two = "BEGIN;\n\
        INSERT INTO users (id, email, password_hash, name, version) \
        SELECT u, 'pgb-' || u || '@bench.example', '$argon2id$placeholder', 'Bench', 1 FROM gen_random_uuid() AS u;\n\
        INSERT INTO events (event_id, aggregate_type, aggregate_id, version, type, schema_version, data, occurred_at) \
        VALUES (gen_random_uuid(), 'user', gen_random_uuid(), 1, 'USER-CREATED', 1, '{\"email\":\"x@bench.example\",\"name\":\"Bench\"}', now());\n\
        END;\n"
        .to_owned();
    vec![("single-row", single), ("two-row (user + event)", two)]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Publishes the outbox the scenarios filled (relay on, devstack Kafka) and reports events/s.
async fn relay_throughput(db_url: &str, seconds: u64) -> anyhow::Result<()> {
    let env = cqrs_devstack::test_env("mutation-bench-relay").await?;
    let mut c = Config::for_test(db_url, &env.kafka_bootstrap, &env.topic_prefix);
    c.relay_poll_ms = 50;
    let s = start_scenario_with(c).await?;
    let client = reqwest::Client::new();
    let status = |client: reqwest::Client, base: String| async move {
        let v: serde_json::Value = client
            .get(format!("{base}/relay/status"))
            .send()
            .await?
            .json()
            .await?;
        anyhow::Ok(v)
    };
    let before = status(client.clone(), s.base.clone()).await?;
    // Wait for leadership and topic creation (the first published event), then measure.
    let deadline = Instant::now() + Duration::from_secs(60);
    let start_published = loop {
        let v = status(client.clone(), s.base.clone()).await?;
        let p = v["publishedTotal"].as_u64().unwrap_or(0);
        if p > 0 {
            break p;
        }
        if Instant::now() > deadline {
            bail!("the relay published nothing in 60 s: {v}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Until the backlog is empty or the time is up, whichever is first.
    let t = Instant::now();
    let after = loop {
        let v = status(client.clone(), s.base.clone()).await?;
        if v["backlog"] == 0 || t.elapsed() >= Duration::from_secs(seconds) {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let published = after["publishedTotal"].as_u64().unwrap_or(0) - start_published;
    println!(
        "\n## Relay\nBacklog {} events at start; published {} in {:.1} s = {:.0} events/s \
         (batch {} events, acks=all, idempotent producer, devstack Kafka); backlog now {}.",
        before["backlog"],
        published,
        t.elapsed().as_secs_f64(),
        published as f64 / t.elapsed().as_secs_f64(),
        500,
        after["backlog"]
    );
    let _ = s.stop.send(());
    s.handle.await??;
    Ok(())
}

async fn start_scenario_with(c: Config) -> anyhow::Result<Scenario> {
    let app = Application::build(c).await?;
    let base = format!("http://127.0.0.1:{}", app.port());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    Ok(Scenario {
        title: "relay",
        path: "",
        base,
        stop,
        handle,
    })
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber_init();
    let mut private = None;
    let db_url = match &args.database_url {
        Some(u) => u.clone(),
        None => {
            let base = if is_root() {
                PathBuf::from("/var/tmp/cqrs-stack-pg")
            } else {
                cqrs_devstack::cache_dir().join("pg")
            };
            let dir = base.join(format!("bench-{}", uuid::Uuid::new_v4().simple()));
            let pg = Postgres::start_with(PostgresConfig {
                port: free_port()?,
                dir: dir.clone(),
                durable: true,
                host: cqrs_devstack::loopback(),
                clients: None,
            })
            .await?;
            pg.create_database("bench").await?;
            let url = pg.url("bench");
            private = Some((pg, dir));
            url
        }
    };
    let settings: Vec<(String, String)> = {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&db_url).await?;
        let mut v = Vec::new();
        for s in [
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "wal_level",
            "shared_buffers",
        ] {
            let val: String = sqlx::query_scalar("SELECT setting FROM pg_settings WHERE name = $1")
                .bind(s)
                .fetch_one(&mut conn)
                .await?;
            v.push((s.to_owned(), val));
        }
        v
    };
    println!(
        "# mutation-bench ({} s per point, {} cores)",
        args.seconds,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("load average at start: {}", load_average());
    println!(
        "PostgreSQL settings: {}",
        settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // argon2id cost alone.
    let t = Instant::now();
    let n = 10;
    for _ in 0..n {
        use argon2::{Algorithm, Argon2, Params, PasswordHasher, Version};
        let a = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(19_456, 2, 1, None).map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let _ = a
            .hash_password(b"bench-password-1")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let per_hash = t.elapsed().as_secs_f64() / f64::from(n);
    println!(
        "argon2id m=19456 KiB, t=2, p=1: {:.1} ms per hash on one core → at most {:.0} hashes/s on all cores",
        per_hash * 1000.0,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64
            / per_hash
    );

    // Migrate (the first Application does it) and warm up.
    let migrate = Application::build({
        let mut c = Config::for_test(&db_url, "127.0.0.1:1", "bench");
        c.relay_enabled = false;
        c
    })
    .await?;
    drop(migrate);

    let mut scenarios = Vec::new();
    if !args.skip_argon2 {
        scenarios.push(
            start_scenario(
                &db_url,
                "POST /user, argon2id m=19456 t=2 (production default)",
                "/user",
                |_| {},
            )
            .await?,
        );
    }
    scenarios.push(
        start_scenario(
            &db_url,
            "POST /user, argon2id m=64 t=1 (write path alone)",
            "/user",
            |c| {
                c.argon2_memory_kib = 64;
                c.argon2_iterations = 1;
            },
        )
        .await?,
    );
    scenarios.push(
        start_scenario(
            &db_url,
            "POST /product, group commit (default: window 0, max 128)",
            "/product",
            |_| {},
        )
        .await?,
    );
    scenarios.push(
        start_scenario(
            &db_url,
            "POST /product, group commit, 2 ms window",
            "/product",
            |c| {
                c.group_commit_window_us = 2_000;
            },
        )
        .await?,
    );
    scenarios.push(
        start_scenario(
            &db_url,
            "POST /product, NO group commit (1 command per transaction)",
            "/product",
            |c| {
                c.group_commit_max = 1;
            },
        )
        .await?,
    );

    // Interleaved rounds: every configuration is measured once per round, so load from other processes on
    // the machine hits them alike; the median round is reported.
    let scripts = scripts();
    let mut pg_rows: Vec<(String, Vec<String>)> = scripts
        .iter()
        .map(|(n, _)| (format!("pgbench {n}"), Vec::new()))
        .collect();
    let mut svc_rows: Vec<(String, Vec<String>)> = scenarios
        .iter()
        .map(|s| (s.title.to_owned(), Vec::new()))
        .collect();
    for &clients in &args.concurrency {
        let mut pg_samples: Vec<Vec<f64>> = vec![Vec::new(); scripts.len()];
        let mut svc_samples: Vec<Vec<Level>> = (0..scenarios.len()).map(|_| Vec::new()).collect();
        for _round in 0..args.rounds {
            for (i, (name, script)) in scripts.iter().enumerate() {
                match pgbench(&args, &db_url, name, script, clients) {
                    Ok(tps) => pg_samples[i].push(tps),
                    Err(e) => eprintln!("pgbench {name} at {clients}: {e}"),
                }
            }
            for (i, sc) in scenarios.iter().enumerate() {
                let tag = uuid::Uuid::new_v4().simple().to_string();
                svc_samples[i]
                    .push(drive(&sc.base, sc.path, clients, args.seconds, &tag[..8]).await?);
            }
        }
        for (i, mut v) in pg_samples.into_iter().enumerate() {
            v.sort_by(f64::total_cmp);
            let cell = v
                .get(v.len() / 2)
                .map_or("–".to_owned(), |m| format!("{m:.0}"));
            eprintln!("{} @{clients}: {v:?}", pg_rows[i].0);
            pg_rows[i].1.push(cell);
        }
        for (i, mut v) in svc_samples.into_iter().enumerate() {
            v.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
            eprintln!(
                "{} @{clients}: {:?}",
                svc_rows[i].0,
                v.iter().map(|l| l.per_sec.round()).collect::<Vec<_>>()
            );
            let cell = v.get(v.len() / 2).map_or("–".to_owned(), |m| {
                let failed = if m.rejected > 0 {
                    format!(", {} failed", m.rejected)
                } else {
                    String::new()
                };
                format!(
                    "{:.0} ({:.1} / {:.1}{failed})",
                    m.per_sec, m.p50_ms, m.p99_ms
                )
            });
            svc_rows[i].1.push(cell);
        }
    }
    println!(
        "\n## Results: median of {} interleaved rounds of {} s",
        args.rounds, args.seconds
    );
    println!("Service cells: accepted creates/s (p50 ms / p99 ms). pgbench cells: TPS.\n");
    let header: Vec<String> = args
        .concurrency
        .iter()
        .map(|c| format!("{c} clients"))
        .collect();
    println!("| | {} |", header.join(" | "));
    println!("|---|{}", "---:|".repeat(header.len()));
    for (name, cells) in pg_rows.iter().chain(svc_rows.iter()) {
        println!("| {name} | {} |", cells.join(" | "));
    }
    for sc in scenarios {
        let _ = sc.stop.send(());
        sc.handle.await??;
    }
    if args.relay_seconds > 0 {
        relay_throughput(&db_url, args.relay_seconds).await?;
    }
    println!("\nload average at end: {}", load_average());
    if let Some((mut pg, dir)) = private {
        pg.stop().await?;
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

fn tracing_subscriber_init() {
    cqrs_common::telemetry::init(cqrs_common::LogFormat::Text);
}
