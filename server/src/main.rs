//! `outbox-server`: see `outbox-server --help` and docs/SERVER.md.

use std::process::ExitCode;

use clap::Parser;
use outbox_server::config::Config;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse().with_env();
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| "info".parse().unwrap_or_default());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false),
        )
        .with(filter)
        .init();
    match outbox_server::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("outbox-server: {e}");
            ExitCode::FAILURE
        }
    }
}
