//! The admin endpoint (`--admin ADDR` on primary and backup) and its clients:
//! `understudy status` and `understudy promote` (planned switchover).
//!
//! Plain HTTP/1.0 with JSON bodies, bound to an address the operator names (loopback by
//! convention): `GET /status` on any node; `POST /switchover` on a primary.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};
use understudy_primary::status::{NodeStatus, StatusBoard, Switchover, SwitchoverReport};

/// How long `POST /switchover` waits for the switchover to finish.
const SWITCHOVER_PATIENCE: Duration = Duration::from_secs(60);

/// What the endpoint serves.
#[derive(Clone)]
pub struct Admin {
    pub status: StatusBoard,
    /// Present on a primary.
    pub switchover: Option<Arc<Switchover>>,
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
            tokio::spawn(async move {
                if let Err(e) = handle(stream, &admin).await {
                    warn!(%peer, error = %e, "admin request failed");
                }
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
        _ => (404, error_json("use GET /status or POST /switchover")),
    };
    let reason = match code {
        200 => "OK",
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
}
