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
    DirtyPage, EncoderConfig, EncoderState, Goodbye, GoodbyeReason, Heartbeat, Hello, Limits,
    Message, Mode, Page, MIN_PROTOCOL_VERSION, PAGE_SIZE, PROTOCOL_VERSION,
};
use understudy_transport::lease::{LeaseBackend, LeaseState, WitnessLease};
use understudy_transport::messages;
use understudy_transport::{
    Connection, Endpoint, FrameReader, FrameSender, Identity, TransportOptions,
};
use understudy_vmm::{Boot, OutputGate, Vm, VmConfig, VmError};

use crate::capture::{capture_loop, sync_epochs, CaptureCtl, CaptureEnd, Captured, PageMap};
use crate::journal::Journal;
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
}

/// What a finished session did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Summary {
    pub sync_epochs: u64,
    pub last_epoch: u64,
    pub last_acked: u64,
    pub wire_bytes: u64,
    pub raw_bytes: u64,
}

struct Encoded {
    epoch: u64,
    chunks: Vec<Vec<u8>>,
    commit: Vec<u8>,
    captured_at: Instant,
    slot: OwnedSemaphorePermit,
}

/// Epochs sent and not yet acknowledged.
#[derive(Default)]
struct InFlight {
    epochs: BTreeMap<u64, (Instant, OwnedSemaphorePermit)>,
}

fn encoder_thread(
    mut encoder: EncoderState,
    threads: usize,
    mut rx: mpsc::Receiver<Captured>,
    tx: mpsc::Sender<Encoded>,
    totals: Arc<Totals>,
) -> Result<(), PrimaryError> {
    while let Some(c) = rx.blocking_recv() {
        let dirty: Vec<DirtyPage<'_>> = c
            .indices
            .iter()
            .zip(c.pages.chunks_exact(PAGE_SIZE))
            .map(|(&index, data)| DirtyPage {
                index,
                data: <&Page>::try_from(data).expect("PAGE_SIZE chunks"),
                base: None,
            })
            .collect();
        let e = encoder.encode_epoch(c.epoch, &dirty, threads)?;
        let s = e.stats;
        metrics::counter!("understudy_pages_total", "kind" => "zero").increment(s.zero);
        metrics::counter!("understudy_pages_total", "kind" => "unchanged").increment(s.unchanged);
        metrics::counter!("understudy_pages_total", "kind" => "ref").increment(s.refs);
        metrics::counter!("understudy_pages_total", "kind" => "full").increment(s.full);
        metrics::counter!("understudy_pages_total", "kind" => "delta").increment(s.delta);
        let raw = (c.indices.len() * PAGE_SIZE) as u64;
        metrics::counter!("understudy_bytes_raw_total").increment(raw);
        metrics::counter!("understudy_bytes_encoded_total").increment(s.wire_bytes);
        totals.raw.fetch_add(raw, Ordering::Relaxed);
        totals.wire.fetch_add(s.wire_bytes, Ordering::Relaxed);
        let commit = messages::encode(&Message::Commit(e.commit(c.state)));
        let out = Encoded {
            epoch: c.epoch,
            chunks: e.chunks,
            commit,
            captured_at: c.captured_at,
            slot: c.slot,
        };
        if tx.blocking_send(out).is_err() {
            break;
        }
    }
    Ok(())
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
}

