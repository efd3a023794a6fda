//! PostgreSQL 15 from Debian's packages: a throwaway or persistent cluster via initdb/pg_ctl.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use nix::sys::signal::Signal;

use crate::{DevstackError, Installer, Result, error::IoContext, proc};

#[derive(Debug, Clone)]
pub struct PostgresConfig {
    pub port: u16,
    /// Holds `data/`, the socket and `log`.
    pub dir: PathBuf,
    /// `false` turns off fsync and friends: fine for tests, never for benchmarks.
    pub durable: bool,
    /// Where it listens besides 127.0.0.1 and what its URLs name (127.0.0.1 by default). The local cluster's
    /// pods reach the host's servers at the node's address, as they would a managed database.
    pub host: String,
    /// Client addresses allowed from `host` (a CIDR, e.g. the cluster's pod range), trusted like loopback.
    pub clients: Option<String>,
}

/// A PostgreSQL cluster on 127.0.0.1. Dropping a private one stops it and deletes its files.
#[derive(Debug)]
pub struct Postgres {
    cfg: PostgresConfig,
    bin: PathBuf,
    owned: bool,
}

/// Where clusters live. PostgreSQL runs as the `postgres` user when we are root, and that user cannot enter
/// root's home, so root's clusters live under /var/tmp instead of the cache.
pub(crate) fn base_dir() -> PathBuf {
    if proc::is_root() {
        PathBuf::from("/var/tmp/cqrs-stack-pg")
    } else {
        crate::cache_dir().join("pg")
    }
}

impl Postgres {
    /// A new cluster of this test's own on a free port (non-durable), removed on drop.
    pub async fn start_private() -> Result<Self> {
        Self::start_private_with(false).await
    }

    /// A new cluster of its own, removed on drop; `durable` keeps fsync and synchronous commit on, as
    /// benchmarks and anything that quotes "acknowledged = durable" need.
    pub async fn start_private_with(durable: bool) -> Result<Self> {
        let cfg = PostgresConfig {
            port: proc::free_port()?,
            dir: base_dir().join(format!("private-{}", uuid::Uuid::new_v4().simple())),
            durable,
            host: proc::loopback(),
            clients: None,
        };
        let mut pg = Self::start_with(cfg).await?;
        pg.owned = true;
        Ok(pg)
    }

    /// Starts (creating if needed) the cluster described by `cfg`. It keeps running after this value is dropped.
    pub async fn start_with(cfg: PostgresConfig) -> Result<Self> {
        let bin = Installer::global().postgres_bin().await?;
        let pg = Self {
            cfg,
            bin,
            owned: false,
        };
        pg.init()?;
        pg.allow_clients()?;
        pg.pg_ctl_start()?;
        Ok(pg)
    }

    /// Attaches to a cluster that is already running (state file of a shared stack).
    pub(crate) async fn attach(cfg: PostgresConfig) -> Result<Self> {
        let bin = Installer::global().postgres_bin().await?;
        Ok(Self {
            cfg,
            bin,
            owned: false,
        })
    }

    pub fn port(&self) -> u16 {
        self.cfg.port
    }
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@{}:{}/{database}",
            self.cfg.host, self.cfg.port
        )
    }
    pub fn log_path(&self) -> PathBuf {
        self.cfg.dir.join("log")
    }
    fn data(&self) -> PathBuf {
        self.cfg.dir.join("data")
    }

    fn as_postgres(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        if proc::is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn init(&self) -> Result<()> {
        if self.data().join("PG_VERSION").exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.cfg.dir)
            .ctx(|| format!("creating {}", self.cfg.dir.display()))?;
        if proc::is_root() {
            let mut chown = Command::new("chown");
            chown.args(["-R", "postgres:postgres"]).arg(base_dir());
            proc::run(chown, "chown postgres data dir")?;
        }
        let mut c = self.as_postgres("initdb");
        c.arg("-D").arg(self.data()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]);
        proc::run(c, "initdb").map(|_| ())
    }

    /// Lets `clients` and the host's own address connect (trusted, like loopback): idempotent lines in
    /// pg_hba.conf. A connection to `host` from this machine comes from `host` itself.
    fn allow_clients(&self) -> Result<()> {
        let mut allowed: Vec<String> = self.cfg.clients.iter().cloned().collect();
        if self.cfg.host != proc::LOOPBACK {
            allowed.push(format!("{}/32", self.cfg.host));
        }
        if allowed.is_empty() {
            return Ok(());
        }
        let path = self.data().join("pg_hba.conf");
        let mut text =
            std::fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?;
        let before = text.len();
        for cidr in allowed {
            let line = format!("host all all {cidr} trust");
            if !text.lines().any(|l| l.trim() == line) {
                text.push_str(&format!("# clients on {}\n{line}\n", self.cfg.host));
            }
        }
        if text.len() != before {
            std::fs::write(&path, text).ctx(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let listen = if self.cfg.host == proc::LOOPBACK {
            self.cfg.host.clone()
        } else {
            format!("127.0.0.1,{}", self.cfg.host)
        };
        let mut opts = format!(
            "-c listen_addresses={listen} -p {} -k {} -c max_connections=300 -c shared_buffers=128MB",
            self.cfg.port,
            self.cfg.dir.display()
        );
        if !self.cfg.durable {
            opts.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let mut c = self.as_postgres("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "60", "start", "-o", &opts]);
        proc::run(c, "pg_ctl start").map(|_| ())
    }

    /// Starts it again after [`stop`](Self::stop) or [`kill`](Self::kill) (same port and data).
    pub async fn start(&mut self) -> Result<()> {
        let this = &*self;
        let pid_file = this.data().join("postmaster.pid");
        if pid_file.exists() && !self.running() {
            // A killed postmaster leaves its pid file; pg_ctl copes, but say so in the log.
            tracing::info!("restarting PostgreSQL after an unclean stop");
        }
        self.pg_ctl_start()
    }

    /// Fast shutdown (rolls back open transactions, like a node going away cleanly).
    pub async fn stop(&mut self) -> Result<()> {
        let mut c = self.as_postgres("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "stop"]);
        proc::run(c, "pg_ctl stop").map(|_| ())
    }

    /// `kill -9` of the postmaster.
    pub fn kill(&mut self) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| DevstackError::Command("PostgreSQL is not running".into()))?;
        proc::signal(pid, Signal::SIGKILL);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    pub fn running(&self) -> bool {
        self.pid().is_some_and(proc::pid_alive) && proc::port_open_on(&self.cfg.host, self.cfg.port)
    }

    /// Creates a database (no error when it exists).
    pub async fn create_database(&self, name: &str) -> Result<()> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres")).await?;
        let exists: Option<i32> =
            sqlx::query_scalar("select 1 from pg_database where datname = $1")
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

    /// Stops it and deletes its files.
    pub(crate) async fn destroy(&mut self) -> Result<()> {
        if self.running() {
            self.stop().await?;
        }
        std::fs::remove_dir_all(&self.cfg.dir)
            .ctx(|| format!("removing {}", self.cfg.dir.display()))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.owned {
            if let Some(pid) = self.pid() {
                proc::signal(pid, Signal::SIGQUIT);
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while proc::pid_alive(pid) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = std::fs::remove_dir_all(&self.cfg.dir);
        }
    }
}
