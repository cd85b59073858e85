//! One protection session: connect, hello, boot, full sync, epochs, acks, output release.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{error, info, warn};
use understudy_protocol::{
    EncoderConfig, EncoderState, Goodbye, GoodbyeReason, Heartbeat, Hello, Limits, Message, Mode,
    Successor, MIN_PROTOCOL_VERSION, PAGE_SIZE, PROTOCOL_VERSION,
};
use understudy_transport::lease::LeaseBackend;
use understudy_transport::{messages, ErrorChain};
use understudy_transport::{
    Connection, Endpoint, FrameReader, FrameSender, Identity, TransportOptions,
};
use understudy_vmm::{Boot, OutputGate, Vm, VmConfig, VmError};

use crate::basecache::BaseCache;
use crate::capture::{
    capture_loop, sync_epochs, CaptureCtl, CaptureEnd, Captured, PageMap, StagingPool, SyncPlan,
};
use crate::journal::Journal;
use crate::lease::{keep_lease, Keeper, LeaseSource, Succession};
use crate::resync::ResyncBook;
use crate::status::{StatusBoard, SwitchoverReport};
use crate::{KillAt, KillPhase, PrimaryConfig};

/// Why protection stopped.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error("loading our TLS identity")]
    Identity(#[source] understudy_transport::certs::LoadError),
    #[error("setting up the QUIC endpoint")]
    Bind(#[source] understudy_transport::BindError),
    #[error("connecting to the backup at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: Box<understudy_transport::ConnectError>,
    },
    #[error("the VM's lease: {0}")]
    Lease(String),
    #[error("the backup refused us: {0}")]
    Rejected(String),
    #[error("the link to the backup failed: {0}")]
    Link(String),
    #[error("the backup sent something unexpected: {0}")]
    Protocol(String),
    #[error("the VM failed")]
    Vm(#[from] VmError),
    #[error("reading guest memory")]
    Memory(#[from] understudy_vmm::memory::MemoryError),
    #[error("encoding an epoch")]
    Encode(#[from] understudy_protocol::EncodeError),
    #[error("writing the dump")]
    Dump(#[source] std::io::Error),
    #[error("the guest stopped: {0:?}")]
    GuestStopped(understudy_vmm::ExitReason),
    #[error("protection was stopped")]
    Stopped,
    #[error("the move was abandoned: {0}")]
    MoveAborted(String),
    /// Not a failure: the VM runs on the destination now and nothing of it is left here.
    #[error("the VM moved to another host")]
    Moved(Summary),
    #[error("fenced: cut off from the witness and the backup, the guest was stopped so that the backup can take over")]
    Fenced,
}

/// What a finished session did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Summary {
    /// Sessions with a backup (more than one after reconnecting).
    pub sessions: u64,
    pub sync_epochs: u64,
    pub last_epoch: u64,
    pub last_acked: u64,
    pub wire_bytes: u64,
    pub raw_bytes: u64,
}

struct Encoded {
    epoch: u64,
    /// Dirty pages in the epoch (before the codec).
    pages: u32,
    chunks: Vec<Vec<u8>>,
    commit: Vec<u8>,
    captured_at: Instant,
    slot: OwnedSemaphorePermit,
}

/// Epochs sent and not yet acknowledged, and how fast the backup absorbs them.
#[derive(Default)]
pub(crate) struct InFlight {
    /// Epoch -> when it was captured, its slot, its dirty pages.
    epochs: BTreeMap<u64, (Instant, OwnedSemaphorePermit, u32)>,
    /// When the last Ack arrived.
    last_ack: Option<Instant>,
    /// Pages per second from capture (or the previous Ack, if later) to Ack: the rate at which
    /// the encoder, the link and the backup together ship pages.
    link_rate: crate::migrate::Ewma,
    /// The shortest capture-to-Ack time seen.
    min_latency: Option<Duration>,
}

impl InFlight {
    /// The smoothed pages per second the backup has been absorbing.
    pub(crate) fn link_rate(&self) -> Option<f64> {
        self.link_rate.get()
    }

    /// The shortest capture-to-Ack time seen: the fixed cost of shipping an epoch.
    pub(crate) fn min_latency(&self) -> Option<Duration> {
        self.min_latency
    }
}

fn encoder_thread(
    mut encoder: EncoderState,
    threads: usize,
    mut rx: mpsc::Receiver<Captured>,
    tx: mpsc::Sender<Encoded>,
    totals: Arc<Totals>,
    book: Arc<Mutex<ResyncBook>>,
    mut cache: BaseCache,
) -> Result<(understudy_protocol::PageTree, BaseCache), PrimaryError> {
    metrics::gauge!("understudy_delta_cache_bytes").set(0.0);
    while let Some(c) = rx.blocking_recv() {
        let dirty = cache.pages(encoder.tree(), &c.indices, c.pages.bytes(), c.zeroes);
        let e = encoder.encode_epoch(c.epoch, &dirty, threads)?;
        drop(dirty);
        let s = e.stats;
        metrics::counter!("understudy_pages_total", "kind" => "zero").increment(s.zero);
        metrics::counter!("understudy_pages_total", "kind" => "unchanged").increment(s.unchanged);
        metrics::counter!("understudy_pages_total", "kind" => "ref").increment(s.refs);
        metrics::counter!("understudy_pages_total", "kind" => "full").increment(s.full);
        metrics::counter!("understudy_pages_total", "kind" => "delta").increment(s.delta);
        let raw = if c.zeroes {
            0
        } else {
            (c.indices.len() * PAGE_SIZE) as u64
        };
        metrics::counter!("understudy_bytes_raw_total").increment(raw);
        metrics::counter!("understudy_bytes_encoded_total").increment(s.wire_bytes);
        totals.raw.fetch_add(raw, Ordering::Relaxed);
        totals.wire.fetch_add(s.wire_bytes, Ordering::Relaxed);
        totals.delta.fetch_add(s.delta, Ordering::Relaxed);
        let commit = e.commit(c.state);
        if !commit.state.is_empty() {
            // A consistent epoch: a backup holding its image can later resume from it.
            book.lock()
                .unwrap_or_else(|p| p.into_inner())
                .encoded(commit.digest, c.clock);
        }
        let commit = messages::encode(&Message::Commit(commit));
        let out = Encoded {
            epoch: c.epoch,
            pages: c.indices.len() as u32,
            chunks: e.chunks,
            commit,
            captured_at: c.captured_at,
            slot: c.slot,
        };
        if tx.blocking_send(out).is_err() || c.last {
            break;
        }
        // Off the epoch's path: what the backup holds once this epoch commits is the base of
        // the next one (epochs are applied in order, and all that are encoded are sent).
        if cache.enabled() {
            cache.encoded(encoder.tree(), &c.indices, c.pages.bytes(), c.zeroes);
            metrics::gauge!("understudy_delta_cache_bytes").set(cache.bytes() as f64);
        }
    }
    // The session waits for this channel to end before it hands a paused guest over: close it
    // before the wrap-up (cloning the page tree takes milliseconds at 1 GiB).
    drop(tx);
    Ok((encoder.tree().clone(), cache))
}

/// Stops the capture thread when dropped.
struct Halt {
    stop: Arc<AtomicBool>,
    slots: Arc<Semaphore>,
}

impl Drop for Halt {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.slots.close();
    }
}

#[derive(Default)]
struct Totals {
    raw: AtomicU64,
    wire: AtomicU64,
    /// `Delta` records sent.
    delta: AtomicU64,
}

async fn send_epoch(
    conn: &Connection,
    control: &tokio::sync::Mutex<FrameSender>,
    e: &Encoded,
    kill_at: Option<KillAt>,
    sync: u64,
) -> Result<u64, PrimaryError> {
    let bytes = e.commit.len() as u64 + send_chunks(conn, e.chunks.clone()).await?;
    if e.epoch > sync {
        KillAt::check(kill_at, KillPhase::Send, e.epoch);
    }
    control
        .lock()
        .await
        .send(&e.commit)
        .await
        .map_err(|err| PrimaryError::Link(err.to_string()))?;
    if e.epoch > sync {
        KillAt::check(kill_at, KillPhase::Commit, e.epoch);
    }
    metrics::counter!("understudy_bytes_wire_total").increment(e.commit.len() as u64);
    Ok(bytes)
}

/// Sends each chunk frame on its own uni stream, in parallel; returns the bytes sent (also
/// counted in `understudy_bytes_wire_total`).
pub(crate) async fn send_chunks(
    conn: &Connection,
    chunks: Vec<Vec<u8>>,
) -> Result<u64, PrimaryError> {
    let mut sends = tokio::task::JoinSet::new();
    let mut bytes = 0;
    for chunk in chunks {
        bytes += chunk.len() as u64;
        let conn = conn.clone();
        sends.spawn(async move {
            let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
            s.send(&chunk).await.map_err(|e| e.to_string())?;
            s.finish().map_err(|e| e.to_string())
        });
    }
    while let Some(r) = sends.join_next().await {
        r.map_err(|e| PrimaryError::Link(e.to_string()))?
            .map_err(PrimaryError::Link)?;
    }
    metrics::counter!("understudy_bytes_wire_total").increment(bytes);
    Ok(bytes)
}

fn dump(dir: &Path, vm: &Vm, state: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("memory.img"))?);
    vm.memory().write_image(&mut f)?;
    std::fs::write(dir.join("state.bin"), state)
}

