//! Workload parameters, their defaults, limits and command-line parsing.
//!
//! The CLI passes the flags of a `--workload` as a map from flag name (with or without the
//! leading `--`) to value, e.g. `{"rate": "10000", "working-set": "64M", "pattern": "random",
//! "mix": "zero=40,dup=10,text=30,random=20"}`, to [`Workload::from_cli`]. Every error names
//! the flag and the allowed values or range.
//!
//! | workload | flag               | meaning                                   | default      |
//! |----------|--------------------|-------------------------------------------|--------------|
//! | idle     | `spins`            | `pause` instructions per progress tick    | 10000        |
//! | dirty    | `rate`             | pages/s, 0 = unpaced                      | 10000        |
//! | dirty    | `working-set`      | bytes from DATA_GPA (K/M/G suffixes)      | 64M          |
//! | dirty    | `pattern`          | `sequential`, `random`, `hotcold`         | random       |
//! | dirty    | `hot-set`          | hotcold: % of the pages that are hot      | 10           |
//! | dirty    | `hot-writes`       | hotcold: % of the writes to hot pages     | 90           |
//! | dirty    | `mix`              | % of `zero`,`dup`,`text`,`random` pages   | 40,10,30,20  |
//! | dirty    | `seed`             | PRNG seed                                 | fixed        |
//! | ledger   | `pages`            | ledger pages from DATA_GPA                | 2048 (8 MiB) |
//! | ledger   | `verify-every`     | steps between full verifications (ticks)  | 500          |
//! | ledger   | `rate`             | steps/s, 0 = unpaced                      | 10000        |
//! | ledger   | `stop-after-ticks` | exit with code 0 after this many ticks    | 0 (never)    |
//! | ledger   | `seed`             | PRNG seed                                 | fixed        |

use std::collections::HashMap;
use std::fmt;

use super::layout::{DATA_GPA, PAGE_SIZE};
use super::GuestEnv;

/// Largest pacing rate (pages/s or steps/s) a guest accepts.
pub const MAX_RATE: u64 = 1_000_000;
/// Largest number of pages a workload may use (4 GiB, the most the page tables map).
pub const MAX_PAGES: u64 = 1 << 20;

/// A bad workload parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// `--workload` names no built-in guest.
    #[error("unknown workload {0:?}: expected one of idle, dirty, ledger")]
    UnknownWorkload(String),
    /// A flag that the workload does not take.
    #[error("--{flag} is not a flag of the {workload} workload (its flags: {accepted})")]
    UnknownFlag {
        /// The flag, without dashes.
        flag: String,
        /// The workload.
        workload: &'static str,
        /// The flags it accepts.
        accepted: &'static str,
    },
    /// A value that does not parse or is out of range.
    #[error("--{flag}: invalid value {value:?}: {allowed}")]
    Invalid {
        /// The flag, without dashes.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        allowed: String,
    },
    /// The workload does not fit in the guest memory.
    #[error(
        "--{flag}: {} ({bytes} bytes) from the data area at {DATA_GPA:#x} does not fit in {} of \
         guest memory; at most {} ({max} bytes) fits",
        fmt_size(*.bytes),
        fmt_size(*.memory_bytes),
        fmt_size(*.max)
    )]
    DoesNotFit {
        /// The flag that sets the size.
        flag: &'static str,
        /// Bytes the workload needs from DATA_GPA.
        bytes: u64,
        /// Guest memory size.
        memory_bytes: u64,
        /// Largest size that fits.
        max: u64,
    },
    /// The environment cannot run the workload.
    #[error("guest environment: {0}")]
    Env(String),
}

