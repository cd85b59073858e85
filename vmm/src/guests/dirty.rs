//! `dirty`: writes whole 4 KiB pages of realistic content at a paced rate.
//!
//! Each write picks a page of the working set (pages `0..n` from `DATA_GPA`) by the pattern,
//! picks a content kind by the mix, overwrites the whole page with it, then increments the
//! progress counter (pages written):
//!
//! ```text
//! entry:  [workload id] = "DIRTY"; [progress] = 0; [rng] = seed; [cursor] = 0; pace_init
//! loop:   pace (rate > 0 only: wait for the 1 ms tick that allows one more page)
//!         page = sequential: [cursor]++ mod n
//!                random:     uniform in 0..n
//!                hotcold:    hot_writes% of the time uniform in 0..h, else in h..n
//!                            (h = max(1, n * hot_set% / 100), the first pages are the hot ones)
//!         kind = rng % 100 against the cumulative mix percentages
//!         fill the page: zero     all zero
//!                        dup      template t in 0..4: xorshift64 stream from a fixed seed,
//!                                 each word's high half zero (binary-like, identical copies)
//!                        text     words from a 32-word list, each followed by a space,
//!                                 1 in 8 by a newline instead; the tail is spaces and `\n`
//!                        random   xorshift64 stream seeded from the PRNG
//!         [progress] += 1; jmp loop
//! ```
//!
//! Pacing is the guest's own, on an absolute rdtsc schedule in 1 ms ticks (see
//! [`Asm::pace`]): drift-free, at most 100 ms of backlog caught up after a stall.
//!
//! State lives in the control block (progress, pacing origin, PRNG state, sequential cursor)
//! and in registers, so a guest restored from memory and registers simply continues.

use iced_x86::code_asm::*;

use super::asm::{cb, Asm, Image, R};
use super::layout::{
    DATA_GPA, DIRTY_CURSOR_OFFSET, PAGE_SIZE, PROGRESS_OFFSET, RNG_STATE_OFFSET, WORKLOAD_ID_DIRTY,
    WORKLOAD_ID_OFFSET,
};
use super::params::{DirtyParams, Pattern};

/// Seeds of the `dup` template pages.
pub const TEMPLATE_SEEDS: [u64; 4] = [
    0x7e3a_1c5d_0b9f_2468,
    0x1357_9bdf_2468_ace0,
    0xdead_beef_cafe_f00d,
    0x0123_4567_89ab_cdef,
];

/// The words of `text` pages (32 of them, each at most 15 bytes).
pub const TEXT_WORDS: [&str; 32] = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "with",
    "as",
    "was",
    "on",
    "be",
    "at",
    "by",
    "replication",
    "memory",
    "page",
    "checkpoint",
    "backup",
    "primary",
    "vcpu",
    "guest",
    "kernel",
    "network",
    "latency",
    "ledger",
    "version",
    "dirty",
    "epoch",
    "socket",
];

