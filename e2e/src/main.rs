//! `cqrs-e2e`: load generator and checker of the CQRS stack, through the gateway only.
//!
//! - `scenario seed`: the seed's scenario against a running gateway, every record verified.
//! - `hostile`: bad input against a running gateway; only documented 4xx, nothing stored.
//! - `chaos`: starts private PostgreSQL/Kafka/Mongo and the three services, kills them under load.
//! - `bench`: starts the same, runs the raw baselines and a ramp; JSON + SVG to `--out`.
//! - `load`: a steady read/write load through a running gateway until a stop file appears, while a script
//!   performs a day-2 operation; then failed requests and (optionally) the exactly-once checks.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Args as ClapArgs, Parser, Subcommand};
use cqrs_e2e::{
    Gateway, Stack,
    bench::{self, BenchOptions},
    chaos::{self, ChaosOptions, Target},
    hostile,
    infra::PrivateInfra,
    load::{self, CheckTarget, LoadOptions},
    seed::{self, SeedOptions, VerifyMode},
};

#[derive(Debug, Parser)]
#[command(name = "cqrs-e2e", about = "End-to-end proof of the CQRS stack")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, ClapArgs)]
struct Target_ {
    /// Gateway base URL.
    #[arg(
        long,
        env = "CQRS_GATEWAY_URL",
        default_value = "http://127.0.0.1:3123"
    )]
    gateway: String,
    /// HS256 secret of the gateway (default: the local devstack's secret file).
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// File holding the HS256 secret.
    #[arg(long, env = "AUTH_JWT_SECRET_FILE")]
    secret_file: Option<PathBuf>,
}

