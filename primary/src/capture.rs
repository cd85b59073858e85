//! The capture thread: full-sync reads while the guest runs, then one paused capture per epoch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use understudy_protocol::{MemoryLayout, Region, PAGE_SIZE};
use understudy_vmm::guests::layout::PROGRESS_GPA;
use understudy_vmm::{RegionSpec, Vm};

use crate::resync::ResyncBook;
use crate::session::PrimaryError;

/// Maps guest-physical addresses to the protocol's page index space (the regions' pages
/// concatenated in order) and back.
#[derive(Clone, Debug)]
pub struct PageMap {
    regions: Vec<RegionSpec>,
    starts: Vec<u32>,
    total: u32,
}

impl PageMap {
    /// The index space of `regions`, in order.
    pub fn new(regions: &[RegionSpec]) -> Self {
        let mut starts = Vec::with_capacity(regions.len());
        let mut total = 0u32;
        for r in regions {
            starts.push(total);
            total += r.pages() as u32;
        }
        PageMap {
            regions: regions.to_vec(),
            starts,
            total,
        }
    }

    /// Pages in all regions.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// The protocol page index of a guest-physical page address.
    pub fn index_of(&self, gpa: u64) -> Option<u32> {
        self.regions
            .iter()
            .zip(&self.starts)
            .find(|(r, _)| gpa >= r.gpa && gpa < r.gpa + r.size)
            .map(|(r, s)| s + ((gpa - r.gpa) / PAGE_SIZE as u64) as u32)
    }

    /// The guest-physical address of page `index`.
    pub fn gpa_of(&self, index: u32) -> Option<u64> {
        let k = self
            .starts
            .partition_point(|&s| s <= index)
            .checked_sub(1)?;
        let r = self.regions.get(k)?;
        let off = u64::from(index - self.starts[k]);
        (off < r.pages()).then(|| r.gpa + off * PAGE_SIZE as u64)
    }

    /// The layout announced in `Hello`.
    pub fn layout(&self) -> MemoryLayout {
        MemoryLayout {
            regions: self
                .regions
                .iter()
                .map(|r| Region {
                    gpa: r.gpa,
                    pages: r.pages(),
                })
                .collect(),
        }
    }

    /// The regions.
    pub fn regions(&self) -> &[RegionSpec] {
        &self.regions
    }
}

/// Staging buffers up to this size are kept for epochs of ordinary size.
const MAX_KEPT_STAGING: usize = 8192 * PAGE_SIZE;
/// Larger buffers (sync batches, the batches of a move's live rounds) are kept only while the
/// pool is in large mode, i.e. during a sync or a move's live rounds; leaving it frees them
/// (outside any pause), so the steady state does not hold a sync's memory.
const MAX_POOLED_STAGING: usize = 16384 * PAGE_SIZE;

/// Reusable staging buffers for captured pages.
///
/// Copying dirty pages into a fresh allocation page-faults on every page of it, inside the
/// pause (it was three quarters of the capture time at ~2k pages per epoch). Buffers come back
/// here when their epoch has been encoded and keep their pages mapped, so a capture copies into
/// memory that is already faulted in.
#[derive(Clone, Default)]
pub(crate) struct StagingPool(Arc<Mutex<PoolInner>>);

#[derive(Default)]
struct PoolInner {
    bufs: Vec<Vec<u8>>,
    large: bool,
}

impl StagingPool {
    /// A buffer of at least `len` bytes; only growth beyond earlier epochs faults new pages.
    fn take(&self, len: usize) -> Staging {
        let mut buf = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bufs
            .pop()
            .unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        Staging {
            buf,
            len,
            pool: self.clone(),
        }
    }

    /// Frees every pooled buffer (they hold copies of guest pages): a move calls it as its
    /// VM leaves this host, inside the eviction time.
    pub(crate) fn clear(&self) {
        let freed = {
            let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
            p.large = false;
            std::mem::take(&mut p.bufs)
        };
        drop(freed);
    }

    /// Large mode keeps sync-sized buffers between takes; leaving it frees them here.
    fn set_large(&self, large: bool) {
        let freed: Vec<Vec<u8>> = {
            let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
            p.large = large;
            if large {
                Vec::new()
            } else {
                let (keep, big) = std::mem::take(&mut p.bufs)
                    .into_iter()
                    .partition(|b| b.len() <= MAX_KEPT_STAGING);
                p.bufs = keep;
                big
            }
        };
        drop(freed);
    }
}

