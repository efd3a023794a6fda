//! `tracing` setup: `RUST_LOG` filters, human text locally, JSON lines in a cluster.

use clap::{Args, ValueEnum};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines (local development).
    #[default]
    Text,
    /// One JSON object per line (in a cluster, for log shippers).
    Json,
}

/// Logging flags shared by every binary; flatten into its clap `Args`.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log format; `json` in Kubernetes.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl TelemetryArgs {
    /// Installs the global subscriber. The filter comes from `RUST_LOG` (default `info`).
    /// Calling it twice is harmless (the second call is ignored), which keeps tests simple.
    pub fn init(&self) {
        init(self.log_format);
    }
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry.with(fmt::layer().with_target(true)).try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false),
            )
            .try_init(),
    };
    // Already initialised (tests start several apps in one process): keep the first subscriber.
    let _ = result;
}
