//! Test harness: one real etcd + kube-apiserver per test process (binaries built once and cached by
//! `crates/devstack/scripts/install-k8s.sh`), our CRD plus the Strimzi and Prometheus Operator CRDs installed,
//! and helpers to run the controller in-process against one namespace per test.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    future::Future,
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use cqrs_operator::{Config, Metrics, crd::CqrsStack};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The third-party CRDs the tests install (Strimzi, Prometheus Operator), vendored under `tests/crds/` with their
/// upstream, version and licence in each folder's README.
pub fn vendor_crds() -> Vec<PathBuf> {
    let v = repo_root().join("operator/tests/crds");
    vec![
        v.join("strimzi-crds/040-Crd-kafka.yaml"),
        v.join("strimzi-crds/043-Crd-kafkatopic.yaml"),
        v.join("strimzi-crds/045-Crd-kafkanodepool.yaml"),
        v.join("prometheus-operator-crds/monitoring.coreos.com_servicemonitors.yaml"),
        v.join("prometheus-operator-crds/monitoring.coreos.com_prometheusrules.yaml"),
        v.join("prometheus-operator-crds/monitoring.coreos.com_podmonitors.yaml"),
    ]
}

/// `CQRS_K8S_BIN`, or the output of the (idempotent, cached) install script.
fn k8s_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("CQRS_K8S_BIN") {
        return Ok(PathBuf::from(p));
    }
    let script = repo_root().join("crates/devstack/scripts/install-k8s.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{script:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{script:?} failed: {}", out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .ok_or_else(|| "install-k8s.sh printed nothing".to_owned())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn kubectl() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned())
}

/// The process-wide test cluster, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER
        .get_or_init(start)
        .as_ref()
        .unwrap_or_else(|e| panic!("test cluster: {e}"))
}

fn start() -> Result<Cluster, String> {
    let bin = k8s_bin()?;
    let (tx, rx) = std::sync::mpsc::channel();
    // The kernel sends the parent-death signal when the *thread* that spawned the child exits, so the servers
    // are spawned from a thread that lives as long as the test process.
    std::thread::Builder::new()
        .name("test-apiserver-owner".to_owned())
        .spawn(move || {
            let started = spawn_servers(&bin);
            let child = match started {
                Ok((child, cluster)) => {
                    let _ = tx.send(Ok(cluster));
                    child
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _keep = child;
            loop {
                std::thread::park();
            }
        })
        .map_err(|e| e.to_string())?;
    let cluster = rx.recv().map_err(|e| e.to_string())??;
    install_crds(&cluster)?;
    Ok(cluster)
}

fn spawn_servers(bin: &Path) -> Result<(std::process::Child, Cluster), String> {
    let dir = tempfile::Builder::new()
        .prefix("cqrs-kube-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let script = repo_root().join("operator/tests/support/kube-up.sh");
    let log_path = dir.join("kube-up.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let mut child = Command::new("setpriv")
        .args(["--pdeathsig", "SIGTERM", "--", "bash"])
        .arg(&script)
        .arg(&dir)
        .arg(bin)
        .arg(free_port().to_string())
        .arg(free_port().to_string())
        .arg(free_port().to_string())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {script:?}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.starts_with("READY ") => {
                let kubeconfig = PathBuf::from(line.trim_start_matches("READY ").trim());
                // Keep draining so the script never blocks on a full pipe.
                std::thread::spawn(move || for _ in lines {});
                return Ok((child, Cluster { kubeconfig, dir }));
            }
            Some(Ok(line)) if line.starts_with("FAILED") => {
                return Err(format!("kube-up.sh failed; see {}", log_path.display()));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err(format!("kube-up.sh exited; see {}", log_path.display())),
        }
    }
}

fn install_crds(cluster: &Cluster) -> Result<(), String> {
    let ours = cluster.dir.join("cqrsstack-crd.yaml");
    std::fs::write(
        &ours,
        cqrs_operator::crd::crd_yaml().map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let mut files = vec![ours];
    files.extend(vendor_crds());
    let mut cmd = Command::new(kubectl());
    cmd.arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args(["apply", "--server-side"]);
    for f in &files {
        cmd.arg("-f").arg(f);
    }
    run(&mut cmd)?;
    run(Command::new(kubectl())
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ]))?;
    Ok(())
}

pub fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

pub async fn client() -> Client {
    let path = tokio::task::spawn_blocking(|| cluster().kubeconfig.clone())
        .await
        .expect("cluster thread");
    let kc = Kubeconfig::read_from(&path).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    Client::try_from(config).expect("client")
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh namespace, so tests can run in parallel against one API server.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!("{prefix}-{}-{n}-{:x}", std::process::id(), nanos % 0xffff);
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    name
}

/// The controller running in-process, watching one namespace; stopped when dropped.
pub struct Operator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    pub registry: prometheus::Registry,
}

impl Operator {
    pub fn start(client: Client, config: Config) -> Self {
        let registry = prometheus::Registry::new();
        let metrics = Metrics::register(&registry).expect("metrics");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            cqrs_operator::run(client, config, metrics, async move {
                let _ = rx.await;
            })
            .await
            .expect("controller");
        });
        Self {
            stop: Some(tx),
            task,
            registry,
        }
    }

    /// Graceful stop: in-flight reconciliations finish, then the controller returns.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("controller stops within 30s")
            .expect("join");
    }

    pub fn metric(&self, name: &str) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| {
                f.get_metric().iter().map(|m| {
                    m.get_counter().get_value() + m.get_histogram().get_sample_count() as f64
                })
            })
            .sum()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn config_for(ns: &str) -> Config {
    Config {
        namespace: Some(ns.to_owned()),
        rebuild_poll: Duration::from_millis(200),
        ..Config::default()
    }
}

/// Polls `f` until it returns `Some` (a condition, not a fixed sleep), failing after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A complete, valid stack in strimzi mode.
pub fn sample_stack(name: &str) -> CqrsStack {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "cqrs.dev/v1alpha1",
        "kind": "CqrsStack",
        "metadata": {"name": name},
        "spec": {
            "images": {"gateway": "cqrs/gateway:test", "mutation": "cqrs/mutation:test", "query": "cqrs/query:test"},
            "gateway": {"replicas": 2},
            "postgres": {"secretName": "pg", "key": "url"},
            "mongo": {"secretName": "mongo", "database": "reads"},
            "auth": {"secretName": "auth"},
            "kafka": {"bootstrapServers": "kafka:9092", "strimziCluster": "events", "topicPrefix": "shop", "partitions": 6, "replicas": 1}
        }
    }))
    .expect("sample stack")
}

pub fn condition(stack: &CqrsStack, type_: &str) -> Option<(String, String, String)> {
    stack
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}
