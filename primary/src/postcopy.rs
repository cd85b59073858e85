//! The source of a postcopy or hybrid move (see the destination's side in
//! `understudy-backup`'s `postcopy` module for the exchange).
//!
//! Postcopy pauses the guest at once, sends only its state, and the destination runs it; then
//! this end serves the pages the destination's guest faults on (`Demand`) before anything else
//! and pushes every other page in the background. Hybrid first sends every page while the
//! guest runs here (one precopy pass) and then does the same for the pages dirtied since.
//! Page records are `Zero` or `Full` only (no `Ref`: a referenced page might not have arrived).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{info, warn};
use understudy_protocol::{
    Commit, Demand, Digest, DirtyPage, EncoderConfig, EncoderState, Limits, Message, Page,
    PageTree, PAGE_SIZE,
};
use understudy_transport::messages;
use understudy_vmm::guests::layout::PROGRESS_GPA;
use understudy_vmm::{OutputGate, Vm};

use crate::capture::PageMap;
use crate::migrate::{Algorithm, Plan};
use crate::session::{send_chunks, Link, PrimaryError, SessionEnd, SessionStats};
use crate::status::SwitchoverReport;
use crate::PrimaryConfig;

/// Pages per background chunk batch.
const PUSH_BATCH: usize = 256;

/// A hash no page has: the encoder then sends every page (a fresh destination holds nothing
/// we may skip, not even zero pages, which must still be mapped there).
const UNKNOWN: [u8; 32] = [0xA5; 32];

/// Moves the VM by postcopy (or hybrid); gives the VM back (paused for good once switched).
pub(crate) async fn move_vm(
    mut vm: Vm,
    link: Link,
    cfg: &PrimaryConfig,
    map: &PageMap,
    gate: &Arc<OutputGate>,
    plan: Plan,
) -> (Vm, Result<SessionEnd, PrimaryError>, SessionStats) {
    let mut stats = SessionStats::default();
    let _ = cfg;
    let r = run(&mut vm, link, map, gate, &plan, &mut stats).await;
    (vm, r, stats)
}

/// The newest protocol version postcopy chunks travel in. A postcopy destination fills each
/// page as it arrives, with no image digest to check (its `Commit`s carry none), so the pages
/// must keep the per-record blake3 hashes of chunk format 2, which the destination's decoder
/// checks per `Full` page: format 3 (protocol 3) drops them and rests on the digest instead.
const POSTCOPY_MAX_VERSION: u16 = 2;

/// An encoder that assumes the destination holds nothing, at `epoch`.
fn fresh_encoder(pages: u32, epoch: u64, version: u16) -> EncoderState {
    EncoderState::from_tree(
        PageTree::from_hashes(vec![UNKNOWN; pages as usize]),
        epoch,
        EncoderConfig {
            version: version.min(POSTCOPY_MAX_VERSION),
            dedup: false,
            ..EncoderConfig::default()
        },
    )
}

/// Reads `indices` out of guest memory and encodes them as the next epoch's chunks.
fn encode(
    vm: &Vm,
    map: &PageMap,
    enc: &mut EncoderState,
    indices: &[u32],
) -> Result<Vec<Vec<u8>>, PrimaryError> {
    let mut buf = vec![0u8; indices.len() * PAGE_SIZE];
    for (i, b) in indices.iter().zip(buf.chunks_exact_mut(PAGE_SIZE)) {
        let gpa = map.gpa_of(*i).expect("index inside the layout");
        vm.memory().read(gpa, b)?;
    }
    let pages: Vec<DirtyPage<'_>> = indices
        .iter()
        .zip(buf.chunks_exact(PAGE_SIZE))
        .map(|(&index, data)| DirtyPage {
            index,
            data: <&Page>::try_from(data).expect("PAGE_SIZE chunks"),
            base: None,
        })
        .collect();
    let epoch = enc.epoch() + 1;
    Ok(enc.encode_epoch(epoch, &pages, 2)?.chunks)
}

