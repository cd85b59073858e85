//! `understudy relay`: a user-space UDP relay for tests and drills, between a primary and its
//! backup (`tc netem` does not exist on our kernels). It forwards datagrams both ways with a
//! delay, jitter, random loss, a bandwidth limit, and a blackhole switched on while a file
//! exists. QUIC copes with the reordering jitter causes, as it would on a real network.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio::net::UdpSocket;
use tracing::info;

use crate::protect::parse_duration;

#[derive(Args, Clone, Debug)]
pub struct RelayArgs {
    /// Where the relay listens (point the primary's --backup here).
    #[arg(long)]
    listen: SocketAddr,
    /// Where it forwards to (the backup's --listen address).
    #[arg(long)]
    to: SocketAddr,
    /// One-way delay added to every datagram, each direction.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    delay: Duration,
    /// Up to this much more delay, uniformly at random per datagram (reorders them).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    jitter: Duration,
    /// Fraction of datagrams dropped at random, each direction (0.0..=1.0).
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    loss: f64,
    /// Bandwidth limit per direction in bytes/s (0 = none); excess waits in a queue.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// With --rate: the longest a datagram may wait in the queue; later arrivals are dropped
    /// (a router's drop-tail buffer, so that the queue cannot hold seconds of traffic).
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    max_queue: Duration,
    /// While this file exists, every datagram is dropped (a link cut on demand).
    #[arg(long)]
    blackhole_file: Option<PathBuf>,
    /// Seed of the loss and jitter draws (runs are repeatable).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{s} is out of range: use 0.0..=1.0"));
    }
    Ok(v)
}

/// What one direction of the link does to a datagram.
struct Link {
    args: RelayArgs,
    rng: Mutex<u64>,
    /// When the link is free again (bandwidth limit).
    free_at: Mutex<Instant>,
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

impl Link {
    fn new(args: &RelayArgs, salt: u64) -> Self {
        Link {
            args: args.clone(),
            rng: Mutex::new(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt | 1),
            free_at: Mutex::new(Instant::now()),
            forwarded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// A uniform draw in [0, 1) (xorshift64*).
    fn draw(&self) -> f64 {
        let mut x = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        *x ^= *x >> 12;
        *x ^= *x << 25;
        *x ^= *x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (v >> 11) as f64 / (1u64 << 53) as f64
    }

    /// When `len` bytes arriving now leave, or `None` to drop them.
    fn schedule(&self, len: usize) -> Option<Instant> {
        let blackholed = self
            .args
            .blackhole_file
            .as_ref()
            .is_some_and(|f| f.exists());
        if blackholed || (self.args.loss > 0.0 && self.draw() < self.args.loss) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let now = Instant::now();
        let mut depart = now;
        if self.args.rate > 0 {
            let mut free = self.free_at.lock().unwrap_or_else(|e| e.into_inner());
            let start = (*free).max(now);
            if start - now > self.args.max_queue {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            *free = start + Duration::from_secs_f64(len as f64 / self.args.rate as f64);
            depart = *free;
        }
        let jitter = self.args.jitter.mul_f64(self.draw());
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        Some(depart + self.args.delay + jitter)
    }
}

pub fn run(args: RelayArgs) -> Result<i32> {
    crate::protect::runtime()?.block_on(relay(args))?;
    Ok(0)
}

/// A UDP socket with large kernel buffers (bursts of a replication stream would overflow the
/// defaults and look like loss that was not asked for).
fn socket(addr: SocketAddr) -> Result<UdpSocket> {
    let s = std::net::UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
    // Plain setsockopt: no GRO, so that every datagram is forwarded as it came.
    let r = socket2::SockRef::from(&s);
    let _ = r.set_recv_buffer_size(8 << 20);
    let _ = r.set_send_buffer_size(8 << 20);
    s.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(s)?)
}

/// A datagram waiting for its departure time (earliest first).
struct Pending(Instant, u64, Vec<u8>);

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.0, o.1).cmp(&(self.0, self.1))
    }
}

/// Receives datagrams on `rx` and sends each at its departure time through `send`.
async fn departures<F, Fut>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    send: F,
) where
    F: Fn(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut queue = std::collections::BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let next = queue.peek().map(|p: &Pending| p.0);
        tokio::select! {
            got = rx.recv() => match got {
                Some((at, data)) => {
                    seq += 1;
                    queue.push(Pending(at, seq, data));
                }
                None => return,
            },
            _ = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = Instant::now();
                while queue.peek().is_some_and(|p| p.0 <= now) {
                    let Pending(_, _, data) = queue.pop().expect("peeked");
                    send(data).await;
                }
            }
        }
    }
}

