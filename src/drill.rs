//! `understudy drill`: a local failover drill with real processes.
//!
//! Each run starts a witness, a backup and a primary (ledger guest) as separate `understudy`
//! processes on loopback, kills the primary with SIGKILL at a chosen phase of an epoch (or at a
//! random moment), waits for the backup to promote, and checks what an outside observer saw.
//! Both write one console file (`--console-file`, each byte at its offset in the VM's console
//! stream); the verdict comes from that file: it must hold every `tick N` exactly once, in
//! order, with no hole and never `CORRUPT`, and the promoted VM must have printed on. The
//! stdout streams (the primary's released console, then the promoted VM's) are still read for
//! the report: where they repeat an epoch's output (a kill after a release whose Ack had not
//! reached the backup yet, see docs/ARCHITECTURE.md), the report says so as `stdout_note`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use understudy_vmm::guests::ledger_ticks;

#[derive(Args)]
pub struct DrillArgs {
    /// Number of drills.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    repeat: u32,
    /// When to kill the primary: capture, send, commit, ack, random (a random moment), or
    /// cycle (each phase in turn).
    #[arg(long, default_value = "cycle")]
    kill_at: String,
    /// Guest memory.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// How long the ledger runs protected before the kill, in seconds.
    #[arg(long, default_value_t = 1.5)]
    warmup: f64,
    /// Seconds the promoted VM must keep ticking to pass.
    #[arg(long, default_value_t = 1.0)]
    after: f64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Keep each drill's directory (logs, consoles) here instead of a temporary one.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Serve Prometheus metrics (drills run and passed, last success) on this address while
    /// the drills run.
    #[arg(long, value_parser = crate::metrics::parse_addr)]
    metrics: Option<std::net::SocketAddr>,
    /// With --metrics: keep serving this long after the last drill (for a scrape to see it).
    #[arg(long, default_value = "0s", value_parser = crate::protect::parse_duration)]
    linger: Duration,
}

/// One drill's figures.
#[derive(Serialize, Debug)]
pub struct DrillReport {
    pub run: u32,
    pub kill_at: String,
    pub passed: bool,
    pub failure: Option<String>,
    /// Silence from the primary when the backup declared it failed.
    pub detection_ms: Option<f64>,
    /// Decision to promote (lease won) to the restored VM running.
    pub promotion_ms: Option<f64>,
    /// Waiting for the old lease to expire.
    pub lease_wait_ms: Option<f64>,
    /// Kill to promoted VM running (wall clock: the kill, and the backup's promotion log line).
    pub rto_ms: Option<f64>,
    /// The epoch the backup resumed from.
    pub promoted_epoch: Option<u64>,
    /// The last tick the outside saw from the primary, the first from the backup.
    pub last_tick_primary: Option<u64>,
    pub first_tick_backup: Option<u64>,
    /// Guest work lost: ticks the primary's guest had made (printed or not) after the
    /// resumed state; bounded by the epochs in flight.
    pub rolled_back_epochs: Option<u64>,
    /// Ticks in the console file (the exactly-once record both nodes wrote).
    pub console_file_ticks: Option<u64>,
    /// What the two stdout streams alone show wrong, if anything (not a failure: the console
    /// file decides).
    pub stdout_note: Option<String>,
}

impl DrillReport {
    /// A drill that could not be run to the end.
    pub fn failed(run: u32, phase: &str, failure: String) -> Self {
        DrillReport {
            run,
            kill_at: phase.to_string(),
            passed: false,
            failure: Some(failure),
            detection_ms: None,
            promotion_ms: None,
            lease_wait_ms: None,
            rto_ms: None,
            promoted_epoch: None,
            last_tick_primary: None,
            first_tick_backup: None,
            rolled_back_epochs: None,
            console_file_ticks: None,
            stdout_note: None,
        }
    }
}

pub(crate) const PHASES: [&str; 4] = ["capture", "send", "commit", "ack"];

pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn spawn(dir: &Path, label: &str, args: &[String]) -> Result<Proc> {
    let out = std::fs::File::create(dir.join(format!("{label}.out")))?;
    let err = std::fs::File::create(dir.join(format!("{label}.err")))?;
    let child = Command::new(std::env::current_exe()?)
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .with_context(|| format!("starting the {label}"))?;
    Ok(Proc(child))
}

