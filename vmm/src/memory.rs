//! Guest memory: one or more regions, each backed by its own memfd and mapped shared into this
//! process.
//!
//! A region's memfd can be handed to another VM (in this process, or another one through fd
//! passing or `/proc/PID/fd`) without copying a byte: that is how a backup promotes its hot image
//! to a running VM. New regions are pre-populated (`fallocate` + `MAP_POPULATE`), because on our
//! PVM hosts a guest touching fresh host memory stalls for seconds (MACHINE.md).
//!
//! The VMM's own writes into guest memory (loading a program, device emulation) go through
//! [`GuestMemory::write`], which records them in a per-region bitmap; the dirty tracker ORs that
//! bitmap with KVM's log.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// Smallest guest memory we run (all regions together).
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest memory we run (all regions together).
pub const MAX_MEMORY: u64 = 4 << 30;

/// Errors from creating or mapping guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} bytes is outside the supported range 16 MiB..=4 GiB")]
    TotalSize(u64),
    #[error("region at {gpa:#x} of {size:#x} bytes is not page aligned or is empty")]
    Unaligned { gpa: u64, size: u64 },
    #[error("regions overlap at {0:#x}")]
    Overlap(u64),
    #[error("memfd_create failed")]
    Memfd(#[source] std::io::Error),
    #[error("sizing the memfd to {size} bytes failed")]
    Truncate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("pre-populating {size} bytes of guest memory failed (is the host out of memory?)")]
    Populate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping {size} bytes of guest memory failed")]
    Mmap {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the memfd for region {index} is {actual} bytes, expected {expected}")]
    FdSize {
        index: usize,
        actual: u64,
        expected: u64,
    },
    #[error("{count} memfds given for {regions} regions")]
    FdCount { count: usize, regions: usize },
    #[error("guest range {gpa:#x}+{len:#x} is not inside one memory region")]
    OutOfRange { gpa: u64, len: u64 },
}

/// Where a region sits in guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    /// Guest-physical start, page aligned.
    pub gpa: u64,
    /// Size in bytes, page aligned, not zero.
    pub size: u64,
}

impl RegionSpec {
    /// Number of pages in the region.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

/// Splits `total` bytes starting at guest-physical 0 into `count` contiguous regions of
/// (nearly) equal page-aligned sizes; the last takes the remainder.
pub fn split_regions(total: u64, count: usize) -> Vec<RegionSpec> {
    let count = count.max(1) as u64;
    let pages = total / PAGE_SIZE;
    let per = (pages / count).max(1);
    let mut out = Vec::new();
    let mut gpa = 0;
    for i in 0..count {
        let size = if i + 1 == count {
            total - gpa
        } else {
            per * PAGE_SIZE
        };
        if size == 0 {
            break;
        }
        out.push(RegionSpec { gpa, size });
        gpa += size;
    }
    out
}

/// One memfd-backed region mapped into this process.
pub struct Region {
    spec: RegionSpec,
    fd: OwnedFd,
    host: *mut u8,
    /// Pages written by the VMM itself since the last `take_vmm_dirty`.
    vmm_dirty: Vec<AtomicU64>,
}

// SAFETY: `host` points to a MAP_SHARED mapping owned by this `Region` for its whole life; the
// mapping is valid from any thread, and all accesses through it go through methods that copy with
// raw pointers (guest memory is shared with running vCPUs, so no `&mut` slices are handed out).
unsafe impl Send for Region {}
// SAFETY: see `Send`: the region's methods take `&self` and only copy bytes through raw pointers;
// the dirty bitmap is atomic.
unsafe impl Sync for Region {}

impl Region {
    fn validate(spec: &RegionSpec) -> Result<(), MemoryError> {
        if spec.size == 0
            || !spec.gpa.is_multiple_of(PAGE_SIZE)
            || !spec.size.is_multiple_of(PAGE_SIZE)
        {
            return Err(MemoryError::Unaligned {
                gpa: spec.gpa,
                size: spec.size,
            });
        }
        Ok(())
    }

