//! A named set of the three servers ("profile") shared across processes through a state file.
//!
//! `ensure_stack("test", …)` starts whatever of the profile is not running and records ports and pids in
//! `<cache>/run/<profile>.json` under a file lock; the next caller (another test binary, a later run, `just up`
//! twice) finds them alive and reuses them. `stop_stack` stops exactly what the state file names and, for
//! throwaway profiles, deletes their files.

use std::{
    fs::File,
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
};

use fs4::fs_std::FileExt;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::{
    DevstackError, Kafka, KafkaConfig, Mongo, MongoConfig, MongoServer, Postgres, PostgresConfig,
    Result, error::IoContext, mongo::mongo_url, postgres, proc,
};

/// Ports, pids and directories of one profile's servers, as written to its state file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StackState {
    pub profile: String,
    pub pg_port: u16,
    pub pg_dir: PathBuf,
    pub pg_durable: bool,
    pub kafka_port: u16,
    pub kafka_controller_port: u16,
    pub kafka_dir: PathBuf,
    pub kafka_pid: u32,
    /// Which Mongo-wire server runs (state files written before there was a choice: SecantusDB).
    #[serde(default)]
    pub mongo_server: MongoServer,
    pub mongo_port: u16,
    pub mongo_dir: PathBuf,
    pub mongo_storage: Option<PathBuf>,
    pub mongo_pid: u32,
    /// Throwaway profiles have their directories deleted on stop.
    pub throwaway: bool,
    /// The address the servers listen on and their URLs name (state files of before: 127.0.0.1).
    #[serde(default = "proc::loopback")]
    pub host: String,
    /// Clients PostgreSQL trusts from `host` (a CIDR), if any.
    #[serde(default)]
    pub clients: Option<String>,
}

impl StackState {
    pub fn pg_url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@{}:{}/{database}",
            self.host, self.pg_port
        )
    }
    pub fn kafka_bootstrap(&self) -> String {
        format!("{}:{}", self.host, self.kafka_port)
    }
    pub fn mongo_url(&self) -> String {
        mongo_url(&self.host, self.mongo_port)
    }
    /// `KEY=value` lines for a shell or an env file.
    pub fn env_lines(&self) -> Vec<String> {
        vec![
            format!("CQRS_PG_URL={}", self.pg_url("postgres")),
            format!("CQRS_KAFKA_BOOTSTRAP={}", self.kafka_bootstrap()),
            format!("CQRS_MONGO_URL={}", self.mongo_url()),
        ]
    }
}

/// How a profile's servers are laid out when they have to be started.
#[derive(Debug, Clone)]
pub struct ProfileSpec {
    pub name: String,
    /// Fixed ports (the local stack) or `None` for free ones.
    pub pg_port: Option<u16>,
    pub kafka_port: Option<u16>,
    pub kafka_controller_port: Option<u16>,
    pub mongo_port: Option<u16>,
    /// `None`: the one `$CQRS_MONGO_SERVER` names (SecantusDB by default).
    pub mongo_server: Option<MongoServer>,
    pub durable: bool,
    pub mongo_in_memory: bool,
    pub throwaway: bool,
    /// Where the servers listen (127.0.0.1, or also an address pods can reach, e.g. the local cluster's node).
    pub host: String,
    /// Clients PostgreSQL trusts from `host` (a CIDR such as the cluster's pod range).
    pub clients: Option<String>,
}

impl ProfileSpec {
    /// Free ports, fsync off, Mongo in memory, deleted on stop: what tests want.
    pub fn test(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            pg_port: None,
            kafka_port: None,
            kafka_controller_port: None,
            mongo_port: None,
            mongo_server: None,
            durable: false,
            mongo_in_memory: true,
            throwaway: true,
            host: proc::loopback(),
            clients: None,
        }
    }
    /// The developer's local stack: fixed ports, durable, on disk, kept across `up`/`down`.
    pub fn local() -> Self {
        Self {
            name: "local".into(),
            pg_port: Some(55432),
            kafka_port: Some(9092),
            kafka_controller_port: Some(9093),
            mongo_port: Some(27017),
            mongo_server: None,
            durable: true,
            mongo_in_memory: false,
            throwaway: false,
            host: proc::loopback(),
            clients: None,
        }
    }
}

fn run_dir() -> PathBuf {
    crate::cache_dir().join("run")
}

