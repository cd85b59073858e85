//! `understudy bench soak`: protect mode with the ledger guest under datagram loss and random
//! kills of either side, for a given number of minutes.
//!
//! Every round starts a fresh set of `understudy` processes on loopback (mutual TLS, as
//! `understudy drill` does): a witness, a primary (ledger guest) whose backup sits behind
//! `understudy relay` (2% loss and 5 ms delay each way by default), that backup
//! (`--protect-to` a standby, `--image-dir` a directory of the round), and the standby. Failure
//! timeouts and lease TTLs are 1 s: the 300 ms defaults misfire under loss on a loaded 2-core
//! machine. Once the primary is protected, the round runs for a random 5-20 s and then
//! SIGKILLs a random side:
//!
//! ```text
//!  primary killed                          backup killed
//!  ──────────────                          ─────────────
//!  backup promotes (witness lease)         primary goes UNPROTECTED, keeps ticking
//!  backup re-protects to the standby       a new backup starts at the same address over the
//!  ledger: primary's console, then the       same --image-dir: it loads the stored image and
//!    promoted VM's: every tick once          the primary sends a delta resync (only the pages
//!                                            changed since), PROTECTED again
//!                                          ledger so far: every tick once
//!                                          after 2-5 s the primary is killed: the new
//!                                            backup promotes from its resumed image and
//!                                            re-protects; ledger checked across both consoles
//! ```
//!
//! The ledger check after that second kill is the proof that the delta missed nothing: the
//! promoted VM runs on the image the delta completed. A full sync where a delta was due (the
//! stored image was not usable, or the primary did not know it) is a failed check, with the
//! log lines that say why. Per backup-kill round the delta's wire bytes and pages are recorded
//! against the wire bytes of the round's first full sync. `--no-persist` runs the backups
//! without `--image-dir`, as before delta resync: every restarted backup gets a full sync.
//!
//! While the rounds run, the current primary's metrics are scraped every 200 ms
//! (`understudy_replication_lag_seconds` while `understudy_protected` is 1; reported apart per
//! source, and "steady" for samples taken at least 3 s after that node became protected, as the
//! first epochs after a sync wait behind it), and every process's `/proc/PID/status` gives its
//! `VmHWM` (peak resident set) and `RssAnon` (sampled; the highest value seen is kept).

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
    /// Ledger pages of the guest (`primary --pages`); default: the guest's 2048 (8 MiB). At
    /// the default rate those are all rewritten within a second, so a restarted backup's delta
    /// holds nearly every one of them: as much as a full sync, which skips zero pages.
    #[arg(long)]
    ledger_pages: Option<String>,
    /// Ledger steps per second (`primary --rate`); default: the guest's (10000).
    #[arg(long)]
    ledger_rate: Option<String>,
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
    /// Run the backups without `--image-dir`: a restarted backup gets a full sync (the soak
    /// before delta resync, to compare).
    #[arg(long)]
    no_persist: bool,
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
    /// Backup-kill rounds: how the restarted backup was synced.
    resync: Option<Resync>,
    kept_dir: Option<String>,
    wall_s: f64,
}

/// How the primary re-protected itself with the restarted backup, from its log.
#[derive(Serialize, Debug, Clone, PartialEq)]
struct Resync {
    /// "delta" or "full".
    kind: &'static str,
    wire_bytes: Option<u64>,
    /// Delta only: pages changed since the backup's stored image, of `of_pages`.
    pages: Option<u64>,
    of_pages: Option<u64>,
    /// The round's first full sync (to the first backup), for scale.
    first_full_sync_wire_bytes: Option<u64>,
}

impl Resync {
    /// The delta's wire bytes as a percentage of the round's first full sync.
    fn pct_of_full(&self) -> Option<f64> {
        let (d, f) = (self.wire_bytes?, self.first_full_sync_wire_bytes?);
        (f > 0).then(|| d as f64 * 100.0 / f as f64)
    }
}