/// Reads the backup's control stream: on `Ack(E)` releases E's console bytes, frees E's
/// in-flight slot and records commit latency and lag. Returns when the link fails.
struct AckCtx {
    /// The control stream's sending half: after releasing E's output we tell the backup.
    tx: Arc<tokio::sync::Mutex<FrameSender>>,
    in_flight: Arc<Mutex<InFlight>>,
    last_acked: Arc<AtomicU64>,
    /// Woken whenever `last_acked` moves (a move's hand-over waits on it).
    acked: Arc<tokio::sync::Notify>,
    gate: Arc<OutputGate>,
    /// Gate epoch = `gate_base` + protocol epoch.
    gate_base: u64,
    journal: Arc<Mutex<Journal>>,
    sync: u64,
    backup_heard: Arc<Mutex<Instant>>,
    kill_at: Option<KillAt>,
    /// The clock heartbeats are stamped with.
    clock: Instant,
    succession: Arc<Succession>,
    /// The backup's certificate name: our successor once it holds a consistent epoch.
    peer: String,
    status: StatusBoard,
    /// A move, not protection: epochs after the full sync are live rounds, not checkpoints.
    moving: bool,
    /// Test knob: do not echo the Ack after releasing.
    no_release_echo: bool,
}

async fn ack_loop(rx: &mut FrameReader, cx: &mut AckCtx) -> Result<(), PrimaryError> {
    let AckCtx {
        tx,
        in_flight,
        last_acked,
        acked,
        gate,
        gate_base,
        journal,
        sync,
        backup_heard,
        kill_at,
        clock,
        succession,
        peer,
        status,
        moving,
        no_release_echo,
    } = cx;
    let (sync, kill_at, gate_base, clock) = (*sync, *kill_at, *gate_base, *clock);
    let (moving, no_release_echo) = (*moving, *no_release_echo);
    let limits = Limits::default();
    loop {
        let frame: understudy_transport::Bytes = match rx.read_frame().await {
            Ok(Some(f)) => f,
            Ok(None) => return Err(PrimaryError::Link("control stream closed".into())),
            Err(e) => return Err(PrimaryError::Link(e.to_string())),
        };
        match messages::decode(&frame, &limits) {
            Ok(Message::Ack(a)) => {
                *backup_heard.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                let released: Vec<_> = {
                    let mut f = in_flight.lock().unwrap_or_else(|e| e.into_inner());
                    let rest = f.epochs.split_off(&(a.epoch + 1));
                    std::mem::replace(&mut f.epochs, rest).into_iter().collect()
                };
                let now = Instant::now();
                {
                    // One Ack may acknowledge several epochs: rate them together, from when
                    // the oldest was captured (or the previous Ack, if later) to now.
                    let mut f = in_flight.lock().unwrap_or_else(|e| e.into_inner());
                    // Only epochs after the full sync count: their pages are like the final
                    // epoch's (recently dirtied), while the sync's are mostly zero pages that
                    // cost next to nothing on the wire.
                    let released: Vec<_> = released.iter().filter(|(e, _)| *e > sync).collect();
                    let pages: u64 = released.iter().map(|(_, e)| u64::from(e.2)).sum();
                    if let Some((_, (oldest, _, _))) = released.first() {
                        // Rated only when nothing else was in flight since their capture: an
                        // epoch that overlapped others (a batched round) would be credited
                        // with the pipeline's throughput, which one final, unpipelined epoch
                        // does not get. The rate includes the epoch's fixed cost, so it errs
                        // low (quick eviction then snapshots more often, not too rarely).
                        let alone = f.last_ack.is_none_or(|l| l <= *oldest);
                        let busy = now.saturating_duration_since(*oldest).as_secs_f64();
                        if alone && pages >= crate::migrate::RATED_MIN_PAGES && busy > 0.0 {
                            f.link_rate.add(pages as f64 / busy, 0.3);
                        }
                        let took = now.saturating_duration_since(*oldest);
                        let newest = released
                            .last()
                            .map_or(took, |(_, e)| now.saturating_duration_since(e.0));
                        f.min_latency = Some(f.min_latency.map_or(newest, |m| m.min(newest)));
                    }
                    f.last_ack = Some(now);
                }
                for (_epoch, (captured_at, _slot, _pages)) in released {
                    let latency = captured_at.elapsed().as_secs_f64();
                    metrics::histogram!("understudy_commit_latency_seconds").record(latency);
                    metrics::gauge!("understudy_replication_lag_seconds").set(latency);
                    status.update(|s| s.lag_seconds = Some(latency));
                }
                if a.epoch > sync {
                    if !moving && last_acked.load(Ordering::SeqCst) <= sync {
                        info!(
                            epoch = a.epoch,
                            "PROTECTED: the backup committed our first consistent epoch"
                        );
                        metrics::gauge!("understudy_protected").set(1.0);
                        succession.want(Successor::Only(peer.clone()));
                        status.set_state("protected", None);
                    }
                    KillAt::check(kill_at, KillPhase::Ack, a.epoch);
                    let at = Journal::now();
                    if let (_, Some(oldest)) = gate.held() {
                        metrics::histogram!("understudy_output_hold_seconds")
                            .record(oldest.as_secs_f64());
                    }
                    let n = gate.release(gate_base + a.epoch).unwrap_or(0);
                    metrics::gauge!("understudy_output_held_bytes").set(gate.held().0 as f64);
                    journal
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(a.epoch, n, at);
                    // An Ack from the primary means "E's output is released": on promotion the
                    // backup emits only the committed output past it.
                    if !no_release_echo {
                        let _ = messages::send(&mut *tx.lock().await, &Message::Ack(a)).await;
                    }
                }
                last_acked.store(a.epoch, Ordering::SeqCst);
                acked.notify_waiters();
                status.update(|s| s.last_epoch = a.epoch);
                metrics::gauge!("understudy_last_committed_epoch").set(a.epoch as f64);
                metrics::counter!("understudy_epochs_total", "outcome" => "acked").increment(1);
                tracing::debug!(epoch = a.epoch, "acknowledged");
            }
            Ok(Message::Heartbeat(h)) => {
                *backup_heard.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                if let Some(rtt) = h.rtt_ns(clock.elapsed().as_nanos() as u64) {
                    metrics::gauge!("understudy_heartbeat_rtt_seconds").set(rtt as f64 / 1e9);
                }
            }
            Ok(Message::Goodbye(g)) => {
                return Err(PrimaryError::Link(format!(
                    "backup said goodbye: {}",
                    g.text
                )))
            }
            Ok(other) => {
                return Err(PrimaryError::Protocol(format!(
                    "unexpected {:?} on the control stream",
                    other.kind()
                )))
            }
            Err(e) => return Err(PrimaryError::Protocol(e.to_string())),
        }
    }
}

