//! `understudy bench migrate`: our migration algorithms next to QEMU's, on the same guest, memory
//! size, working set and dirty rate, measured in the same invocation.
//!
//! The guest is QEMU's reference guest (`shared/anchors/qemu/bare/`, a multiboot v1 image):
//! it fills `mib` MiB with random data, then dirties `rate` pages/s (one word per page) and every
//! second prints `MD t=.. dirtied=.. rate=.. maxgap_ms=..` on COM1, where `maxgap_ms` is the
//! longest gap between two of its 1 ms ticks: the stall the guest itself saw.
//!
//! Per rate, in this order:
//! 1. **Ours**, per algorithm: a real `understudy backup --once` is the destination and
//!    `understudy primary --admin .. --guest-image IMG --cmdline ..` without `--backup` the
//!    source (this executable, separate processes): the source boots the reference guest and
//!    runs it until it is moved. After
//!    `--warm` s of workload, `understudy migrate --admin .. --algorithm A --to .. --json`
//!    (a separate process) moves it; an algorithm whose `migrate` only starts the move (quick
//!    eviction) gets `understudy evict --admin .. --json` once `--snapshots-for` s of background
//!    snapshots followed the full sync. The destination then runs `--after` s.
//! 2. **QEMU**, per mode: `python3 migrate.py --rates R --modes M --repeats 1` with the same
//!    memory, working set, warm-up and after-time; its JSON line and both serial consoles
//!    (`$ANCHOR_WORK/run/{src,dst}.serial`, rewritten by every run) are read afterwards.
//!
//! The five properties, computed the same way for both systems where both can be:
//! - downtime: ours = the report's `downtime_ms` (guest paused on the source to the
//!   destination's "running" reaching the source); QEMU's = its `downtime`;
//! - guest-seen stall: the largest `maxgap_ms` on the MD lines "around the move": the source's
//!   lines printed after the move was asked for, and the destination's lines up to the first
//!   one whose guest time `t` is past the move's end (guest time of the last line before the
//!   move + the move's wall time + 1 s). For quick eviction the move starts with `migrate` (the
//!   full sync and the background snapshots count); the notes add the stall from the eviction
//!   request on, computed the same way from the lines printed after it;
//! - eviction / total migration time: ours = the report's `eviction_ms` (precopy: the request to
//!   the source's VM being gone, i.e. the whole move; quick eviction: from the eviction request);
//!   QEMU's = its `total-time`;
//! - bytes on the wire: ours = the report's `wire_bytes`, QEMU's = `ram.transferred` (MB = 1e6);
//! - guest slowdown: the mean `rate=` of the lines around the move over the median `rate=` of the
//!   lines before it (1.00 = no slowdown); `-` at rate 0 (nothing to measure). A guest whose
//!   median before the move is below 90% of its rate (a busy host) is flagged in the notes;
//! - robustness: would one host's failure during the move lose the VM: ours = the report's
//!   `vm_lost_if_a_host_fails`; QEMU precopy-like modes keep the VM on the source until the end,
//!   postcopy splits it between the hosts.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use understudy_vmm::guests::parse_size_in;
use understudy_vmm::memory::{MAX_MEMORY, MIN_MEMORY};

/// The primary's default pages per full-sync epoch (`--sync-batch`).
const SYNC_BATCH: u32 = 16384;
/// Target 1: quick eviction's eviction time at most this share of QEMU precopy's total time.
const EVICTION_SHARE: f64 = 0.1;