fn state_path(profile: &str) -> PathBuf {
    run_dir().join(format!("{profile}.json"))
}

fn lock(profile: &str) -> Result<File> {
    std::fs::create_dir_all(run_dir()).ctx(|| "creating run dir".into())?;
    let path = run_dir().join(format!("{profile}.lock"));
    let f = File::create(&path).ctx(|| format!("creating {}", path.display()))?;
    // Blocking is fine: whoever holds it is starting servers, which we would otherwise wait for anyway.
    f.lock_exclusive()
        .ctx(|| format!("locking {}", path.display()))?;
    Ok(f)
}

fn read_state(profile: &str) -> Option<StackState> {
    let text = std::fs::read_to_string(state_path(profile)).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_state(s: &StackState) -> Result<()> {
    let path = state_path(&s.profile);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(s)?)
        .ctx(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).ctx(|| format!("writing {}", path.display()))
}

fn pg_alive(s: &StackState) -> bool {
    let pid_file = s.pg_dir.join("data").join("postmaster.pid");
    let pid = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()));
    pid.is_some_and(proc::pid_alive) && proc::port_open_on(&s.host, s.pg_port)
}
fn kafka_alive(s: &StackState) -> bool {
    proc::pid_alive(s.kafka_pid) && proc::port_open_on(&s.host, s.kafka_port)
}
fn mongo_alive(s: &StackState) -> bool {
    proc::pid_alive(s.mongo_pid) && proc::port_open_on(&s.host, s.mongo_port)
}

/// What `ensure_stack` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ensured {
    pub state: StackState,
    /// Which servers this call started (empty when everything was reused).
    pub started: Vec<&'static str>,
}