impl Target_ {
    fn gateway(&self) -> anyhow::Result<Gateway> {
        let secret = match (&self.secret, &self.secret_file) {
            (Some(s), _) => s.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .with_context(|| format!("reading {}", f.display()))?
                .trim_end()
                .to_owned(),
            (None, None) => {
                let f = cqrs_devstack::cache_dir().join("stacks/local/jwt-secret");
                std::fs::read_to_string(&f)
                    .with_context(|| {
                        format!(
                            "no --secret given and {} unreadable (is `just up` running?)",
                            f.display()
                        )
                    })?
                    .trim_end()
                    .to_owned()
            }
        };
        Ok(Gateway::new(&self.gateway, secret.as_bytes())?)
    }
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Scenarios against a running gateway.
    Scenario {
        #[command(subcommand)]
        which: Scenario,
    },
    /// Hostile input against a running gateway.
    Hostile {
        #[command(flatten)]
        target: Target_,
        /// Write the JSON report here.
        #[arg(long, env = "CQRS_E2E_OUT", default_value = "e2e/out")]
        out: PathBuf,
    },
    /// kill -9 and restart mutation, query, Kafka and the Mongo-wire server under load (own private servers).
    Chaos {
        /// Kills per component.
        #[arg(long, env = "CHAOS_ROUNDS", default_value_t = 3)]
        rounds: usize,
        /// Commands per second of the steady load.
        #[arg(long, env = "CHAOS_RATE", default_value_t = 40)]
        rate: u32,
        /// Acknowledged commands between kills.
        #[arg(long, env = "CHAOS_ACKS_BETWEEN", default_value_t = 40)]
        acks_between: u64,
        /// Stop the Mongo-wire server gracefully instead of kill -9 (see docs/E2E.md: kill -9 loses writes).
        #[arg(long, env = "CHAOS_MONGO_GRACEFUL")]
        mongo_graceful: bool,
        #[arg(long, env = "CQRS_E2E_OUT", default_value = "e2e/out")]
        out: PathBuf,
    },
    /// Raw baselines + a ramp of write rates through the gateway (own private servers).
    Bench {
        /// Write rates of the ramp, commands/s; 0 = closed loop (max).
        #[arg(
            long,
            env = "BENCH_RATES",
            value_delimiter = ',',
            default_value = "100,200,400,800,0"
        )]
        rates: Vec<u32>,
        #[arg(long, env = "BENCH_STEP_SECS", default_value_t = 10)]
        step_secs: u64,
        /// Read mixes (reads per write); every rate runs with every mix.
        #[arg(
            long,
            env = "BENCH_READ_RATIOS",
            value_delimiter = ',',
            default_value = "0,4"
        )]
        read_ratios: Vec<u32>,
        #[arg(long, env = "BENCH_CONCURRENCY", default_value_t = 64)]
        concurrency: usize,
        /// pgbench client counts; each is run and the best rate is the baseline.
        #[arg(
            long,
            env = "BENCH_PGBENCH_CLIENTS",
            value_delimiter = ',',
            default_value = "8,32,128"
        )]
        pgbench_clients: Vec<u32>,
        #[arg(long, env = "CQRS_E2E_OUT", default_value = "e2e/out")]
        out: PathBuf,
    },
    /// A steady read/write load through a running gateway while a script performs a day-2 operation; runs
    /// until --stop-file exists or SIGTERM/SIGINT. Exit 0 = no failed request and nothing lost/duplicated,
    /// 1 = failures (see the report), 2 = could not run.
    Load {
        #[command(flatten)]
        target: Target_,
        /// A label for the report and the printed lines, e.g. `scale-query`.
        #[arg(long, env = "LOAD_NAME", default_value = "load")]
        name: String,
        /// Writes per second.
        #[arg(long, env = "LOAD_RATE", default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..))]
        rate: u32,
        /// Reads per write (GETs of acknowledged aggregates with X-Min-Version); 0 = no reads.
        #[arg(long, env = "LOAD_READS_PER_WRITE", default_value_t = 2)]
        reads_per_write: u32,
        /// Stop the load once this file exists (polled every 100 ms); it must not exist at the start.
        #[arg(long, env = "LOAD_STOP_FILE")]
        stop_file: PathBuf,
        /// Created once --warmup-acks writes are acknowledged (the load is flowing).
        #[arg(long, env = "LOAD_READY_FILE")]
        ready_file: Option<PathBuf>,
        #[arg(long, env = "LOAD_WARMUP_ACKS", default_value_t = 20)]
        warmup_acks: u64,
        /// Longest run without the stop file; reaching it is a failure.
        #[arg(long, env = "LOAD_MAX_SECS", default_value_t = 600)]
        max_secs: u64,
        /// PostgreSQL of mutation: with --kafka-bootstrap and --topic-prefix, run the exactly-once checks
        /// after the load.
        #[arg(long, env = "LOAD_PG_URL", requires_all = ["kafka_bootstrap", "topic_prefix"], hide_env_values = true)]
        pg_url: Option<String>,
        #[arg(long, env = "LOAD_KAFKA_BOOTSTRAP", requires_all = ["pg_url", "topic_prefix"])]
        kafka_bootstrap: Option<String>,
        #[arg(long, env = "LOAD_TOPIC_PREFIX", requires_all = ["pg_url", "kafka_bootstrap"])]
        topic_prefix: Option<String>,
        /// The JSON report file (default: e2e/out/load-<name>-<timestamp>.json).
        #[arg(long, env = "LOAD_OUT")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// The seed's scenario: users, products, orders; then every record read back and compared.
    Seed {
        #[command(flatten)]
        target: Target_,
        #[arg(long, env = "SEED_USERS", default_value_t = 2000)]
        users: usize,
        #[arg(long, env = "SEED_PRODUCTS", default_value_t = 2000)]
        products: usize,
        #[arg(long, env = "SEED_ORDERS", default_value_t = 2000)]
        orders: usize,
        #[arg(long, env = "SEED_CONCURRENCY", default_value_t = 64)]
        concurrency: usize,
        #[arg(long, env = "SEED_MAX_ITEMS", default_value_t = 3)]
        max_items: usize,
        #[arg(long, env = "SEED_RANDOM_SEED", default_value_t = 7)]
        seed: u64,
        /// How every record is read back: `each` = one GET per record with X-Min-Version; `pages` = every
        /// list page checked, then a GET with X-Min-Version for each record not on a page at its version.
        #[arg(long, env = "SEED_VERIFY", value_enum, default_value_t = VerifyMode::Each)]
        verify: VerifyMode,
        /// Instead of a running gateway: start private PostgreSQL, Kafka, Mongo-wire server and the three
        /// services (production settings) for this run only.
        #[arg(long, env = "SEED_PRIVATE")]
        private: bool,
        /// With --private: run mutation with the cheapest argon2id cost it accepts in practice (64 KiB,
        /// 1 iteration: ~0.1 ms instead of ~20 ms per password) to measure the pipeline rather than password
        /// hashing. Say so when quoting.
        #[arg(long, env = "SEED_CHEAP_HASH", requires = "private")]
        cheap_hash: bool,
        #[arg(long, env = "CQRS_E2E_OUT", default_value = "e2e/out")]
        out: PathBuf,
    },
}

fn write_json(out: &PathBuf, name: &str, v: &impl serde::Serialize) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    let ts = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let p = out.join(format!("{name}-{ts}.json"));
    std::fs::write(&p, serde_json::to_vec_pretty(v)?)?;
    Ok(p)
}

