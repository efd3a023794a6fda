//! The MongoDB-wire server: SecantusDB (PyPI) in a venv, or FerretDB v1 (built from Go modules) on SQLite or
//! PostgreSQL. No real `mongod` can be installed on these machines.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{DevstackError, Installer, Result, proc, proc::ServerProcess};

/// Which Mongo-wire server runs. `CQRS_MONGO_SERVER=secantus|ferretdb` picks it for private servers and shared
/// profiles; SecantusDB is the default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MongoServer {
    /// SecantusDB: transactions, change streams and `bulkWrite`, but slow.
    #[default]
    Secantus,
    /// FerretDB v1 on SQLite files in the server's directory: no transactions, no change streams, no `bulkWrite`.
    FerretSqlite,
    /// FerretDB v1 on a PostgreSQL database that must already exist (not selectable by the environment).
    FerretPostgres { url: String },
}

impl MongoServer {
    pub const ENV: &'static str = "CQRS_MONGO_SERVER";

    /// The server `$CQRS_MONGO_SERVER` names (`secantus`, the default, or `ferretdb`).
    pub fn from_env() -> Result<Self> {
        match std::env::var(Self::ENV) {
            Err(std::env::VarError::NotPresent) => Ok(Self::default()),
            Ok(v) => match v.trim() {
                "" | "secantus" => Ok(Self::Secantus),
                "ferretdb" | "ferretdb-sqlite" => Ok(Self::FerretSqlite),
                other => Err(DevstackError::Command(format!(
                    "{}={other:?}: expected `secantus` or `ferretdb`",
                    Self::ENV
                ))),
            },
            Err(e) => Err(DevstackError::Command(format!("{}: {e}", Self::ENV))),
        }
    }

    /// A short name for profile names and messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Secantus => "secantus",
            Self::FerretSqlite => "ferretdb",
            Self::FerretPostgres { .. } => "ferretdb-postgresql",
        }
    }
}

impl std::fmt::Display for MongoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone)]
pub struct MongoConfig {
    pub server: MongoServer,
    pub port: u16,
    /// Where the server keeps its `log`.
    pub dir: PathBuf,
    /// `None`: in memory (tests; lost on restart; FerretDB: unsynced SQLite files under `dir`, wiped on start).
    /// `Some(path)`: on disk, kept across restarts. Ignored by FerretDB on PostgreSQL.
    pub storage: Option<PathBuf>,
    /// Fsync the log on every commit (`--sync-on-commit`). Without it SecantusDB acknowledges writes that a
    /// `kill -9` can lose, even at write concern `majority` — unlike a real MongoDB replica set, where a
    /// majority-acknowledged write is journaled. Tests that kill the server need it; it costs throughput.
    /// FerretDB on SQLite: `synchronous(full)` rather than `normal` (in WAL mode both survive a `kill -9`).
    pub sync_on_commit: bool,
    /// The address it listens on (127.0.0.1 unless a profile says otherwise).
    pub host: String,
}

/// A Mongo-wire server. Dropping a private one kills it and deletes its files.
#[derive(Debug)]
pub struct Mongo {
    cfg: MongoConfig,
    process: ServerProcess,
    owned: bool,
}

impl Mongo {
    /// A server of this test's own (the one `$CQRS_MONGO_SERVER` names), on disk (so a restart keeps the data),
    /// deleted on drop.
    pub async fn start_private() -> Result<Self> {
        Self::start_private_with(MongoServer::from_env()?).await
    }

    /// [`Mongo::start_private`] with this server.
    pub async fn start_private_with(server: MongoServer) -> Result<Self> {
        let dir = crate::cache_dir()
            .join("run")
            .join(format!("mongo-private-{}", uuid::Uuid::new_v4().simple()));
        let cfg = MongoConfig {
            server,
            port: proc::free_port()?,
            storage: Some(dir.join("data")),
            sync_on_commit: true,
            dir,
            host: proc::loopback(),
        };
        let mut m = Self::start_with(cfg).await?;
        m.owned = true;
        Ok(m)
    }

    pub async fn start_with(cfg: MongoConfig) -> Result<Self> {
        let mut m = Self {
            cfg,
            process: ServerProcess::default(),
            owned: false,
        };
        m.start().await?;
        Ok(m)
    }

    pub(crate) fn attach(cfg: MongoConfig, pid: u32) -> Self {
        Self {
            cfg,
            process: ServerProcess::attached(pid),
            owned: false,
        }
    }

