//! `understudy bench protect`: protect mode on the `dirty` guest at several rates, each rate next
//! to the same guest run with dirty logging at the same epoch length but no replication.
//!
//! Per rate, in this order:
//! 1. **Logging-only reference** (in this process): boot `dirty` with dirty logging, and every
//!    epoch pause, save the state, take the dirty set, copy the dirty pages, resume, exactly as the
//!    primary's capture does; no encoding, no network. Guest throughput = its progress counter
//!    (pages written) over the window.
//! 2. **Protected** run: a real `understudy backup --once` and a real `understudy primary`
//!    (this executable) on loopback with mutual TLS. The window starts `--warmup` seconds after
//!    the first consistent epoch is acknowledged (the full sync is not measured) and lasts
//!    `--seconds`; then the primary gets SIGINT and both end.
//!
//! Cases: every `--rates` rate at `--epoch-ms`, plus one probe case (`--probe-rate` at
//! `--probe-epoch-ms`, by default 30k pages/s at 70 ms) whose epochs carry ~2000 dirty pages,
//! the size the pause target is stated for. A case that fails is reported and the others run;
//! a session that ends early (e.g. a failure detector firing) keeps the figures of the part of
//! the window before it, marked with `*`.
//!
//! Where the figures come from (all exact, per epoch, no sketches):
//! - pause and dirty pages per epoch: the primary's `captured` debug line of every epoch
//!   (`RUST_LOG=understudy_primary::capture=debug`), with its timestamp;
//! - commit latency (capture to Ack): the primary's release journal (one line per Ack, with its
//!   time) joined with the capture time of the same epoch;
//! - replication lag: every second the primary's Prometheus endpoint gives the last committed
//!   epoch; lag = now - capture time of that epoch (the age of the backup's image, i.e. what a
//!   failover would lose). Whether it grows: least-squares slope over the last 60 s;
//! - wire bytes per dirtied page, guest progress: Prometheus counters/gauges at both window ends;
//! - CPU: `/proc/PID/stat` utime+stime at both ends, per process and per thread.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use understudy_vmm::guests::layout::PROGRESS_GPA;
use understudy_vmm::guests::{parse_size_in, ContentMix, Workload};
use understudy_vmm::memory::{MAX_MEMORY, MIN_MEMORY};
use understudy_vmm::{Boot, OutputGate, Vm, VmConfig, PAGE_SIZE};

/// Pages per full-sync epoch passed to the primary (its default), to know when the sync ends.
const SYNC_BATCH: u64 = 16384;
/// Target: pause p99 at about this many dirty pages per epoch.
const PAUSE_TARGET_PAGES: u64 = 2000;
const PAUSE_TARGET_MS: f64 = 2.0;
/// Target: guest throughput protected / logging-only.
const THROUGHPUT_TARGET: f64 = 0.85;
/// The rate at which lag must stay bounded.
const LAG_TARGET_RATE: u64 = 30_000;

