//! Chaos, small: one kill -9 per component under a steady load; 0 lost, 0 duplicated. And `cqrs-e2e load`, the
//! binary the day-2 scripts run against a cluster: clean on a healthy stack, failing when mutation dies.
#![allow(clippy::unwrap_used)]

use std::{
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use cqrs_e2e::{
    Component, Stack, StackConfig,
    chaos::{self, ChaosInfra, ChaosOptions, Target},
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

async fn chaos(name: &str, targets: Vec<Target>) {
    let t = Instant::now();
    let env = cqrs_devstack::test_env(name).await.unwrap();
    // Kafka and Mongo of this test's own: they get killed. PostgreSQL is the shared one (not killed).
    let (kafka, mongo) = tokio::join!(
        cqrs_devstack::Kafka::start_private(),
        cqrs_devstack::Mongo::start_private()
    );
    let mut infra = ChaosInfra {
        kafka: kafka.unwrap(),
        mongo: mongo.unwrap(),
    };
    let mut cfg = StackConfig::from_test_env(&env).unwrap();
    cfg.kafka_bootstrap = infra.kafka.bootstrap();
    cfg.mongo_url = infra.mongo.url();
    let mut stack = Stack::start(cfg).await.unwrap();
    eprintln!("infrastructure and stack up in {:?}", t.elapsed());
    let n = targets.len();
    let opts = ChaosOptions {
        rounds: 1,
        rate: 40,
        acks_between: 30,
        targets,
    };
    let report = chaos::run(&mut stack, &mut infra, &opts).await.unwrap();
    report.print();
    assert!(
        report.acknowledged > 100,
        "too little load: {}",
        report.acknowledged
    );
    assert_eq!(report.recoveries.len(), n);
    // Static group membership: a restarted query process takes its partitions back at once rather than after
    // the dead consumer's 10 s session timeout (finding 4).
    for r in report
        .recoveries
        .iter()
        .filter(|r| r.target == Target::Query)
    {
        assert!(
            r.recovered_s < 5.0,
            "query took {:.1}s to serve a new write after kill -9",
            r.recovered_s
        );
    }
    assert_eq!(report.lost(), 0, "lost acknowledged commands");
    assert_eq!(report.duplicated(), 0, "duplicated commands");
    assert!(report.passed());
    stack.stop().await;
}

/// kill -9 of mutation (the relay holder), query and the Kafka broker; the Mongo-wire server is stopped and
/// restarted gracefully (its kill -9 case is below: it loses acknowledged writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_each_component_once_under_load_loses_and_duplicates_nothing() {
    chaos(
        "e2e-chaos",
        vec![
            Target::Mutation,
            Target::Query,
            Target::Kafka,
            Target::MongoStop,
        ],
    )
    .await;
}

/// `kill -9` of the Mongo-wire server, three times, under load: no acknowledged read-model write is lost.
/// (Found by this suite: SecantusDB acknowledged writes that a kill -9 lost, even at write concern `majority`,
/// because it does not fsync per commit by default; a real replica set journals majority writes. The devstack's
/// private Mongo-wire servers now run with `--sync-on-commit`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_mongo_wire_server_loses_nothing() {
    chaos(
        "e2e-chaos-mongo",
        vec![Target::Mongo, Target::Mongo, Target::Mongo],
    )
    .await;
}

/// A running `cqrs-e2e load` against `stack`; its stderr (progress lines) is echoed and kept.
struct LoadProc {
    child: tokio::process::Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl LoadProc {
    fn start(stack: &Stack, dir: &Path, name: &str, checks: bool) -> Self {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_cqrs-e2e"));
        c.arg("load")
            .args(["--gateway", stack.gateway.base()])
            .args(["--secret", &stack.config.jwt_secret])
            .args(["--name", name, "--rate", "40", "--reads-per-write", "2"])
            .args(["--warmup-acks", "20", "--max-secs", "120"])
            .arg("--stop-file")
            .arg(dir.join("stop"))
            .arg("--ready-file")
            .arg(dir.join("ready"))
            .arg("--out")
            .arg(dir.join("report.json"));
        for k in ["LOAD_PG_URL", "LOAD_KAFKA_BOOTSTRAP", "LOAD_TOPIC_PREFIX"] {
            c.env_remove(k);
        }
        if checks {
            c.args(["--pg-url", &stack.config.pg_url])
                .args(["--kafka-bootstrap", &stack.config.kafka_bootstrap])
                .args(["--topic-prefix", &stack.config.topic_prefix]);
        }
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(l)) = out.next_line().await {
                eprintln!("[load stdout] {l}");
            }
        });
        let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
        let kept = stderr.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = err.next_line().await {
                eprintln!("[load stderr] {l}");
                kept.lock().unwrap().push(l);
            }
        });
        Self { child, stderr }
    }

    /// The latest `key=<n>` of the progress lines.
    fn progress(&self, key: &str) -> Option<u64> {
        self.stderr.lock().unwrap().iter().rev().find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        })
    }

    /// Polls `cond` until it holds; fails at `timeout` or if the load exited.
    async fn until(&mut self, what: &str, timeout: Duration, cond: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond(self) {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("load exited ({st}) before {what}");
            }
            assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates the stop file, waits for the exit and returns its code and the report.
    async fn stop(mut self, dir: &Path, timeout: Duration) -> (Option<i32>, Value) {
        std::fs::write(dir.join("stop"), b"").unwrap();
        let st = tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("load did not exit after the stop file")
            .unwrap();
        let report = std::fs::read(dir.join("report.json")).expect("no report file");
        (st.code(), serde_json::from_slice(&report).unwrap())
    }
}