    fn create(spec: RegionSpec, index: usize) -> Result<Self, MemoryError> {
        Self::validate(&spec)?;
        let name = format!("understudy-guest-{index}\0");
        // SAFETY: `name` is a NUL-terminated string that outlives the call; the flags are valid.
        let raw = unsafe { libc::memfd_create(name.as_ptr().cast(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh file descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = File::from(fd);
        file.set_len(spec.size)
            .map_err(|source| MemoryError::Truncate {
                size: spec.size,
                source,
            })?;
        // SAFETY: the fd is a valid memfd of at least `spec.size` bytes; fallocate with mode 0
        // only allocates backing pages.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, spec.size as libc::off_t) };
        if rc != 0 {
            return Err(MemoryError::Populate {
                size: spec.size,
                source: std::io::Error::last_os_error(),
            });
        }
        Self::map(spec, OwnedFd::from(file), true)
    }

    fn map(spec: RegionSpec, fd: OwnedFd, populate: bool) -> Result<Self, MemoryError> {
        let mut flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
        if populate {
            flags |= libc::MAP_POPULATE;
        }
        // SAFETY: a fresh mapping (addr NULL) of `spec.size` bytes of a memfd at least that long;
        // the kernel picks the address, so no existing mapping is replaced.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                spec.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd.as_raw_fd(),
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(MemoryError::Mmap {
                size: spec.size,
                source: std::io::Error::last_os_error(),
            });
        }
        let words = spec.pages().div_ceil(64) as usize;
        Ok(Region {
            spec,
            fd,
            host: host.cast(),
            vmm_dirty: (0..words).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Where the region sits in guest memory.
    pub fn spec(&self) -> RegionSpec {
        self.spec
    }

    /// The memfd backing the region.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Host address of the region's first byte.
    pub fn host_addr(&self) -> *mut u8 {
        self.host
    }

    fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.spec.gpa && len <= self.spec.size && gpa - self.spec.gpa <= self.spec.size - len
    }

    fn mark_vmm_dirty(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE;
        let last = (offset + len - 1) / PAGE_SIZE;
        for page in first..=last {
            self.vmm_dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }

    /// Returns and clears the bitmap of pages the VMM wrote (one bit per page, LSB first).
    pub fn take_vmm_dirty(&self) -> Vec<u64> {
        self.vmm_dirty
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect()
    }

    /// ORs `bits` back into the VMM-dirty bitmap (used when a dirty-set read fails half way).
    pub fn restore_vmm_dirty(&self, bits: &[u64]) {
        for (w, b) in self.vmm_dirty.iter().zip(bits) {
            w.fetch_or(*b, Ordering::Relaxed);
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `host` and `size` are exactly the mapping created in `map`; no references into
        // it outlive the region (accessors copy).
        unsafe {
            libc::munmap(self.host.cast(), self.spec.size as usize);
        }
    }
}

/// All of a guest's memory.
pub struct GuestMemory {
    regions: Vec<Region>,
}

impl GuestMemory {
    fn check_layout(specs: &[RegionSpec]) -> Result<(), MemoryError> {
        let total: u64 = specs.iter().map(|s| s.size).sum();
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&total) {
            return Err(MemoryError::TotalSize(total));
        }
        let mut sorted = specs.to_vec();
        sorted.sort_by_key(|s| s.gpa);
        for pair in sorted.windows(2) {
            if pair[0].gpa + pair[0].size > pair[1].gpa {
                return Err(MemoryError::Overlap(pair[1].gpa));
            }
        }
        for s in specs {
            Region::validate(s)?;
        }
        Ok(())
    }

    /// Creates fresh, zeroed, pre-populated memory with the given regions.
    pub fn new(specs: &[RegionSpec]) -> Result<Self, MemoryError> {
        Self::check_layout(specs)?;
        let regions = specs
            .iter()
            .enumerate()
            .map(|(i, s)| Region::create(*s, i))
            .collect::<Result<_, _>>()?;
        Ok(GuestMemory { regions })
    }

    /// Maps existing memfds (one per spec, same order) without copying their contents.
    /// `populate` pre-faults the mapping (costs time proportional to the size).
    pub fn from_fds(
        specs: &[RegionSpec],
        fds: Vec<OwnedFd>,
        populate: bool,
    ) -> Result<Self, MemoryError> {
        Self::check_layout(specs)?;
        if fds.len() != specs.len() {
            return Err(MemoryError::FdCount {
                count: fds.len(),
                regions: specs.len(),
            });
        }
        let mut regions = Vec::with_capacity(specs.len());
        for (index, (spec, fd)) in specs.iter().zip(fds).enumerate() {
            let file = File::from(fd);
            let actual = file
                .metadata()
                .map_err(|source| MemoryError::Mmap {
                    size: spec.size,
                    source,
                })?
                .len();
            if actual != spec.size {
                return Err(MemoryError::FdSize {
                    index,
                    actual,
                    expected: spec.size,
                });
            }
            regions.push(Region::map(*spec, OwnedFd::from(file), populate)?);
        }
        Ok(GuestMemory { regions })
    }

    /// Duplicates the region memfds (for handing to another VM or process).
    pub fn clone_fds(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.regions.iter().map(|r| r.fd.try_clone()).collect()
    }

    /// The regions, in creation order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The region layout.
    pub fn specs(&self) -> Vec<RegionSpec> {
        self.regions.iter().map(|r| r.spec).collect()
    }

    /// Total bytes over all regions.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.spec.size).sum()
    }

    fn find(&self, gpa: u64, len: u64) -> Result<&Region, MemoryError> {
        self.regions
            .iter()
            .find(|r| r.contains(gpa, len))
            .ok_or(MemoryError::OutOfRange { gpa, len })
    }

    /// Copies `out.len()` bytes of guest memory at `gpa` into `out`.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), MemoryError> {
        let r = self.find(gpa, out.len() as u64)?;
        // SAFETY: `contains` checked that [gpa, gpa+len) lies inside the region's mapping, and
        // `out` is a distinct host buffer, so the ranges cannot overlap. The guest may be writing
        // concurrently; the bytes are then whatever was there, which callers accept (they pause
        // the guest when they need a consistent copy).
        unsafe {
            std::ptr::copy_nonoverlapping(
                r.host.add((gpa - r.spec.gpa) as usize),
                out.as_mut_ptr(),
                out.len(),
            );
        }
        Ok(())
    }

    /// Reads a little-endian u64 at `gpa` (e.g. a guest's progress counter).
    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        let r = self.find(gpa, 8)?;
        // SAFETY: the 8 bytes lie inside the mapping (checked by `find`); a volatile unaligned
        // read because the guest writes this word concurrently.
        let v = unsafe {
            std::ptr::read_volatile(r.host.add((gpa - r.spec.gpa) as usize).cast::<[u8; 8]>())
        };
        Ok(u64::from_le_bytes(v))
    }

    /// Copies all of guest memory, region after region, to `out` (a dump for inspection).
    pub fn write_image(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        for r in &self.regions {
            let mut off = 0;
            while off < r.spec.size {
                let n = buf.len().min((r.spec.size - off) as usize);
                self.read(r.spec.gpa + off, &mut buf[..n])
                    .map_err(std::io::Error::other)?;
                out.write_all(&buf[..n])?;
                off += n as u64;
            }
        }
        out.flush()
    }

    /// Writes `data` at `gpa` and records the pages as dirtied by the VMM.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let r = self.find(gpa, data.len() as u64)?;
        let offset = gpa - r.spec.gpa;
        // SAFETY: `contains` checked the destination range lies inside the mapping; `data` is a
        // host buffer, distinct from guest memory.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), r.host.add(offset as usize), data.len());
        }
        r.mark_vmm_dirty(offset, data.len() as u64);
        Ok(())
    }

