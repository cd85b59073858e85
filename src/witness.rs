//! `understudy witness`: the third vote. It grants each VM's lease to one node at a time; a
//! lease runs `ttl` from the witness's receipt of the request and is renewed by its holder.
//! Another node gets it only after it expired, so the old holder (which counts from its send
//! time, minus a margin) has stopped its guest by then.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use tracing::{info, warn};
use understudy_protocol::{LeaseReply, Limits, Message, Successor};
use understudy_transport::{messages, Endpoint, Identity, TransportOptions};

use crate::protect::TlsArgs;

#[derive(Args)]
pub struct WitnessArgs {
    /// Read any of these flags from a TOML file (keys = long flag names); the command line wins.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (UDP, QUIC).
    #[arg(long, default_value = "127.0.0.1:7500")]
    listen: SocketAddr,
    #[command(flatten)]
    tls: TlsArgs,
    /// Longest lease granted (requests asking for more get this).
    #[arg(long, default_value = "10s", value_parser = crate::protect::parse_duration)]
    max_ttl: Duration,
    /// Serve Prometheus metrics: a port (on 127.0.0.1) or HOST:PORT, e.g. 9102.
    #[arg(long, value_parser = crate::metrics::parse_addr)]
    metrics: Option<SocketAddr>,
}

/// Who holds which VM's lease, until when, and who may take it over after that.
#[derive(Default)]
pub struct Leases {
    held: HashMap<String, (String, Instant, Successor)>,
}

impl Leases {
    /// Grants `vm`'s lease to `holder` for `ttl` unless someone else holds an unexpired one, or
    /// the expired holder named a successor that is not `holder`.
    pub fn request(
        &mut self,
        vm: &str,
        holder: &str,
        ttl: Duration,
        successor: Successor,
        now: Instant,
    ) -> LeaseReply {
        match self.held.get(vm) {
            Some((h, until, _)) if h != holder && *until > now => LeaseReply {
                granted: false,
                holder: h.clone(),
                // Rounded up: 0 ms is how a refusal says "expired, but not yours to take".
                ttl_ms: (*until - now)
                    .as_micros()
                    .div_ceil(1000)
                    .min(u32::MAX as u128) as u32,
                seq: 0,
            },
            Some((h, _, next)) if h != holder && !next.admits(holder) => {
                warn!(
                    vm, holder, previous = %h, successor = ?next,
                    "lease refused: its last holder did not name this node as its successor \
                     (it ran unprotected, so this node's image is stale)"
                );
                LeaseReply {
                    granted: false,
                    holder: h.clone(),
                    ttl_ms: 0,
                    seq: 0,
                }
            }
            previous => {
                if previous.is_none_or(|(h, _, _)| h != holder) {
                    info!(vm, holder, "lease granted to a new holder");
                    metrics::counter!("understudy_lease_handovers_total").increment(1);
                }
                if previous.is_some_and(|(h, _, s)| h == holder && *s != successor) {
                    info!(vm, holder, successor = ?successor, "successor changed");
                }
                self.held
                    .insert(vm.to_string(), (holder.to_string(), now + ttl, successor));
                LeaseReply {
                    granted: true,
                    holder: holder.to_string(),
                    ttl_ms: ttl.as_millis().min(u32::MAX as u128) as u32,
                    seq: 0,
                }
            }
        }
    }
}

pub fn run(args: WitnessArgs) -> Result<i32> {
    let _ = &args.config;
    crate::metrics::install(args.metrics)?;
    crate::metrics::zero_counters(&["understudy_lease_handovers_total"]);
    let identity = Identity::load(&args.tls.files("witness"))?;
    let rt = crate::protect::runtime()?;
    rt.block_on(async move {
        let endpoint = Endpoint::server(args.listen, &identity, &TransportOptions::default())
            .context("listening")?;
        info!(addr = %args.listen, "witness listening");
        metrics::gauge!("understudy_role", "role" => "witness").set(1.0);
        let leases = Arc::new(Mutex::new(Leases::default()));
        while let Some(incoming) = endpoint.accept().await {
            let conn = match incoming {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "refused a connection");
                    continue;
                }
            };
            let leases = Arc::clone(&leases);
            let max_ttl = args.max_ttl;
            tokio::spawn(async move {
                let peer = conn.peer_name().to_string();
                info!(peer, "node connected");
                let limits = Limits::default();
                let Ok(control) = conn.accept_control(limits.max_frame_len).await else {
                    return;
                };
                let (mut tx, mut rx) = control.split();
                while let Ok(Some(frame)) = rx.read_frame().await {
                    let reply = match messages::decode(&frame, &limits) {
                        Ok(Message::Lease(l)) if l.holder == peer => {
                            let ttl = Duration::from_millis(l.ttl_ms.into()).min(max_ttl);
                            let mut r = leases
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .request(&l.vm_id, &peer, ttl, l.successor, Instant::now());
                            r.seq = l.seq;
                            r
                        }
                        Ok(Message::Lease(l)) => {
                            warn!(peer, claimed = %l.holder, "lease request in another node's name");
                            break;
                        }
                        _ => {
                            warn!(peer, "unexpected message; closing");
                            break;
                        }
                    };
                    if messages::send(&mut tx, &Message::LeaseReply(reply)).await.is_err() {
                        break;
                    }
                }
                info!(peer, "node disconnected");
            });
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_until_expiry() {
        let mut l = Leases::default();
        let t = Instant::now();
        let ttl = Duration::from_millis(300);
        let any = || Successor::Any;
        let ms = Duration::from_millis;
        assert!(l.request("vm", "primary", ttl, any(), t).granted);
        assert!(l.request("vm", "primary", ttl, any(), t + ms(100)).granted);
        let r = l.request("vm", "backup", ttl, any(), t + ms(200));
        assert!(!r.granted && r.holder == "primary" && r.ttl_ms == 200);
        // Less than a millisecond left still reads as time left, never as "not yours".
        let r = l.request(
            "vm",
            "backup",
            ttl,
            any(),
            t + ms(400) - Duration::from_micros(10),
        );
        assert!(!r.granted && r.ttl_ms == 1);
        assert!(l.request("vm", "backup", ttl, any(), t + ms(401)).granted);
        assert!(!l.request("vm", "primary", ttl, any(), t + ms(402)).granted);
        assert!(l.request("other-vm", "primary", ttl, any(), t).granted);
    }

    #[test]
    fn only_the_named_successor_takes_an_expired_lease() {
        let mut l = Leases::default();
        let t = Instant::now();
        let ttl = Duration::from_millis(300);
        let ms = Duration::from_millis;
        let only = |n: &str| Successor::Only(n.to_string());
        assert!(l.request("vm", "primary", ttl, only("backup"), t).granted);
        assert!(
            !l.request("vm", "stranger", ttl, Successor::Any, t + ms(400))
                .granted
        );
        assert!(
            l.request("vm", "backup", ttl, Successor::Nobody, t + ms(400))
                .granted
        );
        // A holder that runs unprotected: nobody takes over, even long after expiry.
        assert!(
            !l.request("vm", "primary", ttl, Successor::Any, t + ms(10_000))
                .granted
        );
        assert!(
            l.request("vm", "backup", ttl, Successor::Nobody, t + ms(10_001))
                .granted
        );
    }
}