/// Emits the `dirty` program for `tsc_khz`; returns the code image.
pub fn emit(p: &DirtyParams, tsc_khz: u64) -> R<Image> {
    let n = p.pages();
    let mut asm = Asm::new()?;
    let mut fill_zero = asm.label();
    let mut fill_dup = asm.label();
    let mut fill_text = asm.label();
    let mut fill_random = asm.label();

    // Entry: initialise the control block.
    asm.park_secondary_vcpus()?;
    asm.a.mov(rax, WORKLOAD_ID_DIRTY)?;
    asm.a.mov(cb(WORKLOAD_ID_OFFSET), rax)?;
    asm.a.mov(cb(PROGRESS_OFFSET), 0)?;
    asm.a.mov(rax, p.seed)?;
    asm.a.mov(cb(RNG_STATE_OFFSET), rax)?;
    asm.a.mov(cb(DIRTY_CURSOR_OFFSET), 0)?;
    if p.rate > 0 {
        asm.pace_init()?;
    }

    let mut top = asm.label();
    asm.loop_top(p.rate, tsc_khz, &mut top)?;
    emit_pick_page(&mut asm, p.pattern, n)?; // rbx = page index
    asm.a.shl(rbx, 12)?;
    asm.a.add(rbx, DATA_GPA as i32)?;

    // Content kind.
    let mut written = asm.label();
    asm.rng_next()?;
    asm.scale_rax_high32(100)?;
    let mix = p.mix;
    let kinds: Vec<(u8, CodeLabel)> = [
        (mix.zero, fill_zero),
        (mix.dup, fill_dup),
        (mix.text, fill_text),
        (mix.random, fill_random),
    ]
    .into_iter()
    .filter(|(pct, _)| *pct > 0)
    .collect();
    let mut threshold = 0u32;
    for (i, &(pct, fill)) in kinds.iter().enumerate() {
        asm.a.mov(rdi, rbx)?;
        if i + 1 == kinds.len() {
            asm.a.call(fill)?; // the last kind takes the rest
            break;
        }
        threshold += u32::from(pct);
        let mut next = asm.label();
        asm.a.cmp(eax, threshold)?;
        asm.a.jae(next)?;
        asm.a.call(fill)?;
        asm.a.jmp(written)?;
        asm.bind(&mut next)?;
    }
    asm.bind(&mut written)?;
    asm.a.inc(cb(PROGRESS_OFFSET))?;
    asm.a.jmp(top)?;

    asm.bind(&mut fill_zero)?;
    emit_fill_zero(&mut asm)?;
    asm.bind(&mut fill_dup)?;
    emit_fill_dup(&mut asm)?;
    asm.bind(&mut fill_text)?;
    emit_fill_text(&mut asm)?;
    asm.bind(&mut fill_random)?;
    emit_fill_random(&mut asm)?;
    asm.finish()
}

/// `rbx` = index of the page to write next.
fn emit_pick_page(asm: &mut Asm, pattern: Pattern, n: u64) -> R {
    match pattern {
        Pattern::Sequential => {
            let mut no_wrap = asm.label();
            let a = &mut asm.a;
            a.mov(rbx, cb(DIRTY_CURSOR_OFFSET))?;
            a.lea(rax, qword_ptr(rbx + 1))?;
            a.cmp(rax, n as i32)?;
            a.jb(no_wrap)?;
            a.xor(eax, eax)?;
            a.set_label(&mut no_wrap)?;
            a.mov(cb(DIRTY_CURSOR_OFFSET), rax)?;
        }
        Pattern::Random => {
            asm.rng_next()?;
            asm.scale_rax_high32(n)?;
            asm.a.mov(rbx, rax)?;
        }
        Pattern::HotCold {
            hot_set_pct,
            hot_writes_pct,
        } => {
            let hot = (n * u64::from(hot_set_pct) / 100).clamp(1, n);
            let cold = n - hot;
            let mut done = asm.label();
            asm.rng_next()?;
            asm.a.mov(rbx, rax)?;
            // low 32 bits -> 0..100 decides hot or cold; high 32 bits pick the page.
            asm.a.mov(eax, eax)?;
            asm.a.imul_3(rax, rax, 100)?;
            asm.a.shr(rax, 32)?;
            asm.a.mov(rcx, rax)?;
            asm.a.mov(rax, rbx)?;
            if cold > 0 {
                let mut hot_page = asm.label();
                asm.a.cmp(ecx, u32::from(hot_writes_pct))?;
                asm.a.jb(hot_page)?;
                asm.scale_rax_high32(cold)?;
                asm.a.lea(rbx, qword_ptr(rax + hot as i32))?;
                asm.a.jmp(done)?;
                asm.bind(&mut hot_page)?;
            }
            asm.scale_rax_high32(hot)?;
            asm.a.mov(rbx, rax)?;
            asm.bind(&mut done)?;
        }
    }
    Ok(())
}

/// One xorshift64 step on `r` (`r ^= r << 13; r ^= r >> 7; r ^= r << 17`), using `tmp`.
fn xorshift(a: &mut CodeAssembler, r: AsmRegister64, tmp: AsmRegister64) -> R {
    a.mov(tmp, r)?;
    a.shl(tmp, 13)?;
    a.xor(r, tmp)?;
    a.mov(tmp, r)?;
    a.shr(tmp, 7)?;
    a.xor(r, tmp)?;
    a.mov(tmp, r)?;
    a.shl(tmp, 17)?;
    a.xor(r, tmp)
}

/// fill_zero(rdi = page).
fn emit_fill_zero(asm: &mut Asm) -> R {
    let a = &mut asm.a;
    a.xor(eax, eax)?;
    a.mov(ecx, (PAGE_SIZE / 8) as u32)?;
    a.rep().stosq()?;
    a.ret()
}