    pub fn url(&self) -> String {
        mongo_url(&self.cfg.host, self.cfg.port)
    }
    pub fn server(&self) -> &MongoServer {
        &self.cfg.server
    }
    pub fn port(&self) -> u16 {
        self.cfg.port
    }
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }
    pub fn log_path(&self) -> PathBuf {
        self.cfg.dir.join("log")
    }

    /// Starts the server (again) and waits for a `ping` to succeed.
    pub async fn start(&mut self) -> Result<()> {
        if self.running() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.cfg.dir).map_err(|e| DevstackError::Io {
            what: format!("creating {}", self.cfg.dir.display()),
            source: e,
        })?;
        let port = self.cfg.port.to_string();
        let mut c = match &self.cfg.server {
            MongoServer::Secantus => {
                let storage = match &self.cfg.storage {
                    Some(p) => p.display().to_string(),
                    None => ":memory:".to_owned(),
                };
                let mut c = Command::new(Installer::global().mongo_exe().await?);
                c.args([
                    "--host",
                    &self.cfg.host,
                    "--port",
                    &port,
                    "--storage-path",
                    &storage,
                ])
                .args(["--log-level", "WARNING"]);
                if self.cfg.sync_on_commit {
                    c.arg("--sync-on-commit");
                }
                c
            }
            MongoServer::FerretSqlite => {
                let (data, sync) = match &self.cfg.storage {
                    Some(p) => (
                        p.clone(),
                        if self.cfg.sync_on_commit {
                            "full"
                        } else {
                            "normal"
                        },
                    ),
                    None => {
                        // The stand-in for "in memory": scratch files nobody syncs, started empty.
                        let p = self.cfg.dir.join("scratch");
                        proc::remove_dir(&p)?;
                        (p, "off")
                    }
                };
                let mut c = Command::new(Installer::global().ferretdb_exe().await?);
                c.arg("--listen")
                    .arg(format!("{}:{port}", self.cfg.host))
                    .args(["--handler", "sqlite", "--sqlite-synchronous", sync])
                    .arg("--sqlite-dir")
                    .arg(data);
                c
            }
            MongoServer::FerretPostgres { url } => {
                let mut c = Command::new(Installer::global().ferretdb_exe().await?);
                c.arg("--listen")
                    .arg(format!("{}:{port}", self.cfg.host))
                    .args(["--handler", "postgresql", "--postgresql-url", url]);
                c
            }
        };
        if self.cfg.server != MongoServer::Secantus {
            c.args(["--log-level", "warn"]);
        }
        c.current_dir(&self.cfg.dir);
        let child = proc::spawn_detached(c, &self.log_path())?;
        self.process = ServerProcess::spawned(child);
        self.wait_ready(Duration::from_secs(60)).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.exited() {
                return Err(DevstackError::Exited {
                    server: "mongo",
                    status: status.to_string(),
                    log: self.log_path(),
                });
            }
            if proc::port_open_on(&self.cfg.host, self.cfg.port) && ping(&self.url()).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DevstackError::NotReady {
                    server: "mongo",
                    seconds: timeout.as_secs(),
                    log: self.log_path(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(&mut self) -> Result<()> {
        self.process.stop(Duration::from_secs(15)).await;
        Ok(())
    }

    pub fn kill(&mut self) -> Result<()> {
        self.process.kill();
        Ok(())
    }

    pub fn running(&self) -> bool {
        self.process.running()
    }

    pub(crate) async fn destroy(&mut self) -> Result<()> {
        self.stop().await?;
        proc::remove_dir(&self.cfg.dir)
    }
}

pub(crate) fn mongo_url(host: &str, port: u16) -> String {
    format!("mongodb://{host}:{port}/?directConnection=true")
}

pub(crate) async fn ping(url: &str) -> bool {
    let Ok(mut opts) = mongodb::options::ClientOptions::parse(url).await else {
        return false;
    };
    opts.server_selection_timeout = Some(Duration::from_millis(800));
    opts.connect_timeout = Some(Duration::from_millis(800));
    let Ok(client) = mongodb::Client::with_options(opts) else {
        return false;
    };
    client
        .database("admin")
        .run_command(mongodb::bson::doc! {"ping": 1})
        .await
        .is_ok()
}

impl Drop for Mongo {
    fn drop(&mut self) {
        if self.owned {
            let _ = self.kill();
            let _ = std::fs::remove_dir_all(&self.cfg.dir);
        }
    }
}