const LOST: &str = "UNPROTECTED: lost the backup";
const COMMITTED: &str = "PROTECTED: the backup committed";
const DELTA_SENT: &str = "delta resync sent";
const FULL_SENT: &str = "full sync sent";
const DELTA_PLAN: &str = "delta resync: the backup kept";

/// Where the primary's log says it is unprotected now: the offset of its last `LOST` line, if
/// no `COMMITTED` follows it. (Not a count of `LOST` lines: a session lost to the loss on the
/// relay before the kill reconnects to the same backup and adds a `LOST` and a `COMMITTED`.)
fn unprotected_at(plog: &str) -> Option<usize> {
    let lost = plog.rfind(LOST)?;
    plog.rfind(COMMITTED)
        .is_none_or(|c| c < lost)
        .then_some(lost)
}

/// The sync that re-protected the primary after the loss its log shows at `lost_at`: the last
/// "... sent" line from there to the next `COMMITTED` (a session lost mid-sync retries).
fn resync_after_loss(plog: &str, lost_at: usize) -> Option<Resync> {
    let after = plog.get(lost_at..)?;
    let until = after.find(COMMITTED).map_or(after, |i| &after[..i]);
    let sent = until
        .lines()
        .rev()
        .find(|l| l.contains(DELTA_SENT) || l.contains(FULL_SENT))?;
    let delta = sent.contains(DELTA_SENT);
    let plan = until.lines().rev().find(|l| l.contains(DELTA_PLAN));
    let plan_field = |key| {
        plan.filter(|_| delta)
            .and_then(|l| drill::field(l, "", key))
    };
    Some(Resync {
        kind: if delta { "delta" } else { "full" },
        wire_bytes: drill::field(sent, "", "wire_bytes"),
        pages: plan_field("pages"),
        of_pages: plan_field("of"),
        first_full_sync_wire_bytes: drill::field(plog, FULL_SENT, "wire_bytes"),
    })
}

/// Log lines that say why a restarted backup was not resumed, timestamps and levels cut.
fn why_not_resumed(plog: &str, blog: &str) -> String {
    const WHY: [&str; 7] = [
        "reconnecting for a full sync",
        "could not be resumed",
        "cannot be resumed from",
        "the stored image is damaged",
        "no stored image yet",
        "cannot keep the image",
        "stored image intact",
    ];
    let mut why: Vec<String> = [("primary", plog), ("backup-new", blog)]
        .iter()
        .flat_map(|(who, log)| {
            log.lines()
                .filter(|l| WHY.iter().any(|w| l.contains(w)))
                .map(move |l| {
                    let msg = l.split_once(": ").map_or(l, |(_, m)| m);
                    format!("{who}: {}", msg.chars().take(240).collect::<String>())
                })
        })
        .collect();
    if !blog.contains("resuming from the stored image") {
        why.push("backup-new: no \"resuming from the stored image\"".into());
    }
    why.join(" | ")
}

#[derive(Serialize, Debug)]
struct Summary {
    minutes: f64,
    seed: u64,
    memory: String,
    ledger_pages: Option<String>,
    ledger_rate: Option<String>,
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
    /// Backups ran with `--image-dir` (not `--no-persist`).
    persist: bool,
    /// Backup-kill rounds whose restarted backup got a delta resync, and a full sync.
    delta_resyncs: usize,
    full_resyncs: usize,
    delta_wire_bytes_p50: Option<f64>,
    delta_wire_bytes_max: Option<f64>,
    /// The delta as a percentage of the same round's first full sync.
    delta_pct_of_full_p50: Option<f64>,
    delta_pct_of_full_max: Option<f64>,
    delta_pages_p50: Option<f64>,
    delta_pages_max: Option<f64>,
    full_sync_wire_bytes_p50: Option<f64>,
    loadavg_before: String,
    loadavg_after: String,
    loadavg1_max: f64,
    note: &'static str,
    wall_s: f64,
    round_reports: Vec<RoundReport>,
}

