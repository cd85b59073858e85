//! Observability end to end: a witness, a backup and a primary (ledger guest) as real processes
//! with `--metrics`, scraped over HTTP; then the primary is SIGKILLed and the backup promotes.
//!
//! - `every_metric_is_emitted_in_a_protect_and_failover_run`: every metric `dashboards/` names is
//!   in the scrape of the running trio, every metric of the catalog (`src/metrics.rs`) is
//!   emitted at least once (protect, failover, a drill, a quick-eviction move between a
//!   standalone source primary and a destination backup), with the catalog's TYPE.
//! - `prometheus_evaluates_every_dashboard_query`: Debian's `prometheus` package (installed by
//!   `scripts/prometheus.sh` when missing), `promtool check rules` / `test rules` on
//!   `dashboards/alerts.yml`, a real Prometheus scraping the trio (then a drill and the source
//!   of a move) every second, and every dashboard query evaluated through its HTTP API with a
//!   non-empty result.

mod common;

#[allow(dead_code)]
#[path = "../src/metrics.rs"]
mod catalog;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Served by the `understudy drill` process (scraped below), not by a witness, backup or primary.
const DRILL_PROCESS: [&str; 3] = [
    "understudy_drills_total",
    "understudy_drills_passed_total",
    "understudy_drill_last_success_timestamp_seconds",
];

/// Served only by the source of a move (the `understudy primary` that `understudy migrate`
/// moves, scraped below), not by a witness, backup or protected primary.
const MOVE_SOURCE: [&str; 7] = [
    "understudy_migrations_total",
    "understudy_migration_downtime_seconds",
    "understudy_migration_eviction_seconds",
    "understudy_migration_wire_bytes",
    "understudy_migration_throughput_ratio",
    "understudy_migration_vm_at_risk",
    "understudy_snapshot_interval_seconds",
];

/// The two tests each run a guest pair: one at a time on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A plain HTTP/1.0 GET; the body when the status is 200.
fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2))
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP response from {addr}: {text:?}"))?;
    let status = head.lines().next().unwrap_or("");
    if !status.contains(" 200") {
        return Err(format!("GET {addr}{path}: {status}: {body}"));
    }
    Ok(body.to_string())
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One scrape: metric name (histogram suffixes removed) -> number of samples, and TYPE lines.
#[derive(Default)]
struct Scrape {
    samples: BTreeMap<String, usize>,
    types: BTreeMap<String, String>,
    /// Label name and value pairs seen on each metric's samples.
    labels: BTreeMap<String, BTreeSet<(String, String)>>,
}

impl Scrape {
    fn parse(body: &str) -> Scrape {
        let mut s = Scrape::default();
        for line in body.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let mut it = t.split_whitespace();
                if let (Some(n), Some(k)) = (it.next(), it.next()) {
                    s.types.insert(n.to_string(), k.to_string());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap_or("");
            let base = base_name(name).to_string();
            *s.samples.entry(base.clone()).or_default() += 1;
            let pairs = s.labels.entry(base).or_default();
            if let Some((_, rest)) = line.split_once('{') {
                // `k="v",k2="v2"} 1`; values may hold commas and escaped quotes.
                let mut rest = rest;
                while let Some((k, after)) = rest.split_once("=\"") {
                    let b = after.as_bytes();
                    let mut end = 0;
                    while end < b.len() && !(b[end] == b'"' && (end == 0 || b[end - 1] != b'\\')) {
                        end += 1;
                    }
                    let key = k.trim_start_matches(',').trim().to_string();
                    pairs.insert((key, after[..end].to_string()));
                    rest = &after[(end + 1).min(after.len())..];
                }
            }
        }
        s
    }

    fn merge(&mut self, other: Scrape) {
        for (k, v) in other.samples {
            *self.samples.entry(k).or_default() += v;
        }
        self.types.extend(other.types);
        for (k, v) in other.labels {
            self.labels.entry(k).or_default().extend(v);
        }
    }
}

fn base_name(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if catalog::CATALOG
                .iter()
                .any(|d| d.name == base && d.kind == catalog::Kind::Histogram)
            {
                return base;
            }
        }
    }
    name
}