/// A staging buffer; the first `len` bytes are the epoch's pages. Returns to its pool on drop.
pub(crate) struct Staging {
    buf: Vec<u8>,
    len: usize,
    pool: StagingPool,
}

impl Staging {
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut pool = self.pool.0.lock().unwrap_or_else(|e| e.into_inner());
        // In-flight epochs bound how many buffers exist; keep a few spare, free the rest (the
        // buffer drops after the lock guard).
        let limit = if pool.large {
            MAX_POOLED_STAGING
        } else {
            MAX_KEPT_STAGING
        };
        if pool.bufs.len() < 4 && buf.len() <= limit {
            pool.bufs.push(buf);
        }
    }
}

/// One epoch's pages, copied out of the guest, waiting to be encoded.
pub(crate) struct Captured {
    pub epoch: u64,
    pub indices: Vec<u32>,
    pub pages: Staging,
    /// The VM state blob; empty for full-sync epochs (not a consistent checkpoint).
    pub state: Vec<u8>,
    /// The delta resync's first epoch: `indices` become zero pages on the backup (`pages` is
    /// empty), so that both sides know those pages again (see `resync`).
    pub zeroes: bool,
    /// The resync book's clock of the dirty-log read this epoch's pages come from.
    pub clock: u64,
    pub captured_at: Instant,
    /// Holds one of the `max_in_flight` slots until the backup acknowledges the epoch.
    pub slot: OwnedSemaphorePermit,
    /// The session's last epoch (the guest stays paused): the encoder sends it and ends at
    /// once, leaving its wrap-up until after the hand-over.
    pub last: bool,
}

/// What the capture thread needs.
pub(crate) struct CaptureCtl {
    pub map: PageMap,
    pub epoch_len: Duration,
    pub sync_batch: u32,
    pub slots: Arc<Semaphore>,
    pub out: mpsc::Sender<Captured>,
    /// Stop gracefully: the next epoch is the last and leaves the guest paused.
    pub stop: Arc<AtomicBool>,
    /// The session is over (the backup or the link failed): return at once.
    pub abort: Arc<AtomicBool>,
    /// Fenced: return at once; the caller stops the guest.
    pub fenced: Arc<AtomicBool>,
    /// Output gate epoch = `gate_base` + protocol epoch.
    pub gate_base: u64,
    pub stop_after: u64,
    pub runtime: tokio::runtime::Handle,
    pub progress_bar: bool,
    pub kill_at: Option<crate::KillAt>,
    pub staging: StagingPool,
    /// A planned switchover ends the loop like a stop.
    pub switchover: Arc<crate::status::Switchover>,
    /// A move to another host: live rounds after the full sync, then one final paused epoch.
    pub plan: Option<crate::migrate::Plan>,
    /// Epochs in flight, and the rate at which the backup absorbs pages.
    pub in_flight: Arc<Mutex<crate::session::InFlight>>,
    /// The last epoch the backup acknowledged.
    pub last_acked: Arc<std::sync::atomic::AtomicU64>,
    /// What the sync before the consistent epochs sends.
    pub sync: SyncPlan,
    /// Every read of the dirty log is noted here (delta resync).
    pub book: Arc<Mutex<ResyncBook>>,
}

/// The sync a session starts with.
#[derive(Debug)]
pub(crate) enum SyncPlan {
    /// Every page (the backup starts from zeros).
    Full,
    /// The backup kept an earlier image: zero these pages there, then send them.
    Delta(Vec<u32>),
}

impl SyncPlan {
    /// Sync epochs for a memory of `total` pages in batches of `batch`.
    pub fn epochs(&self, total: u32, batch: u32) -> u64 {
        match self {
            SyncPlan::Full => sync_epochs(total, batch),
            SyncPlan::Delta(pages) => 1 + sync_epochs(pages.len() as u32, batch),
        }
    }
}

/// How the capture thread ended.
pub(crate) struct CaptureEnd {
    /// The last epoch captured; with `paused`, the guest has not run since.
    pub last_epoch: u64,
    pub paused: bool,
    /// When the guest was paused for the last time.
    pub paused_at: Instant,
    pub last_state: Vec<u8>,
}