fn invalid(flag: &'static str, value: &str, allowed: impl Into<String>) -> ParamError {
    ParamError::Invalid {
        flag,
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

/// Parameters of `idle`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleParams {
    /// `pause` instructions between two increments of the progress counter (1..=1e9).
    pub spins: u32,
}

impl Default for IdleParams {
    fn default() -> Self {
        IdleParams { spins: 10_000 }
    }
}

/// Which page the next write of `dirty` goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Pages 0, 1, 2, ... of the working set, wrapping around.
    Sequential,
    /// A uniformly random page of the working set.
    Random,
    /// `hot_writes_pct` % of the writes go to a random page of the hottest `hot_set_pct` % of
    /// the working set (its first pages), the rest to a random page of the others.
    HotCold {
        /// Percentage (1..=100) of the working set that is hot.
        hot_set_pct: u8,
        /// Percentage (0..=100) of the writes that go to hot pages.
        hot_writes_pct: u8,
    },
}

/// Content mix of `dirty`: percentages of the written pages by content kind, adding up to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentMix {
    /// All-zero pages.
    pub zero: u8,
    /// Copies of one of a few fixed template pages (binary-like: 32-bit values, zero-extended).
    pub dup: u8,
    /// ASCII text: words separated by spaces, lines ending in `\n`.
    pub text: u8,
    /// Random bytes (xorshift64).
    pub random: u8,
}

impl Default for ContentMix {
    fn default() -> Self {
        ContentMix {
            zero: 40,
            dup: 10,
            text: 30,
            random: 20,
        }
    }
}

impl fmt::Display for ContentMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "zero={},dup={},text={},random={}",
            self.zero, self.dup, self.text, self.random
        )
    }
}

impl ContentMix {
    /// Parses `zero=40,dup=10,text=30,random=20`; kinds left out are 0; the sum must be 100.
    pub fn parse(value: &str) -> Result<Self, ParamError> {
        const ALLOWED: &str = "a list like zero=40,dup=10,text=30,random=20 of percentages \
                               (0..=100) of the kinds zero, dup, text, random adding up to 100";
        let mut mix = ContentMix {
            zero: 0,
            dup: 0,
            text: 0,
            random: 0,
        };
        let mut seen = Vec::new();
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (kind, pct) = part
                .split_once('=')
                .ok_or_else(|| invalid("mix", value, ALLOWED))?;
            let kind = kind.trim();
            let pct: u8 = pct
                .trim()
                .parse()
                .ok()
                .filter(|p| *p <= 100)
                .ok_or_else(|| invalid("mix", value, ALLOWED))?;
            if seen.contains(&kind) {
                return Err(invalid(
                    "mix",
                    value,
                    format!("{kind} given twice; {ALLOWED}"),
                ));
            }
            seen.push(kind);
            match kind {
                "zero" => mix.zero = pct,
                "dup" => mix.dup = pct,
                "text" => mix.text = pct,
                "random" => mix.random = pct,
                _ => {
                    return Err(invalid(
                        "mix",
                        value,
                        format!("unknown kind {kind:?}; {ALLOWED}"),
                    ))
                }
            }
        }
        mix.check().map_err(|e| invalid("mix", value, e))?;
        Ok(mix)
    }

    fn check(&self) -> Result<(), String> {
        let sum = u32::from(self.zero)
            + u32::from(self.dup)
            + u32::from(self.text)
            + u32::from(self.random);
        if sum != 100 {
            return Err(format!("percentages must add up to 100, got {sum}"));
        }
        Ok(())
    }
}

/// Parameters of `dirty`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyParams {
    /// Target rate in pages/s (0 = as fast as possible, at most [`MAX_RATE`]).
    pub rate: u64,
    /// Working-set size in bytes from DATA_GPA, rounded up to whole pages.
    pub working_set_bytes: u64,
    /// Which page each write goes to.
    pub pattern: Pattern,
    /// What each written page contains.
    pub mix: ContentMix,
    /// PRNG seed.
    pub seed: u64,
}

impl Default for DirtyParams {
    fn default() -> Self {
        DirtyParams {
            rate: 10_000,
            working_set_bytes: 64 << 20,
            pattern: Pattern::Random,
            mix: ContentMix::default(),
            seed: 0x5eed_d1e7_0000_0001,
        }
    }
}

impl DirtyParams {
    /// Working-set size in pages.
    pub fn pages(&self) -> u64 {
        self.working_set_bytes.div_ceil(PAGE_SIZE)
    }
}