fn scrape(addr: &str) -> Result<Scrape, String> {
    http_get(addr, "/metrics").map(|b| Scrape::parse(&b))
}

/// `understudy_...` names in `text` (as tests/dashboards.rs reads them).
fn metric_names(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("understudy_") {
        let start = i + at;
        let mut end = start + "understudy_".len();
        while end < b.len() && (b[end].is_ascii_lowercase() || b[end] == b'_') {
            end += 1;
        }
        let glued = start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let name = text[start..end].trim_end_matches('_');
        if !glued && name.len() > "understudy_".len() {
            out.insert(base_name(name).to_string());
        }
        i = end;
    }
    out
}

/// Every metric named by a file of `dashboards/`.
fn dashboard_metrics() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(root().join("dashboards")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            out.extend(metric_names(&std::fs::read_to_string(&p).unwrap()));
        }
    }
    out
}

/// Longer than the defaults (300 ms): the machine may be shared, and a spurious failover
/// during the full sync is not what these tests are about.
const FAILURE_TIMEOUT: &str = "1s";
const LEASE_TTL: &str = "1s";

/// Witness, backup and primary (ledger guest), each serving metrics.
struct Trio {
    witness: Proc,
    backup: Proc,
    primary: Proc,
    /// Metrics addresses: witness, backup, primary.
    metrics: [String; 3],
}

fn start_trio(d: &Path) -> Trio {
    certs(&d.join("certs"), &["primary", "backup", "witness"]);
    let certs_dir = d.join("certs").display().to_string();
    let (wp, bp) = (free_port(), free_port());
    let metrics = [0; 3].map(|_| format!("127.0.0.1:{}", free_tcp_port()));
    let witness_addr = format!("127.0.0.1:{wp}");
    let backup_addr = format!("127.0.0.1:{bp}");
    let witness = Proc::spawn(
        d,
        "witness",
        &s(&[
            "witness",
            "--certs",
            &certs_dir,
            "--listen",
            &witness_addr,
            "--metrics",
            &metrics[0],
        ]),
    );
    witness.wait_for("witness listening", Duration::from_secs(10));
    let backup = Proc::spawn(
        d,
        "backup",
        &s(&[
            "backup",
            "--certs",
            &certs_dir,
            "--listen",
            &backup_addr,
            "--witness",
            &witness_addr,
            "--once",
            "--metrics",
            &metrics[1],
            "--failure-timeout",
            FAILURE_TIMEOUT,
            "--lease-ttl",
            LEASE_TTL,
        ]),
    );
    backup.wait_for("backup listening", Duration::from_secs(10));
    let primary = Proc::spawn(
        d,
        "primary",
        &s(&[
            "primary",
            "--certs",
            &certs_dir,
            "--backup",
            &backup_addr,
            "--witness",
            &witness_addr,
            "--workload",
            "ledger",
            "--memory",
            "128M",
            "--metrics",
            &metrics[2],
            "--failure-timeout",
            FAILURE_TIMEOUT,
            "--lease-ttl",
            LEASE_TTL,
        ]),
    );
    primary.wait_for("full sync sent", Duration::from_secs(60));
    Trio {
        witness,
        backup,
        primary,
        metrics,
    }
}

impl Trio {
    /// SIGKILLs the primary and waits for the backup's promotion.
    fn fail_over(&mut self) {
        self.primary.child.kill().unwrap();
        let _ = self.primary.child.wait();
        self.backup.wait_for("promoted:", Duration::from_secs(30));
    }