#[derive(Args, Debug)]
pub struct MigrateBenchArgs {
    /// Guest dirty rates in pages/s, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,10000,30000")]
    rates: Vec<u64>,
    /// Our algorithms (names as `understudy migrate --algorithm` takes them); empty = QEMU only.
    #[arg(long, value_delimiter = ',', default_value = "precopy,quick-eviction")]
    algorithms: Vec<String>,
    /// QEMU's modes (as `migrate.py --modes` takes them); empty = ours only.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "precopy,multifd-zstd,xbzrle,postcopy"
    )]
    qemu_modes: Vec<String>,
    /// Guest memory, both systems (K/M/G suffixes).
    #[arg(long, default_value = "1G")]
    memory: String,
    /// Guest working set in MiB (filled with random data, then dirtied), both systems.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=4096))]
    working_set_mib: u64,
    /// Seconds of workload after READY before the move, both systems.
    #[arg(long, default_value_t = 3.0)]
    warm: f64,
    /// Seconds the destination runs after the move, both systems.
    #[arg(long, default_value_t = 2.5)]
    after: f64,
    /// Quick eviction: seconds of background snapshots after the full sync before the eviction.
    /// Quick eviction ships snapshots continuously, long before an eviction is asked for; the
    /// default lets the rounds after the sync (which at 30k pages/s carry most of the working
    /// set) settle at their steady interval, so that the eviction is measured as in service.
    #[arg(long, default_value_t = 8.0)]
    snapshots_for: f64,
    /// The reference guest; default `$ANCHOR_WORK/bare/bare64.elf` (built by the anchor's
    /// setup.sh; ANCHOR_WORK defaults to /tmp/understudy-anchor-qemu).
    #[arg(long)]
    guest_image: Option<PathBuf>,
    /// The QEMU anchor's directory (holds migrate.py).
    #[arg(long, default_value = "/work/shared/anchors/qemu")]
    anchor: PathBuf,
    /// QEMU's `-cpu`: migrate.py passes `-cpu host`, which QEMU 7.2 cannot start with on this
    /// kernel (it fails to set MSR 0x10a, IA32_ARCH_CAPABILITIES); anything else is put in its
    /// place by a `qemu-system-x86_64` wrapper first on migrate.py's PATH.
    #[arg(long, default_value = "host,-arch-capabilities")]
    qemu_cpu: String,
    /// Ours: both ends' --failure-timeout in ms (silence after which the peer is declared
    /// failed; a full sync of incompressible memory on 2 busy cores can starve heartbeats
    /// for more than the default 300 ms).
    #[arg(long, default_value_t = 2000)]
    failure_timeout_ms: u64,
    /// Seconds before a move (either system) is given up.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Keep every run's logs and consoles in this directory.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Also print every row as a JSON line (after the table).
    #[arg(long)]
    json: bool,
}

// ---------------------------------------------------------------------------------------------
// The guest's console.

/// One `MD t=.. dirtied=.. rate=.. maxgap_ms=..` line.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
struct Md {
    t: f64,
    dirtied: u64,
    rate: f64,
    maxgap_ms: f64,
}

/// Every complete MD line of a console, in order, with the offset just past its text (lines
/// without `t=` are not MD lines).
fn md_lines_at(console: &str) -> Vec<(usize, Md)> {
    let mut out = Vec::new();
    let mut start = 0;
    for line in console.split_inclusive('\n') {
        start += line.len();
        let Some(i) = line.find("MD t=") else {
            continue;
        };
        let mut md = (None, None, None, None);
        for kv in line[i + 3..].split_whitespace() {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            match k {
                "t" => md.0 = v.parse().ok(),
                "dirtied" => md.1 = v.parse().ok(),
                "rate" => md.2 = v.parse().ok(),
                "maxgap_ms" => md.3 = v.parse().ok(),
                _ => {}
            }
        }
        if let (Some(t), Some(dirtied), Some(rate), Some(maxgap_ms)) = md {
            let end = start - (line.len() - line.trim_end().len());
            out.push((
                end,
                Md {
                    t,
                    dirtied,
                    rate,
                    maxgap_ms,
                },
            ));
        }
    }
    out
}

fn md_lines(console: &str) -> Vec<Md> {
    md_lines_at(console).into_iter().map(|(_, m)| m).collect()
}

/// What the guest saw of a move.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct GuestSeen {
    /// Largest `maxgap_ms` around the move.
    stall_ms: Option<f64>,
    /// Mean `rate=` around the move over `rate_before`.
    slowdown: Option<f64>,
    /// Median `rate=` of the lines before the move.
    rate_before: Option<f64>,
    /// MD lines around the move (source, destination).
    lines: (usize, usize),
}

