//! The MongoDB-wire server: SecantusDB (PyPI) in a venv. No real `mongod` can be installed on these machines.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use crate::{DevstackError, Installer, Result, proc, proc::ServerProcess};

#[derive(Debug, Clone)]
pub struct MongoConfig {
    pub port: u16,
    /// Where the server keeps its `log`.
    pub dir: PathBuf,
    /// `None`: in memory (tests; lost on restart). `Some(path)`: on disk, kept across restarts.
    pub storage: Option<PathBuf>,
    /// Fsync the log on every commit (`--sync-on-commit`). Without it SecantusDB acknowledges writes that a
    /// `kill -9` can lose, even at write concern `majority` — unlike a real MongoDB replica set, where a
    /// majority-acknowledged write is journaled. Tests that kill the server need it; it costs throughput.
    pub sync_on_commit: bool,
}

/// A Mongo-wire server. Dropping a private one kills it and deletes its files.
#[derive(Debug)]
pub struct Mongo {
    cfg: MongoConfig,
    exe: PathBuf,
    process: ServerProcess,
    owned: bool,
}

impl Mongo {
    /// A server of this test's own, on disk (so a restart keeps the data), deleted on drop.
    pub async fn start_private() -> Result<Self> {
        let dir = crate::cache_dir()
            .join("run")
            .join(format!("mongo-private-{}", uuid::Uuid::new_v4().simple()));
        let cfg = MongoConfig {
            port: proc::free_port()?,
            storage: Some(dir.join("data")),
            sync_on_commit: true,
            dir,
        };
        let mut m = Self::start_with(cfg).await?;
        m.owned = true;
        Ok(m)
    }

    pub async fn start_with(cfg: MongoConfig) -> Result<Self> {
        let exe = Installer::global().mongo_exe().await?;
        let mut m = Self {
            cfg,
            exe,
            process: ServerProcess::default(),
            owned: false,
        };
        m.start().await?;
        Ok(m)
    }

    pub(crate) async fn attach(cfg: MongoConfig, pid: u32) -> Result<Self> {
        let exe = Installer::global().mongo_exe().await?;
        Ok(Self {
            cfg,
            exe,
            process: ServerProcess::attached(pid),
            owned: false,
        })
    }

    pub fn url(&self) -> String {
        mongo_url(self.cfg.port)
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
        let storage = match &self.cfg.storage {
            Some(p) => p.display().to_string(),
            None => ":memory:".to_owned(),
        };
        let mut c = Command::new(&self.exe);
        c.args([
            "--host",
            "127.0.0.1",
            "--port",
            &self.cfg.port.to_string(),
            "--storage-path",
            &storage,
        ])
        .args(["--log-level", "WARNING"])
        .current_dir(&self.cfg.dir);
        if self.cfg.sync_on_commit {
            c.arg("--sync-on-commit");
        }
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
            if proc::port_open(self.cfg.port) && ping(&self.url()).await {
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

pub(crate) fn mongo_url(port: u16) -> String {
    format!("mongodb://127.0.0.1:{port}/?directConnection=true")
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
