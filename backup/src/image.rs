//! The hot image: guest memory in memfds, addressed by the protocol's page index space.

use understudy_protocol::{MemoryLayout, Page, PageImage, Replica, PAGE_SIZE};
use understudy_vmm::memory::MemoryError;
use understudy_vmm::{GuestMemory, RegionSpec};

/// Guest memory the backup applies epochs into.
pub struct HotImage {
    memory: GuestMemory,
    /// (first page index, guest-physical start, pages) per region.
    map: Vec<(u32, u64, u64)>,
    pages: u64,
}

impl HotImage {
    /// Zeroed memory in the layout the primary announced.
    pub fn new(layout: &MemoryLayout) -> Result<Self, MemoryError> {
        let specs: Vec<RegionSpec> = layout
            .regions
            .iter()
            .map(|r| RegionSpec {
                gpa: r.gpa,
                size: r.pages.saturating_mul(PAGE_SIZE as u64),
            })
            .collect();
        let memory = GuestMemory::new(&specs)?;
        let mut map = Vec::new();
        let mut first = 0u64;
        for r in &layout.regions {
            map.push((first as u32, r.gpa, r.pages));
            first += r.pages;
        }
        Ok(HotImage {
            memory,
            map,
            pages: first,
        })
    }

    /// The memory (for dumps and promotion).
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    fn gpa(&self, index: u32) -> Option<u64> {
        self.map
            .iter()
            .rev()
            .find(|(first, _, _)| *first <= index)
            .and_then(|&(first, gpa, pages)| {
                let off = u64::from(index - first);
                (off < pages).then(|| gpa + off * PAGE_SIZE as u64)
            })
    }
}

impl PageImage for HotImage {
    fn page_count(&self) -> u64 {
        self.pages
    }
    fn read_page(&self, index: u32, out: &mut Page) {
        if let Some(gpa) = self.gpa(index) {
            // In range by construction: `gpa` only maps indices inside a region.
            let _ = self.memory.read(gpa, out);
        }
    }
    fn write_page(&mut self, index: u32, data: &Page) {
        if let Some(gpa) = self.gpa(index) {
            let _ = self.memory.write_untracked(gpa, data);
        }
    }
}

/// What the backup holds: the image, its page hashes and epoch, and the VM state of the last
/// consistent epoch. Kept behind one lock so that a promotion sees whole epochs only.
pub struct Replicated {
    pub image: HotImage,
    pub replica: Replica,
    /// (epoch, state blob) of the last committed epoch that carried a state; the image is
    /// promotable only when this epoch equals the replica's epoch.
    pub state: Option<(u64, Vec<u8>)>,
    /// A VM made ahead of time over the image's memfds (see [`Vm::prepare_restore`]), so that
    /// a promotion only loads the state and starts the vCPUs.
    ///
    /// [`Vm::prepare_restore`]: understudy_vmm::Vm::prepare_restore
    pub prepared: Option<understudy_vmm::PreparedRestore>,
}

impl Replicated {
    /// Makes the VM a promotion will use, once the layout and vCPU count are known (the first
    /// consistent state). Failing here is not fatal: a promotion then makes its VM itself.
    pub fn prepare(&mut self, state: &understudy_vmm::VmState, dirty_logging: bool) {
        if self.prepared.as_ref().is_some_and(|p| p.fits(state)) {
            return;
        }
        self.retire_prepared();
        let vcpus = u8::try_from(state.vcpus.len()).map_err(|e| e.to_string());
        let made = vcpus.and_then(|n| self.make(&state.regions, n, state.irqchip, dirty_logging));
        match made {
            Ok(p) => self.prepared = Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "could not prepare a VM for promotion; a promotion will make one")
            }
        }
    }

    /// Before any state arrives: makes a VM with an in-kernel irqchip and one vCPU over the
    /// image, the kind a multiboot guest needs. Registering guest memory with such a VM takes
    /// ~7 ms at 1 GiB on PVM (against ~0.3 ms without an irqchip), which would otherwise fall
    /// into the first consistent epoch: a move's final one, inside its downtime. A guest that
    /// turns out to need another VM gets one then (the cheap kind), and this one is dropped
    /// off the epoch path.
    pub fn prepare_ahead(&mut self, dirty_logging: bool) {
        if self.prepared.is_some() {
            return;
        }
        let specs = self.image.memory().specs();
        match self.make(&specs, 1, true, dirty_logging) {
            Ok(p) => self.prepared = Some(p),
            Err(e) => tracing::debug!(error = %e, "no VM prepared ahead"),
        }
    }

    /// A VM over the image's memfds, mapped as `specs` (the state's layout, which must be the
    /// image's: a state that says otherwise fails here, as cheaply as before).
    fn make(
        &self,
        specs: &[understudy_vmm::RegionSpec],
        vcpus: u8,
        irqchip: bool,
        dirty_logging: bool,
    ) -> Result<understudy_vmm::PreparedRestore, String> {
        let started = std::time::Instant::now();
        let fds = self.image.memory().clone_fds().map_err(|e| e.to_string())?;
        let memory =
            understudy_vmm::GuestMemory::from_fds(specs, fds, false).map_err(|e| e.to_string())?;
        let p = understudy_vmm::Vm::prepare_restore(memory, vcpus, irqchip, dirty_logging)
            .map_err(|e| e.to_string())?;
        tracing::debug!(
            vcpus,
            irqchip,
            prepare_us = started.elapsed().as_micros() as u64,
            "prepared a VM over the image for a promotion"
        );
        Ok(p)
    }

    /// Drops a prepared VM that does not fit on a thread of its own: tearing down a VM with an
    /// in-kernel irqchip takes 15-25 ms on PVM.
    fn retire_prepared(&mut self) {
        if let Some(old) = self.prepared.take() {
            let dropped = std::thread::Builder::new()
                .name("vm-retire".into())
                .spawn(move || drop(old));
            if let Err(e) = dropped {
                tracing::warn!(error = %e, "cannot start a thread to drop a prepared VM; dropped here");
            }
        }
    }
}

impl Replicated {
    /// Whether the image is a consistent checkpoint that a VM can be resumed from.
    pub fn promotable(&self) -> bool {
        self.state
            .as_ref()
            .is_some_and(|(e, _)| *e == self.replica.epoch())
    }
}