/// Makes sure the profile's three servers run, starting only the missing ones (in parallel). A profile whose
/// Mongo-wire server is alive but of another kind than asked for is an error, not silently reused or replaced.
pub async fn ensure_stack(spec: &ProfileSpec) -> Result<Ensured> {
    let server = match &spec.mongo_server {
        Some(s) => s.clone(),
        None => MongoServer::from_env()?,
    };
    let _lock = lock(&spec.name)?;
    let previous = read_state(&spec.name);
    if let Some(s) = &previous
        && s.mongo_server != server
        && mongo_alive(s)
    {
        return Err(DevstackError::Command(format!(
            "profile {} runs {} on port {}, not {server}: stop it first (`devstack stop --profile {}`) or use \
             another profile",
            spec.name, s.mongo_server, s.mongo_port, spec.name
        )));
    }
    let base = crate::cache_dir().join("stacks").join(&spec.name);

    let pg_cfg = match &previous {
        Some(s) => PostgresConfig {
            port: s.pg_port,
            dir: s.pg_dir.clone(),
            durable: s.pg_durable,
            host: s.host.clone(),
            clients: s.clients.clone(),
        },
        None => PostgresConfig {
            port: port_or_free(spec.pg_port)?,
            dir: postgres::base_dir().join(format!("stack-{}", spec.name)),
            durable: spec.durable,
            host: spec.host.clone(),
            clients: spec.clients.clone(),
        },
    };
    let kafka_cfg = match &previous {
        Some(s) => KafkaConfig {
            port: s.kafka_port,
            controller_port: s.kafka_controller_port,
            dir: s.kafka_dir.clone(),
            heap: "1g".into(),
            host: s.host.clone(),
        },
        None => KafkaConfig {
            port: port_or_free(spec.kafka_port)?,
            controller_port: port_or_free(spec.kafka_controller_port)?,
            dir: base.join("kafka"),
            heap: "1g".into(),
            host: spec.host.clone(),
        },
    };
    // The shared servers are never killed by tests, and the local stack favours speed: no per-commit fsync
    // there (tests that kill -9 the Mongo-wire server use a private one, which syncs).
    let mongo_cfg = match &previous {
        Some(s) if s.mongo_server == server => MongoConfig {
            server: s.mongo_server.clone(),
            port: s.mongo_port,
            dir: s.mongo_dir.clone(),
            storage: s.mongo_storage.clone(),
            sync_on_commit: false,
            host: s.host.clone(),
        },
        _ => MongoConfig {
            port: port_or_free(spec.mongo_port)?,
            dir: base.join("mongo"),
            // Each kind keeps its own files: the one not chosen now keeps its data for when it is again.
            storage: (!spec.mongo_in_memory).then(|| match server {
                MongoServer::Secantus => base.join("mongo").join("data"),
                _ => base.join("mongo").join(format!("data-{server}")),
            }),
            sync_on_commit: false,
            server: server.clone(),
            host: spec.host.clone(),
        },
    };

    let pg_up = previous.as_ref().is_some_and(pg_alive);
    let kafka_up = previous.as_ref().is_some_and(kafka_alive);
    let mongo_up = previous
        .as_ref()
        .is_some_and(|s| s.mongo_server == server && mongo_alive(s));
    let mut started = Vec::new();

    let pg_fut = async {
        if pg_up {
            Ok(None)
        } else {
            if previous.is_some() && spec.throwaway {
                // A throwaway cluster whose server died: start clean rather than recover stale test data.
                let _ = std::fs::remove_dir_all(&pg_cfg.dir);
            }
            Postgres::start_with(pg_cfg.clone()).await.map(Some)
        }
    };
    let kafka_fut = async {
        if kafka_up {
            Ok(None)
        } else {
            if previous.is_some() && spec.throwaway {
                let _ = std::fs::remove_dir_all(&kafka_cfg.dir);
            }
            Kafka::start_with(kafka_cfg.clone()).await.map(Some)
        }
    };
    let mongo_fut = async {
        if mongo_up {
            Ok(None)
        } else {
            Mongo::start_with(mongo_cfg.clone()).await.map(Some)
        }
    };
    let (pg, kafka, mongo) = tokio::join!(pg_fut, kafka_fut, mongo_fut);
    let (pg, kafka, mongo) = match (pg, kafka, mongo) {
        (Ok(p), Ok(k), Ok(m)) => (p, k, m),
        (p, k, m) => {
            // Leave nothing half-started behind: stop what this call started, then report the first failure.
            let mut first_err = None;
            match p {
                Ok(Some(mut p)) => {
                    let _ = p.stop().await;
                }
                Err(e) => first_err = first_err.or(Some(e)),
                Ok(None) => {}
            }
            match k {
                Ok(Some(mut k)) => {
                    let _ = k.stop().await;
                }
                Err(e) => first_err = first_err.or(Some(e)),
                Ok(None) => {}
            }
            match m {
                Ok(Some(mut m)) => {
                    let _ = m.stop().await;
                }
                Err(e) => first_err = first_err.or(Some(e)),
                Ok(None) => {}
            }
            return Err(
                first_err.unwrap_or_else(|| DevstackError::Command("startup failed".into()))
            );
        }
    };

    let kafka_pid = match &kafka {
        Some(k) => {
            started.push("kafka");
            k.pid().unwrap_or_default()
        }
        None => previous.as_ref().map(|s| s.kafka_pid).unwrap_or_default(),
    };
    let mongo_pid = match &mongo {
        Some(m) => {
            started.push("mongo");
            m.pid().unwrap_or_default()
        }
        None => previous.as_ref().map(|s| s.mongo_pid).unwrap_or_default(),
    };
    if pg.is_some() {
        started.push("postgres");
    }
    let state = StackState {
        profile: spec.name.clone(),
        pg_port: pg_cfg.port,
        pg_dir: pg_cfg.dir.clone(),
        pg_durable: pg_cfg.durable,
        kafka_port: kafka_cfg.port,
        kafka_controller_port: kafka_cfg.controller_port,
        kafka_dir: kafka_cfg.dir.clone(),
        kafka_pid,
        mongo_server: mongo_cfg.server.clone(),
        mongo_port: mongo_cfg.port,
        mongo_dir: mongo_cfg.dir.clone(),
        mongo_storage: mongo_cfg.storage.clone(),
        mongo_pid,
        throwaway: spec.throwaway,
        host: pg_cfg.host.clone(),
        clients: pg_cfg.clients.clone(),
    };
    write_state(&state)?;
    Ok(Ensured { state, started })
}

fn port_or_free(p: Option<u16>) -> Result<u16> {
    match p {
        Some(p) => Ok(p),
        None => proc::free_port(),
    }
}

/// The state of a running profile, if any.
pub fn stack_state(profile: &str) -> Option<StackState> {
    read_state(profile)
}