/// Resolves at the first SIGTERM or SIGINT.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => eprintln!("cqrs-e2e: SIGTERM: stopping the load"),
            _ = int.recv() => eprintln!("cqrs-e2e: SIGINT: stopping the load"),
        }
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    match real_main().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("cqrs-e2e: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn real_main() -> anyhow::Result<bool> {
    let Args { command } = Args::parse();
    match command {
        Cmd::Scenario {
            which:
                Scenario::Seed {
                    target,
                    users,
                    products,
                    orders,
                    concurrency,
                    max_items,
                    seed,
                    verify,
                    out,
                    private,
                    cheap_hash,
                },
        } => {
            let (_infra, stack, gw) = if private {
                eprintln!(
                    "seed: starting private PostgreSQL, Kafka, Mongo-wire server and the services…"
                );
                let infra = PrivateInfra::start().await?;
                let mut cfg = infra.stack_config(cheap_hash)?;
                if cheap_hash {
                    cfg.extra_env
                        .push(("ARGON2_MEMORY_KIB".into(), "64".into()));
                }
                let stack = Stack::start(cfg).await?;
                let gw = stack.gateway.clone();
                (Some(infra), Some(stack), gw)
            } else {
                (None, None, target.gateway()?)
            };
            let r = seed::run(
                &gw,
                &SeedOptions {
                    users,
                    products,
                    orders,
                    concurrency,
                    max_items,
                    seed,
                    progress: true,
                    verify,
                },
            )
            .await?;
            if let Some(stack) = stack {
                stack.stop().await;
            }
            r.print();
            let p = write_json(&out, "seed", &r)?;
            println!("report: {}", p.display());
            Ok(r.passed() && r.verified == (users + products + orders) as u64)
        }
        Cmd::Hostile { target, out } => {
            let gw = target.gateway()?;
            let r = hostile::run(&gw).await?;
            r.print();
            let p = write_json(&out, "hostile", &r)?;
            println!("report: {}", p.display());
            Ok(r.passed())
        }
        Cmd::Chaos {
            rounds,
            rate,
            acks_between,
            mongo_graceful,
            out,
        } => {
            eprintln!(
                "chaos: starting private PostgreSQL, Kafka, Mongo-wire server and the services…"
            );
            let mut infra = PrivateInfra::start().await?;
            let mut stack = Stack::start(infra.stack_config(true)?).await?;
            let mongo = if mongo_graceful {
                Target::MongoStop
            } else {
                Target::Mongo
            };
            let o = ChaosOptions {
                rounds,
                rate,
                acks_between,
                targets: vec![Target::Mutation, Target::Query, Target::Kafka, mongo],
            };
            let r = chaos::run(&mut stack, &mut infra.chaos, &o).await;
            stack.stop().await;
            let r = r?;
            r.print();
            let p = write_json(&out, "chaos", &r)?;
            println!("report: {}", p.display());
            Ok(r.passed())
        }
        Cmd::Bench {
            rates,
            step_secs,
            read_ratios,
            concurrency,
            pgbench_clients,
            out,
        } => {
            eprintln!(
                "bench: starting private PostgreSQL, Kafka, Mongo-wire server and the services…"
            );
            let infra = PrivateInfra::start().await?;
            // Production argon2 settings: user creation is not part of the ramp (products are).
            let stack = Stack::start(infra.stack_config(false)?).await?;
            let o = BenchOptions {
                rates,
                step_secs,
                read_ratios,
                max_concurrency: concurrency,
                pgbench_clients,
                ..Default::default()
            };
            let r = bench::run(
                &stack.gateway,
                &infra.pg.url("postgres"),
                &infra.chaos.kafka.bootstrap(),
                &infra.chaos.mongo.url(),
                &o,
            )
            .await;
            stack.stop().await;
            let r = r?;
            r.print();
            let p = write_json(&out, "bench", &r)?;
            let svg = p.with_extension("svg");
            std::fs::write(&svg, r.svg())?;
            println!("report: {}\nchart:  {}", p.display(), svg.display());
            Ok(true)
        }
        Cmd::Load {
            target,
            name,
            rate,
            reads_per_write,
            stop_file,
            ready_file,
            warmup_acks,
            max_secs,
            pg_url,
            kafka_bootstrap,
            topic_prefix,
            out,
        } => {
            let gw = target.gateway()?;
            let checks = match (pg_url, kafka_bootstrap, topic_prefix) {
                (Some(pg_url), Some(kafka_bootstrap), Some(topic_prefix)) => Some(CheckTarget {
                    pg_url,
                    kafka_bootstrap,
                    topic_prefix,
                }),
                _ => None,
            };
            let o = LoadOptions {
                name,
                rate,
                reads_per_write,
                stop_file,
                ready_file,
                warmup_acks,
                max: Duration::from_secs(max_secs),
                checks,
                ..Default::default()
            };
            let r = load::run(&gw, &o, stop_signal()?).await?;
            r.print();
            let p = match out {
                Some(p) => {
                    if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::create_dir_all(d)
                            .with_context(|| format!("creating {}", d.display()))?;
                    }
                    std::fs::write(&p, serde_json::to_vec_pretty(&r)?)
                        .with_context(|| format!("writing {}", p.display()))?;
                    p
                }
                None => write_json(&PathBuf::from("e2e/out"), &format!("load-{}", r.name), &r)?,
            };
            println!("report: {}", p.display());
            Ok(r.passed())
        }
    }
}
