//! Partition tests: a witness, a backup and a primary (ledger guest) run as `understudy`
//! processes, each in its own network namespace; the namespaces hang off a bridge in a fourth
//! one. After the ledger ran protected for a while, nftables rules inside the namespaces drop
//! UDP between two of them (both directions), and the test watches what happens. One test per
//! cut: primary|backup, primary|witness, backup|witness, primary|both.
//!
//! What every test asserts (whatever side ends up running):
//! 1. **Exactly one copy runs at the end**: either the primary's guest is still running and the
//!    backup did not promote, or the primary's guest stopped and the promoted one runs.
//! 2. **It never ran twice at once**, checked twice:
//!    - *From the console streams* (what an outside observer sees). Every stdout line is
//!      timestamped when it arrives here. A tick reaches us only after the guest produced it:
//!      while protected, the primary releases epoch E's console output when the backup
//!      acknowledged E, so the release lags the guest by an epoch or two plus a round trip
//!      (output that is never released is never seen, which is the point of output commit);
//!      unprotected, it lags by nothing but the pipe. So if the
//!      primary's last released tick arrived before the backup's promotion began (the
//!      `promoted:` log line's own timestamp minus the logged promotion time, and before the
//!      first console line the backup wrote), every tick the outside saw from the primary's
//!      guest was produced before the promoted guest existed, and the promoted guest's ticks
//!      all come after it: the two console intervals do not overlap.
//!    - *From the guests' execution* (stricter: held output is invisible on the console, yet a
//!      guest that runs on while its twin runs is split brain all the same). A sampler reads the
//!      CPU time of each process's `vcpuN` threads (`/proc/PID/task/TID/schedstat`) every few
//!      ms; the last sampling interval in which the primary's vCPUs ran must end before the
//!      first interval in which the backup's (promoted) vCPUs ran after the cut.
//! 3. The ledger never printed `CORRUPT`, and the ticks seen from outside (the primary's
//!    released console, then the backup's) are each exactly once and in order from 1.
//!
//! Each test prints which side ended up running, with the times of the events that matter
//! (run with `--nocapture` to see them). What side *should* run follows from the majority rule
//! (primary|backup: the primary, which still reaches the witness; primary|witness and
//! backup|witness: the primary; primary|both: the backup); the tests print a NOTE when the
//! outcome differs but assert only the safety properties above.
//!
//! Needs root, `ip` (iproute2) with network namespaces, `nft` (nftables) and /dev/kvm; when one
//! is missing the test fails and says which (`scripts/ensure-deps.sh` installs the tools).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{log_time, unix_ns_now};
use understudy_vmm::guests::ledger_ticks;

const BIN: &str = env!("CARGO_BIN_EXE_understudy");

/// The failure detection and lease flags, as `understudy drill` runs them (the defaults).
const FAILURE_TIMEOUT: Duration = Duration::from_millis(300);
const LEASE_TTL: Duration = Duration::from_millis(300);
/// How long a lease request waits for the witness (transport's `WitnessLease::timeout`).
const LEASE_REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// QUIC idle timeout (transport's default): a side that only learns of a lost peer from its
/// connection learns it this late.
const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Protected run before the cut.
const WARMUP: Duration = Duration::from_millis(1500);
/// How long the promoted VM (if any) must be watched running.
const AFTER: Duration = Duration::from_secs(1);
/// A side that ran within this much of the end of the observation is "running at the end".
const END_WINDOW: Duration = Duration::from_millis(500);
/// Sampling period of the vCPU CPU-time sampler.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);
/// vCPU CPU time in one sampling interval above which the guest counts as having run in it: a
/// running ledger guest busy-loops (its pacing spins on the TSC), while a parked vCPU thread
/// that wakes up to pause or exit uses some tens of microseconds.
const MIN_RUN_NS: u64 = 100_000;