async fn run(
    vm: &mut Vm,
    link: Link,
    map: &PageMap,
    gate: &Arc<OutputGate>,
    plan: &Plan,
    stats: &mut SessionStats,
) -> Result<SessionEnd, PrimaryError> {
    let Link {
        conn,
        tx,
        mut rx,
        version,
        ..
    } = link;
    // Heartbeats for the whole move, so that the destination tells a slow transfer from a
    // dead source.
    let tx = Arc::new(tokio::sync::Mutex::new(tx));
    let heartbeats = {
        let tx = Arc::clone(&tx);
        tokio::spawn(async move {
            let clock = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let hb = understudy_protocol::Heartbeat {
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
    };
    let total = map.total();
    let mut enc = fresh_encoder(total, 0, version);
    // Acks and demands from the destination.
    let acked = Arc::new(AtomicU64::new(0));
    let (demand_tx, mut demand_rx) = mpsc::unbounded_channel::<Vec<u32>>();
    let reader = {
        let acked = Arc::clone(&acked);
        tokio::spawn(async move {
            let limits = Limits::default();
            loop {
                let frame = match rx.read_frame().await {
                    Ok(Some(f)) => f,
                    Ok(None) => return "the destination closed the control stream".to_string(),
                    Err(e) => return e.to_string(),
                };
                match messages::decode(&frame, &limits) {
                    Ok(Message::Ack(a)) => {
                        acked.fetch_max(a.epoch, Ordering::SeqCst);
                    }
                    Ok(Message::Demand(d)) => {
                        if demand_tx.send(d.pages).is_err() {
                            return "stopped".into();
                        }
                    }
                    Ok(Message::Heartbeat(_)) => {}
                    Ok(other) => return format!("unexpected {:?}", other.kind()),
                    Err(e) => return e.to_string(),
                }
            }
        })
    };
    let result = async {
        let wait_ack = |epoch: u64, what: &'static str| {
            let acked = Arc::clone(&acked);
            let conn = conn.clone();
            async move {
                let t = Instant::now();
                while acked.load(Ordering::SeqCst) < epoch {
                    if let Some(reason) = conn.close_reason() {
                        return Err(PrimaryError::Link(format!("{what}: {reason}")));
                    }
                    if t.elapsed() > Duration::from_secs(60) {
                        return Err(PrimaryError::Link(format!("{what}: no answer in 60 s")));
                    }
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                Ok(())
            }
        };
        // Dirty logging has been on since boot: from here on it collects what a hybrid's
        // live pass misses.
        vm.take_dirty()?;
        if plan.algorithm == Algorithm::Hybrid {
            let started = Instant::now();
            let mut chunks = 0u32;
            let all: Vec<u32> = (0..total).collect();
            for batch in all.chunks(16384) {
                let c = encode(vm, map, &mut enc, batch)?;
                chunks += c.len() as u32;
                stats.wire_bytes += send_chunks(&conn, c).await?;
            }
            let commit = Message::Commit(Commit {
                epoch: enc.epoch(),
                chunk_count: chunks,
                page_count: total,
                digest: Digest::default(),
                state: Vec::new(),
            });
            messages::send(&mut *tx.lock().await, &commit)
                .await
                .map_err(|e| PrimaryError::Link(e.to_string()))?;
            wait_ack(enc.epoch(), "the pre-pass").await?;
            plan.record.lock().unwrap_or_else(|e| e.into_inner()).rounds = 1;
            info!(
                pages = total,
                seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
                "hybrid: the live pass is in; switching"
            );
        }
        // The switch.
        let t0 = Instant::now();
        vm.pause()?;
        let mut state = vm.state()?;
        let (_, console_offset, console) = gate.seal_copy();
        state.console = console;
        state.console_offset = Some(console_offset);
        let stale: Vec<u32> = if plan.algorithm == Algorithm::Hybrid {
            vm.take_dirty()?
                .pages()
                .map(|gpa| map.index_of(gpa).expect("dirty page inside the layout"))
                .collect()
        } else {
            (0..total).collect()
        };
        {
            let mut r = plan.record.lock().unwrap_or_else(|e| e.into_inner());
            r.paused_at = Some(t0);
            r.final_pages = stale.len() as u64;
            r.progress_end = vm.memory().read_u64(PROGRESS_GPA).ok().map(|p| (t0, p));
        }
        if plan.algorithm == Algorithm::Hybrid {
            for part in stale.chunks(4096) {
                let d = Message::Demand(Demand {
                    pages: part.to_vec(),
                });
                messages::send(&mut *tx.lock().await, &d)
                    .await
                    .map_err(|e| PrimaryError::Link(e.to_string()))?;
            }
        }
        let switch = enc.epoch() + 1;
        let commit = Message::Commit(Commit {
            epoch: switch,
            chunk_count: 0,
            page_count: 0,
            digest: Digest::default(),
            state: state.encode(),
        });
        messages::send(&mut *tx.lock().await, &commit)
            .await
            .map_err(|e| PrimaryError::Link(e.to_string()))?;
        wait_ack(switch, "the switch").await?;
        let downtime = t0.elapsed();
        info!(
            downtime_ms = format!("{:.1}", downtime.as_secs_f64() * 1e3),
            pages = stale.len(),
            "postcopy: the VM runs on the destination; serving its pages"
        );
        // The destination unmapped every stale page and needs each one again, even one whose
        // content happens to equal what the pre-pass sent ("unchanged" would send nothing).
        enc = fresh_encoder(total, switch, version);
        Ok::<_, PrimaryError>((stale, downtime, switch))
    }
    .await;
    let (stale, downtime, switch) = match result {
        Ok(v) => v,
        Err(e) => {
            reader.abort();
            heartbeats.abort();
            conn.close(1, "move failed");
            // Before the switch the guest runs here still (or is paused by a failed switch).
            if vm.is_paused() {
                return Ok(SessionEnd::HandedOver(SwitchoverReport {
                    ok: false,
                    epoch: 0,
                    downtime_ms: None,
                    message: format!("the switch failed ({e}); the guest stays paused here: check the destination's log before resuming anything"),
                }));
            }
            return Ok(SessionEnd::Lost(e));
        }
    };
    // Serve: demanded pages first, then the background push in order.
    let served = async {
        let mut sent = vec![false; total as usize];
        let mut next = 0usize;
        loop {
            let mut wanted = Vec::new();
            while let Ok(d) = demand_rx.try_recv() {
                wanted.extend(d);
            }
            wanted.retain(|p| {
                (*p as usize) < sent.len() && !std::mem::replace(&mut sent[*p as usize], true)
            });
            if !wanted.is_empty() {
                let c = encode(vm, map, &mut enc, &wanted)?;
                stats.wire_bytes += send_chunks(&conn, c).await?;
                continue;
            }
            let mut batch = Vec::with_capacity(PUSH_BATCH);
            while next < stale.len() && batch.len() < PUSH_BATCH {
                let p = stale[next];
                next += 1;
                if !std::mem::replace(&mut sent[p as usize], true) {
                    batch.push(p);
                }
            }
            if batch.is_empty() {
                break;
            }
            let c = encode(vm, map, &mut enc, &batch)?;
            stats.wire_bytes += send_chunks(&conn, c).await?;
        }
        // Every page is on its way: wait until the destination has them all.
        let t = Instant::now();
        while acked.load(Ordering::SeqCst) <= switch {
            if let Some(reason) = conn.close_reason() {
                return Err(PrimaryError::Link(format!(
                    "waiting for the last pages: {reason}"
                )));
            }
            if t.elapsed() > Duration::from_secs(120) {
                return Err(PrimaryError::Link(
                    "the destination did not confirm every page in 120 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok::<_, PrimaryError>(())
    }
    .await;
    reader.abort();
    heartbeats.abort();
    stats.last_epoch = enc.epoch();
    let ms = downtime.as_secs_f64() * 1e3;
    Ok(SessionEnd::HandedOver(match served {
        Ok(()) => {
            tokio::time::sleep(Duration::from_millis(20)).await;
            conn.close(0, "moved");
            SwitchoverReport {
                ok: true,
                epoch: switch,
                downtime_ms: Some(ms),
                message: format!(
                    "the destination runs the VM; {} pages pulled after the switch; downtime {ms:.1} ms",
                    stale.len()
                ),
            }
        }
        Err(e) => {
            warn!(error = %e, "postcopy failed after the switch: the VM is lost");
            SwitchoverReport {
                ok: false,
                epoch: switch,
                downtime_ms: Some(ms),
                message: format!(
                    "postcopy failed after the switch ({e}): the VM is lost (the destination ran it without all its memory; this copy is stale and stays paused)"
                ),
            }
        }
    }))
}
