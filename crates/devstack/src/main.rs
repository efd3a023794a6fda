//! `devstack`: the local stack and the test servers, without Docker.
//!
//! - `devstack up`: PostgreSQL, Kafka and the Mongo-wire server (durable, fixed ports) plus mutation (3124),
//!   query (3125) and gateway (3123); prints the URLs and serves until Ctrl-C, then stops everything it started.
//! - `devstack down [--purge]`: stops a local stack left running (e.g. after `kill -9` of `up`).
//! - `devstack start|stop|status --profile test`: the shared servers of a test run.

use std::{
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use cqrs_devstack::{ProfileSpec, cache_dir, ensure_stack, stack_state, stop_stack};

#[derive(Debug, Parser)]
#[command(
    name = "devstack",
    about = "Real PostgreSQL, Kafka and Mongo-wire servers on 127.0.0.1, and the local stack"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    telemetry: cqrs_common::TelemetryArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Bring up the whole local stack and serve until Ctrl-C.
    Up {
        /// Directory holding the gateway, mutation and query binaries (default: next to this executable).
        #[arg(long, env = "CQRS_BIN_DIR")]
        bin_dir: Option<PathBuf>,
        /// Kafka topic prefix and database names of the local stack.
        #[arg(long, env = "TOPIC_PREFIX", default_value = "cqrs")]
        prefix: String,
    },
    /// Stop a local stack left running.
    Down {
        /// Also delete its data.
        #[arg(long)]
        purge: bool,
    },
    /// Start (or reuse) a profile's infrastructure and print its connection settings.
    Start {
        #[arg(long, env = "CQRS_TEST_PROFILE", default_value = "test")]
        profile: String,
        /// Listen (also) on this address and name it in the URLs, e.g. the local cluster's node address so
        /// that its pods reach these servers as they would a managed database.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Client range PostgreSQL trusts on `--host` (e.g. the cluster's pod range).
        #[arg(long)]
        clients: Option<String>,
        /// fsync on: what a test that kills pods under load and then counts what survived needs.
        #[arg(long)]
        durable: bool,
    },
    /// Stop a profile's infrastructure (throwaway profiles are deleted).
    Stop {
        #[arg(long, env = "CQRS_TEST_PROFILE", default_value = "test")]
        profile: String,
    },
    /// Print a profile's state.
    Status {
        #[arg(long, env = "CQRS_TEST_PROFILE", default_value = "test")]
        profile: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { command, telemetry } = Args::parse();
    telemetry.init();
    match command {
        Cmd::Start {
            profile,
            host,
            clients,
            durable,
        } => {
            let t = Instant::now();
            let spec = ProfileSpec {
                host,
                clients,
                durable,
                ..ProfileSpec::test(&profile)
            };
            let e = ensure_stack(&spec).await?;
            eprintln!(
                "devstack: profile {profile} ready in {:.1}s (started: {})",
                t.elapsed().as_secs_f64(),
                if e.started.is_empty() {
                    "nothing, all reused".to_owned()
                } else {
                    e.started.join(", ")
                }
            );
            for l in e.state.env_lines() {
                println!("{l}");
            }
        }
        Cmd::Stop { profile } => {
            if stop_stack(&profile).await? {
                eprintln!("devstack: profile {profile} stopped");
            } else {
                eprintln!("devstack: profile {profile} was not running");
            }
        }
        Cmd::Status { profile } => match stack_state(&profile) {
            Some(s) => println!("{}", serde_json::to_string_pretty(&s)?),
            None => println!("profile {profile}: not running"),
        },
        Cmd::Up { bin_dir, prefix } => up(bin_dir, &prefix).await?,
        Cmd::Down { purge } => {
            let stopped = stop_stack("local").await?;
            eprintln!(
                "devstack: local stack {}",
                if stopped {
                    "stopped"
                } else {
                    "was not running"
                }
            );
            if purge {
                let dir = cache_dir().join("stacks").join("local");
                let _ = std::fs::remove_dir_all(&dir);
                let _ = std::fs::remove_dir_all("/var/tmp/cqrs-stack-pg/stack-local");
                let _ = std::fs::remove_dir_all(cache_dir().join("pg").join("stack-local"));
                eprintln!("devstack: local data deleted");
            }
        }
    }
    Ok(())
}

struct Service {
    name: &'static str,
    child: Child,
}

async fn up(bin_dir: Option<PathBuf>, prefix: &str) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let bin_dir = match bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .to_path_buf(),
    };
    eprintln!(
        "devstack: starting PostgreSQL, Kafka and the Mongo-wire server (first run installs them)…"
    );
    let e = ensure_stack(&ProfileSpec::local()).await?;
    let s = e.state;
    create_database(&s.pg_url("postgres"), prefix).await?;
    let logs = cache_dir().join("stacks").join("local").join("logs");
    std::fs::create_dir_all(&logs)?;
    let secret_path = cache_dir().join("stacks").join("local").join("jwt-secret");
    let secret = match std::fs::read_to_string(&secret_path) {
        Ok(s) if !s.trim().is_empty() => s.trim().to_owned(),
        _ => {
            let s = format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            );
            std::fs::write(&secret_path, &s)?;
            s
        }
    };

    let common = |c: &mut Command| {
        c.env("KAFKA_BOOTSTRAP", s.kafka_bootstrap())
            .env("TOPIC_PREFIX", prefix)
            .env("RUST_LOG", "info");
    };
    let mut services: Vec<Service> = Vec::new();
    let result = async {
        let mut m = Command::new(bin_dir.join("mutation"));
        common(&mut m);
        m.env("MUTATION_LISTEN", "127.0.0.1:3124")
            .env("DATABASE_URL", s.pg_url(prefix));
        services.push(spawn("mutation", m, &logs)?);
        wait_ready("mutation", "http://127.0.0.1:3124/readyz", &mut services).await?;

        let mut q = Command::new(bin_dir.join("query"));
        common(&mut q);
        q.env("QUERY_LISTEN", "127.0.0.1:3125")
            .env("MONGO_URL", s.mongo_url())
            .env("MONGO_DB", prefix)
            .env("MUTATION_URL", "http://127.0.0.1:3124");
        services.push(spawn("query", q, &logs)?);
        wait_ready("query", "http://127.0.0.1:3125/readyz", &mut services).await?;

        let mut g = Command::new(bin_dir.join("gateway"));
        g.env("GATEWAY_LISTEN", "127.0.0.1:3123")
            .env("MUTATION_URL", "http://127.0.0.1:3124")
            .env("QUERY_URL", "http://127.0.0.1:3125")
            .env("AUTH_JWT_SECRET_FILE", &secret_path)
            .env("RUST_LOG", "info");
        services.push(spawn("gateway", g, &logs)?);
        wait_ready("gateway", "http://127.0.0.1:3123/readyz", &mut services).await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        stop_services(&mut services).await;
        return Err(e.context(format!(
            "starting the services failed; logs in {}",
            logs.display()
        )));
    }

    let token = mint_token(&bin_dir, &secret);
    println!();
    println!("CQRS stack is up in {:.1}s:", t0.elapsed().as_secs_f64());
    println!(
        "  gateway   http://127.0.0.1:3123   (the API; JWT HS256, secret in {})",
        secret_path.display()
    );
    println!("  mutation  http://127.0.0.1:3124");
    println!("  query     http://127.0.0.1:3125");
    println!("  postgres  {}", s.pg_url(prefix));
    println!(
        "  kafka     {} (topics {prefix}.users|products|orders|dlq)",
        s.kafka_bootstrap()
    );
    println!(
        "  mongo     {} (database {prefix}; {})",
        s.mongo_url(),
        s.mongo_server
    );
    println!("  logs      {}", logs.display());
    if let Some(t) = token {
        println!();
        println!("An admin token for local use (valid 24 h):");
        println!("  export TOKEN={t}");
        println!("  curl -H \"Authorization: Bearer $TOKEN\" http://127.0.0.1:3123/sync-status");
    }
    println!();
    println!("Press Ctrl-C to stop.");

    let mut watch = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = cqrs_common::shutdown_signal() => break,
            _ = watch.tick() => {
                for svc in &mut services {
                    if let Ok(Some(status)) = svc.child.try_wait() {
                        eprintln!("devstack: {} exited ({status}); see {}/{}.log", svc.name, logs.display(), svc.name);
                    }
                }
            }
        }
    }
    eprintln!("devstack: stopping services…");
    stop_services(&mut services).await;
    eprintln!("devstack: stopping infrastructure (data kept; `devstack down --purge` deletes it)…");
    stop_stack("local").await?;
    Ok(())
}

