//! Command-line flags shared by every command that starts a guest.

use std::collections::HashMap;

use anyhow::{Context, Result};
use clap::Args;
use understudy_vmm::guests::{self, Workload};
use understudy_vmm::memory::{split_regions, MAX_MEMORY, MIN_MEMORY};
use understudy_vmm::RegionSpec;

/// Which guest to run and with what.
#[derive(Args, Clone, Debug)]
pub struct GuestArgs {
    /// Built-in guest: idle, dirty (pages/s over a working set) or ledger (self-checking).
    #[arg(long, default_value = "ledger")]
    pub workload: String,
    /// Guest memory size (K/M/G suffixes), 16M..=4G.
    #[arg(long, default_value = "256M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    pub vcpus: u8,
    /// Split guest memory into this many memory regions (memfds).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub regions: u64,
    /// dirty, ledger: pages (dirty) or steps (ledger) per second; 0 = unpaced.
    #[arg(long)]
    pub rate: Option<String>,
    /// dirty: working-set size (K/M/G suffixes).
    #[arg(long)]
    pub working_set: Option<String>,
    /// dirty: sequential, random or hotcold.
    #[arg(long)]
    pub pattern: Option<String>,
    /// dirty/hotcold: percent of pages that are hot.
    #[arg(long)]
    pub hot_set: Option<String>,
    /// dirty/hotcold: percent of writes that go to hot pages.
    #[arg(long)]
    pub hot_writes: Option<String>,
    /// dirty: content mix in percent, e.g. zero=40,dup=10,text=30,random=20.
    #[arg(long)]
    pub mix: Option<String>,
    /// dirty, ledger: PRNG seed.
    #[arg(long)]
    pub seed: Option<String>,
    /// ledger: number of ledger pages.
    #[arg(long)]
    pub pages: Option<String>,
    /// ledger: steps between full self-checks (each prints `tick N ok`).
    #[arg(long)]
    pub verify_every: Option<String>,
    /// ledger: exit after this many ticks (0 = never).
    #[arg(long)]
    pub stop_after_ticks: Option<String>,
    /// idle: pause instructions per progress tick.
    #[arg(long)]
    pub spins: Option<String>,
}

impl GuestArgs {
    /// The workload with its parameters.
    pub fn workload(&self) -> Result<Workload> {
        let mut flags = HashMap::new();
        for (k, v) in [
            ("rate", &self.rate),
            ("working-set", &self.working_set),
            ("pattern", &self.pattern),
            ("hot-set", &self.hot_set),
            ("hot-writes", &self.hot_writes),
            ("mix", &self.mix),
            ("seed", &self.seed),
            ("pages", &self.pages),
            ("verify-every", &self.verify_every),
            ("stop-after-ticks", &self.stop_after_ticks),
            ("spins", &self.spins),
        ] {
            if let Some(v) = v {
                flags.insert(k.to_string(), v.clone());
            }
        }
        Ok(Workload::from_cli(&self.workload, &flags)?)
    }

    /// Guest memory size in bytes.
    pub fn memory_bytes(&self) -> Result<u64> {
        guests::parse_size_in("memory", &self.memory, MIN_MEMORY, MAX_MEMORY)
            .context("bad --memory")
    }

    /// The memory layout.
    pub fn regions(&self) -> Result<Vec<RegionSpec>> {
        Ok(split_regions(self.memory_bytes()?, self.regions as usize))
    }
}
