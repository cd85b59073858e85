//! `understudy`: fault-tolerance replication for KVM virtual machines.

mod run;
mod workload;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Keeps a hot standby of a KVM guest on a second host and fails over to it.
#[derive(Parser)]
#[command(name = "understudy", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest alone (no replication), streaming its console to stdout.
    Run(run::RunArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result: Result<i32> = match cli.command {
        Command::Run(args) => run::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
