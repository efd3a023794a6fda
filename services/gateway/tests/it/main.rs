//! Gateway integration tests: real servers on 127.0.0.1, ephemeral ports.

mod auth;
mod common;
mod limits;
mod resilience;
mod routing;
mod streaming;
