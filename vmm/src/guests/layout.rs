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
//!               | control block (4 KiB)      |  progress counter at +0, fields below
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
//! The guests are single-threaded: only the vCPU that starts with RSP = STACK_TOP runs the
//! workload; other vCPUs (started with lower stacks) spin on `pause` without touching memory.
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
/// Guest-physical address of the progress counter. Every built-in guest keeps its u64 progress
/// counter here: `idle` counts spin rounds, `dirty` pages written, `ledger` steps done.
pub const PROGRESS_GPA: u64 = CONTROL_GPA + PROGRESS_OFFSET;

// Control block fields after the progress counter (all u64, little-endian). The guests keep
// every piece of their state either here or in registers, so memory and registers captured at
// any instruction boundary are a complete, consistent image of the guest.
//
// | offset | field              | used by       | meaning                                      |
// |--------|--------------------|---------------|----------------------------------------------|
// | 0x00   | progress           | all           | see `PROGRESS_GPA`                           |
// | 0x08   | workload id        | all           | `WORKLOAD_ID_*`, written at entry            |
// | 0x10   | pace origin tsc    | dirty, ledger | TSC at the origin of the pacing schedule     |
// | 0x18   | pace origin count  | dirty, ledger | progress count at the origin                 |
// | 0x20   | pace rebases       | dirty, ledger | times the schedule was moved (stall, TSC jump)|
// | 0x28   | rng state          | dirty, ledger | splitmix64 state                             |
// | 0x30   | dirty cursor       | dirty         | next page index of the sequential pattern    |
// | 0x38   | ledger ticks       | ledger        | N of the last `tick N ok` line               |
// | 0x40   | ledger checksum    | ledger        | running checksum over all ledger pages       |

/// Offset of the u64 workload id (`WORKLOAD_ID_*`), written by every guest at entry.
pub const WORKLOAD_ID_OFFSET: u64 = 0x08;
/// Workload id of `idle` (ASCII "IDLE").
pub const WORKLOAD_ID_IDLE: u64 = u64::from_le_bytes(*b"IDLE\0\0\0\0");
/// Workload id of `dirty` (ASCII "DIRTY").
pub const WORKLOAD_ID_DIRTY: u64 = u64::from_le_bytes(*b"DIRTY\0\0\0");
/// Workload id of `ledger` (ASCII "LEDGER").
pub const WORKLOAD_ID_LEDGER: u64 = u64::from_le_bytes(*b"LEDGER\0\0");
/// Offset of the u64 TSC value at the origin of the pacing schedule (paced guests only).
pub const PACE_ORIGIN_TSC_OFFSET: u64 = 0x10;
/// Offset of the u64 progress count at the origin of the pacing schedule.
pub const PACE_ORIGIN_COUNT_OFFSET: u64 = 0x18;
/// Offset of the u64 count of schedule re-bases (after a stall > 100 ms or a TSC jump).
pub const PACE_REBASES_OFFSET: u64 = 0x20;
/// Offset of the u64 splitmix64 state of the guest's PRNG.
pub const RNG_STATE_OFFSET: u64 = 0x28;
/// Offset of the u64 next page index of `dirty`'s sequential pattern.
pub const DIRTY_CURSOR_OFFSET: u64 = 0x30;
/// Offset of `ledger`'s u64 step counter (the progress counter).
pub const LEDGER_STEPS_OFFSET: u64 = PROGRESS_OFFSET;
/// Offset of `ledger`'s u64 tick counter: N of the last `tick N ok` line printed (0 = none yet).
pub const LEDGER_TICKS_OFFSET: u64 = 0x38;
/// Offset of `ledger`'s u64 running checksum (wrapping sum of the page seeds, see
/// `guests::model`).
pub const LEDGER_CHECKSUM_OFFSET: u64 = 0x40;
/// Offset of `ledger`'s PRNG state.
pub const LEDGER_RNG_OFFSET: u64 = RNG_STATE_OFFSET;
/// Size of a guest page as the workloads use it.
pub const PAGE_SIZE: u64 = 0x1000;
/// Guest-physical address where the code is loaded.
pub const CODE_GPA: u64 = 0x1_0000;
/// Largest code image.
pub const CODE_MAX: usize = 0x1_0000;
/// Where the VMM puts the park loop (`pause; jmp`) that vCPUs other than the first run under a
/// built-in workload; the last 16 bytes of the code area, so workload code must end before it.
pub const AP_PARK_GPA: u64 = CODE_GPA + CODE_MAX as u64 - 16;
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
