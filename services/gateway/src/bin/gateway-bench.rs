//! Latency and throughput of `GET /product/:id` through the gateway vs directly against the upstream, in the
//! same run and on the same machine.
//!
//! The upstream is an axum server answering a fixed JSON document (what a query read model lookup returns,
//! without the database, so the figures isolate the gateway). Each phase runs `concurrency` closed-loop
//! clients, each on its own keep-alive HTTP/1.1 connection, for `duration` after a warm-up. Upstream, gateway
//! and clients run on separate runtimes (two worker threads each) in this one process, sharing the machine's
//! cores as separate pods on one node would.
//!
//! `cargo run --release -p cqrs-gateway --bin gateway-bench -- --concurrency 1,32`

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use axum::{Router, http::header, response::IntoResponse, routing::get};
use bytes::Bytes;
use clap::Parser;
use cqrs_gateway::{Application, AuthSettings, Config, JwtSettings, config::parse_duration};
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

#[derive(Debug, Parser)]
#[command(
    name = "gateway-bench",
    about = "Gateway overhead benchmark: through the gateway vs direct"
)]
struct Args {
    /// Concurrent keep-alive clients per phase; a comma-separated list runs each level.
    #[arg(
        long,
        env = "BENCH_CONCURRENCY",
        default_value = "1,32",
        value_delimiter = ','
    )]
    concurrency: Vec<usize>,
    /// Measured time per phase.
    #[arg(long, env = "BENCH_DURATION", default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up per phase.
    #[arg(long, env = "BENCH_WARMUP", default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Pin the gateway's threads to the last CPU and clients + upstream to the others, modelling a gateway
    /// with CPU of its own (its own pod); without it all three share every CPU.
    #[arg(long, env = "BENCH_PIN")]
    pin: bool,
}

const SECRET: &[u8] = b"bench-secret-bench-secret-bench-secret!!";

fn runtime(name: &str, cpus: Option<Vec<usize>>) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .on_thread_start(move || {
            if let Some(cpus) = &cpus {
                let mut set = nix::sched::CpuSet::new();
                for &c in cpus {
                    let _ = set.set(c);
                }
                if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
                    eprintln!("cannot pin a thread to {cpus:?}: {e}");
                }
            }
        })
        .enable_all()
        .build()
        .context("runtime")
}

struct Phase {
    requests: usize,
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU µs per request spent in the gateway's and the upstream's threads (whole phase incl. warm-up).
    gateway_cpu_us: f64,
    upstream_cpu_us: f64,
}

impl Phase {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

/// One client: a keep-alive connection, requests back to back until `end`; latencies in µs after `measure_from`.
async fn client(
    addr: SocketAddr,
    auth: Option<Arc<str>>,
    measure_from: Instant,
    end: Instant,
    seed: usize,
) -> anyhow::Result<Vec<u32>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut lat = Vec::with_capacity(1 << 16);
    let mut i = seed;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        i = i.wrapping_add(1);
        let mut req = Request::get(format!("/product/{}", i % 1000)).header(header::HOST, "bench");
        if let Some(a) = &auth {
            req = req.header(header::AUTHORIZATION, &**a);
        }
        let req = req.body(Empty::<Bytes>::new())?;
        sender.ready().await?;
        let res = sender.send_request(req).await?;
        anyhow::ensure!(res.status() == StatusCode::OK, "status {}", res.status());
        let body = res.into_body().collect().await?.to_bytes();
        anyhow::ensure!(!body.is_empty(), "empty body");
        if now >= measure_from {
            lat.push(now.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        }
    }
    Ok(lat)
}

async fn phase(
    addr: SocketAddr,
    auth: Option<Arc<str>>,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Phase> {
    let (gw0, up0) = (cpu_ticks("gateway"), cpu_ticks("upstream"));
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|c| tokio::spawn(client(addr, auth.clone(), measure_from, end, c * 7919)))
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let (gw1, up1) = (cpu_ticks("gateway"), cpu_ticks("upstream"));
    all.sort_unstable();
    // Ticks cover warm-up too: scale requests by the whole phase's share (warm-up ran at the same rate).
    let all_requests =
        all.len() as f64 * (warmup + duration).as_secs_f64() / duration.as_secs_f64();
    let per_req = |ticks: u64| ticks as f64 * 10_000.0 / all_requests.max(1.0);
    let pct = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0) as f64
    };
    Ok(Phase {
        requests: all.len(),
        seconds: duration.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        gateway_cpu_us: per_req(gw1 - gw0),
        upstream_cpu_us: per_req(up1 - up0),
    })
}