/// Waits for a free in-flight slot; gives up when the session is aborted, the slots are closed
/// (the link to the backup is gone) or this primary is fenced.
fn take_slot(ctl: &CaptureCtl) -> Result<OwnedSemaphorePermit, PrimaryError> {
    loop {
        if ctl.fenced.load(Ordering::SeqCst) {
            return Err(PrimaryError::Fenced);
        }
        if ctl.abort.load(Ordering::SeqCst) {
            return Err(PrimaryError::Stopped);
        }
        let wait = tokio::time::timeout(
            Duration::from_millis(10),
            Arc::clone(&ctl.slots).acquire_owned(),
        );
        match ctl.runtime.block_on(wait) {
            Ok(Ok(slot)) => return Ok(slot),
            Ok(Err(_closed)) => return Err(PrimaryError::Stopped),
            Err(_timeout) => continue,
        }
    }
}

/// [`take_slot`]; when fenced, stops the guest here and now, before returning.
fn take_slot_or_fence(vm: &mut Vm, ctl: &CaptureCtl) -> Result<OwnedSemaphorePermit, PrimaryError> {
    match take_slot(ctl) {
        Err(PrimaryError::Fenced) => {
            vm.pause()?;
            Err(PrimaryError::Fenced)
        }
        r => r,
    }
}

fn send(ctl: &CaptureCtl, c: Captured) -> Result<(), PrimaryError> {
    ctl.out.blocking_send(c).map_err(|_| PrimaryError::Stopped)
}

/// Number of full-sync epochs for a memory of `pages` pages.
pub(crate) fn sync_epochs(pages: u32, batch: u32) -> u64 {
    u64::from(pages.div_ceil(batch.max(1)))
}

/// Notes a read of the dirty log in the resync book; returns its clock.
fn note_changed(ctl: &CaptureCtl, indices: &[u32]) -> u64 {
    ctl.book
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .changed(indices)
}