/// `src` and `dst` are the two consoles (what an observer sees is the one, then the other: a
/// line the guest was writing at the pause starts on the source and ends on the destination);
/// `before` = MD lines on the source when the move was asked for; `move_s` = the move's wall
/// time.
fn guest_seen(src: &str, dst: &str, before: usize, move_s: f64) -> GuestSeen {
    let all = md_lines_at(&format!("{src}{dst}"));
    let last_before = before.checked_sub(1).and_then(|i| all.get(i)).map(|m| m.1);
    let during = all.get(before..).unwrap_or(&[]);
    let n_src = during.iter().take_while(|m| m.0 <= src.len()).count();
    // Destination lines up to the first one past the move's end (at least one).
    let end_t = last_before.map_or(f64::INFINITY, |l| l.t + move_s + 1.0);
    let n_dst = during[n_src..]
        .iter()
        .take_while(|m| m.1.t <= end_t)
        .count()
        .saturating_add(1)
        .min(during.len() - n_src);
    let during: Vec<Md> = during[..n_src + n_dst].iter().map(|m| m.1).collect();
    let stall_ms = during.iter().map(|m| m.maxgap_ms).reduce(f64::max);
    let mut pre: Vec<f64> = all[..before.min(all.len())]
        .iter()
        .map(|m| m.1.rate)
        .collect();
    pre.sort_by(f64::total_cmp);
    let rate_before = pre.get(pre.len() / 2).copied();
    let slowdown = match rate_before {
        Some(r) if r > 0.0 && !during.is_empty() => {
            Some(during.iter().map(|m| m.rate).sum::<f64>() / during.len() as f64 / r)
        }
        _ => None,
    };
    GuestSeen {
        stall_ms,
        slowdown,
        rate_before,
        lines: (n_src, n_dst),
    }
}

// ---------------------------------------------------------------------------------------------
// Rows.

#[derive(Clone, Debug, Default, Serialize)]
struct Row {
    rate: u64,
    /// "understudy" or "qemu".
    system: &'static str,
    algorithm: String,
    ok: bool,
    downtime_ms: Option<f64>,
    #[serde(flatten)]
    seen: GuestSeen,
    /// Eviction (quick eviction) or total migration time.
    time_ms: Option<f64>,
    /// "eviction" or "total".
    time_kind: &'static str,
    /// Ours: the request to the end of the eviction, background snapshots included.
    whole_move_ms: Option<f64>,
    wire_bytes: Option<u64>,
    vm_lost_if_a_host_fails: Option<bool>,
    /// Rounds (ours), dirty syncs (QEMU), errors.
    note: String,
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v < 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
        None => "-".into(),
    }
}

fn mb(v: Option<u64>) -> String {
    v.map_or("-".into(), |b| format!("{:.0}", b as f64 / 1e6))
}

fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| pages/s | system / algorithm | downtime ms | guest-seen stall ms | eviction / total migration ms | MB on the wire | guest slowdown (rate during / before) | VM lost if a host fails during the move | notes |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let time = match (r.time_ms, r.whole_move_ms) {
            (Some(t), Some(w)) if r.time_kind == "eviction" => {
                format!("{} eviction ({} from `migrate`)", ms(Some(t)), ms(Some(w)))
            }
            (Some(t), _) => format!("{} {}", ms(Some(t)), r.time_kind),
            (None, _) => "-".into(),
        };
        let robust = match r.vm_lost_if_a_host_fails {
            Some(false) => "no (source keeps the VM)",
            Some(true) => "yes",
            None => "-",
        };
        let slow_before = match r.seen.rate_before {
            Some(b) if r.rate > 0 && b < 0.9 * r.rate as f64 => {
                format!("; guest at {b:.0} pages/s before the move (host busy)")
            }
            _ => String::new(),
        };
        let _ = writeln!(
            t,
            "| {} | {} {} | {} | {} | {} | {} | {} | {} | {}{}{} |",
            r.rate,
            if r.system == "qemu" {
                "QEMU"
            } else {
                "Understudy"
            },
            r.algorithm,
            ms(r.downtime_ms),
            ms(r.seen.stall_ms),
            time,
            mb(r.wire_bytes),
            r.seen.slowdown.map_or("-".into(), |s| format!("{s:.2}")),
            robust,
            if r.ok { "" } else { "FAILED: " },
            r.note.replace('|', "/"),
            slow_before,
        );
    }
    t
}

