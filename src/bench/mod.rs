//! `understudy bench`: benchmarks that print their figures next to the reference they are
//! compared with, measured in the same run.

mod failover;
mod migrate;
mod protect;
mod soak;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Protect mode on the `dirty` guest at several rates, each next to the same guest with
    /// dirty logging only (see BENCHMARKS.md).
    Protect(protect::ProtectArgs),
    /// Failover drills at 256 MiB and 1 GiB: detection, promotion and RTO against issue 5's
    /// targets (see BENCHMARKS.md).
    Failover(failover::FailoverBenchArgs),
    /// Our migration algorithms and QEMU's on QEMU's reference guest (same memory, working set
    /// and dirty rate), in one table with issue 6's targets (see BENCHMARKS.md).
    Migrate(migrate::MigrateBenchArgs),
    /// Protect mode with the ledger guest under 2% datagram loss and random kills of either
    /// side: failovers survived, consistency checks, lag and memory high-water marks (see
    /// BENCHMARKS.md).
    Soak(soak::SoakArgs),
}

pub fn run(cmd: BenchCommand) -> Result<i32> {
    match cmd {
        BenchCommand::Protect(args) => protect::run(args),
        BenchCommand::Failover(args) => failover::run(args),
        BenchCommand::Migrate(args) => migrate::run(args),
        BenchCommand::Soak(args) => soak::run(args),
    }
}
