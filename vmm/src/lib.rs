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

use std::sync::atomic::{AtomicI32, Ordering};

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
    set_this_thread_nice(nice.clamp(0, 19))
}

/// The nice value vCPU threads started from now on take (0 = they keep their creator's).
static VCPU_NICE: AtomicI32 = AtomicI32::new(0);

/// Runs every vCPU thread this process starts from now on at CPU priority `nice` (-20..=19;
/// below 0 is above normal), so that the guest keeps its CPU against the process's own
/// replication work and anything else at normal priority on the host. 0 leaves vCPU threads
/// at their creator's priority.
///
/// Raising a thread above 0 needs CAP_SYS_NICE (or a matching RLIMIT_NICE): a probe thread
/// tries `nice` first, and on failure this returns its error and changes nothing.
pub fn set_vcpu_nice(nice: i32) -> std::io::Result<()> {
    if !(-20..=19).contains(&nice) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("nice {nice} is out of range (-20..=19)"),
        ));
    }
    if nice != 0 {
        std::thread::Builder::new()
            .name("nice-probe".into())
            .spawn(move || set_this_thread_nice(nice))?
            .join()
            .map_err(|_| std::io::Error::other("the priority probe thread panicked"))??;
    }
    VCPU_NICE.store(nice, Ordering::Relaxed);
    Ok(())
}

/// The priority [`set_vcpu_nice`] set (0 if never called).
pub fn vcpu_nice() -> i32 {
    VCPU_NICE.load(Ordering::Relaxed)
}

/// setpriority(2) on the calling thread; `nice` must be in -20..=19.
fn set_this_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid(2) has no preconditions and no memory effects.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority(2) on our own thread id with a value in -20..=19 only changes this
    // thread's scheduling weight; it touches no memory.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Applies [`set_vcpu_nice`]'s value to the calling (vCPU) thread. The value was probed when
/// it was set; a failure now (the process dropped the capability since) leaves the thread at
/// its creator's priority, which is where it would be without the setting.
pub(crate) fn apply_vcpu_nice() {
    let nice = vcpu_nice();
    if nice != 0 {
        if let Err(e) = set_this_thread_nice(nice) {
            tracing::warn!(error = %e, nice, "cannot set the vCPU thread's CPU priority; it keeps its creator's");
        }
    }
}
