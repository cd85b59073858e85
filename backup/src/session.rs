//! Serving primaries: accept, handshake, receive chunks and commits, apply, acknowledge.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tracing::{error, info, warn};
use understudy_protocol::{
    answer_hello, Ack, ChunkDecoder, Commit, DecodedChunk, EpochAssembler, Heartbeat, Limits,
    LocalEnd, Message, Mode, PageTree, Replica,
};
use understudy_transport::messages;
use understudy_transport::{Connection, Endpoint, FrameSender, Identity, TransportOptions};
use understudy_vmm::state::DEFAULT_STATE_LIMIT;
use understudy_vmm::VmState;

use crate::failover::Takeover;
use crate::image::{HotImage, Replicated};
use crate::BackupConfig;

/// Why the backup stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("loading our TLS identity")]
    Identity(#[source] understudy_transport::certs::LoadError),
    #[error("listening")]
    Bind(#[source] understudy_transport::BindError),
    #[error("writing the dump")]
    Dump(#[source] std::io::Error),
    #[error("promotion failed: {0}")]
    Promote(String),
    #[error("the VM is lost: {0}")]
    VmLost(String),
}

/// Why one session ended early; logged, and the connection closed with it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("link: {0}")]
    Link(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("epoch {epoch} was refused and not applied: {reason}")]
    Apply { epoch: u64, reason: String },
    #[error("refused the primary: {0}")]
    Refused(String),
    #[error("the primary has been silent for {silence:?}")]
    PrimaryLost { silence: Duration },
    #[error("the primary handed the VM over at epoch {epoch}")]
    HandedOver { epoch: u64 },
    #[error("postcopy failed after the VM started here: {0}")]
    VmLost(String),
}

/// How a session ended without a protocol or link error.
enum Ended {
    /// The primary said goodbye.
    Goodbye(Held),
    /// A postcopy move finished: the VM runs here on its own memory.
    Postcopied(understudy_vmm::Vm),
    /// Planned switchover: the primary paused its guest after `epoch` and asks us to take over.
    HandedOver {
        epoch: u64,
        held: Held,
        unreleased: Vec<ConsoleRun>,
    },
    /// The primary went silent: fail over if we may.
    PrimaryFailed {
        silence: Duration,
        held: Held,
        unreleased: Vec<ConsoleRun>,
    },
}

/// One epoch's console bytes and the console stream offset of the first (`None` from a
/// primary whose state format does not carry it).
pub(crate) type ConsoleRun = (Option<u64>, Vec<u8>);

/// Console output of committed epochs that the primary has not yet said it released.
#[derive(Default)]
pub(crate) struct Unreleased {
    released: u64,
    epochs: VecDeque<(u64, ConsoleRun)>,
}

impl Unreleased {
    fn committed(&mut self, epoch: u64, console: ConsoleRun) {
        if epoch > self.released && !console.1.is_empty() {
            self.epochs.push_back((epoch, console));
        }
        // A primary releases within its in-flight window (<= 16 epochs); one that never says
        // so must not make this grow without bound.
        while self.epochs.len() > 64 {
            self.epochs.pop_front();
        }
    }
    fn released(&mut self, epoch: u64) {
        self.released = self.released.max(epoch);
        while self
            .epochs
            .front()
            .is_some_and(|(e, _)| *e <= self.released)
        {
            self.epochs.pop_front();
        }
    }
    /// The bytes a promoted VM must emit first, in epoch order.
    fn take(&mut self) -> Vec<ConsoleRun> {
        self.epochs.drain(..).map(|(_, run)| run).collect()
    }
}

/// Serves primaries until `stop` is set (or after one session, if so configured).
pub async fn run(cfg: BackupConfig, stop: Arc<AtomicBool>) -> Result<(), BackupError> {
    let identity = Identity::load(&cfg.tls).map_err(BackupError::Identity)?;
    let endpoint = Endpoint::server(cfg.listen, &identity, &TransportOptions::default())
        .map_err(BackupError::Bind)?;
    // Promotion must not pay for probing CPUID and MSRs: do it now, once per process.
    if let Err(e) = tokio::task::spawn_blocking(understudy_vmm::Vm::warm_up)
        .await
        .unwrap_or(Ok(()))
    {
        warn!(error = %e, "could not prepare KVM; a promotion would fail");
    }
    if let Some(dir) = &cfg.image_dir {
        report_stored_image(dir).await;
    }
    info!(addr = %cfg.listen, vm = %cfg.vm_id, "backup listening");
    metrics::gauge!("understudy_role", "role" => "backup").set(1.0);
    cfg.status.set_state("listening", None);
    metrics::gauge!("understudy_peer_connected").set(0.0);
    while !stop.load(Ordering::SeqCst) {
        // Only the wait for an attempt sits next to the timer: a handshake cut off by it would
        // leave the primary waiting for an answer that never comes.
        let incoming = tokio::select! {
            a = endpoint.accept_incoming() => a,
            _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
        };
        let Some(incoming) = incoming else { break };
        let conn = match incoming.handshake().await {
            Err(e) => {
                warn!(error = %e, "refused a connection; nothing applied");
                continue;
            }
            Ok(conn) => conn,
        };
        info!(peer = conn.peer_name(), addr = %conn.remote_address(), "primary connected");
        metrics::gauge!("understudy_peer_connected").set(1.0);
        cfg.status.set_state("receiving", None);
        cfg.status
            .update(|s| s.peer = Some(conn.peer_name().to_string()));
        // One primary at a time: others are refused at once (with the reason) rather than
        // left waiting, and cannot disturb the session being served.
        let served = {
            let serving = serve(&cfg, &conn);
            tokio::pin!(serving);
            loop {
                tokio::select! {
                    r = &mut serving => break r,
                    other = endpoint.accept_incoming() => match other {
                        Some(other) => {
                            tokio::spawn(refuse_busy(other, conn.peer_name().to_string()));
                        }
                        None => break (&mut serving).await,
                    },
                }
            }
        };
        metrics::gauge!("understudy_peer_connected").set(0.0);
        cfg.status.update(|s| s.peer = None);
        match served {
            Ok(Ended::Postcopied(vm)) => {
                conn.close(4, "postcopy done: the VM runs on the destination");
                cfg.status.update(|s| s.role = "promoted".into());
                cfg.status.set_state("running", None);
                info!("promoted: the VM runs here (postcopy); every page has arrived");
                while !stop.load(Ordering::SeqCst) {
                    if let Some(r) = vm.exit_reason() {
                        info!(reason = ?r, "the guest stopped");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                return Ok(());
            }
            Ok(Ended::Goodbye(held)) => {
                // The primary waits for this close before closing itself.
                conn.close(0, "goodbye");
                info!(peer = conn.peer_name(), "session ended");
                if let Some(dir) = &cfg.dump_dir {
                    let held = held.lock().unwrap_or_else(|e| e.into_inner());
                    dump(dir, &held).map_err(BackupError::Dump)?;
                    info!(dir = %dir.display(), epoch = held.replica.epoch(), "dumped image");
                }
            }
            Ok(Ended::PrimaryFailed {
                silence,
                held,
                unreleased,
            }) => {
                let silence_ms = silence.as_secs_f64() * 1e3;
                warn!(
                    peer = conn.peer_name(),
                    silence_ms = format!("{silence_ms:.1}"),
                    "primary declared failed"
                );
                conn.close(2, "primary declared failed");
                let why = format!("the primary was silent for {silence_ms:.0} ms");
                let t = Takeover {
                    held,
                    unreleased,
                    reason: "primary_failed",
                    confirm: None,
                };
                if take_over_or_listen(&cfg, &endpoint, t, &stop, why).await? {
                    return Ok(());
                }
            }
            Ok(Ended::HandedOver {
                epoch,
                held,
                unreleased,
            }) => {
                let why = format!("planned switchover at epoch {epoch}");
                let t = Takeover {
                    held,
                    unreleased,
                    reason: "admin",
                    confirm: Some(conn.clone()),
                };
                if take_over_or_listen(&cfg, &endpoint, t, &stop, why).await? {
                    return Ok(());
                }
            }
            Err(SessionError::VmLost(why)) => {
                conn.close(1, "the VM is lost");
                endpoint.close(0, "backup stopping");
                return Err(BackupError::VmLost(why));
            }
            Err(e) => {
                error!(peer = conn.peer_name(), error = %e, "session ended");
                conn.close(1, &e.to_string());
            }
        }
        if cfg.exit_after_session {
            break;
        }
    }
    endpoint.close(0, "backup stopping");
    Ok(())
}

/// Checks the image a previous run left in `dir` and says what it holds. A primary that still
/// knows that image resumes from it with a delta; any other gets a full sync.
async fn report_stored_image(dir: &Path) {
    let Some(pages) = crate::persist::stored_pages(dir) else {
        info!(dir = %dir.display(), "no stored image yet: one is kept here from the first session on");
        return;
    };
    let d = dir.to_path_buf();
    let checked = tokio::task::spawn_blocking(move || {
        let mut target =
            crate::persist::HashesOnly(vec![understudy_protocol::ZERO_PAGE_HASH; pages as usize]);
        crate::persist::load(&d, &mut target)
    })
    .await;
    match checked {
        Ok(Ok(Some(l))) => info!(
            dir = %dir.display(),
            epoch = l.epoch,
            digest = %l.digest,
            journal_records = l.replayed,
            consistent_state_epoch = ?l.state.as_ref().map(|s| s.0),
            "stored image intact: the last committed epoch on disk, digest verified (a primary that sent it resumes from it with a delta)"
        ),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            error!(dir = %dir.display(), error = %e, "the stored image is damaged; it will be replaced")
        }
        Err(e) => error!(error = %e, "checking the stored image failed"),
    }
}

/// Refuses a connection that arrives while another primary is being served.
async fn refuse_busy(incoming: understudy_transport::Incoming, serving: String) {
    match incoming.handshake().await {
        Ok(c) => {
            warn!(peer = c.peer_name(), addr = %c.remote_address(), serving = %serving,
                "refused a second connection: this backup already serves a primary; nothing applied");
            c.close(5, &format!("busy: this backup already serves {serving}"));
        }
        Err(e) => warn!(error = %e, "refused a connection; nothing applied"),
    }
}

/// Takes over; returns whether the VM runs here now. When it does not (no lease), the primary
/// may well be alive: the caller serves it again when it comes back.
async fn take_over_or_listen(
    cfg: &BackupConfig,
    endpoint: &Endpoint,
    t: Takeover,
    stop: &Arc<AtomicBool>,
    why: String,
) -> Result<bool, BackupError> {
    cfg.status.set_state("promoting", Some(why));
    let promoted = crate::failover::take_over(cfg, endpoint, t, Arc::clone(stop)).await?;
    if !promoted {
        cfg.status
            .set_state("listening", Some("did not promote: see the log".into()));
    }
    Ok(promoted)
}

fn dump(dir: &Path, held: &Replicated) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("memory.img"))?);
    held.image.memory().write_image(&mut f)?;
    let state = held
        .state
        .as_ref()
        .map(|(_, s)| s.as_slice())
        .unwrap_or(&[]);
    std::fs::write(dir.join("state.bin"), state)
}

