//! `understudy bench failover`: failover drills at several guest sizes, with the promotion and
//! RTO targets of issue 5 next to the figures.
//!
//! Per memory size, `--runs` drills exactly as `understudy drill` runs them (its defaults: the
//! ledger guest, witness, backup and primary as separate processes on loopback with mutual TLS,
//! 1.5 s protected before the kill, SIGKILL of the primary at capture, send, commit and ack in
//! turn, 1 s of the promoted VM checked afterwards). The figures are the drill's:
//! - detection: the primary's silence when the backup declared it failed (its log line);
//! - promotion: the backup's `promotion_us`, lease won to the restored VM running (`Vm::restore`
//!   returned with the vCPU threads started), measured inside the backup;
//! - RTO: the kill (wall clock) to the backup's `promoted:` log line.
//!
//! Every process runs with the defaults (no flags about timing), so the failure timeout is the
//! default of `--failure-timeout`, read here from the same clap definition.
//!
//! "other load" = cores busy (`/proc/stat`) minus the CPU of this process and of the drill's
//! processes (`/proc/self/stat`, children included once waited for), over each drill's wall time.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, FromArgMatches};
use serde::Serialize;
use understudy_vmm::guests::parse_size_in;
use understudy_vmm::memory::{MAX_MEMORY, MIN_MEMORY};

use crate::drill::{self, DrillArgs, DrillReport};

/// Issue 5's targets.
const PROMOTION_P50_TARGET_MS: f64 = 1.0;
const PROMOTION_P99_TARGET_MS: f64 = 2.0;
/// RTO target: failure timeout + this.
const RTO_SLACK_MS: f64 = 20.0;

#[derive(Args, Debug)]
pub struct FailoverBenchArgs {
    /// Drills per memory size (kill phase cycling capture, send, commit, ack).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// Guest memory sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G")]
    memory: Vec<String>,
    /// Print the results (summary and every drill's report) as JSON.
    #[arg(long)]
    json: bool,
    /// Keep each drill's directory (logs, consoles) under this directory.
    #[arg(long)]
    keep: Option<PathBuf>,
}

/// p50 and p99 (nearest rank) of the runs that gave the figure, and how many did.
#[derive(Serialize, Debug, Clone, Copy)]
struct Pcts {
    n: usize,
    p50: Option<f64>,
    p99: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
}

impl Pcts {
    fn of(values: impl Iterator<Item = Option<f64>>) -> Self {
        let mut v: Vec<f64> = values.flatten().collect();
        v.sort_by(f64::total_cmp);
        Self {
            n: v.len(),
            p50: pct(&v, 0.5),
            p99: pct(&v, 0.99),
            min: v.first().copied(),
            max: v.last().copied(),
        }
    }
}

/// Nearest-rank percentile of an ascending slice.
fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[derive(Serialize, Debug)]
struct Drill {
    #[serde(flatten)]
    report: DrillReport,
    wall_s: f64,
    other_load_cores: Option<f64>,
}

#[derive(Serialize, Debug)]
struct Verdict {
    target: String,
    value_ms: Option<f64>,
    met: bool,
}

#[derive(Serialize, Debug)]
struct SizeResult {
    memory: String,
    runs: usize,
    passed: usize,
    detection_ms: Pcts,
    lease_wait_ms: Pcts,
    promotion_ms: Pcts,
    rto_ms: Pcts,
    other_load_cores_mean: Option<f64>,
    promotion_p50: Verdict,
    promotion_p99: Verdict,
    rto_p99: Verdict,
    drills: Vec<Drill>,
}

#[derive(Serialize, Debug)]
struct Output {
    failure_timeout_ms: f64,
    lease_ttl_ms: f64,
    load_before: String,
    load_after: String,
    sizes: Vec<SizeResult>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Busy ticks of the whole host (user, nice, system, irq, softirq of all CPUs).
fn host_busy_ticks() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = s.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    Some(v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?)
}

/// utime + stime + cutime + cstime of this process (waited-for children included).
fn own_ticks() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3, utime 14 .. cstime 17 (1-based).
    (11..=14).map(|i| f.get(i)?.parse::<f64>().ok()).sum()
}

fn cpu_mark() -> Option<(f64, f64)> {
    host_busy_ticks().zip(own_ticks())
}

fn drill_args(memory: &str) -> Result<DrillArgs> {
    let m = <DrillArgs as Args>::augment_args(clap::Command::new("drill"))
        .try_get_matches_from(["drill", "--memory", memory])?;
    Ok(DrillArgs::from_arg_matches(&m)?)
}