/// Observation after the cut: long enough for whichever way a side learns of the cut (heartbeat
/// silence, lease expiry behind a blocked lease request, or the QUIC idle timeout), then the
/// lease wait and the promotion, then `AFTER` of the promoted VM running.
fn observe_for() -> Duration {
    QUIC_IDLE_TIMEOUT.max(FAILURE_TIMEOUT + LEASE_REQUEST_TIMEOUT)
        + FAILURE_TIMEOUT
        + LEASE_TTL
        + LEASE_REQUEST_TIMEOUT
        + AFTER
}

/// `key=value` (digits) in a log line.
fn field(line: &str, key: &str) -> Option<f64> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let v: String = line[at..]
        .trim_start_matches('"')
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    v.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Tools on the machine

fn tool_output(cmd: &str, args: &[&str]) -> Result<String, String> {
    match Command::new(cmd).args(args).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(format!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run `{cmd}`: {e}")),
    }
}

/// Runs a command that must succeed (setup and teardown of the test's own namespaces).
fn sh(cmd: &str, args: &[&str]) -> String {
    tool_output(cmd, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Fails (never skips) when something these tests need is missing.
fn require_tools() {
    if let Err(e) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("the partition tests need read-write access to /dev/kvm, which failed: {e}");
    }
    if let Err(e) = tool_output("ip", &["-V"]) {
        panic!(
            "the partition tests need `ip` from iproute2 (network namespaces, veth, bridge): {e}; \
             install it with `apt-get install iproute2` (scripts/ensure-deps.sh does)"
        );
    }
    if let Err(e) = tool_output("nft", &["--version"]) {
        panic!(
            "the partition tests need `nft` from nftables to cut links: {e}; install it with \
             `apt-get install nftables` (scripts/ensure-deps.sh does)"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Primary,
    Backup,
    Witness,
}

impl Role {
    const ALL: [Role; 3] = [Role::Primary, Role::Backup, Role::Witness];

    fn tag(self) -> &'static str {
        match self {
            Role::Primary => "p",
            Role::Backup => "b",
            Role::Witness => "w",
        }
    }

    fn host(self) -> u8 {
        match self {
            Role::Primary => 1,
            Role::Backup => 2,
            Role::Witness => 3,
        }
    }
}

const NS_PREFIX: &str = "usp";

/// Three node namespaces (10.77.<net>.1 primary, .2 backup, .3 witness) on a bridge in a
/// fourth. Deleted on drop (also when the test panics). Names carry this process's id, so that
/// tests (and concurrent runs of this file) never share one.
struct Net {
    net: u8,
    prefix: String,
    created: Vec<String>,
}

impl Net {
    fn new(net: u8) -> Net {
        remove_stale_namespaces();
        let prefix = format!("{NS_PREFIX}{}t{net}", std::process::id());
        let mut n = Net {
            net,
            prefix,
            created: Vec::new(),
        };
        let bridge = n.bridge_ns();
        let all: Vec<String> = [bridge.clone()]
            .into_iter()
            .chain(Role::ALL.iter().map(|r| n.ns(*r)))
            .collect();
        for ns in all {
            if let Err(e) = tool_output("ip", &["netns", "add", &ns]) {
                panic!("the partition tests need network namespaces (`ip netns add`): {e}");
            }
            n.created.push(ns.clone());
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        }
        sh(
            "ip",
            &["-n", &bridge, "link", "add", "br0", "type", "bridge"],
        );
        sh("ip", &["-n", &bridge, "link", "set", "br0", "up"]);
        for r in Role::ALL {
            let ns = n.ns(r);
            let port = format!("v{}", r.tag());
            if let Err(e) = tool_output(
                "ip",
                &[
                    "-n", &bridge, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ],
            ) {
                panic!("the partition tests need veth pairs between namespaces: {e}");
            }
            sh(
                "ip",
                &["-n", &bridge, "link", "set", &port, "master", "br0", "up"],
            );
            let addr = format!("{}/24", n.ip(r));
            sh("ip", &["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            sh("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        }
        n
    }

    fn bridge_ns(&self) -> String {
        format!("{}x", self.prefix)
    }

    fn ns(&self, r: Role) -> String {
        format!("{}{}", self.prefix, r.tag())
    }

    fn ip(&self, r: Role) -> String {
        format!("10.77.{}.{}", self.net, r.host())
    }

    /// Drops UDP on each of `links`, both directions, with rules inside both ends' namespaces:
    /// one nftables table per namespace (input and output chains), all namespaces at once.
    /// Each table alone cuts all of its namespace's links (both directions), so every link goes
    /// down at one instant: when the first of its two ends has its table. Returns the Unix
    /// times (ns) just before the first table went in and after the last one was in.
    fn cut(&self, links: &[(Role, Role)]) -> (f64, f64) {
        let mut scripts = Vec::new();
        for me in Role::ALL {
            let peers: Vec<String> = links
                .iter()
                .filter_map(|&(a, b)| {
                    if a == me {
                        Some(self.ip(b))
                    } else if b == me {
                        Some(self.ip(a))
                    } else {
                        None
                    }
                })
                .collect();
            if peers.is_empty() {
                continue;
            }
            let set = peers.join(", ");
            let script = format!(
                "table inet understudy_cut {{\n\
                 \tchain input {{ type filter hook input priority 0; policy accept; \
                 ip saddr {{ {set} }} meta l4proto udp counter drop; }}\n\
                 \tchain output {{ type filter hook output priority 0; policy accept; \
                 ip daddr {{ {set} }} meta l4proto udp counter drop; }}\n\
                 }}\n"
            );
            scripts.push((self.ns(me), peers, script));
        }
        let t0 = unix_ns_now();
        let children: Vec<_> = scripts
            .iter()
            .map(|(ns, _, script)| {
                let mut child = Command::new("ip")
                    .args(["netns", "exec", ns, "nft", "-f", "-"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot run `ip netns exec {ns} nft`: {e}"));
                child
                    .stdin
                    .take()
                    .expect("piped")
                    .write_all(script.as_bytes())
                    .expect("writing the nft script");
                child
            })
            .collect();
        for (child, (ns, _, script)) in children.into_iter().zip(&scripts) {
            let out = child.wait_with_output().expect("nft");
            assert!(
                out.status.success(),
                "nft could not install the cut in {ns}: {}\n{script}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let t1 = unix_ns_now();
        for (ns, peers, _) in &scripts {
            let listed = sh("ip", &["netns", "exec", ns, "nft", "list", "ruleset"]);
            assert!(
                listed.contains("understudy_cut") && peers.iter().all(|p| listed.contains(p)),
                "the cut is not in {ns}'s ruleset:\n{listed}"
            );
        }
        (t0, t1)
    }

    /// UDP packets the cut rules in `r`'s namespace dropped so far.
    fn dropped(&self, r: Role) -> u64 {
        let listed = tool_output(
            "ip",
            &["netns", "exec", &self.ns(r), "nft", "list", "ruleset"],
        )
        .unwrap_or_default();
        listed
            .split("packets ")
            .skip(1)
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            let _ = tool_output("ip", &["netns", "del", ns]);
        }
    }
}

/// Deletes namespaces this file created in runs whose process is gone (killed test runs).
fn remove_stale_namespaces() {
    let Ok(list) = tool_output("ip", &["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('t') else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = tool_output("ip", &["netns", "del", name]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes and their timestamped output

/// Lines with the Unix time (ns) at which each arrived here.
type Lines = Arc<Mutex<Vec<(f64, String)>>>;

fn pump(from: impl Read + Send + 'static, copy: PathBuf) -> (Lines, JoinHandle<()>) {
    let lines: Lines = Arc::default();
    let l = Arc::clone(&lines);
    let h = std::thread::spawn(move || {
        let mut r = BufReader::new(from);
        let mut file = std::fs::File::create(copy).ok();
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let t = unix_ns_now();
                    if let Some(f) = &mut file {
                        let _ = f.write_all(&buf);
                    }
                    let s = String::from_utf8_lossy(&buf).trim_end().to_string();
                    l.lock().unwrap().push((t, s));
                }
            }
        }
    });
    (lines, h)
}

/// An `understudy` process inside a namespace (`ip netns exec` execs it: same pid).
struct Node {
    label: &'static str,
    child: Child,
    out: Lines,
    err: Lines,
    pumps: Vec<JoinHandle<()>>,
    exited_at: Option<f64>,
}

impl Node {
    fn spawn(dir: &Path, ns: &str, label: &'static str, args: &[String]) -> Node {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, BIN])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {label} in {ns}: {e}"));
        let (out, h1) = pump(
            child.stdout.take().expect("piped"),
            dir.join(format!("{label}.out")),
        );
        let (err, h2) = pump(
            child.stderr.take().expect("piped"),
            dir.join(format!("{label}.err")),
        );
        Node {
            label,
            child,
            out,
            err,
            pumps: vec![h1, h2],
            exited_at: None,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn out(&self) -> Vec<(f64, String)> {
        self.out.lock().unwrap().clone()
    }

    fn err(&self) -> Vec<(f64, String)> {
        self.err.lock().unwrap().clone()
    }

    fn err_text(&self) -> String {
        let e = self.err();
        let skip = e.len().saturating_sub(40);
        e[skip..]
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The first stderr line containing `needle`.
    fn log_line(&self, needle: &str) -> Option<(f64, String)> {
        self.err
            .lock()
            .unwrap()
            .iter()
            .find(|(_, l)| l.contains(needle))
            .cloned()
    }

    fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let t = Instant::now();
        while self.log_line(needle).is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "the {} exited ({st}) before logging {needle:?}:\n{}",
                    self.label,
                    self.err_text()
                );
            }
            assert!(
                t.elapsed() < timeout,
                "the {} did not log {needle:?} within {timeout:?}:\n{}",
                self.label,
                self.err_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process still runs (notes when it was first seen gone).
    fn alive(&mut self) -> bool {
        match self.child.try_wait() {
            Ok(None) => true,
            _ => {
                self.exited_at.get_or_insert_with(unix_ns_now);
                false
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for h in self.pumps.drain(..) {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Guest execution: CPU time of each process's vCPU threads

/// Total CPU time (ns) of the `vcpu*` threads of `pid`; `None` once the process is gone.
fn vcpu_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let p = t.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if !comm.starts_with("vcpu") {
            continue;
        }
        let ss = std::fs::read_to_string(p.join("schedstat")).unwrap_or_default();
        total += ss
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

/// (time, vCPU ns of the primary, of the backup).
type Sample = (f64, Option<u64>, Option<u64>);

struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(primary: u32, backup: u32) -> Sampler {
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (Arc::clone(&samples), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let (p, b) = (vcpu_ns(primary), vcpu_ns(backup));
                s.lock().unwrap().push((unix_ns_now(), p, b));
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        Sampler {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(&mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.samples.lock().unwrap().clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Sampling intervals `(from, to]` in which the vCPUs of one process used CPU (its guest ran).
fn ran(samples: &[Sample], which: impl Fn(&Sample) -> Option<u64>) -> Vec<(f64, f64)> {
    samples
        .windows(2)
        .filter_map(|w| match (which(&w[0]), which(&w[1])) {
            (Some(a), Some(b)) if b > a + MIN_RUN_NS => Some((w[0].0, w[1].0)),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// One partition run

/// Milliseconds of `t` after `origin`, for the report.
fn ms(t: Option<f64>, origin: f64) -> String {
    t.map_or("-".into(), |t| format!("{:+.0} ms", (t - origin) / 1e6))
}

fn partition(net: u8, name: &str, cut: &[(Role, Role)], expected: Role) {
    require_tools();
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = dir.join("certs");
    let d = certs.to_str().unwrap().to_string();
    for a in [
        vec!["certs", "init", "--dir", &d],
        vec!["certs", "issue", "--dir", &d, "--name", "primary"],
        vec!["certs", "issue", "--dir", &d, "--name", "backup"],
        vec!["certs", "issue", "--dir", &d, "--name", "witness"],
    ] {
        let out = Command::new(BIN).args(&a).output().unwrap();
        assert!(
            out.status.success(),
            "understudy {}: {}",
            a.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Declared first, dropped last: the processes end before their namespaces go.
    let n = Net::new(net);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let witness_addr = format!("{}:7500", n.ip(Role::Witness));
    let backup_addr = format!("{}:7400", n.ip(Role::Backup));
    let (ft, lt) = (
        format!("{}ms", FAILURE_TIMEOUT.as_millis()),
        format!("{}ms", LEASE_TTL.as_millis()),
    );
    let mut witness = Node::spawn(
        dir,
        &n.ns(Role::Witness),
        "witness",
        &s(&["witness", "--certs", &d, "--listen", &witness_addr]),
    );
    witness.wait_for_log("witness listening", Duration::from_secs(10));
    let mut backup = Node::spawn(
        dir,
        &n.ns(Role::Backup),
        "backup",
        &s(&[
            "backup",
            "--certs",
            &d,
            "--listen",
            &backup_addr,
            "--witness",
            &witness_addr,
            "--failure-timeout",
            &ft,
            "--lease-ttl",
            &lt,
            "--once",
        ]),
    );
    backup.wait_for_log("backup listening", Duration::from_secs(10));
    let mut primary = Node::spawn(
        dir,
        &n.ns(Role::Primary),
        "primary",
        &s(&[
            "primary",
            "--certs",
            &d,
            "--backup",
            &backup_addr,
            "--witness",
            &witness_addr,
            "--failure-timeout",
            &ft,
            "--lease-ttl",
            &lt,
            "--workload",
            "ledger",
            "--memory",
            "64M",
        ]),
    );
    primary.wait_for_log("full sync sent", Duration::from_secs(30));
    let mut sampler = Sampler::start(primary.pid(), backup.pid());

    // Protected run: the primary releases ticks (the backup acknowledges epochs).
    let t = Instant::now();
    while t.elapsed() < WARMUP || ledger_ticks(&join(&primary.out())).len() < 5 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the primary released {} ticks in {:?} of protected run:\nprimary:\n{}\nbackup:\n{}",
            ledger_ticks(&join(&primary.out())).len(),
            t.elapsed(),
            primary.err_text(),
            backup.err_text()
        );
        assert!(
            primary.alive(),
            "the primary exited:\n{}",
            primary.err_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        backup.log_line("promoted:").is_none(),
        "the backup promoted before the cut:\n{}",
        backup.err_text()
    );
    let ticks_before = ledger_ticks(&join(&primary.out())).len();

    // The cut.
    let (t_cut, t_cut_done) = n.cut(cut);
    let cut_at = Instant::now();
    while cut_at.elapsed() < observe_for() {
        primary.alive();
        backup.alive();
        std::thread::sleep(Duration::from_millis(5));
    }
    let (p_alive, b_alive) = (primary.alive(), backup.alive());
    let samples = sampler.finish();
    let t_end = samples.last().map_or_else(unix_ns_now, |s| s.0);
    let dropped: Vec<(Role, u64)> = Role::ALL.iter().map(|r| (*r, n.dropped(*r))).collect();
    let (p_out, b_out) = (primary.out(), backup.out());
    let (p_log, b_log) = (primary.err_text(), backup.err_text());
    let context = format!(
        "primary log (last lines):\n{p_log}\nbackup log (last lines):\n{b_log}\n\
         witness log (last lines):\n{}",
        witness.err_text()
    );

    // The cut must have been in force: packets were dropped where traffic flows all the time
    // (heartbeats between primary and backup, lease renewals between primary and witness).
    let steady = cut
        .iter()
        .any(|&(a, b)| a == Role::Primary || b == Role::Primary);
    let total_dropped: u64 = dropped.iter().map(|d| d.1).sum();
    assert!(
        !steady || total_dropped > 0,
        "{name}: the nftables rules dropped no packet: the cut was not in force\n{context}"
    );

    // Events.
    let p_ran = ran(&samples, |s| s.1);
    let b_ran_after_cut: Vec<(f64, f64)> = ran(&samples, |s| s.2)
        .into_iter()
        .filter(|r| r.0 >= t_cut)
        .collect();
    let p_last_ran = p_ran.last().map(|r| r.1);
    let b_first_ran = b_ran_after_cut.first().map(|r| r.0);
    let end_from = t_end - END_WINDOW.as_nanos() as f64;
    let p_running_at_end = p_alive && p_ran.last().is_some_and(|r| r.1 >= end_from);
    let b_running_at_end = b_alive && b_ran_after_cut.last().is_some_and(|r| r.1 >= end_from);
    let promoted = backup.log_line("promoted:");
    let promotion_start = promoted.as_ref().and_then(|(_, l)| {
        let at = log_time(l)?;
        Some(at - field(l, "promotion_us").unwrap_or(0.0) * 1e3)
    });
    let b_first_line = b_out.first().map(|(t, _)| *t);
    let backup_output_start = match (promotion_start, b_first_line) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let p_released: Vec<(f64, u64)> = p_out
        .iter()
        .filter_map(|(t, l)| Some((*t, *ledger_ticks(l).first()?)))
        .collect();
    let p_last_released = p_released.last().map(|r| r.0);
    let fenced = primary.log_line("fenced");
    let declared = backup.log_line("primary declared failed");
    let refused = backup.log_line("could not win the VM's lease");
    let unprotected = primary
        .log_line("UNPROTECTED")
        .or_else(|| primary.log_line("unprotected"));
    let side = match (p_running_at_end, b_running_at_end) {
        (true, false) => "the primary",
        (false, true) => "the promoted backup",
        (true, true) => "BOTH",
        (false, false) => "NEITHER",
    };
    let (tp, tb) = (ledger_ticks(&join(&p_out)), ledger_ticks(&join(&b_out)));
    eprintln!(
        "{name}: running at the end: {side}; {:.1} s in all; times from the cut (in force \
         within {:.1} ms):\n  \
         primary: {} ticks released before the cut, last released tick {} ({}), \
         guest last ran {}, fenced {}, unprotected {}, exited {}\n  \
         backup: declared the primary failed {}, promotion began {}, first console line {}, \
         guest first ran {}, refused the lease {}, ticks {}..{}, exited {}\n  \
         UDP packets dropped by the cut: {}",
        started.elapsed().as_secs_f64(),
        (t_cut_done - t_cut) / 1e6,
        ticks_before,
        tp.last().map_or("-".into(), |t| t.to_string()),
        ms(p_last_released, t_cut),
        ms(p_last_ran, t_cut),
        ms(fenced.as_ref().map(|f| f.0), t_cut),
        ms(unprotected.as_ref().map(|f| f.0), t_cut),
        ms(primary.exited_at, t_cut),
        ms(declared.as_ref().map(|f| f.0), t_cut),
        ms(promotion_start, t_cut),
        ms(b_first_line, t_cut),
        ms(b_first_ran, t_cut),
        ms(refused.as_ref().map(|f| f.0), t_cut),
        tb.first().map_or("-".into(), |t| t.to_string()),
        tb.last().map_or("-".into(), |t| t.to_string()),
        ms(backup.exited_at, t_cut),
        dropped
            .iter()
            .map(|(r, d)| format!("{r:?} {d}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let expected_side = match expected {
        Role::Primary => "the primary",
        _ => "the promoted backup",
    };
    if side != expected_side {
        eprintln!(
            "{name}: NOTE: expected {expected_side} to run at the end (majority rule), \
             observed {side}"
        );
    }

    let mut failures: Vec<String> = Vec::new();
    // 1. Exactly one copy at the end.
    if p_running_at_end == b_running_at_end {
        failures.push(format!(
            "{side} of the guests ran during the last {END_WINDOW:?} of the observation \
             (primary alive {p_alive}, backup alive {b_alive}, backup promoted {})",
            promoted.is_some()
        ));
    }
    // 2a. Never twice at once, seen from outside: the console intervals do not overlap.
    if let (Some(last), Some(start)) = (p_last_released, backup_output_start) {
        if last >= start {
            let late = p_released.iter().filter(|r| r.0 >= start).count();
            failures.push(format!(
                "the primary's console released {late} ticks after the backup began the \
                 promoted VM's console, the last {:.1} ms after it",
                (last - start) / 1e6
            ));
        }
    }
    // 2b. Never twice at once, from the guests' execution.
    if let Some(first) = b_first_ran {
        let overlap = p_ran.iter().filter(|r| r.1 > first).count();
        if overlap > 0 {
            failures.push(format!(
                "SPLIT BRAIN: the primary's guest ran until {} while the promoted backup's guest \
                 ran from {} (times from the cut; the primary's vCPUs ran in {overlap} sampling \
                 intervals after the backup's started)",
                ms(p_last_ran, t_cut),
                ms(Some(first), t_cut),
            ));
        }
    }
    // 3. The ledger: no CORRUPT, every tick once and in order.
    let joined = format!("{}\n{}", join(&p_out), join(&b_out));
    if let Some(l) = joined.lines().find(|l| l.contains("CORRUPT")) {
        failures.push(format!("the ledger reported {l:?}"));
    }
    let all = ledger_ticks(&joined);
    if all.first() != Some(&1) {
        failures.push(format!("the ticks do not start at 1: {:?}", all.first()));
    }
    if let Some(w) = all.windows(2).find(|w| w[1] != w[0] + 1) {
        failures.push(format!(
            "tick {} followed by {} (output lost or repeated); primary ticks ..{:?}, backup \
             ticks {:?}..{:?}",
            w[0],
            w[1],
            tp.last(),
            tb.first(),
            tb.last()
        ));
    }
    if b_running_at_end && tb.len() < 3 {
        failures.push(format!("the promoted VM printed {} ticks", tb.len()));
    }
    assert!(
        failures.is_empty(),
        "{name}:\n- {}\n{context}",
        failures.join("\n- ")
    );
    drop(witness);
    drop(backup);
    drop(primary);
}

fn join(lines: &[(f64, String)]) -> String {
    let mut s = String::new();
    for (_, l) in lines {
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// primary|backup: the primary still reaches the witness and keeps the lease, so the backup
/// (which declares it failed) cannot promote; the primary runs on.
#[test]
fn cut_between_primary_and_backup() {
    partition(
        1,
        "primary|backup",
        &[(Role::Primary, Role::Backup)],
        Role::Primary,
    );
}

/// primary|witness: the primary still hears the backup, so it does not fence; the backup still
/// hears the primary, so it never asks for the lease; the primary runs on.
#[test]
fn cut_between_primary_and_witness() {
    partition(
        2,
        "primary|witness",
        &[(Role::Primary, Role::Witness)],
        Role::Primary,
    );
}

/// backup|witness: nothing fails that the backup could notice; the primary runs on. (In steady
/// state no packet crosses this link: the backup contacts the witness only to take over. So the
/// test checks that the cut disturbs nothing, and that the cut is in place should the backup
/// ever try.)
#[test]
fn cut_between_backup_and_witness() {
    partition(
        3,
        "backup|witness",
        &[(Role::Backup, Role::Witness)],
        Role::Primary,
    );
}

/// primary|both: the primary, cut off from backup and witness, stops its guest; the backup wins
/// the lease once it expired and promotes.
#[test]
fn primary_isolated_from_backup_and_witness() {
    partition(
        4,
        "primary|both",
        &[
            (Role::Primary, Role::Backup),
            (Role::Primary, Role::Witness),
        ],
        Role::Backup,
    );
}
