//! One vCPU's state: general, segment, control and debug registers, FPU/SSE (XSAVE where the
//! host allows it), XCRs, pending events, MP state, the MSRs that matter (TSC included) and, for
//! VMs with an in-kernel irqchip, the local APIC.

use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, Msrs, KVM_MP_STATE_RUNNABLE,
};

use kvm_ioctls::VcpuFd;

use super::{Persist, Reader, StateDecodeError, Writer};

/// MSRs we save when the host lets us read them: TSC, SYSENTER, PAT, MISC_ENABLE, the SYSCALL
/// MSRs, KERNEL_GS_BASE, TSC_AUX, and for irqchip VMs the APIC base and TSC deadline.
pub const MSRS_OF_INTEREST: &[u32] = &[
    0x10,        // IA32_TSC
    0x1b,        // IA32_APIC_BASE
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0x6e0,       // TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];
/// IA32_SYSENTER_CS.
const MSR_SYSENTER_CS: u32 = 0x174;
/// EFER.SCE: SYSCALL enabled.
const EFER_SCE: u64 = 1;
/// Upper bound on MSR entries in a decoded state.
const MAX_MSRS: usize = 256;

/// Plain-old-data KVM structures that are saved as their raw bytes.
///
/// # Safety
/// Implementors must consist of integers (and arrays/unions of integers) only, so that every
/// bit pattern of `size_of::<Self>()` bytes is a valid value, and must carry no pointers.
unsafe trait Pod: Copy + Default {}
// SAFETY: all of these are bindgen copies of the kernel's KVM UAPI structs made of integer
// fields, integer arrays and unions of those; none holds a pointer. Explicit padding fields are
// integers too.
unsafe impl Pod for kvm_regs {}
// SAFETY: as above.
unsafe impl Pod for kvm_sregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_fpu {}
// SAFETY: as above.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: as above.
unsafe impl Pod for kvm_debugregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl Pod for kvm_mp_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_lapic_state {}

fn bytes_of<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` is integers only, so viewing its `size_of::<T>()` bytes as `u8` reads
    // initialised memory (values come from the kernel or `Default`, which zero every byte of
    // these repr(C) structs) and the slice lives no longer than the borrow of `v`.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn put<T: Pod>(w: &mut Writer, v: &T) {
    w.bytes(bytes_of(v));
}

fn get<T: Pod>(r: &mut Reader<'_>) -> Result<T, StateDecodeError> {
    let b = r.bytes(std::mem::size_of::<T>())?;
    if b.len() != std::mem::size_of::<T>() {
        return Err(StateDecodeError::Section(
            "register block of the wrong size",
        ));
    }
    // SAFETY: `b` holds exactly `size_of::<T>()` bytes and `T: Pod` accepts any bit pattern;
    // `read_unaligned` copes with the byte buffer's alignment.
    Ok(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

fn put_opt<T: Pod>(w: &mut Writer, v: &Option<T>) {
    match v {
        Some(v) => {
            w.u8(1);
            put(w, v);
        }
        None => w.u8(0),
    }
}

fn get_opt<T: Pod>(r: &mut Reader<'_>) -> Result<Option<T>, StateDecodeError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(get(r)?)),
        _ => Err(StateDecodeError::Section("bad option tag")),
    }
}

/// The legacy 4 KiB XSAVE area as KVM_GET_XSAVE returns it.
#[derive(Clone, Copy)]
pub struct XsaveArea(pub [u32; 1024]);

impl Default for XsaveArea {
    fn default() -> Self {
        XsaveArea([0; 1024])
    }
}
// SAFETY: an array of integers; every bit pattern is valid.
unsafe impl Pod for XsaveArea {}

impl XsaveArea {
    fn to_kvm(self) -> kvm_xsave {
        kvm_xsave {
            region: self.0,
            ..Default::default()
        }
    }

    /// The x87/SSE state as `KVM_GET_FPU` reports it, read from the area's legacy 512 bytes
    /// (the FXSAVE layout, which `KVM_GET_FPU` copies field by field: FCW 0, FSW 2, abridged
    /// FTW 4, FOP 6, FIP 8, FDP 16, ST0-7 from 32, XMM0-15 from 160). Like the ioctl it leaves
    /// `mxcsr` 0: KVM never reports MXCSR there (it is at byte 24 of the XSAVE area), and the
    /// vCPU tests compare this with `KVM_GET_FPU` byte for byte.
    pub fn fpu(&self) -> kvm_fpu {
        let mut b = [0u8; 512];
        for (bytes, word) in b.chunks_exact_mut(4).zip(&self.0) {
            bytes.copy_from_slice(&word.to_le_bytes());
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let mut f = kvm_fpu {
            fcw: u16_at(0),
            fsw: u16_at(2),
            ftwx: b[4],
            last_opcode: u16_at(6),
            last_ip: u64_at(8),
            last_dp: u64_at(16),
            ..Default::default()
        };
        for (i, r) in f.fpr.iter_mut().enumerate() {
            r.copy_from_slice(&b[32 + 16 * i..48 + 16 * i]);
        }
        for (i, r) in f.xmm.iter_mut().enumerate() {
            r.copy_from_slice(&b[160 + 16 * i..176 + 16 * i]);
        }
        f
    }
}

/// Saved state of one vCPU.
#[derive(Clone, Default)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    /// The 4 KiB XSAVE area (`kvm_xsave.region`), where the host supports it.
    pub xsave: Option<XsaveArea>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub lapic: Option<kvm_lapic_state>,
    /// (index, value) pairs.
    pub msrs: Vec<(u32, u64)>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("cr3", &format_args!("{:#x}", self.sregs.cr3))
            .field("xsave", &self.xsave.is_some())
            .field("msrs", &self.msrs.len())
            .finish()
    }
}

impl PartialEq for VcpuState {
    fn eq(&self, other: &Self) -> bool {
        let mut a = Writer::default();
        let mut b = Writer::default();
        self.encode(&mut a);
        other.encode(&mut b);
        a.0 == b.0
    }
}

impl VcpuState {
    pub(super) fn encode(&self, w: &mut Writer) {
        put(w, &self.regs);
        put(w, &self.sregs);
        put(w, &self.fpu);
        put_opt(w, &self.xsave);
        put_opt(w, &self.xcrs);
        put(w, &self.debugregs);
        put(w, &self.events);
        put(w, &self.mp_state);
        put_opt(w, &self.lapic);
        w.u32(self.msrs.len() as u32);
        for (i, v) in &self.msrs {
            w.u32(*i);
            w.u64(*v);
        }
    }

    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, StateDecodeError> {
        let regs = get(r)?;
        let sregs = get(r)?;
        let fpu = get(r)?;
        let xsave = get_opt(r)?;
        let xcrs = get_opt(r)?;
        let debugregs = get(r)?;
        let events = get(r)?;
        let mp_state = get(r)?;
        let lapic = get_opt(r)?;
        let n = r.u32()? as usize;
        if n > MAX_MSRS {
            return Err(StateDecodeError::Section("too many MSRs"));
        }
        let mut msrs = Vec::with_capacity(n);
        for _ in 0..n {
            msrs.push((r.u32()?, r.u64()?));
        }
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debugregs,
            events,
            mp_state,
            lapic,
            msrs,
        })
    }

    /// The first part in which two saves of a vCPU that did not run in between differ, leaving
    /// out the TSC (it moves between the two).
    pub fn first_difference(&self, other: &VcpuState) -> Option<&'static str> {
        fn same<T: Pod>(a: &T, b: &T) -> bool {
            bytes_of(a) == bytes_of(b)
        }
        fn same_opt<T: Pod>(a: &Option<T>, b: &Option<T>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => same(a, b),
                (None, None) => true,
                _ => false,
            }
        }
        let not_tsc = |m: &&(u32, u64)| m.0 != 0x10;
        [
            ("regs", same(&self.regs, &other.regs)),
            ("sregs", same(&self.sregs, &other.sregs)),
            ("fpu", same(&self.fpu, &other.fpu)),
            ("xsave", same_opt(&self.xsave, &other.xsave)),
            ("xcrs", same_opt(&self.xcrs, &other.xcrs)),
            ("debugregs", same(&self.debugregs, &other.debugregs)),
            ("events", same(&self.events, &other.events)),
            ("mp_state", same(&self.mp_state, &other.mp_state)),
            ("lapic", same_opt(&self.lapic, &other.lapic)),
            (
                "msrs",
                self.msrs
                    .iter()
                    .filter(not_tsc)
                    .eq(other.msrs.iter().filter(not_tsc)),
            ),
        ]
        .into_iter()
        .find(|(_, same)| !same)
        .map(|(what, _)| what)
    }

    /// The guest's TSC at the moment of the save, if it was saved.
    pub fn tsc(&self) -> Option<u64> {
        self.msrs.iter().find(|(i, _)| *i == 0x10).map(|(_, v)| *v)
    }
}

/// A failed save or restore of a vCPU.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum VcpuStateError {
    #[error("{what} of vCPU failed: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the host accepted {done} of {wanted} MSRs")]
    Msrs { done: usize, wanted: usize },
    #[error("the state saved at the exit differs from the ioctls' in {0} (debug-build check)")]
    ExitSaveDiffers(&'static str),
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuStateError> {
    r.map_err(|source| VcpuStateError::Ioctl { what, source })
}

/// Most steps one save records.
const MAX_STEPS: usize = 12;

/// How long each step of one vCPU save took (one entry per ioctl), without allocating: a
/// pause records one per vCPU, and the bench prints them.
#[derive(Clone, Copy, Debug)]
pub struct SaveSteps {
    len: usize,
    steps: [(&'static str, Duration); MAX_STEPS],
}

impl Default for SaveSteps {
    fn default() -> Self {
        SaveSteps {
            len: 0,
            steps: [("", Duration::ZERO); MAX_STEPS],
        }
    }
}

impl SaveSteps {
    /// Forgets the steps recorded so far.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Records a step (drops it once the array is full).
    pub fn push(&mut self, what: &'static str, took: Duration) {
        if let Some(slot) = self.steps.get_mut(self.len) {
            *slot = (what, took);
            self.len += 1;
        }
    }

    /// The steps, in the order they ran.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, Duration)> + '_ {
        self.steps[..self.len].iter().copied()
    }
}

/// Runs one ioctl of a save and records its duration under `what`.
fn timed<T>(
    steps: &mut SaveSteps,
    what: &'static str,
    f: impl FnOnce() -> Result<T, kvm_ioctls::Error>,
) -> Result<T, VcpuStateError> {
    let t = Instant::now();
    let r = f();
    steps.push(what, t.elapsed());
    ioctl(what, r)
}

/// Whether a vCPU in this state can never run at CPL0, whatever its code does, until its state
/// is set from outside: then what only CPL0 can change (XCR0 by XSETBV, DR0-7 by MOV DR) keeps
/// the value it had when it was last read. It runs at CPL3; the IDT, GDT and LDT have limits of
/// 0, so no gate, task or code descriptor fits in them and every exception or interrupt ends in
/// a triple fault, as does an INT n or a far call or jump through a gate; SYSCALL is off
/// (EFER.SCE) and SYSENTER has no code segment (SYSENTER_CS 0); and there is no in-kernel
/// LAPIC (KVM injects no interrupt or INIT, and we inject none). A CPL3 guest cannot change any
/// of these (LIDT, LGDT, LLDT, WRMSR need CPL0), so once true it stays true. The built-in
/// guests start so (`boot::longmode`); on this PVM host a CPL3 XSETBV, MOV DR7, SYSCALL,
/// SYSENTER, INT3, INT n, UD2, #DE or TF single step each ended the VM with a shutdown exit.
pub fn confined_to_cpl3(sregs: &kvm_sregs, msrs: &[(u32, u64)], lapic: bool) -> bool {
    let sysenter_cs = msrs.iter().find(|(i, _)| *i == MSR_SYSENTER_CS);
    !lapic
        && sregs.ss.dpl == 3
        && sregs.cs.selector & 3 == 3
        && sregs.idt.limit == 0
        && sregs.gdt.limit == 0
        && sregs.ldt.limit == 0
        && sregs.efer & EFER_SCE == 0
        && matches!(sysenter_cs, Some((_, cs)) if cs & 0xfffc == 0)
}

/// What a vCPU thread keeps from one save to the next: the XCRs and debug registers, read while
/// the vCPU was [confined to CPL3](confined_to_cpl3).
#[derive(Clone, Copy, Debug, Default)]
pub struct ExitSaveCache {
    cpl0_only: Option<(Option<kvm_xcrs>, kvm_debugregs)>,
}

/// How [`KvmVcpu::save_timed`] reads the state.
#[derive(Debug)]
pub enum SaveFrom<'a> {
    /// One ioctl per part (what [`Persist::save`] does): the reference.
    Ioctls,
    /// A vCPU thread saving at a pause, with fewer ioctls (each costs ~5 us on PVM whatever it
    /// copies): the x87/SSE block is read out of the XSAVE area when there is one; without an
    /// in-kernel LAPIC the MP state is `KVM_MP_STATE_RUNNABLE`, which KVM never changes then (a
    /// HLT exits to us instead of halting, and only the LAPIC's INIT/SIPI and SMM move it); and
    /// while the vCPU is [confined to CPL3](confined_to_cpl3) the XCRs and debug registers come
    /// from `cache`, read at the first such save of the thread.
    Pause {
        /// This vCPU thread's cache.
        cache: &'a mut ExitSaveCache,
    },
}

/// A vCPU's file descriptor together with what the host lets us save of it.
pub struct KvmVcpu<'a> {
    /// The vCPU.
    pub fd: &'a VcpuFd,
    /// MSRs this host can read and write (probed once per VM).
    pub msrs: &'a [u32],
    /// Whether KVM_GET_XSAVE works here.
    pub xsave: bool,
    /// Whether the VM has an in-kernel LAPIC.
    pub lapic: bool,
}

impl KvmVcpu<'_> {
    /// Which of [`MSRS_OF_INTEREST`] this vCPU lets us read (PVM refuses some).
    pub fn probe_msrs(fd: &VcpuFd) -> Vec<u32> {
        MSRS_OF_INTEREST
            .iter()
            .copied()
            .filter(|&i| {
                let Ok(mut m) = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
                    index: i,
                    ..Default::default()
                }]) else {
                    return false;
                };
                fd.get_msrs(&mut m) == Ok(1)
            })
            .collect()
    }

    /// Saves the vCPU's state (see [`SaveFrom`]), recording how long each ioctl took in `steps`.
    pub fn save_timed(
        &self,
        from: SaveFrom<'_>,
        steps: &mut SaveSteps,
    ) -> Result<VcpuState, VcpuStateError> {
        let fd = self.fd;
        let entries: Vec<_> = self
            .msrs
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::Msrs {
            done: 0,
            wanted: entries.len(),
        })?;
        let done = timed(steps, "KVM_GET_MSRS", || fd.get_msrs(&mut msrs))?;
        if done != entries.len() {
            return Err(VcpuStateError::Msrs {
                done,
                wanted: entries.len(),
            });
        }
        let xsave = if self.xsave {
            Some(XsaveArea(
                timed(steps, "KVM_GET_XSAVE", || fd.get_xsave())?.region,
            ))
        } else {
            None
        };
        let msrs: Vec<(u32, u64)> = msrs.as_slice().iter().map(|e| (e.index, e.data)).collect();
        let lapic = if self.lapic {
            Some(timed(steps, "KVM_GET_LAPIC", || fd.get_lapic())?)
        } else {
            None
        };
        let regs = timed(steps, "KVM_GET_REGS", || fd.get_regs())?;
        let sregs = timed(steps, "KVM_GET_SREGS", || fd.get_sregs())?;
        let events = timed(steps, "KVM_GET_VCPU_EVENTS", || fd.get_vcpu_events())?;
        let cache = match from {
            SaveFrom::Pause { cache } => Some(cache),
            SaveFrom::Ioctls => None,
        };
        let from_exit = cache.is_some();
        let confined = from_exit && confined_to_cpl3(&sregs, &msrs, self.lapic);
        let (xcrs, debugregs) = match cache {
            Some(ExitSaveCache {
                cpl0_only: Some(kept),
            }) if confined => *kept,
            cache => {
                let xcrs = if self.xsave {
                    Some(timed(steps, "KVM_GET_XCRS", || fd.get_xcrs())?)
                } else {
                    None
                };
                let debugregs = timed(steps, "KVM_GET_DEBUGREGS", || fd.get_debug_regs())?;
                if let Some(cache) = cache {
                    cache.cpl0_only = confined.then_some((xcrs, debugregs));
                }
                (xcrs, debugregs)
            }
        };
        let fpu = match &xsave {
            Some(x) if from_exit => x.fpu(),
            _ => timed(steps, "KVM_GET_FPU", || fd.get_fpu())?,
        };
        let mp_state = if from_exit && !self.lapic {
            kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            }
        } else {
            timed(steps, "KVM_GET_MP_STATE", || fd.get_mp_state())?
        };
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debugregs,
            events,
            mp_state,
            lapic,
            msrs,
        })
    }
}

impl Persist for KvmVcpu<'_> {
    type State = VcpuState;
    type Error = VcpuStateError;

    fn save(&self) -> Result<VcpuState, VcpuStateError> {
        self.save_timed(SaveFrom::Ioctls, &mut SaveSteps::default())
    }

    fn restore(&mut self, s: &VcpuState) -> Result<(), VcpuStateError> {
        let fd = self.fd;
        ioctl("KVM_SET_MP_STATE", fd.set_mp_state(s.mp_state))?;
        ioctl("KVM_SET_SREGS", fd.set_sregs(&s.sregs))?;
        ioctl("KVM_SET_REGS", fd.set_regs(&s.regs))?;
        match (&s.xsave, self.xsave) {
            (Some(x), true) => {
                let x = x.to_kvm();
                // SAFETY: `x` is a full legacy `kvm_xsave` (the 4 KiB region); KVM_SET_XSAVE
                // without KVM_CAP_XSAVE2 reads exactly that struct, so nothing past it is read.
                ioctl("KVM_SET_XSAVE", unsafe { fd.set_xsave(&x) })?;
            }
            _ => ioctl("KVM_SET_FPU", fd.set_fpu(&s.fpu))?,
        }
        if let (Some(x), true) = (&s.xcrs, self.xsave) {
            ioctl("KVM_SET_XCRS", fd.set_xcrs(x))?;
        }
        ioctl("KVM_SET_DEBUGREGS", fd.set_debug_regs(&s.debugregs))?;
        if let (Some(l), true) = (&s.lapic, self.lapic) {
            ioctl("KVM_SET_LAPIC", fd.set_lapic(l))?;
        }
        let entries: Vec<_> = s
            .msrs
            .iter()
            .filter(|(i, _)| self.msrs.contains(i))
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::Msrs {
            done: 0,
            wanted: entries.len(),
        })?;
        let done = ioctl("KVM_SET_MSRS", fd.set_msrs(&msrs))?;
        if done != entries.len() {
            return Err(VcpuStateError::Msrs {
                done,
                wanted: entries.len(),
            });
        }
        ioctl("KVM_SET_VCPU_EVENTS", fd.set_vcpu_events(&s.events))?;
        Ok(())
    }
}
