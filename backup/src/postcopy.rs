//! The destination of a postcopy (or hybrid) move: run the VM first, pull its memory after.
//!
//! ```text
//!  source                                   destination
//!  [hybrid: every page, live, as chunks] -> fill(page): written once, mapped
//!  [hybrid: Commit(P, K chunks, no state)]  once K chunks are in:
//!               <------------------------- Ack(P)
//!  pause; Demand(stale pages)* ----------->  hybrid: those pages are unmapped again
//!  Commit(S, state only) ---------------->  restore the VM on lazily mapped memory, run it
//!               <------------------------- Ack(S): running (the source's downtime ends)
//!                                           guest touches an absent page: a minor fault;
//!               <------------------------- Demand(page)  (the fault handler thread)
//!  chunk(page) first, then the background  fill(page) wakes the vCPU; each fault's round
//!  push of every other page -------------> trip is measured
//!               <------------------------- Ack(S+1): every page present; the source's VM goes
//! ```
//!
//! From the Commit until Ack(2) the VM exists whole on neither host: if the source dies, the
//! pages it had not sent are gone and the VM with them (the destination says so and stops the
//! guest); if the destination dies, the source's copy is paused for good and stale.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{error, info, warn};
use understudy_protocol::codec::RecordKind;
use understudy_protocol::{Ack, ChunkDecoder, Demand, Hello, Limits, Message, Mode, PAGE_SIZE};
use understudy_transport::{messages, Connection, FrameReader, FrameSender};
use understudy_vmm::state::{VmState, DEFAULT_STATE_LIMIT};
use understudy_vmm::{LazyMemory, OutputGate, Vm};

use crate::image::HotImage;
use crate::session::SessionError;

/// Pages per `Demand` message at most (well under the decoder's record limit).
const DEMAND_BATCH: usize = 64;

/// Fault round trips seen by the destination.
#[derive(Default)]
struct FaultTimes {
    /// Page -> when its fault was read.
    pending: HashMap<u64, Instant>,
    /// Fault read -> page present, in microseconds.
    done: Vec<u64>,
}

/// Serves a postcopy move on an accepted session; returns the running VM once every page is
/// present, or an error (the VM is then lost: the source no longer runs it either).
pub(crate) async fn serve(
    conn: &Connection,
    tx: FrameSender,
    rx: FrameReader,
    hello: &Hello,
    image: HotImage,
    limits: &Limits,
    cfg: &crate::BackupConfig,
) -> Result<Vm, SessionError> {
    debug_assert_eq!(hello.mode, Mode::Postcopy);
    let failure_timeout = cfg.failure_timeout;
    let vm_thread = cfg.vm_thread.clone();
    let specs = image.memory().specs();
    let fds = image
        .memory()
        .clone_fds()
        .map_err(|e| SessionError::Apply {
            epoch: 0,
            reason: format!("duplicating the image's memfds: {e}"),
        })?;
    let (memory, lazy) = LazyMemory::map(&specs, fds).map_err(|e| SessionError::Apply {
        epoch: 0,
        reason: format!("userfaultfd over the image: {e}"),
    })?;
    let lazy = Arc::new(lazy);
    let pages = lazy.pages();
    info!(pages, "postcopy: memory registered for on-demand pages");

    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
    let writer = tokio::spawn(async move {
        let mut tx = tx;
        while let Some(m) = out_rx.recv().await {
            if messages::send(&mut tx, &m).await.is_err() {
                return;
            }
        }
    });

    // Faults: a thread reads them and asks the source for the pages.
    let times = Arc::new(Mutex::new(FaultTimes::default()));
    let stop_faults = Arc::new(AtomicBool::new(false));
    let handler = {
        let lazy = Arc::clone(&lazy);
        let times = Arc::clone(&times);
        let stop = Arc::clone(&stop_faults);
        let out = out_tx.clone();
        // The guest waits on this thread's answers: it starts from the VM start thread, at the
        // priority the VM's vCPUs get.
        vm_thread
            .run(move || {
                std::thread::Builder::new()
                    .name("postcopy-faults".into())
                    .spawn(move || fault_loop(&lazy, &times, &stop, &out))
            })
            .await
            .map_err(SessionError::Link)?
            .map_err(|e| SessionError::Link(e.to_string()))?
    };
    let result = run(
        conn,
        rx,
        &lazy,
        memory,
        &times,
        &out_tx,
        limits,
        failure_timeout,
        &vm_thread,
    )
    .await;
    stop_faults.store(true, Ordering::SeqCst);
    let _ = handler.join();
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    let vm = result?;
    // Every page is present: the registration can go, the guest runs on ordinary memory.
    match Arc::try_unwrap(lazy) {
        Ok(l) => {
            if let Err(e) = l.unregister() {
                warn!(error = %e, "unregistering the userfaultfd");
            }
        }
        Err(_) => warn!("the userfaultfd is still referenced; it goes with the process"),
    }
    let t = times.lock().unwrap_or_else(|e| e.into_inner());
    let mut rtt = t.done.clone();
    rtt.sort_unstable();
    let pct = |q: f64| {
        rtt.get(((rtt.len() as f64 * q) as usize).min(rtt.len().saturating_sub(1)))
            .copied()
    };
    info!(
        faults = rtt.len(),
        rtt_p50_us = ?pct(0.5),
        rtt_p99_us = ?pct(0.99),
        rtt_max_us = ?rtt.last(),
        "postcopy done: every page is here; fault round trips (fault read -> page present)"
    );
    Ok(vm)
}

