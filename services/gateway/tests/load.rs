//! 10,000 concurrent client connections on loopback, in a test binary of its own so the process's memory
//! figures are not disturbed by other tests.

#[path = "it/common.rs"]
mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECTIONS: u64 = 10_000;

fn rss_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The real `gateway` binary as a child process: its memory is measured alone, and the 10,000 client sockets
/// (in this process) and the 10,000 gateway sockets (in the child) each fit under the usual 20k fd limit.
struct GatewayProcess {
    child: tokio::process::Child,
    addr: std::net::SocketAddr,
}

impl GatewayProcess {
    async fn start(m: &TestUpstream, q: &TestUpstream) -> Self {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .env_clear()
            .env("GATEWAY_LISTEN", "127.0.0.1:0")
            .env("MUTATION_URL", m.url())
            .env("QUERY_URL", q.url())
            .env(
                "AUTH_JWT_SECRET",
                std::str::from_utf8(SECRET).expect("utf8"),
            )
            .env("AUTH_ISSUER", ISSUER)
            .env("AUTH_AUDIENCE", AUDIENCE)
            .env("GATEWAY_HEADER_READ_TIMEOUT", "30s")
            .env("GATEWAY_MAX_CONNECTIONS", "15000")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn gateway");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let addr = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.expect("read log") {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v["message"] == "gateway listening" {
                    return v["addr"]
                        .as_str()
                        .expect("addr")
                        .parse()
                        .expect("socket addr");
                }
            }
            panic!("gateway exited before listening");
        })
        .await
        .expect("gateway starts");
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = http()
            .get(format!("http://{}/metrics", self.addr))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until `name` satisfies `pred`, polling /metrics (each poll is itself a connection, counted).
    async fn wait_for(&self, name: &str, pred: impl Fn(f64) -> bool) {
        let r = tokio::time::timeout(PATIENCE, async {
            loop {
                if pred(self.metric(name).await) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            r.is_ok(),
            "{name} never reached the expected value (now {})",
            self.metric(name).await
        );
    }
}

/// One request on an open connection; returns the status.
async fn exchange(
    mut s: tokio::net::TcpStream,
    request: std::sync::Arc<Vec<u8>>,
) -> (Option<u16>, tokio::net::TcpStream) {
    if s.write_all(&request).await.is_err() {
        return (None, s);
    }
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        // Read until the head and the announced body are complete.
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return (raw_status(&buf), s);
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return (raw_status(&buf), s),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_connections_are_served_with_bounded_memory() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut gw = GatewayProcess::start(&m, &q).await;
    let n = CONNECTIONS;
    let request = std::sync::Arc::new(
        format!(
            "GET /product/1 HTTP/1.1\r\nhost: gw\r\nauthorization: {}\r\n\r\n",
            bearer(&["reader"])
        )
        .into_bytes(),
    );

    // Warm up pools and lazies so the baseline is fair.
    for _ in 0..200 {
        let s = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        assert_eq!(exchange(s, request.clone()).await.0, Some(200));
    }
    gw.wait_for("cqrs_gateway_open_connections", |v| v <= 1.0)
        .await;
    let before = rss_kib(gw.pid());

    // Phase 1: open every connection and keep it open.
    let mut streams = Vec::with_capacity(n as usize);
    let mut connecting = tokio::task::JoinSet::new();
    for _ in 0..n {
        let addr = gw.addr;
        connecting.spawn(async move { tokio::net::TcpStream::connect(addr).await });
        if connecting.len() >= 256 {
            streams.push(
                connecting
                    .join_next()
                    .await
                    .expect("task")
                    .expect("join")
                    .expect("connect"),
            );
        }
    }
    while let Some(r) = connecting.join_next().await {
        streams.push(r.expect("join").expect("connect"));
    }
    gw.wait_for("cqrs_gateway_open_connections", |v| v >= n as f64)
        .await;

    // Phase 2: all of them send a request at once.
    let mut requests = tokio::task::JoinSet::new();
    for s in streams {
        requests.spawn(exchange(s, request.clone()));
    }
    let mut statuses = std::collections::BTreeMap::<String, u64>::new();
    let mut open = Vec::with_capacity(n as usize);
    while let Some(r) = requests.join_next().await {
        let (status, s) = r.expect("join");
        *statuses
            .entry(status.map_or("none".into(), |s| s.to_string()))
            .or_default() += 1;
        open.push(s);
    }
    let peak = rss_kib(gw.pid());
    eprintln!(
        "{n} concurrent connections: statuses {statuses:?}; gateway RSS {} MiB before, {} MiB with all open \
         (+{} KiB per connection)",
        before / 1024,
        peak / 1024,
        peak.saturating_sub(before) / n
    );
    for (status, count) in &statuses {
        assert!(
            status == "200" || status == "503",
            "{count} × status {status}: only 200 and load-shed 503 allowed"
        );
    }
    assert!(
        statuses.get("200").copied().unwrap_or(0) >= 1_000,
        "at least max-in-flight are served: {statuses:?}"
    );
    // Bounded: the gateway's state for 10k open keep-alive connections stays under 48 KiB each (about 21 KiB measured).
    assert!(
        peak.saturating_sub(before) < n * 48,
        "gateway memory grew by {} KiB",
        peak - before
    );

    drop(open);
    gw.wait_for("cqrs_gateway_open_connections", |v| v <= 1.0)
        .await;
    let res = http()
        .get(format!("http://{}/product/1", gw.addr))
        .header("authorization", bearer(&["reader"]))
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), 200, "still serving afterwards");

    // SIGTERM: the real binary drains and exits cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(gw.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal");
    let status = tokio::time::timeout(PATIENCE, gw.child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert!(status.success(), "{status:?}");
}
