//! A running VM: KVM VM fd, memory slots, vCPU threads, COM1 with its output gate, and the dirty
//! tracker.
//!
//! ```text
//!   Vm::boot(config, Boot)        fresh memory, load guest, vCPUs start
//!   Vm::restore(memory, state)    existing memfds + state blob, vCPUs continue
//!   pause() -> VmState            every vCPU out of KVM_RUN, state saved
//!   take_dirty() -> DirtySet      KVM log OR the VMM's own writes, since the last call
//!   resume()
//! ```

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::boot::{longmode, multiboot};
use crate::devices::serial::{OutputGate, SerialConsole, SerialStateError};
use crate::dirty::DirtySet;
use crate::guests::layout::{AP_PARK_GPA, CODE_GPA, COM1_PORT, STACK_TOP};
use crate::memory::{Backing, GuestMemory, MemoryError, RegionSpec};
use crate::state::vcpu::{KvmVcpu, SaveSteps};
use crate::state::{Persist, VcpuStateError, VmState};
use crate::vcpu::{install_kick_handler, ExitLatch, ExitReason, Parked, VcpuEnv, VcpuHandle};

/// How long `pause()` waits for a vCPU to leave KVM_RUN before reporting it stuck.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest number of vCPUs we start.
pub const MAX_VCPUS: u8 = 8;

/// How to make a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest memory layout.
    pub regions: Vec<RegionSpec>,
    /// Number of vCPUs (1 by default).
    pub vcpus: u8,
    /// Track dirty pages from the start.
    pub dirty_logging: bool,
    /// What backs guest memory (memfds by default).
    pub backing: Backing,
}

impl VmConfig {
    /// One region of `bytes` at guest-physical 0, one vCPU, no dirty logging.
    pub fn new(bytes: u64) -> Self {
        VmConfig {
            regions: vec![RegionSpec {
                gpa: 0,
                size: bytes,
            }],
            vcpus: 1,
            dirty_logging: false,
            backing: Backing::Memfd,
        }
    }
}

/// What the guest starts from.
pub enum Boot<'a> {
    /// A built-in guest: code loaded at `CODE_GPA`, started in CPL3 long mode at `entry`.
    Program {
        /// Machine code.
        code: &'a [u8],
        /// Guest-physical address of the first instruction.
        entry: u64,
    },
    /// A built-in workload, generated for this VM's memory size and TSC frequency.
    Workload(&'a crate::guests::Workload),
    /// A multiboot v1 image with its command line.
    Multiboot {
        /// The image file's bytes.
        image: &'a [u8],
        /// Kernel command line.
        cmdline: &'a str,
    },
}