/// The three targets at one rate, as lines.
fn targets(rate: u64, rows: &[Row]) -> Vec<String> {
    let find = |system: &str, alg: &str| {
        rows.iter()
            .find(|r| r.rate == rate && r.system == system && r.algorithm == alg && r.ok)
    };
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "ok",
        Some(false) => "MISS",
        None => "n/a",
    };
    let (qe, op, qp) = (
        find("understudy", "quick-eviction"),
        find("understudy", "precopy"),
        find("qemu", "precopy"),
    );
    let mut out = Vec::new();
    let ev = qe.and_then(|r| r.time_ms);
    let total = qp.and_then(|r| r.time_ms);
    out.push(format!(
        "rate {rate}: quick-eviction eviction {} ms <= 1/10 of QEMU precopy total {} ms ({} ms): {}",
        ms(ev),
        ms(total),
        ms(total.map(|t| t * EVICTION_SHARE)),
        verdict(ev.zip(total).map(|(e, t)| e <= t * EVICTION_SHARE)),
    ));
    let (a, b) = (
        qe.and_then(|r| r.seen.stall_ms),
        qp.and_then(|r| r.seen.stall_ms),
    );
    out.push(format!(
        "rate {rate}: quick-eviction guest-seen stall {} ms <= QEMU precopy's {} ms: {}",
        ms(a),
        ms(b),
        verdict(a.zip(b).map(|(a, b)| a <= b)),
    ));
    let (a, b) = (op.and_then(|r| r.wire_bytes), qp.and_then(|r| r.wire_bytes));
    out.push(format!(
        "rate {rate}: our precopy {} MB on the wire <= QEMU precopy's {} MB: {}",
        mb(a),
        mb(b),
        verdict(a.zip(b).map(|(a, b)| a <= b)),
    ));
    out
}

// ---------------------------------------------------------------------------------------------
// Child processes and consoles.

/// Text that grows while a thread or the VM writes it.
#[derive(Clone, Default)]
struct Text(Arc<Mutex<String>>);

impl Text {
    fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn push(&self, s: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push_str(s);
    }

    /// Waits until the text holds `needle`, or fails after `timeout`.
    fn wait_for(&self, needle: &str, timeout: Duration, what: &str) -> Result<()> {
        let t = Instant::now();
        while !self.get().contains(needle) {
            if t.elapsed() > timeout {
                bail!("{what}: no {needle:?} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Write for Text {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.push(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn pump(from: impl Read + Send + 'static, into: Text) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            into.push(&line);
            into.push("\n");
        }
    })
}

/// A child of this executable whose stdout and stderr are kept; killed when dropped.
struct Proc {
    child: Child,
    out: Text,
    err: Text,
}

impl Proc {
    fn spawn(args: &[&str]) -> Result<Self> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut child = Command::new(&exe)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} {}", exe.display(), args.join(" ")))?;
        let (out, err) = (Text::default(), Text::default());
        pump(child.stdout.take().context("stdout")?, out.clone());
        pump(child.stderr.take().context("stderr")?, err.clone());
        Ok(Proc { child, out, err })
    }

    /// SIGINT, then SIGKILL after `grace`.
    fn stop(&mut self, grace: Duration) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let t = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if t.elapsed() > grace {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs this executable with `args` to completion: (success, stdout, stderr).
fn run_self(args: &[&str]) -> Result<(bool, String, String)> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let out = Command::new(&exe)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} {}", exe.display(), args.join(" ")))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn free_udp() -> Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

fn free_tcp() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn save(dir: Option<&Path>, name: &str, text: &str) {
    if let Some(d) = dir {
        let _ = std::fs::write(d.join(name), text);
    }
}

// ---------------------------------------------------------------------------------------------
// Ours.

struct Setup {
    memory: u64,
    cmdline_of: Box<dyn Fn(u64) -> String>,
    /// The reference guest (checked readable before the runs).
    image_path: PathBuf,
    certs: PathBuf,
    /// Holds the `qemu-system-x86_64` wrapper (see `--qemu-cpu`).
    wrapper_dir: PathBuf,
    args: MigrateBenchArgs,
}

/// The source: `understudy primary` without a backup (it runs the VM until it is moved), booting
/// the reference guest with `--guest-image`, with an admin endpoint for `migrate` and `evict`.
fn spawn_source(s: &Setup, rate: u64, admin: SocketAddr) -> Result<Proc> {
    let certs = s.certs.display().to_string();
    let admin = admin.to_string();
    let image = s.image_path.display().to_string();
    let cmdline = (s.cmdline_of)(rate);
    let memory = format!("{}M", s.memory >> 20);
    let ft = format!("{}ms", s.args.failure_timeout_ms);
    let batch = SYNC_BATCH.to_string();
    Proc::spawn(&[
        "primary",
        "--certs",
        &certs,
        "--admin",
        &admin,
        "--guest-image",
        &image,
        "--cmdline",
        &cmdline,
        "--memory",
        &memory,
        "--failure-timeout",
        &ft,
        "--heartbeat-interval",
        "50ms",
        "--encode-threads",
        "2",
        "--sync-batch",
        &batch,
        // Long enough for `migrate` / `evict` to fetch the report; the bench waits for the
        // report line and then stops the process itself.
        "--linger-after-move",
        "5s",
    ])
}