pub(crate) fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_default()
}

pub(crate) fn wait_for(dir: &Path, file: &str, needle: &str, timeout: Duration) -> Result<Instant> {
    let t = Instant::now();
    loop {
        if read(dir, file).contains(needle) {
            return Ok(Instant::now());
        }
        if t.elapsed() > timeout {
            bail!("no {needle:?} in {file} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub(crate) fn field<T: std::str::FromStr>(log: &str, line_has: &str, key: &str) -> Option<T> {
    let line = log.lines().find(|l| l.contains(line_has))?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let v: String = line[at..]
        .trim_start_matches('"')
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    v.parse().ok()
}

/// Unix time in ns of a log line's leading RFC 3339 UTC timestamp (`2026-11-22T04:38:54.735541Z`).
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (H. Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days as f64 * 86_400.0) + hh * 3600.0 + mm * 60.0 + ss) * 1e9)
}

pub(crate) fn line_time(log: &str, needle: &str) -> Option<f64> {
    log.lines().find(|l| l.contains(needle)).and_then(log_time)
}

pub(crate) fn unix_ns_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as f64)
        .unwrap_or(0.0)
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn one(args: &DrillArgs, run: u32, phase: &str, dir: &Path) -> Result<DrillReport> {
    let exe = std::env::current_exe()?;
    let certs = dir.join("certs");
    let d = certs.display().to_string();
    for a in [
        vec!["certs", "init", "--dir", &d],
        vec!["certs", "issue", "--dir", &d, "--name", "primary"],
        vec!["certs", "issue", "--dir", &d, "--name", "backup"],
        vec!["certs", "issue", "--dir", &d, "--name", "witness"],
    ] {
        let st = Command::new(&exe).args(&a).stdout(Stdio::null()).status()?;
        if !st.success() {
            bail!("understudy {} failed", a.join(" "));
        }
    }
    let (wp, bp) = (free_port()?, free_port()?);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let witness_addr = format!("127.0.0.1:{wp}");
    let _witness = spawn(
        dir,
        "witness",
        &s(&["witness", "--certs", &d, "--listen", &witness_addr]),
    )?;
    wait_for(
        dir,
        "witness.err",
        "witness listening",
        Duration::from_secs(10),
    )?;
    let backup_addr = format!("127.0.0.1:{bp}");
    // One console file for both nodes, as shared storage would be.
    let console_file = dir.join(CONSOLE_FILE);
    let cf = console_file.display().to_string();
    let _backup = spawn(
        dir,
        "backup",
        &s(&[
            "backup",
            "--certs",
            &d,
            "--listen",
            &backup_addr,
            "--witness",
            &witness_addr,
            "--once",
            "--console-file",
            &cf,
        ]),
    )?;
    wait_for(
        dir,
        "backup.err",
        "backup listening",
        Duration::from_secs(10),
    )?;
    let mut pargs = s(&[
        "primary",
        "--certs",
        &d,
        "--backup",
        &backup_addr,
        "--witness",
        &witness_addr,
        "--workload",
        "ledger",
        "--memory",
        &args.memory,
        "--console-file",
        &cf,
    ]);
    let warm_epochs = (args.warmup * 40.0) as u64; // 25 ms epochs
    if phase != "random" {
        pargs.extend(s(&["--kill-at", phase, "--kill-epoch"]));
        // The kill epoch counts sync epochs too; the primary logs how many there are, and a
        // 256 MiB guest has 4 with the default batch: aim past them.
        pargs.push((warm_epochs + 64).to_string());
    }
    let mut primary = spawn(dir, "primary", &pargs)?;
    wait_for(
        dir,
        "primary.err",
        "full sync sent",
        Duration::from_secs(60),
    )?;
    // Kill time on the wall clock: ours when we send SIGKILL, the primary's log line when it
    // kills itself at a phase (both on this host's clock, like the backup's log).
    let killed_unix_ns = if phase == "random" {
        let jitter = (std::process::id() as u64 * 7919 + run as u64 * 104_729) % 1000;
        std::thread::sleep(Duration::from_secs_f64(args.warmup) + Duration::from_millis(jitter));
        let t = unix_ns_now();
        primary.0.kill()?;
        Some(t)
    } else {
        let t = Instant::now();
        loop {
            if primary.0.try_wait()?.is_some() {
                break line_time(&read(dir, "primary.err"), "drill: killing");
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the primary did not reach its kill point");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    let promoted = wait_for(dir, "backup.err", "promoted:", Duration::from_secs(30));
    if let Err(e) = promoted {
        return Ok(DrillReport::failed(
            run,
            phase,
            format!("no promotion: {e}"),
        ));
    }
    let mut report = DrillReport::failed(run, phase, String::new());
    std::thread::sleep(Duration::from_secs_f64(args.after));
    let blog = read(dir, "backup.err");
    report.rto_ms = killed_unix_ns
        .zip(line_time(&blog, "promoted:"))
        .map(|(k, p)| (p - k) / 1e6);
    report.detection_ms = field(&blog, "primary declared failed", "silence_ms");
    report.promotion_ms = field::<f64>(&blog, "promoted:", "promotion_us").map(|us| us / 1e3);
    report.lease_wait_ms = field(&blog, "promoted:", "lease_wait_ms");
    report.promoted_epoch = field(&blog, "promoted:", "epoch");
    let before = read(dir, "primary.out");
    let after = read(dir, "backup.out");
    let (tp, tb) = (ledger_ticks(&before), ledger_ticks(&after));
    report.last_tick_primary = tp.last().copied();
    report.first_tick_backup = tb.first().copied();
    let plog = read(dir, "primary.err");
    let captured: Option<u64> = plog.lines().rev().find_map(|l| {
        l.contains("drill: killing")
            .then(|| field(l, "drill", "epoch"))?
    });
    report.rolled_back_epochs = captured
        .zip(report.promoted_epoch)
        .map(|(c, p)| c.saturating_sub(p));
    report.stdout_note = ledger_failure(&before, &after);
    let file = std::fs::read(&console_file)
        .with_context(|| format!("reading the console file {}", console_file.display()))?;
    report.console_file_ticks = Some(ledger_ticks(&String::from_utf8_lossy(&file)).len() as u64);
    report.failure = console_file_failure(&file, tb.len());
    report.passed = report.failure.is_none();
    Ok(report)
}

/// The console file of a drill, in its directory.
pub(crate) const CONSOLE_FILE: &str = "console.file";

/// What is wrong with a console file both nodes wrote by offset: `None` when it has no hole
/// (a NUL: bytes never written), nothing says `CORRUPT`, the promoted VM printed at least 3
/// ticks (`printed_after`, from its stdout) and every `tick N` is there exactly once and in
/// order from 1.
pub(crate) fn console_file_failure(file: &[u8], printed_after: usize) -> Option<String> {
    let text = String::from_utf8_lossy(file);
    if let Some(hole) = file.iter().position(|&b| b == 0) {
        Some(format!(
            "the console file has a hole at offset {hole} (output lost)"
        ))
    } else if text.contains("CORRUPT") {
        Some("the ledger reported CORRUPT".into())
    } else if printed_after < 3 {
        Some(format!("the promoted VM printed {printed_after} ticks"))
    } else {
        ticks_failure(&ledger_ticks(&text)).map(|f| format!("console file: {f}"))
    }
}

/// What an outside observer saw wrong in the ledger: `before` is the old primary's released
/// console, `after` the promoted VM's. `None` when the promoted VM printed at least 3 ticks,
/// every `tick N` is there exactly once and in order from 1, and nothing says `CORRUPT`.
pub(crate) fn ledger_failure(before: &str, after: &str) -> Option<String> {
    let joined = format!("{before}{after}");
    let printed_after = ledger_ticks(after).len();
    if joined.contains("CORRUPT") {
        Some("the ledger reported CORRUPT".into())
    } else if printed_after < 3 {
        Some(format!("the promoted VM printed {printed_after} ticks"))
    } else {
        ticks_failure(&ledger_ticks(&joined))
    }
}

/// `None` when `ticks` is 1, 2, 3, ... (each exactly once, in order); else what is wrong.
pub(crate) fn ticks_failure(ticks: &[u64]) -> Option<String> {
    if ticks.first() != Some(&1) {
        Some(format!("ticks do not start at 1: {:?}", ticks.first()))
    } else {
        ticks.windows(2).find(|w| w[1] != w[0] + 1).map(|w| {
            format!(
                "tick {} followed by {} (lost or repeated output)",
                w[0], w[1]
            )
        })
    }
}

fn percentile(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    Some(v[i])
}

pub fn run(args: DrillArgs) -> Result<i32> {
    if !["capture", "send", "commit", "ack", "random", "cycle"].contains(&args.kill_at.as_str()) {
        bail!(
            "--kill-at {}: use capture, send, commit, ack, random or cycle",
            args.kill_at
        );
    }
    crate::metrics::install(args.metrics)?;
    crate::metrics::zero_counters(&["understudy_drills_total", "understudy_drills_passed_total"]);
    let mut reports = Vec::new();
    for run in 1..=args.repeat {
        let phase = match args.kill_at.as_str() {
            "cycle" => PHASES[(run as usize - 1) % PHASES.len()].to_string(),
            p => p.to_string(),
        };
        let tmp = tempfile::tempdir()?;
        let dir = match &args.keep {
            Some(k) => {
                let d = k.join(format!("drill-{run}"));
                std::fs::create_dir_all(&d)?;
                d
            }
            None => tmp.path().to_path_buf(),
        };
        let r = one(&args, run, &phase, &dir)
            .unwrap_or_else(|e| DrillReport::failed(run, &phase, format!("{e:#}")));
        if !args.json {
            let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
            eprintln!(
                "drill {run}/{}: kill at {:<7} {}  detection {} ms  promotion {} ms  RTO {} ms  \
                 resumed epoch {}  stdout ticks ..{} | {}..  console file {} ticks  {}{}",
                args.repeat,
                r.kill_at,
                if r.passed { "PASS" } else { "FAIL" },
                f(r.detection_ms),
                f(r.promotion_ms),
                f(r.rto_ms),
                r.promoted_epoch.map_or("-".into(), |e| e.to_string()),
                r.last_tick_primary.map_or("-".into(), |e| e.to_string()),
                r.first_tick_backup.map_or("-".into(), |e| e.to_string()),
                r.console_file_ticks.map_or("-".into(), |e| e.to_string()),
                r.failure.as_deref().unwrap_or(""),
                r.stdout_note
                    .as_deref()
                    .map_or(String::new(), |n| format!("(stdout alone: {n})")),
            );
        }
        metrics::counter!("understudy_drills_total").increment(1);
        if r.passed {
            metrics::counter!("understudy_drills_passed_total").increment(1);
            metrics::gauge!("understudy_drill_last_success_timestamp_seconds")
                .set(unix_ns_now() / 1e9);
        }
        reports.push(r);
    }
    let passed = reports.iter().filter(|r| r.passed).count();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        let mut rto: Vec<f64> = reports.iter().filter_map(|r| r.rto_ms).collect();
        let mut promo: Vec<f64> = reports.iter().filter_map(|r| r.promotion_ms).collect();
        let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        println!(
            "drills passed: {passed}/{}; RTO p50 {} ms p99 {} ms; promotion p50 {} ms p99 {} ms",
            reports.len(),
            f(percentile(&mut rto, 0.5)),
            f(percentile(&mut rto, 0.99)),
            f(percentile(&mut promo, 0.5)),
            f(percentile(&mut promo, 0.99)),
        );
    }
    if args.metrics.is_some() {
        std::thread::sleep(args.linger);
    }
    Ok(if passed == reports.len() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_become_unix_time() {
        let t = log_time("2026-11-22T04:38:54.735541Z  WARN x: y").unwrap();
        assert!(
            (t / 1e9 - 1_795_322_334.735_541).abs() < 1e-3,
            "{}",
            t / 1e9
        );
        assert_eq!(log_time("garbage"), None);
    }

    #[test]
    fn the_console_file_verdict() {
        let ok = b"ledger pages=1\ntick 1 ok\ntick 2 ok\ntick 3 ok\ntick 4";
        assert_eq!(console_file_failure(ok, 3), None);
        assert!(console_file_failure(ok, 2).unwrap().contains("printed 2"));
        let hole = b"tick 1 ok\n\0\0\0\0\0\0\0\0\0\0tick 3 ok\n";
        assert!(console_file_failure(hole, 3)
            .unwrap()
            .contains("hole at offset 10"));
        let repeat = b"tick 1 ok\ntick 2 ok\ntick 2 ok\ntick 3 ok\n";
        assert!(console_file_failure(repeat, 3)
            .unwrap()
            .contains("tick 2 followed by 2"));
    }
}