pub(crate) fn now_unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Chunks decoded (or, in postcopy, filled) at once: one per core. More only adds threads to
/// tokio's blocking pool, each new one preempting whatever runs on the host.
pub(crate) fn decode_slots() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    ))
}

/// Reads the one chunk frame a uni stream carries.
pub(crate) async fn read_chunk(
    reader: &mut understudy_transport::FrameReader,
    limits: &Limits,
) -> Result<understudy_protocol::ChunkFrame, String> {
    let frame = reader
        .read_frame()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("empty chunk stream")?;
    match messages::decode(&frame, limits) {
        Ok(Message::Chunk(c)) => Ok(c),
        Ok(other) => Err(format!("{:?} on a chunk stream", other.kind())),
        Err(e) => Err(format!("undecodable chunk frame: {e}")),
    }
}

/// Writes control messages in the order queued.
async fn writer(
    mut tx: FrameSender,
    mut rx: mpsc::UnboundedReceiver<Message>,
) -> Result<(), SessionError> {
    while let Some(msg) = rx.recv().await {
        messages::send(&mut tx, &msg)
            .await
            .map_err(|e| SessionError::Link(e.to_string()))?;
    }
    Ok(())
}

/// Queues acks in order, each no earlier than its `ready_at` (the ack-delay knob), journaling
/// when each one is handed to the writer.
async fn ack_delayer(
    out: mpsc::UnboundedSender<Message>,
    mut rx: mpsc::UnboundedReceiver<(u64, Instant)>,
    journal: Option<std::path::PathBuf>,
) {
    let mut journal = journal.and_then(|p| std::fs::File::create(p).ok());
    while let Some((epoch, ready_at)) = rx.recv().await {
        tokio::time::sleep_until(ready_at.into()).await;
        if let Some(j) = &mut journal {
            let _ = writeln!(j, r#"{{"epoch":{epoch},"unix_ns":{}}}"#, now_unix_ns());
        }
        if out.send(Message::Ack(Ack { epoch })).is_err() {
            return;
        }
    }
}

pub(crate) type Held = Arc<Mutex<Replicated>>;

async fn serve(cfg: &BackupConfig, conn: &Connection) -> Result<Ended, SessionError> {
    let limits = Limits::default();
    let control = conn
        .accept_control(limits.max_frame_len)
        .await
        .map_err(|e| SessionError::Link(e.to_string()))?;
    let (mut tx, mut rx) = control.split();
    let first = rx
        .read_frame()
        .await
        .map_err(|e| SessionError::Link(e.to_string()))?
        .ok_or_else(|| SessionError::Link("control stream closed before Hello".into()))?;
    let hello = match messages::decode(&first, &limits) {
        Ok(Message::Hello(h)) => h,
        Ok(other) => {
            return Err(SessionError::Protocol(format!(
                "expected Hello, got {:?}",
                other.kind()
            )))
        }
        Err(e) => return Err(SessionError::Protocol(format!("undecodable Hello: {e}"))),
    };
    let mut local = LocalEnd::new(cfg.vm_id.clone());
    let mut answer = answer_hello(&hello, &local);
    // The image is ready before the Welcome: the primary's clocks (heartbeats, the in-flight
    // window) start at the Welcome, and allocating a large image takes a while.
    let mut image = match answer {
        Message::Welcome(_) => match HotImage::new(&hello.layout) {
            Ok(image) => Some(image),
            Err(e) => {
                answer = Message::Reject(understudy_protocol::Reject {
                    code: understudy_protocol::RejectCode::Layout,
                    reason: format!("the backup cannot hold this memory layout: {e}"),
                });
                None
            }
        },
        _ => None,
    };
    // A primary that offers to resume gets the image kept on disk, if there is one for this
    // layout: it then sends only what changed since (or reconnects without the offer).
    let mut resumed: Option<(crate::persist::Loaded, PageTree)> = None;
    if let (Some(img), Some(dir), Some(_), Mode::Protect) =
        (image.as_mut(), &cfg.image_dir, hello.base, hello.mode)
    {
        let pages = hello.layout.total_pages();
        if crate::persist::stored_pages(dir) == Some(pages) {
            let mut target = crate::persist::IntoHot {
                image: img,
                hashes: vec![understudy_protocol::ZERO_PAGE_HASH; pages as usize],
            };
            match crate::persist::load(dir, &mut target) {
                Ok(Some(l)) => {
                    let tree = PageTree::from_hashes(target.hashes);
                    local.held = Some((
                        hello.layout.clone(),
                        understudy_protocol::EpochDigest {
                            epoch: l.epoch,
                            digest: l.digest,
                        },
                    ));
                    resumed = Some((l, tree));
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "the stored image cannot be resumed from; starting from zeros")
                }
            }
            if resumed.is_none() {
                // Pages may have been loaded: start from a zeroed image.
                image = match HotImage::new(&hello.layout) {
                    Ok(fresh) => Some(fresh),
                    Err(e) => {
                        answer = Message::Reject(understudy_protocol::Reject {
                            code: understudy_protocol::RejectCode::Layout,
                            reason: format!(
                                "the backup cannot hold this memory layout after a failed resume: {e}"
                            ),
                        });
                        None
                    }
                };
            }
        }
        if resumed.is_some() {
            answer = answer_hello(&hello, &local);
        }
    }
    if image.is_none() {
        if let Message::Welcome(_) = answer {
            answer = Message::Reject(understudy_protocol::Reject {
                code: understudy_protocol::RejectCode::Layout,
                reason: "the backup cannot hold this memory layout".into(),
            });
        }
    }
    let _ = messages::send(&mut tx, &answer).await;
    let version = match answer {
        Message::Welcome(w) => w.version,
        Message::Reject(r) => {
            warn!(code = ?r.code, reason = %r.reason, vm = %hello.vm_id, "refused the primary");
            let _ = tx.finish();
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Err(SessionError::Refused(r.reason));
        }
        _ => unreachable!("answer_hello returns Welcome or Reject"),
    };
    let image = image.expect("a Welcome comes with an image");
    if hello.mode == understudy_protocol::Mode::Postcopy {
        info!(version, vm = %hello.vm_id, "postcopy move accepted: the VM will run here before its memory has arrived");
        let vm = crate::postcopy::serve(conn, tx, rx, &hello, image, &limits, cfg).await?;
        return Ok(Ended::Postcopied(vm));
    }
    let pages = image.memory().size() / understudy_protocol::PAGE_SIZE as u64;
    let resumed = resumed.filter(|_| matches!(answer, Message::Welcome(w) if w.resumed));
    // Persistence: a resumed session goes on from the stored image (its epochs continue the
    // store's numbering); any other starts from a zeroed image, and so does the copy on disk.
    let store_base = resumed.as_ref().map_or(0, |(l, _)| l.epoch);
    let persister = match &cfg.image_dir {
        None => None,
        Some(dir) => {
            let p = crate::persist::Persister::start(
                dir,
                pages,
                resumed.as_ref().map(|(l, _)| l),
                Some(&cfg.vm_thread),
            )
            .map_err(|e| SessionError::Apply {
                epoch: 0,
                reason: format!("cannot keep the image in {}: {e}", dir.display()),
            })?;
            if resumed.is_none() {
                p.reset();
            }
            Some(p)
        }
    };
    let replica = match resumed {
        Some((l, tree)) => {
            info!(
                stored_epoch = l.epoch,
                digest = %l.digest,
                "resuming from the stored image: the primary sends only what changed since"
            );
            Replica::from_tree(tree, 0)
        }
        None => Replica::zeroed(pages as u32),
    };
    let held: Held = Arc::new(Mutex::new(Replicated {
        image,
        replica,
        state: None,
        prepared: None,
    }));
    info!(version, vm = %hello.vm_id, pages, mode = ?hello.mode, resumed = store_base > 0, "session accepted");

    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(writer(tx, out_rx));
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let acks = tokio::spawn(ack_delayer(out_tx.clone(), ack_rx, cfg.ack_journal.clone()));

    // Chunks: each uni stream carries one chunk frame; decode and verify off the runtime, at
    // most one chunk per core at a time. Unbounded, a burst of chunks grew tokio's blocking
    // pool by dozens of new threads within a millisecond, which on a shared host preempted
    // everything else there (a guest's vCPU for 10 ms and more).
    let (chunk_tx, mut chunk_rx) = mpsc::channel::<Result<DecodedChunk, String>>(64);
    let decoders = decode_slots();
    let receiver = {
        let conn = conn.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            loop {
                let mut reader = match conn.accept_uni(limits.max_frame_len).await {
                    Ok(r) => r,
                    Err(_) => return,
                };
                let chunk_tx = chunk_tx.clone();
                let limits = limits.clone();
                let decoders = Arc::clone(&decoders);
                tokio::spawn(async move {
                    let decoded = async {
                        let chunk = read_chunk(&mut reader, &limits).await?;
                        let slot = decoders.acquire_owned().await.map_err(|e| e.to_string())?;
                        tokio::task::spawn_blocking(move || {
                            let _slot = slot;
                            ChunkDecoder::new(limits, pages)
                                .decode_frame(&chunk)
                                .map_err(|e| format!("chunk of epoch {} refused: {e}", chunk.epoch))
                        })
                        .await
                        .map_err(|e| e.to_string())?
                    }
                    .await;
                    let _ = chunk_tx.send(decoded).await;
                });
            }
        })
    };

    // Control frames through a channel: `read_frame` is not cancel-safe, so it must not sit in
    // the session loop's `select!` next to a timer. The reader also answers heartbeats and
    // notes when the primary was last heard, so that a long apply in the session loop is
    // neither mistaken for the primary's silence nor delays its replies.
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Result<Message, SessionError>>(16);
    let heard = Arc::new(Mutex::new(Instant::now()));
    let control_reader = {
        let limits = limits.clone();
        let heard = Arc::clone(&heard);
        let out = out_tx.clone();
        tokio::spawn(async move {
            loop {
                let frame = rx.read_frame().await;
                *heard.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                if let Ok(Some(f)) = &frame {
                    if let Ok(Message::Heartbeat(h)) = messages::decode(f, &limits) {
                        let now = now_unix_ns() as u64;
                        let _ = out.send(Message::Heartbeat(Heartbeat::reply(&h, now, now)));
                        continue;
                    }
                }
                let msg = match frame {
                    Ok(Some(f)) => messages::decode(&f, &limits).map_err(|e| {
                        SessionError::Protocol(format!(
                            "undecodable control message ({} bytes): {e}",
                            f.len()
                        ))
                    }),
                    Ok(None) => Err(SessionError::Link("control stream closed".into())),
                    Err(e) => Err(SessionError::Link(e.to_string())),
                };
                let end = msg.is_err();
                if ctl_tx.send(msg).await.is_err() || end {
                    return;
                }
            }
        })
    };
    let mut unreleased = Unreleased::default();
    let result = session_loop(
        cfg,
        &limits,
        &held,
        &mut unreleased,
        Links {
            heard: &heard,
            control: &mut ctl_rx,
            chunks: &mut chunk_rx,
            acks: &ack_tx,
            out: &out_tx,
            persist: persister.as_ref(),
            store_base,
        },
    )
    .await;
    if let Some(p) = &persister {
        p.flush();
    }
    control_reader.abort();
    receiver.abort();
    drop(ack_tx);
    drop(out_tx);
    let _ = acks.await;
    let _ = writer.await;
    match result {
        Ok(()) => Ok(Ended::Goodbye(held)),
        Err(SessionError::HandedOver { epoch }) => Ok(Ended::HandedOver {
            epoch,
            held,
            unreleased: unreleased.take(),
        }),
        Err(SessionError::PrimaryLost { silence }) => Ok(Ended::PrimaryFailed {
            silence,
            held,
            unreleased: unreleased.take(),
        }),
        // A primary whose link ends without a Goodbye has crashed or been fenced (a fenced
        // primary exits): try to take over like after silence; the lease decides whether we may.
        Err(SessionError::Link(cause))
            if held.lock().unwrap_or_else(|e| e.into_inner()).promotable() =>
        {
            warn!(cause = %cause, "the link to the primary ended without a goodbye");
            Ok(Ended::PrimaryFailed {
                silence: heard.lock().unwrap_or_else(|e| e.into_inner()).elapsed(),
                held,
                unreleased: unreleased.take(),
            })
        }
        Err(e) => Err(e),
    }
}