/// Why a VM could not be made, run or saved.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm ({0}); run on a host with KVM and give this user access to /dev/kvm (e.g. the kvm group)")]
    NoKvm(#[source] kvm_ioctls::Error),
    #[error("{what} failed")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("loading the multiboot image failed")]
    Multiboot(#[from] multiboot::MultibootError),
    #[error(transparent)]
    Guest(#[from] crate::guests::GuestBuildError),
    #[error("the guest code is {0} bytes; at most {max} fit", max = AP_PARK_GPA - CODE_GPA)]
    CodeTooLarge(usize),
    #[error("{0} vCPUs requested; 1..={MAX_VCPUS} supported")]
    VcpuCount(u8),
    #[error("vCPU state")]
    VcpuState(#[from] VcpuStateError),
    #[error(transparent)]
    Serial(#[from] SerialStateError),
    #[error(
        "the state describes {state} vCPUs / regions {state_regions:?}, the memory has {memory:?}"
    )]
    StateMismatch {
        state: usize,
        state_regions: Vec<RegionSpec>,
        memory: Vec<RegionSpec>,
    },
    #[error("starting a vCPU thread failed")]
    Thread(#[source] std::io::Error),
    #[error("vCPU {0} ended before it could be paused")]
    VcpuGone(usize),
    #[error("vCPU {0} did not leave KVM_RUN within the pause timeout")]
    PauseTimeout(usize),
    #[error("the VM is not paused")]
    NotPaused,
    #[error(
        "reading the dirty log of slot {slot} failed; its pages stay pending for the next call"
    )]
    DirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("dirty logging is off")]
    DirtyLoggingOff,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Where the time of one `pause()` went ([`Vm::pause_profile`]).
#[derive(Clone, Debug, Default)]
pub struct PauseProfile {
    /// `pause()` entered -> returned.
    pub total: Duration,
    /// One entry per vCPU, in id order.
    pub vcpus: Vec<VcpuPauseProfile>,
}

/// One vCPU's part of a pause. The parts follow each other: `kick`, `exit`, `save` and
/// `handoff` of the last vCPU add up to about the pause.
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuPauseProfile {
    /// `pause()` entered -> this vCPU's signal about to be sent (earlier vCPUs' kicks included).
    pub kick: Duration,
    /// Signal about to be sent -> the vCPU thread out of `KVM_RUN` and on its pause path (zero
    /// if it saw the request between two runs, before the signal).
    pub exit: Duration,
    /// -> its state saved (the ioctls in `steps`, plus the glue between them).
    pub save: Duration,
    /// Each ioctl of the save.
    pub steps: SaveSteps,
    /// State saved -> `pause()` saw it (hand-off to the pausing thread; for the second and later
    /// vCPUs it includes waiting for the ones before).
    pub handoff: Duration,
}

/// A VM whose vCPUs run on their own threads.
pub struct Vm {
    _kvm: Kvm,
    fd: VmFd,
    memory: Arc<GuestMemory>,
    vcpus: Vec<VcpuHandle>,
    serial: Arc<Mutex<SerialConsole>>,
    exit: Arc<ExitLatch>,
    tsc_khz: u32,
    irqchip: bool,
    dirty_logging: bool,
    /// Dirty bits read from KVM but not yet handed out (a failed `take_dirty` keeps them here).
    pending: Vec<Vec<u64>>,
    paused: Option<Vec<crate::state::VcpuState>>,
    profile: PauseProfile,
    #[doc(hidden)]
    pub fail_dirty_read_of_slot: Option<u32>,
}

struct Prepared {
    kvm: Kvm,
    fd: VmFd,
    vcpu_fds: Vec<VcpuFd>,
    msrs: Arc<[u32]>,
    xsave: bool,
    tsc_khz: u32,
}

/// Makes the KVM VM, its memory slots and its vCPUs with their CPUID.
///
/// The slots and the vCPUs do not depend on each other, and KVM serialises them on different
/// locks (`slots_lock`; `kvm->lock` and each vCPU's mutex), so they are made on two threads: the
/// slots here (at 1 GiB ~0.24 ms on PVM: KVM allocates and zeroes the slot's rmap and
/// write-tracking arrays, ~2.5 MiB), the vCPUs on a helper (KVM_CREATE_VCPU, KVM_SET_CPUID2 and
/// the probes: ~0.15 ms once [`Vm::warm_up`] ran). One after the other they were half of a cold
/// restore (vmm/benches/vmm.rs). The caller loads a vCPU's state only after both: KVM_SET_SREGS
/// of a guest in PAE paging reads its PDPTEs from guest memory, which must be in a slot by then.
fn prepare(
    memory: &GuestMemory,
    vcpus: u8,
    dirty_logging: bool,
    irqchip: bool,
) -> Result<Prepared, VmError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(VmError::VcpuCount(vcpus));
    }
    install_kick_handler().map_err(VmError::Thread)?;
    let kvm = Kvm::new().map_err(VmError::NoKvm)?;
    let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    if irqchip {
        // Before any vCPU: KVM refuses an irqchip once vCPUs exist.
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    }
    let cpuid = supported_cpuid(&kvm)?;
    let (slots, made) = std::thread::scope(|s| {
        let helper = std::thread::Builder::new()
            .name("vm-prepare".into())
            .spawn_scoped(s, || make_vcpus(&fd, &cpuid, vcpus, irqchip));
        let slots = set_slots(&fd, memory, dirty_logging);
        let made = match helper {
            Ok(h) => h
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(e) => Err(VmError::Thread(e)),
        };
        (slots, made)
    });
    slots?;
    let v = made?;
    Ok(Prepared {
        kvm,
        fd,
        vcpu_fds: v.fds,
        msrs: v.msrs,
        xsave: v.xsave,
        tsc_khz: v.tsc_khz,
    })
}

/// The vCPUs of a new VM and what was probed on the first.
struct MadeVcpus {
    fds: Vec<VcpuFd>,
    msrs: Arc<[u32]>,
    xsave: bool,
    tsc_khz: u32,
}