fn upstream() -> Router {
    let doc = Bytes::from_static(
        br#"{"id":"0193a7e2-5b1c-7cc0-8f7e-3f1d2c4b5a69","name":"Mechanical keyboard","description":"Tenkeyless, hot-swappable switches, PBT keycaps","price":12900,"version":7,"lastEventId":"0193a7e2-6c2d-7dd1-9a8f-4e2e3d5c6b7a","updatedAt":"2026-11-24T12:34:56.789Z"}"#,
    );
    Router::new().route(
        "/product/{id}",
        get(move || {
            let doc = doc.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], doc).into_response() }
        }),
    )
}

fn main() -> anyhow::Result<()> {
    let Args {
        concurrency,
        duration,
        warmup,
        pin,
    } = Args::parse();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    anyhow::ensure!(!pin || cpus >= 2, "--pin needs at least 2 CPUs");
    let (gw_cpus, rest) = if pin {
        (
            Some(vec![cpus - 1]),
            Some((0..cpus - 1).collect::<Vec<_>>()),
        )
    } else {
        (None, None)
    };
    let upstream_rt = runtime("upstream", rest.clone())?;
    let gateway_rt = runtime("gateway", gw_cpus)?;
    let client_rt = runtime("client", rest)?;

    let upstream_addr = upstream_rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        tokio::spawn(async move { axum::serve(l, upstream()).await });
        anyhow::Ok(addr)
    })?;
    let base = format!("http://{upstream_addr}");
    let start_gateway = |auth: AuthSettings| -> anyhow::Result<SocketAddr> {
        gateway_rt.block_on(async {
            let mut cfg = Config::new(base.clone(), base.clone(), auth);
            cfg.max_in_flight = 100_000;
            let app = Application::build(cfg).await?;
            let addr = app.local_addr();
            tokio::spawn(app.run_until_stopped(std::future::pending()));
            anyhow::Ok(addr)
        })
    };
    let jwt = start_gateway(AuthSettings::Jwt(JwtSettings {
        hs256_secret: Some(SECRET.to_vec()),
        leeway: Duration::from_secs(30),
        ..Default::default()
    }))?;
    let open = start_gateway(AuthSettings::Disabled)?;
    let token: Arc<str> = {
        let claims = cqrs_gateway::mint::Claims::new(
            "bench",
            cqrs_gateway::Role::Reader,
            Duration::from_secs(3600),
            None,
            None,
        );
        format!(
            "Bearer {}",
            cqrs_gateway::mint::mint(&claims, Some(SECRET), None)?
        )
        .into()
    };

    println!(
        "gateway-bench: GET /product/:id, {cpus} CPUs ({}), {duration:?} measured per phase after {warmup:?} warm-up",
        if pin {
            "gateway pinned to its own CPU, clients + upstream on the rest"
        } else {
            "gateway, clients and upstream share all CPUs"
        }
    );
    println!(
        "{:>5} {:<22} {:>10} {:>9} {:>9} | {:>9} {:>7} | {:>12} {:>12}",
        "conc",
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "+p50 ms",
        "thru %",
        "gw CPU µs/r",
        "up CPU µs/r"
    );
    for &c in &concurrency {
        let direct = client_rt.block_on(phase(upstream_addr, None, c, warmup, duration))?;
        let row = |name: &str, p: &Phase| {
            println!(
                "{:>5} {:<22} {:>10.0} {:>9.3} {:>9.3} | {:>+9.3} {:>6.1}% | {:>12.1} {:>12.1}",
                c,
                name,
                p.rps(),
                p.p50_us / 1000.0,
                p.p99_us / 1000.0,
                (p.p50_us - direct.p50_us) / 1000.0,
                100.0 * p.rps() / direct.rps(),
                p.gateway_cpu_us,
                p.upstream_cpu_us
            );
        };
        row("direct", &direct);
        let via_jwt = client_rt.block_on(phase(jwt, Some(token.clone()), c, warmup, duration))?;
        row("gateway (JWT HS256)", &via_jwt);
        let via_open = client_rt.block_on(phase(open, None, c, warmup, duration))?;
        row("gateway (auth off)", &via_open);
    }
    // The servers run on pending futures: leave without waiting for them.
    upstream_rt.shutdown_background();
    gateway_rt.shutdown_background();
    client_rt.shutdown_background();
    Ok(())
}

/// CPU time (user + system, in clock ticks of 10 ms) used so far by this process's threads whose name starts
/// with `prefix` (the runtimes name their threads `upstream`, `gateway`, `client`).
fn cpu_ticks(prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut total = 0;
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the comm: state is field 3; utime and stime are fields 14 and 15.
        let f = |i: usize| {
            fields
                .get(i - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        total += f(14) + f(15);
    }
    total
}
