use std::path::PathBuf;

/// Everything that can go wrong provisioning or running a local server.
#[derive(Debug, thiserror::Error)]
pub enum DevstackError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("install step `{script}` failed ({status}); see its output above")]
    Install { script: PathBuf, status: String },
    #[error("{server} did not become ready within {seconds}s; log: {log}")]
    NotReady {
        server: &'static str,
        seconds: u64,
        log: PathBuf,
    },
    #[error("{server} exited during startup ({status}); log: {log}")]
    Exited {
        server: &'static str,
        status: String,
        log: PathBuf,
    },
    #[error("{0}")]
    Command(String),
    #[error("postgres: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("state file: {0}")]
    State(#[from] serde_json::Error),
}

pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, DevstackError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, DevstackError> {
        self.map_err(|source| DevstackError::Io {
            what: what(),
            source,
        })
    }
}