/// What the restarted backups were expected to get.
fn note(persist: bool) -> &'static str {
    if persist {
        "backups run with --image-dir; a backup killed and restarted over the same directory \
         must be re-protected with a delta resync (a full sync there is a failed check)"
    } else {
        "--no-persist: backups run without --image-dir, a restarted backup gets a full sync"
    }
}

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
    resync: Option<Resync>,
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

    /// Polls `f` until it gives a value or `timeout` passes, sampling.
    fn wait_until<T>(&mut self, timeout: Duration, f: impl Fn(&Self) -> Option<T>) -> Option<T> {
        let t = Instant::now();
        loop {
            if let Some(v) = f(self) {
                return Some(v);
            }
            if t.elapsed() > timeout {
                return None;
            }
            self.sleep(Duration::from_millis(20));
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

    /// The directory the backup at the relay's address keeps its image in (the first one and
    /// the one restarted after it was killed), unless `--no-persist`.
    fn image_dir(&self) -> Option<String> {
        (!self.args.no_persist).then(|| self.dir.join("backup-image").display().to_string())
    }

    /// A backup's arguments and its metrics address.
    fn backup_args(
        &self,
        addr: &str,
        name: &str,
        protect_to: Option<&str>,
        image_dir: Option<&str>,
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
        if let Some(dir) = image_dir {
            a.extend(s(&["--image-dir", dir]));
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
    let (b2, b2_metrics) = r.backup_args(&b2_addr, "backup2", None, None)?;
    r.spawn("backup2", "backup", b2, Some(b2_metrics))?;
    let image_dir = r.image_dir();
    let (b1, b1_metrics) =
        r.backup_args(&b_addr, "backup", Some(&b2_addr), image_dir.as_deref())?;
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
    let mut pargs = s(&[
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
    for (flag, v) in [
        ("--pages", &args.ledger_pages),
        ("--rate", &args.ledger_rate),
    ] {
        if let Some(v) = v {
            pargs.extend(s(&[flag, v]));
        }
    }
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
    let timeout = Duration::from_secs(10);
    let lost_at = r.wait_until(timeout, |r| unprotected_at(&r.err("primary")));
    let Some(lost_at) = lost_at else {
        r.check(
            "primary notices the backup loss",
            false,
            Some(format!(
                "no {LOST:?} after the last {COMMITTED:?} in the primary's log within {timeout:?}"
            )),
        );
        return Ok(("backup", protected.as_secs_f64()));
    };
    r.check("primary notices the backup loss", false, None);
    let ticks_at_loss = ledger_ticks(&r.out("primary")).len();
    r.sleep(Duration::from_secs_f64(rng.between(0.5, 3.0)));
    // Same address, same --image-dir: the new backup loads what the killed one stored.
    let (b1, b1_metrics) =
        r.backup_args(&b_addr, "backup", Some(&b2_addr), image_dir.as_deref())?;
    r.spawn("backup-new", "backup", b1, Some(b1_metrics))?;
    let timeout = Duration::from_secs(120);
    let reprotected = r.wait_until(timeout, |r| {
        r.err("primary")
            .get(lost_at..)
            .is_some_and(|l| l.contains(COMMITTED))
            .then_some(())
    });
    if !r.check(
        "primary re-protected by the restarted backup",
        false,
        reprotected.is_none().then(|| {
            format!("no {COMMITTED:?} in the primary's log after the loss within {timeout:?}")
        }),
    ) {
        return Ok(("backup", protected.as_secs_f64()));
    }
    r.backup_losses += 1;
    let plog = r.err("primary");
    r.resync = resync_after_loss(&plog, lost_at);
    let kind = r.resync.as_ref().map(|x| x.kind);
    if !args.no_persist {
        let failure = match kind {
            Some("delta") => None,
            Some(_) => Some(format!(
                "a full sync instead of a delta resync: {}",
                why_not_resumed(&plog[lost_at..], &r.err("backup-new"))
            )),
            None => Some(format!(
                "no {DELTA_SENT:?} or {FULL_SENT:?} in the primary's log after the loss"
            )),
        };
        r.check(
            "restarted backup resumed with a delta resync",
            false,
            failure,
        );
    }
    let source = if kind == Some("delta") {
        "primary, restarted backup after a delta resync"
    } else {
        "primary, restarted backup after a full sync"
    };
    r.lag_from = LagFrom::new(metrics, source);
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

/// Bytes in MB (10^6, as the tests' delta figures are).
fn fmt_mb(v: Option<f64>) -> String {
    v.map_or("-".into(), |b| format!("{:.1} MB", b / 1e6))
}

fn fmt_pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |p| format!("{p:.1}%"))
}

/// The round line's resync part: `  resync delta 8.1 MB = 12.0% of 67.8 MB, 1935 pages`.
fn fmt_resync(x: &Resync) -> String {
    let pages = x.pages.map_or(String::new(), |p| format!(", {p} pages"));
    format!(
        "  resync {} {} = {} of {}{pages}",
        x.kind,
        fmt_mb(x.wire_bytes.map(|b| b as f64)),
        fmt_pct(x.pct_of_full()),
        fmt_mb(x.first_full_sync_wire_bytes.map(|b| b as f64)),
    )
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
        "soak: {} min, ledger {} guest (pages {}, rate {}), relay loss {} delay {} each way, timeouts {}, seed {seed}; \
         {}",
        args.minutes,
        args.memory,
        args.ledger_pages.as_deref().unwrap_or("default"),
        args.ledger_rate.as_deref().unwrap_or("default"),
        args.loss,
        args.delay,
        args.timeout,
        note(!args.no_persist)
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
            resync: None,
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
            resync: r.resync.clone(),
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
             failovers {}  backup losses {}  RTO {} ms  max lag {} ms (steady {}){}  load {}{}{}",
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
            report.resync.as_ref().map_or(String::new(), fmt_resync),
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
    let resyncs = || reports.iter().filter_map(|r| r.resync.as_ref());
    let deltas = || resyncs().filter(|x| x.kind == "delta");
    let sorted = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v
    };
    let delta_bytes = sorted(
        deltas()
            .filter_map(|x| x.wire_bytes)
            .map(|b| b as f64)
            .collect(),
    );
    let delta_pct = sorted(deltas().filter_map(Resync::pct_of_full).collect());
    let delta_pages = sorted(deltas().filter_map(|x| x.pages).map(|p| p as f64).collect());
    let full_bytes = sorted(
        resyncs()
            .filter_map(|x| x.first_full_sync_wire_bytes)
            .map(|b| b as f64)
            .collect(),
    );
    let summary = Summary {
        minutes: args.minutes,
        seed,
        memory: args.memory.clone(),
        ledger_pages: args.ledger_pages.clone(),
        ledger_rate: args.ledger_rate.clone(),
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
        persist: !args.no_persist,
        delta_resyncs: deltas().count(),
        full_resyncs: resyncs().filter(|x| x.kind == "full").count(),
        delta_wire_bytes_p50: pct(&delta_bytes, 0.5),
        delta_wire_bytes_max: delta_bytes.last().copied(),
        delta_pct_of_full_p50: pct(&delta_pct, 0.5),
        delta_pct_of_full_max: delta_pct.last().copied(),
        delta_pages_p50: pct(&delta_pages, 0.5),
        delta_pages_max: delta_pages.last().copied(),
        full_sync_wire_bytes_p50: pct(&full_bytes, 0.5),
        loadavg_before,
        loadavg_after: loadavg(),
        loadavg1_max: all.loadavg1_max,
        note: note(!args.no_persist),
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
             resync of a restarted backup: {} delta, {} full; delta on the wire p50 {} max {} \
             (p50 {} max {} of the round's first full sync, p50 {}); pages changed p50 {} max {}\n\
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
            summary.delta_resyncs,
            summary.full_resyncs,
            fmt_mb(summary.delta_wire_bytes_p50),
            fmt_mb(summary.delta_wire_bytes_max),
            fmt_pct(summary.delta_pct_of_full_p50),
            fmt_pct(summary.delta_pct_of_full_max),
            fmt_mb(summary.full_sync_wire_bytes_p50),
            summary
                .delta_pages_p50
                .map_or("-".into(), |p| format!("{p:.0}")),
            summary
                .delta_pages_max
                .map_or("-".into(), |p| format!("{p:.0}")),
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

    const PLOG: &str = "\
T0  INFO understudy_primary::session: full sync sent epochs=2 wire_bytes=67800000
T1  INFO understudy_primary::session: PROTECTED: the backup committed a consistent epoch
T2  WARN understudy_primary::session: UNPROTECTED: lost the backup; reconnecting
T3  INFO understudy_primary::session: delta resync: the backup kept an earlier image; sending only the pages changed since pages=9 of=32768 since_clock=5
T4  INFO understudy_primary::session: delta resync: the backup kept an earlier image; sending only the pages changed since pages=1935 of=32768 since_clock=7
T5  INFO understudy_primary::session: delta resync sent epochs=2 wire_bytes=8100000
T6  INFO understudy_primary::session: PROTECTED: the backup committed a consistent epoch
T7  INFO understudy_primary::session: full sync sent epochs=2 wire_bytes=1
";

    #[test]
    fn the_resync_after_the_loss_is_read_against_the_first_full_sync() {
        let x = resync_after_loss(PLOG, PLOG.find(LOST).unwrap()).unwrap();
        assert_eq!(
            x,
            Resync {
                kind: "delta",
                wire_bytes: Some(8_100_000),
                pages: Some(1935),
                of_pages: Some(32768),
                first_full_sync_wire_bytes: Some(67_800_000),
            }
        );
        assert!((x.pct_of_full().unwrap() - 11.946).abs() < 0.01);
    }

    #[test]
    fn a_full_sync_after_the_loss_is_reported_as_full_with_its_reason() {
        let plog = PLOG
            .replace("delta resync sent", "full sync sent")
            .replace("delta resync: the backup kept", "the backup kept an image this primary did not send or no longer remembers; reconnecting for a full sync");
        let x = resync_after_loss(&plog, plog.find(LOST).unwrap()).unwrap();
        assert_eq!(
            (x.kind, x.wire_bytes, x.pages),
            ("full", Some(8_100_000), None)
        );
        let lost = PLOG.find(LOST).unwrap();
        assert!(resync_after_loss(&PLOG[..PLOG.find("T3").unwrap()], lost).is_none());
        let why = why_not_resumed(&plog, "T  WARN understudy_backup::session: the stored image cannot be resumed from error=torn");
        assert!(why.contains("primary: the backup kept an image"), "{why}");
        assert!(
            why.contains("backup-new: the stored image cannot be resumed from error=torn"),
            "{why}"
        );
        assert!(
            why.contains("no \"resuming from the stored image\""),
            "{why}"
        );
    }

    #[test]
    fn the_loss_is_the_last_one_and_only_while_unprotected() {
        // Protected, lost (the relay), protected again by the same backup, then the kill.
        let first = PLOG.find(LOST).unwrap();
        let twice = format!("{PLOG}T8  WARN x: {LOST}; reconnecting\n");
        assert_eq!(unprotected_at(PLOG), None);
        assert_eq!(
            unprotected_at(&PLOG[..PLOG.find("T3").unwrap()]),
            Some(first)
        );
        let last = unprotected_at(&twice).unwrap();
        assert!(last > first);
        assert_eq!(resync_after_loss(&twice, last), None);
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