fn ours(s: &Setup, rate: u64, algorithm: &str, keep: Option<&Path>) -> Row {
    let mut row = Row {
        rate,
        system: "understudy",
        algorithm: algorithm.into(),
        time_kind: "total",
        ..Row::default()
    };
    let tag = format!("ours-{algorithm}-r{rate}");
    let mut src = None;
    let mut dst = None;
    let r = ours_inner(s, rate, algorithm, &mut row, &mut src, &mut dst);
    if let Err(e) = r {
        row.ok = false;
        row.note = format!("{e:#}");
    }
    for (side, p) in [("src", src), ("dst", dst)] {
        if let Some(mut p) = p {
            p.stop(Duration::from_secs(5));
            save(keep, &format!("{tag}-{side}.log"), &p.err.get());
            save(keep, &format!("{tag}-{side}.console"), &p.out.get());
        }
    }
    row
}

fn ours_inner(
    s: &Setup,
    rate: u64,
    algorithm: &str,
    row: &mut Row,
    src_slot: &mut Option<Proc>,
    dst_slot: &mut Option<Proc>,
) -> Result<()> {
    let timeout = Duration::from_secs_f64(s.args.timeout);
    let to = free_udp()?.to_string();
    let certs = s.certs.display().to_string();
    let ft = format!("{}ms", s.args.failure_timeout_ms);
    let dst = dst_slot.insert(Proc::spawn(&[
        "backup",
        "--certs",
        &certs,
        "--listen",
        &to,
        "--once",
        "--failure-timeout",
        &ft,
    ])?);
    dst.err.wait_for(
        "backup listening",
        Duration::from_secs(20),
        "the destination",
    )?;
    let admin = free_tcp()?;
    let src = src_slot.insert(spawn_source(s, rate, admin)?);
    let src_console = src.out.clone();
    src_console.wait_for("READY", Duration::from_secs(120), "the guest")?;
    std::thread::sleep(Duration::from_secs_f64(s.args.warm));
    let before = md_lines(&src_console.get()).len();
    let admin_s = admin.to_string();
    let asked = Instant::now();
    // Quick eviction: MD lines and the clock when the eviction (not the move) was asked for.
    let mut evicted: Option<(usize, Instant)> = None;
    let (ok, out, err) = run_self(&[
        "migrate",
        "--admin",
        &admin_s,
        "--algorithm",
        algorithm,
        "--to",
        &to,
        "--json",
    ])?;
    let report: serde_json::Value = match serde_json::from_str(&out) {
        Ok(v) => v,
        Err(_) if ok => {
            // The move started in the background (quick eviction): snapshots until told.
            src.err
                .wait_for("full sync sent", timeout, "the source's full sync")?;
            std::thread::sleep(Duration::from_secs_f64(s.args.snapshots_for));
            evicted = Some((md_lines(&src_console.get()).len(), Instant::now()));
            let (_, out, err) = run_self(&["evict", "--admin", &admin_s, "--json"])?;
            serde_json::from_str(&out).with_context(|| format!("evict said: {out}{err}"))?
        }
        Err(_) => bail!("migrate said: {out}{err}"),
    };
    let whole = asked.elapsed();
    let f = |k: &str| report[k].as_f64();
    row.ok = report["ok"].as_bool().unwrap_or(false);
    row.downtime_ms = f("downtime_ms");
    row.time_ms = f("eviction_ms");
    if report["rounds"].is_u64() && algorithm != "precopy" {
        row.time_kind = "eviction";
    }
    row.whole_move_ms = Some(whole.as_secs_f64() * 1e3);
    row.wire_bytes = report["wire_bytes"].as_u64();
    row.vm_lost_if_a_host_fails = report["vm_lost_if_a_host_fails"].as_bool();
    let tail = match report["tail_pages"].as_u64() {
        Some(t) => format!(", after a live tail of {t}"),
        None => String::new(),
    };
    row.note = format!(
        "{} rounds, {} final pages{tail}, {} pages as deltas; destination setup {} ms",
        report["rounds"],
        report["final_pages"],
        report["delta_pages"],
        ms(destination_setup_ms(&dst.err.get())),
    );
    if !row.ok {
        row.note = format!("{}; {}", report["message"], row.note);
        return Ok(());
    }
    // The source lets go of the VM once the destination runs it, then logs the report.
    src.err.wait_for(
        "move report",
        Duration::from_secs(30),
        "the source's move report",
    )?;
    std::thread::sleep(Duration::from_secs_f64(s.args.after));
    row.seen = guest_seen(
        &src_console.get(),
        &dst.out.get(),
        before,
        whole.as_secs_f64(),
    );
    if let Some((lines, at)) = evicted {
        // The stall column covers the whole move (full sync and background snapshots too);
        // this is the part from the eviction request on, for the notes.
        let e = guest_seen(
            &src_console.get(),
            &dst.out.get(),
            lines,
            (at.elapsed().as_secs_f64() - s.args.after).max(0.0),
        );
        row.note = format!(
            "{}; stall from the eviction request on {} ms",
            row.note,
            ms(e.stall_ms)
        );
    }
    Ok(())
}

