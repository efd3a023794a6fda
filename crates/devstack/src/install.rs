//! Runs the idempotent install scripts and remembers their answers for the life of the process.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use tokio::sync::OnceCell;

use crate::{DevstackError, Result};

/// The cache directory every install and every persistent server lives under.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CQRS_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("cqrs-stack")
}

fn scripts_dir() -> PathBuf {
    // The scripts ship in the repository next to this crate; an override lets a packaged binary find them.
    std::env::var_os("CQRS_DEVSTACK_SCRIPTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts"))
}

/// Runs one install script (blocking) and returns the single line it prints: the installed path.
fn run_script(name: &str) -> Result<PathBuf> {
    let script = scripts_dir().join(name);
    let out = Command::new("bash")
        .arg(&script)
        .env("CQRS_CACHE", cache_dir())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|source| DevstackError::Io {
            what: format!("running {}", script.display()),
            source,
        })?;
    if !out.status.success() {
        return Err(DevstackError::Install {
            script,
            status: out.status.to_string(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default().trim().to_owned();
    if line.is_empty() {
        return Err(DevstackError::Install {
            script,
            status: "printed no path".into(),
        });
    }
    Ok(PathBuf::from(line))
}

/// Installed locations, each resolved at most once per process.
#[derive(Debug, Default)]
pub struct Installer {
    postgres: OnceCell<PathBuf>,
    kafka: OnceCell<PathBuf>,
    mongo: OnceCell<PathBuf>,
    ferretdb: OnceCell<PathBuf>,
}

static INSTALLER: Installer = Installer {
    postgres: OnceCell::const_new(),
    kafka: OnceCell::const_new(),
    mongo: OnceCell::const_new(),
    ferretdb: OnceCell::const_new(),
};

impl Installer {
    pub fn global() -> &'static Installer {
        &INSTALLER
    }

    async fn resolve(cell: &OnceCell<PathBuf>, script: &'static str) -> Result<PathBuf> {
        cell.get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || run_script(script))
                .await
                .map_err(|e| DevstackError::Command(format!("install task panicked: {e}")))?
        })
        .await
        .cloned()
    }

    /// PostgreSQL's bin directory (initdb, pg_ctl, postgres).
    pub async fn postgres_bin(&self) -> Result<PathBuf> {
        Self::resolve(&self.postgres, "install-postgres.sh").await
    }
    /// The directory holding the Kafka broker's jars.
    pub async fn kafka_libs(&self) -> Result<PathBuf> {
        Self::resolve(&self.kafka, "install-kafka.sh").await
    }
    /// The `secantusd-py` executable.
    pub async fn mongo_exe(&self) -> Result<PathBuf> {
        Self::resolve(&self.mongo, "install-mongo.sh").await
    }
    /// The FerretDB wrapper executable (built from Go modules on first use: about a minute cold).
    pub async fn ferretdb_exe(&self) -> Result<PathBuf> {
        Self::resolve(&self.ferretdb, "install-ferretdb.sh").await
    }
}