/// An accepted session with a backup: the connection and its control stream.
pub(crate) struct Link {
    pub(crate) conn: Connection,
    pub(crate) tx: FrameSender,
    pub(crate) rx: FrameReader,
    pub(crate) version: u16,
    /// The backup kept the image with this digest and this primary knows it: the session
    /// sends a delta instead of a full sync.
    pub(crate) resume: Option<understudy_protocol::Digest>,
}

/// Connects to the backup and says hello; returns the accepted link. With `book`, offers to
/// resume: a backup that kept an image says which, and if this primary still knows it the
/// session sends only what changed since; if not, it reconnects without the offer, which makes
/// the backup start from zeros (a full sync).
async fn open_link(
    endpoint: &Endpoint,
    cfg: &PrimaryConfig,
    map: &PageMap,
    book: Option<&Mutex<ResyncBook>>,
) -> Result<Link, PrimaryError> {
    let to = (cfg.backup, cfg.backup_name.as_str());
    let offer = book.and_then(|b| b.lock().unwrap_or_else(|e| e.into_inner()).newest());
    let Some((digest, clock)) = offer else {
        return open_link_to(endpoint, cfg, map, to, Mode::Protect, None).await;
    };
    let base = understudy_protocol::EpochDigest {
        epoch: clock,
        digest,
    };
    let mut link = open_link_to(endpoint, cfg, map, to, Mode::Protect, Some(base)).await?;
    let Some(held) = link.resume else {
        return Ok(link);
    };
    let known = book.is_some_and(|b| b.lock().unwrap_or_else(|e| e.into_inner()).knows(&held));
    if known {
        return Ok(link);
    }
    warn!(
        digest = %held,
        "the backup kept an image this primary did not send or no longer remembers; reconnecting for a full sync"
    );
    link.conn
        .close(6, "unknown image: reconnecting for a full sync");
    link.resume = None;
    open_link_to(endpoint, cfg, map, to, Mode::Protect, None).await
}

/// Connects to `to` (address, certificate name) and says hello for `mode`.
async fn open_link_to(
    endpoint: &Endpoint,
    cfg: &PrimaryConfig,
    map: &PageMap,
    to: (SocketAddr, &str),
    mode: Mode,
    base: Option<understudy_protocol::EpochDigest>,
) -> Result<Link, PrimaryError> {
    let limits = Limits::default();
    let conn = endpoint
        .connect(to.0, to.1)
        .await
        .map_err(|source| PrimaryError::Connect {
            addr: to.0,
            source: Box::new(source),
        })?;
    info!(peer = conn.peer_name(), addr = %to.0, ?mode, "connected to the backup");
    let control = conn
        .open_control(limits.max_frame_len)
        .await
        .map_err(|e| PrimaryError::Link(e.to_string()))?;
    let (mut tx, mut rx) = control.split();
    let hello = Hello {
        min_version: cfg.versions.map_or(MIN_PROTOCOL_VERSION, |v| v.0),
        max_version: cfg.versions.map_or(PROTOCOL_VERSION, |v| v.1),
        mode,
        vm_id: cfg.vm_id.clone(),
        layout: map.layout(),
        base,
    };
    messages::send(&mut tx, &Message::Hello(hello))
        .await
        .map_err(|e| PrimaryError::Link(e.to_string()))?;
    let reply = rx
        .read_frame()
        .await
        .map_err(|e| PrimaryError::Link(e.to_string()))?
        .ok_or_else(|| PrimaryError::Link("the backup closed the control stream".into()))?;
    let (version, resume) = match messages::decode(&reply, &limits)
        .map_err(|e| PrimaryError::Protocol(e.to_string()))?
    {
        Message::Welcome(w) if w.resumed && base.is_some() => {
            info!(
                backup_epoch = w.epoch,
                digest = %w.digest,
                "the backup kept an image from an earlier session"
            );
            (w.version, Some(w.digest))
        }
        Message::Welcome(w) => (w.version, None),
        Message::Reject(r) => {
            warn!(code = ?r.code, reason = %r.reason, "the backup refused the session");
            return Err(PrimaryError::Rejected(r.reason));
        }
        other => return Err(PrimaryError::Protocol(format!("{:?}", other.kind()))),
    };
    info!(version, vm = %cfg.vm_id, "backup accepted the session");
    metrics::gauge!("understudy_peer_connected").set(1.0);
    Ok(Link {
        conn,
        tx,
        rx,
        version,
        resume,
    })
}

/// What a primary does when it loses its backup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnBackupLoss {
    /// Keep the guest running unprotected (output is no longer held back) and reconnect.
    #[default]
    Continue,
    /// Pause the guest until a backup is protecting it again.
    Pause,
}

