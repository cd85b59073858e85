//! Guest memory whose pages are filled on demand: the destination side of postcopy migration.
//!
//! The destination maps memfds that are already allocated (`fallocate`: page cache present, as
//! MACHINE.md requires on PVM) but whose contents are not valid yet, with
//! `GuestMemory::from_fds(specs, fds, populate = false)`, so the mapping has no page table
//! entries. [`LazyMemory::register`] registers every region's mapping with a userfaultfd in
//! **minor** mode (`UFFD_FEATURE_MINOR_SHMEM`, `UFFDIO_REGISTER_MODE_MINOR`): an access to a page
//! whose entry is still empty, by a vCPU inside `KVM_RUN` or by the VMM itself, blocks and
//! queues a minor fault. The handler writes the page's content into the memfd without touching
//! the registered mapping ([`LazyMemory::fill`], a `pwrite`; or through another mapping of the
//! same memfd, e.g. a backup's image) and then maps it with `UFFDIO_CONTINUE`
//! ([`LazyMemory::make_present`]), which wakes every thread waiting on it.
//!
//! ```text
//!   vCPU / VMM thread              handler thread                     pusher thread
//!   touches page p (no PTE)
//!   blocks, fault queued  ----->   wait_fault() -> Fault { p }
//!                                  fill(p, bytes)                     fill(q.., bytes)
//!                                    pwrite into the memfd              (pages nobody
//!                                    UFFDIO_CONTINUE p  --wakes-->      asked for yet)
//!   continues
//! ```
//!
//! Every page is written at most once: [`LazyMemory::fill`] claims a page before writing it
//! and skips pages already claimed or present, so a background push can never overwrite a page
//! the guest has written since it became present. A caller that writes pages itself (through
//! its own mapping) and only calls [`LazyMemory::make_present`] must keep that rule itself.
//!
//! Requirements: the memfds must be fully allocated (checked at registration: a hole would be
//! a *missing* fault, which minor mode does not catch, and the guest would read zeros), and the
//! registered mapping must not have been touched before registration (an existing page table
//! entry never faults). Faults raised by KVM are kernel-mode faults: the userfaultfd is made
//! through `/dev/userfaultfd` when it is accessible, else with the `userfaultfd(2)` system call,
//! which then needs `CAP_SYS_PTRACE` (or `vm.unprivileged_userfaultfd = 1`).
//!
//! **Pausing while a page is pending (PVM).** A vCPU waiting for a page does not leave
//! `KVM_RUN` when kicked: KVM's shadow page-table walker (`paging64_walk_addr_generic`) reads
//! guest memory with `__get_user`, and after the kick the thread stays in the kernel, runnable
//! and burning CPU, until the page is present (vmm/tests/postcopy.rs
//! `pause_waits_for_a_pending_fault`: ~170 ms of CPU in 250 ms). So `Vm::pause()` returns only
//! once every page a vCPU waits for has been made present; keep serving faults while pausing
//! (otherwise it fails with `PauseTimeout` and the vCPUs are resumed).
//!
//! Dropping a [`LazyMemory`] closes the userfaultfd, which unregisters the memory and wakes any
//! waiting thread; from then on pages are mapped from the memfd as they are (so only drop it, or
//! call [`LazyMemory::unregister`], once every page is present or valid).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

use crate::memory::{GuestMemory, MemoryError, RegionSpec, PAGE_SIZE};

// The userfaultfd uAPI (include/uapi/linux/userfaultfd.h); libc has only the syscall number.
const UFFD_API: u64 = 0xaa;
const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;
const _UFFDIO_CONTINUE: u64 = 0x07;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

/// `struct uffd_msg`: 8 bytes of header, then a 24-byte union; for a page fault the union is
/// `{ u64 flags; u64 address; u32 ptid; }`.
#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

ioctl_io_nr!(USERFAULTFD_IOC_NEW, 0xaa, 0x00);
ioctl_iowr_nr!(UFFDIO_API, 0xaa, 0x3f, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, 0xaa, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, 0xaa, 0x01, UffdioRange);
ioctl_iowr_nr!(UFFDIO_CONTINUE, 0xaa, 0x07, UffdioContinue);