/// Runs the sync (full or delta) and then the epoch loop until stopped. The caller has reset
/// the dirty log just before, so that everything changed from then on is in the first
/// consistent epoch.
pub(crate) fn capture_loop(vm: &mut Vm, ctl: &CaptureCtl) -> Result<CaptureEnd, PrimaryError> {
    let batch = ctl.sync_batch.max(1);
    let started = Instant::now();
    let mut epoch = 0u64;
    ctl.staging.set_large(true);
    let order: Vec<u32> = match &ctl.sync {
        SyncPlan::Full => (0..ctl.map.total()).collect(),
        SyncPlan::Delta(pages) => {
            // First the pages the backup holds stale content for become zero pages there
            // (records of a few bytes each): after that the primary knows its whole image.
            let slot = take_slot_or_fence(vm, ctl)?;
            epoch += 1;
            send(
                ctl,
                Captured {
                    epoch,
                    indices: pages.clone(),
                    pages: ctl.staging.take(0),
                    state: Vec::new(),
                    zeroes: true,
                    clock: 0,
                    captured_at: Instant::now(),
                    slot,
                    last: false,
                },
            )?;
            pages.clone()
        }
    };
    let total = order.len() as u32;
    let what = match ctl.sync {
        SyncPlan::Full => "full sync",
        SyncPlan::Delta(_) => "delta resync",
    };
    let mut last_report = Instant::now();
    let mut done = 0u32;
    for batch_pages in order.chunks(batch as usize) {
        let slot = take_slot_or_fence(vm, ctl)?;
        let n = batch_pages.len();
        let mut pages = ctl.staging.take(n * PAGE_SIZE);
        let indices: Vec<u32> = batch_pages.to_vec();
        for (i, buf) in indices
            .iter()
            .zip(pages.bytes_mut().chunks_exact_mut(PAGE_SIZE))
        {
            let gpa = ctl.map.gpa_of(*i).expect("index below total");
            vm.memory().read(gpa, buf)?;
        }
        epoch += 1;
        send(
            ctl,
            Captured {
                epoch,
                indices,
                pages,
                state: Vec::new(),
                zeroes: false,
                clock: 0,
                captured_at: Instant::now(),
                slot,
                last: false,
            },
        )?;
        done += n as u32;
        if ctl.progress_bar {
            eprint!(
                "\r{what} [{:<40}] {:>3}% {done}/{total} pages",
                "#".repeat((done as usize * 40) / total.max(1) as usize),
                u64::from(done) * 100 / u64::from(total.max(1))
            );
            if done == total {
                eprintln!();
            }
        } else if last_report.elapsed() >= Duration::from_secs(1) || done == total {
            tracing::info!(
                pages = done,
                of = total,
                percent = u64::from(done) * 100 / u64::from(total.max(1)),
                "{what} progress"
            );
            last_report = Instant::now();
        }
        if ctl.stop.load(Ordering::SeqCst) {
            return Err(PrimaryError::Stopped);
        }
    }
    tracing::info!(
        pages = total,
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
        "{what} read; consistent epochs follow"
    );

    // A move: live rounds, then the loop below captures the final epoch at once.
    let moving = match &ctl.plan {
        None => false,
        Some(plan) => {
            live_rounds(vm, ctl, plan, &mut epoch, started)?;
            true
        }
    };
    // Sync-sized buffers go now, not inside a pause. A move keeps them: its final epoch is the
    // next capture, which copies into one of them instead of faulting in fresh memory inside
    // the pause; they go when the VM does (`StagingPool::clear`).
    if !moving {
        ctl.staging.set_large(false);
    }
    let mut consistent = 0u64;
    let mut deadline = if moving {
        Instant::now()
    } else {
        Instant::now() + ctl.epoch_len
    };
    let mut previous = Instant::now();
    loop {
        let slot = take_slot_or_fence(vm, ctl)?;
        let now = Instant::now();
        if deadline > now {
            std::thread::sleep(deadline - now);
        }
        let last = moving
            || ctl.stop.load(Ordering::SeqCst)
            || ctl.switchover.requested()
            || (ctl.stop_after > 0 && consistent + 1 >= ctl.stop_after);
        let t0 = Instant::now();
        vm.pause()?;
        let mut vm_state = vm.state()?;
        let dirty = vm.take_dirty()?;
        crate::KillAt::check(ctl.kill_at, crate::KillPhase::Capture, epoch + 1);
        let count = dirty.count();
        let mut indices = Vec::with_capacity(count);
        let mut pages = ctl.staging.take(count * PAGE_SIZE);
        for (gpa, buf) in dirty
            .pages()
            .zip(pages.bytes_mut().chunks_exact_mut(PAGE_SIZE))
        {
            indices.push(ctl.map.index_of(gpa).expect("dirty page inside the layout"));
            vm.memory().read(gpa, buf)?;
        }
        // The epoch's console bytes travel in its checkpoint: if this primary dies after the
        // backup committed the epoch but before releasing them, the promoted VM emits them.
        let (sealed, console_offset, console) = vm.gate().seal_copy();
        vm_state.console = console;
        vm_state.console_offset = Some(console_offset);
        let state = vm_state.encode();
        if !last {
            vm.resume();
        }
        let pause = t0.elapsed();
        // The resync book's note is off the pause: nothing reads it before this epoch is sent.
        let clock = note_changed(ctl, &indices);
        epoch += 1;
        consistent += 1;
        debug_assert!(
            moving || sealed == ctl.gate_base + epoch,
            "console epochs follow protocol epochs"
        );
        if let Some(plan) = &ctl.plan {
            let mut r = plan.record.lock().unwrap_or_else(|e| e.into_inner());
            r.final_pages = count as u64;
            r.paused_at = Some(t0);
            r.progress_end = vm.memory().read_u64(PROGRESS_GPA).ok().map(|p| (t0, p));
        }
        metrics::histogram!("understudy_pause_seconds").record(pause.as_secs_f64());
        metrics::histogram!("understudy_dirty_pages").record(count as f64);
        metrics::gauge!("understudy_epoch_interval_seconds").set((t0 - previous).as_secs_f64());
        if let Ok(progress) = vm.memory().read_u64(PROGRESS_GPA) {
            // The guest's own work counter (pages written by `dirty`, steps by `ledger`), so
            // that its throughput under protection can be compared with a run without it.
            metrics::gauge!("understudy_guest_progress").set(progress as f64);
        }
        previous = t0;
        tracing::debug!(
            epoch,
            pages = count,
            pause_us = pause.as_micros() as u64,
            "captured"
        );
        send(
            ctl,
            Captured {
                epoch,
                indices,
                pages,
                state: state.clone(),
                zeroes: false,
                clock,
                captured_at: t0,
                slot,
                last,
            },
        )?;
        if last {
            return Ok(CaptureEnd {
                last_epoch: epoch,
                paused: true,
                paused_at: t0,
                last_state: state,
            });
        }
        deadline = Instant::now() + ctl.epoch_len;
    }
}

