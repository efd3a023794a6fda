//! The gateway binary: `gateway` serves, `gateway mint-token` prints a development token.

use anyhow::Context;
use clap::Parser;
use cqrs_common::shutdown_signal;
use cqrs_gateway::{
    Application,
    cli::{Cli, Command},
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { command, serve } = Cli::parse();
    if let Some(Command::MintToken(args)) = command {
        println!("{}", args.run()?);
        return Ok(());
    }
    let (config, telemetry) = serve.into_config()?;
    telemetry.init();
    let app = Application::build(config)
        .await
        .context("starting the gateway")?;
    app.run_until_stopped(shutdown_signal()).await?;
    Ok(())
}
