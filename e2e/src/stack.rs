//! The three service binaries as subprocesses (so they can be `kill -9`ed and restarted) against given
//! PostgreSQL / Kafka / Mongo servers. Ports are chosen once, so a restarted service comes back on the same one
//! and the gateway's upstream URLs stay valid.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{E2eError, client::Gateway};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    Mutation,
    Query,
    Gateway,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Component::Mutation => "mutation",
            Component::Query => "query",
            Component::Gateway => "gateway",
        }
    }
}

/// Where the services find their infrastructure, and how they are configured.
#[derive(Debug, Clone)]
pub struct StackConfig {
    pub pg_url: String,
    pub kafka_bootstrap: String,
    pub topic_prefix: String,
    pub mongo_url: String,
    pub mongo_db: String,
    /// HS256 secret of the gateway (≥ 32 bytes).
    pub jwt_secret: String,
    /// Directory holding the `mutation`, `query` and `gateway` binaries.
    pub bin_dir: PathBuf,
    /// Service logs go to `<log_dir>/<name>.log`.
    pub log_dir: PathBuf,
    /// Extra environment for every service, e.g. `ARGON2_MEMORY_KIB`.
    pub extra_env: Vec<(String, String)>,
}

impl StackConfig {
    /// A configuration on the devstack's per-test resources, logs in a fresh temp dir.
    pub fn from_test_env(env: &cqrs_devstack::TestEnv) -> Result<Self, E2eError> {
        Ok(Self {
            pg_url: env.pg_url.clone(),
            kafka_bootstrap: env.kafka_bootstrap.clone(),
            topic_prefix: env.topic_prefix.clone(),
            mongo_url: env.mongo_url.clone(),
            mongo_db: env.mongo_db.clone(),
            jwt_secret: format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            ),
            bin_dir: bin_dir()?,
            log_dir: log_dir(&env.topic_prefix)?,
            extra_env: fast_test_env(),
        })
    }
}