/// Creates `count` vCPUs with their CPUID (APIC ids set) and probes what their state holds.
fn make_vcpus(fd: &VmFd, cpuid: &CpuId, count: u8, irqchip: bool) -> Result<MadeVcpus, VmError> {
    let mut fds = Vec::with_capacity(usize::from(count));
    for id in 0..count {
        let v = fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut c = cpuid.clone();
        for e in c.as_mut_slice() {
            if e.function == 1 {
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24);
            }
            if e.function == 0xb || e.function == 0x1f {
                e.edx = u32::from(id);
            }
        }
        v.set_cpuid2(&c).map_err(kvm_err("KVM_SET_CPUID2"))?;
        fds.push(v);
    }
    let first = &fds[0];
    let msrs = probed_msrs(first, irqchip);
    let xsave = first.get_xsave().is_ok() && first.get_xcrs().is_ok();
    let tsc_khz = first.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
    Ok(MadeVcpus {
        fds,
        msrs,
        xsave,
        tsc_khz,
    })
}

/// A VM made ahead of a restore (see [`Vm::prepare_restore`]).
pub struct PreparedRestore {
    p: Prepared,
    memory: Arc<GuestMemory>,
    irqchip: bool,
    dirty_logging: bool,
}

impl std::fmt::Debug for PreparedRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedRestore")
            .field("vcpus", &self.p.vcpu_fds.len())
            .field("regions", &self.memory.specs())
            .field("irqchip", &self.irqchip)
            .finish()
    }
}

impl PreparedRestore {
    /// Whether `state` fits this VM (memory layout, vCPU count, interrupt controller).
    pub fn fits(&self, state: &VmState) -> bool {
        self.memory.specs() == state.regions
            && self.p.vcpu_fds.len() == state.vcpus.len()
            && self.irqchip == state.irqchip
    }

    /// Loads `state` into the vCPUs and the UART and starts the VM (unless `paused`).
    pub fn restore(
        self,
        state: &VmState,
        gate: Arc<OutputGate>,
        paused: bool,
    ) -> Result<Vm, VmError> {
        if !self.fits(state) || state.vcpus.is_empty() {
            return Err(VmError::StateMismatch {
                state: state.vcpus.len(),
                state_regions: state.regions.clone(),
                memory: self.memory.specs(),
            });
        }
        let p = self.p;
        for (fd, s) in p.vcpu_fds.iter().zip(&state.vcpus) {
            KvmVcpu {
                fd,
                msrs: &p.msrs,
                xsave: p.xsave,
                lapic: state.irqchip,
            }
            .restore(s)?;
        }
        // The guest's next console byte follows the ones the state's epoch wrote.
        gate.continue_at(
            state
                .console_offset
                .map(|at| at + state.console.len() as u64),
        );
        let serial = SerialConsole::from_state(COM1_PORT, gate, &state.serial)?;
        Vm::start(
            p,
            self.memory,
            serial,
            state.irqchip,
            self.dirty_logging,
            paused,
        )
    }
}

/// `KVM_GET_SUPPORTED_CPUID`, read once per process: it depends only on the host's KVM, and on
/// PVM it costs 0.3-0.4 ms, a third of making a VM (vmm/benches/vmm.rs).
fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, VmError> {
    static CPUID: OnceLock<CpuId> = OnceLock::new();
    if let Some(c) = CPUID.get() {
        return Ok(c.clone());
    }
    let c = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    Ok(CPUID.get_or_init(|| c).clone())
}

/// The MSRs this host lets us save, probed once per process and irqchip mode (one ioctl per
/// MSR): every vCPU gets the same CPUID, from `supported_cpuid`, so the answer cannot change.
fn probed_msrs(fd: &VcpuFd, irqchip: bool) -> Arc<[u32]> {
    static MSRS: [OnceLock<Arc<[u32]>>; 2] = [OnceLock::new(), OnceLock::new()];
    Arc::clone(MSRS[usize::from(irqchip)].get_or_init(|| KvmVcpu::probe_msrs(fd).into()))
}