/// The session loop's channels.
struct Links<'a> {
    /// When the control stream last delivered anything.
    heard: &'a Mutex<Instant>,
    /// Decoded control messages from the primary.
    control: &'a mut mpsc::Receiver<Result<Message, SessionError>>,
    /// Decoded, verified chunks.
    chunks: &'a mut mpsc::Receiver<Result<DecodedChunk, String>>,
    /// Acks to send (after the ack-delay knob).
    acks: &'a mpsc::UnboundedSender<(u64, Instant)>,
    /// Messages to send at once (heartbeat replies).
    out: &'a mpsc::UnboundedSender<Message>,
    /// `--image-dir`: committed epochs go to disk.
    persist: Option<&'a crate::persist::Persister>,
    /// The stored epoch this session resumed from: on disk, epoch E of the session is
    /// `store_base + E`, so that the store's numbering keeps increasing.
    store_base: u64,
}

async fn session_loop(
    cfg: &BackupConfig,
    limits: &Limits,
    held: &Held,
    unreleased: &mut Unreleased,
    links: Links<'_>,
) -> Result<(), SessionError> {
    let Links {
        heard,
        control,
        chunks,
        acks,
        out,
        persist,
        store_base,
    } = links;
    let mut committed = 0u64;
    // A promoted VM that will be re-protected needs dirty logging.
    let reprotect = cfg
        .protect_to
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some();
    {
        // Off the runtime, while the first epochs are on their way; a commit that comes
        // first waits for it on the lock.
        let held = Arc::clone(held);
        drop(tokio::task::spawn_blocking(move || {
            held.lock()
                .unwrap_or_else(|e| e.into_inner())
                .prepare_ahead(reprotect)
        }));
    }
    let mut staged: BTreeMap<u64, EpochAssembler> = BTreeMap::new();
    let mut commits: VecDeque<(Commit, Instant)> = VecDeque::new();
    let mut last_chunk = Instant::now();
    loop {
        tokio::select! {
            msg = control.recv() => {
                let msg = msg.ok_or_else(|| SessionError::Link("control reader ended".into()))?;
                match msg {
                    Ok(Message::Commit(c)) => {
                        let expected = committed + 1 + commits.len() as u64;
                        if c.epoch != expected {
                            return Err(SessionError::Protocol(format!(
                                "Commit for epoch {} while expecting {expected}", c.epoch
                            )));
                        }
                        commits.push_back((c, Instant::now()));
                    }
                    Ok(Message::Ack(a)) => unreleased.released(a.epoch),
                    Ok(Message::Promote(p)) => {
                        let promotable = held.lock().unwrap_or_else(|e| e.into_inner()).promotable();
                        if p.epoch != committed || !commits.is_empty() || !promotable {
                            return Err(SessionError::Protocol(format!(
                                "Promote({}) but epoch {committed} is the last committed here (promotable: {promotable})",
                                p.epoch
                            )));
                        }
                        info!(epoch = p.epoch, "the primary hands the VM over (planned switchover)");
                        return Err(SessionError::HandedOver { epoch: p.epoch });
                    }
                    Ok(Message::Heartbeat(h)) => {
                        let now = now_unix_ns() as u64;
                        let _ = out.send(Message::Heartbeat(Heartbeat::reply(&h, now, now)));
                    }
                    Ok(Message::Goodbye(g)) => {
                        info!(reason = ?g.reason, text = %g.text, committed, "primary said goodbye");
                        return Ok(());
                    }
                    Ok(other) => {
                        return Err(SessionError::Protocol(format!(
                            "unexpected {:?} on the control stream", other.kind()
                        )))
                    }
                    Err(e) => return Err(e),
                }
            }
            chunk = chunks.recv() => {
                let chunk = chunk
                    .ok_or_else(|| SessionError::Link("chunk receiver ended".into()))?
                    .map_err(SessionError::Protocol)?;
                let e = chunk.epoch;
                last_chunk = Instant::now();
                // Chunks prove the primary alive as well as heartbeats do; during a full sync
                // on a busy host they keep coming while a heartbeat may lag behind them.
                *heard.lock().unwrap_or_else(|e| e.into_inner()) = last_chunk;
                if !understudy_protocol::epoch_in_window(e, committed) {
                    return Err(SessionError::Protocol(format!(
                        "chunk for epoch {e} while epoch {committed} is the last committed"
                    )));
                }
                staged
                    .entry(e)
                    .or_insert_with(|| EpochAssembler::new(e, limits.clone()))
                    .add(chunk)
                    .map_err(|err| SessionError::Protocol(err.to_string()))?;
            }
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
        let silence = heard.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
        metrics::gauge!("understudy_heartbeat_age_seconds").set(silence.as_secs_f64());
        if silence > cfg.failure_timeout {
            return Err(SessionError::PrimaryLost { silence });
        }
        // Apply every commit whose chunks are all in, in order.
        while let Some((c, since)) = commits.front() {
            let have = staged.get(&c.epoch).map_or(0, |a| a.chunk_count());
            if have < c.chunk_count as usize {
                // A slow link may take longer than the timeout to deliver an epoch (its Commit
                // overtakes its chunks): only a link that delivers nothing at all for that
                // long ends the session.
                if since.elapsed() > cfg.chunk_timeout && last_chunk.elapsed() > cfg.chunk_timeout {
                    return Err(SessionError::Protocol(format!(
                        "Commit({}) announced {} chunks, {have} arrived, and no chunk at all came for {:?}",
                        c.epoch, c.chunk_count, cfg.chunk_timeout
                    )));
                }
                break;
            }
            let (c, _) = commits.pop_front().expect("front exists");
            let assembler = staged
                .remove(&c.epoch)
                .unwrap_or_else(|| EpochAssembler::new(c.epoch, limits.clone()));
            let held = Arc::clone(held);
            let started = Instant::now();
            let c_state_empty = c.state.is_empty();
            let prepare_logging = reprotect;
            if let Some(why) = persist.and_then(|p| p.failure()) {
                return Err(SessionError::Apply {
                    epoch: c.epoch,
                    reason: format!("this backup can no longer keep its image on disk ({why}); free space or fix --image-dir, then restart it"),
                });
            }
            let persist_tx = persist.map(|p| p.sender());
            let (epoch, outcome) = tokio::task::spawn_blocking(move || {
                let mut h = held.lock().unwrap_or_else(|e| e.into_inner());
                let h = &mut *h;
                let touched: Vec<u32> = if persist_tx.is_some() {
                    let mut v: Vec<u32> = assembler.pages().collect();
                    v.sort_unstable();
                    v.dedup();
                    v
                } else {
                    Vec::new()
                };
                let r = assembler.commit(&c, &mut h.replica, &mut h.image);
                if let (Ok(_), Some(tx)) = (&r, &persist_tx) {
                    use understudy_protocol::PageImage;
                    let mut data = vec![0u8; touched.len() * understudy_protocol::PAGE_SIZE];
                    for (p, out) in touched
                        .iter()
                        .zip(data.chunks_exact_mut(understudy_protocol::PAGE_SIZE))
                    {
                        h.image
                            .read_page(*p, out.try_into().expect("PAGE_SIZE chunks"));
                    }
                    tx.record(crate::persist::Record {
                        epoch: store_base + c.epoch,
                        digest: c.digest,
                        pages: touched,
                        data,
                        state: c.state.clone(),
                    });
                }
                let mut console = (None, Vec::new());
                if r.is_ok() && !c.state.is_empty() {
                    if let Ok(s) = VmState::decode(&c.state, DEFAULT_STATE_LIMIT) {
                        if h.prepared.is_none() {
                            h.prepare(&s, prepare_logging);
                        }
                        console = (s.console_offset, s.console);
                    }
                    h.state = Some((c.epoch, c.state));
                }
                (c.epoch, r.map(|done| (done, console)))
            })
            .await
            .map_err(|e| SessionError::Link(e.to_string()))?;
            match outcome {
                Ok((done, console)) => {
                    committed = epoch;
                    unreleased.committed(epoch, console);
                    metrics::counter!("understudy_epochs_total", "outcome" => "applied")
                        .increment(1);
                    metrics::histogram!("understudy_apply_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::gauge!("understudy_last_committed_epoch").set(epoch as f64);
                    cfg.status.update(|s| s.last_epoch = epoch);
                    if !c_state_empty {
                        cfg.status.set_state("hot", None);
                    }
                    tracing::debug!(
                        epoch,
                        pages = done.pages,
                        apply_us = started.elapsed().as_micros() as u64,
                        "committed epoch"
                    );
                    let _ = acks.send((epoch, Instant::now() + cfg.ack_delay));
                }
                Err(e) => {
                    metrics::counter!("understudy_epochs_total", "outcome" => "refused")
                        .increment(1);
                    if matches!(e, understudy_protocol::ApplyError::Digest { .. }) {
                        // Ending the session makes the primary reconnect with a full sync.
                        metrics::counter!("understudy_digest_mismatches_total").increment(1);
                        error!(epoch, error = %e, "image digest mismatch: nothing of the epoch applied; the primary must resync");
                    }
                    return Err(SessionError::Apply {
                        epoch,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
}
