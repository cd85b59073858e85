//! `ledger`: a self-checking guest. It keeps a version per page and a running checksum, and
//! re-verifies the whole invariant every `verify_every` steps.
//!
//! Memory (see [`super::model`] for the exact functions, which the Rust model shares):
//! - ledger pages `0..pages` at `DATA_GPA + i * 4096`: word 0 = version `v`, word 1 = index `i`,
//!   words 2..512 = `seed(i, v) + j * LEDGER_WORD_STEP`;
//! - control block: steps (= progress, +0x00), ticks (+0x38), running checksum (+0x40,
//!   wrapping sum of `seed(i, v_i)`), PRNG state (+0x28), pacing origin (+0x10, +0x18).
//!
//! ```text
//! entry:  [id] = "LEDGER"; steps = ticks = 0; rng = seed; checksum = 0
//!         for i in 0..pages: write page i at version 0; checksum += seed(i, 0)
//!         print "ledger pages=.. verify-every=.. rate=..\n"; pace_init
//! step:   pace (rate > 0 only)
//!         i = scale(rng_next(), pages); v = page[i].word0           (the version is re-read
//!         checksum -= seed(i, v)                                      from the page itself)
//!         write page i at version v + 1; checksum += seed(i, v + 1)
//!         steps += 1
//!         if steps % verify_every == 0: verify; ticks += 1; print "tick <ticks> ok\n"
//!                                       if ticks == stop_after_ticks: out EXIT_PORT, 0
//! verify: for every page: word 1 == i and words 2.. match word 0's version, else
//!             "CORRUPT page=<i> version=<v> word=<j> expected=0x.. found=0x.. steps=<n>"
//!         sum of seeds == checksum, else "CORRUPT checksum running=0x.. computed=0x.. steps=<n>"
//!         sum of versions == steps, else "CORRUPT versions sum=<s> steps=<n>"
//!         (each followed by out EXIT_PORT, 1)
//! ```
//!
//! Consistency: all state is in guest memory (control block, pages, stack) or registers, and
//! the program is deterministic given them; the TSC only paces it. So memory and registers
//! captured at any instruction boundary and restored elsewhere continue the run exactly, with
//! the same sequence of steps and ticks. A snapshot whose memory is *not* from one instant is
//! caught at the next verification: a page that reverted to an older (self-consistent) version
//! no longer matches the checksum nor the step count, and a torn page fails the word check.

use iced_x86::code_asm::*;

use super::asm::{cb, Asm, Image, R};
use super::layout::{
    DATA_GPA, EXIT_CORRUPT, LEDGER_CHECKSUM_OFFSET, LEDGER_RNG_OFFSET, LEDGER_STEPS_OFFSET,
    LEDGER_TICKS_OFFSET, WORKLOAD_ID_LEDGER, WORKLOAD_ID_OFFSET,
};
use super::model::{LEDGER_IDX_MUL, LEDGER_SALT, LEDGER_WORD_STEP, WORDS_PER_PAGE};
use super::params::LedgerParams;