    fn logs(&self) -> String {
        format!(
            "--- witness\n{}\n--- backup\n{}\n--- primary\n{}",
            tail(&self.witness.err()),
            tail(&self.backup.err()),
            tail(&self.primary.err())
        )
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Starts a short drill (one run, killed at commit) serving metrics on `addr`, lingering after
/// it; the problem when `drill` cannot serve metrics.
fn start_drill(d: &Path, addr: &str, linger: &str) -> Result<Proc, String> {
    let help = String::from_utf8_lossy(&run(&s(&["drill", "--help"])).stdout).into_owned();
    if !help.contains("--metrics") {
        return Err(
            "`understudy drill` has no --metrics flag, so no drill metric can be \
                    scraped"
                .into(),
        );
    }
    let mut args = s(&[
        "drill",
        "--repeat",
        "1",
        "--kill-at",
        "commit",
        "--memory",
        "128M",
        "--warmup",
        "1",
        "--after",
        "0.5",
        "--metrics",
        addr,
    ]);
    if help.contains("--linger") {
        args.extend(s(&["--linger", linger]));
    }
    Ok(Proc::spawn(d, "drill", &args))
}

/// Runs a short drill serving metrics, scraping it until it ends.
fn drill_scrape(d: &Path) -> Result<Scrape, String> {
    let addr = format!("127.0.0.1:{}", free_tcp_port());
    let mut drill = start_drill(d, &addr, "1s")?;
    let mut all = Scrape::default();
    let t = Instant::now();
    loop {
        if let Ok(sc) = scrape(&addr) {
            all.merge(sc);
        }
        if drill.child.try_wait().unwrap().is_some() {
            break;
        }
        if t.elapsed() > Duration::from_secs(90) {
            return Err(format!("the drill did not end in 90 s: {}", drill.err()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = drill.wait(Duration::from_secs(1));
    if !status.success() {
        return Err(format!(
            "the drill failed ({status}): {}{}",
            drill.out(),
            tail(&drill.err())
        ));
    }
    Ok(all)
}

/// A VM moved by quick eviction: its source, lingering after the move, and its destination.
struct Moved {
    /// The source primary, serving its metrics until its `--linger-after-move` is over.
    src: Proc,
    /// The destination backup, running the VM.
    dst: Proc,
    /// The source's scrape while its background snapshots were being shipped.
    during: Scrape,
}

/// Starts a destination backup and a standalone source primary (ledger guest, 128M) serving
/// metrics on `metrics`, then moves the VM: `understudy migrate --algorithm quick-eviction`, a
/// second of background snapshots (the source's snapshot interval gauge is scraped), then
/// `understudy evict`. Returns once the move is reported done; the source lingers `linger`
/// more.
fn quick_eviction_move(d: &Path, metrics: &str, linger: &str) -> Result<Moved, String> {
    let certs_dir = d.join("move-certs");
    certs(&certs_dir, &["primary", "backup"]);
    let c = certs_dir.display().to_string();
    let dst_addr = format!("127.0.0.1:{}", free_port());
    let dst = Proc::spawn(
        d,
        "move-dst",
        // 2 s: on a loaded CI machine a 300 ms silence during the move's full sync ended it.
        &s(&[
            "backup",
            "--certs",
            &c,
            "--listen",
            &dst_addr,
            "--once",
            "--failure-timeout",
            "2s",
        ]),
    );
    dst.wait_for("backup listening", Duration::from_secs(10));
    let admin = format!("127.0.0.1:{}", free_tcp_port());
    let src = Proc::spawn(
        d,
        "move-src",
        &s(&[
            "primary",
            "--certs",
            &c,
            "--admin",
            &admin,
            "--metrics",
            metrics,
            "--linger-after-move",
            linger,
            "--workload",
            "ledger",
            "--memory",
            "128M",
        ]),
    );
    src.wait_for("guest running", Duration::from_secs(30));
    src.wait_for("admin endpoint up", Duration::from_secs(10));
    let logs = |src: &Proc, dst: &Proc| {
        format!(
            "\n--- source\n{}\n--- destination\n{}",
            tail(&src.err()),
            tail(&dst.err())
        )
    };
    // The guest's rate before the move (the throughput ratio's reference) needs a moment.
    std::thread::sleep(Duration::from_secs(1));
    let out = run(&s(&[
        "migrate",
        "--admin",
        &admin,
        "--algorithm",
        "quick-eviction",
        "--to",
        &dst_addr,
    ]));
    if !out.status.success() {
        return Err(format!(
            "understudy migrate failed ({}): {}{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            logs(&src, &dst)
        ));
    }
    // Background snapshots: the full sync first, then the interval is set.
    let t = Instant::now();
    let during = loop {
        if let Ok(sc) = scrape(metrics) {
            if sc
                .samples
                .contains_key("understudy_snapshot_interval_seconds")
            {
                break sc;
            }
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "no understudy_snapshot_interval_seconds from the source within 60 s of \
                 `understudy migrate --algorithm quick-eviction`{}",
                logs(&src, &dst)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // A second of snapshots (Prometheus scrapes the interval), then the eviction.
    std::thread::sleep(Duration::from_secs(1));
    let ev = run(&s(&["evict", "--admin", &admin]));
    let text = String::from_utf8_lossy(&ev.stdout).into_owned();
    if !ev.status.success() || !text.contains("quick-eviction done") {
        return Err(format!(
            "understudy evict failed ({}): {text}{}{}",
            ev.status,
            String::from_utf8_lossy(&ev.stderr),
            logs(&src, &dst)
        ));
    }
    Ok(Moved { src, dst, during })
}

#[test]
fn every_metric_is_emitted_in_a_protect_and_failover_run() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut trio = start_trio(d);
    // Some epochs, a few scrapes of each node.
    let mut running = Scrape::default();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(500));
        for m in &trio.metrics {
            let sc = scrape(m).unwrap_or_else(|e| panic!("{e}\n{}", trio.logs()));
            running.merge(sc);
        }
    }
    let mut problems = Vec::new();
    let named = dashboard_metrics();
    // Every one, histograms included: a histogram registered before its first event (see
    // `zero_counters` in src/metrics.rs) is served with empty buckets.
    let absent: Vec<&String> = named
        .iter()
        .filter(|n| {
            !running.samples.contains_key(*n)
                && !DRILL_PROCESS.contains(&n.as_str())
                && !MOVE_SOURCE.contains(&n.as_str())
        })
        .collect();
    if !absent.is_empty() {
        problems.push(format!(
            "metrics named in dashboards/ missing from the scrape of the running witness, \
             backup and primary: {absent:?}"
        ));
    }

    trio.fail_over();
    let mut all = running;
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(300));
        for m in &trio.metrics[..2] {
            let sc = scrape(m).unwrap_or_else(|e| panic!("{e}\n{}", trio.logs()));
            all.merge(sc);
        }
    }
    drop(trio);

    match drill_scrape(d) {
        Ok(sc) => all.merge(sc),
        Err(e) => problems.push(e),
    }

    // A move: the source's snapshot interval while it ships snapshots, the move's figures
    // while it lingers.
    let addr = format!("127.0.0.1:{}", free_tcp_port());
    match quick_eviction_move(d, &addr, "3s") {
        Ok(moved) => {
            all.merge(moved.during);
            match scrape(&addr) {
                Ok(sc) => all.merge(sc),
                Err(e) => problems.push(format!(
                    "the source of the move did not serve its metrics after the move: {e}\n{}",
                    tail(&moved.src.err())
                )),
            }
            drop(moved.dst);
        }
        Err(e) => problems.push(e),
    }

    let never: Vec<&str> = catalog::CATALOG
        .iter()
        .map(|m| m.name)
        .filter(|n| !all.samples.contains_key(*n))
        .collect();
    if !never.is_empty() {
        problems.push(format!(
            "catalog metrics never emitted in a protect + failover run (+ drill, + move): \
             {never:?}"
        ));
    }
    let mut wrong_type = Vec::new();
    for m in catalog::CATALOG {
        let want = match m.kind {
            catalog::Kind::Counter => "counter",
            catalog::Kind::Gauge => "gauge",
            catalog::Kind::Histogram => "histogram",
        };
        match all.types.get(m.name) {
            Some(t) if t != want => wrong_type.push(format!("{} is a {t}, not a {want}", m.name)),
            None if all.samples.contains_key(m.name) => {
                wrong_type.push(format!("{} has no TYPE line", m.name))
            }
            _ => {}
        }
    }
    for m in catalog::CATALOG {
        for (l, v) in all.labels.get(m.name).into_iter().flatten() {
            if m.kind == catalog::Kind::Histogram && l == "le" {
                continue;
            }
            match m.labels.iter().find(|(name, _)| name == l) {
                None => wrong_type.push(format!("{} has label {l:?}, not in the catalog", m.name)),
                Some((_, values)) if !values.is_empty() && !values.contains(&v.as_str()) => {
                    wrong_type.push(format!(
                        "{}{{{l}={v:?}}}: a value not in the catalog",
                        m.name
                    ))
                }
                _ => {}
            }
        }
    }
    if !wrong_type.is_empty() {
        problems.push(format!("wrong or missing TYPE, or labels: {wrong_type:?}"));
    }
    let foreign: Vec<&String> = all
        .samples
        .keys()
        .filter(|n| n.starts_with("understudy_"))
        .filter(|n| !catalog::CATALOG.iter().any(|m| m.name == n.as_str()))
        .collect();
    if !foreign.is_empty() {
        problems.push(format!("emitted but not in the catalog: {foreign:?}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A child process killed (by its id) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn prom_query(prom: &str, expr: &str, at: f64) -> Result<Vec<Value>, String> {
    let body = http_get(
        prom,
        &format!("/api/v1/query?query={}&time={at:.3}", url_encode(expr)),
    )?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("{}: {}", v["errorType"], v["error"]));
    }
    match &v["data"]["result"] {
        Value::Array(a) => Ok(a.clone()),
        // Scalars and strings are one value.
        other => Ok(vec![other.clone()]),
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Every query of the dashboard (panel targets, annotations, variables), Grafana's variables
/// replaced: (where, expression).
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("dashboards/understudy.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    fn walk(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    let title = p["title"].as_str().unwrap_or("?");
                    out.push((format!("panel {title:?} {}", t["refId"]), e.to_string()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    walk(&dash["panels"], &mut out);
    for a in dash["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(e) = a["expr"].as_str() {
            out.push((format!("annotation {}", a["name"]), e.to_string()));
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        let def = v["definition"].as_str().unwrap_or("");
        if let Some(args) = def
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
        {
            let metric = args.split(',').next().unwrap().trim();
            out.push((format!("variable {}", v["name"]), metric.to_string()));
        }
    }
    out.into_iter()
        .map(|(w, e)| {
            let e = e
                .replace("$__rate_interval", "30s")
                .replace("$__interval", "15s")
                .replace("$__range", "5m")
                .replace("${instance}", ".*")
                .replace("$instance", ".*");
            (w, e)
        })
        .collect()
}

#[test]
fn prometheus_evaluates_every_dashboard_query() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Prometheus from Debian's package, the rules checked and their unit tests.
    let script = root().join("scripts/prometheus.sh");
    let check = Command::new("bash")
        .arg(&script)
        .arg("check")
        .output()
        .expect("running scripts/prometheus.sh");
    assert!(
        check.status.success(),
        "scripts/prometheus.sh check failed (Prometheus from Debian's `prometheus` package is \
         needed: `prometheus` and `promtool`):\n{}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut trio = start_trio(d);
    let prom = format!("127.0.0.1:{}", free_tcp_port());
    // A drill and the source of a move (later) serve their metrics here; Prometheus scrapes
    // them from the start.
    let drill_addr = format!("127.0.0.1:{}", free_tcp_port());
    let move_addr = format!("127.0.0.1:{}", free_tcp_port());
    let prom_dir: PathBuf = d.join("prometheus");
    let log = std::fs::File::create(d.join("prometheus.log")).unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .args(["run", &prom, prom_dir.to_str().unwrap(), "1s"])
        .args(&trio.metrics)
        .arg(&drill_addr)
        .arg(&move_addr)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log));
    let mut prometheus = Killed(cmd.spawn().expect("starting Prometheus"));
    let prom_log = || std::fs::read_to_string(d.join("prometheus.log")).unwrap_or_default();

    // Ready, then every target up, then a few more scrapes.
    let t = Instant::now();
    loop {
        if let Some(st) = prometheus.0.try_wait().unwrap() {
            panic!("Prometheus exited ({st}): {}", prom_log());
        }
        let up = prom_query(&prom, "sum(up)", unix_now()).ok().and_then(|r| {
            r.first()
                .map(|v| v["value"][1].as_str().unwrap_or("").to_string())
        });
        if up.as_deref() == Some("3") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "Prometheus did not scrape the three nodes within 30 s (sum(up) = {up:?}):\n{}\n{}",
            prom_log(),
            trio.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(6));
    let running_at = unix_now();
    trio.fail_over();
    std::thread::sleep(Duration::from_secs(4));
    let failed_over_at = unix_now();
    drop(trio);
    // A drill: its counters and last success, scraped while it lingers.
    let mut times = vec![running_at, failed_over_at];
    let mut problems = Vec::new();
    match start_drill(d, &drill_addr, "4s") {
        Ok(mut drill) => {
            let t = Instant::now();
            loop {
                // The drill's counters are served at 0 from its start; the last-success time
                // appears when the drill has passed.
                let seen = scrape(&drill_addr).is_ok_and(|sc| {
                    sc.samples
                        .contains_key("understudy_drill_last_success_timestamp_seconds")
                });
                if seen {
                    // Two Prometheus scrapes of the final values.
                    std::thread::sleep(Duration::from_millis(2500));
                    times.push(unix_now());
                    break;
                }
                if drill.child.try_wait().unwrap().is_some()
                    || t.elapsed() > Duration::from_secs(60)
                {
                    problems.push(format!(
                        "the drill ended (or ran 60 s) without passing (no \
                         understudy_drill_last_success_timestamp_seconds): \
                         {}{}",
                        drill.out(),
                        tail(&drill.err())
                    ));
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = drill.wait(Duration::from_secs(30));
        }
        Err(e) => problems.push(e),
    }
    // A quick-eviction move: its snapshot interval while it ships snapshots, its figures
    // while the source lingers.
    match quick_eviction_move(d, &move_addr, "5s") {
        Ok(moved) => {
            // Two Prometheus scrapes of the move's figures.
            std::thread::sleep(Duration::from_millis(2500));
            times.push(unix_now());
            drop(moved);
        }
        Err(e) => problems.push(e),
    }

    // Each query: no error, and a result while the pair runs, after the failover, while the
    // drill's last values are there, or after the move.
    let queries = dashboard_queries();
    assert!(queries.len() > 20, "{queries:?}");
    for (what, expr) in &queries {
        let mut found = false;
        for &at in &times {
            match prom_query(&prom, expr, at) {
                Ok(r) => found |= !r.is_empty(),
                Err(e) => {
                    problems.push(format!("{what}: `{expr}`: {e}"));
                    found = true;
                    break;
                }
            }
        }
        if !found {
            problems.push(format!("{what}: `{expr}` is empty"));
        }
    }
    // The alert rules load and evaluate without errors against real data.
    let rules: Value = serde_json::from_str(&http_get(&prom, "/api/v1/rules").unwrap()).unwrap();
    let mut n_rules = 0;
    for g in rules["data"]["groups"].as_array().into_iter().flatten() {
        for r in g["rules"].as_array().into_iter().flatten() {
            n_rules += 1;
            if r["health"] != "ok" {
                problems.push(format!(
                    "rule {}: health {} {}",
                    r["name"], r["health"], r["lastError"]
                ));
            }
        }
    }
    if n_rules == 0 {
        problems.push("Prometheus loaded no rule of dashboards/alerts.yml".into());
    }
    assert!(
        problems.is_empty(),
        "{} of {} dashboard queries failed:\n{}",
        problems.len(),
        queries.len(),
        problems.join("\n")
    );
}

#[test]
fn scrape_text_is_read_with_labels_and_histogram_suffixes() {
    let sc = Scrape::parse(
        "# HELP understudy_pause_seconds x\n# TYPE understudy_pause_seconds histogram\n\
         understudy_pause_seconds_bucket{le=\"0.001\"} 3\nunderstudy_pause_seconds_sum 0.1\n\
         understudy_pause_seconds_count 3\n\
         understudy_pages_total{kind=\"zero\",note=\"a,b=\\\"c\\\"\"} 7\nunderstudy_protected 1\n",
    );
    assert_eq!(sc.samples["understudy_pause_seconds"], 3);
    assert_eq!(sc.types["understudy_pause_seconds"], "histogram");
    assert_eq!(sc.samples["understudy_protected"], 1);
    let pages: Vec<_> = sc.labels["understudy_pages_total"]
        .iter()
        .cloned()
        .collect();
    assert_eq!(
        pages,
        [
            ("kind".to_string(), "zero".to_string()),
            ("note".to_string(), "a,b=\\\"c\\\"".to_string())
        ]
    );
}
