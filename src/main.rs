//! `understudy`: fault-tolerance replication for KVM virtual machines.

mod admin;
mod bench;
mod certs;
mod config;
mod drill;
mod metrics;
mod protect;
mod relay;
mod run;
mod witness;
mod workload;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
    /// Run a guest and protect it by continuous checkpointing to a backup.
    Primary(Box<protect::PrimaryArgs>),
    /// Keep a hot, verified image of a primary's guest.
    Backup(protect::BackupArgs),
    /// A local failover drill: witness, backup and primary processes; kill the primary; check
    /// the ledger and the console; report detection, promotion and RTO.
    Drill(drill::DrillArgs),
    /// The third vote: grants each VM's lease to one node at a time (fencing).
    Witness(witness::WitnessArgs),
    /// Benchmarks (figures with their references, measured in the same run).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Manage the private CA and node certificates for mutual TLS.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// A UDP relay with delay, jitter, loss, a bandwidth limit and a blackhole on demand, to
    /// put between a primary and its backup in tests and drills.
    Relay(relay::RelayArgs),
    /// Show a node's role, peer, protection state, last epoch and lag (its --admin endpoint).
    Status(admin::StatusArgs),
    /// Planned switchover: the primary pauses, its last epoch is committed, the backup takes
    /// over; prints the downtime.
    Promote(admin::PromoteArgs),
    /// Move a running VM to another host (precopy or quick eviction), reporting downtime,
    /// eviction time, bytes on the wire, guest slowdown and robustness.
    Migrate(admin::MigrateArgs),
    /// Evict a VM: a quick-eviction move ships its last dirty pages; a protected VM switches
    /// over to its backup.
    Evict(admin::EvictArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = match config::expand(std::env::args().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let cli = Cli::command()
        .args_override_self(true)
        .get_matches_from(args);
    let cli = match Cli::from_arg_matches(&cli) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let result: Result<i32> = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Primary(args) => protect::primary(*args),
        Command::Backup(args) => protect::backup(args),
        Command::Certs(cmd) => certs::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Witness(args) => witness::run(args),
        Command::Drill(args) => drill::run(args),
        Command::Status(args) => admin::status(args),
        Command::Relay(args) => relay::run(args),
        Command::Promote(args) => admin::promote(args),
        Command::Migrate(args) => admin::migrate(args),
        Command::Evict(args) => admin::evict(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
