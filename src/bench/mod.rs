//! `understudy bench`: benchmarks that print their figures next to the reference they are
//! compared with, measured in the same run.

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Protect mode on the `dirty` guest at several rates (see BENCHMARKS.md).
    Protect,
}

pub fn run(cmd: BenchCommand) -> Result<i32> {
    match cmd {
        BenchCommand::Protect => anyhow::bail!("bench protect is not implemented yet"),
    }
}
