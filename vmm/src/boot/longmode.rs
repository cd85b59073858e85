//! Long mode at CPL3 (MACHINE.md: on PVM hosts CPL3 code runs at native speed, CPL0 ~35x slower).
//!
//! Identity page tables with 2 MiB pages and the user bit, CS = 0x1b / SS = 0x23 (DPL 3),
//! RFLAGS.IOPL = 3 so that `in`/`out` work. No GDT is needed in guest memory because the guest
//! never reloads a segment register.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::guests::layout::{PDPT_GPA, PD_GPA, PML4_GPA, STACK_TOP};
use crate::memory::{GuestMemory, MemoryError};

const PTE_PRESENT_RW_USER: u64 = 0x7;
const PDE_2M: u64 = 0x87;
const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writes identity page tables covering `[0, memory size)` (rounded up to 2 MiB, at most 4 GiB).
pub fn write_page_tables(mem: &GuestMemory) -> Result<(), MemoryError> {
    let two_mib = 2u64 << 20;
    let pages_2m = mem.size().div_ceil(two_mib).min(4 * 512);
    let pds = pages_2m.div_ceil(512);
    mem.write(PML4_GPA, &(PDPT_GPA | PTE_PRESENT_RW_USER).to_le_bytes())?;
    let mut pdpt = [0u8; 4096];
    for i in 0..pds {
        let e = (PD_GPA + i * 4096) | PTE_PRESENT_RW_USER;
        pdpt[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&e.to_le_bytes());
    }
    mem.write(PDPT_GPA, &pdpt)?;
    let mut pd = vec![0u8; (pds * 4096) as usize];
    for i in 0..pages_2m {
        let e = (i * two_mib) | PDE_2M;
        pd[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&e.to_le_bytes());
    }
    mem.write(PD_GPA, &pd)
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Adjusts `sregs` (as read from a fresh vCPU) for CPL3 long mode.
pub fn setup_sregs(sregs: &mut kvm_sregs) {
    sregs.cs = segment(0x1b, 11, true);
    let data = segment(0x23, 3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 |= CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET | CR0_NE;
    sregs.efer |= EFER_LME | EFER_LMA;
    // No descriptor table the guest could fill in: with limits of 0 (KVM's reset values are
    // 0xffff at base 0, a page the CPL3 guest can write) no gate, task or segment descriptor
    // fits, so every exception, INT n or far call ends in a triple fault instead of CPL0 code.
    // The guests never load a segment. This is what makes the vCPU confined to CPL3
    // (`state::vcpu::confined_to_cpl3`), which lets a pause skip reading what only CPL0 changes.
    sregs.gdt.limit = 0;
    sregs.idt.limit = 0;
    sregs.ldt.limit = 0;
}

/// Registers at the guest's first instruction.
pub fn initial_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: STACK_TOP,
        rflags: 0x2 | (3 << 12),
        ..Default::default()
    }
}

/// Code for vCPUs other than the first under a built-in workload: `pause` in a loop at CPL3.
pub fn park_loop() -> Vec<u8> {
    use iced_x86::code_asm::CodeAssembler;
    let assemble = || -> Result<Vec<u8>, iced_x86::IcedError> {
        let mut a = CodeAssembler::new(64)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.pause()?;
        a.jmp(top)?;
        a.assemble(crate::guests::layout::AP_PARK_GPA)
    };
    assemble().expect("a two-instruction loop always assembles")
}
