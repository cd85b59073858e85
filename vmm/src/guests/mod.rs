//! Built-in guest workloads: small x86-64 programs generated with iced-x86's `CodeAssembler`,
//! run by the VMM in long mode at CPL3 (see [`layout`] for the memory contract).
//!
//! - `idle` ([`idle`]): spins with `pause`, bumping the progress counter every `spins` pauses.
//! - `dirty` ([`dirty`]): writes whole pages of zero/duplicate/text/random content at a paced
//!   rate over a working set, sequentially, randomly or hot/cold.
//! - `ledger` ([`ledger`]): self-checking; per-page versions and a running checksum, verified
//!   every `verify_every` steps, printing `tick N ok` or `CORRUPT ...` (and exiting with 1).
//!
//! All parameters are baked into the code as immediates and all run-time state lives in the
//! control block at [`layout::CONTROL_GPA`], the data area, the stack or registers, so a guest
//! restored from its memory and registers continues without the VMM supplying anything. Every
//! guest keeps its progress counter at [`layout::PROGRESS_GPA`].
//!
//! The guests are single-threaded: only the vCPU that starts with `RSP = STACK_TOP` runs the
//! workload; other vCPUs spin on `pause` without touching memory.
//!
//! Paced guests (`dirty`, `ledger` with a rate) pace themselves with `rdtsc` on an absolute
//! schedule in 1 ms ticks, using the TSC frequency the VMM passes in [`GuestEnv::tsc_khz`];
//! after a stall (a paused vCPU) they catch up at most 100 ms of work, then go on at the rate.
//!
//! ```no_run
//! use std::collections::HashMap;
//! use understudy_vmm::guests::{build, GuestEnv, Workload};
//! let flags: HashMap<String, String> =
//!     [("rate".to_string(), "10000".to_string()), ("working-set".into(), "64M".into())].into();
//! let w = Workload::from_cli("dirty", &flags).unwrap();
//! let prog = build(&w, &GuestEnv { memory_bytes: 256 << 20, tsc_khz: 2_600_000 }).unwrap();
//! // load prog.code at layout::CODE_GPA, RIP = prog.entry, RSP = layout::STACK_TOP
//! ```

mod asm;
mod dirty;
mod idle;
pub mod layout;
mod ledger;
pub mod model;
mod params;

pub use params::{
    fmt_size, parse_size_in, parse_u64_in, ContentMix, DirtyParams, IdleParams, LedgerParams,
    ParamError, Pattern, Workload, MAX_PAGES, MAX_RATE,
};

pub use asm::MAX_BACKLOG_MS;
pub use dirty::{TEMPLATE_SEEDS, TEXT_WORDS};

/// The `N` of every `tick N ok` line the ledger guest printed, in order (a line cut short at
/// the end of `console` is ignored). Drills and tests judge a console by these.
pub fn ledger_ticks(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("tick ")?
                .strip_suffix(" ok")?
                .parse()
                .ok()
        })
        .collect()
}

/// What the VMM tells the guest builder about the machine the guest will run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestEnv {
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// TSC frequency in kHz (from KVM), used by the guests' pacing.
    pub tsc_khz: u64,
}

/// A guest program: code to load at [`layout::CODE_GPA`] and its entry point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestProgram {
    /// The code image (at most [`layout::CODE_MAX`] bytes).
    pub code: Vec<u8>,
    /// Guest-physical address of the first instruction.
    pub entry: u64,
}

/// Why a guest could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestBuildError {
    /// A parameter is invalid or does not fit the environment.
    #[error(transparent)]
    Param(#[from] ParamError),
    /// The assembler failed (a bug in the generator).
    #[error("guest assembler: {0}")]
    Assemble(String),
    /// The code image is larger than [`layout::CODE_MAX`].
    #[error("guest code is {size} bytes, more than the {max} bytes at CODE_GPA")]
    TooLarge {
        /// Size of the image.
        size: usize,
        /// The limit.
        max: usize,
    },
}

/// Generates the code of `workload` for the machine described by `env`, after validating the
/// parameters against it.
pub fn build(workload: &Workload, env: &GuestEnv) -> Result<GuestProgram, GuestBuildError> {
    workload.validate(env)?;
    let code = emit(workload, env)?.bytes;
    if code.len() > layout::CODE_MAX {
        return Err(GuestBuildError::TooLarge {
            size: code.len(),
            max: layout::CODE_MAX,
        });
    }
    Ok(GuestProgram {
        code,
        entry: layout::CODE_GPA,
    })
}

/// Generates the image of a validated workload.
fn emit(workload: &Workload, env: &GuestEnv) -> Result<asm::Image, GuestBuildError> {
    match workload {
        Workload::Idle(p) => idle::emit(p),
        Workload::Dirty(p) => dirty::emit(p, env.tsc_khz),
        Workload::Ledger(p) => ledger::emit(p, env.tsc_khz),
    }
    .map_err(asm::asm_err)
}

#[cfg(test)]
mod tests;