fn failover_defaults() -> Result<crate::protect::FailoverArgs> {
    let m = <crate::protect::FailoverArgs as Args>::augment_args(clap::Command::new("d"))
        .try_get_matches_from(["d"])?;
    Ok(crate::protect::FailoverArgs::from_arg_matches(&m)?)
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

fn ms2(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

fn verdict(target: String, value: Option<f64>, limit: f64, complete: bool) -> Verdict {
    Verdict {
        target,
        value_ms: value,
        met: complete && value.is_some_and(|v| v <= limit),
    }
}

fn mark(v: &Verdict) -> &'static str {
    if v.met {
        "MET"
    } else {
        "MISSED"
    }
}

fn run_size(args: &FailoverBenchArgs, memory: &str, hz: f64, rto_limit: f64) -> Result<SizeResult> {
    let dargs = drill_args(memory)?;
    let mut drills = Vec::new();
    for run in 1..=args.runs {
        let phase = drill::PHASES[(run as usize - 1) % drill::PHASES.len()];
        let tmp = tempfile::tempdir()?;
        let dir = match &args.keep {
            Some(k) => {
                let d = k.join(format!("{memory}-drill-{run}"));
                std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                d
            }
            None => tmp.path().to_path_buf(),
        };
        let before = cpu_mark();
        let t = Instant::now();
        let report = drill::one(&dargs, run, phase, &dir)
            .unwrap_or_else(|e| DrillReport::failed(run, phase, format!("{e:#}")));
        let wall_s = t.elapsed().as_secs_f64();
        let other_load_cores = before
            .zip(cpu_mark())
            .map(|((h0, o0), (h1, o1))| ((h1 - h0) - (o1 - o0)) / hz / wall_s);
        eprintln!(
            "bench: {memory} drill {run}/{}: kill at {:<7} {}  detection {} ms  lease wait {} ms  \
             promotion {} ms  RTO {} ms  other load {} cores  {}",
            args.runs,
            report.kill_at,
            if report.passed { "PASS" } else { "FAIL" },
            ms(report.detection_ms),
            ms(report.lease_wait_ms),
            ms2(report.promotion_ms),
            ms(report.rto_ms),
            other_load_cores.map_or("-".into(), |c| format!("{c:.2}")),
            report.failure.as_deref().unwrap_or("")
        );
        drills.push(Drill {
            report,
            wall_s,
            other_load_cores,
        });
    }
    let of = |f: fn(&DrillReport) -> Option<f64>| Pcts::of(drills.iter().map(|d| f(&d.report)));
    let detection_ms = of(|r| r.detection_ms);
    let lease_wait_ms = of(|r| r.lease_wait_ms);
    let promotion_ms = of(|r| r.promotion_ms);
    let rto_ms = of(|r| r.rto_ms);
    let loads: Vec<f64> = drills.iter().filter_map(|d| d.other_load_cores).collect();
    let n = drills.len();
    Ok(SizeResult {
        memory: memory.to_string(),
        runs: n,
        passed: drills.iter().filter(|d| d.report.passed).count(),
        detection_ms,
        lease_wait_ms,
        promotion_p50: verdict(
            format!("promotion p50 <= {PROMOTION_P50_TARGET_MS} ms"),
            promotion_ms.p50,
            PROMOTION_P50_TARGET_MS,
            promotion_ms.n == n,
        ),
        promotion_p99: verdict(
            format!("promotion p99 <= {PROMOTION_P99_TARGET_MS} ms"),
            promotion_ms.p99,
            PROMOTION_P99_TARGET_MS,
            promotion_ms.n == n,
        ),
        rto_p99: verdict(
            format!("RTO p99 <= timeout + {RTO_SLACK_MS} ms = {rto_limit} ms"),
            rto_ms.p99,
            rto_limit,
            rto_ms.n == n,
        ),
        promotion_ms,
        rto_ms,
        other_load_cores_mean: (!loads.is_empty())
            .then(|| loads.iter().sum::<f64>() / loads.len() as f64),
        drills,
    })
}

fn report(out: &Output, runs: u32) -> String {
    let timeout = out.failure_timeout_ms;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "understudy bench failover: {runs} drills per size (ledger guest; witness, backup and \
         primary processes on loopback; SIGKILL of the primary at capture, send, commit, ack in \
         turn); failure timeout {timeout} ms and lease TTL {} ms (the defaults); load average \
         before: {}, after: {}",
        out.lease_ttl_ms, out.load_before, out.load_after
    );
    let _ = writeln!(
        s,
        "needs a quiet machine: promotion is ~1 ms of work, and on 2 cores another busy process \
         can delay a fresh vCPU thread by a scheduler tick (~4 ms); see the other-load column"
    );
    let _ = writeln!(
        s,
        "percentiles are nearest-rank over the runs that gave the figure (with fewer than 100 \
         runs p99 is the maximum)"
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| memory | runs passed | detection p50 / p99 ms | promotion p50 / p99 ms | promotion \
         target p50 <= {PROMOTION_P50_TARGET_MS} / p99 <= {PROMOTION_P99_TARGET_MS} ms | RTO p50 \
         / p99 ms | failure timeout | RTO target p99 <= timeout + {RTO_SLACK_MS} ms | other load \
         (cores, mean) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for r in &out.sizes {
        let _ = writeln!(
            s,
            "| {} | {}/{} | {} / {} | {} / {} | {} / {} | {} / {} | {timeout} ms | <= {} ms: {} | \
             {} |",
            r.memory,
            r.passed,
            r.runs,
            ms(r.detection_ms.p50),
            ms(r.detection_ms.p99),
            ms2(r.promotion_ms.p50),
            ms2(r.promotion_ms.p99),
            mark(&r.promotion_p50),
            mark(&r.promotion_p99),
            ms(r.rto_ms.p50),
            ms(r.rto_ms.p99),
            timeout + RTO_SLACK_MS,
            mark(&r.rto_p99),
            r.other_load_cores_mean
                .map_or("-".into(), |c| format!("{c:.2}")),
        );
    }
    let _ = writeln!(s);
    for r in &out.sizes {
        let list = |f: fn(&DrillReport) -> Option<f64>, prec: usize| {
            r.drills
                .iter()
                .map(|d| f(&d.report).map_or("-".into(), |v| format!("{v:.prec$}")))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            s,
            "{}: lease wait p50 / p99 {} / {} ms; promotion min {} ms",
            r.memory,
            ms(r.lease_wait_ms.p50),
            ms(r.lease_wait_ms.p99),
            ms2(r.promotion_ms.min),
        );
        let _ = writeln!(
            s,
            "{}: per run (kill phase {}): promotion ms {}; RTO ms {}; other load cores {}",
            r.memory,
            r.drills
                .iter()
                .map(|d| d.report.kill_at.as_str())
                .collect::<Vec<_>>()
                .join(","),
            list(|r| r.promotion_ms, 2),
            list(|r| r.rto_ms, 1),
            r.drills
                .iter()
                .map(|d| d.other_load_cores.map_or("-".into(), |c| format!("{c:.2}")))
                .collect::<Vec<_>>()
                .join(" "),
        );
        for d in r.drills.iter().filter(|d| !d.report.passed) {
            let _ = writeln!(
                s,
                "{}: drill {} (kill at {}) FAILED: {}",
                r.memory,
                d.report.run,
                d.report.kill_at,
                d.report.failure.as_deref().unwrap_or("?")
            );
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "targets:");
    for r in &out.sizes {
        for v in [&r.promotion_p50, &r.promotion_p99, &r.rto_p99] {
            let missing = if v.target.starts_with("RTO") {
                r.runs - r.rto_ms.n
            } else {
                r.runs - r.promotion_ms.n
            };
            let _ = writeln!(
                s,
                "- {}: {}: {} ms{} -> {}",
                r.memory,
                v.target,
                ms2(v.value_ms),
                if missing > 0 {
                    format!(" ({missing} runs without the figure)")
                } else {
                    String::new()
                },
                mark(v)
            );
        }
    }
    s
}

pub fn run(args: FailoverBenchArgs) -> Result<i32> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        bail!("bench failover needs KVM: /dev/kvm cannot be opened read-write ({e})");
    }
    if args.memory.is_empty() {
        bail!("--memory is empty");
    }
    for m in &args.memory {
        parse_size_in("memory", m, MIN_MEMORY, MAX_MEMORY)?;
        drill_args(m)?;
    }
    let defaults = failover_defaults()?;
    let failure_timeout_ms = defaults.failure_timeout.as_secs_f64() * 1e3;
    let rto_limit = failure_timeout_ms + RTO_SLACK_MS;
    let hz = clock_ticks_per_second();
    let load_before = loadavg();
    eprintln!(
        "bench: {} drills x {:?}, load average {load_before}; keep the machine quiet",
        args.runs, args.memory
    );
    let mut sizes = Vec::new();
    for m in &args.memory {
        sizes.push(run_size(&args, m, hz, rto_limit)?);
    }
    let out = Output {
        failure_timeout_ms,
        lease_ttl_ms: defaults.lease_ttl.as_secs_f64() * 1e3,
        load_before,
        load_after: loadavg(),
        sizes,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", report(&out, args.runs));
    }
    let all_passed = out.sizes.iter().all(|r| r.passed == r.runs);
    Ok(if all_passed { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(pct(&v, 0.5), Some(5.0));
        assert_eq!(pct(&v, 0.99), Some(10.0));
        assert_eq!(pct(&[], 0.5), None);
        let p = Pcts::of([Some(3.0), None, Some(1.0), Some(2.0)].into_iter());
        assert_eq!((p.n, p.p50, p.p99), (3, Some(2.0), Some(3.0)));
    }

    #[test]
    fn defaults_parse() {
        assert!(drill_args("1G").is_ok());
        let d = failover_defaults().unwrap();
        assert!(d.failure_timeout.as_millis() > 0);
    }
}