/// fill_dup(rdi = page): one of the template pages.
fn emit_fill_dup(asm: &mut Asm) -> R {
    let seeds: Vec<u8> = TEMPLATE_SEEDS
        .iter()
        .flat_map(|s| s.to_le_bytes())
        .collect();
    let table = asm.data(&seeds);
    asm.rng_next()?;
    let mut word = asm.label();
    let a = &mut asm.a;
    a.shr(rax, 62)?; // template 0..4
    a.lea(rsi, ptr(table))?;
    a.mov(rax, qword_ptr(rsi + rax * 8))?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut word)?;
    xorshift(a, rax, rdx)?;
    a.mov(edx, eax)?; // high half zero
    a.mov(qword_ptr(rdi + rcx * 8), rdx)?;
    a.inc(ecx)?;
    a.cmp(ecx, (PAGE_SIZE / 8) as u32)?;
    a.jb(word)?;
    a.ret()
}

/// fill_random(rdi = page): an xorshift64 stream seeded from the PRNG.
fn emit_fill_random(asm: &mut Asm) -> R {
    asm.rng_next()?;
    let mut word = asm.label();
    let a = &mut asm.a;
    a.or(rax, 1)?; // xorshift state must not be 0
    a.xor(ecx, ecx)?;
    a.set_label(&mut word)?;
    xorshift(a, rax, rdx)?;
    a.mov(qword_ptr(rdi + rcx * 8), rax)?;
    a.inc(ecx)?;
    a.cmp(ecx, (PAGE_SIZE / 8) as u32)?;
    a.jb(word)?;
    a.ret()
}

/// fill_text(rdi = page): words and spaces, lines of about eight words.
fn emit_fill_text(asm: &mut Asm) -> R {
    // 16-byte slots: the word, then spaces; and the length of each word plus one space.
    let mut slots = Vec::with_capacity(TEXT_WORDS.len() * 16);
    let mut lens = Vec::with_capacity(TEXT_WORDS.len());
    for w in TEXT_WORDS {
        assert!(w.len() < 16);
        let mut slot = [b' '; 16];
        slot[..w.len()].copy_from_slice(w.as_bytes());
        slots.extend_from_slice(&slot);
        lens.push(w.len() as u8 + 1);
    }
    let words = asm.data(&slots);
    let word_lens = asm.data(&lens);
    asm.rng_next()?;
    let mut word = asm.label();
    let mut tail = asm.label();
    let mut tail_loop = asm.label();
    let mut tail_done = asm.label();
    let a = &mut asm.a;
    a.mov(r9, rax)?;
    a.or(r9, 1)?;
    a.lea(r10, ptr(words))?;
    a.lea(r11, ptr(word_lens))?;
    a.lea(r8, qword_ptr(rdi + (PAGE_SIZE - 16) as i32))?; // last start of a 16-byte copy
    a.set_label(&mut word)?;
    a.cmp(rdi, r8)?;
    a.ja(tail)?;
    xorshift(a, r9, rax)?;
    a.mov(eax, r9d)?;
    a.and(eax, 31)?;
    a.mov(ecx, eax)?;
    a.shl(ecx, 4)?;
    a.mov(rdx, qword_ptr(r10 + rcx))?;
    a.mov(qword_ptr(rdi), rdx)?;
    a.mov(rdx, qword_ptr(r10 + rcx + 8))?;
    a.mov(qword_ptr(rdi + 8), rdx)?;
    a.movzx(ecx, byte_ptr(r11 + rax))?;
    a.add(rdi, rcx)?;
    a.test(r9d, 0x700)?; // 1 in 8 words ends its line
    a.jnz(word)?;
    a.mov(byte_ptr(rdi - 1), b'\n' as u32)?;
    a.jmp(word)?;
    a.set_label(&mut tail)?;
    a.add(r8, 16)?; // end of the page
    a.set_label(&mut tail_loop)?;
    a.cmp(rdi, r8)?;
    a.jae(tail_done)?;
    a.mov(byte_ptr(rdi), b' ' as u32)?;
    a.inc(rdi)?;
    a.jmp(tail_loop)?;
    a.set_label(&mut tail_done)?;
    a.mov(byte_ptr(r8 - 1), b'\n' as u32)?;
    a.ret()
}