/// Settings that make the services quick in tests: a cheap argon2id (the hash still runs per user, only with
/// less memory), fast relay polling. Never for production.
pub fn fast_test_env() -> Vec<(String, String)> {
    [
        ("ARGON2_MEMORY_KIB", "1024"),
        ("ARGON2_ITERATIONS", "1"),
        ("RELAY_POLL_MS", "100"),
        ("RELAY_MAX_BACKOFF_MS", "1000"),
        ("KAFKA_MESSAGE_TIMEOUT_MS", "5000"),
        ("RUST_LOG", "info"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

/// `<target>/debug`: the directory of the running test binary's parent (`deps/` → its parent), or of the
/// running `cqrs-e2e` binary; overridable with `CQRS_BIN_DIR`.
pub fn bin_dir() -> Result<PathBuf, E2eError> {
    if let Ok(d) = std::env::var("CQRS_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().map_err(|e| E2eError::Setup(e.to_string()))?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| E2eError::Setup("executable has no directory".into()))?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    for b in ["mutation", "query", "gateway"] {
        if !dir.join(b).exists() {
            return Err(E2eError::Setup(format!(
                "{} not found in {}: run `cargo build --workspace` (or set CQRS_BIN_DIR)",
                b,
                dir.display()
            )));
        }
    }
    Ok(dir)
}

fn log_dir(name: &str) -> Result<PathBuf, E2eError> {
    let d = std::env::temp_dir().join("cqrs-e2e-logs").join(name);
    std::fs::create_dir_all(&d).map_err(|e| E2eError::Setup(format!("{}: {e}", d.display())))?;
    Ok(d)
}

#[derive(Debug)]
struct Svc {
    component: Component,
    port: u16,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

/// A running gateway + mutation + query.
#[derive(Debug)]
pub struct Stack {
    pub config: StackConfig,
    svcs: Vec<Svc>,
    pub gateway: Gateway,
}

fn port() -> Result<u16, E2eError> {
    cqrs_devstack::free_port().map_err(|e| E2eError::Setup(e.to_string()))
}

impl Stack {
    /// Starts mutation, query and gateway in that order, each waited for on `/readyz`.
    pub async fn start(config: StackConfig) -> Result<Self, E2eError> {
        let (mp, qp, gp) = (port()?, port()?, port()?);
        let mutation_url = format!("http://127.0.0.1:{mp}");
        let query_url = format!("http://127.0.0.1:{qp}");
        let c = &config;
        let mut common = vec![
            ("KAFKA_BOOTSTRAP".to_owned(), c.kafka_bootstrap.clone()),
            ("TOPIC_PREFIX".to_owned(), c.topic_prefix.clone()),
        ];
        common.extend(c.extra_env.iter().cloned());
        let mut m_env = common.clone();
        m_env.push(("MUTATION_LISTEN".into(), format!("127.0.0.1:{mp}")));
        m_env.push(("DATABASE_URL".into(), c.pg_url.clone()));
        let mut q_env = common.clone();
        q_env.push(("QUERY_LISTEN".into(), format!("127.0.0.1:{qp}")));
        q_env.push(("MONGO_URL".into(), c.mongo_url.clone()));
        q_env.push(("MONGO_DB".into(), c.mongo_db.clone()));
        q_env.push(("MUTATION_URL".into(), mutation_url.clone()));
        // Stable across restarts (the port is kept), unique on this machine: static group membership, so a
        // killed and restarted query process takes its partitions back at once (as a pod does under the
        // operator, which passes the pod name).
        q_env.push(("QUERY_INSTANCE_ID".into(), format!("e2e-query-{qp}")));
        let mut g_env: Vec<(String, String)> = c
            .extra_env
            .iter()
            .filter(|(k, _)| k == "RUST_LOG" || k.starts_with("GATEWAY_"))
            .cloned()
            .collect();
        g_env.push(("GATEWAY_LISTEN".into(), format!("127.0.0.1:{gp}")));
        g_env.push(("MUTATION_URL".into(), mutation_url));
        g_env.push(("QUERY_URL".into(), query_url));
        g_env.push(("AUTH_MODE".into(), "jwt".into()));
        g_env.push(("AUTH_JWT_SECRET".into(), c.jwt_secret.clone()));
        let gateway = Gateway::new(&format!("http://127.0.0.1:{gp}"), c.jwt_secret.as_bytes())?;
        let mut stack = Self {
            svcs: vec![
                Svc {
                    component: Component::Mutation,
                    port: mp,
                    env: m_env,
                    child: None,
                },
                Svc {
                    component: Component::Query,
                    port: qp,
                    env: q_env,
                    child: None,
                },
                Svc {
                    component: Component::Gateway,
                    port: gp,
                    env: g_env,
                    child: None,
                },
            ],
            config,
            gateway,
        };
        for comp in [Component::Mutation, Component::Query, Component::Gateway] {
            stack.spawn(comp)?;
            stack.wait_ready(comp, Duration::from_secs(90)).await?;
        }
        Ok(stack)
    }

    fn svc(&mut self, c: Component) -> &mut Svc {
        let i = match c {
            Component::Mutation => 0,
            Component::Query => 1,
            Component::Gateway => 2,
        };
        &mut self.svcs[i]
    }

    pub fn url(&self, c: Component) -> String {
        let port = self
            .svcs
            .iter()
            .find(|s| s.component == c)
            .map_or(0, |s| s.port);
        format!("http://127.0.0.1:{port}")
    }

    pub fn log_path(&self, c: Component) -> PathBuf {
        self.config.log_dir.join(format!("{}.log", c.name()))
    }

    fn spawn(&mut self, c: Component) -> Result<(), E2eError> {
        let bin = self.config.bin_dir.join(c.name());
        let log_path = self.log_path(c);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| E2eError::Setup(format!("{}: {e}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| E2eError::Setup(e.to_string()))?;
        let svc = self.svc(c);
        let mut cmd = Command::new(&bin);
        cmd.envs(svc.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd
            .spawn()
            .map_err(|e| E2eError::Setup(format!("starting {}: {e}", bin.display())))?;
        svc.child = Some(child);
        Ok(())
    }

    /// Polls `/readyz` of `c` until it answers 2xx; fails early if the process exits.
    pub async fn wait_ready(
        &mut self,
        c: Component,
        timeout: Duration,
    ) -> Result<Duration, E2eError> {
        let started = Instant::now();
        let url = format!("{}/readyz", self.url(c));
        let log = self.log_path(c);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| E2eError::Setup(e.to_string()))?;
        loop {
            if let Ok(r) = http.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(started.elapsed());
            }
            if let Some(child) = self.svc(c).child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(E2eError::Setup(format!(
                    "{} exited during startup ({status}); log {}:\n{}",
                    c.name(),
                    log.display(),
                    tail(&log, 30)
                )));
            }
            if started.elapsed() > timeout {
                return Err(E2eError::Timeout(format!(
                    "{} not ready at {url} after {timeout:?}; log {}:\n{}",
                    c.name(),
                    log.display(),
                    tail(&log, 30)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `kill -9` and reap.
    pub fn kill(&mut self, c: Component) -> Result<(), E2eError> {
        if let Some(mut child) = self.svc(c).child.take() {
            child
                .kill()
                .map_err(|e| E2eError::Setup(format!("kill -9 {}: {e}", c.name())))?;
            let _ = child.wait();
        }
        Ok(())
    }

    /// Starts `c` again on its port and waits until it is ready; returns how long that took.
    pub async fn restart(&mut self, c: Component) -> Result<Duration, E2eError> {
        let started = Instant::now();
        self.kill(c)?;
        self.spawn(c)?;
        self.wait_ready(c, Duration::from_secs(90)).await?;
        Ok(started.elapsed())
    }

    /// Whether every process is still running (none crashed).
    pub fn all_running(&mut self) -> Vec<(Component, bool)> {
        self.svcs
            .iter_mut()
            .map(|s| {
                let alive = s
                    .child
                    .as_mut()
                    .is_some_and(|ch| matches!(ch.try_wait(), Ok(None)));
                (s.component, alive)
            })
            .collect()
    }

    /// SIGTERM in reverse order (gateway first), each given 20 s to drain, then SIGKILL.
    pub async fn stop(mut self) {
        for i in (0..self.svcs.len()).rev() {
            if let Some(mut child) = self.svcs[i].child.take() {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    if !matches!(child.try_wait(), Ok(None)) {
                        break;
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for s in &mut self.svcs {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
