//! The admin endpoint (`--admin ADDR` on primary and backup) and its clients:
//! `understudy status` and `understudy promote` (planned switchover).
//!
//! Plain HTTP/1.0 with JSON bodies, bound to an address the operator names (loopback by
//! convention): `GET /status` on any node; `POST /switchover`, `POST /migrate?...` and
//! `POST /evict` on a primary.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};
use understudy_primary::migrate::{
    Algorithm, MigrationReport, NoConvergence, PrecopyPolicy, QuickEviction,
};
use understudy_primary::status::{
    MigrateRequest, Migration, NodeStatus, StatusBoard, Switchover, SwitchoverReport,
};

/// How long `POST /switchover` waits for the switchover to finish.
const SWITCHOVER_PATIENCE: Duration = Duration::from_secs(60);

/// What the endpoint serves.
#[derive(Clone)]
pub struct Admin {
    pub status: StatusBoard,
    /// Present on a primary.
    pub switchover: Option<Arc<Switchover>>,
    /// Present on a primary.
    pub migration: Option<Arc<Migration>>,
}

/// Requests being answered.
static ACTIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Waits (up to `timeout`) until every request under way has been answered: a primary whose
/// VM moved away exits right after, and the caller of `understudy migrate` waits for its report.
pub async fn drain(timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while ACTIVE.load(std::sync::atomic::Ordering::SeqCst) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Binds `addr` and serves requests on the current runtime until the process ends.
pub async fn serve(addr: SocketAddr, admin: Admin) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin endpoint to {addr}"))?;
    info!(%addr, "admin endpoint up");
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let admin = admin.clone();
            ACTIVE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Err(e) = handle(stream, &admin).await {
                    warn!(%peer, error = %e, "admin request failed");
                }
                ACTIVE.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    Ok(())
}

