//! `mutation`: the write side's binary. All logic lives in the library (`cqrs_mutation`).

use anyhow::Context;
use clap::Parser;
use cqrs_common::shutdown_signal;
use cqrs_mutation::{Application, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.telemetry.init();
    let app = Application::build(config)
        .await
        .context("starting the mutation service")?;
    tracing::info!(port = app.port(), "mutation listening");
    app.run_until_stopped(shutdown_signal())
        .await
        .context("mutation service")?;
    Ok(())
}
