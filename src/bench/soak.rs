//! `understudy bench soak`: protect mode with the ledger guest under datagram loss and random
//! kills of either side, for a given number of minutes.
//!
//! Every round starts a fresh set of `understudy` processes on loopback (mutual TLS, as
//! `understudy drill` does): a witness, a primary (ledger guest) whose backup sits behind
//! `understudy relay` (2% loss and 5 ms delay each way by default), that backup
//! (`--protect-to` a standby), and the standby. Failure timeouts and lease TTLs are 1 s: the
//! 300 ms defaults misfire under loss on a loaded 2-core machine. Once the primary is
//! protected, the round runs for a random 5-20 s and then SIGKILLs a random side:
//!
//! ```text
//!  primary killed                          backup killed
//!  ──────────────                          ─────────────
//!  backup promotes (witness lease)         primary goes UNPROTECTED, keeps ticking
//!  backup re-protects to the standby       a new backup starts at the same address:
//!  ledger: primary's console, then the       full sync (no persistence yet), PROTECTED again
//!    promoted VM's: every tick once        ledger so far: every tick once
//!                                          after 2-5 s the primary is killed: the new
//!                                            backup promotes and re-protects; ledger checked
//!                                            across both consoles
//! ```
//!
//! A restarted backup always starts from a full sync: delta resync is not built yet, and the
//! soak's backups run without `--image-dir`. While the rounds run, the current primary's metrics are scraped every 200 ms
//! (`understudy_replication_lag_seconds` while `understudy_protected` is 1; reported apart per
//! source, and "steady" for samples taken at least 3 s after that node became protected, as the
//! first epochs after a full sync wait behind it), and every
//! process's `/proc/PID/status` gives its `VmHWM` (peak resident set) and `RssAnon` (sampled;
//! the highest value seen is kept).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;
use understudy_vmm::guests::ledger_ticks;

use crate::drill::{self, Proc};

#[derive(Args, Debug)]
pub struct SoakArgs {
    /// How long to soak, in minutes: rounds start until this much time has passed (the last
    /// round then runs to its end).
    #[arg(long, default_value_t = 5.0)]
    minutes: f64,
    /// Guest memory of the ledger VM.
    #[arg(long, default_value = "128M")]
    memory: String,
    /// Fraction of datagrams the relay between primary and backup drops, each way.
    #[arg(long, default_value = "0.02")]
    loss: String,
    /// One-way delay the relay adds, each way.
    #[arg(long, default_value = "5ms")]
    delay: String,
    /// Failure timeout and lease TTL of every node (1 s: the 300 ms defaults misfire under
    /// loss on a loaded machine).
    #[arg(long, default_value = "1s")]
    timeout: String,
    /// Seed of the random choices (side to kill, run times, relay loss); default: the clock.
    #[arg(long)]
    seed: Option<u64>,
    /// Print the summary and every round as JSON (on stdout; the per-round lines still go to
    /// stderr).
    #[arg(long)]
    json: bool,
    /// Keep every round's directory (logs, consoles) under this directory. Without it, only
    /// a failed round's directory is kept (its path is printed).
    #[arg(long)]
    keep: Option<PathBuf>,
}

/// xorshift64*: repeatable draws from --seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [lo, hi).
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next() >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// One check of a round and how it came out.
#[derive(Serialize, Debug, Clone)]
struct Check {
    name: &'static str,
    /// A ledger (consistency) check rather than a liveness one.
    consistency: bool,
    passed: bool,
    detail: String,
}

#[derive(Serialize, Debug, Clone, Copy, Default)]
struct Mem {
    vm_hwm_kib: u64,
    rss_anon_kib: u64,
}

#[derive(Serialize, Debug)]
struct RoundReport {
    round: u32,
    killed: &'static str,
    protected_s: f64,
    passed: bool,
    failovers: u32,
    backup_losses: u32,
    /// Kill of the primary to the backup's `promoted:` line (wall clock), per failover.
    rto_ms: Vec<f64>,
    lag_samples: usize,
    max_lag_ms: Option<f64>,
    max_steady_lag_ms: Option<f64>,
    checks: Vec<Check>,
    kept_dir: Option<String>,
    wall_s: f64,
}