fn set_slots(fd: &VmFd, memory: &GuestMemory, dirty_logging: bool) -> Result<(), VmError> {
    for (slot, r) in memory.regions().iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if dirty_logging {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: r.spec().gpa,
            memory_size: r.spec().size,
            userspace_addr: r.host_addr() as u64,
        };
        // SAFETY: the host range [userspace_addr, +memory_size) is the region's live mapping,
        // which `memory` keeps mapped for as long as the VM exists (the Vm holds an Arc to it and
        // drops its VmFd, and with it the slot, before the memory).
        unsafe { fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

impl Vm {
    /// Creates fresh memory, loads the guest and starts its vCPUs.
    pub fn boot(config: &VmConfig, boot: Boot<'_>, gate: Arc<OutputGate>) -> Result<Self, VmError> {
        let memory = Arc::new(GuestMemory::with_backing(&config.regions, config.backing)?);
        let irqchip = matches!(boot, Boot::Multiboot { .. });
        let p = prepare(&memory, config.vcpus, config.dirty_logging, irqchip)?;
        let load_program = |code: &[u8], entry: u64| -> Result<_, VmError> {
            if code.len() > (AP_PARK_GPA - CODE_GPA) as usize {
                return Err(VmError::CodeTooLarge(code.len()));
            }
            longmode::write_page_tables(&memory)?;
            memory.write(CODE_GPA, code)?;
            memory.write(AP_PARK_GPA, &longmode::park_loop())?;
            Ok((longmode::initial_regs(entry), false))
        };
        let (regs, multiboot) = match boot {
            Boot::Workload(w) => {
                let env = crate::guests::GuestEnv {
                    memory_bytes: memory.size(),
                    tsc_khz: u64::from(p.tsc_khz),
                };
                let program = crate::guests::build(w, &env)?;
                load_program(&program.code, program.entry)?
            }
            Boot::Program { code, entry } => load_program(code, entry)?,
            Boot::Multiboot { image, cmdline } => {
                let e = multiboot::load(&memory, image, cmdline)?;
                (multiboot::initial_regs(&e), true)
            }
        };
        for (i, v) in p.vcpu_fds.iter().enumerate() {
            let mut sregs = v.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            if multiboot {
                multiboot::setup_sregs(&mut sregs);
            } else {
                longmode::setup_sregs(&mut sregs);
            }
            v.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            let mut r = regs;
            if i > 0 && !multiboot {
                // Built-in workloads run on vCPU 0; the others spin in a park loop.
                r.rip = AP_PARK_GPA;
                r.rsp = STACK_TOP - (i as u64) * 0x1000;
            }
            v.set_regs(&r).map_err(kvm_err("KVM_SET_REGS"))?;
        }
        let serial = SerialConsole::new(COM1_PORT, gate);
        Self::start(p, memory, serial, irqchip, config.dirty_logging, false)
    }

    /// A new VM over existing memory (memfds mapped by the caller, no copy) that continues from
    /// `state`. Starts running unless `paused`.
    ///
    /// `memory` may be shared (`Arc<GuestMemory>`): a postcopy destination keeps a reference in
    /// its [`LazyMemory`](crate::uffd::LazyMemory), registered before the restore, and maps it
    /// with `GuestMemory::from_fds(.., populate = false)` so that every first access faults;
    /// its fault handler must already run (KVM may read guest memory as soon as a vCPU runs).
    pub fn restore(
        memory: impl Into<Arc<GuestMemory>>,
        state: &VmState,
        gate: Arc<OutputGate>,
        dirty_logging: bool,
        paused: bool,
    ) -> Result<Self, VmError> {
        let n = u8::try_from(state.vcpus.len()).map_err(|_| VmError::VcpuCount(u8::MAX))?;
        Self::prepare_restore(memory, n, state.irqchip, dirty_logging)?.restore(state, gate, paused)
    }

    /// Makes everything a restore needs except the state: the KVM VM, its memory slots over
    /// `memory` (no copy: a backup's hot image stays shared with it), and `vcpus` vCPUs with
    /// their CPUID. A backup does this ahead of time, so that a promotion only loads the state
    /// and starts the vCPU threads. The memory may keep changing until the restore.
    pub fn prepare_restore(
        memory: impl Into<Arc<GuestMemory>>,
        vcpus: u8,
        irqchip: bool,
        dirty_logging: bool,
    ) -> Result<PreparedRestore, VmError> {
        let memory = memory.into();
        let p = prepare(&memory, vcpus, dirty_logging, irqchip)?;
        Ok(PreparedRestore {
            p,
            memory,
            irqchip,
            dirty_logging,
        })
    }

    fn start(
        p: Prepared,
        memory: Arc<GuestMemory>,
        serial: SerialConsole,
        irqchip: bool,
        dirty_logging: bool,
        paused: bool,
    ) -> Result<Self, VmError> {
        let serial = Arc::new(Mutex::new(serial));
        let exit = ExitLatch::new();
        let mut vcpus = Vec::new();
        for (id, fd) in p.vcpu_fds.into_iter().enumerate() {
            let env = VcpuEnv {
                serial: Arc::clone(&serial),
                exit: Arc::clone(&exit),
                msrs: Arc::clone(&p.msrs),
                xsave: p.xsave,
                lapic: irqchip,
            };
            vcpus.push(VcpuHandle::spawn(id, fd, env, paused).map_err(VmError::Thread)?);
        }
        let pending = memory
            .regions()
            .iter()
            .map(|r| vec![0; r.spec().pages().div_ceil(64) as usize])
            .collect();
        let mut vm = Vm {
            _kvm: p.kvm,
            fd: p.fd,
            memory,
            vcpus,
            serial,
            exit,
            tsc_khz: p.tsc_khz,
            irqchip,
            dirty_logging,
            pending,
            paused: None,
            profile: PauseProfile::default(),
            fail_dirty_read_of_slot: None,
        };
        if paused {
            vm.pause()?;
        }
        Ok(vm)
    }

    /// Gets KVM ready, ahead of time, for the VMs this process will make, so that the first
    /// `boot` or `restore` (a backup's promotion) does not pay for it. A backup calls it at
    /// start. Idempotent.
    ///
    /// - Reads and caches the host facts every VM needs (`KVM_GET_SUPPORTED_CPUID`, the MSRs a
    ///   vCPU lets us save): ~0.4 ms on PVM.
    /// - Makes a VM with one vCPU and keeps it, idle and without memory, for the life of the
    ///   process. The host kernel turns some switches on while any VM or vCPU without an
    ///   in-kernel irqchip exists and off when the last goes (static keys such as
    ///   `kvm_has_noapic_vcpu`, flipped by patching kernel text with IPIs to every CPU): on an
    ///   otherwise idle host every `KVM_CREATE_VCPU` paid ~0.15 ms for that, and every drop of
    ///   the last VM as much again (`perf` of the restore bench). A host that runs other VMs
    ///   keeps them on anyway, which made restore figures differ from one run to the next.
    /// - Does the same for a VM with an in-kernel irqchip (multiboot guests): its vCPU's local
    ///   APIC stays disabled, which keeps the host's deferred `apic_*_disabled` keys on, and
    ///   the MSR probe of such a vCPU is cached. A backup's first consistent epoch of a
    ///   multiboot guest took 6.6 ms to prepare its VM without this, inside a move's downtime.
    pub fn warm_up() -> Result<(), VmError> {
        static KEEPER: OnceLock<[(VmFd, VcpuFd); 2]> = OnceLock::new();
        if KEEPER.get().is_some() {
            return Ok(());
        }
        let kvm = Kvm::new().map_err(VmError::NoKvm)?;
        let cpuid = supported_cpuid(&kvm)?;
        let keep = |irqchip: bool| -> Result<(VmFd, VcpuFd), VmError> {
            let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
            if irqchip {
                fd.create_irq_chip()
                    .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
            }
            let v = fd.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            v.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            probed_msrs(&v, irqchip);
            Ok((fd, v))
        };
        let kept = [keep(false)?, keep(true)?];
        // Two racing first calls each make theirs; the loser's are dropped.
        let _ = KEEPER.set(kept);
        Ok(())
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// The output gate behind COM1.
    pub fn gate(&self) -> Arc<OutputGate> {
        Arc::clone(self.serial.lock().unwrap_or_else(|e| e.into_inner()).gate())
    }

    /// The guest's TSC frequency in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Whether the vCPUs are parked.
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// Takes every vCPU out of `KVM_RUN`; returns when all are parked with their state saved.
    pub fn pause(&mut self) -> Result<(), VmError> {
        if self.paused.is_some() {
            return Ok(());
        }
        let start = Instant::now();
        let profile = &mut self.profile;
        profile.vcpus.clear();
        for v in &self.vcpus {
            let kicked = v.kick_pause();
            profile.vcpus.push(VcpuPauseProfile {
                kick: kicked - start,
                ..Default::default()
            });
        }
        let mut states = Vec::with_capacity(self.vcpus.len());
        let mut failure = None;
        for (i, v) in self.vcpus.iter().enumerate() {
            match v.wait_parked(PAUSE_TIMEOUT) {
                Parked::Saved(Ok(s), r) => {
                    states.push(s);
                    let seen = Instant::now();
                    let p = &mut profile.vcpus[i];
                    let kicked = start + p.kick;
                    p.exit = r.noticed.saturating_duration_since(kicked);
                    p.save = r.saved.saturating_duration_since(r.noticed.max(kicked));
                    p.steps = r.steps;
                    p.handoff = seen.saturating_duration_since(r.saved);
                }
                Parked::Saved(Err(e), _) => failure = failure.or(Some(VmError::VcpuState(e))),
                Parked::Ended => failure = failure.or(Some(VmError::VcpuGone(i))),
                Parked::TimedOut => failure = failure.or(Some(VmError::PauseTimeout(i))),
            }
        }
        if let Some(e) = failure {
            for v in &self.vcpus {
                v.resume();
            }
            return Err(e);
        }
        self.paused = Some(states);
        profile.total = start.elapsed();
        Ok(())
    }

    /// Where the time of the last successful `pause()` went.
    pub fn pause_profile(&self) -> &PauseProfile {
        &self.profile
    }

    /// Lets the vCPUs run again.
    pub fn resume(&mut self) {
        if self.paused.take().is_some() {
            for v in &self.vcpus {
                v.resume();
            }
        }
    }

    /// The full VM state; the VM must be paused.
    pub fn state(&self) -> Result<VmState, VmError> {
        let vcpus = self.paused.clone().ok_or(VmError::NotPaused)?;
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state();
        Ok(VmState {
            regions: self.memory.specs(),
            tsc_khz: self.tsc_khz,
            irqchip: self.irqchip,
            vcpus,
            serial,
            console: Vec::new(),
            console_offset: Some(self.gate().stream_offset()),
        })
    }

    /// Turns dirty logging on or off (re-registers the memory slots).
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), VmError> {
        if on != self.dirty_logging {
            set_slots(&self.fd, &self.memory, on)?;
            self.dirty_logging = on;
        }
        Ok(())
    }

    /// Returns and clears the pages written since the last call: the KVM dirty log OR the pages
    /// the VMM wrote itself. If reading a slot's log fails, everything already read stays pending
    /// and is returned by the next successful call; nothing is lost.
    pub fn take_dirty(&mut self) -> Result<DirtySet, VmError> {
        if !self.dirty_logging {
            return Err(VmError::DirtyLoggingOff);
        }
        for (slot, r) in self.memory.regions().iter().enumerate() {
            let slot = slot as u32;
            if self
                .fail_dirty_read_of_slot
                .take_if(|s| *s == slot)
                .is_some()
            {
                return Err(VmError::DirtyLog {
                    slot,
                    source: kvm_ioctls::Error::new(libc::EIO),
                });
            }
            let bits = self
                .fd
                .get_dirty_log(slot, r.spec().size as usize)
                .map_err(|source| VmError::DirtyLog { slot, source })?;
            let pending = &mut self.pending[slot as usize];
            for (p, b) in pending.iter_mut().zip(bits) {
                *p |= b;
            }
        }
        let mut out = Vec::with_capacity(self.pending.len());
        for (r, pending) in self.memory.regions().iter().zip(&mut self.pending) {
            let mut bits = std::mem::replace(pending, vec![0; pending.len()]);
            for (b, v) in bits.iter_mut().zip(r.take_vmm_dirty()) {
                *b |= v;
            }
            out.push((r.spec(), bits));
        }
        Ok(DirtySet::new(out))
    }

    /// Waits up to `timeout` for the guest to stop on its own.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitReason> {
        self.exit.wait(timeout)
    }

    /// Why the guest stopped, if it did.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.get()
    }

    /// Stops every vCPU thread and returns the memory (whose memfds may live on elsewhere).
    pub fn shutdown(mut self) -> Arc<GuestMemory> {
        for v in &mut self.vcpus {
            v.stop();
        }
        Arc::clone(&self.memory)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
    }
}
