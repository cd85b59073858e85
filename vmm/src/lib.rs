//! The Understudy micro-VMM, built on kvm-ioctls.
//!
//! - [`memory`]: guest memory in memfd-backed regions that another VM can map without a copy;
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
pub use memory::{GuestMemory, RegionSpec, PAGE_SIZE};
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