/// The destination's "primary connected" to "session accepted" (it allocates the image before
/// it accepts; part of the move's time), from its log's RFC 3339 timestamps.
fn destination_setup_ms(log: &str) -> Option<f64> {
    let at = |needle: &str| {
        let line = log.lines().find(|l| l.contains(needle))?;
        let ts = line.split_whitespace().next()?;
        // 2026-11-30T16:35:35.681604Z: seconds of the day are enough (a move is short).
        let hms = ts.split('T').nth(1)?.trim_end_matches('Z');
        let mut p = hms.split(':');
        let (h, m, s): (f64, f64, f64) = (
            p.next()?.parse().ok()?,
            p.next()?.parse().ok()?,
            p.next()?.parse().ok()?,
        );
        Some(h * 3600.0 + m * 60.0 + s)
    };
    let (a, b) = (at("primary connected")?, at("session accepted")?);
    Some(((b - a).rem_euclid(86400.0)) * 1e3)
}

// ---------------------------------------------------------------------------------------------
// QEMU.

/// A directory with a `qemu-system-x86_64` that runs the real one with `-cpu cpu` in place of
/// `-cpu host`, to put first on migrate.py's PATH.
fn qemu_wrapper(dir: &Path, cpu: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let real = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("qemu-system-x86_64"))
                .find(|q| q.is_file())
        })
        .context("qemu-system-x86_64 is not on PATH; run the anchor's setup.sh")?;
    let path = dir.join("qemu-system-x86_64");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n# understudy bench migrate: -cpu host -> -cpu {cpu}\nfor a in \"$@\"; do\n  shift\n  if [ \"$prev\" = -cpu ] && [ \"$a\" = host ]; then a='{cpu}'; fi\n  set -- \"$@\" \"$a\"\n  prev=$a\ndone\nexec '{}' \"$@\"\n",
            real.display()
        ),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn anchor_work() -> PathBuf {
    std::env::var_os("ANCHOR_WORK")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/understudy-anchor-qemu"))
}

fn qemu(s: &Setup, rate: u64, mode: &str, keep: Option<&Path>, out_file: &Path) -> Row {
    let mut row = Row {
        rate,
        system: "qemu",
        algorithm: mode.into(),
        time_kind: "total",
        ..Row::default()
    };
    if let Err(e) = qemu_inner(s, rate, mode, &mut row, keep, out_file) {
        row.ok = false;
        row.note = format!("{e:#}");
    }
    row
}