    /// Writes `data` without marking the pages dirty: for a replica that applies pages it
    /// received (the sender already knows them) or for tests that simulate a silent change.
    pub fn write_untracked(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let r = self.find(gpa, data.len() as u64)?;
        // SAFETY: as in `write`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                r.host.add((gpa - r.spec.gpa) as usize),
                data.len(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_sizes_outside_range() {
        assert!(matches!(
            GuestMemory::new(&[RegionSpec {
                gpa: 0,
                size: 1 << 20
            }]),
            Err(MemoryError::TotalSize(_))
        ));
        assert!(matches!(
            GuestMemory::new(&[RegionSpec {
                gpa: 0,
                size: (16 << 20) + 1
            }]),
            Err(MemoryError::Unaligned { .. })
        ));
    }

    #[test]
    fn split_covers_everything() {
        let r = split_regions(100 << 20, 3);
        assert_eq!(r.len(), 3);
        assert_eq!(r.iter().map(|s| s.size).sum::<u64>(), 100 << 20);
        assert_eq!(r[1].gpa, r[0].size);
    }

    #[test]
    fn fds_share_contents_without_copy() {
        let specs = split_regions(16 << 20, 2);
        let a = GuestMemory::new(&specs).unwrap();
        a.write(specs[1].gpa + 4096, b"hello").unwrap();
        let b = GuestMemory::from_fds(&specs, a.clone_fds().unwrap(), false).unwrap();
        let mut buf = [0u8; 5];
        b.read(specs[1].gpa + 4096, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        b.write(0, b"x").unwrap();
        a.read(0, &mut buf[..1]).unwrap();
        assert_eq!(buf[0], b'x');
    }

    #[test]
    fn vmm_writes_are_tracked_and_cross_region_writes_refused() {
        let specs = split_regions(16 << 20, 2);
        let m = GuestMemory::new(&specs).unwrap();
        m.write(4096 * 3 + 4090, b"0123456789").unwrap();
        let bits = m.regions()[0].take_vmm_dirty();
        assert_eq!(bits[0], 0b11000);
        assert!(m.regions()[0].take_vmm_dirty().iter().all(|w| *w == 0));
        assert!(m.write(specs[1].gpa - 2, b"abcd").is_err());
    }
}