/// Errors from lazily filled memory.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("creating a userfaultfd failed (faults raised by KVM need /dev/userfaultfd access or CAP_SYS_PTRACE)")]
    Create(#[source] io::Error),
    #[error("the UFFDIO_API handshake failed")]
    Api(#[source] io::Error),
    #[error("this kernel's userfaultfd cannot {0}")]
    Unsupported(&'static str),
    #[error("region {0} is anonymous memory; on-demand filling needs memfd-backed regions")]
    NotMemfd(usize),
    #[error(
        "the memfd of region {index} has {allocated} of {size} bytes allocated; fallocate it first"
    )]
    NotAllocated {
        index: usize,
        allocated: u64,
        size: u64,
    },
    #[error("registering region {index} with the userfaultfd failed")]
    Register {
        index: usize,
        #[source]
        source: io::Error,
    },
    #[error("unregistering region {index} failed")]
    Unregister {
        index: usize,
        #[source]
        source: io::Error,
    },
    #[error("pages {first}+{count} are outside guest memory ({pages} pages)")]
    OutOfRange { first: u64, count: u64, pages: u64 },
    #[error("{0} bytes of page data is not a whole number of pages")]
    NotPages(usize),
    #[error("writing page {page} into its memfd failed")]
    Write {
        page: u64,
        #[source]
        source: io::Error,
    },
    #[error("UFFDIO_CONTINUE of page {page} failed")]
    Continue {
        page: u64,
        #[source]
        source: io::Error,
    },
    #[error("unmapping page {page} again failed")]
    Invalidate {
        page: u64,
        #[source]
        source: io::Error,
    },
    #[error("waiting for a fault failed")]
    Read(#[source] io::Error),
    #[error("fault at host address {0:#x}, outside the registered memory")]
    Stray(u64),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// A page access that is waiting for its page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Page index over all of guest memory: regions in [`GuestMemory::regions`] order, each
    /// region's pages in address order, [`PAGE_SIZE`] bytes per page.
    pub page_index: u64,
    /// Guest-physical address of the page.
    pub gpa: u64,
    /// Whether the access was a write.
    pub write: bool,
}

/// One registered region.
struct Span {
    spec: RegionSpec,
    host: u64,
    /// Global index of the region's first page.
    first: u64,
    /// The region's memfd; valid while `LazyMemory::memory` holds the mapping.
    fd: RawFd,
}

impl Span {
    fn pages(&self) -> u64 {
        self.spec.pages()
    }
}

const ABSENT: u8 = 0;
const FILLING: u8 = 1;
const PRESENT: u8 = 2;

/// Guest memory registered with a userfaultfd in minor mode (see the module docs).
///
/// `Send + Sync`: one thread may wait for faults while others fill pages.
pub struct LazyMemory {
    uffd: OwnedFd,
    /// Keeps the registered mappings (and the memfds `spans` name) alive as long as the
    /// registration: unregistering an address range that was unmapped and reused would be wrong.
    memory: Arc<GuestMemory>,
    spans: Vec<Span>,
    /// Per page: `ABSENT`, `FILLING` (claimed by a `fill`) or `PRESENT`.
    state: Vec<AtomicU8>,
    present: AtomicU64,
    faults: AtomicU64,
}

impl std::fmt::Debug for LazyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyMemory")
            .field("regions", &self.memory.specs())
            .field("present", &self.present_count())
            .field("pages", &self.pages())
            .finish()
    }
}

fn new_uffd() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    if let Ok(dev) = File::options()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd or -1; it
        // touches no memory of ours.
        let raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW(), flags) };
        if raw >= 0 {
            // SAFETY: `raw` is a fresh fd that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(raw) });
        }
    }
    // SAFETY: userfaultfd(2) takes its flags by value and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if raw < 0 {
        return Err(UffdError::Create(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh fd (it fits an int: fds do) that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

fn allocated_bytes(fd: RawFd) -> io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is writable memory of the size fstat(2) fills; it is read only on success.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.st_blocks as u64 * 512)
}

