//! The contract between the VMM and the built-in guests: where things live in guest memory and
//! which ports the guests use. Both sides read these constants; change them in one place.
//!
//! ```text
//!  guest physical address
//!  0x0000_0000  +----------------------------+
//!               | unused (page 0)            |
//!  0x0000_1000  | PML4                       |  built by the VMM: identity map of all guest
//!  0x0000_2000  | PDPT                       |  memory with 2 MiB pages, user bit set
//!  0x0000_3000  | PD 0..3 (up to 4 GiB)      |
//!  0x0000_8000  +----------------------------+
//!               | control block (4 KiB)      |  progress counter at +0, see `ControlBlock`
//!  0x0000_9000  +----------------------------+
//!               | unused                     |
//!  0x0001_0000  +----------------------------+
//!               | guest code (<= 64 KiB)     |  RIP = entry
//!  0x0002_0000  +----------------------------+
//!               | stack (64 KiB)             |  RSP = STACK_TOP at entry
//!  0x0003_0000  +----------------------------+
//!               | unused                     |
//!  0x0010_0000  +----------------------------+
//!               | data area (working set)    |  up to the end of guest memory
//!               +----------------------------+
//! ```
//!
//! The guest runs at CPL3 in long mode with IOPL 3. It talks to the VMM by port I/O only:
//! `out COM1_PORT, al` writes one console byte (16550 THR, no need to poll LSR) and
//! `out EXIT_PORT, eax` stops the VM with the exit code in EAX (0 = done, 1 = CORRUPT).

/// Guest-physical address of the PML4 table.
pub const PML4_GPA: u64 = 0x1000;
/// Guest-physical address of the PDPT.
pub const PDPT_GPA: u64 = 0x2000;
/// Guest-physical address of the first page directory (four, 0x3000..0x7000, for 4 GiB).
pub const PD_GPA: u64 = 0x3000;
/// Guest-physical address of the control block.
pub const CONTROL_GPA: u64 = 0x8000;
/// Offset in the control block of the u64 progress counter (pages dirtied, ledger steps, ...).
pub const PROGRESS_OFFSET: u64 = 0;
/// Guest-physical address of the progress counter.
pub const PROGRESS_GPA: u64 = CONTROL_GPA + PROGRESS_OFFSET;
/// Guest-physical address where the code is loaded.
pub const CODE_GPA: u64 = 0x1_0000;
/// Largest code image.
pub const CODE_MAX: usize = 0x1_0000;
/// Lowest stack address.
pub const STACK_BASE: u64 = 0x2_0000;
/// Initial RSP.
pub const STACK_TOP: u64 = 0x3_0000;
/// Start of the data area (the working set of the workloads).
pub const DATA_GPA: u64 = 0x10_0000;
/// COM1 base port (16550 UART).
pub const COM1_PORT: u16 = 0x3f8;
/// Writing a u32 here stops the VM with that exit code.
pub const EXIT_PORT: u16 = 0x510;
/// Exit code of a guest that found its invariant broken.
pub const EXIT_CORRUPT: u32 = 1;
