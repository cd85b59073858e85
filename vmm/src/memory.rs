//! Guest memory: one or more regions, each backed by its own memfd and mapped shared into this
//! process, or (see [`Backing`]) by private anonymous memory.
//!
//! A region's memfd can be handed to another VM (in this process, or another one through fd
//! passing or `/proc/PID/fd`) without copying a byte: that is how a backup promotes its hot image
//! to a running VM. New regions are pre-populated (`fallocate` + `MAP_POPULATE`), because on our
//! PVM hosts a guest touching fresh host memory stalls for seconds (MACHINE.md).
//!
//! Memory that never leaves the process (a primary's guest) can be [`Backing::Anonymous`]
//! instead: private anonymous memory advised for transparent huge pages. The host frees it in
//! 2 MiB units, which is what ends an eviction: 1 GiB goes in about 3 ms, against about 215 ms
//! for a 1 GiB memfd on hosts where shmem huge pages are off (as on ours: `shmem_enabled` is
//! `never`), where every 4 KiB page is freed on its own.
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

/// What backs guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backing {
    /// One memfd per region, mapped shared: another VM or process can map it without a copy.
    #[default]
    Memfd,
    /// Private anonymous memory with transparent huge pages (where the host allows them): no fd
    /// to hand over, but fast to free (see the module docs).
    Anonymous,
}

/// Size of a transparent huge page on x86-64.
const HUGE_PAGE: usize = 2 << 20;