/// State that outlives one session with a backup.
struct Shared {
    map: PageMap,
    gate: Arc<OutputGate>,
    /// What this primary sent, across sessions: a backup that kept an image gets a delta.
    book: Arc<Mutex<ResyncBook>>,
    stop: Arc<AtomicBool>,
    fenced: Arc<AtomicBool>,
    backup_heard: Arc<Mutex<Instant>>,
    succession: Arc<Succession>,
    journal: Arc<Mutex<Journal>>,
    staging: StagingPool,
    totals: Arc<Totals>,
    clock: Instant,
    /// The last session's delta base cache, being freed off the epoch path (dropping a
    /// cache of a whole guest takes tens of ms, which a switchover must not wait for); a
    /// move's eviction ends only once it is gone, since it holds guest memory.
    cache_freed: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Shared {
    /// Waits until the last session's delta base cache is freed.
    fn wait_cache_freed(&self) {
        let h = self
            .cache_freed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }
}

/// How one session ended (the VM is handed back in every case).
pub(crate) enum SessionEnd {
    /// Stopped on request (or after `stop_after_epochs`): the guest is paused at `end`.
    Finished(CaptureEnd),
    /// The backup or the link failed; the guest is running.
    Lost(PrimaryError),
    /// A planned switchover: the backup runs the VM now (or says why not); the guest here is
    /// paused for good.
    HandedOver(SwitchoverReport),
}

/// The end of a planned switchover, after the last epoch was acknowledged with the guest
/// paused: tell the backup to take over from it, hand it the lease, and wait for its "running"
/// (it closes the connection with code 4 once its VM runs).
async fn hand_over(
    conn: &Connection,
    tx: &tokio::sync::Mutex<FrameSender>,
    end: &CaptureEnd,
    acked: u64,
    sh: &Shared,
) -> SwitchoverReport {
    let fail = |message: String| SwitchoverReport {
        ok: false,
        epoch: acked,
        downtime_ms: None,
        message,
    };
    if acked < end.last_epoch {
        return fail(format!(
            "the backup did not acknowledge the final epoch {} (last acknowledged {acked}); the guest stays paused here",
            end.last_epoch
        ));
    }
    info!(
        epoch = acked,
        "switchover: the backup takes over from the final epoch"
    );
    let promote = Message::Promote(understudy_protocol::Promote { epoch: acked });
    if let Err(e) = messages::send(&mut *tx.lock().await, &promote).await {
        return fail(format!("could not ask the backup to take over: {e}"));
    }
    sh.succession.release();
    let t = Instant::now();
    while !sh.succession.released() && t.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The backup closes the connection with code 4 once its VM runs.
    let left = Duration::from_secs(10).saturating_sub(t.elapsed());
    let _ = tokio::time::timeout(left, conn.closed()).await;
    let downtime = end.paused_at.elapsed();
    match conn.close_reason() {
        Some(understudy_transport::quinn::ConnectionError::ApplicationClosed(c))
            if u64::from(c.error_code) == 4 =>
        {
            let ms = downtime.as_secs_f64() * 1e3;
            info!(epoch = acked, downtime_ms = format!("{ms:.1}"), "switchover done: the backup runs the VM");
            SwitchoverReport {
                ok: true,
                epoch: acked,
                downtime_ms: Some(ms),
                message: format!(
                    "the backup runs the VM from epoch {acked}; downtime at most {ms:.1} ms"
                ),
            }
        }
        other => fail(format!(
            "the backup did not confirm it runs the VM ({other:?}); the guest stays paused here: check the backup's log"
        )),
    }
}

fn client_endpoint(cfg: &PrimaryConfig) -> Result<Endpoint, PrimaryError> {
    let identity = Identity::load(&cfg.tls).map_err(PrimaryError::Identity)?;
    let bind: SocketAddr = if cfg.backup.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    Endpoint::client(bind, &identity, &TransportOptions::default()).map_err(PrimaryError::Bind)
}

/// Boots the guest and protects it until it stops, the primary is stopped, or
/// `stop_after_epochs` is reached. When the backup is lost, the guest runs on unprotected (or
/// pauses, per `on_backup_loss`) while this end reconnects; a new session starts with a full
/// sync.
pub async fn run(mut cfg: PrimaryConfig, stop: Arc<AtomicBool>) -> Result<Summary, PrimaryError> {
    metrics::gauge!("understudy_role", "role" => "primary").set(1.0);
    metrics::gauge!("understudy_protected").set(0.0);
    metrics::gauge!("understudy_peer_connected").set(0.0);
    let endpoint = client_endpoint(&cfg)?;
    let map = PageMap::new(&cfg.regions);
    let backup_heard = Arc::new(Mutex::new(Instant::now()));
    let fenced = Arc::new(AtomicBool::new(false));

    // Fencing: hold the VM's lease while the guest runs, naming this backup as successor.
    let successor = Successor::Only(cfg.backup_name.clone());
    let succession = Succession::new(successor.clone(), cfg.witness.is_some());
    let lease_task = match cfg.witness {
        None => tokio::spawn(async {}),
        Some(addr) => {
            let src = LeaseSource {
                endpoint: endpoint.clone(),
                witness: addr,
                vm_id: cfg.vm_id.clone(),
                margin: Duration::from_millis(100),
            };
            let mut lease = src.connect().await.map_err(PrimaryError::Lease)?;
            let granted = lease
                .request(cfg.lease_ttl, &successor)
                .await
                .map_err(|e| PrimaryError::Lease(e.to_string()))?;
            if !granted.granted {
                return Err(PrimaryError::Lease(format!(
                    "{} holds the VM's lease; is the VM already running there?",
                    granted.holder
                )));
            }
            info!(witness = %addr, successor = ?successor, "holding the VM's lease");
            succession.confirm(successor);
            tokio::spawn(keep_lease(
                src,
                lease,
                granted,
                Keeper {
                    ttl: cfg.lease_ttl,
                    failure_timeout: cfg.failure_timeout,
                    backup_heard: Arc::clone(&backup_heard),
                    fenced: Arc::clone(&fenced),
                    succession: Arc::clone(&succession),
                },
            ))
        }
    };
    let _lease_guard = AbortOnDrop(lease_task);

    let console = std::mem::replace(&mut cfg.console, Box::new(std::io::sink()));
    let gate = OutputGate::gated(console, 1);
    if let Some(file) = &cfg.console_file {
        gate.attach_file(file.clone());
    }
    // The guest's memory never leaves this process (the backup gets pages, not fds), so it is
    // anonymous huge-page memory: freed in milliseconds when a move hands the VM over, where a
    // memfd of the same size takes a fifth of a second (vmm::memory).
    let vm_config = VmConfig {
        regions: cfg.regions.clone(),
        vcpus: cfg.vcpus,
        dirty_logging: true,
        backing: understudy_vmm::Backing::Anonymous,
    };
    let workload = cfg.workload.clone();
    let image = cfg.guest_image.clone();
    let gate_for_vm = Arc::clone(&gate);
    let vm = tokio::task::spawn_blocking(move || match &image {
        Some(g) => Vm::boot(
            &vm_config,
            Boot::Multiboot {
                image: &g.image,
                cmdline: &g.cmdline,
            },
            gate_for_vm,
        ),
        None => Vm::boot(&vm_config, Boot::Workload(&workload), gate_for_vm),
    })
    .await
    .map_err(|e| PrimaryError::Link(e.to_string()))??;
    let guest = cfg
        .guest_image
        .as_ref()
        .map_or(cfg.workload.name().to_string(), |g| g.name.clone());
    info!(guest = %guest, pages = map.total(), "guest running");
    // The first backup must be there: a primary that starts unprotected by mistake is worse
    // than one that says so and exits. The guest boots first, so that the session's clocks
    // (heartbeats, the backup's failure detection) do not run through the boot.
    let first = if cfg.standalone {
        info!("no backup: the VM runs unprotected until it is moved");
        None
    } else {
        let first = open_link(&endpoint, &cfg, &map, None).await?;
        info!("full sync starts");
        Some(first)
    };
    let (_vm, summary) = protect(
        vm,
        gate,
        first,
        &endpoint,
        &cfg,
        Guard {
            stop,
            fenced,
            backup_heard,
            succession,
        },
    )
    .await?;
    Ok(summary)
}

/// The flags that stop a protected VM, and when the backup was last heard (for fencing).
pub struct Guard {
    /// Stop gracefully (Ctrl-C, SIGTERM).
    pub stop: Arc<AtomicBool>,
    /// Set by whoever holds the VM's lease when it is lost: the guest is stopped at once.
    pub fenced: Arc<AtomicBool>,
    /// Updated whenever the backup is heard from.
    pub backup_heard: Arc<Mutex<Instant>>,
    /// Who the lease names as successor (set here, confirmed by the lease keeper).
    pub succession: Arc<Succession>,
}

/// Protects a VM that already runs (a promoted backup protecting itself with a new backup):
/// its memory, vCPUs and console continue; a full sync to the backup at `cfg.backup`, then
/// epochs, reconnecting like a primary. `cfg.workload`, `regions` and `vcpus` are not used.
/// The lease stays with the caller, which sets `guard.fenced` if it loses it.
pub async fn protect_running(
    vm: Vm,
    gate: Arc<OutputGate>,
    cfg: &PrimaryConfig,
    guard: Guard,
) -> Result<(Vm, Summary), PrimaryError> {
    metrics::gauge!("understudy_protected").set(0.0);
    let endpoint = client_endpoint(cfg)?;
    protect(vm, gate, None, &endpoint, cfg, guard).await
}

/// Collects the ended encoder thread: its page tree goes to the resync book, and its delta
/// cache is freed on a thread of its own.
fn finish_encoder(
    handle: std::thread::JoinHandle<
        Result<(understudy_protocol::PageTree, BaseCache), PrimaryError>,
    >,
    sh: &Shared,
    moved: bool,
) {
    // What the encoder sent is what a backup that keeps its image holds (a failed encoder's
    // state is not trusted: the next session is then a full sync).
    let (tree, cache) = match handle.join().ok().and_then(Result::ok) {
        Some((tree, cache)) => (Some(tree), Some(cache)),
        None => (None, None),
    };
    if let Some(cache) = cache.filter(BaseCache::enabled) {
        sh.wait_cache_freed();
        let freeing = std::thread::Builder::new()
            .name("cache-free".into())
            .spawn(move || {
                // After a move the VM is gone and the eviction time ends when this is done;
                // otherwise the guest runs on, and this goes below everything else.
                if !moved {
                    let _ = understudy_vmm::set_thread_nice(19);
                }
                drop(cache);
                metrics::gauge!("understudy_delta_cache_bytes").set(0.0);
            });
        match freeing {
            Ok(h) => {
                *sh.cache_freed.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
            }
            Err(e) => warn!(error = %e, "cannot start a thread to free the delta cache"),
        }
    }
    sh.book
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .session_ended(tree);
}

/// Sessions with backups, one after another, with unprotected stretches between them.
async fn protect(
    mut vm: Vm,
    gate: Arc<OutputGate>,
    mut link: Option<Link>,
    endpoint: &Endpoint,
    cfg: &PrimaryConfig,
    guard: Guard,
) -> Result<(Vm, Summary), PrimaryError> {
    let map = PageMap::new(&vm.memory().specs());
    let sync = sync_epochs(map.total(), cfg.sync_batch_pages);
    let journal = Journal::open(cfg.release_journal.as_deref()).map_err(PrimaryError::Dump)?;
    let shared = Shared {
        book: Arc::new(Mutex::new(ResyncBook::new(map.total()))),
        map,
        gate,
        stop: guard.stop,
        fenced: guard.fenced,
        backup_heard: guard.backup_heard,
        succession: guard.succession,
        journal: Arc::new(Mutex::new(journal)),
        staging: StagingPool::default(),
        totals: Arc::new(Totals::default()),
        clock: Instant::now(),
        cache_freed: Mutex::new(None),
    };
    let mut summary = Summary {
        sync_epochs: sync,
        ..Summary::default()
    };
    loop {
        let mut plan = None;
        let l = match link.take() {
            Some(l) => l,
            None if cfg.standalone => match standalone(&mut vm, endpoint, cfg, &shared).await? {
                Some((l, p)) => {
                    plan = Some(p);
                    l
                }
                None => break,
            },
            None => match unprotected(&mut vm, endpoint, cfg, &shared, summary.sessions).await? {
                Some(l) => l,
                None => break,
            },
        };
        summary.sessions += 1;
        let moved = plan.as_ref().map(|p| (p.algorithm, Arc::clone(&p.record)));
        let delta_before = shared.totals.delta.load(Ordering::Relaxed);
        let (back, end, s) = match plan {
            Some(p) if p.algorithm.is_postcopy() => {
                // Postcopy reads the dirty log on its own: the book no longer knows every
                // change, so a later session is a full sync.
                shared
                    .book
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .session_ended(None);
                crate::postcopy::move_vm(vm, l, cfg, &shared.map, &shared.gate, p).await
            }
            plan => session(vm, l, cfg, &shared, plan).await,
        };
        vm = back;
        summary.last_epoch = s.last_epoch;
        summary.last_acked = s.last_acked;
        summary.wire_bytes += s.wire_bytes;
        if let Some((algorithm, record)) = moved {
            let mut record = record.lock().unwrap_or_else(|e| e.into_inner()).clone();
            record.delta_pages = shared.totals.delta.load(Ordering::Relaxed) - delta_before;
            let (ok, message, downtime_ms) = match &end {
                Ok(SessionEnd::HandedOver(r)) => (r.ok, r.message.clone(), r.downtime_ms),
                Ok(SessionEnd::Lost(cause)) => (false, ErrorChain(cause).to_string(), None),
                Ok(SessionEnd::Finished(_)) => {
                    (false, "stopped before the move finished".into(), None)
                }
                Err(e) => (false, ErrorChain(e).to_string(), None),
            };
            // The source's copy goes once the destination runs the VM: no VM state is left
            // here after this drop, which ends the eviction time.
            let vm_left = if ok {
                drop(vm);
                // The staging pool's buffers hold copies of guest pages too.
                shared.staging.clear();
                shared.wait_cache_freed();
                None
            } else {
                Some(vm)
            };
            let eviction_ms = ok
                .then(|| cfg.migration.eviction_asked())
                .flatten()
                .map(|t| t.elapsed().as_secs_f64() * 1e3);
            let report = crate::migrate::report(
                algorithm,
                &record,
                ok,
                message,
                downtime_ms,
                eviction_ms,
                s.wire_bytes,
            );
            info!(
                algorithm = algorithm.name(),
                ok,
                downtime_ms = ?report.downtime_ms,
                eviction_ms = ?report.eviction_ms,
                wire_bytes = report.wire_bytes,
                rounds = report.rounds,
                final_pages = report.final_pages,
                delta_pages = report.delta_pages,
                throughput_ratio = ?report.throughput_ratio,
                "move report: {}",
                report.message
            );
            crate::migrate::record_metrics(&report);
            cfg.migration.outcome.finish(report);
            let Some(left) = vm_left else {
                cfg.status.set_state("moved", None);
                summary.raw_bytes = shared.totals.raw.load(Ordering::Relaxed);
                return Err(PrimaryError::Moved(summary));
            };
            vm = left;
            cfg.migration.clear();
            match end {
                Ok(SessionEnd::Finished(_)) => break,
                // The destination did not confirm: the guest stays paused here (see the report).
                Ok(SessionEnd::HandedOver(_)) => break,
                Err(e) => return Err(e),
                _ => {
                    if let Some(r) = vm.exit_reason() {
                        return Err(PrimaryError::GuestStopped(r));
                    }
                    warn!("the move failed; the VM keeps running here");
                    continue;
                }
            }
        }
        match end? {
            SessionEnd::HandedOver(report) => {
                let state = if report.ok { "handed-over" } else { "paused" };
                cfg.status.set_state(state, Some(report.message.clone()));
                cfg.switchover.finish(report);
                break;
            }
            SessionEnd::Finished(end) => {
                cfg.status.set_state("stopped", None);
                if let (Some(dir), true) = (&cfg.dump_dir, end.paused) {
                    dump(dir, &vm, &end.last_state).map_err(PrimaryError::Dump)?;
                    info!(dir = %dir.display(), epoch = end.last_epoch, "dumped guest memory and state");
                }
                break;
            }
            SessionEnd::Lost(cause) => {
                if let Some(r) = vm.exit_reason() {
                    return Err(PrimaryError::GuestStopped(r));
                }
                if shared.fenced.load(Ordering::SeqCst) {
                    vm.pause()?;
                    cfg.status.set_state(
                        "fenced",
                        Some(
                            "cut off from the witness and the backup; the guest is stopped".into(),
                        ),
                    );
                    return Err(PrimaryError::Fenced);
                }
                cfg.status.set_state(
                    "unprotected",
                    Some(format!(
                        "lost the backup ({cause}); reconnecting every {:?}",
                        cfg.reconnect_interval
                    )),
                );
                cfg.status.update(|s| s.peer = None);
                metrics::gauge!("understudy_protected").set(0.0);
                metrics::gauge!("understudy_peer_connected").set(0.0);
                if shared.stop.load(Ordering::SeqCst) {
                    warn!(error = %cause, "the backup was lost while stopping");
                    vm.pause()?;
                    let _ = shared.gate.open();
                    break;
                }
                warn!(
                    error = %ErrorChain(&cause),
                    on_backup_loss = ?cfg.on_backup_loss,
                    "UNPROTECTED: lost the backup; reconnecting"
                );
            }
        }
    }
    summary.raw_bytes = shared.totals.raw.load(Ordering::Relaxed);
    Ok((vm, summary))
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the guest without a backup until one accepts a new session (returned), the primary
/// is stopped (`None`), or it is fenced.
async fn unprotected(
    vm: &mut Vm,
    endpoint: &Endpoint,
    cfg: &PrimaryConfig,
    sh: &Shared,
    sessions: u64,
) -> Result<Option<Link>, PrimaryError> {
    let paused = cfg.on_backup_loss == OnBackupLoss::Pause;
    if paused {
        vm.pause()?;
        warn!("guest paused until a backup protects it again (--on-backup-loss pause)");
    }
    // Nobody else can run this VM while we hold its lease (or without a witness, where the
    // backup never promotes). Output held for unacknowledged epochs may go out only once no
    // backup can take over from an image that lacks it: the witness must first confirm that
    // nobody succeeds us. Until then the guest runs with its output held (and is fenced if the
    // witness stays unreachable, since the backup is silent too).
    sh.succession.want(Successor::Nobody);
    while !sh.succession.settled() {
        if sh.fenced.load(Ordering::SeqCst) {
            vm.pause()?;
            return Err(PrimaryError::Fenced);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let released = sh.gate.open().unwrap_or(0);
    if released > 0 {
        info!(
            bytes = released,
            "released console output held for unacknowledged epochs"
        );
    }
    let since = Instant::now();
    let mut attempts = 0u64;
    loop {
        // A VM that was never protected (re-protection) tries at once.
        let delay = if sessions == 0 && attempts == 0 {
            Duration::ZERO
        } else {
            cfg.reconnect_interval
        };
        let attempt = async {
            tokio::time::sleep(delay).await;
            open_link(endpoint, cfg, &sh.map, Some(&sh.book)).await
        };
        tokio::pin!(attempt);
        let outcome = loop {
            tokio::select! {
                r = &mut attempt => break Some(r),
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
            if sh.fenced.load(Ordering::SeqCst) {
                vm.pause()?;
                return Err(PrimaryError::Fenced);
            }
            if let Some(r) = vm.exit_reason() {
                return Err(PrimaryError::GuestStopped(r));
            }
            if sh.stop.load(Ordering::SeqCst) {
                break None;
            }
        };
        attempts += 1;
        match outcome {
            None => {
                if !paused {
                    vm.pause()?;
                }
                info!("stopped while unprotected");
                return Ok(None);
            }
            Some(Ok(link)) => {
                if paused {
                    vm.resume();
                }
                info!(
                    unprotected_s = format!("{:.2}", since.elapsed().as_secs_f64()),
                    attempts, "a backup accepted us again; re-protecting"
                );
                return Ok(Some(link));
            }
            Some(Err(e)) => {
                // Say why every few attempts, not on every one.
                if attempts == 1 || attempts.is_multiple_of(10) {
                    warn!(error = %ErrorChain(&e), attempts, "UNPROTECTED: the backup is still unreachable");
                }
            }
        }
    }
}

/// Runs the guest without a backup (no `--backup`) until a move is asked for: returns the link
/// to the destination and the move's plan, or `None` once stopped.
async fn standalone(
    vm: &mut Vm,
    endpoint: &Endpoint,
    cfg: &PrimaryConfig,
    sh: &Shared,
) -> Result<Option<(Link, crate::migrate::Plan)>, PrimaryError> {
    let _ = sh.gate.open();
    cfg.status.set_state(
        "unprotected",
        Some("no backup: the VM runs here until it is moved (`understudy migrate`)".into()),
    );
    // The guest's progress over the last second or so: its rate before the move.
    let mut samples: std::collections::VecDeque<(Instant, u64)> = Default::default();
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if sh.fenced.load(Ordering::SeqCst) {
            vm.pause()?;
            return Err(PrimaryError::Fenced);
        }
        if let Some(r) = vm.exit_reason() {
            return Err(PrimaryError::GuestStopped(r));
        }
        if sh.stop.load(Ordering::SeqCst) {
            vm.pause()?;
            info!("stopped");
            return Ok(None);
        }
        if let Ok(p) = vm
            .memory()
            .read_u64(understudy_vmm::guests::layout::PROGRESS_GPA)
        {
            let now = Instant::now();
            samples.push_back((now, p));
            while samples.len() > 2 && now - samples[1].0 > Duration::from_secs(1) {
                samples.pop_front();
            }
        }
        let Some(req) = cfg.migration.requested() else {
            continue;
        };
        info!(algorithm = req.algorithm.name(), to = %req.to, "moving the VM: connecting to the destination");
        cfg.status.set_state(
            "moving",
            Some(format!("{} to {}", req.algorithm.name(), req.to)),
        );
        let mode = if req.algorithm.is_postcopy() {
            Mode::Postcopy
        } else {
            Mode::Migrate
        };
        let link = open_link_to(endpoint, cfg, &sh.map, (req.to, &req.to_name), mode, None).await;
        match link {
            Ok(link) => {
                let now = Instant::now();
                let mut record = crate::migrate::MoveRecord {
                    progress_start: vm
                        .memory()
                        .read_u64(understudy_vmm::guests::layout::PROGRESS_GPA)
                        .ok()
                        .map(|p| (now, p)),
                    ..Default::default()
                };
                if let (Some(a), Some(b)) = (samples.front(), samples.back()) {
                    let dt = (b.0 - a.0).as_secs_f64();
                    if dt > 0.2 {
                        record.rate_before = Some(b.1.saturating_sub(a.1) as f64 / dt);
                    }
                }
                let plan = crate::migrate::Plan {
                    algorithm: req.algorithm,
                    precopy: req.precopy,
                    quick: req.quick,
                    evict: cfg.migration.evict_flag(),
                    record: Arc::new(Mutex::new(record)),
                    delta_cache: req.delta_cache,
                };
                return Ok(Some((link, plan)));
            }
            Err(e) => {
                let message = format!(
                    "could not reach the destination {}: {}; the VM keeps running here",
                    req.to,
                    ErrorChain(&e)
                );
                warn!("{message}");
                cfg.migration
                    .outcome
                    .finish(crate::migrate::MigrationReport {
                        algorithm: req.algorithm.name().into(),
                        message,
                        ..Default::default()
                    });
                cfg.migration.clear();
                cfg.status.set_state("unprotected", None);
            }
        }
    }
}

/// What one session did.
#[derive(Default)]
pub(crate) struct SessionStats {
    pub(crate) last_epoch: u64,
    pub(crate) last_acked: u64,
    pub(crate) wire_bytes: u64,
}

fn heartbeat_loop(
    tx: Arc<tokio::sync::Mutex<FrameSender>>,
    every: Duration,
    clock: Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let hb = Heartbeat {
                sent_ns: clock.elapsed().as_nanos() as u64,
                echo_ns: 0,
                hold_ns: 0,
            };
            if messages::send(&mut *tx.lock().await, &Message::Heartbeat(hb))
                .await
                .is_err()
            {
                return;
            }
        }
    })
}

/// Closes the connection when the backup has been silent longer than `timeout`.
fn watchdog(
    conn: Connection,
    heard: Arc<Mutex<Instant>>,
    timeout: Duration,
) -> tokio::task::JoinHandle<Duration> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let silence = heard.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
            metrics::gauge!("understudy_heartbeat_age_seconds").set(silence.as_secs_f64());
            if silence > timeout {
                conn.close(3, "backup silent");
                return silence;
            }
        }
    })
}