/// Emits the `ledger` program for `tsc_khz`; returns the code image.
pub fn emit(p: &LedgerParams, tsc_khz: u64) -> R<Image> {
    let mut asm = Asm::new()?;
    let mut page_seed = asm.label();
    let mut write_page = asm.label();
    let mut verify = asm.label();
    let pages = p.pages as i32;

    // Entry: control block and all pages at version 0.
    asm.park_secondary_vcpus()?;
    {
        let a = &mut asm.a;
        a.mov(rax, WORKLOAD_ID_LEDGER)?;
        a.mov(cb(WORKLOAD_ID_OFFSET), rax)?;
        a.mov(cb(LEDGER_STEPS_OFFSET), 0)?;
        a.mov(cb(LEDGER_TICKS_OFFSET), 0)?;
        a.mov(cb(LEDGER_CHECKSUM_OFFSET), 0)?;
        a.mov(rax, p.seed)?;
        a.mov(cb(LEDGER_RNG_OFFSET), rax)?;
        let mut init = a.create_label();
        a.xor(r12d, r12d)?;
        a.set_label(&mut init)?;
        a.mov(rdi, r12)?;
        a.xor(esi, esi)?;
        a.call(write_page)?;
        a.add(cb(LEDGER_CHECKSUM_OFFSET), rax)?;
        a.inc(r12)?;
        a.cmp(r12, pages)?;
        a.jb(init)?;
    }
    asm.print_str(&format!(
        "ledger pages={} verify-every={} rate={}\n",
        p.pages, p.verify_every, p.rate
    ))?;
    if p.rate > 0 {
        asm.pace_init()?;
    }

    // The step loop.
    let mut top = asm.label();
    asm.loop_top(p.rate, tsc_khz, &mut top)?;
    asm.rng_next()?;
    asm.scale_rax_high32(p.pages)?;
    {
        let a = &mut asm.a;
        a.mov(r12, rax)?; // page index
        a.mov(r13, r12)?;
        a.shl(r13, 12)?;
        a.add(r13, DATA_GPA as i32)?;
        a.mov(r14, qword_ptr(r13))?; // its current version, from the page
        a.mov(rdi, r12)?;
        a.mov(rsi, r14)?;
        a.call(page_seed)?;
        a.sub(cb(LEDGER_CHECKSUM_OFFSET), rax)?;
        a.mov(rdi, r12)?;
        a.lea(rsi, qword_ptr(r14 + 1))?;
        a.call(write_page)?;
        a.add(cb(LEDGER_CHECKSUM_OFFSET), rax)?;
        a.inc(cb(LEDGER_STEPS_OFFSET))?;
        a.mov(rax, cb(LEDGER_STEPS_OFFSET))?;
        a.xor(edx, edx)?;
        a.mov(ecx, p.verify_every as u32)?;
        a.div(rcx)?;
        a.test(rdx, rdx)?;
        a.jnz(top)?;
        a.call(verify)?;
        a.inc(cb(LEDGER_TICKS_OFFSET))?;
    }
    asm.print_str("tick ")?;
    asm.a.mov(rax, cb(LEDGER_TICKS_OFFSET))?;
    asm.print_dec_rax()?;
    asm.print_str(" ok\n")?;
    if p.stop_after_ticks > 0 {
        asm.a
            .cmp(cb(LEDGER_TICKS_OFFSET), p.stop_after_ticks as i32)?;
        asm.a.jb(top)?;
        asm.exit(0)?;
    } else {
        asm.a.jmp(top)?;
    }

    // page_seed(rdi = index, rsi = version) -> rax; clobbers rdx. Matches `model::page_seed`.
    asm.bind(&mut page_seed)?;
    asm.a.mov(rax, LEDGER_IDX_MUL)?;
    asm.a.imul_2(rax, rdi)?;
    asm.a.add(rax, rsi)?;
    asm.a.mov(rdx, LEDGER_SALT)?;
    asm.a.xor(rax, rdx)?;
    asm.mix64()?;
    asm.a.ret()?;

    // write_page(rdi = index, rsi = version) -> rax = seed; clobbers rcx, rdx, r8, r9.
    {
        let a = &mut asm.a;
        a.set_label(&mut write_page)?;
        a.call(page_seed)?;
        a.mov(r8, rdi)?;
        a.shl(r8, 12)?;
        a.add(r8, DATA_GPA as i32)?;
        a.mov(qword_ptr(r8), rsi)?;
        a.mov(qword_ptr(r8 + 8), rdi)?;
        a.mov(r9, LEDGER_WORD_STEP)?;
        a.lea(rdx, qword_ptr(rax + r9 * 2))?;
        a.mov(ecx, 2)?;
        let mut word = a.create_label();
        a.set_label(&mut word)?;
        a.mov(qword_ptr(r8 + rcx * 8), rdx)?;
        a.add(rdx, r9)?;
        a.inc(ecx)?;
        a.cmp(ecx, WORDS_PER_PAGE as u32)?;
        a.jb(word)?;
        a.ret()?;
    }

    asm.bind(&mut verify)?;
    emit_verify(&mut asm, pages, page_seed)?;
    asm.finish()
}