/// Reads faults and sends `Demand`s until stopped.
fn fault_loop(
    lazy: &LazyMemory,
    times: &Mutex<FaultTimes>,
    stop: &AtomicBool,
    out: &mpsc::UnboundedSender<Message>,
) {
    while !stop.load(Ordering::SeqCst) {
        let fault = match lazy.wait_fault(Duration::from_millis(20)) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                error!(error = %e, "postcopy: reading faults failed");
                return;
            }
        };
        let mut batch = vec![fault.page_index];
        // More faults may be queued (other vCPUs, or the VMM): ask for them together.
        while batch.len() < DEMAND_BATCH {
            match lazy.wait_fault(Duration::ZERO) {
                Ok(Some(f)) => batch.push(f.page_index),
                _ => break,
            }
        }
        let now = Instant::now();
        let mut wanted = Vec::with_capacity(batch.len());
        {
            let mut t = times.lock().unwrap_or_else(|e| e.into_inner());
            for p in batch {
                if lazy.is_present(p) {
                    // Its content is here, but the mapping went away (the kernel may drop
                    // page table entries, e.g. when a stale neighbour was unmapped): map it.
                    if let Err(e) = lazy.make_present(p, 1) {
                        error!(page = p, error = %e, "postcopy: remapping a present page failed");
                    }
                    continue;
                }
                if t.pending.insert(p, now).is_none() {
                    wanted.push(p as u32);
                }
            }
        }
        metrics::counter!("understudy_postcopy_faults_total").increment(wanted.len() as u64);
        if !wanted.is_empty() && out.send(Message::Demand(Demand { pages: wanted })).is_err() {
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    conn: &Connection,
    rx: FrameReader,
    lazy: &Arc<LazyMemory>,
    memory: Arc<understudy_vmm::GuestMemory>,
    times: &Arc<Mutex<FaultTimes>>,
    out: &mpsc::UnboundedSender<Message>,
    limits: &Limits,
    failure_timeout: Duration,
    vm_thread: &crate::VmThread,
) -> Result<Vm, SessionError> {
    // Chunks: decode and verify off the runtime (one per core at a time, next to the running
    // guest), then write each page once.
    let (chunk_tx, mut chunk_rx) = mpsc::channel::<Result<u64, String>>(64);
    let fillers = crate::session::decode_slots();
    let receiver = {
        let conn = conn.clone();
        let limits = limits.clone();
        let lazy = Arc::clone(lazy);
        let times = Arc::clone(times);
        tokio::spawn(async move {
            loop {
                let mut reader = match conn.accept_uni(limits.max_frame_len).await {
                    Ok(r) => r,
                    Err(_) => return,
                };
                let (chunk_tx, limits, lazy, times, fillers) = (
                    chunk_tx.clone(),
                    limits.clone(),
                    Arc::clone(&lazy),
                    Arc::clone(&times),
                    Arc::clone(&fillers),
                );
                tokio::spawn(async move {
                    let r = async {
                        let chunk = crate::session::read_chunk(&mut reader, &limits).await?;
                        let slot = fillers.acquire_owned().await.map_err(|e| e.to_string())?;
                        tokio::task::spawn_blocking(move || {
                            let _slot = slot;
                            fill_chunk(&chunk, &limits, &lazy, &times)
                        })
                        .await
                        .map_err(|e| e.to_string())?
                    }
                    .await;
                    let _ = chunk_tx.send(r).await;
                });
            }
        })
    };
    // Control frames through a channel: `read_frame` is not cancel-safe, so it must not sit in
    // the `select!` below next to a timer.
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Result<Message, SessionError>>(64);
    let control = {
        let limits = limits.clone();
        let mut rx = rx;
        tokio::spawn(async move {
            loop {
                let msg = match rx.read_frame().await {
                    Ok(Some(f)) => messages::decode(&f, &limits).map_err(|e| {
                        SessionError::Protocol(format!("undecodable control message: {e}"))
                    }),
                    Ok(None) => Err(SessionError::Link(
                        "the source closed the control stream".into(),
                    )),
                    Err(e) => Err(SessionError::Link(e.to_string())),
                };
                let end = msg.is_err();
                if ctl_tx.send(msg).await.is_err() || end {
                    return;
                }
            }
        })
    };
    let started = AtomicBool::new(false);
    let mut vm: Option<Vm> = None;
    let result = async {
        let mut switch_epoch = 0;
        let mut heard = Instant::now();
        // Chunks filled so far, and the hybrid pre-pass's Commit (epoch, chunks) until acked.
        let mut chunks_done = 0u64;
        let mut prepass: Option<(u64, u64)> = None;
        loop {
            if vm.is_some() && lazy.all_present() {
                let _ = out.send(Message::Ack(Ack { epoch: switch_epoch + 1 }));
                return Ok(vm.take().expect("checked"));
            }
            if let Some((epoch, chunks)) = prepass {
                if chunks_done >= chunks {
                    let _ = out.send(Message::Ack(Ack { epoch }));
                    info!(present = lazy.present_count(), pages = lazy.pages(), "postcopy: the pre-pass is in");
                    prepass = None;
                }
            }
            tokio::select! {
                msg = ctl_rx.recv() => {
                    heard = Instant::now();
                    let msg = msg.ok_or_else(|| SessionError::Link("the control reader ended".into()))?;
                    match msg {
                        // Hybrid: pages whose pre-pass copy went stale; unmap them again.
                        Ok(Message::Demand(d)) if vm.is_none() => {
                            for p in d.pages {
                                lazy.invalidate(u64::from(p)).map_err(|e| SessionError::Protocol(format!("stale page {p}: {e}")))?;
                            }
                        }
                        Ok(Message::Commit(c)) if vm.is_none() && c.state.is_empty() => {
                            prepass = Some((c.epoch, u64::from(c.chunk_count)));
                        }
                        Ok(Message::Commit(c)) if vm.is_none() => {
                            switch_epoch = c.epoch;
                            let state = VmState::decode(&c.state, DEFAULT_STATE_LIMIT)
                                .map_err(|e| SessionError::Protocol(format!("the switch's VM state: {e}")))?;
                            let gate = OutputGate::passthrough(Box::new(std::io::stdout()));
                            let t = Instant::now();
                            let mem = Arc::clone(&memory);
                            let v = vm_thread.run(move || Vm::restore(mem, &state, gate, false, false))
                                .await
                                .map_err(SessionError::Link)?
                                .map_err(|e| SessionError::Apply { epoch: c.epoch, reason: format!("restoring the VM: {e}") })?;
                            let _ = out.send(Message::Ack(Ack { epoch: c.epoch }));
                            info!(
                                present = lazy.present_count(),
                                pages = lazy.pages(),
                                restore_us = t.elapsed().as_micros() as u64,
                                "postcopy: the VM runs here; pulling the pages it lacks"
                            );
                            metrics::counter!("understudy_promotions_total", "reason" => "migrate").increment(1);
                            vm = Some(v);
                            started.store(true, Ordering::SeqCst);
                        }
                        Ok(Message::Heartbeat(h)) => {
                            let now = crate::session::now_unix_ns() as u64;
                            let _ = out.send(Message::Heartbeat(understudy_protocol::Heartbeat::reply(&h, now, now)));
                        }
                        Ok(Message::Goodbye(_)) => {}
                        Ok(other) => return Err(SessionError::Protocol(format!("unexpected {:?} in a postcopy move", other.kind()))),
                        Err(e) => return Err(e),
                    }
                }
                r = chunk_rx.recv() => match r {
                    Some(Ok(_)) => {
                        heard = Instant::now();
                        chunks_done += 1;
                    }
                    Some(Err(e)) => return Err(SessionError::Protocol(e)),
                    None => return Err(SessionError::Link("chunk receiver ended".into())),
                },
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
            if heard.elapsed() > failure_timeout {
                return Err(SessionError::PrimaryLost { silence: heard.elapsed() });
            }
            if let Some(r) = vm.as_ref().and_then(|v| v.exit_reason()) {
                return Err(SessionError::Apply { epoch: 1, reason: format!("the guest stopped: {r:?}") });
            }
        }
    }
    .await;
    receiver.abort();
    control.abort();
    if result.is_err() {
        if let Some(v) = vm.take() {
            // Its vCPUs may wait in the kernel for pages that will never come, and a vCPU
            // waiting for a page cannot be stopped: dropping the VM would wait for them
            // forever. The VM is lost and this process ends with the error.
            std::mem::forget(v);
        }
    }
    match result {
        Ok(vm) => Ok(vm),
        // Before the switch the source still runs the VM: nothing is lost.
        Err(e) if !started.load(Ordering::SeqCst) => Err(e),
        Err(e) => {
            let missing = lazy.pages() - lazy.present_count();
            error!(
                error = %e,
                missing_pages = missing,
                "postcopy failed: the VM is lost (the source no longer runs it and {missing} of its pages never arrived); restore it from a snapshot or a protected copy"
            );
            Err(SessionError::VmLost(format!(
                "{e}; {missing} of its {} pages never arrived",
                lazy.pages()
            )))
        }
    }
}

/// Writes a chunk's pages (each at most once) and notes the round trips of the faults it
/// answers. Returns the pages written.
fn fill_chunk(
    chunk: &understudy_protocol::ChunkFrame,
    limits: &Limits,
    lazy: &LazyMemory,
    times: &Mutex<FaultTimes>,
) -> Result<u64, String> {
    let decoded = ChunkDecoder::new(limits.clone(), lazy.pages())
        .decode_frame(chunk)
        .map_err(|e| format!("postcopy chunk refused: {e}"))?;
    let zero = [0u8; PAGE_SIZE];
    let mut written = 0;
    for r in &decoded.records {
        let data: &[u8] = match r.kind {
            RecordKind::Zero => &zero,
            RecordKind::Full => decoded
                .data_page(r.slot)
                .ok_or_else(|| format!("page {}: no data", r.page))?,
            other => {
                return Err(format!(
                    "page {}: a {other:?} record in a postcopy move",
                    r.page
                ))
            }
        };
        written += lazy
            .fill(u64::from(r.page), data)
            .map_err(|e| format!("page {}: {e}", r.page))?;
        let mut t = times.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = t.pending.remove(&u64::from(r.page)) {
            let us = at.elapsed().as_micros() as u64;
            t.done.push(us);
            metrics::histogram!("understudy_postcopy_fault_seconds").record(us as f64 / 1e6);
        }
    }
    Ok(written)
}
