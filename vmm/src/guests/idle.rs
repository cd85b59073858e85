//! `idle`: a guest that does (almost) nothing.
//!
//! CPL3 code cannot `hlt`, so it spins: `spins` `pause` instructions, then one increment of the
//! progress counter, forever. It dirties only the control block page, so an idle VM replicates
//! one page per epoch.
//!
//! ```text
//! entry:  [workload id] = "IDLE"; [progress] = 0
//! loop:   ecx = spins; do pause while --ecx; [progress] += 1; jmp loop
//! ```

use iced_x86::code_asm::*;

use super::asm::{cb, Asm, Image, R};
use super::layout::{PROGRESS_OFFSET, WORKLOAD_ID_IDLE, WORKLOAD_ID_OFFSET};
use super::params::IdleParams;

/// Emits the `idle` program; returns the code image.
pub fn emit(p: &IdleParams) -> R<Image> {
    let mut asm = Asm::new()?;
    asm.park_secondary_vcpus()?;
    let a = &mut asm.a;
    a.mov(rax, WORKLOAD_ID_IDLE)?;
    a.mov(cb(WORKLOAD_ID_OFFSET), rax)?;
    a.mov(cb(PROGRESS_OFFSET), 0)?;
    let mut outer = a.create_label();
    let mut spin = a.create_label();
    a.set_label(&mut outer)?;
    a.mov(ecx, p.spins)?;
    a.set_label(&mut spin)?;
    a.pause()?;
    a.dec(ecx)?;
    a.jnz(spin)?;
    a.inc(cb(PROGRESS_OFFSET))?;
    a.jmp(outer)?;
    asm.finish()
}