impl LazyMemory {
    /// Registers all of `memory` for minor faults. `memory` must be mapped over fully allocated
    /// memfds and not touched since it was mapped (`GuestMemory::from_fds(.., false)`); register
    /// before the VM runs. Holds a reference to `memory` until dropped.
    pub fn register(memory: &Arc<GuestMemory>) -> Result<Self, UffdError> {
        let uffd = new_uffd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_MINOR_SHMEM,
            ioctls: 0,
        };
        // SAFETY: `api` is a live, writable `struct uffdio_api`; the kernel reads and writes
        // only it.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API(), &mut api) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EINVAL) {
                UffdError::Unsupported("report minor faults on shared memory (MINOR_SHMEM)")
            } else {
                UffdError::Api(e)
            });
        }
        if api.features & UFFD_FEATURE_MINOR_SHMEM == 0 {
            return Err(UffdError::Unsupported(
                "report minor faults on shared memory (MINOR_SHMEM)",
            ));
        }
        let mut spans = Vec::with_capacity(memory.regions().len());
        let mut first = 0;
        for (index, r) in memory.regions().iter().enumerate() {
            let spec = r.spec();
            let fd = r.fd().ok_or(UffdError::NotMemfd(index))?.as_raw_fd();
            let allocated =
                allocated_bytes(fd).map_err(|source| UffdError::Register { index, source })?;
            if allocated < spec.size {
                return Err(UffdError::NotAllocated {
                    index,
                    allocated,
                    size: spec.size,
                });
            }
            let mut reg = UffdioRegister {
                range: UffdioRange {
                    start: r.host_addr() as u64,
                    len: spec.size,
                },
                mode: UFFDIO_REGISTER_MODE_MINOR,
                ioctls: 0,
            };
            // SAFETY: `reg` is a live, writable `struct uffdio_register`; the range is the
            // region's own shared mapping, which `memory` (kept in `Self`) keeps mapped.
            if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER(), &mut reg) } != 0 {
                return Err(UffdError::Register {
                    index,
                    source: io::Error::last_os_error(),
                });
            }
            if reg.ioctls & (1 << _UFFDIO_CONTINUE) == 0 {
                return Err(UffdError::Unsupported("UFFDIO_CONTINUE on guest memory"));
            }
            spans.push(Span {
                spec,
                host: r.host_addr() as u64,
                first,
                fd,
            });
            first += spec.pages();
        }
        Ok(LazyMemory {
            uffd,
            memory: Arc::clone(memory),
            spans,
            state: (0..first).map(|_| AtomicU8::new(ABSENT)).collect(),
            present: AtomicU64::new(0),
            faults: AtomicU64::new(0),
        })
    }

    /// Maps `fds` (fully allocated memfds, one per spec) without populating the mapping and
    /// registers it: the memory a postcopy destination restores its VM on.
    pub fn map(
        specs: &[RegionSpec],
        fds: Vec<OwnedFd>,
    ) -> Result<(Arc<GuestMemory>, Self), UffdError> {
        let memory = Arc::new(GuestMemory::from_fds(specs, fds, false)?);
        let lazy = Self::register(&memory)?;
        Ok((memory, lazy))
    }

    /// The registered memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Number of pages over all regions.
    pub fn pages(&self) -> u64 {
        self.state.len() as u64
    }

    /// Number of pages made present so far.
    pub fn present_count(&self) -> u64 {
        self.present.load(Ordering::Acquire)
    }

    /// Whether every page is present.
    pub fn all_present(&self) -> bool {
        self.present_count() == self.pages()
    }

    /// Whether page `page_index` has been made present (out-of-range pages are not).
    pub fn is_present(&self, page_index: u64) -> bool {
        self.state
            .get(page_index as usize)
            .is_some_and(|s| s.load(Ordering::Acquire) == PRESENT)
    }

    /// Number of faults [`LazyMemory::wait_fault`] has returned.
    pub fn faults_seen(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// The first page index not yet present at or after `from`, if any.
    pub fn next_absent(&self, from: u64) -> Option<u64> {
        (from..self.pages()).find(|&p| !self.is_present(p))
    }

    fn span_of_page(&self, page: u64) -> Option<&Span> {
        self.spans
            .iter()
            .find(|s| page >= s.first && page < s.first + s.pages())
    }

    fn check_range(&self, first: u64, count: u64) -> Result<(), UffdError> {
        if first
            .checked_add(count)
            .is_none_or(|end| end > self.pages())
        {
            return Err(UffdError::OutOfRange {
                first,
                count,
                pages: self.pages(),
            });
        }
        Ok(())
    }

    fn mark_present(&self, first: u64, count: u64) {
        for p in first..first + count {
            if self.state[p as usize].swap(PRESENT, Ordering::AcqRel) != PRESENT {
                self.present.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Waits up to `timeout` for a faulting access. Several threads may wait at once; each
    /// fault goes to one of them. The same page can be reported more than once (two threads
    /// touching it, or an access retried after a signal): resolving it again is harmless.
    /// Never touch not-yet-present guest memory from the thread that resolves faults.
    pub fn wait_fault(&self, timeout: Duration) -> Result<Option<Fault>, UffdError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut msg = UffdMsg::default();
            let want = std::mem::size_of::<UffdMsg>();
            // SAFETY: `msg` is a live, writable buffer of exactly one `struct uffd_msg`; the
            // fd is non-blocking, so the read returns at once.
            let n = unsafe {
                libc::read(
                    self.uffd.as_raw_fd(),
                    (&raw mut msg).cast::<libc::c_void>(),
                    want,
                )
            };
            if n == want as isize {
                if msg.event != UFFD_EVENT_PAGEFAULT {
                    continue; // no other event was asked for
                }
                let (flags, address) = (msg.arg[0], msg.arg[1]);
                debug_assert!(flags & UFFD_PAGEFAULT_FLAG_MINOR != 0);
                let span = self
                    .spans
                    .iter()
                    .find(|s| address >= s.host && address - s.host < s.spec.size)
                    .ok_or(UffdError::Stray(address))?;
                let offset = (address - span.host) & !(PAGE_SIZE - 1);
                self.faults.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(Fault {
                    page_index: span.first + offset / PAGE_SIZE,
                    gpa: span.spec.gpa + offset,
                    write: flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                }));
            }
            if n >= 0 {
                return Err(UffdError::Read(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short read of {n} bytes from the userfaultfd"),
                )));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => {}
                Some(libc::EINTR) => continue,
                _ => return Err(UffdError::Read(e)),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live `pollfd` and a live `timespec`; no signal mask is changed.
            let rc = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(UffdError::Read(e));
                }
            } else if pfd.revents & libc::POLLERR != 0 {
                return Err(UffdError::Read(io::Error::other(
                    "the userfaultfd reported POLLERR (its process is exiting?)",
                )));
            }
        }
    }

    /// Maps pages `page_index .. page_index + count` (`UFFDIO_CONTINUE`) and wakes the threads
    /// waiting on them. Their content must already be in the memfds. Pages already present are
    /// skipped (EEXIST).
    pub fn make_present(&self, page_index: u64, count: u64) -> Result<(), UffdError> {
        self.check_range(page_index, count)?;
        let mut page = page_index;
        let end = page_index + count;
        while page < end {
            let span = self.span_of_page(page).ok_or(UffdError::OutOfRange {
                first: page_index,
                count,
                pages: self.pages(),
            })?;
            let run = (end - page).min(span.first + span.pages() - page);
            self.continue_run(span, page, run)?;
            page += run;
        }
        Ok(())
    }

    /// `UFFDIO_CONTINUE` of `count` pages from `page`, all inside `span`.
    fn continue_run(&self, span: &Span, mut page: u64, count: u64) -> Result<(), UffdError> {
        let end = page + count;
        while page < end {
            let mut c = UffdioContinue {
                range: UffdioRange {
                    start: span.host + (page - span.first) * PAGE_SIZE,
                    len: (end - page) * PAGE_SIZE,
                },
                mode: 0,
                mapped: 0,
            };
            // SAFETY: `c` is a live, writable `struct uffdio_continue`; the range lies inside
            // the span's registered mapping, which `self.memory` keeps mapped. CONTINUE only
            // installs page table entries for page-cache pages of the memfd.
            let rc = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_CONTINUE(), &mut c) };
            if rc == 0 {
                self.mark_present(page, end - page);
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if c.mapped > 0 {
                let done = c.mapped as u64 / PAGE_SIZE;
                self.mark_present(page, done);
                page += done;
            }
            match e.raw_os_error() {
                // Some pages were mapped before a page that needs another try.
                Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                // The first page is mapped already: nobody waits on it.
                Some(libc::EEXIST) => {
                    self.mark_present(page, 1);
                    page += 1;
                }
                _ => return Err(UffdError::Continue { page, source: e }),
            }
        }
        Ok(())
    }

    /// Writes `data` (whole pages) as pages `page_index ..` into the memfds and makes them
    /// present, skipping every page that is already present or being filled by another call:
    /// each page is written at most once, so a late copy never overwrites what the guest wrote.
    /// Returns how many pages this call wrote.
    pub fn fill(&self, page_index: u64, data: &[u8]) -> Result<u64, UffdError> {
        if !(data.len() as u64).is_multiple_of(PAGE_SIZE) {
            return Err(UffdError::NotPages(data.len()));
        }
        let count = data.len() as u64 / PAGE_SIZE;
        self.check_range(page_index, count)?;
        let claim = |p: u64| {
            self.state[p as usize]
                .compare_exchange(ABSENT, FILLING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        };
        let mut written = 0;
        let mut i = 0;
        while i < count {
            let page = page_index + i;
            if !claim(page) {
                i += 1;
                continue;
            }
            let span = self
                .span_of_page(page)
                .expect("check_range: every page is in a span");
            let span_end = span.first + span.pages();
            let start = i;
            i += 1;
            while i < count && page_index + i < span_end && claim(page_index + i) {
                i += 1;
            }
            let bytes = &data[(start * PAGE_SIZE) as usize..(i * PAGE_SIZE) as usize];
            let result = pwrite_all(span.fd, bytes, (page - span.first) * PAGE_SIZE)
                .map_err(|source| UffdError::Write { page, source })
                .and_then(|()| self.continue_run(span, page, i - start));
            if let Err(e) = result {
                for p in page..page_index + i {
                    let _ = self.state[p as usize].compare_exchange(
                        FILLING,
                        ABSENT,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                return Err(e);
            }
            written += i - start;
        }
        Ok(written)
    }

    /// Makes a present page absent again: its mapping is dropped (the memfd keeps its content)
    /// and the next access faults. For a hybrid move's destination, whose pre-pass copy of the
    /// page went stale: call it only while nothing runs on the memory (before the VM starts),
    /// since the guest's writes to the page since it became present would be lost.
    pub fn invalidate(&self, page_index: u64) -> Result<(), UffdError> {
        self.check_range(page_index, 1)?;
        let span = self
            .span_of_page(page_index)
            .expect("check_range: every page is in a span");
        let addr = span.host + (page_index - span.first) * PAGE_SIZE;
        // SAFETY: the page lies inside the span's registered mapping, which `self.memory` keeps
        // mapped; MADV_DONTNEED on a shared memfd mapping only drops page table entries (the
        // page cache, i.e. the content, stays), so no memory of ours becomes invalid.
        let rc = unsafe {
            libc::madvise(
                addr as *mut libc::c_void,
                PAGE_SIZE as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(UffdError::Invalidate {
                page: page_index,
                source: io::Error::last_os_error(),
            });
        }
        if self.state[page_index as usize].swap(ABSENT, Ordering::AcqRel) == PRESENT {
            self.present.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Unregisters the memory: from now on every access maps the memfd's page as it is, without
    /// a fault. Call it once every page is present (or its content valid).
    pub fn unregister(self) -> Result<(), UffdError> {
        for (index, s) in self.spans.iter().enumerate() {
            let mut range = UffdioRange {
                start: s.host,
                len: s.spec.size,
            };
            // SAFETY: `range` is a live `struct uffdio_range` naming a mapping this object
            // registered and keeps mapped.
            if unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_UNREGISTER(), &mut range) } != 0 {
                return Err(UffdError::Unregister {
                    index,
                    source: io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }
}

fn pwrite_all(fd: RawFd, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live byte slice; pwrite(2) only reads `buf.len()` bytes from it.
        let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), offset as libc::off_t) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwrite wrote 0 bytes",
            ));
        }
        buf = &buf[n as usize..];
        offset += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::split_regions;

    /// Fresh, fallocated memfds for `specs`, plus a second (populated) mapping of them to play
    /// the source's part.
    fn lazy_pair(specs: &[RegionSpec]) -> (Arc<GuestMemory>, LazyMemory) {
        let staging = GuestMemory::new(specs).unwrap();
        LazyMemory::map(specs, staging.clone_fds().unwrap()).unwrap()
    }

    #[test]
    fn a_vmm_read_waits_for_its_page() {
        let specs = split_regions(16 << 20, 2);
        let (memory, lazy) = lazy_pair(&specs);
        let lazy = Arc::new(lazy);
        let target = specs[1].gpa + 3 * PAGE_SIZE + 100;
        let reader = {
            let memory = Arc::clone(&memory);
            std::thread::spawn(move || {
                let mut b = [0u8; 4];
                memory.read(target, &mut b).unwrap();
                b
            })
        };
        let f = lazy
            .wait_fault(Duration::from_secs(5))
            .unwrap()
            .expect("the reader faults");
        assert_eq!(f.gpa, specs[1].gpa + 3 * PAGE_SIZE);
        assert_eq!(f.page_index, specs[0].pages() + 3);
        assert!(!f.write);
        let mut page = vec![0u8; PAGE_SIZE as usize];
        page[100..104].copy_from_slice(b"lazy");
        assert_eq!(lazy.fill(f.page_index, &page).unwrap(), 1);
        assert_eq!(&reader.join().unwrap(), b"lazy");
        // Filled once: a second fill of the same page writes nothing.
        assert_eq!(lazy.fill(f.page_index, &vec![7u8; 4096]).unwrap(), 0);
        let mut b = [0u8; 4];
        memory.read(target, &mut b).unwrap();
        assert_eq!(&b, b"lazy");
        assert!(lazy
            .wait_fault(Duration::from_millis(20))
            .unwrap()
            .is_none());
    }

    #[test]
    fn make_present_skips_present_pages_and_spans_regions() {
        let specs = split_regions(16 << 20, 2);
        let (memory, lazy) = lazy_pair(&specs);
        let last0 = specs[0].pages() - 1;
        lazy.fill(last0, &[1u8; 4096]).unwrap();
        // Across the boundary, with the first page present already.
        lazy.make_present(last0, 3).unwrap();
        assert_eq!(lazy.present_count(), 3);
        assert!(lazy.is_present(last0 + 2) && !lazy.is_present(last0 + 3));
        let mut b = [0u8; 1];
        memory.read(specs[1].gpa, &mut b).unwrap(); // present: no fault, fallocated zeros
        assert_eq!(b[0], 0);
        assert!(matches!(
            lazy.make_present(lazy.pages() - 1, 2),
            Err(UffdError::OutOfRange { .. })
        ));
        lazy.make_present(0, lazy.pages()).unwrap();
        assert!(lazy.all_present());
        lazy.unregister().unwrap();
        memory
            .read(specs[0].gpa + last0 * PAGE_SIZE, &mut b)
            .unwrap();
        assert_eq!(b[0], 1);
    }

    #[test]
    fn unallocated_memfds_are_refused() {
        let specs = split_regions(16 << 20, 1);
        // SAFETY: a NUL-terminated name and valid flags.
        let raw = unsafe { libc::memfd_create(c"hole".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh fd nobody else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        file.set_len(specs[0].size).unwrap();
        assert!(matches!(
            LazyMemory::map(&specs, vec![file.into()]),
            Err(UffdError::NotAllocated { index: 0, .. })
        ));
    }

    #[test]
    fn dropping_unregisters() {
        let specs = split_regions(16 << 20, 1);
        let (memory, lazy) = lazy_pair(&specs);
        drop(lazy);
        let mut b = [1u8; 1];
        memory.read(4096, &mut b).unwrap(); // would block forever if still registered
        assert_eq!(b[0], 0);
    }
}