fn n(v: &Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{path} missing in the report: {v:#}"))
}

async fn load_stack(name: &str) -> Stack {
    let env = cqrs_devstack::test_env(name).await.unwrap();
    Stack::start(StackConfig::from_test_env(&env).unwrap())
        .await
        .unwrap()
}

/// `cqrs-e2e load` as a day-2 script runs it (ready file, then stop file): a few seconds of reads and writes
/// on a healthy stack, then the exactly-once checks: exit 0, nothing failed, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_on_a_healthy_stack_fails_no_request_and_loses_nothing() {
    let stack = load_stack("e2e-load-ok").await;
    let dir = tempfile::tempdir().unwrap();
    let mut load = LoadProc::start(&stack, dir.path(), "healthy", true);
    let ready = dir.path().join("ready");
    load.until("ready file", Duration::from_secs(60), |_| ready.exists())
        .await;
    // A few seconds of load past the warm-up (40 writes/s).
    load.until("120 writes acknowledged", Duration::from_secs(30), |l| {
        l.progress("writes_ok").is_some_and(|n| n >= 120)
    })
    .await;
    let (code, r) = load.stop(dir.path(), Duration::from_secs(240)).await;
    eprintln!("{r:#}");
    assert_eq!(r["name"], "healthy");
    assert_eq!(r["stopped_by"], "stop_file");
    assert_eq!(n(&r, "/writes/failed"), 0, "failed writes");
    assert_eq!(n(&r, "/reads/failed"), 0, "failed reads");
    assert_eq!(n(&r, "/writes/mismatched") + n(&r, "/reads/mismatched"), 0);
    assert!(n(&r, "/writes/ok") >= 120, "too little load");
    assert!(n(&r, "/reads/ok") > 0, "no reads");
    assert!(r["check_error"].is_null(), "{}", r["check_error"]);
    assert_eq!(n(&r, "/postgres/checked"), n(&r, "/acknowledged"));
    assert_eq!(n(&r, "/lost"), 0, "lost acknowledged commands");
    assert_eq!(n(&r, "/duplicated"), 0, "duplicated commands");
    assert_eq!(code, Some(0), "exit status of a clean run");
    stack.stop().await;
}

/// The load can fail: mutation killed (not restarted) under it, the gateway answers writes with errors; the
/// run exits 1 and the report counts the failed writes by status, timed after the ready file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_failed_requests_when_mutation_dies() {
    let mut stack = load_stack("e2e-load-fail").await;
    let dir = tempfile::tempdir().unwrap();
    let mut load = LoadProc::start(&stack, dir.path(), "kill-mutation", false);
    let ready = dir.path().join("ready");
    load.until("ready file", Duration::from_secs(60), |_| ready.exists())
        .await;
    stack.kill(Component::Mutation).unwrap();
    load.until("a failed write", Duration::from_secs(30), |l| {
        l.progress("writes_failed").is_some_and(|n| n > 0)
    })
    .await;
    let (code, r) = load.stop(dir.path(), Duration::from_secs(60)).await;
    eprintln!("{r:#}");
    assert_eq!(r["stopped_by"], "stop_file");
    let failed = n(&r, "/writes/failed");
    assert!(failed > 0, "no failed write after mutation died");
    let by_status: u64 = r["writes"]["by_status"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(by_status, failed, "failures by status");
    let first = r["writes"]["first_failure_s"].as_f64().unwrap();
    let last = r["writes"]["last_failure_s"].as_f64().unwrap();
    let ready_s = r["ready_s"].as_f64().unwrap();
    assert!(
        ready_s <= first && first <= last,
        "ready {ready_s}, failures {first}..{last}"
    );
    assert!(r.get("lost").is_none(), "checks ran without being asked");
    assert_eq!(code, Some(1), "exit status of a run with failed requests");
    stack.stop().await;
}