async fn relay(args: RelayArgs) -> Result<()> {
    let front = Arc::new(socket(args.listen)?);
    let bind: SocketAddr = if args.to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let back = Arc::new(socket(bind)?);
    back.connect(args.to)
        .await
        .with_context(|| format!("connecting to {}", args.to))?;
    info!(listen = %args.listen, to = %args.to, delay = ?args.delay, jitter = ?args.jitter,
        loss = args.loss, rate = args.rate, "relay up");
    let up = Arc::new(Link::new(&args, 1));
    let down = Arc::new(Link::new(&args, 2));
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();

    let (up_tx, up_rx) = tokio::sync::mpsc::unbounded_channel();
    let (down_tx, down_rx) = tokio::sync::mpsc::unbounded_channel();
    {
        let back = Arc::clone(&back);
        tokio::spawn(departures(up_rx, move |data| {
            let back = Arc::clone(&back);
            async move {
                let _ = back.send(&data).await;
            }
        }));
    }
    {
        let (front, client) = (Arc::clone(&front), Arc::clone(&client));
        tokio::spawn(departures(down_rx, move |data| {
            let (front, client) = (Arc::clone(&front), Arc::clone(&client));
            async move {
                let to = *client.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(to) = to {
                    let _ = front.send_to(&data, to).await;
                }
            }
        }));
    }
    let toward_backup = {
        let (front, up, client) = (Arc::clone(&front), Arc::clone(&up), Arc::clone(&client));
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let (n, from) = front.recv_from(&mut buf).await?;
                *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                if let Some(at) = up.schedule(n) {
                    if up_tx.send((at, buf[..n].to_vec())).is_err() {
                        return Ok::<(), std::io::Error>(());
                    }
                }
            }
        })
    };
    let toward_primary = {
        let (back, down) = (Arc::clone(&back), Arc::clone(&down));
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let n = match back.recv(&mut buf).await {
                    Ok(n) => n,
                    // ICMP port unreachable from a backup that is not up yet: keep going.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err::<(), _>(e),
                };
                if let Some(at) = down.schedule(n) {
                    if down_tx.send((at, buf[..n].to_vec())).is_err() {
                        return Ok(());
                    }
                }
            }
        })
    };
    let mut report = tokio::time::interval(Duration::from_secs(5));
    report.tick().await;
    loop {
        tokio::select! {
            _ = report.tick() => {
                info!(
                    up_forwarded = up.forwarded.load(Ordering::Relaxed),
                    up_dropped = up.dropped.load(Ordering::Relaxed),
                    down_forwarded = down.forwarded.load(Ordering::Relaxed),
                    down_dropped = down.dropped.load(Ordering::Relaxed),
                    "relay"
                );
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        if toward_backup.is_finished() || toward_primary.is_finished() {
            bail!("a relay direction failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(loss: f64, rate: u64) -> RelayArgs {
        RelayArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            to: "127.0.0.1:1".parse().unwrap(),
            delay: Duration::from_millis(5),
            jitter: Duration::ZERO,
            loss,
            rate,
            max_queue: Duration::from_secs(3600),
            blackhole_file: None,
            seed: 7,
        }
    }

    #[test]
    fn loss_is_close_to_the_fraction_asked() {
        let l = Link::new(&args(0.05, 0), 1);
        let dropped = (0..100_000).filter(|_| l.schedule(1200).is_none()).count();
        assert!((4_500..5_500).contains(&dropped), "{dropped}");
    }

    #[test]
    fn the_rate_limit_spaces_departures() {
        let l = Link::new(&args(0.0, 1_000_000), 1);
        let t0 = Instant::now();
        let last = (0..100)
            .map(|_| l.schedule(10_000).unwrap())
            .last()
            .unwrap();
        // 100 x 10 kB at 1 MB/s: the last one leaves ~1 s (+ 5 ms delay) later.
        let after = last - t0;
        assert!(
            after >= Duration::from_millis(1000) && after < Duration::from_millis(1100),
            "{after:?}"
        );
    }
}
