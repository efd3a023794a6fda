//! `query`: the read side of the CQRS platform.

use clap::Parser;
use cqrs_common::{TelemetryArgs, shutdown_signal};
use cqrs_query::{Application, QueryConfig};

#[derive(Debug, Parser)]
#[command(
    name = "query",
    about = "CQRS read side: Kafka → MongoDB read models → HTTP"
)]
struct Args {
    #[command(flatten)]
    config: QueryConfig,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { config, telemetry } = Args::parse();
    telemetry.init();
    let app = Application::build(config).await?;
    tracing::info!(port = app.port(), "query listening");
    app.run_until_stopped(shutdown_signal()).await?;
    Ok(())
}