/// Ships, while the guest runs, the pages it dirtied since the last read (epochs without VM
/// state; the guest is never paused). A large dirty set goes out in batches of the sync's size,
/// each its own epoch, so that reading, encoding, sending and applying overlap and staging
/// memory stays bounded. Returns the page count.
fn live_round(vm: &mut Vm, ctl: &CaptureCtl, epoch: &mut u64) -> Result<u64, PrimaryError> {
    let mut slot = Some(take_slot_or_fence(vm, ctl)?);
    let t0 = Instant::now();
    let dirty = vm.take_dirty()?;
    let dirty_read = t0.elapsed();
    let count = dirty.count();
    let all: Vec<(u64, u32)> = dirty
        .pages()
        .map(|gpa| {
            let i = ctl.map.index_of(gpa).expect("dirty page inside the layout");
            (gpa, i)
        })
        .collect();
    let indices: Vec<u32> = all.iter().map(|&(_, i)| i).collect();
    let clock = note_changed(ctl, &indices);
    let batch = ctl.sync_batch.max(1) as usize;
    let mut batches = all.chunks(batch).peekable();
    // An empty round is still one (empty) epoch: the caller waits for its Ack.
    let empty: &[(u64, u32)] = &[];
    let first = batches.peek().is_none().then_some(empty);
    for part in first.into_iter().chain(batches) {
        let slot = match slot.take() {
            Some(s) => s,
            None => take_slot_or_fence(vm, ctl)?,
        };
        let mut pages = ctl.staging.take(part.len() * PAGE_SIZE);
        for (&(gpa, _), buf) in part
            .iter()
            .zip(pages.bytes_mut().chunks_exact_mut(PAGE_SIZE))
        {
            vm.memory().read(gpa, buf)?;
        }
        *epoch += 1;
        send(
            ctl,
            Captured {
                epoch: *epoch,
                indices: part.iter().map(|&(_, i)| i).collect(),
                pages,
                state: Vec::new(),
                zeroes: false,
                clock,
                captured_at: t0,
                slot,
                last: false,
            },
        )?;
    }
    tracing::debug!(
        pages = count,
        dirty_read_us = dirty_read.as_micros() as u64,
        read_ms = t0.elapsed().as_secs_f64() * 1e3,
        "live round read"
    );
    Ok(count as u64)
}

