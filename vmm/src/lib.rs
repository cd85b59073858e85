//! The Understudy micro-VMM, built on kvm-ioctls.
//!
//! - [`memory`]: guest memory in memfd-backed regions that another VM can map without a copy, or
//!   in anonymous huge-page memory that frees fast;
//! - [`vm`]: a VM with vCPU threads, `pause()`/`resume()`, `take_dirty()`, state and restore;
//! - [`state`]: the versioned VM state blob, saved component by component ([`state::Persist`]);
//! - [`devices::serial`]: COM1 behind the output-commit gate;
//! - [`boot`]: CPL3 long-mode start and the multiboot v1 loader;
//! - [`guests`]: the built-in workloads (`idle`, `dirty`, `ledger`);
//! - [`uffd`]: guest memory filled on demand through userfaultfd (postcopy destination).
//!
//! All of the workspace's `unsafe` lives here (KVM, mmap, signals), each block with a
//! `// SAFETY:` comment.

pub mod boot;
pub mod devices;
pub mod dirty;
pub mod guests;
pub mod memory;
pub mod state;
pub mod uffd;
mod vcpu;
pub mod vm;

pub use devices::serial::{ConsoleFile, ConsoleFileError, MemorySink, OutputGate};
pub use dirty::DirtySet;
pub use memory::{Backing, GuestMemory, HugeBuffer, RegionSpec, PAGE_SIZE};
pub use state::VmState;
pub use uffd::{Fault, LazyMemory, UffdError};
pub use vcpu::ExitReason;
pub use vm::{Boot, PauseProfile, PreparedRestore, VcpuPauseProfile, Vm, VmConfig, VmError};

/// Ends this process at once with SIGKILL, as a host failure would (drills and tests use it to
/// kill a primary at an exact point of an epoch).
pub fn sigkill_self() -> ! {
    // SAFETY: kill(2) on our own pid with a valid signal number has no memory effects; SIGKILL
    // cannot be caught, so the call does not return.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    unreachable!("SIGKILL does not return")
}

/// Lowers the calling thread's CPU priority to `nice` (0 = normal, 19 = lowest); threads it
/// starts afterwards inherit it. Linux keeps a nice value per thread, so this leaves the rest of
/// the process (the vCPU threads above all) as it was. Raising the priority again needs
/// CAP_SYS_NICE, so a caller should only lower it.
pub fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    let nice = nice.clamp(0, 19);
    // SAFETY: gettid(2) has no preconditions and no memory effects.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority(2) on our own thread id with a value in 0..=19 only changes this
    // thread's scheduling weight; it touches no memory.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