/// Parameters of `ledger`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerParams {
    /// Pages of the ledger, from DATA_GPA (1..=[`MAX_PAGES`]; must fit in guest memory).
    pub pages: u64,
    /// Steps between two full verifications; each successful one prints `tick N ok`.
    pub verify_every: u64,
    /// Steps/s (0 = as fast as possible, at most [`MAX_RATE`]).
    pub rate: u64,
    /// Exit with code 0 after printing `tick N ok` for N = this (0 = run forever).
    pub stop_after_ticks: u64,
    /// PRNG seed (which page each step picks).
    pub seed: u64,
}

impl Default for LedgerParams {
    fn default() -> Self {
        LedgerParams {
            pages: 2048,
            verify_every: 500,
            rate: 10_000,
            stop_after_ticks: 0,
            seed: 0x1ed9_e500_0000_0001,
        }
    }
}

/// A built-in guest workload with its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// Spins with `pause`, bumping the progress counter now and then.
    Idle(IdleParams),
    /// Writes whole pages at a paced rate.
    Dirty(DirtyParams),
    /// Self-checking ledger of page versions.
    Ledger(LedgerParams),
}

const IDLE_FLAGS: &str = "spins";
const DIRTY_FLAGS: &str = "rate, working-set, pattern, hot-set, hot-writes, mix, seed";
const LEDGER_FLAGS: &str = "pages, verify-every, rate, stop-after-ticks, seed";

/// Parses an unsigned integer in `lo..=hi` (decimal, or hex with `0x`, `_` separators allowed).
pub fn parse_u64_in(flag: &'static str, value: &str, lo: u64, hi: u64) -> Result<u64, ParamError> {
    let allowed = || format!("an integer in {lo}..={hi}");
    let v = parse_int(value).ok_or_else(|| invalid(flag, value, allowed()))?;
    if v < lo || v > hi {
        return Err(invalid(flag, value, allowed()));
    }
    Ok(v)
}

fn parse_int(value: &str) -> Option<u64> {
    let v = value.trim().replace('_', "");
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Parses a byte size: a number with an optional binary suffix `K`, `M`, `G` (or `KiB`, `MiB`,
/// `GiB`, `KB`, ...; case-insensitive), e.g. `64M`, `4096`, `1G`. The result must be in
/// `lo..=hi` bytes.
pub fn parse_size_in(flag: &'static str, value: &str, lo: u64, hi: u64) -> Result<u64, ParamError> {
    let allowed = || {
        format!(
            "a size in {}..={} like 64M, 512K, 1G or a number of bytes",
            fmt_size(lo),
            fmt_size(hi)
        )
    };
    let v = value.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '_'))
        .unwrap_or(v.len());
    let (num, suffix) = v.split_at(split);
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(invalid(flag, value, allowed())),
    };
    let n: u64 = num
        .replace('_', "")
        .parse()
        .map_err(|_| invalid(flag, value, allowed()))?;
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| invalid(flag, value, allowed()))?;
    if bytes < lo || bytes > hi {
        return Err(invalid(flag, value, allowed()));
    }
    Ok(bytes)
}

