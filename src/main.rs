//! The binary: parses the command line and hands it to [`app`], which wires the library's
//! parts together. anyhow lives here, at the edge; the library has typed errors.

mod app;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use dagster_taskiq_controller::config::{Cli, Command, LogFormat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => app::run(args).await,
        Command::Doctor(args) => app::doctor(args).await,
        Command::Dlq(args) => app::dlq::dlq(args).await,
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Pretty => builder.init(),
    }
}