async fn handle(mut stream: tokio::net::TcpStream, admin: &Admin) -> Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut chunk).await?;
            if n == 0 || buf.len() > 16 * 1024 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .context("the request did not arrive within 5 s")??;
    let head = String::from_utf8_lossy(&buf);
    let mut line = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
    let (code, body) = match (method, path) {
        ("GET", "/status") => (200, serde_json::to_string(&admin.status.get())?),
        ("POST", "/switchover") => match &admin.switchover {
            None => (
                404,
                error_json("this node is not a primary: ask the primary's admin endpoint"),
            ),
            Some(sw) if !sw.request() => (409, error_json("a switchover is already under way")),
            Some(sw) => {
                info!("planned switchover requested through the admin endpoint");
                match sw.wait(SWITCHOVER_PATIENCE).await {
                    Some(r) => (if r.ok { 200 } else { 500 }, serde_json::to_string(&r)?),
                    None => (
                        504,
                        error_json("the switchover did not finish within 60 s; see the logs"),
                    ),
                }
            }
        },
        ("POST", p) if p.starts_with("/migrate") => migrate_request(admin, p).await?,
        ("POST", "/evict") => evict_request(admin).await?,
        _ => (
            404,
            error_json("use GET /status, POST /switchover, POST /migrate?... or POST /evict"),
        ),
    };
    let reason = match code {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        504 => "Gateway Timeout",
        _ => "Internal Server Error",
    };
    let response = format!(
        "HTTP/1.0 {code} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// `POST /migrate?algorithm=..&to=..[&to_name=..&downtime_budget_ms=..&max_rounds=..
/// &timeout_ms=..&on_no_convergence=..&eviction_target_ms=..&delta_cache=BYTES]`: precopy answers when the move
/// is over; quick eviction answers once its background snapshots have started.
async fn migrate_request(admin: &Admin, path: &str) -> Result<(u16, String)> {
    let Some(m) = &admin.migration else {
        return Ok((404, error_json("this node is not a primary")));
    };
    let req = match parse_migrate(path) {
        Ok(r) => r,
        Err(e) => return Ok((400, error_json(&e))),
    };
    let quick = req.algorithm == Algorithm::QuickEviction;
    if !m.request(req.clone()) {
        return Ok((409, error_json("a move is already under way")));
    }
    info!(algorithm = req.algorithm.name(), to = %req.to, "move requested through the admin endpoint");
    if quick {
        // The eviction itself comes later (`POST /evict`); report a failure to start at once.
        return Ok(match m.outcome.wait(Duration::from_secs(2)).await {
            Some(r) if !r.ok => (500, serde_json::to_string(&r)?),
            _ => (202, serde_json::json!({
                "message": format!("quick eviction to {}: snapshots are being shipped; evict with `understudy evict`", req.to)
            }).to_string()),
        });
    }
    outcome(m.outcome.wait(MOVE_PATIENCE).await)
}

/// `POST /evict`: a quick-eviction move under way ships its last dirt; a protected VM switches
/// over to its backup.
async fn evict_request(admin: &Admin) -> Result<(u16, String)> {
    let (Some(m), Some(sw)) = (&admin.migration, &admin.switchover) else {
        return Ok((404, error_json("this node is not a primary")));
    };
    if m.evict() {
        info!("eviction requested through the admin endpoint");
        return outcome(m.outcome.wait(MOVE_PATIENCE).await);
    }
    if m.requested().is_some() {
        return Ok((409, error_json("a move other than quick eviction is under way, or the eviction was already asked for")));
    }
    if !sw.request() {
        return Ok((409, error_json("a switchover is already under way")));
    }
    info!("eviction of a protected VM requested: planned switchover to its backup");
    let r = sw.wait(SWITCHOVER_PATIENCE).await.map(|r| MigrationReport {
        algorithm: "switchover".into(),
        ok: r.ok,
        message: r.message,
        downtime_ms: r.downtime_ms,
        ..MigrationReport::default()
    });
    outcome(r)
}

fn outcome(r: Option<MigrationReport>) -> Result<(u16, String)> {
    Ok(match r {
        Some(r) => (if r.ok { 200 } else { 500 }, serde_json::to_string(&r)?),
        None => (
            504,
            error_json("the move did not finish in time; see the primary's log"),
        ),
    })
}

/// How long a move may take before the admin request gives up waiting (the move goes on).
const MOVE_PATIENCE: Duration = Duration::from_secs(300);

fn parse_migrate(path: &str) -> Result<MigrateRequest, String> {
    let query = path.split_once('?').map_or("", |(_, q)| q);
    let mut algorithm = None;
    let mut to = None;
    let mut to_name = "backup".to_string();
    let mut precopy = PrecopyPolicy::default();
    let mut quick = QuickEviction::default();
    let mut delta_cache = None;
    let ms = |v: &str, k: &str| {
        v.parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|e| format!("{k}={v:?}: {e}"))
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?}: use key=value"))?;
        match k {
            "algorithm" => algorithm = Some(v.parse::<Algorithm>()?),
            "to" => to = Some(v.parse().map_err(|e| format!("to={v:?}: {e}"))?),
            "to_name" => to_name = v.to_string(),
            "downtime_budget_ms" => precopy.downtime_budget = ms(v, k)?,
            "max_rounds" => precopy.max_rounds = v.parse().map_err(|e| format!("{k}: {e}"))?,
            "timeout_ms" => precopy.timeout = ms(v, k)?,
            "on_no_convergence" => precopy.on_no_convergence = v.parse::<NoConvergence>()?,
            "eviction_target_ms" => quick.target = ms(v, k)?,
            "delta_cache" => delta_cache = Some(v.parse().map_err(|e| format!("{k}={v:?}: {e}"))?),
            _ => return Err(format!("unknown parameter {k:?}")),
        }
    }
    Ok(MigrateRequest {
        algorithm: algorithm.ok_or("algorithm= is missing")?,
        to: to.ok_or("to= is missing")?,
        to_name,
        precopy,
        quick,
        delta_cache,
    })
}