/// Formats a byte count with the largest binary unit that divides it.
pub fn fmt_size(bytes: u64) -> String {
    for (shift, unit) in [(30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

fn parse_pct(flag: &'static str, value: &str, lo: u64) -> Result<u8, ParamError> {
    let allowed = || format!("a percentage in {lo}..=100");
    let v = parse_int(value.trim().trim_end_matches('%'))
        .filter(|v| (lo..=100).contains(v))
        .ok_or_else(|| invalid(flag, value, allowed()))?;
    Ok(v as u8)
}

impl Workload {
    /// The workload's name as `--workload` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Idle(_) => "idle",
            Workload::Dirty(_) => "dirty",
            Workload::Ledger(_) => "ledger",
        }
    }

    /// Builds a workload from its name and its flags (flag names with or without leading
    /// dashes). Flags left out take their defaults (see the module docs).
    pub fn from_cli(name: &str, flags: &HashMap<String, String>) -> Result<Self, ParamError> {
        let mut flags: Vec<(String, &str)> = flags
            .iter()
            .map(|(k, v)| (k.trim_start_matches('-').to_string(), v.as_str()))
            .collect();
        // Deterministic order, so the first bad flag reported is always the same one.
        flags.sort();
        match name.trim().to_ascii_lowercase().as_str() {
            "idle" => {
                let mut p = IdleParams::default();
                for (flag, value) in &flags {
                    match flag.as_str() {
                        "spins" => p.spins = parse_u64_in("spins", value, 1, 1_000_000_000)? as u32,
                        _ => return Err(unknown_flag(flag, "idle", IDLE_FLAGS)),
                    }
                }
                Ok(Workload::Idle(p))
            }
            "dirty" => {
                let mut p = DirtyParams::default();
                let mut pattern = "random".to_string();
                let mut hot_set = None;
                let mut hot_writes = None;
                for (flag, value) in &flags {
                    match flag.as_str() {
                        "rate" => p.rate = parse_u64_in("rate", value, 0, MAX_RATE)?,
                        "working-set" => {
                            p.working_set_bytes = parse_size_in(
                                "working-set",
                                value,
                                PAGE_SIZE,
                                MAX_PAGES * PAGE_SIZE,
                            )?
                        }
                        "pattern" => pattern = value.trim().to_ascii_lowercase(),
                        "hot-set" => hot_set = Some(parse_pct("hot-set", value, 1)?),
                        "hot-writes" => hot_writes = Some(parse_pct("hot-writes", value, 0)?),
                        "mix" => p.mix = ContentMix::parse(value)?,
                        "seed" => p.seed = parse_u64_in("seed", value, 0, u64::MAX)?,
                        _ => return Err(unknown_flag(flag, "dirty", DIRTY_FLAGS)),
                    }
                }
                p.pattern = match pattern.as_str() {
                    "sequential" | "seq" => Pattern::Sequential,
                    "random" | "rand" => Pattern::Random,
                    "hotcold" | "hot-cold" | "hot/cold" => Pattern::HotCold {
                        hot_set_pct: hot_set.unwrap_or(10),
                        hot_writes_pct: hot_writes.unwrap_or(90),
                    },
                    _ => {
                        return Err(invalid(
                            "pattern",
                            &pattern,
                            "one of sequential, random, hotcold",
                        ))
                    }
                };
                if !matches!(p.pattern, Pattern::HotCold { .. }) {
                    if let Some(flag) = [("hot-set", hot_set), ("hot-writes", hot_writes)]
                        .iter()
                        .find_map(|(f, v)| v.map(|_| *f))
                    {
                        return Err(invalid(
                            flag,
                            flags.iter().find(|(f, _)| f == flag).map_or("", |(_, v)| v),
                            "only with --pattern hotcold",
                        ));
                    }
                }
                Ok(Workload::Dirty(p))
            }
            "ledger" => {
                let mut p = LedgerParams::default();
                for (flag, value) in &flags {
                    match flag.as_str() {
                        "pages" => p.pages = parse_u64_in("pages", value, 1, MAX_PAGES)?,
                        "verify-every" => {
                            p.verify_every = parse_u64_in("verify-every", value, 1, 1_000_000_000)?
                        }
                        "rate" => p.rate = parse_u64_in("rate", value, 0, MAX_RATE)?,
                        "stop-after-ticks" => {
                            p.stop_after_ticks =
                                parse_u64_in("stop-after-ticks", value, 0, 1_000_000_000)?
                        }
                        "seed" => p.seed = parse_u64_in("seed", value, 0, u64::MAX)?,
                        _ => return Err(unknown_flag(flag, "ledger", LEDGER_FLAGS)),
                    }
                }
                Ok(Workload::Ledger(p))
            }
            _ => Err(ParamError::UnknownWorkload(name.to_string())),
        }
    }

    /// Checks the parameters against their limits and the guest environment (the working set
    /// must fit in the data area; paced workloads need the TSC frequency).
    pub fn validate(&self, env: &GuestEnv) -> Result<(), ParamError> {
        if env.memory_bytes <= DATA_GPA {
            return Err(ParamError::Env(format!(
                "guest memory of {} bytes has no data area (it starts at {DATA_GPA:#x})",
                env.memory_bytes
            )));
        }
        let data_max = (env.memory_bytes - DATA_GPA) / PAGE_SIZE * PAGE_SIZE;
        let need_tsc = |rate: u64| -> Result<(), ParamError> {
            if rate > 0 && (env.tsc_khz == 0 || env.tsc_khz > u64::from(u32::MAX)) {
                return Err(ParamError::Env(format!(
                    "a paced workload needs the TSC frequency, got tsc_khz = {}",
                    env.tsc_khz
                )));
            }
            Ok(())
        };
        match self {
            Workload::Idle(p) => {
                if p.spins == 0 || p.spins > 1_000_000_000 {
                    return Err(invalid(
                        "spins",
                        &p.spins.to_string(),
                        "an integer in 1..=1000000000",
                    ));
                }
            }
            Workload::Dirty(p) => {
                if p.rate > MAX_RATE {
                    return Err(invalid(
                        "rate",
                        &p.rate.to_string(),
                        format!("an integer in 0..={MAX_RATE}"),
                    ));
                }
                need_tsc(p.rate)?;
                let pages = p.pages();
                if pages == 0 || pages > MAX_PAGES {
                    return Err(invalid(
                        "working-set",
                        &p.working_set_bytes.to_string(),
                        format!("a size in 4K..={}", fmt_size(MAX_PAGES * PAGE_SIZE)),
                    ));
                }
                if pages * PAGE_SIZE > data_max {
                    return Err(ParamError::DoesNotFit {
                        flag: "working-set",
                        bytes: pages * PAGE_SIZE,
                        memory_bytes: env.memory_bytes,
                        max: data_max,
                    });
                }
                if let Pattern::HotCold {
                    hot_set_pct,
                    hot_writes_pct,
                } = p.pattern
                {
                    if !(1..=100).contains(&hot_set_pct) {
                        return Err(invalid(
                            "hot-set",
                            &hot_set_pct.to_string(),
                            "a percentage in 1..=100",
                        ));
                    }
                    if hot_writes_pct > 100 {
                        return Err(invalid(
                            "hot-writes",
                            &hot_writes_pct.to_string(),
                            "a percentage in 0..=100",
                        ));
                    }
                }
                p.mix
                    .check()
                    .map_err(|e| invalid("mix", &p.mix.to_string(), e))?;
            }
            Workload::Ledger(p) => {
                if p.rate > MAX_RATE {
                    return Err(invalid(
                        "rate",
                        &p.rate.to_string(),
                        format!("an integer in 0..={MAX_RATE}"),
                    ));
                }
                need_tsc(p.rate)?;
                if p.pages == 0 || p.pages > MAX_PAGES {
                    return Err(invalid(
                        "pages",
                        &p.pages.to_string(),
                        format!("an integer in 1..={MAX_PAGES}"),
                    ));
                }
                if p.pages * PAGE_SIZE > data_max {
                    return Err(ParamError::DoesNotFit {
                        flag: "pages",
                        bytes: p.pages * PAGE_SIZE,
                        memory_bytes: env.memory_bytes,
                        max: data_max,
                    });
                }
                if p.verify_every == 0 || p.verify_every > 1_000_000_000 {
                    return Err(invalid(
                        "verify-every",
                        &p.verify_every.to_string(),
                        "an integer in 1..=1000000000",
                    ));
                }
                if p.stop_after_ticks > 1_000_000_000 {
                    return Err(invalid(
                        "stop-after-ticks",
                        &p.stop_after_ticks.to_string(),
                        "an integer in 0..=1000000000",
                    ));
                }
            }
        }
        Ok(())
    }
}

fn unknown_flag(flag: &str, workload: &'static str, accepted: &'static str) -> ParamError {
    ParamError::UnknownFlag {
        flag: flag.to_string(),
        workload,
        accepted,
    }
}