/// Maps `len` bytes of private anonymous memory, zeroed, at a 2 MiB-aligned address, advised for
/// transparent huge pages; with `populate`, every page is faulted in before it returns.
fn map_anonymous(len: usize, populate: bool) -> std::io::Result<*mut u8> {
    let span = len + HUGE_PAGE;
    // SAFETY: a fresh private anonymous mapping (addr NULL): the kernel picks the address, so no
    // existing mapping is replaced.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = span - head - len;
    // SAFETY: [start, aligned) and [aligned + len, start + span) are the unaligned ends of the
    // mapping made above, which nothing else refers to; the middle `len` bytes stay mapped.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    let host = aligned as *mut libc::c_void;
    // SAFETY: madvise on the range mapped above. MADV_HUGEPAGE only changes how the kernel
    // backs it; it fails with EINVAL on kernels without THP, which leaves 4 KiB pages (slower to
    // free, otherwise the same), so its result is ignored.
    unsafe {
        libc::madvise(host, len, libc::MADV_HUGEPAGE);
    }
    if populate {
        // SAFETY: MADV_POPULATE_WRITE faults in the range mapped above, writable; it does not
        // change its contents (fresh anonymous memory stays zero).
        let rc = unsafe { libc::madvise(host, len, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: the mapping made above, not yet shared with anything.
            unsafe {
                libc::munmap(host, len);
            }
            return Err(e);
        }
    }
    Ok(host.cast())
}

/// A zeroed, private, heap-like buffer in anonymous memory advised for transparent huge pages:
/// for large buffers that must be freed fast (a move's delta base cache is dropped inside the
/// eviction time). Faulted in on first touch.
pub struct HugeBuffer {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer owns its private mapping exclusively; access goes through `&self`/`&mut
// self` slices, so Rust's aliasing rules hold as for a `Box<[u8]>`.
unsafe impl Send for HugeBuffer {}
// SAFETY: as for `Send`; shared access only hands out `&[u8]`.
unsafe impl Sync for HugeBuffer {}

impl HugeBuffer {
    /// A zeroed buffer of `len` bytes (`len` > 0).
    pub fn new(len: usize) -> std::io::Result<Self> {
        if len == 0 {
            return Err(std::io::Error::other("a HugeBuffer cannot be empty"));
        }
        let ptr = map_anonymous(len, false)?;
        Ok(HugeBuffer { ptr, len })
    }
}

impl std::ops::Deref for HugeBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes owned by `self`, zero-filled
        // by the kernel, so every byte is initialized; the borrow of `self` bounds the slice.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for HugeBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference into the mapping.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for HugeBuffer {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`; no slice into it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
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

/// One region of guest memory mapped into this process.
pub struct Region {
    spec: RegionSpec,
    /// The memfd, for [`Backing::Memfd`].
    fd: Option<OwnedFd>,
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

    fn create_anonymous(spec: RegionSpec) -> Result<Self, MemoryError> {
        Self::validate(&spec)?;
        let host =
            map_anonymous(spec.size as usize, true).map_err(|source| MemoryError::Populate {
                size: spec.size,
                source,
            })?;
        Ok(Region::with_host(spec, None, host))
    }

    fn with_host(spec: RegionSpec, fd: Option<OwnedFd>, host: *mut u8) -> Self {
        let words = spec.pages().div_ceil(64) as usize;
        Region {
            spec,
            fd,
            host,
            vmm_dirty: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
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
        Ok(Region::with_host(spec, Some(fd), host.cast()))
    }

    /// Where the region sits in guest memory.
    pub fn spec(&self) -> RegionSpec {
        self.spec
    }

    /// The memfd backing the region (`None` for [`Backing::Anonymous`]).
    pub fn fd(&self) -> Option<&OwnedFd> {
        self.fd.as_ref()
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
        // SAFETY: `host` and `size` are exactly the mapping created in `map` or
        // `create_anonymous`; no references into it outlive the region (accessors copy).
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

    /// Creates fresh, zeroed, pre-populated memfd-backed memory with the given regions.
    pub fn new(specs: &[RegionSpec]) -> Result<Self, MemoryError> {
        Self::with_backing(specs, Backing::Memfd)
    }

    /// Creates fresh, zeroed, pre-populated memory with the given regions and backing.
    pub fn with_backing(specs: &[RegionSpec], backing: Backing) -> Result<Self, MemoryError> {
        Self::check_layout(specs)?;
        let regions = specs
            .iter()
            .enumerate()
            .map(|(i, s)| match backing {
                Backing::Memfd => Region::create(*s, i),
                Backing::Anonymous => Region::create_anonymous(*s),
            })
            .collect::<Result<_, _>>()?;
        Ok(GuestMemory { regions })
    }

    /// What backs this memory.
    pub fn backing(&self) -> Backing {
        match self.regions.first().and_then(|r| r.fd.as_ref()) {
            Some(_) => Backing::Memfd,
            None => Backing::Anonymous,
        }
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

    /// Duplicates the region memfds (for handing to another VM or process). Anonymous memory
    /// has none: that is an error.
    pub fn clone_fds(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.regions
            .iter()
            .map(|r| match &r.fd {
                Some(fd) => fd.try_clone(),
                None => Err(std::io::Error::other(
                    "anonymous guest memory has no memfd to hand over",
                )),
            })
            .collect()
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
    fn anonymous_memory_reads_back_and_has_no_fds() {
        let specs = split_regions(16 << 20, 2);
        let m = GuestMemory::with_backing(&specs, Backing::Anonymous).unwrap();
        assert_eq!(m.backing(), Backing::Anonymous);
        let mut buf = [1u8; 8];
        m.read(specs[1].gpa + 8192, &mut buf).unwrap();
        assert_eq!(buf, [0; 8], "fresh anonymous memory is zero");
        m.write(specs[1].gpa + 8192, b"understu").unwrap();
        m.read(specs[1].gpa + 8192, &mut buf).unwrap();
        assert_eq!(&buf, b"understu");
        assert!(m.regions().iter().all(|r| r.fd().is_none()));
        assert!(m.clone_fds().is_err());
        assert!(m
            .regions()
            .iter()
            .all(|r| (r.host_addr() as usize).is_multiple_of(HUGE_PAGE)));
    }

    #[test]
    fn huge_buffer_is_zeroed_and_writable() {
        let mut b = HugeBuffer::new(3 << 20).unwrap();
        assert_eq!(b.len(), 3 << 20);
        assert!(b.iter().all(|&x| x == 0));
        b[(3 << 20) - 1] = 7;
        assert_eq!(b[(3 << 20) - 1], 7);
        assert!(HugeBuffer::new(0).is_err());
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
