//! Real infrastructure on 127.0.0.1 without Docker: PostgreSQL 15 (Debian), Apache Kafka 4.3.1 in KRaft mode
//! (Maven Central jars on the JDK) and a MongoDB-wire server: PyPI SecantusDB, or FerretDB v1 (built from Go
//! modules) with `CQRS_MONGO_SERVER=ferretdb`.
//!
//! Everything is installed on first use by the scripts in `crates/devstack/scripts/` (idempotent, cached under
//! `$XDG_CACHE_HOME/cqrs-stack` or `~/.cache/cqrs-stack`), so a fresh machine provisions itself and a warm one
//! starts in seconds.
//!
//! Two ways to use it:
//! - [`test_env`]: the shared servers of a test run (started once, reused by every test process of the run and
//!   by later runs while alive), plus resources private to one test: a fresh PostgreSQL database, a unique
//!   Kafka topic prefix and a unique Mongo database, so tests run in parallel.
//! - [`Postgres`], [`Kafka`], [`Mongo`]: servers of a test's own, which it may stop, `kill -9` and restart
//!   without disturbing other tests. They are stopped when dropped.

mod error;
mod install;
mod kafka;
mod mongo;
mod postgres;
mod proc;
mod shared;

pub use error::DevstackError;
pub use install::{Installer, cache_dir};
pub use kafka::{Kafka, KafkaConfig};
pub use mongo::{Mongo, MongoConfig, MongoServer};
pub use postgres::{Postgres, PostgresConfig};
pub use proc::{LOOPBACK, free_port, loopback, port_open_on};
pub use shared::{
    Ensured, ProfileSpec, SharedStack, StackState, TestEnv, ensure_stack, shared_stack,
    stack_state, stop_stack, test_env,
};

pub type Result<T, E = DevstackError> = std::result::Result<T, E>;