#[derive(Serialize, Debug)]
struct Summary {
    minutes: f64,
    seed: u64,
    memory: String,
    loss: String,
    delay: String,
    timeout: String,
    rounds: usize,
    rounds_passed: usize,
    failovers_survived: u32,
    backup_losses_survived: u32,
    consistency_checks_passed: usize,
    consistency_checks_failed: usize,
    other_checks_passed: usize,
    other_checks_failed: usize,
    lag_samples: usize,
    lag_p50_ms: Option<f64>,
    lag_p99_ms: Option<f64>,
    max_lag_ms: Option<f64>,
    /// Samples taken at least `STEADY` after the node became protected.
    steady_lag_samples: usize,
    steady_lag_p99_ms: Option<f64>,
    max_steady_lag_ms: Option<f64>,
    /// The highest lag per source (which node, protected by which backup).
    max_lag_ms_by_source: BTreeMap<&'static str, f64>,
    rto_max_ms: Option<f64>,
    /// Highest VmHWM and RssAnon seen per role (a promoted backup counts as a backup).
    memory_high_water: BTreeMap<&'static str, Mem>,
    loadavg_before: String,
    loadavg_after: String,
    loadavg1_max: f64,
    note: &'static str,
    wall_s: f64,
    round_reports: Vec<RoundReport>,
}

const NOTE: &str = "a restarted backup starts from a full sync (delta resync is not built \
                    yet; the soak's backups run without --image-dir)";

/// A process of the round, its role (for memory figures) and its metrics address.
struct Node {
    label: String,
    role: &'static str,
    proc: Proc,
    metrics: Option<String>,
}

/// What the sampler collects while a round waits.
#[derive(Default)]
struct Samples {
    lag: Vec<f64>,
    steady: Vec<f64>,
    max_by_source: BTreeMap<&'static str, f64>,
    mem: BTreeMap<&'static str, Mem>,
    loadavg1_max: f64,
    last: Option<Instant>,
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// `understudy_replication_lag_seconds` from a Prometheus endpoint, if it is protected.
fn scrape_lag(addr: &str) -> Option<f64> {
    let sa: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nhost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let value = |name: &str| -> Option<f64> {
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    (value("understudy_protected")? == 1.0)
        .then(|| value("understudy_replication_lag_seconds"))
        .flatten()
}

impl Samples {
    /// Every 200 ms: the lag from `lag_from` and every live node's memory.
    fn sample(&mut self, nodes: &mut [Node], lag_from: Option<&LagFrom>) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        self.last = Some(Instant::now());
        if let Some(from) = lag_from {
            if let Some(l) = scrape_lag(&from.addr) {
                self.lag.push(l);
                if from.since.elapsed() >= STEADY {
                    self.steady.push(l);
                }
                let m = self.max_by_source.entry(from.source).or_default();
                *m = m.max(l * 1e3);
            }
        }
        for n in nodes.iter_mut() {
            if !matches!(n.proc.0.try_wait(), Ok(None)) {
                continue;
            }
            let path = format!("/proc/{}/status", n.proc.0.id());
            let Ok(st) = std::fs::read_to_string(path) else {
                continue;
            };
            let m = self.mem.entry(n.role).or_default();
            m.vm_hwm_kib = m.vm_hwm_kib.max(status_kib(&st, "VmHWM:").unwrap_or(0));
            m.rss_anon_kib = m.rss_anon_kib.max(status_kib(&st, "RssAnon:").unwrap_or(0));
        }
        self.loadavg1_max = self.loadavg1_max.max(loadavg1());
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn loadavg1() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Lag samples taken this long after a node became protected are "steady".
const STEADY: Duration = Duration::from_secs(3);

/// Where the lag is scraped: the node running the VM, while protected.
struct LagFrom {
    addr: String,
    source: &'static str,
    /// When it became protected (by the backup it has now).
    since: Instant,
}

impl LagFrom {
    fn new(addr: String, source: &'static str) -> Option<Self> {
        Some(Self {
            addr,
            source,
            since: Instant::now(),
        })
    }
}

/// A round in progress: its directory, processes and figures.
struct Round<'a> {
    args: &'a SoakArgs,
    dir: PathBuf,
    certs: String,
    witness: String,
    nodes: Vec<Node>,
    samples: Samples,
    /// The node running the VM, while protected.
    lag_from: Option<LagFrom>,
    checks: Vec<Check>,
    rto_ms: Vec<f64>,
    failovers: u32,
    backup_losses: u32,
}

impl Round<'_> {
    fn spawn(
        &mut self,
        label: &str,
        role: &'static str,
        args: Vec<String>,
        metrics: Option<String>,
    ) -> Result<()> {
        let proc = drill::spawn(&self.dir, label, &args)?;
        self.nodes.push(Node {
            label: label.into(),
            role,
            proc,
            metrics,
        });
        Ok(())
    }

    fn node(&mut self, label: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.label == label)
            .expect("a node of this round")
    }