/// Stops the profile's servers (those its state file names) and, for throwaway profiles, deletes their files.
/// Returns false when nothing was recorded.
pub async fn stop_stack(profile: &str) -> Result<bool> {
    let _lock = lock(profile)?;
    let Some(s) = read_state(profile) else {
        return Ok(false);
    };
    let mut pg = Postgres::attach(PostgresConfig {
        port: s.pg_port,
        dir: s.pg_dir.clone(),
        durable: s.pg_durable,
        host: s.host.clone(),
        clients: s.clients.clone(),
    })
    .await?;
    let mut kafka = Kafka::attach(
        KafkaConfig {
            port: s.kafka_port,
            controller_port: s.kafka_controller_port,
            dir: s.kafka_dir.clone(),
            heap: "1g".into(),
            host: s.host.clone(),
        },
        s.kafka_pid,
    )
    .await?;
    let mut mongo = Mongo::attach(
        MongoConfig {
            server: s.mongo_server.clone(),
            port: s.mongo_port,
            dir: s.mongo_dir.clone(),
            storage: s.mongo_storage.clone(),
            sync_on_commit: false,
            host: s.host.clone(),
        },
        s.mongo_pid,
    );
    if s.throwaway {
        let (a, b, c) = tokio::join!(pg.destroy(), kafka.destroy(), mongo.destroy());
        a?;
        b?;
        c?;
    } else {
        let (a, b, c) = tokio::join!(
            async {
                if pg.running() {
                    pg.stop().await
                } else {
                    Ok(())
                }
            },
            kafka.stop(),
            mongo.stop()
        );
        a?;
        b?;
        c?;
    }
    std::fs::remove_file(state_path(profile)).ctx(|| "removing state file".into())?;
    Ok(true)
}

/// The servers of this test run: profile `$CQRS_TEST_PROFILE`, else `test` (`test-ferretdb` when
/// `$CQRS_MONGO_SERVER` picks FerretDB, so a run of each kind can share the machine).
#[derive(Debug)]
pub struct SharedStack {
    pub state: StackState,
}

impl SharedStack {
    pub fn pg_url(&self, database: &str) -> String {
        self.state.pg_url(database)
    }
    pub fn kafka_bootstrap(&self) -> String {
        self.state.kafka_bootstrap()
    }
    pub fn mongo_url(&self) -> String {
        self.state.mongo_url()
    }
}

static SHARED: OnceCell<SharedStack> = OnceCell::const_new();

/// The shared servers, started on first use in this run and reused by every test and test binary.
pub async fn shared_stack() -> Result<&'static SharedStack> {
    SHARED
        .get_or_try_init(|| async {
            let server = MongoServer::from_env()?;
            let profile = match std::env::var("CQRS_TEST_PROFILE") {
                Ok(p) => p,
                Err(_) if server == MongoServer::Secantus => "test".into(),
                Err(_) => format!("test-{server}"),
            };
            let mut spec = ProfileSpec::test(&profile);
            spec.mongo_server = Some(server);
            let ensured = ensure_stack(&spec).await?;
            Ok::<_, DevstackError>(SharedStack {
                state: ensured.state,
            })
        })
        .await
}

/// Resources private to one test on the shared servers.
#[derive(Debug, Clone)]
pub struct TestEnv {
    /// A database created for this test alone.
    pub pg_url: String,
    pub pg_database: String,
    pub kafka_bootstrap: String,
    /// Unique topic prefix: the test's topics are `<prefix>.users`, …
    pub topic_prefix: String,
    pub mongo_url: String,
    /// Unique Mongo database name.
    pub mongo_db: String,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh PostgreSQL database, topic prefix and Mongo database for the test `name`.
pub async fn test_env(name: &str) -> Result<TestEnv> {
    let stack = shared_stack().await?;
    let slug: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(30)
        .collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let unique = format!("{}{:x}", &uuid::Uuid::new_v4().simple().to_string()[..8], n);
    let db = format!("t_{slug}_{unique}");
    // A connection per call, not a pool in a static: every #[tokio::test] has its own runtime, and a pooled
    // connection made in one runtime breaks when that runtime ends.
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&stack.pg_url("postgres")).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("create database \"{db}\"")))
        .execute(&mut admin)
        .await?;
    let _ = admin.close().await;
    Ok(TestEnv {
        pg_url: stack.pg_url(&db),
        pg_database: db.clone(),
        kafka_bootstrap: stack.kafka_bootstrap(),
        topic_prefix: format!("t-{}-{unique}", slug.replace('_', "-")),
        mongo_url: stack.mongo_url(),
        mongo_db: db,
    })
}