fn error_json(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// One request to an admin endpoint; returns the status code and body.
fn request(addr: SocketAddr, method: &str, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(
        || format!("connecting to the admin endpoint at {addr} (is the node running with --admin {addr}?)"),
    )?;
    s.set_read_timeout(Some(timeout))?;
    write!(s, "{method} {path} HTTP/1.0\r\nhost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    s.read_to_string(&mut response)
        .with_context(|| format!("reading the answer of {addr}"))?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{addr} did not answer in HTTP: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

#[derive(Args)]
pub struct StatusArgs {
    /// The node's admin endpoint (its --admin address).
    #[arg(long)]
    admin: SocketAddr,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

/// Describes a status in one or two lines.
pub fn describe(s: &NodeStatus, now_unix: f64) -> String {
    let age = (now_unix - s.since_unix).max(0.0);
    let mut out = format!("{} of {}: {} for {:.0} s", s.role, s.vm_id, s.state, age);
    match &s.peer {
        Some(p) => out.push_str(&format!("; peer {p}")),
        None => out.push_str("; no peer connected"),
    }
    out.push_str(&format!("; last committed epoch {}", s.last_epoch));
    if let Some(lag) = s.lag_seconds {
        out.push_str(&format!("; lag {:.1} ms", lag * 1e3));
    }
    if let Some(note) = &s.note {
        out.push_str(&format!("\n  {note}"));
    }
    out
}

pub fn status(args: StatusArgs) -> Result<i32> {
    let (code, body) = request(args.admin, "GET", "/status", Duration::from_secs(5))?;
    if code != 200 {
        bail!("{} answered {code}: {body}", args.admin);
    }
    let s: NodeStatus = serde_json::from_str(&body).with_context(|| {
        format!(
            "{} sent a status this build cannot read: {body}",
            args.admin
        )
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        println!("{}", describe(&s, now));
    }
    Ok(0)
}

#[derive(Args)]
pub struct PromoteArgs {
    /// The PRIMARY's admin endpoint (its --admin address). The primary pauses its guest at
    /// the next epoch boundary, waits for the backup to commit that final epoch, then hands
    /// the VM and its lease to the backup, which resumes it; the downtime is reported.
    #[arg(long)]
    admin: SocketAddr,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn promote(args: PromoteArgs) -> Result<i32> {
    let (code, body) = request(
        args.admin,
        "POST",
        "/switchover",
        SWITCHOVER_PATIENCE + Duration::from_secs(5),
    )?;
    let report: SwitchoverReport = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(_) => bail!("{} answered {code}: {body}", args.admin),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "switchover {}: {}",
            if report.ok { "done" } else { "FAILED" },
            report.message
        );
    }
    Ok(if report.ok { 0 } else { 1 })
}

#[derive(Args)]
pub struct MigrateArgs {
    /// The source PRIMARY's admin endpoint (its --admin address); the primary runs without
    /// --backup (a protected VM is moved to its backup with `understudy evict`).
    #[arg(long)]
    admin: SocketAddr,
    /// precopy: live rounds, then a short stop-and-copy. quick-eviction: live snapshots in
    /// the background at an interval adapted to the guest and the link, so that a later
    /// `understudy evict` only ships the last dirty pages. Neither pauses the guest before the
    /// final epoch, and the source keeps the VM until the destination runs it. postcopy: the
    /// VM switches at once and pulls its pages on demand; hybrid: one live pass first. Both
    /// lose the VM if a host fails before the last page arrives.
    #[arg(long)]
    algorithm: Algorithm,
    /// The destination: an `understudy backup` listening there (host:port, UDP).
    #[arg(long)]
    to: SocketAddr,
    /// The name in the destination's certificate.
    #[arg(long, default_value = "backup")]
    to_name: String,
    /// precopy: the downtime the final stop-and-copy may take.
    #[arg(long, default_value = "50ms", value_parser = crate::protect::parse_duration)]
    downtime_budget: Duration,
    /// precopy: live rounds after the full sync, at most (1..=1000).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_rounds: u32,
    /// precopy: the rounds end after this long (from the start of the full sync).
    #[arg(long, default_value = "60s", value_parser = crate::protect::parse_duration)]
    timeout: Duration,
    /// precopy, when the rounds end without converging: `stop-and-copy` completes the move
    /// with a downtime above the budget; `abort` leaves the VM running here.
    #[arg(long, default_value = "stop-and-copy")]
    on_no_convergence: NoConvergence,
    /// quick-eviction: the eviction time to stay under.
    #[arg(long, default_value = "50ms", value_parser = crate::protect::parse_duration)]
    eviction_target: Duration,
    /// precopy, quick-eviction: memory on the source (e.g. 512M, 1G; 0 = off) for the content
    /// it last sent of each page, so that a page the guest rewrites during the move goes again
    /// as a Delta (its XOR with what the destination holds: a few bytes for a changed word)
    /// instead of whole. Unset: the source's own `primary --delta-cache`, by default 1G, which
    /// holds every non-zero page of a guest up to 1 GiB. Freed when the move ends.
    #[arg(long, value_parser = crate::protect::parse_delta_cache)]
    delta_cache: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn migrate(args: MigrateArgs) -> Result<i32> {
    if args.algorithm.is_postcopy() {
        eprintln!(
            "warning: {} runs the VM on {} before all its memory is there: if either host fails before the last page arrives, the VM is lost (protect it, or use precopy or quick-eviction, if that risk is not acceptable)",
            args.algorithm.name(),
            args.to
        );
    }
    let mut path = format!(
        "/migrate?algorithm={}&to={}&to_name={}&downtime_budget_ms={}&max_rounds={}&timeout_ms={}&on_no_convergence={}&eviction_target_ms={}",
        args.algorithm.name(),
        args.to,
        args.to_name,
        args.downtime_budget.as_millis(),
        args.max_rounds,
        args.timeout.as_millis(),
        match args.on_no_convergence {
            NoConvergence::StopAndCopy => "stop-and-copy",
            NoConvergence::Abort => "abort",
        },
        args.eviction_target.as_millis(),
    );
    if let Some(bytes) = args.delta_cache {
        path.push_str(&format!("&delta_cache={bytes}"));
    }
    let (code, body) = request(
        args.admin,
        "POST",
        &path,
        MOVE_PATIENCE + Duration::from_secs(5),
    )?;
    if code == 202 {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        println!("{}", v["message"].as_str().unwrap_or(&body));
        return Ok(0);
    }
    print_report(args.admin, code, &body, args.json)
}

#[derive(Args)]
pub struct EvictArgs {
    /// The PRIMARY's admin endpoint. A VM under quick eviction ships its last dirty pages and
    /// resumes on its destination; a protected VM switches over to its backup.
    #[arg(long)]
    admin: SocketAddr,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn evict(args: EvictArgs) -> Result<i32> {
    let (code, body) = request(
        args.admin,
        "POST",
        "/evict",
        MOVE_PATIENCE + Duration::from_secs(5),
    )?;
    print_report(args.admin, code, &body, args.json)
}

fn print_report(admin: SocketAddr, code: u16, body: &str, json: bool) -> Result<i32> {
    let r: MigrationReport = match serde_json::from_str(body) {
        Ok(r) => r,
        Err(_) => bail!("{admin} answered {code}: {body}"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", describe_move(&r));
    }
    Ok(if r.ok { 0 } else { 1 })
}

/// A move's report in a few lines: the five properties.
pub fn describe_move(r: &MigrationReport) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
    format!(
        "{} {}: {}\n  downtime {}  eviction {}  wire {:.1} MB  rounds {}  final pages {}{}  delta pages {}  guest throughput {}  VM lost if a host fails: {}",
        r.algorithm,
        if r.ok { "done" } else { "FAILED" },
        r.message,
        ms(r.downtime_ms),
        ms(r.eviction_ms),
        r.wire_bytes as f64 / 1e6,
        r.rounds,
        r.final_pages,
        r.tail_pages
            .map_or(String::new(), |t| format!(" (after a live tail of {t})")),
        r.delta_pages,
        r.throughput_ratio.map_or("-".into(), |t| format!("x{t:.2}")),
        if r.vm_lost_if_a_host_fails { "yes" } else { "no" },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_reads_as_a_sentence() {
        let s = NodeStatus {
            role: "primary".into(),
            vm_id: "vm-1".into(),
            state: "protected".into(),
            peer: Some("backup".into()),
            last_epoch: 42,
            lag_seconds: Some(0.0123),
            since_unix: 100.0,
            note: None,
        };
        assert_eq!(
            describe(&s, 130.0),
            "primary of vm-1: protected for 30 s; peer backup; last committed epoch 42; lag 12.3 ms"
        );
    }

    #[test]
    fn a_move_request_carries_its_delta_cache_only_when_given() {
        let base = "/migrate?algorithm=precopy&to=127.0.0.1:7410";
        assert_eq!(parse_migrate(base).unwrap().delta_cache, None);
        let bytes = crate::protect::parse_delta_cache("512M").unwrap();
        let r = parse_migrate(&format!("{base}&delta_cache={bytes}")).unwrap();
        assert_eq!(r.delta_cache, Some(512 << 20));
        assert_eq!(crate::protect::parse_delta_cache("0"), Ok(0));
        assert!(crate::protect::parse_delta_cache("8G").is_err());
        assert!(parse_migrate(&format!("{base}&delta_cache=lots")).is_err());
    }
}