/// One session with a backup: full sync, then consistent epochs, until stopped or the backup
/// is lost. Gives the VM back unless it is lost with the session (an `Err`).
///
/// Protocol epochs restart at 1 in every session; the output gate's epochs keep counting, so
/// gate epoch = `base` + protocol epoch.
async fn session(
    mut vm: Vm,
    link: Link,
    cfg: &PrimaryConfig,
    sh: &Shared,
    plan: Option<crate::migrate::Plan>,
) -> (Vm, Result<SessionEnd, PrimaryError>, SessionStats) {
    let moving = plan.is_some();
    let Link {
        conn,
        tx,
        mut rx,
        version,
        resume,
    } = link;
    let peer = conn.peer_name().to_string();
    cfg.status.set_state("syncing", None);
    cfg.status.update(|s| s.peer = Some(peer.clone()));
    // Tracking starts here: every page changed from now on is in the first consistent epoch,
    // and every change before now is in the resync book.
    let reset = match vm.take_dirty() {
        Ok(d) => d,
        Err(e) => return (vm, Err(e.into()), Default::default()),
    };
    let (plan_sync, base_tree) = {
        let changed: Vec<u32> = reset.pages().filter_map(|g| sh.map.index_of(g)).collect();
        let mut book = sh.book.lock().unwrap_or_else(|e| e.into_inner());
        book.changed(&changed);
        match resume.and_then(|d| book.delta(&d)) {
            Some(delta) => {
                info!(
                    pages = delta.pages.len(),
                    of = sh.map.total(),
                    since_clock = delta.base_clock,
                    "delta resync: the backup kept an earlier image; sending only the pages changed since"
                );
                metrics::counter!("understudy_resyncs_total", "kind" => "delta").increment(1);
                (SyncPlan::Delta(delta.pages), Some(delta.tree))
            }
            None => {
                metrics::counter!("understudy_resyncs_total", "kind" => "full").increment(1);
                (SyncPlan::Full, None)
            }
        }
    };
    if resume.is_some() && base_tree.is_none() {
        // Cannot happen (the book only changes in sessions); a full sync needs a backup that
        // starts from zeros, which a new connection without the resume offer gets.
        conn.close(6, "unknown image: reconnecting for a full sync");
        sh.book
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .session_ended(None);
        let why = PrimaryError::Link("the backup's image could not be resumed".into());
        return (vm, Ok(SessionEnd::Lost(why)), Default::default());
    }
    let sync = plan_sync.epochs(sh.map.total(), cfg.sync_batch_pages);
    let delta = matches!(plan_sync, SyncPlan::Delta(_));
    let base = sh.gate.current_epoch().saturating_sub(1);
    if !moving {
        // A move needs no output commit: the source is the VM until the destination runs
        // its final epoch, and everything the guest wrote before the final pause went out here.
        sh.gate.hold_from(base + sync + 1);
    }
    *sh.backup_heard.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    let tx = Arc::new(tokio::sync::Mutex::new(tx));
    let _heartbeats = AbortOnDrop(heartbeat_loop(
        Arc::clone(&tx),
        cfg.heartbeat_interval,
        sh.clock,
    ));
    let watch = watchdog(
        conn.clone(),
        Arc::clone(&sh.backup_heard),
        cfg.failure_timeout,
    );
    let abort = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(Mutex::new(InFlight::default()));
    let last_acked = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(tokio::sync::Notify::new());
    // The backup refuses chunks further ahead than the protocol's window.
    let window = cfg
        .max_in_flight
        .clamp(1, understudy_protocol::MAX_EPOCHS_IN_FLIGHT as usize);
    let slots = Arc::new(Semaphore::new(window));
    // Whatever ends this function also ends the capture thread.
    let halt = Halt {
        stop: Arc::clone(&abort),
        slots: Arc::clone(&slots),
    };
    let (cap_tx, cap_rx) = mpsc::channel::<Captured>(window);
    let (enc_tx, mut enc_rx) = mpsc::channel::<Encoded>(window);
    let enc_cfg = EncoderConfig {
        version,
        ..EncoderConfig::default()
    };
    let encoder = match base_tree {
        Some(tree) => EncoderState::from_tree(tree, 0, enc_cfg),
        None => EncoderState::new(sh.map.total(), enc_cfg),
    };
    let threads = cfg.encode_threads.max(1);
    let nice = cfg.encoder_nice;
    let enc_totals = Arc::clone(&sh.totals);
    let enc_book = Arc::clone(&sh.book);
    // Only for this session: the next one starts from a resync, with no base known.
    let cache_bytes = if understudy_protocol::codec::chunk_format_for(version) >= 2 {
        crate::basecache::budget(
            plan.as_ref().and_then(|p| p.delta_cache),
            cfg.delta_cache,
            moving,
        )
    } else {
        0
    };
    let cache = BaseCache::new(sh.map.total(), cache_bytes);
    let encoder_handle = match std::thread::Builder::new()
        .name("encoder".into())
        .spawn(move || {
            // The encoder's workers are started from this thread and inherit its priority.
            if let Err(e) = understudy_vmm::set_thread_nice(nice) {
                warn!(error = %e, nice, "cannot lower the encoder's CPU priority");
            }
            encoder_thread(
                encoder, threads, cap_rx, enc_tx, enc_totals, enc_book, cache,
            )
        }) {
        Ok(h) => h,
        Err(e) => {
            return (
                vm,
                Err(PrimaryError::Link(e.to_string())),
                Default::default(),
            )
        }
    };
    let ctl = CaptureCtl {
        map: sh.map.clone(),
        epoch_len: cfg.epoch,
        sync_batch: cfg.sync_batch_pages,
        slots: Arc::clone(&slots),
        out: cap_tx,
        stop: Arc::clone(&sh.stop),
        abort: Arc::clone(&abort),
        fenced: Arc::clone(&sh.fenced),
        gate_base: base,
        stop_after: cfg.stop_after_epochs,
        runtime: tokio::runtime::Handle::current(),
        progress_bar: cfg.progress_bar,
        kill_at: cfg.kill_at,
        staging: sh.staging.clone(),
        switchover: Arc::clone(&cfg.switchover),
        plan,
        in_flight: Arc::clone(&in_flight),
        last_acked: Arc::clone(&last_acked),
        sync: plan_sync,
        book: Arc::clone(&sh.book),
    };
    let capture = tokio::task::spawn_blocking(move || {
        let end = capture_loop(&mut vm, &ctl);
        (vm, end)
    });

    // Acks: release output, free slots, measure latency and lag.
    let acks = {
        let mut cx = AckCtx {
            tx: Arc::clone(&tx),
            in_flight: Arc::clone(&in_flight),
            last_acked: Arc::clone(&last_acked),
            acked: Arc::clone(&acked),
            gate: Arc::clone(&sh.gate),
            gate_base: base,
            journal: Arc::clone(&sh.journal),
            sync,
            backup_heard: Arc::clone(&sh.backup_heard),
            kill_at: cfg.kill_at,
            clock: sh.clock,
            succession: Arc::clone(&sh.succession),
            peer,
            status: cfg.status.clone(),
            moving,
            no_release_echo: cfg.no_release_echo,
        };
        let slots = Arc::clone(&slots);
        tokio::spawn(async move {
            let r = ack_loop(&mut rx, &mut cx).await;
            // Without acks nothing can be committed: end the capture thread too.
            slots.close();
            r
        })
    };

    // Send encoded epochs in order; remember them until acknowledged.
    let mut stats = SessionStats::default();
    let mut last_sync_log = sync;
    let sent: Result<(), PrimaryError> = async {
        while let Some(e) = enc_rx.recv().await {
            let bytes = send_epoch(&conn, &tx, &e, cfg.kill_at, sync).await?;
            stats.wire_bytes += bytes;
            stats.last_epoch = e.epoch;
            in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .epochs
                .insert(e.epoch, (e.captured_at, e.slot, e.pages));
            if e.epoch <= sync && e.epoch == last_sync_log {
                last_sync_log = 0;
                let what = if delta {
                    "delta resync sent"
                } else {
                    "full sync sent"
                };
                info!(epochs = sync, wire_bytes = stats.wire_bytes, "{what}");
            }
        }
        Ok(())
    }
    .await;
    if sent.is_err() {
        abort.store(true, Ordering::SeqCst);
        slots.close();
    }
    // Unblock the encoder, then collect the capture thread and the VM.
    drop(enc_rx);
    let (vm, end) = match capture.await {
        Ok(r) => r,
        Err(e) => {
            // The VM went down with the capture thread; nothing to continue with.
            error!(error = %e, "the capture thread failed");
            std::process::abort();
        }
    };
    drop(halt);
    let end = match end {
        Ok(end) => end,
        Err(e) => {
            watch.abort();
            let cause = if sh.fenced.load(Ordering::SeqCst) {
                PrimaryError::Fenced
            } else if let Err(link) = sent {
                link
            } else if let Ok(Ok(Err(link))) =
                tokio::time::timeout(Duration::from_secs(1), acks).await
            {
                link
            } else {
                e
            };
            let fatal = matches!(cause, PrimaryError::Vm(_) | PrimaryError::Memory(_));
            finish_encoder(encoder_handle, sh, false);
            conn.close(1, "session ended");
            stats.last_acked = last_acked.load(Ordering::SeqCst);
            let end = if fatal {
                Err(cause)
            } else {
                Ok(SessionEnd::Lost(cause))
            };
            return (vm, end, stats);
        }
    };

    // Wait for the last epoch's ack: woken by the ack task (a 1 ms sleep loop added up to 2 ms
    // to a move's downtime), looking at least every 10 ms whether that task ended.
    let waited = Instant::now();
    loop {
        let notified = acked.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if last_acked.load(Ordering::SeqCst) >= end.last_epoch || acks.is_finished() {
            break;
        }
        let left = Duration::from_secs(30).saturating_sub(waited.elapsed());
        if left.is_zero() {
            break;
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(10)), notified).await;
    }
    watch.abort();
    stats.last_acked = last_acked.load(Ordering::SeqCst);
    info!(
        last_epoch = end.last_epoch,
        acked = stats.last_acked,
        "protection stopped"
    );
    if cfg.switchover.requested() || moving {
        // The guest is paused until the destination runs it: the encoder's wrap-up (its page
        // tree, a few ms for 1 GiB) waits until after the hand-over.
        let report = hand_over(&conn, &tx, &end, stats.last_acked, sh).await;
        acks.abort();
        finish_encoder(encoder_handle, sh, report.ok);
        return (vm, Ok(SessionEnd::HandedOver(report)), stats);
    }
    finish_encoder(encoder_handle, sh, false);
    let mut tx = tx.lock().await;
    let _ = messages::send(
        &mut tx,
        &Message::Goodbye(Goodbye {
            reason: GoodbyeReason::Done,
            text: "protection stopped".into(),
        }),
    )
    .await;
    let _ = tx.finish();
    drop(tx);
    acks.abort();
    // The backup closes the connection once it has read the Goodbye. Closing first could
    // overtake a Goodbye still being retransmitted on a lossy link, and the backup would take
    // the stop for a crash.
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
    conn.close(0, "done");
    (vm, Ok(SessionEnd::Finished(end)), stats)
}