#[derive(Args, Debug)]
pub struct ProtectArgs {
    /// Seconds measured per rate and per mode (BENCHMARKS.md uses 60).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(3..=3600))]
    seconds: u64,
    /// Guest write rates in pages/s, comma-separated; 0 = unpaced.
    #[arg(long, value_delimiter = ',', default_value = "2000,10000,30000,0")]
    rates: Vec<u64>,
    /// Epoch length in milliseconds (both modes).
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=10000))]
    epoch_ms: u64,
    /// An extra case at --probe-rate with epochs this long, so that epochs carry about 2000
    /// dirty pages (what the pause target is stated for; 25 ms epochs of this guest cannot:
    /// dirty logging caps it near 40k new pages/s); 0 = no extra case.
    #[arg(long, default_value_t = 70)]
    probe_epoch_ms: u64,
    /// Guest rate of the extra case.
    #[arg(long, default_value_t = 30_000)]
    probe_rate: u64,
    /// Passed to both processes as --failure-timeout (default: theirs).
    #[arg(long)]
    failure_timeout: Option<String>,
    /// Passed to the primary as --encoder-nice (default: the primary's own default, 10), e.g.
    /// 0 to compare with an encoder that competes with the vCPU as an equal.
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..=19))]
    encoder_nice: Option<i32>,
    /// Seconds run before each window (after the full sync for the protected run).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Guest memory.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// Working set of `dirty`.
    #[arg(long, default_value = "64M")]
    working_set: String,
    /// Content mix of `dirty` (default: the guest's default mix).
    #[arg(long)]
    mix: Option<String>,
    /// Keep the logs and per-epoch CSVs of every run in this directory.
    #[arg(long)]
    keep: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Small helpers: time, statistics, /proc, Prometheus text.

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Nearest-rank percentile of an ascending slice.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Least-squares line through (x, y): (intercept, slope).
fn fit(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        return None;
    }
    let b = sxy / sxx;
    Some((my - b * mx, b))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-22T04:20:21.123456Z` (tracing-subscriber's default timer) to Unix nanoseconds.
fn parse_rfc3339_utc(s: &str) -> Option<u128> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, mo, da) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>());
    let (h, mi, se) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let digits: String = frac.chars().take(9).collect();
    let ns_frac: i64 = format!("{digits:0<9}").parse().ok()?;
    let secs = days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60 + se;
    u128::try_from(secs)
        .ok()
        .map(|s| s * 1_000_000_000 + ns_frac as u128)
}

/// Removes ANSI escape sequences (in case a child colours its log).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `key=value` of a tracing fmt line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|tok| tok.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.trim_matches('"').parse().ok())
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

/// (comm, utime + stime in clock ticks) of a /proc/.../stat file.
fn stat_ticks(path: &Path) -> Option<(String, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let comm = s.get(s.find('(')? + 1..s.rfind(')')?)?.to_string();
    // After ")": field 3 (state) is index 0, so utime (14) and stime (15) are 11 and 12.
    let rest: Vec<&str> = s[s.rfind(')')? + 1..].split_whitespace().collect();
    let ut: u64 = rest.get(11)?.parse().ok()?;
    let st: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, ut + st))
}

#[derive(Clone, Default)]
struct CpuSnap {
    total: u64,
    threads: HashMap<String, (String, u64)>,
}

fn cpu_snap(pid: u32) -> CpuSnap {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let total = stat_ticks(&base.join("stat")).map_or(0, |t| t.1);
    let mut threads = HashMap::new();
    if let Ok(dir) = std::fs::read_dir(base.join("task")) {
        for e in dir.flatten() {
            if let Some(t) = stat_ticks(&e.path().join("stat")) {
                threads.insert(e.file_name().to_string_lossy().into_owned(), t);
            }
        }
    }
    CpuSnap { total, threads }
}

/// CPU of one process over a window, as % of one core, with a per-thread-name breakdown.
#[derive(Clone, Default)]
struct CpuUse {
    percent: f64,
    by_thread: Vec<(String, f64)>,
}

fn cpu_use(a: &CpuSnap, b: &CpuSnap, seconds: f64, hz: f64) -> CpuUse {
    let to_pct = |ticks: u64| ticks as f64 / hz / seconds * 100.0;
    let mut named: BTreeMap<String, u64> = BTreeMap::new();
    let mut live = 0u64;
    for (tid, (comm, t1)) in &b.threads {
        let t0 = a.threads.get(tid).map_or(0, |x| x.1);
        let d = t1.saturating_sub(t0);
        live += d;
        *named.entry(comm.clone()).or_default() += d;
    }
    let total = b.total.saturating_sub(a.total);
    let gone = total.saturating_sub(live);
    if gone > 0 {
        named.insert("(exited threads)".into(), gone);
    }
    let mut by_thread: Vec<(String, f64)> =
        named.into_iter().map(|(n, t)| (n, to_pct(t))).collect();
    by_thread.sort_by(|x, y| y.1.total_cmp(&x.1));
    CpuUse {
        percent: to_pct(total),
        by_thread,
    }
}

fn fmt_threads(c: &CpuUse) -> String {
    let shown: Vec<String> = c
        .by_thread
        .iter()
        .filter(|(_, p)| *p >= 0.5)
        .map(|(n, p)| format!("{n} {p:.0}%"))
        .collect();
    if shown.is_empty() {
        "-".into()
    } else {
        shown.join(", ")
    }
}

/// Busy and total jiffies of the whole host (/proc/stat).
fn host_snap() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy, busy + get(3) + get(4))
}

/// Host busy time over a window as % of one core.
fn host_busy_pct(a: (u64, u64), b: (u64, u64), seconds: f64, hz: f64) -> f64 {
    b.0.saturating_sub(a.0) as f64 / hz / seconds * 100.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// One scrape of a Prometheus text endpoint: (name, labels, value).
struct Scrape(Vec<(String, String, f64)>);

impl Scrape {
    fn parse(body: &str) -> Scrape {
        let mut out = Vec::new();
        for line in body.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, labels, rest) = match (line.find('{'), line.rfind('}')) {
                (Some(o), Some(c)) if o < c => (&line[..o], &line[o + 1..c], &line[c + 1..]),
                _ => match line.split_once(char::is_whitespace) {
                    Some((n, r)) => (n, "", r),
                    None => continue,
                },
            };
            let value = rest.split_whitespace().next().unwrap_or("");
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => match v.parse::<f64>() {
                    Ok(x) => x,
                    Err(_) => continue,
                },
            };
            out.push((name.to_string(), labels.to_string(), value));
        }
        Scrape(out)
    }

    /// Sum over every label set of `name`; None when the metric is absent.
    fn sum(&self, name: &str) -> Option<f64> {
        let mut found = None;
        for (n, _, v) in &self.0 {
            if n == name {
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    }

    fn labelled(&self, name: &str, label: &str) -> Option<f64> {
        self.0
            .iter()
            .find(|(n, l, _)| n == name && l.split(',').any(|x| x.trim() == label))
            .map(|x| x.2)
    }
}

fn scrape(addr: SocketAddr) -> Option<Scrape> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    // HTTP/1.0: the body ends with the connection, never chunked.
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    if !head.lines().next()?.contains(" 200") {
        return None;
    }
    Some(Scrape::parse(body))
}

fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_tcp_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ---------------------------------------------------------------------------------------------
// Child processes.

/// A child that is killed (and reaped) if still running when dropped.
struct Proc {
    name: &'static str,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    pump: Option<JoinHandle<()>>,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn tail(&self) -> String {
        self.tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|l| format!("    {l}\n"))
            .collect()
    }

    fn interrupt(&self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.pid().to_string()])
            .stderr(Stdio::null())
            .status();
    }

    /// Waits up to `timeout` for the child to exit; kills it after that.
    fn finish(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.exited() {
                break Some(s);
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "bench: {} did not stop in {timeout:?}; killing it",
                    self.name
                );
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Spawns this executable with `args`; its stderr goes line by line to `log`, to a tail kept
/// for error messages, and to `on_line`.
fn spawn(
    name: &'static str,
    args: &[String],
    log: &Path,
    mut on_line: impl FnMut(&str) + Send + 'static,
) -> Result<Proc> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut child = Command::new(&exe)
        .args(args)
        .env("RUST_LOG", "info,understudy_primary::capture=debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} {}", exe.display(), args.join(" ")))?;
    let stderr = child.stderr.take().context("child stderr")?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?,
    );
    let t = Arc::clone(&tail);
    let pump = std::thread::Builder::new()
        .name(format!("{name}-log"))
        .spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                let _ = writeln!(file, "{line}");
                {
                    let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                    if t.len() == 30 {
                        t.pop_front();
                    }
                    t.push_back(line.clone());
                }
                on_line(&line);
            }
            let _ = file.flush();
        })
        .context("starting a log reader thread")?;
    Ok(Proc {
        name,
        child,
        tail,
        pump: Some(pump),
    })
}

// ---------------------------------------------------------------------------------------------
// The two modes.

#[derive(Clone, Copy, Debug)]
struct EpochRec {
    epoch: u64,
    pages: u64,
    pause_us: u64,
    /// Unix ns at the start of the pause.
    captured_ns: u128,
}

#[derive(Clone, Default)]
struct Baseline {
    pages_per_s: f64,
    pause_ms: (f64, f64),
    dirty_p50: f64,
    epochs: usize,
    /// Pause phases, p50 / p99 ms each.
    phases: String,
    cpu: CpuUse,
    others_pct: f64,
}

#[derive(Clone, Default)]
struct Protected {
    /// Epochs captured inside the window.
    epochs: Vec<EpochRec>,
    pause_ms: (f64, f64),
    dirty_p50: f64,
    dirty_max: f64,
    interval_ms: (f64, f64),
    commit_ms: (f64, f64),
    unacked: usize,
    /// (seconds since window start, lag ms).
    lag: Vec<(f64, f64)>,
    lag_slope: Option<f64>,
    lag_span: f64,
    wire_per_page: f64,
    raw_over_wire: f64,
    primary_cpu: CpuUse,
    backup_cpu: CpuUse,
    others_pct: f64,
    /// Highest 1-s CPU of everything else on the host.
    others_max_pct: f64,
    /// Why the window is shorter than asked, if it is.
    ended_early: Option<String>,
    pages_per_s: f64,
    /// The exporter's own summaries (rolling window) at the end, as a cross-check.
    exporter_pause_p99_ms: Option<f64>,
    exporter_commit_p99_ms: Option<f64>,
}

/// One guest rate at one epoch length.
#[derive(Clone, Copy, Debug)]
struct Case {
    rate: u64,
    epoch: Duration,
    /// The extra case for the pause target.
    probe: bool,
}

impl Case {
    fn name(&self) -> String {
        let rate = if self.rate == 0 {
            "unpaced".to_string()
        } else {
            format!("{}/s", self.rate)
        };
        if self.probe {
            format!("{rate}, {} ms epochs", self.epoch.as_millis())
        } else {
            rate
        }
    }

    /// For file names.
    fn tag(&self) -> String {
        format!("{}-{}ms", self.rate, self.epoch.as_millis())
    }

    fn epoch_ms(&self) -> f64 {
        self.epoch.as_secs_f64() * 1e3
    }
}

struct RateResult {
    case: Case,
    base: Baseline,
    prot: Protected,
}

struct Setup {
    args: ProtectArgs,
    memory_bytes: u64,
    mix: String,
    hz: f64,
    dir: PathBuf,
    certs: PathBuf,
}

impl Setup {
    fn workload(&self, rate: u64) -> Result<Workload> {
        let flags: HashMap<String, String> = [
            ("rate", rate.to_string()),
            ("working-set", self.args.working_set.clone()),
            ("mix", self.mix.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Ok(Workload::from_cli("dirty", &flags)?)
    }
}

/// Phases of the pause, as the primary's capture does them.
const PHASES: [&str; 5] = ["kick", "state", "dirty log", "copy", "seal+resume"];

/// One reference epoch: dirty pages, the whole pause and its phases.
struct RefEpoch {
    pages: u64,
    pause: Duration,
    phases: [Duration; 5],
}

/// One epoch of the logging-only reference, step by step as the primary's capture does it
/// (the staging buffer is fresh every epoch there too), timing each phase.
fn reference_epoch(vm: &mut Vm) -> Result<RefEpoch> {
    let t0 = Instant::now();
    vm.pause()?;
    let t1 = Instant::now();
    let _state = vm.state()?.encode();
    let t2 = Instant::now();
    let dirty = vm.take_dirty()?;
    let t3 = Instant::now();
    let count = dirty.count();
    let mut pages = vec![0u8; count * PAGE_SIZE as usize];
    for (gpa, buf) in dirty
        .pages()
        .zip(pages.chunks_exact_mut(PAGE_SIZE as usize))
    {
        vm.memory().read(gpa, buf)?;
    }
    let t4 = Instant::now();
    let _sealed = vm.gate().seal();
    vm.resume();
    let t5 = Instant::now();
    drop(pages);
    Ok(RefEpoch {
        pages: count as u64,
        pause: t5 - t0,
        phases: [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4],
    })
}

fn run_reference(s: &Setup, case: Case) -> Result<Baseline> {
    let workload = s.workload(case.rate)?;
    let mut cfg = VmConfig::new(s.memory_bytes);
    cfg.dirty_logging = true;
    let gate = OutputGate::passthrough(Box::new(std::io::sink()));
    let mut vm = Vm::boot(&cfg, Boot::Workload(&workload), gate).context("booting dirty")?;
    let me = std::process::id();
    let run = |vm: &mut Vm, until: Instant, out: Option<&mut Vec<RefEpoch>>| {
        let mut out = out;
        loop {
            let deadline = Instant::now() + case.epoch;
            if deadline > until {
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
                return Ok::<(), anyhow::Error>(());
            }
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            if let Some(r) = vm.exit_reason() {
                bail!("the dirty guest stopped: {r:?}");
            }
            let e = reference_epoch(vm)?;
            if let Some(o) = out.as_deref_mut() {
                o.push(e);
            }
        }
    };
    run(
        &mut vm,
        Instant::now() + Duration::from_secs(s.args.warmup),
        None,
    )?;
    let p0 = vm.memory().read_u64(PROGRESS_GPA)?;
    let (c0, h0, t0) = (cpu_snap(me), host_snap(), Instant::now());
    let mut recs = Vec::new();
    run(
        &mut vm,
        t0 + Duration::from_secs(s.args.seconds),
        Some(&mut recs),
    )?;
    let p1 = vm.memory().read_u64(PROGRESS_GPA)?;
    let (c1, h1, secs) = (cpu_snap(me), host_snap(), t0.elapsed().as_secs_f64());
    drop(vm);
    let pauses = sorted(recs.iter().map(|r| r.pause.as_secs_f64() * 1e3).collect());
    let dirty = sorted(recs.iter().map(|r| r.pages as f64).collect());
    let cpu = cpu_use(&c0, &c1, secs, s.hz);
    let phases = PHASES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let v = sorted(
                recs.iter()
                    .map(|r| r.phases[i].as_secs_f64() * 1e3)
                    .collect(),
            );
            format!("{name} {} / {}", f2(pct(&v, 0.5)), f2(pct(&v, 0.99)))
        })
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Baseline {
        pages_per_s: p1.saturating_sub(p0) as f64 / secs,
        pause_ms: (pct(&pauses, 0.5), pct(&pauses, 0.99)),
        dirty_p50: pct(&dirty, 0.5),
        epochs: recs.len(),
        phases,
        others_pct: host_busy_pct(h0, h1, secs, s.hz) - cpu.percent,
        cpu,
    })
}

/// Reads the primary's release journal: epoch -> Unix ns of its Ack.
fn read_journal(path: &Path) -> Result<HashMap<u64, u128>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the release journal {}", path.display()))?;
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("a release journal line is not JSON: {line}"))?;
        let epoch = v["epoch"].as_u64();
        // unix_ns exceeds u64 only after 2554; it is written as a plain integer.
        let ns = v["unix_ns"].as_u64();
        if let (Some(e), Some(ns)) = (epoch, ns) {
            out.entry(e).or_insert(u128::from(ns));
        }
    }
    Ok(out)
}

fn run_protected(s: &Setup, case: Case) -> Result<Protected> {
    let tag = case.tag();
    let rate = case.rate;
    let backup_port = free_udp_port()?;
    let metrics_port = free_tcp_port()?;
    let metrics: SocketAddr = ([127, 0, 0, 1], metrics_port).into();
    let journal = s.dir.join(format!("release-{tag}.jsonl"));
    let certs = s.certs.display().to_string();

    let extra: Vec<String> = match &s.args.failure_timeout {
        Some(t) => vec!["--failure-timeout".into(), t.clone()],
        None => Vec::new(),
    };
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let mut backup_args: Vec<String> = vec![
        "backup".into(),
        "--certs".into(),
        certs.clone(),
        "--listen".into(),
        format!("127.0.0.1:{backup_port}"),
        "--vm-id".into(),
        "bench".into(),
        "--once".into(),
    ];
    backup_args.extend(extra.iter().cloned());
    let mut backup = spawn(
        "backup",
        &backup_args,
        &s.dir.join(format!("backup-{tag}.log")),
        move |line| {
            if line.contains("backup listening") {
                let _ = ready_tx.send(());
            }
        },
    )?;
    if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
        bail!(
            "the backup did not start listening within 30 s; its log ends with:\n{}",
            backup.tail()
        );
    }

    let records: Arc<Mutex<Vec<EpochRec>>> = Arc::default();
    let recs = Arc::clone(&records);
    let mut primary_args: Vec<String> = vec![
        "primary".into(),
        "--backup".into(),
        format!("127.0.0.1:{backup_port}"),
        "--certs".into(),
        certs,
        "--vm-id".into(),
        "bench".into(),
        "--workload".into(),
        "dirty".into(),
        "--rate".into(),
        rate.to_string(),
        "--working-set".into(),
        s.args.working_set.clone(),
        "--mix".into(),
        s.mix.clone(),
        "--memory".into(),
        s.args.memory.clone(),
        "--epoch".into(),
        format!("{}ms", case.epoch.as_millis()),
        "--sync-batch".into(),
        SYNC_BATCH.to_string(),
        "--metrics".into(),
        metrics.to_string(),
        "--release-journal".into(),
        journal.display().to_string(),
    ];
    primary_args.extend(extra);
    if let Some(n) = s.args.encoder_nice {
        primary_args.extend(["--encoder-nice".into(), n.to_string()]);
    }
    let mut primary = spawn(
        "primary",
        &primary_args,
        &s.dir.join(format!("primary-{tag}.log")),
        move |line| {
            if !line.contains("understudy_primary::capture") || !line.contains(" captured ") {
                return;
            }
            let ts = line.split_whitespace().next().and_then(parse_rfc3339_utc);
            let (Some(ts), Some(epoch), Some(pages), Some(pause_us)) = (
                ts,
                field(line, "epoch"),
                field(line, "pages"),
                field(line, "pause_us"),
            ) else {
                return;
            };
            recs.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(EpochRec {
                    epoch,
                    pages,
                    pause_us,
                    captured_ns: ts.saturating_sub(u128::from(pause_us) * 1000),
                });
        },
    )?;

    // Wait for the first consistent epoch to be acknowledged (the full sync is over).
    let sync_epochs = (s.memory_bytes / PAGE_SIZE).div_ceil(SYNC_BATCH);
    let started = Instant::now();
    loop {
        if let Some(st) = primary.exited() {
            bail!(
                "the primary exited ({st}) before its first consistent epoch; its log ends with:\n{}",
                primary.tail()
            );
        }
        if let Some(st) = backup.exited() {
            bail!(
                "the backup exited ({st}) during the full sync; its log ends with:\n{}",
                backup.tail()
            );
        }
        let committed = scrape(metrics)
            .and_then(|m| m.sum("understudy_last_committed_epoch"))
            .unwrap_or(0.0);
        if committed >= (sync_epochs + 1) as f64 {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!(
                "no consistent epoch acknowledged within 300 s; the primary's log ends with:\n{}",
                primary.tail()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "bench:   full sync done after {:.1} s; warm-up {} s, window {} s",
        started.elapsed().as_secs_f64(),
        s.args.warmup,
        s.args.seconds
    );
    std::thread::sleep(Duration::from_secs(s.args.warmup));

    // The window: a scrape every second.
    // The window: a scrape every second, with CPU snapshots; it ends early (and says why) if
    // the session does.
    struct Sample {
        at: Instant,
        at_ns: u128,
        scrape: Scrape,
        primary: CpuSnap,
        backup: CpuSnap,
        host: (u64, u64),
    }
    let (pid_p, pid_b) = (primary.pid(), backup.pid());
    let t0 = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut ended_early = None;
    for k in 0..=s.args.seconds {
        std::thread::sleep((t0 + Duration::from_secs(k)).saturating_duration_since(Instant::now()));
        let (at, at_ns) = (Instant::now(), unix_ns());
        let stopped = primary.exited().is_some() || backup.exited().is_some();
        match scrape(metrics).filter(|_| !stopped) {
            Some(scrape) => samples.push(Sample {
                at,
                at_ns,
                scrape,
                primary: cpu_snap(pid_p),
                backup: cpu_snap(pid_b),
                host: host_snap(),
            }),
            None => {
                ended_early = Some(k);
                break;
            }
        }
    }
    if samples.len() < 3 {
        bail!(
            "the session ended {} s into the window; the primary's log ends with:\n{}\nthe backup's:\n{}",
            samples.len(),
            primary.tail(),
            backup.tail()
        );
    }
    let (first, last) = (&samples[0], &samples[samples.len() - 1]);
    let secs = (last.at - first.at).as_secs_f64();
    let (w0, w1) = (first.at_ns, last.at_ns);
    let others: Vec<f64> = samples
        .windows(2)
        .map(|w| {
            let dt = (w[1].at - w[0].at).as_secs_f64();
            host_busy_pct(w[0].host, w[1].host, dt, s.hz)
                - cpu_use(&w[0].primary, &w[1].primary, dt, s.hz).percent
                - cpu_use(&w[0].backup, &w[1].backup, dt, s.hz).percent
        })
        .collect();

    // Stop: SIGINT makes the primary capture a last epoch, wait for its Ack and say goodbye.
    primary.interrupt();
    let pst = primary.finish(Duration::from_secs(60));
    let bst = backup.finish(Duration::from_secs(30));
    if !pst.is_some_and(|s| s.success()) {
        eprintln!(
            "bench:   warning: the primary ended with {pst:?}; its log ends with:\n{}",
            primary.tail()
        );
    }
    if !bst.is_some_and(|s| s.success()) {
        eprintln!(
            "bench:   warning: the backup ended with {bst:?}; its log ends with:\n{}",
            backup.tail()
        );
    }
    // Why the session ended early: the first warning or error either process logged.
    let ended_early = ended_early.map(|k| {
        let why = [&primary, &backup]
            .iter()
            .flat_map(|p| {
                let t = p.tail.lock().unwrap_or_else(|e| e.into_inner());
                t.iter()
                    .filter(|l| {
                        l.contains(" WARN ") || l.contains(" ERROR ") || l.starts_with("error")
                    })
                    .map(|l| {
                        format!(
                            "{}: {}",
                            p.name,
                            l.split_once(": ").map_or(l.as_str(), |x| x.1)
                        )
                    })
                    .take(1)
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .join(" / ");
        format!("session ended {k} s into the window: {why}")
    });

    let all: Vec<EpochRec> =
        std::mem::take(&mut *records.lock().unwrap_or_else(|e| e.into_inner()));
    if all.is_empty() {
        bail!(
            "the primary logged no per-epoch `captured` lines (RUST_LOG=understudy_primary::capture=debug); \
             the bench reads pause and dirty pages from them. See {}",
            s.dir.join(format!("primary-{tag}.log")).display()
        );
    }
    let acks = read_journal(&journal)?;
    let by_epoch: HashMap<u64, EpochRec> = all.iter().map(|r| (r.epoch, *r)).collect();
    let window: Vec<EpochRec> = all
        .iter()
        .filter(|r| r.captured_ns >= w0 && r.captured_ns <= w1)
        .copied()
        .collect();
    if window.is_empty() {
        bail!("no epoch was captured inside the window");
    }

    let pauses = sorted(window.iter().map(|r| r.pause_us as f64 / 1e3).collect());
    let dirty = sorted(window.iter().map(|r| r.pages as f64).collect());
    let intervals = sorted(
        window
            .windows(2)
            .map(|w| (w[1].captured_ns.saturating_sub(w[0].captured_ns)) as f64 / 1e6)
            .collect(),
    );
    let mut unacked = 0;
    let commits = sorted(
        window
            .iter()
            .filter_map(|r| match acks.get(&r.epoch) {
                Some(a) => Some(a.saturating_sub(r.captured_ns) as f64 / 1e6),
                None => {
                    unacked += 1;
                    None
                }
            })
            .collect(),
    );
    let lag: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|smp| {
            let e = smp.scrape.sum("understudy_last_committed_epoch")? as u64;
            let rec = by_epoch.get(&e)?;
            Some((
                smp.at_ns.saturating_sub(w0) as f64 / 1e9,
                smp.at_ns.saturating_sub(rec.captured_ns) as f64 / 1e6,
            ))
        })
        .collect();
    let end = lag.last().map_or(0.0, |l| l.0);
    let tail: Vec<(f64, f64)> = lag.iter().copied().filter(|l| l.0 >= end - 60.0).collect();
    let lag_span = tail.last().map_or(0.0, |l| l.0) - tail.first().map_or(0.0, |l| l.0);
    let lag_slope = fit(&tail).map(|f| f.1);

    let delta = |name: &str| -> Result<f64> {
        let a = first.scrape.sum(name);
        let b = last.scrape.sum(name);
        match (a, b) {
            (Some(a), Some(b)) => Ok(b - a),
            _ => bail!("the primary does not export {name}"),
        }
    };
    let raw = delta("understudy_bytes_raw_total")?;
    let wire = delta("understudy_bytes_wire_total")?;
    let progress = delta("understudy_guest_progress").context(
        "the primary exports no understudy_guest_progress gauge (needed for guest throughput)",
    )?;
    let dirtied = raw / PAGE_SIZE as f64;
    let primary_cpu = cpu_use(&first.primary, &last.primary, secs, s.hz);
    let backup_cpu = cpu_use(&first.backup, &last.backup, secs, s.hz);
    let quantile = |name: &str| {
        last.scrape
            .labelled(name, "quantile=\"0.99\"")
            .map(|v| v * 1e3)
    };

    if let Some(keep) = &s.args.keep {
        let mut csv = String::from("epoch,pages,pause_us,captured_unix_ns,ack_unix_ns,in_window\n");
        for r in &all {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{}",
                r.epoch,
                r.pages,
                r.pause_us,
                r.captured_ns,
                acks.get(&r.epoch).map_or(String::new(), |a| a.to_string()),
                u8::from(r.captured_ns >= w0 && r.captured_ns <= w1)
            );
        }
        std::fs::write(keep.join(format!("epochs-{tag}.csv")), csv)?;
    }

    Ok(Protected {
        pause_ms: (pct(&pauses, 0.5), pct(&pauses, 0.99)),
        dirty_p50: pct(&dirty, 0.5),
        dirty_max: pct(&dirty, 1.0),
        interval_ms: (pct(&intervals, 0.5), pct(&intervals, 1.0)),
        commit_ms: (pct(&commits, 0.5), pct(&commits, 0.99)),
        unacked,
        lag,
        lag_slope,
        lag_span,
        wire_per_page: if dirtied > 0.0 {
            wire / dirtied
        } else {
            f64::NAN
        },
        raw_over_wire: if wire > 0.0 { raw / wire } else { f64::NAN },
        others_pct: host_busy_pct(first.host, last.host, secs, s.hz)
            - primary_cpu.percent
            - backup_cpu.percent,
        others_max_pct: others.iter().copied().fold(0.0, f64::max),
        ended_early,
        primary_cpu,
        backup_cpu,
        pages_per_s: progress / ((w1 - w0) as f64 / 1e9),
        exporter_pause_p99_ms: quantile("understudy_pause_seconds"),
        exporter_commit_p99_ms: quantile("understudy_commit_latency_seconds"),
        epochs: window,
    })
}

// ---------------------------------------------------------------------------------------------
fn lag_grows(p: &Protected, epoch_ms: f64) -> Option<bool> {
    // Growing = the fitted line rises by more than two epochs over the window.
    p.lag_slope.map(|b| b * p.lag_span > 2.0 * epoch_ms)
}

fn lag_series(p: &Protected, block: usize) -> String {
    let vals: Vec<String> = p
        .lag
        .chunks(block.max(1))
        .map(|c| format!("{:.0}", mean(&c.iter().map(|x| x.1).collect::<Vec<_>>())))
        .collect();
    vals.join(" ")
}

fn f2(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.2}")
    }
}

fn report(
    s: &Setup,
    results: &[RateResult],
    failures: &[(Case, String)],
    load_before: &str,
) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "understudy bench protect: dirty guest, memory {}, working set {}, mix {}, epoch {} ms, \
         primary's encoder at nice {}, {} s window per case and mode (+{} s warm-up); load average before: {load_before}, after: {}",
        s.args.memory,
        s.args.working_set,
        s.mix,
        s.args.epoch_ms,
        s.args
            .encoder_nice
            .map_or_else(|| "10 (its default)".to_string(), |n| n.to_string()),
        s.args.seconds,
        s.args.warmup,
        loadavg()
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "| rate | dirty pages/epoch p50 (max) | pause p50 / p99 ms | commit p50 / p99 ms | lag mean / max ms (slope) | wire B / dirtied page | CPU primary / backup % | guest pages/s protected / logging-only (ratio) |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    for r in results {
        let p = &r.prot;
        let lags: Vec<f64> = p.lag.iter().map(|l| l.1).collect();
        let _ = writeln!(
            o,
            "| {}{} | {:.0} ({:.0}) | {} / {} | {} / {} | {:.0} / {:.0} ({:+.2} ms/s) | {:.0} | {:.0} / {:.0} | {:.0} / {:.0} ({:.2}) |",
            r.case.name(),
            if p.ended_early.is_some() { " *" } else { "" },
            p.dirty_p50,
            p.dirty_max,
            f2(p.pause_ms.0),
            f2(p.pause_ms.1),
            f2(p.commit_ms.0),
            f2(p.commit_ms.1),
            mean(&lags),
            lags.iter().copied().fold(f64::NAN, f64::max),
            p.lag_slope.unwrap_or(f64::NAN),
            p.wire_per_page,
            p.primary_cpu.percent,
            p.backup_cpu.percent,
            p.pages_per_s,
            r.base.pages_per_s,
            p.pages_per_s / r.base.pages_per_s,
        );
    }
    for (case, why) in failures {
        let _ = writeln!(
            o,
            "| {} | FAILED: {} |||||||",
            case.name(),
            why.replace('\n', " ")
        );
    }
    let _ = writeln!(o);
    for r in results {
        if let Some(e) = &r.prot.ended_early {
            let _ = writeln!(
                o,
                "* {}: {e}; its figures cover the {:.0} s before",
                r.case.name(),
                r.prot.lag.last().map_or(0.0, |l| l.0)
            );
        }
    }
    let block = (s.args.seconds as usize).div_ceil(6).max(1);
    for r in results {
        let (p, b) = (&r.prot, &r.base);
        let name = r.case.name();
        let grows = match lag_grows(p, r.case.epoch_ms()) {
            Some(true) => "GROWS",
            Some(false) => "bounded",
            None => "?",
        };
        let _ = writeln!(
            o,
            "{name}: lag ms, 1 Hz samples, mean per {block} s: {} | slope {:+.3} ms/s over {:.0} s ({:+.0} ms) -> {grows}",
            lag_series(p, block),
            p.lag_slope.unwrap_or(f64::NAN),
            p.lag_span,
            p.lag_slope.unwrap_or(f64::NAN) * p.lag_span,
        );
        let _ = writeln!(
            o,
            "{name}: {} epochs in window, interval p50 {:.1} / max {:.1} ms, {} unacked; raw:wire {:.2}; \
             exporter summaries (rolling 60 s) p99 pause {} / commit {} ms",
            p.epochs.len(),
            p.interval_ms.0,
            p.interval_ms.1,
            p.unacked,
            p.raw_over_wire,
            p.exporter_pause_p99_ms.map_or("-".into(), f2),
            p.exporter_commit_p99_ms.map_or("-".into(), f2),
        );
        let _ = writeln!(
            o,
            "{name}: primary threads: {}; backup threads: {}; rest of host {:.0}% (max {:.0}% in a 1-s sample)",
            fmt_threads(&p.primary_cpu),
            fmt_threads(&p.backup_cpu),
            p.others_pct,
            p.others_max_pct
        );
        let _ = writeln!(
            o,
            "{name}: logging-only: {} epochs, dirty pages/epoch p50 {:.0}, pause p50 / p99 {} / {} ms, CPU {:.0}% ({}), rest of host {:.0}%",
            b.epochs,
            b.dirty_p50,
            f2(b.pause_ms.0),
            f2(b.pause_ms.1),
            b.cpu.percent,
            fmt_threads(&b.cpu),
            b.others_pct
        );
        let _ = writeln!(
            o,
            "{name}: logging-only pause phases p50 / p99 ms: {}",
            b.phases
        );
    }

    // Targets.
    let _ = writeln!(o);
    let _ = writeln!(o, "targets:");
    let pooled: Vec<EpochRec> = results
        .iter()
        .flat_map(|r| r.prot.epochs.iter().copied())
        .collect();
    let buckets: [(u64, u64); 6] = [
        (0, 250),
        (250, 500),
        (500, 1000),
        (1000, 1500),
        (1500, 2500),
        (2500, u64::MAX),
    ];
    let mut parts = Vec::new();
    let mut near = Vec::new();
    for (lo, hi) in buckets {
        let v = sorted(
            pooled
                .iter()
                .filter(|r| r.pages >= lo && r.pages < hi)
                .map(|r| r.pause_us as f64 / 1e3)
                .collect(),
        );
        if (lo, hi) == (1500, 2500) {
            near = v.clone();
        }
        if !v.is_empty() {
            let hi = if hi == u64::MAX {
                "+".to_string()
            } else {
                format!("-{hi}")
            };
            parts.push(format!(
                "{lo}{hi}: n={} p50 {} p99 {}",
                v.len(),
                f2(pct(&v, 0.5)),
                f2(pct(&v, 0.99))
            ));
        }
    }
    let verdict = if near.len() >= 20 {
        let p99 = pct(&near, 0.99);
        format!(
            "p99 {} ms over the {} protected epochs with 1500-2500 dirty pages -> {}",
            f2(p99),
            near.len(),
            if p99 <= PAUSE_TARGET_MS {
                "MET"
            } else {
                "MISSED"
            }
        )
    } else {
        format!(
            "NOT MEASURED: only {} protected epochs had 1500-2500 dirty pages (use --probe-epoch-ms)",
            near.len()
        )
    };
    let _ = writeln!(
        o,
        "- pause p99 <= {PAUSE_TARGET_MS} ms at ~{PAUSE_TARGET_PAGES} dirty pages/epoch: {verdict}"
    );
    let _ = writeln!(
        o,
        "  pause ms by dirty pages/epoch, all protected windows: {}",
        parts.join("; ")
    );
    match results
        .iter()
        .find(|r| r.case.rate == LAG_TARGET_RATE && !r.case.probe)
    {
        Some(r) => {
            let p = &r.prot;
            let _ = writeln!(
                o,
                "- lag bounded at {LAG_TARGET_RATE} pages/s (not growing over 60 s): slope {:+.3} ms/s over {:.0} s{} -> {}",
                p.lag_slope.unwrap_or(f64::NAN),
                p.lag_span,
                if p.lag_span < 59.0 {
                    " (window shorter than 60 s: use --seconds 60)"
                } else {
                    ""
                },
                match lag_grows(p, r.case.epoch_ms()) {
                    Some(false) => "MET",
                    Some(true) => "MISSED",
                    None => "?",
                }
            );
        }
        None => {
            let _ = writeln!(o, "- lag at {LAG_TARGET_RATE} pages/s: not run");
        }
    }
    let ratio = |r: &RateResult| r.prot.pages_per_s / r.base.pages_per_s;
    let ratios: Vec<String> = results
        .iter()
        .map(|r| {
            format!(
                "{} {:.2}{}",
                r.case.name(),
                ratio(r),
                if ratio(r) >= THROUGHPUT_TARGET {
                    ""
                } else {
                    " (below)"
                }
            )
        })
        .collect();
    let all_met = results.iter().all(|r| ratio(r) >= THROUGHPUT_TARGET);
    let _ = writeln!(
        o,
        "- guest throughput >= {THROUGHPUT_TARGET} x logging-only at the same epoch length: {} -> {}",
        ratios.join(", "),
        if all_met { "MET" } else { "MISSED" }
    );
    o
}

pub fn run(args: ProtectArgs) -> Result<i32> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        bail!(
            "bench protect needs KVM: /dev/kvm cannot be opened read-write ({e}); run it on a host \
             with /dev/kvm (and access to it)"
        );
    }
    if args.rates.is_empty() {
        bail!("--rates is empty");
    }
    let memory_bytes = parse_size_in("memory", &args.memory, MIN_MEMORY, MAX_MEMORY)?;
    let mix = match &args.mix {
        Some(m) => ContentMix::parse(m)?.to_string(),
        None => ContentMix::default().to_string(),
    };
    let mut cases: Vec<Case> = args
        .rates
        .iter()
        .map(|&rate| Case {
            rate,
            epoch: Duration::from_millis(args.epoch_ms),
            probe: false,
        })
        .collect();
    if args.probe_epoch_ms > 0 {
        cases.push(Case {
            rate: args.probe_rate,
            epoch: Duration::from_millis(args.probe_epoch_ms),
            probe: true,
        });
    }
    let dir = match &args.keep {
        Some(d) => d.clone(),
        None => {
            std::env::temp_dir().join(format!("understudy-bench-protect-{}", std::process::id()))
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let certs = dir.join("certs");
    let exe = std::env::current_exe().context("locating this executable")?;
    for a in [
        vec!["certs", "init", "--force", "--dir"],
        vec!["certs", "issue", "--name", "primary", "--dir"],
        vec!["certs", "issue", "--name", "backup", "--dir"],
    ] {
        let out = Command::new(&exe)
            .args(&a)
            .arg(&certs)
            .output()
            .context("running understudy certs")?;
        if !out.status.success() {
            bail!(
                "understudy {} failed: {}",
                a.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let setup = Setup {
        hz: clock_ticks_per_second(),
        memory_bytes,
        mix,
        dir: dir.clone(),
        certs,
        args,
    };
    // Refuse bad guest parameters before running anything.
    for c in &cases {
        setup.workload(c.rate)?;
    }
    let load_before = loadavg();
    eprintln!(
        "bench: {} cases x ({} s logging-only + {} s protected), load average {load_before}",
        cases.len(),
        setup.args.seconds,
        setup.args.seconds
    );
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for case in cases {
        eprintln!("bench: {}: logging-only reference", case.name());
        let base = match run_reference(&setup, case) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("bench:   failed: {e:#}");
                failures.push((case, format!("logging-only reference: {e:#}")));
                continue;
            }
        };
        eprintln!(
            "bench:   {:.0} pages/s, pause p99 {:.2} ms",
            base.pages_per_s, base.pause_ms.1
        );
        eprintln!(
            "bench: {}: protected (backup + primary processes)",
            case.name()
        );
        let prot = match run_protected(&setup, case) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("bench:   failed: {e:#}");
                failures.push((case, format!("protected run: {e:#}")));
                continue;
            }
        };
        eprintln!(
            "bench:   {:.0} pages/s, pause p99 {:.2} ms, commit p99 {:.2} ms{}",
            prot.pages_per_s,
            prot.pause_ms.1,
            prot.commit_ms.1,
            prot.ended_early
                .as_deref()
                .map_or(String::new(), |e| format!("; {e}"))
        );
        results.push(RateResult { case, base, prot });
    }
    print!("{}", report(&setup, &results, &failures, &load_before));
    if setup.args.keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("bench: logs and per-epoch CSVs kept in {}", dir.display());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text_and_tracing_lines() {
        let body = "# TYPE understudy_pause_seconds summary\n\
                    understudy_pause_seconds{quantile=\"0.5\"} 0.0001\n\
                    understudy_pause_seconds{quantile=\"0.99\"} 0.0012\n\
                    understudy_pause_seconds_sum 0.5\n\
                    understudy_pages_total{kind=\"zero\"} 10\n\
                    understudy_pages_total{kind=\"full\"} 5\n\
                    understudy_last_committed_epoch 42\n";
        let m = Scrape::parse(body);
        assert_eq!(m.sum("understudy_pages_total"), Some(15.0));
        assert_eq!(m.sum("understudy_last_committed_epoch"), Some(42.0));
        assert_eq!(
            m.labelled("understudy_pause_seconds", "quantile=\"0.99\""),
            Some(0.0012)
        );
        assert_eq!(m.sum("understudy_absent"), None);

        let line = "2026-11-22T04:20:21.123456Z DEBUG understudy_primary::capture: captured epoch=5 pages=123 pause_us=456";
        assert_eq!(field(line, "pages"), Some(123));
        assert_eq!(field(line, "pause_us"), Some(456));
        let ns = parse_rfc3339_utc("1970-01-02T00:00:01.5Z").unwrap();
        assert_eq!(ns, 86_401_500_000_000);
        assert_eq!(
            parse_rfc3339_utc("2026-11-22T04:20:21.123456Z").unwrap() % 1_000_000_000,
            123_456_000
        );
        assert_eq!(strip_ansi("\u{1b}[2mepoch\u{1b}[0m=5"), "epoch=5");
    }

    #[test]
    fn statistics() {
        let v = sorted((1..=100).map(f64::from).collect());
        assert_eq!(pct(&v, 0.5), 50.0);
        assert_eq!(pct(&v, 0.99), 99.0);
        assert_eq!(pct(&v, 1.0), 100.0);
        let (a, b) = fit(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]).unwrap();
        assert!((a - 1.0).abs() < 1e-9 && (b - 2.0).abs() < 1e-9);
    }
}