/// verify(): checks every page, the checksum and the version sum; returns only if all hold,
/// otherwise prints a CORRUPT line and stops the VM with EXIT_CORRUPT. Preserves the
/// callee-saved registers.
fn emit_verify(asm: &mut Asm, pages: i32, page_seed: CodeLabel) -> R {
    let mut page = asm.label();
    let mut word = asm.label();
    let mut bad_word = asm.label();
    let mut bad_checksum = asm.label();
    let mut bad_versions = asm.label();
    let saved = [rbx, rbp, r12, r13, r14, r15];
    {
        let a = &mut asm.a;
        for r in saved {
            a.push(r)?;
        }
        a.xor(r12d, r12d)?; // page index
        a.xor(r14d, r14d)?; // sum of seeds
        a.xor(r15d, r15d)?; // sum of versions
        a.set_label(&mut page)?;
        a.mov(r13, r12)?;
        a.shl(r13, 12)?;
        a.add(r13, DATA_GPA as i32)?;
        a.mov(rbx, qword_ptr(r13))?; // version
        a.add(r15, rbx)?;
        a.mov(ecx, 1)?;
        a.mov(rdx, r12)?;
        a.cmp(qword_ptr(r13 + 8), r12)?;
        a.jne(bad_word)?;
        a.mov(rdi, r12)?;
        a.mov(rsi, rbx)?;
        a.call(page_seed)?;
        a.add(r14, rax)?;
        a.mov(r9, LEDGER_WORD_STEP)?;
        a.lea(rdx, qword_ptr(rax + r9 * 2))?;
        a.mov(ecx, 2)?;
        a.set_label(&mut word)?;
        a.cmp(qword_ptr(r13 + rcx * 8), rdx)?;
        a.jne(bad_word)?;
        a.add(rdx, r9)?;
        a.inc(ecx)?;
        a.cmp(ecx, WORDS_PER_PAGE as u32)?;
        a.jb(word)?;
        a.inc(r12)?;
        a.cmp(r12, pages)?;
        a.jb(page)?;
        a.cmp(r14, cb(LEDGER_CHECKSUM_OFFSET))?;
        a.jne(bad_checksum)?;
        a.cmp(r15, cb(LEDGER_STEPS_OFFSET))?;
        a.jne(bad_versions)?;
        for r in saved.iter().rev() {
            a.pop(*r)?;
        }
        a.ret()?;
    }

    // r12 = page, rbx = version, rcx = word, rdx = expected, found = [r13 + rcx * 8]
    asm.bind(&mut bad_word)?;
    asm.a.mov(rbp, rcx)?;
    asm.a.mov(r14, rdx)?;
    asm.a.mov(r15, qword_ptr(r13 + rcx * 8))?;
    asm.print_str("CORRUPT page=")?;
    asm.a.mov(rax, r12)?;
    asm.print_dec_rax()?;
    asm.print_str(" version=")?;
    asm.a.mov(rax, rbx)?;
    asm.print_dec_rax()?;
    asm.print_str(" word=")?;
    asm.a.mov(rax, rbp)?;
    asm.print_dec_rax()?;
    asm.print_str(" expected=0x")?;
    asm.a.mov(rax, r14)?;
    asm.print_hex_rax()?;
    asm.print_str(" found=0x")?;
    asm.a.mov(rax, r15)?;
    asm.print_hex_rax()?;
    emit_steps_and_exit(asm)?;

    asm.bind(&mut bad_checksum)?;
    asm.print_str("CORRUPT checksum running=0x")?;
    asm.a.mov(rax, cb(LEDGER_CHECKSUM_OFFSET))?;
    asm.print_hex_rax()?;
    asm.print_str(" computed=0x")?;
    asm.a.mov(rax, r14)?;
    asm.print_hex_rax()?;
    emit_steps_and_exit(asm)?;

    asm.bind(&mut bad_versions)?;
    asm.print_str("CORRUPT versions sum=")?;
    asm.a.mov(rax, r15)?;
    asm.print_dec_rax()?;
    emit_steps_and_exit(asm)
}

/// Prints ` steps=<n>\n` and stops the VM with EXIT_CORRUPT.
fn emit_steps_and_exit(asm: &mut Asm) -> R {
    asm.print_str(" steps=")?;
    asm.a.mov(rax, cb(LEDGER_STEPS_OFFSET))?;
    asm.print_dec_rax()?;
    asm.print_str("\n")?;
    asm.exit(EXIT_CORRUPT)
}