/// Waits until the backup acknowledged `epoch` (the session failing ends the wait).
fn wait_acked(ctl: &CaptureCtl, epoch: u64) -> Result<(), PrimaryError> {
    loop {
        if ctl.abort.load(Ordering::SeqCst) || ctl.slots.is_closed() {
            return Err(PrimaryError::Stopped);
        }
        if ctl.fenced.load(Ordering::SeqCst) {
            return Err(PrimaryError::Fenced);
        }
        if ctl.last_acked.load(Ordering::SeqCst) >= epoch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The live part of a move, after the full sync; returns when the final epoch is due.
fn live_rounds(
    vm: &mut Vm,
    ctl: &CaptureCtl,
    plan: &crate::migrate::Plan,
    epoch: &mut u64,
    started: Instant,
) -> Result<(), PrimaryError> {
    use crate::migrate::{Algorithm, Decision, Ewma, NoConvergence, Observed};
    let link_rate = || {
        ctl.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .link_rate()
    };
    let record = |f: &dyn Fn(&mut crate::migrate::MoveRecord)| {
        f(&mut plan.record.lock().unwrap_or_else(|e| e.into_inner()))
    };
    match plan.algorithm {
        // Moved by crate::postcopy, without the capture thread.
        Algorithm::Postcopy | Algorithm::Hybrid => {}
        Algorithm::Precopy => {
            let p = plan.precopy;
            let mut rounds = 0u32;
            loop {
                wait_acked(ctl, *epoch)?;
                let dirty = live_round(vm, ctl, epoch)?;
                rounds += 1;
                record(&|r| r.rounds = u64::from(rounds));
                let rate = link_rate().unwrap_or(0.0);
                let decision = p.decide(rounds, started.elapsed(), dirty, rate);
                tracing::info!(
                    round = rounds,
                    pages = dirty,
                    link_pages_per_s = rate as u64,
                    ?decision,
                    "precopy round"
                );
                match decision {
                    Decision::Continue => {}
                    Decision::StopAndCopy => break,
                    Decision::GiveUp => match p.on_no_convergence {
                        NoConvergence::StopAndCopy => {
                            tracing::warn!(
                                rounds,
                                pages = dirty,
                                budget_ms = p.downtime_budget.as_millis() as u64,
                                "precopy did not converge: stopping the guest and copying anyway (the downtime will exceed the budget)"
                            );
                            record(&|r| r.forced = true);
                            break;
                        }
                        NoConvergence::Abort => {
                            let why = format!(
                                "precopy did not converge after {rounds} rounds in {:.1} s: {dirty} pages dirtied per round, the link ships {rate:.0} pages/s, the downtime budget is {} ms; the VM keeps running here",
                                started.elapsed().as_secs_f64(),
                                p.downtime_budget.as_millis()
                            );
                            record(&|r| r.aborted = Some(why.clone()));
                            return Err(PrimaryError::MoveAborted(why));
                        }
                    },
                }
            }
            wait_acked(ctl, *epoch)?;
        }
        Algorithm::QuickEviction => {
            let q = plan.quick;
            let mut dirty_rate = Ewma::default();
            // The first snapshot holds everything dirtied since tracking began (before the sync).
            let mut last_take = started;
            let mut interval = q.min_interval;
            let mut warned = false;
            loop {
                let until = last_take + interval;
                while Instant::now() < until && !plan.evict.load(Ordering::SeqCst) {
                    if ctl.stop.load(Ordering::SeqCst) || ctl.abort.load(Ordering::SeqCst) {
                        return Err(PrimaryError::Stopped);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                if plan.evict.load(Ordering::SeqCst) {
                    // The tail: what the guest dirtied since the last snapshot goes out live,
                    // so the pause only waits for what it dirties while the tail ships.
                    tracing::info!(
                        "eviction asked for: shipping the pages dirtied since the last snapshot live (the tail)"
                    );
                    let t0 = Instant::now();
                    let tail = live_round(vm, ctl, epoch)?;
                    wait_acked(ctl, *epoch)?;
                    record(&|r| r.tail_pages = Some(tail));
                    tracing::info!(
                        tail_pages = tail,
                        tail_ms = t0.elapsed().as_secs_f64() * 1e3,
                        "tail acknowledged: pausing the guest for the pages it dirtied meanwhile"
                    );
                    break;
                }
                let t0 = Instant::now();
                let dirty = live_round(vm, ctl, epoch)?;
                let read = t0.elapsed();
                if dirty as usize * PAGE_SIZE <= MAX_KEPT_STAGING {
                    // The snapshots have settled below the sync's size: the sync-sized staging
                    // buffers go now, in the background, rather than inside the eviction time
                    // (freeing 256 MiB of them took 20-30 ms there).
                    ctl.staging.set_large(false);
                }
                let since = t0.duration_since(last_take).as_secs_f64().max(1e-3);
                last_take = t0;
                let rate = dirty_rate.add(dirty as f64 / since, 0.3);
                record(&|r| r.rounds += 1);
                let (link, fixed) = {
                    let f = ctl.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                    (f.link_rate(), f.min_latency())
                };
                let observed = Observed {
                    dirty_rate: rate,
                    link_rate: link.unwrap_or(0.0),
                    fixed: fixed.unwrap_or(Duration::from_millis(5)) + Duration::from_millis(1),
                    read,
                };
                interval = if link.is_some() {
                    q.interval(&observed)
                } else {
                    q.unrated_interval(rate)
                };
                // Without a rated link there is nothing to judge the target by yet.
                let reachable = link.is_none() || q.reachable(&observed);
                if !reachable && !warned {
                    tracing::warn!(
                        dirty_pages_per_s = rate as u64,
                        link_pages_per_s = observed.link_rate as u64,
                        target_ms = q.target.as_millis() as u64,
                        "quick eviction: the guest dirties pages too fast for the eviction target; snapshots go out as often as allowed"
                    );
                }
                warned = !reachable;
                metrics::gauge!("understudy_snapshot_interval_seconds").set(interval.as_secs_f64());
                tracing::debug!(
                    pages = dirty,
                    dirty_pages_per_s = rate as u64,
                    link_pages_per_s = observed.link_rate as u64,
                    interval_ms = interval.as_millis() as u64,
                    expected_eviction_ms =
                        q.expected_eviction(&observed, interval).as_secs_f64() * 1e3,
                    "snapshot"
                );
            }
            wait_acked(ctl, *epoch)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_map_round_trips_across_regions() {
        let regions = understudy_vmm::memory::split_regions(48 << 20, 3);
        let m = PageMap::new(&regions);
        assert_eq!(m.total(), (48 << 20) / 4096);
        for i in [0, 1, 4095, 4096, 4097, 12287] {
            assert_eq!(m.index_of(m.gpa_of(i).unwrap()), Some(i));
        }
        assert_eq!(m.gpa_of(12288), None);
        assert_eq!(m.index_of(48 << 20), None);
        assert_eq!(m.layout().total_pages(), 12288);
    }
}
