//! Pieces every binary of the platform shares: logging setup, the shutdown signal, the health/metrics
//! endpoints, graceful HTTP serving and RFC 9457 problem responses.

pub mod health;
pub mod problem;
pub mod serve;
pub mod shutdown;
pub mod telemetry;

pub use health::{HealthState, ReadinessCheck, health_router};
pub use problem::{FieldError, Problem};
pub use serve::serve;
pub use shutdown::shutdown_signal;
pub use telemetry::{LogFormat, TelemetryArgs};