    fn err(&self, label: &str) -> String {
        drill::read(&self.dir, &format!("{label}.err"))
    }

    fn out(&self, label: &str) -> String {
        drill::read(&self.dir, &format!("{label}.out"))
    }

    /// Sleeps `d`, sampling.
    fn sleep(&mut self, d: Duration) {
        let t = Instant::now();
        while t.elapsed() < d {
            self.samples.sample(&mut self.nodes, self.lag_from.as_ref());
            std::thread::sleep(Duration::from_millis(20).min(d.saturating_sub(t.elapsed())));
        }
    }

    /// Waits until `label`'s log holds `needle` at least `count` times, sampling.
    fn wait_log(&mut self, label: &str, needle: &str, count: usize, timeout: Duration) -> bool {
        let t = Instant::now();
        loop {
            if self.err(label).matches(needle).count() >= count {
                return true;
            }
            if t.elapsed() > timeout {
                return false;
            }
            self.sleep(Duration::from_millis(20));
        }
    }

    fn check(&mut self, name: &'static str, consistency: bool, failure: Option<String>) -> bool {
        let passed = failure.is_none();
        self.checks.push(Check {
            name,
            consistency,
            passed,
            detail: failure.unwrap_or_default(),
        });
        passed
    }

    /// A liveness check that `label`'s log shows `needle` (`count` times) within `timeout`.
    fn check_log(
        &mut self,
        name: &'static str,
        label: &str,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> bool {
        let ok = self.wait_log(label, needle, count, timeout);
        self.check(
            name,
            false,
            (!ok).then(|| format!("no {needle:?} in {label}'s log within {timeout:?}")),
        )
    }

    /// A backup's arguments and its metrics address.
    fn backup_args(
        &self,
        addr: &str,
        name: &str,
        protect_to: Option<&str>,
    ) -> Result<(Vec<String>, String)> {
        let metrics = format!("127.0.0.1:{}", tcp_port()?);
        let mut a = s(&[
            "backup",
            "--certs",
            &self.certs,
            "--name",
            name,
            "--listen",
            addr,
            "--witness",
            &self.witness,
            "--failure-timeout",
            &self.args.timeout,
            "--lease-ttl",
            &self.args.timeout,
            "--metrics",
            &metrics,
        ]);
        if let Some(to) = protect_to {
            a.extend(s(&["--protect-to", to, "--protect-to-name", "backup2"]));
        }
        Ok((a, metrics))
    }

    /// SIGKILLs the VM's node `primary`; `backup` must promote, re-protect to the standby, and
    /// the ledger must hold across `primary`'s console and `backup`'s.
    fn failover(&mut self, primary: &str, backup: &str) -> bool {
        let killed = drill::unix_ns_now();
        let p = self.node(primary);
        let _ = p.proc.0.kill();
        let _ = p.proc.0.wait();
        self.lag_from = None;
        if !self.check_log(
            "backup promotes",
            backup,
            "promoted:",
            1,
            Duration::from_secs(30),
        ) {
            return false;
        }
        self.failovers += 1;
        if let Some(rto) = drill::line_time(&self.err(backup), "promoted:") {
            self.rto_ms.push((rto - killed) / 1e6);
        }
        let reprotected = self.check_log(
            "promoted backup re-protects",
            backup,
            "PROTECTED: the backup committed",
            1,
            Duration::from_secs(60),
        );
        if let Some(m) = self.node(backup).metrics.clone() {
            self.lag_from = LagFrom::new(m, "promoted node, standby as backup");
        }
        self.sleep(Duration::from_millis(1500));
        let (before, after) = (self.out(primary), self.out(backup));
        let ok = self.check(
            "ledger across the failover",
            true,
            drill::ledger_failure(&before, &after),
        );
        reprotected && ok
    }
}

fn certs(dir: &Path) -> Result<String> {
    let exe = std::env::current_exe()?;
    let d = dir.display().to_string();
    let mut all = vec![vec!["certs", "init", "--dir", &d]];
    for name in ["primary", "backup", "backup2", "witness"] {
        all.push(vec!["certs", "issue", "--dir", &d, "--name", name]);
    }
    for a in all {
        let st = Command::new(&exe).args(&a).stdout(Stdio::null()).status()?;
        if !st.success() {
            bail!("understudy {} failed", a.join(" "));
        }
    }
    Ok(d)
}

/// One round; errors are setup failures (ports, spawning), counted as a failed check.
fn round(r: &mut Round, rng: &mut Rng) -> Result<(&'static str, f64)> {
    let args = r.args;
    let port = || drill::free_port().map(|p| format!("127.0.0.1:{p}"));
    let (w_addr, b_addr, b2_addr, relay_addr) = (port()?, port()?, port()?, port()?);
    r.witness = w_addr.clone();
    let wargs = s(&["witness", "--certs", &r.certs, "--listen", &w_addr]);
    r.spawn("witness", "witness", wargs, None)?;
    if !r.check_log(
        "witness starts",
        "witness",
        "witness listening",
        1,
        Duration::from_secs(10),
    ) {
        return Ok(("-", 0.0));
    }
    let (b2, b2_metrics) = r.backup_args(&b2_addr, "backup2", None)?;
    r.spawn("backup2", "backup", b2, Some(b2_metrics))?;
    let (b1, b1_metrics) = r.backup_args(&b_addr, "backup", Some(&b2_addr))?;
    r.spawn("backup", "backup", b1, Some(b1_metrics))?;
    let seed = rng.next().to_string();
    let relay = s(&[
        "relay",
        "--listen",
        &relay_addr,
        "--to",
        &b_addr,
        "--delay",
        &args.delay,
        "--loss",
        &args.loss,
        "--seed",
        &seed,
    ]);
    r.spawn("relay", "relay", relay, None)?;
    for (label, needle) in [
        ("backup2", "backup listening"),
        ("backup", "backup listening"),
        ("relay", "relay up"),
    ] {
        if !r.check_log("node starts", label, needle, 1, Duration::from_secs(10)) {
            return Ok(("-", 0.0));
        }
    }
    let metrics = format!("127.0.0.1:{}", tcp_port()?);
    let pargs = s(&[
        "primary",
        "--certs",
        &r.certs,
        "--backup",
        &relay_addr,
        "--witness",
        &w_addr,
        "--failure-timeout",
        &args.timeout,
        "--lease-ttl",
        &args.timeout,
        "--workload",
        "ledger",
        "--memory",
        &args.memory,
        "--metrics",
        &metrics,
    ]);
    r.spawn("primary", "primary", pargs, Some(metrics.clone()))?;
    if !r.check_log(
        "primary protected",
        "primary",
        "PROTECTED: the backup committed",
        1,
        Duration::from_secs(120),
    ) {
        return Ok(("-", 0.0));
    }
    r.lag_from = LagFrom::new(metrics.clone(), "primary, first backup");
    let protected = Duration::from_secs_f64(rng.between(5.0, 20.0));
    r.sleep(protected);
    let alive = matches!(r.node("primary").proc.0.try_wait(), Ok(None));
    let spurious = r.err("backup").contains("primary declared failed");
    if !r.check(
        "no failover before the kill",
        false,
        (!alive || spurious).then(|| {
            format!("before the kill: primary alive {alive}, backup declared it failed {spurious}")
        }),
    ) {
        return Ok(("-", protected.as_secs_f64()));
    }
    if rng.next().is_multiple_of(2) {
        r.failover("primary", "backup");
        return Ok(("primary", protected.as_secs_f64()));
    }

    // The backup dies; the primary runs on unprotected until a new backup is at the address.
    let b = r.node("backup");
    let _ = b.proc.0.kill();
    let _ = b.proc.0.wait();
    r.lag_from = None;
    if !r.check_log(
        "primary notices the backup loss",
        "primary",
        "UNPROTECTED: lost the backup",
        1,
        Duration::from_secs(10),
    ) {
        return Ok(("backup", protected.as_secs_f64()));
    }
    let ticks_at_loss = ledger_ticks(&r.out("primary")).len();
    r.sleep(Duration::from_secs_f64(rng.between(0.5, 3.0)));
    let (b1, b1_metrics) = r.backup_args(&b_addr, "backup", Some(&b2_addr))?;
    r.spawn("backup-new", "backup", b1, Some(b1_metrics))?;
    if !r.check_log(
        "primary re-protected by a new backup (full sync)",
        "primary",
        "PROTECTED: the backup committed",
        2,
        Duration::from_secs(120),
    ) {
        return Ok(("backup", protected.as_secs_f64()));
    }
    r.backup_losses += 1;
    r.lag_from = LagFrom::new(metrics, "primary, new backup after a full re-sync");
    r.sleep(Duration::from_secs_f64(rng.between(2.0, 5.0)));
    let out = r.out("primary");
    let ticks = ledger_ticks(&out);
    let failure = if out.contains("CORRUPT") {
        Some("the ledger reported CORRUPT".into())
    } else if ticks.len() <= ticks_at_loss {
        Some(format!(
            "no ticks while unprotected and re-protected ({} at the loss, {} now)",
            ticks_at_loss,
            ticks.len()
        ))
    } else {
        drill::ticks_failure(&ticks)
    };
    if r.check("ledger across the backup loss", true, failure) {
        r.failover("primary", "backup-new");
    }
    Ok(("backup", protected.as_secs_f64()))
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

/// Nearest-rank percentile of an ascending slice.
fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

pub fn run(args: SoakArgs) -> Result<i32> {
    if args.minutes.is_nan() || args.minutes <= 0.0 {
        bail!("--minutes {}: use a positive number", args.minutes);
    }
    let seed = args.seed.unwrap_or_else(|| drill::unix_ns_now() as u64) | 1;
    let mut rng = Rng(seed);
    let top = tempfile::tempdir()?;
    let certs = certs(&top.path().join("certs"))?;
    let started = Instant::now();
    let loadavg_before = loadavg();
    let mut all = Samples::default();
    let mut reports = Vec::new();
    eprintln!(
        "soak: {} min, ledger {} guest, relay loss {} delay {} each way, timeouts {}, seed {seed}; \
         {NOTE}",
        args.minutes, args.memory, args.loss, args.delay, args.timeout
    );
    let mut n = 0;
    while started.elapsed().as_secs_f64() < args.minutes * 60.0 {
        n += 1;
        let t = Instant::now();
        let tmp = tempfile::Builder::new()
            .prefix(&format!("soak-round-{n}-"))
            .tempdir()?;
        let dir = match &args.keep {
            Some(k) => {
                let d = k.join(format!("round-{n}"));
                std::fs::create_dir_all(&d)?;
                d
            }
            None => tmp.path().to_path_buf(),
        };
        let mut r = Round {
            args: &args,
            dir,
            certs: certs.clone(),
            witness: String::new(),
            nodes: Vec::new(),
            samples: Samples::default(),
            lag_from: None,
            checks: Vec::new(),
            rto_ms: Vec::new(),
            failovers: 0,
            backup_losses: 0,
        };
        let (killed, protected_s) = match round(&mut r, &mut rng) {
            Ok(k) => k,
            Err(e) => {
                r.check("round setup", false, Some(format!("{e:#}")));
                ("-", 0.0)
            }
        };
        r.nodes.clear(); // SIGKILL what is left
        let passed = r.checks.iter().all(|c| c.passed);
        let kept_dir = match (&args.keep, passed) {
            (Some(_), _) => Some(r.dir.display().to_string()),
            (None, false) => Some(tmp.keep().display().to_string()),
            (None, true) => None,
        };
        let mut lag = r.samples.lag.clone();
        lag.sort_by(f64::total_cmp);
        let steady_max = r.samples.steady.iter().copied().max_by(f64::total_cmp);
        let report = RoundReport {
            round: n,
            killed,
            protected_s,
            passed,
            failovers: r.failovers,
            backup_losses: r.backup_losses,
            rto_ms: r.rto_ms.clone(),
            lag_samples: lag.len(),
            max_lag_ms: lag.last().map(|l| l * 1e3),
            max_steady_lag_ms: steady_max.map(|l| l * 1e3),
            checks: r.checks.clone(),
            kept_dir,
            wall_s: t.elapsed().as_secs_f64(),
        };
        all.lag.extend(&r.samples.lag);
        all.steady.extend(&r.samples.steady);
        for (source, m) in &r.samples.max_by_source {
            let a = all.max_by_source.entry(source).or_default();
            *a = a.max(*m);
        }
        for (role, m) in &r.samples.mem {
            let a = all.mem.entry(role).or_default();
            a.vm_hwm_kib = a.vm_hwm_kib.max(m.vm_hwm_kib);
            a.rss_anon_kib = a.rss_anon_kib.max(m.rss_anon_kib);
        }
        all.loadavg1_max = all.loadavg1_max.max(r.samples.loadavg1_max);
        let failed: Vec<String> = report
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        eprintln!(
            "round {n} [{:>5.0} s]: protected {:>4.1} s, killed {:<7} {}  checks {}/{}  \
             failovers {}  backup losses {}  RTO {} ms  max lag {} ms (steady {})  load {}{}{}",
            started.elapsed().as_secs_f64(),
            protected_s,
            killed,
            if passed { "PASS" } else { "FAIL" },
            report.checks.iter().filter(|c| c.passed).count(),
            report.checks.len(),
            report.failovers,
            report.backup_losses,
            report
                .rto_ms
                .iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(","),
            fmt_ms(report.max_lag_ms),
            fmt_ms(report.max_steady_lag_ms),
            loadavg(),
            if failed.is_empty() {
                String::new()
            } else {
                format!("  {}", failed.join("; "))
            },
            report
                .kept_dir
                .as_ref()
                .filter(|_| !passed)
                .map(|d| format!("  (kept {d})"))
                .unwrap_or_default(),
        );
        reports.push(report);
    }
    let checks = || reports.iter().flat_map(|r| r.checks.iter());
    let count = |consistency: bool, passed: bool| {
        checks()
            .filter(|c| c.consistency == consistency && c.passed == passed)
            .count()
    };
    let mut lag = all.lag.clone();
    lag.sort_by(f64::total_cmp);
    let mut steady = all.steady.clone();
    steady.sort_by(f64::total_cmp);
    let summary = Summary {
        minutes: args.minutes,
        seed,
        memory: args.memory.clone(),
        loss: args.loss.clone(),
        delay: args.delay.clone(),
        timeout: args.timeout.clone(),
        rounds: reports.len(),
        rounds_passed: reports.iter().filter(|r| r.passed).count(),
        failovers_survived: reports.iter().map(|r| r.failovers).sum(),
        backup_losses_survived: reports.iter().map(|r| r.backup_losses).sum(),
        consistency_checks_passed: count(true, true),
        consistency_checks_failed: count(true, false),
        other_checks_passed: count(false, true),
        other_checks_failed: count(false, false),
        lag_samples: lag.len(),
        lag_p50_ms: pct(&lag, 0.5).map(|l| l * 1e3),
        lag_p99_ms: pct(&lag, 0.99).map(|l| l * 1e3),
        max_lag_ms: lag.last().map(|l| l * 1e3),
        steady_lag_samples: steady.len(),
        steady_lag_p99_ms: pct(&steady, 0.99).map(|l| l * 1e3),
        max_steady_lag_ms: steady.last().map(|l| l * 1e3),
        max_lag_ms_by_source: all.max_by_source.clone(),
        rto_max_ms: reports
            .iter()
            .flat_map(|r| r.rto_ms.iter().copied())
            .max_by(f64::total_cmp),
        memory_high_water: all.mem.clone(),
        loadavg_before,
        loadavg_after: loadavg(),
        loadavg1_max: all.loadavg1_max,
        note: NOTE,
        wall_s: started.elapsed().as_secs_f64(),
        round_reports: reports,
    };
    let ok = summary.rounds > 0 && summary.rounds_passed == summary.rounds;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let mem = |role: &str| {
            summary.memory_high_water.get(role).map_or("-".into(), |m| {
                format!(
                    "VmHWM {} RssAnon {}",
                    mib(m.vm_hwm_kib),
                    mib(m.rss_anon_kib)
                )
            })
        };
        println!(
            "soak {:.1} min (seed {}): rounds {} ({} passed); failovers survived {}; backup \
             losses survived {}\n\
             consistency checks passed {} failed {}; other checks passed {} failed {}\n\
             lag ({} samples, while protected): p50 {} ms, p99 {} ms, max {} ms; RTO max {} ms\n\
             lag from {:?} on after a node became protected ({} samples): p99 {} ms, max {} ms\n\
             max lag by source: {}\n\
             memory high-water: primary {}; backup {}; witness {}; relay {}\n\
             load average before {}, after {}, 1-min max {:.2}\n\
             note: {}",
            summary.wall_s / 60.0,
            summary.seed,
            summary.rounds,
            summary.rounds_passed,
            summary.failovers_survived,
            summary.backup_losses_survived,
            summary.consistency_checks_passed,
            summary.consistency_checks_failed,
            summary.other_checks_passed,
            summary.other_checks_failed,
            summary.lag_samples,
            fmt_ms(summary.lag_p50_ms),
            fmt_ms(summary.lag_p99_ms),
            fmt_ms(summary.max_lag_ms),
            fmt_ms(summary.rto_max_ms),
            STEADY,
            summary.steady_lag_samples,
            fmt_ms(summary.steady_lag_p99_ms),
            fmt_ms(summary.max_steady_lag_ms),
            summary
                .max_lag_ms_by_source
                .iter()
                .map(|(k, v)| format!("{k} {v:.1} ms"))
                .collect::<Vec<_>>()
                .join("; "),
            mem("primary"),
            mem("backup"),
            mem("witness"),
            mem("relay"),
            summary.loadavg_before,
            summary.loadavg_after,
            summary.loadavg1_max,
            summary.note,
        );
    }
    Ok(if ok { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_kib() {
        let st = "Name:\tunderstudy\nVmHWM:\t  204800 kB\nRssAnon:\t   1024 kB\n";
        assert_eq!(status_kib(st, "VmHWM:"), Some(204_800));
        assert_eq!(status_kib(st, "RssAnon:"), Some(1024));
        assert_eq!(status_kib(st, "VmRSS:"), None);
    }

    #[test]
    fn draws_stay_in_range() {
        let mut r = Rng(7);
        for _ in 0..1000 {
            let v = r.between(5.0, 20.0);
            assert!((5.0..20.0).contains(&v), "{v}");
        }
    }
}
