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
    #[arg(long, env = "BENCH_SECONDS", default_value_t = 8)]
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
    /// Skip the scenarios that hash with the OWASP argon2id parameters (they are CPU-bound by design).
    #[arg(long, env = "BENCH_SKIP_ARGON2", default_value_t = false)]
    skip_argon2: bool,
}

struct Level {
    clients: usize,
    accepted: u64,
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
        clients,
        accepted: all.len() as u64,
        rejected: rejected.load(Ordering::Relaxed),
        per_sec: all.len() as f64 / elapsed,
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
    })
}

fn print_levels(title: &str, levels: &[Level]) {
    println!("\n### {title}");
    println!("| clients | accepted/s | p50 ms | p99 ms | accepted | failed |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for l in levels {
        println!(
            "| {} | {:.0} | {:.1} | {:.1} | {} | {} |",
            l.clients, l.per_sec, l.p50_ms, l.p99_ms, l.accepted, l.rejected
        );
    }
}

async fn scenario(
    db_url: &str,
    title: &str,
    path: &'static str,
    args: &Args,
    tweak: impl Fn(&mut Config),
) -> anyhow::Result<Vec<Level>> {
    let mut c = Config::for_test(db_url, "127.0.0.1:1", "bench");
    c.relay_enabled = false;
    tweak(&mut c);
    let app = Application::build(c).await?;
    let base = format!("http://127.0.0.1:{}", app.port());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    let mut levels = Vec::new();
    for &clients in &args.concurrency {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        levels.push(drive(&base, path, clients, args.seconds, &tag[..8]).await?);
    }
    let _ = tx.send(());
    handle.await??;
    print_levels(title, &levels);
    Ok(levels)
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

    println!("\n## pgbench (raw TPS, same server, same run)");
    println!("| script | clients | TPS |");
    println!("|---|---:|---:|");
    for (name, script) in scripts() {
        for &c in &args.concurrency {
            match pgbench(&args, &db_url, name, &script, c) {
                Ok(tps) => println!("| {name} | {c} | {tps:.0} |"),
                Err(e) => println!("| {name} | {c} | error: {e} |"),
            }
        }
    }

    println!("\n## the service");
    if !args.skip_argon2 {
        scenario(
            &db_url,
            "POST /user, argon2id m=19456 t=2 (production default)",
            "/user",
            &args,
            |_| {},
        )
        .await?;
    }
    scenario(
        &db_url,
        "POST /user, argon2id m=64 t=1 (hashing made negligible: the write path alone)",
        "/user",
        &args,
        |c| {
            c.argon2_memory_kib = 64;
            c.argon2_iterations = 1;
        },
    )
    .await?;
    scenario(
        &db_url,
        "POST /product, group commit (default: window 0, max 128)",
        "/product",
        &args,
        |_| {},
    )
    .await?;
    scenario(
        &db_url,
        "POST /product, group commit with a 2 ms window",
        "/product",
        &args,
        |c| {
            c.group_commit_window_us = 2_000;
        },
    )
    .await?;
    scenario(
        &db_url,
        "POST /product, NO group commit (one transaction per command)",
        "/product",
        &args,
        |c| {
            c.group_commit_max = 1;
        },
    )
    .await?;

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
