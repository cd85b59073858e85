//! The capture thread: full-sync reads while the guest runs, then one paused capture per epoch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use understudy_protocol::{MemoryLayout, Region, PAGE_SIZE};
use understudy_vmm::guests::layout::PROGRESS_GPA;
use understudy_vmm::{RegionSpec, Vm};

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

/// Staging buffers larger than this are freed after use rather than kept.
const MAX_KEPT_STAGING: usize = 8192 * PAGE_SIZE;

/// Reusable staging buffers for captured pages.
///
/// Copying dirty pages into a fresh allocation page-faults on every page of it, inside the
/// pause (it was three quarters of the capture time at ~2k pages per epoch). Buffers come back
/// here when their epoch has been encoded and keep their pages mapped, so a capture copies into
/// memory that is already faulted in.
#[derive(Clone, Default)]
pub(crate) struct StagingPool(Arc<Mutex<Vec<Vec<u8>>>>);

impl StagingPool {
    /// A buffer of at least `len` bytes; only growth beyond earlier epochs faults new pages.
    fn take(&self, len: usize) -> Staging {
        let mut buf = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
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
        // In-flight epochs bound how many buffers exist; keep a few spare, free the rest, and
        // do not keep the full sync's big batches around.
        if pool.len() < 4 && buf.len() <= MAX_KEPT_STAGING {
            pool.push(buf);
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
    pub captured_at: Instant,
    /// Holds one of the `max_in_flight` slots until the backup acknowledges the epoch.
    pub slot: OwnedSemaphorePermit,
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

/// Runs the full sync and then the epoch loop until stopped.
pub(crate) fn capture_loop(vm: &mut Vm, ctl: &CaptureCtl) -> Result<CaptureEnd, PrimaryError> {
    let total = ctl.map.total();
    let batch = ctl.sync_batch.max(1);
    // Dirty logging is on since boot; reset it so that everything changed from here on is in
    // the first consistent epoch.
    vm.take_dirty()?;
    let started = Instant::now();
    let mut epoch = 0u64;
    let mut last_report = Instant::now();
    for first in (0..total).step_by(batch as usize) {
        let slot = take_slot_or_fence(vm, ctl)?;
        let n = batch.min(total - first);
        let mut pages = ctl.staging.take(n as usize * PAGE_SIZE);
        let indices: Vec<u32> = (first..first + n).collect();
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
                captured_at: Instant::now(),
                slot,
            },
        )?;
        let done = first + n;
        if ctl.progress_bar {
            eprint!(
                "\rfull sync [{:<40}] {:>3}% {done}/{total} pages",
                "#".repeat((done as usize * 40) / total as usize),
                done as u64 * 100 / u64::from(total)
            );
            if done == total {
                eprintln!();
            }
        } else if last_report.elapsed() >= Duration::from_secs(1) || done == total {
            tracing::info!(
                pages = done,
                of = total,
                percent = done as u64 * 100 / u64::from(total),
                "full sync progress"
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
        "full sync read; consistent epochs follow"
    );

    let mut consistent = 0u64;
    let mut deadline = Instant::now() + ctl.epoch_len;
    let mut previous = Instant::now();
    loop {
        let slot = take_slot_or_fence(vm, ctl)?;
        let now = Instant::now();
        if deadline > now {
            std::thread::sleep(deadline - now);
        }
        let last = ctl.stop.load(Ordering::SeqCst)
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
        let (sealed, console) = vm.gate().seal_copy();
        vm_state.console = console;
        let state = vm_state.encode();
        if !last {
            vm.resume();
        }
        let pause = t0.elapsed();
        epoch += 1;
        consistent += 1;
        debug_assert_eq!(
            sealed,
            ctl.gate_base + epoch,
            "console epochs follow protocol epochs"
        );
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
                captured_at: t0,
                slot,
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