fn qemu_inner(
    s: &Setup,
    rate: u64,
    mode: &str,
    row: &mut Row,
    keep: Option<&Path>,
    out_file: &Path,
) -> Result<()> {
    let _ = std::fs::remove_file(out_file);
    let script = s.args.anchor.join("migrate.py");
    let mut cmd = Command::new("python3");
    if s.args.qemu_cpu != "host" {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(s.wrapper_dir.clone()).chain(std::env::split_paths(&path));
        cmd.env("PATH", std::env::join_paths(dirs)?);
    }
    let out = cmd
        .arg(&script)
        .args(["--guest", "bare", "--repeats", "1"])
        .args(["--rates", &rate.to_string(), "--modes", mode])
        .args(["--mem", &(s.memory >> 20).to_string()])
        .args(["--mib", &s.args.working_set_mib.to_string()])
        .args(["--warm", &s.args.warm.to_string()])
        .args(["--after", &s.args.after.to_string()])
        .args(["--timeout", &s.args.timeout.to_string()])
        .arg("--out")
        .arg(out_file)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running python3 {}", script.display()))?;
    let text = std::fs::read_to_string(out_file).with_context(|| {
        format!(
            "migrate.py wrote no results: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let line = text
        .lines()
        .last()
        .context("migrate.py wrote an empty file")?;
    let v: serde_json::Value = serde_json::from_str(line).context("migrate.py's JSON line")?;
    let run = anchor_work().join("run");
    let read = |n: &str| {
        std::fs::read(run.join(n))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let (src, dst) = (read("src.serial"), read("dst.serial"));
    let tag = format!("qemu-{mode}-r{rate}");
    save(keep, &format!("{tag}.json"), line);
    save(keep, &format!("{tag}-src.console"), &src);
    save(keep, &format!("{tag}-dst.console"), &dst);
    row.ok = v["status"].as_str() == Some("completed");
    row.downtime_ms = v["downtime"].as_f64();
    row.time_ms = v["total-time"].as_f64();
    row.wire_bytes = v["ram_transferred"].as_u64();
    row.vm_lost_if_a_host_fails = Some(mode == "postcopy");
    row.note = format!("{} dirty syncs", v["ram_dirty-sync-count"]);
    if let Some(e) = v["error"].as_str() {
        row.note = format!("{e}; {}", row.note);
    }
    if row.ok {
        let before = v["src_md_lines_before"].as_u64().unwrap_or(0) as usize;
        let move_s = v["wall_s"].as_f64().unwrap_or(0.0);
        row.seen = guest_seen(&src, &dst, before, move_s);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn shell(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub fn run(args: MigrateBenchArgs) -> Result<i32> {
    let memory =
        parse_size_in("memory", &args.memory, MIN_MEMORY, MAX_MEMORY).context("bad --memory")?;
    if args.working_set_mib + 16 > memory >> 20 {
        bail!(
            "--working-set-mib {} does not fit in --memory {} (the guest fills from 16 MiB)",
            args.working_set_mib,
            args.memory
        );
    }
    let image_path = args
        .guest_image
        .clone()
        .unwrap_or_else(|| anchor_work().join("bare/bare64.elf"));
    std::fs::metadata(&image_path).with_context(|| {
        format!(
            "reading the reference guest {}; build it with {}/setup.sh",
            image_path.display(),
            args.anchor.display()
        )
    })?;
    let tmp = tempfile::tempdir().context("a temporary directory")?;
    let keep = args.keep.clone();
    if let Some(k) = &keep {
        std::fs::create_dir_all(k).with_context(|| format!("creating {}", k.display()))?;
    }
    let certs = tmp.path().join("certs");
    let c = certs.display().to_string();
    for a in [
        vec!["certs", "init", "--dir", &c],
        vec!["certs", "issue", "--dir", &c, "--name", "primary"],
        vec!["certs", "issue", "--dir", &c, "--name", "backup"],
    ] {
        let (ok, out, err) = run_self(&a)?;
        if !ok {
            bail!("understudy {}: {out}{err}", a.join(" "));
        }
    }
    let mib = args.working_set_mib;
    let wrapper_dir = tmp.path().join("bin");
    std::fs::create_dir_all(&wrapper_dir)?;
    if !args.qemu_modes.iter().all(|m| m.is_empty()) && args.qemu_cpu != "host" {
        qemu_wrapper(&wrapper_dir, &args.qemu_cpu)?;
    }
    let setup = Setup {
        memory,
        // As migrate.py's guest_args: the same command line for both systems.
        cmdline_of: Box::new(move |rate| format!("mib={mib} rate={rate} tsc_mhz=2600 mode=word")),
        image_path: image_path.clone(),
        certs,
        wrapper_dir,
        args,
    };
    let a = &setup.args;
    println!(
        "understudy bench migrate: {} UTC, git {}; guest {} (`mib={mib} rate=R tsc_mhz=2600 mode=word`), memory {}, working set {mib} MiB, 1 vCPU, loopback; warm {} s, after {} s; ours: --failure-timeout {} ms; QEMU: -cpu {}; load average before: {}",
        shell("date", &["-u", "+%Y-%m-%d %H:%M"]),
        shell(
            "git",
            &["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short", "HEAD"]
        ),
        image_path.display(),
        a.memory,
        a.warm,
        a.after,
        a.failure_timeout_ms,
        a.qemu_cpu,
        loadavg(),
    );
    let qemu_out = tmp.path().join("qemu.jsonl");
    let mut rows = Vec::new();
    for &rate in &a.rates {
        for alg in a.algorithms.iter().filter(|a| !a.is_empty()) {
            eprintln!("bench migrate: rate {rate}: understudy {alg} ...");
            let r = ours(&setup, rate, alg, keep.as_deref());
            eprintln!("  {r:?}");
            rows.push(r);
        }
        for mode in a.qemu_modes.iter().filter(|m| !m.is_empty()) {
            eprintln!("bench migrate: rate {rate}: QEMU {mode} ...");
            let r = qemu(&setup, rate, mode, keep.as_deref(), &qemu_out);
            eprintln!("  {r:?}");
            rows.push(r);
        }
    }
    println!("load average after: {}\n", loadavg());
    print!("{}", table(&rows));
    println!();
    for &rate in &a.rates {
        for l in targets(rate, &rows) {
            println!("{l}");
        }
    }
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    }
    Ok(if rows.iter().all(|r| r.ok) { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "BOOTED bare\nMD fill done mib=200 ms=204\nREADY\n\
        MD t=1.000 dirtied=10000 rate=10000 maxgap_ms=9.0\n\
        MD t=2.000 dirtied=20000 rate=10000 maxgap_ms=8.0\n\
        MD t=3.000 dirtied=29000 rate=9000 maxgap_ms=40.0\nMD t=4.0";
    const DST: &str = "00 dirtied=37000 rate=8000 maxgap_ms=120.5\n\
        MD t=5.000 dirtied=47000 rate=10000 maxgap_ms=7.0\n\
        MD t=9.000 dirtied=87000 rate=10000 maxgap_ms=300.0\n";

    #[test]
    fn md_lines_skip_other_lines() {
        let m = md_lines(SRC);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[2],
            Md {
                t: 3.0,
                dirtied: 29000,
                rate: 9000.0,
                maxgap_ms: 40.0
            }
        );
    }

    #[test]
    fn the_line_split_between_consoles_counts_once() {
        // Two lines before the move; it took 1.5 s: destination lines up to t = 2 + 1.5 + 1
        // count, and the first one past that.
        let g = guest_seen(SRC, DST, 2, 1.5);
        // t=3 on the source; t=4 (split between the consoles) and t=5 on the destination.
        assert_eq!(g.lines, (1, 2));
        assert_eq!(g.stall_ms, Some(120.5));
        assert_eq!(g.rate_before, Some(10000.0));
        let want = (9000.0 + 8000.0 + 10000.0) / 3.0 / 10000.0;
        assert!((g.slowdown.unwrap() - want).abs() < 1e-9);
    }

    #[test]
    fn no_slowdown_at_rate_zero() {
        let src = "MD t=1.000 dirtied=0 rate=0 maxgap_ms=1.0\n";
        let dst = "MD t=2.000 dirtied=0 rate=0 maxgap_ms=30.0\n";
        let g = guest_seen(src, dst, 1, 0.5);
        assert_eq!(g.slowdown, None);
        assert_eq!(g.stall_ms, Some(30.0));
    }

    #[test]
    fn destination_setup_from_the_log() {
        let log = "2026-11-30T16:35:35.681604Z  INFO understudy_backup::session: primary connected peer=\"primary\"\n\
            2026-11-30T16:35:47.041664Z  INFO understudy_backup::session: session accepted version=2\n";
        let ms = destination_setup_ms(log).unwrap();
        assert!((ms - 11360.06).abs() < 0.01, "{ms}");
    }

    #[test]
    fn targets_compare_the_named_rows() {
        let row = |system, alg: &str, time, stall, wire| Row {
            rate: 10,
            system,
            algorithm: alg.into(),
            ok: true,
            time_ms: Some(time),
            seen: GuestSeen {
                stall_ms: Some(stall),
                ..Default::default()
            },
            wire_bytes: Some(wire),
            ..Row::default()
        };
        let rows = [
            row("understudy", "quick-eviction", 15.0, 20.0, 1),
            row("understudy", "precopy", 900.0, 50.0, 600),
            row("qemu", "precopy", 1800.0, 46.0, 615),
        ];
        let t = targets(10, &rows);
        assert!(t[0].ends_with(": ok"), "{}", t[0]);
        assert!(t[1].ends_with(": ok"), "{}", t[1]);
        assert!(t[2].ends_with(": ok"), "{}", t[2]);
        let t = targets(10, &rows[1..]);
        assert!(t[0].ends_with(": n/a"), "{}", t[0]);
    }
}
