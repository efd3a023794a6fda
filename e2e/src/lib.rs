//! End-to-end proof of the CQRS stack: a gateway-only client, a harness that runs the service binaries as
//! killable subprocesses, and the scenarios (`seed`, `hostile`, `chaos`, `bench`, `load`).

pub mod bench;
pub mod chaos;
pub mod client;
pub mod hostile;
pub mod infra;
pub mod load;
pub mod seed;
pub mod stack;
pub mod stats;
pub mod svg;
pub mod verify;

pub use client::{Gateway, RawRequest, Resp, TokenMinter};
pub use stack::{Component, Stack, StackConfig};

/// Errors of the e2e tooling.
#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    #[error("setup: {0}")]
    Setup(String),
    #[error("http: {0}")]
    Http(String),
    #[error("timeout: {0}")]
    Timeout(String),
    #[error("check failed: {0}")]
    Check(String),
    #[error("infrastructure: {0}")]
    Infra(String),
}

/// 1999 → "19.99" (what the services print for cents).
pub fn format_cents(c: i64) -> String {
    let sign = if c < 0 { "-" } else { "" };
    let a = c.unsigned_abs();
    format!("{sign}{}.{:02}", a / 100, a % 100)
}