fn spawn(name: &'static str, mut cmd: Command, logs: &std::path::Path) -> anyhow::Result<Service> {
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    cmd.stdout(log.try_clone()?)
        .stderr(log)
        .stdin(std::process::Stdio::null());
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {name} ({:?}); is it built?", cmd.get_program()))?;
    Ok(Service { name, child })
}

async fn wait_ready(name: &str, url: &str, services: &mut [Service]) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        for svc in services.iter_mut() {
            if let Ok(Some(status)) = svc.child.try_wait() {
                bail!("{} exited during startup ({status})", svc.name);
            }
        }
        if Instant::now() > deadline {
            bail!("{name} not ready at {url} after 90 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn stop_services(services: &mut Vec<Service>) {
    // Reverse order: the gateway stops taking requests first, mutation (with its relay) last.
    while let Some(mut svc) = services.pop() {
        if let Ok(pid) = i32::try_from(svc.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(25);
        loop {
            if matches!(svc.child.try_wait(), Ok(Some(_))) {
                break;
            }
            if Instant::now() > deadline {
                let _ = svc.child.kill();
                let _ = svc.child.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    let exists: Option<i32> = sqlx::query_scalar("select 1 from pg_database where datname = $1")
        .bind(name)
        .fetch_optional(&mut conn)
        .await?;
    if exists.is_none() {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "create database \"{}\"",
            name.replace('"', "")
        )))
        .execute(&mut conn)
        .await?;
    }
    Ok(())
}

fn mint_token(bin_dir: &std::path::Path, secret: &str) -> Option<String> {
    let out = Command::new(bin_dir.join("gateway"))
        .args([
            "mint-token",
            "--role",
            "admin",
            "--ttl",
            "24h",
            "--secret",
            secret,
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let t = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!t.is_empty()).then_some(t)
}