async fn send_epoch(
    conn: &Connection,
    control: &tokio::sync::Mutex<FrameSender>,
    e: &Encoded,
    kill_at: Option<KillAt>,
    sync: u64,
) -> Result<u64, PrimaryError> {
    let mut sends = tokio::task::JoinSet::new();
    let mut bytes = e.commit.len() as u64;
    for chunk in &e.chunks {
        bytes += chunk.len() as u64;
        let conn = conn.clone();
        let chunk = chunk.clone();
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
    gate: Arc<OutputGate>,
    journal: Journal,
    sync: u64,
    backup_heard: Arc<Mutex<Instant>>,
    kill_at: Option<KillAt>,
}

async fn ack_loop(rx: &mut FrameReader, cx: &mut AckCtx) -> Result<(), PrimaryError> {
    let AckCtx {
        tx,
        in_flight,
        last_acked,
        gate,
        journal,
        sync,
        backup_heard,
        kill_at,
    } = cx;
    let (sync, kill_at) = (*sync, *kill_at);
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
                for (_epoch, (captured_at, _slot)) in released {
                    let latency = captured_at.elapsed().as_secs_f64();
                    metrics::histogram!("understudy_commit_latency_seconds").record(latency);
                    metrics::gauge!("understudy_replication_lag_seconds").set(latency);
                }
                if a.epoch > sync {
                    KillAt::check(kill_at, KillPhase::Ack, a.epoch);
                    let at = Journal::now();
                    let n = gate.release(a.epoch).unwrap_or(0);
                    journal.record(a.epoch, n, at);
                    // An Ack from the primary means "E's output is released": on promotion the
                    // backup emits only the committed output past it.
                    let _ = messages::send(&mut *tx.lock().await, &Message::Ack(a)).await;
                }
                last_acked.store(a.epoch, Ordering::SeqCst);
                metrics::gauge!("understudy_last_committed_epoch").set(a.epoch as f64);
                metrics::counter!("understudy_epochs_total", "outcome" => "acked").increment(1);
            }
            Ok(Message::Heartbeat(h)) => {
                *backup_heard.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                metrics::gauge!("understudy_heartbeat_age_seconds").set(0.0);
                let _ = h;
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

/// Renews the VM's lease; when it runs out while the backup is silent too (cut off from both
/// other votes), stops the guest before the witness can hand the lease on.
async fn keep_lease(
    mut lease: WitnessLease,
    mut state: LeaseState,
    ttl: Duration,
    failure_timeout: Duration,
    backup_heard: Arc<Mutex<Instant>>,
    stop: Arc<AtomicBool>,
) {
    let endpoint_lost = |l: &WitnessLease| l.connection().close_reason().is_some();
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if state.valid_until.saturating_duration_since(Instant::now()) < ttl * 2 / 3
            && !endpoint_lost(&lease)
        {
            match lease.request(ttl).await {
                Ok(s) if s.granted => state = s,
                Ok(s) => warn!(holder = %s.holder, "the witness refused to renew our lease"),
                Err(e) => warn!(error = %e, "lease renewal failed"),
            }
        }
        let expired = Instant::now() >= state.valid_until;
        let backup_silent = backup_heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
            > failure_timeout / 2;
        if expired && backup_silent {
            error!("fenced: cut off from the witness and the backup; stopping the guest");
            metrics::counter!("understudy_fenced_total").increment(1);
            stop.store(true, Ordering::SeqCst);
            return;
        }
    }
}

/// Protects a guest until it stops, the session is stopped, or `stop_after_epochs` is reached.
pub async fn run(cfg: PrimaryConfig, stop: Arc<AtomicBool>) -> Result<Summary, PrimaryError> {
    let limits = Limits::default();
    let identity = Identity::load(&cfg.tls).map_err(PrimaryError::Identity)?;
    let bind: SocketAddr = if cfg.backup.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let endpoint = Endpoint::client(bind, &identity, &TransportOptions::default())
        .map_err(PrimaryError::Bind)?;
    let conn = endpoint
        .connect(cfg.backup, &cfg.backup_name)
        .await
        .map_err(|source| PrimaryError::Connect {
            addr: cfg.backup,
            source: Box::new(source),
        })?;
    info!(peer = conn.peer_name(), addr = %cfg.backup, "connected to the backup");
    let control = conn
        .open_control(limits.max_frame_len)
        .await
        .map_err(|e| PrimaryError::Link(e.to_string()))?;
    let (mut tx, mut rx) = control.split();
    let map = PageMap::new(&cfg.regions);
    let hello = Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        mode: Mode::Protect,
        vm_id: cfg.vm_id.clone(),
        layout: map.layout(),
        base: None,
    };
    messages::send(&mut tx, &Message::Hello(hello))
        .await
        .map_err(|e| PrimaryError::Link(e.to_string()))?;
    let reply = rx
        .read_frame()
        .await
        .map_err(|e| PrimaryError::Link(e.to_string()))?
        .ok_or_else(|| PrimaryError::Link("the backup closed the control stream".into()))?;
    let version = match messages::decode(&reply, &limits)
        .map_err(|e| PrimaryError::Protocol(e.to_string()))?
    {
        Message::Welcome(w) => w.version,
        Message::Reject(r) => {
            warn!(code = ?r.code, reason = %r.reason, "the backup refused the session");
            return Err(PrimaryError::Rejected(r.reason));
        }
        other => return Err(PrimaryError::Protocol(format!("{:?}", other.kind()))),
    };
    info!(version, vm = %cfg.vm_id, "backup accepted the session");
    let tx = Arc::new(tokio::sync::Mutex::new(tx));
    let backup_heard = Arc::new(Mutex::new(Instant::now()));

    // Fencing: hold the VM's lease while the guest runs.
    let lease_task = match cfg.witness {
        None => tokio::spawn(async {}),
        Some(addr) => {
            let mut lease = WitnessLease::connect(&endpoint, addr, "witness", &cfg.vm_id)
                .await
                .map_err(|e| PrimaryError::Lease(e.to_string()))?;
            lease.margin = Duration::from_millis(100);
            let first = lease
                .request(cfg.lease_ttl)
                .await
                .map_err(|e| PrimaryError::Lease(e.to_string()))?;
            if !first.granted {
                return Err(PrimaryError::Lease(format!(
                    "{} holds the VM's lease; is the VM already running there?",
                    first.holder
                )));
            }
            info!(witness = %addr, "holding the VM's lease");
            tokio::spawn(keep_lease(
                lease,
                first,
                cfg.lease_ttl,
                cfg.failure_timeout,
                Arc::clone(&backup_heard),
                Arc::clone(&stop),
            ))
        }
    };
    let heartbeats = {
        let tx = Arc::clone(&tx);
        let every = cfg.heartbeat_interval;
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(every).await;
                let hb = Heartbeat {
                    sent_ns: started.elapsed().as_nanos() as u64,
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
    };

    let sync = sync_epochs(map.total(), cfg.sync_batch_pages);
    let gate = OutputGate::gated(cfg.console, sync + 1);
    let vm_config = VmConfig {
        regions: cfg.regions.clone(),
        vcpus: cfg.vcpus,
        dirty_logging: true,
    };
    let workload = cfg.workload.clone();
    let gate_for_vm = Arc::clone(&gate);
    let mut vm = tokio::task::spawn_blocking(move || {
        Vm::boot(&vm_config, Boot::Workload(&workload), gate_for_vm)
    })
    .await
    .map_err(|e| PrimaryError::Link(e.to_string()))??;
    info!(
        workload = cfg.workload.name(),
        pages = map.total(),
        "guest running; full sync starts"
    );

    let slots = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
    // Whatever ends this function (an error included) also ends the capture thread.
    let _halt = Halt {
        stop: Arc::clone(&stop),
        slots: Arc::clone(&slots),
    };
    let (cap_tx, cap_rx) = mpsc::channel::<Captured>(cfg.max_in_flight.max(1));
    let (enc_tx, mut enc_rx) = mpsc::channel::<Encoded>(cfg.max_in_flight.max(1));
    let totals = Arc::new(Totals::default());
    let encoder = EncoderState::new(
        map.total(),
        EncoderConfig {
            version,
            ..EncoderConfig::default()
        },
    );
    let threads = cfg.encode_threads.max(1);
    let enc_totals = Arc::clone(&totals);
    let encoder_handle = std::thread::Builder::new()
        .name("encoder".into())
        .spawn(move || encoder_thread(encoder, threads, cap_rx, enc_tx, enc_totals))
        .map_err(|e| PrimaryError::Link(e.to_string()))?;

    let ctl = CaptureCtl {
        map: map.clone(),
        epoch_len: cfg.epoch,
        sync_batch: cfg.sync_batch_pages,
        slots: Arc::clone(&slots),
        out: cap_tx,
        stop: Arc::clone(&stop),
        stop_after: cfg.stop_after_epochs,
        runtime: tokio::runtime::Handle::current(),
        progress_bar: cfg.progress_bar,
        kill_at: cfg.kill_at,
    };
    let capture = tokio::task::spawn_blocking(move || {
        let end = capture_loop(&mut vm, &ctl);
        (vm, end)
    });

    // Acks: release output, free slots, measure latency and lag.
    let in_flight = Arc::new(Mutex::new(InFlight::default()));
    let last_acked = Arc::new(AtomicU64::new(0));
    let journal = Journal::open(cfg.release_journal.as_deref()).map_err(PrimaryError::Dump)?;
    let acks = {
        let in_flight = Arc::clone(&in_flight);
        let last_acked = Arc::clone(&last_acked);
        let gate = Arc::clone(&gate);
        let slots = Arc::clone(&slots);
        let backup_heard = Arc::clone(&backup_heard);
        let kill_at = cfg.kill_at;
        let ack_tx = Arc::clone(&tx);
        tokio::spawn(async move {
            let mut cx = AckCtx {
                tx: ack_tx,
                in_flight,
                last_acked,
                gate,
                journal,
                sync,
                backup_heard,
                kill_at,
            };
            let r = ack_loop(&mut rx, &mut cx).await;
            // Without acks nothing can be committed: end the capture thread too.
            slots.close();
            r
        })
    };

    // Send encoded epochs in order; remember them until acknowledged.
    let mut sent_epochs = 0u64;
    let mut wire = 0u64;
    let mut last_sync_log = sync;
    while let Some(e) = enc_rx.recv().await {
        let bytes = send_epoch(&conn, &tx, &e, cfg.kill_at, sync).await?;
        wire += bytes;
        sent_epochs = e.epoch;
        in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .epochs
            .insert(e.epoch, (e.captured_at, e.slot));
        if e.epoch <= sync && e.epoch == last_sync_log {
            last_sync_log = 0;
            info!(epochs = sync, "full sync sent");
        }
    }
    let (vm, end) = capture
        .await
        .map_err(|e| PrimaryError::Link(e.to_string()))?;
    let end: CaptureEnd = match end {
        Ok(end) => end,
        Err(e) => {
            if let Some(r) = vm.exit_reason() {
                return Err(PrimaryError::GuestStopped(r));
            }
            // The ack reader closes the slots when the link fails; report that cause.
            if let Ok(Ok(Err(link))) = tokio::time::timeout(Duration::from_secs(1), acks).await {
                return Err(link);
            }
            return Err(e);
        }
    };
    encoder_handle
        .join()
        .map_err(|_| PrimaryError::Link("encoder thread panicked".into()))??;

    // Wait for the last epoch's ack, then leave the committed image and state for inspection.
    let waited = Instant::now();
    while last_acked.load(Ordering::SeqCst) < end.last_epoch {
        if acks.is_finished() || waited.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let acked = last_acked.load(Ordering::SeqCst);
    info!(last_epoch = end.last_epoch, acked, "protection stopped");
    if let (Some(dir), true) = (&cfg.dump_dir, end.paused) {
        dump(dir, &vm, &end.last_state).map_err(PrimaryError::Dump)?;
        info!(dir = %dir.display(), epoch = end.last_epoch, "dumped guest memory and state");
    }
    heartbeats.abort();
    lease_task.abort();
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
    acks.abort();
    tokio::time::sleep(Duration::from_millis(50)).await;
    conn.close(0, "done");
    drop(vm);
    Ok(Summary {
        sync_epochs: sync,
        last_epoch: sent_epochs,
        last_acked: acked,
        wire_bytes: wire,
        raw_bytes: totals.raw.load(Ordering::Relaxed),
    })
}
