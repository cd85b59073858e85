//! Code-generation helpers shared by the guests: a thin wrapper around iced-x86's
//! `CodeAssembler` with a small runtime library (console output, PRNG, pacing, exit).
//!
//! Conventions of the generated code:
//! - Library routines (`call`ed) may clobber `rax`, `rcx`, `rdx`, `rsi`, `rdi`, `r8`..`r11`
//!   and flags; they preserve `rbx`, `rbp`, `r12`..`r15`. Callers keep loop state in the latter
//!   or in the control block.
//! - Control-block fields are addressed absolutely (`[CONTROL_GPA + offset]`, a disp32).
//! - Read-only data (strings, tables) lives in the code image after the code, addressed
//!   RIP-relative.

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use super::layout::{
    CODE_GPA, COM1_PORT, CONTROL_GPA, EXIT_PORT, PACE_ORIGIN_COUNT_OFFSET, PACE_ORIGIN_TSC_OFFSET,
    PACE_REBASES_OFFSET, PROGRESS_OFFSET, RNG_STATE_OFFSET, STACK_TOP,
};
use super::model::GOLDEN;
use super::GuestBuildError;

/// Most work a paced guest catches up after falling behind (a paused vCPU, a slow stretch), in
/// milliseconds of its schedule. See [`Asm::pace`].
pub const MAX_BACKLOG_MS: u64 = 100;

/// Memory operand for a u64 field of the control block.
pub fn cb(offset: u64) -> AsmMemoryOperand {
    qword_ptr(CONTROL_GPA + offset)
}

/// Maps an assembler error into a build error.
pub fn asm_err(e: IcedError) -> GuestBuildError {
    GuestBuildError::Assemble(e.to_string())
}

/// Short alias for the result of emitting code.
pub type R<T = ()> = Result<T, IcedError>;

/// An assembled guest: the image and where its instructions end (data follows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Code and data, to load at CODE_GPA.
    pub bytes: Vec<u8>,
    /// Length of the instruction part; `bytes[text_len..]` is read-only data.
    pub text_len: usize,
}

/// An assembler with the guests' runtime library.
pub struct Asm {
    /// The underlying assembler; emit instructions with `asm.a.mov(...)` etc.
    pub a: CodeAssembler,
    strings: Vec<(CodeLabel, Vec<u8>)>,
    print_bytes: CodeLabel,
    print_dec: CodeLabel,
    print_hex: CodeLabel,
    rng_next: CodeLabel,
    mix64: CodeLabel,
    hex_digits: CodeLabel,
}

impl Asm {
    /// A new 64-bit assembler.
    pub fn new() -> R<Self> {
        let mut a = CodeAssembler::new(64)?;
        let print_bytes = a.create_label();
        let print_dec = a.create_label();
        let print_hex = a.create_label();
        let rng_next = a.create_label();
        let mix64 = a.create_label();
        let hex_digits = a.create_label();
        Ok(Asm {
            a,
            strings: Vec::new(),
            print_bytes,
            print_dec,
            print_hex,
            rng_next,
            mix64,
            hex_digits,
        })
    }

    /// A fresh label.
    pub fn label(&mut self) -> CodeLabel {
        self.a.create_label()
    }

    /// Binds `label` to the current position.
    pub fn bind(&mut self, label: &mut CodeLabel) -> R {
        self.a.set_label(label)
    }

    /// A label of read-only `bytes` placed after the code.
    pub fn data(&mut self, bytes: &[u8]) -> CodeLabel {
        let label = self.a.create_label();
        self.strings.push((label, bytes.to_vec()));
        label
    }

    /// Prints a fixed string. Clobbers the library's scratch registers.
    pub fn print_str(&mut self, s: &str) -> R {
        let label = self.data(s.as_bytes());
        self.a.lea(rsi, ptr(label))?;
        self.a.mov(ecx, s.len() as u32)?;
        self.a.call(self.print_bytes)
    }

    /// Prints `rax` in decimal. Clobbers the library's scratch registers.
    pub fn print_dec_rax(&mut self) -> R {
        self.a.call(self.print_dec)
    }

    /// Prints `rax` as 16 hex digits (no prefix). Clobbers the library's scratch registers.
    pub fn print_hex_rax(&mut self) -> R {
        self.a.call(self.print_hex)
    }

    /// `rax` = next output of the splitmix64 PRNG whose state is in the control block.
    /// Clobbers `rdx`.
    pub fn rng_next(&mut self) -> R {
        self.a.call(self.rng_next)
    }

    /// `rax` = `mix64(rax)` (the splitmix64 finalizer). Clobbers `rdx`.
    pub fn mix64(&mut self) -> R {
        self.a.call(self.mix64)
    }

    /// `rax` = a uniform integer in `0..n` from the high 32 bits of `rax` (multiply-shift,
    /// no division). `n` must be below 2^31.
    pub fn scale_rax_high32(&mut self, n: u64) -> R {
        debug_assert!(n < 1 << 31);
        self.a.shr(rax, 32)?;
        self.a.imul_3(rax, rax, n as i32)?;
        self.a.shr(rax, 32)
    }

    /// Stops the VM: `out EXIT_PORT, eax` with `code`, then spins forever should the VMM ever
    /// resume the vCPU.
    pub fn exit(&mut self, code: u32) -> R {
        self.a.mov(eax, code)?;
        self.a.mov(dx, EXIT_PORT as u32)?;
        self.a.out(dx, eax)?;
        let mut spin = self.label();
        self.bind(&mut spin)?;
        self.a.pause()?;
        self.a.jmp(spin)
    }

    /// `rax` = TSC. Clobbers `rdx`.
    pub fn rdtsc64(&mut self) -> R {
        self.a.rdtsc()?;
        self.a.shl(rdx, 32)?;
        self.a.or(rax, rdx)
    }

    /// Entry guard: only the vCPU that starts with `RSP = STACK_TOP` (vCPU 0; the VMM gives
    /// the others lower stacks) runs the workload; any other vCPU spins on `pause` forever
    /// without touching memory, so the single-threaded guests stay correct with `--vcpus > 1`.
    pub fn park_secondary_vcpus(&mut self) -> R {
        let mut first = self.label();
        let mut spin = self.label();
        self.a.cmp(rsp, STACK_TOP as i32)?;
        self.a.je(first)?;
        self.bind(&mut spin)?;
        self.a.pause()?;
        self.a.jmp(spin)?;
        self.bind(&mut first)
    }

    /// Starts the pacing schedule at the current TSC and progress count.
    pub fn pace_init(&mut self) -> R {
        self.rdtsc64()?;
        self.a.mov(cb(PACE_ORIGIN_TSC_OFFSET), rax)?;
        self.a.mov(rax, cb(PROGRESS_OFFSET))?;
        self.a.mov(cb(PACE_ORIGIN_COUNT_OFFSET), rax)?;
        self.a.mov(cb(PACE_REBASES_OFFSET), 0)
    }

    /// Waits until the schedule allows one more unit of work (a page, a step): returns when
    /// `progress < target`, where
    ///
    /// ```text
    /// t      = (tsc - origin_tsc) / tsc_khz          whole milliseconds since the origin
    /// target = origin_count + rate * t / 1000
    /// ```
    ///
    /// The schedule is absolute, so it does not drift: after `t` ms exactly `rate * t / 1000`
    /// units have been allowed, however late each one ran. Work is released in 1 ms ticks.
    ///
    /// Catch-up is bounded: a guest more than [`MAX_BACKLOG_MS`] behind (its vCPU was paused,
    /// the host was busy) moves the origin to `now - MAX_BACKLOG_MS` and keeps its count, so
    /// after any stall it catches up at most 100 ms worth of work at full speed and then goes
    /// on at the rate, instead of bursting through the whole stall. A guest more than
    /// [`MAX_BACKLOG_MS`] *ahead* (the TSC went backwards, e.g. restored on another host)
    /// restarts the schedule at `now`. Both count in the control block's pace-rebases field.
    ///
    /// Clobbers `rax`, `rcx`, `rdx`, `rsi`. The TSC frequency is baked in; a guest restored on
    /// a host with another TSC frequency runs at a correspondingly scaled rate.
    ///
    /// `top` is bound to the first instruction (the loop's own label, which callers may share as
    /// the top of their main loop).
    pub fn pace(&mut self, rate: u64, tsc_khz: u64, top: &mut CodeLabel) -> R {
        debug_assert!(rate > 0 && rate <= i32::MAX as u64 && tsc_khz > 0);
        let max_lag = rate * MAX_BACKLOG_MS / 1000;
        let a = &mut self.a;
        let top_label = *top;
        let mut behind = a.create_label();
        let mut ahead = a.create_label();
        let mut go = a.create_label();
        a.set_label(top)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(rsi, rax)?; // rsi = now
        a.sub(rax, cb(PACE_ORIGIN_TSC_OFFSET))?;
        a.jb(ahead)?; // now < origin: the TSC went backwards
        a.xor(edx, edx)?;
        a.mov(ecx, tsc_khz as u32)?;
        a.div(rcx)?; // rax = whole ms since origin
        a.imul_3(rax, rax, rate as i32)?;
        a.xor(edx, edx)?;
        a.mov(ecx, 1000)?;
        a.div(rcx)?;
        a.add(rax, cb(PACE_ORIGIN_COUNT_OFFSET))?; // rax = target
        a.mov(rdx, cb(PROGRESS_OFFSET))?; // rdx = done
        a.mov(rcx, rdx)?;
        a.add(rcx, max_lag as i32)?;
        a.cmp(rax, rcx)?;
        a.ja(behind)?; // target > done + max_lag
        a.mov(rcx, rax)?;
        a.add(rcx, max_lag as i32)?;
        a.cmp(rdx, rcx)?;
        a.ja(ahead)?; // done > target + max_lag
        a.cmp(rdx, rax)?;
        a.jb(go)?;
        a.pause()?;
        a.jmp(top_label)?;

        // More than MAX_BACKLOG_MS behind: keep exactly MAX_BACKLOG_MS of backlog.
        a.set_label(&mut behind)?;
        a.mov(rax, cb(PROGRESS_OFFSET))?;
        a.mov(cb(PACE_ORIGIN_COUNT_OFFSET), rax)?;
        a.mov(rax, MAX_BACKLOG_MS * tsc_khz)?;
        a.sub(rsi, rax)?;
        a.mov(cb(PACE_ORIGIN_TSC_OFFSET), rsi)?;
        a.inc(cb(PACE_REBASES_OFFSET))?;
        a.jmp(top_label)?;

        // Ahead of the schedule by more than MAX_BACKLOG_MS: restart it now.
        a.set_label(&mut ahead)?;
        a.mov(cb(PACE_ORIGIN_TSC_OFFSET), rsi)?;
        a.mov(rax, cb(PROGRESS_OFFSET))?;
        a.mov(cb(PACE_ORIGIN_COUNT_OFFSET), rax)?;
        a.inc(cb(PACE_REBASES_OFFSET))?;
        a.jmp(top_label)?;

        a.set_label(&mut go)
    }

    /// Binds `top` and, for a paced guest (`rate > 0`), emits [`Asm::pace`] there.
    pub fn loop_top(&mut self, rate: u64, tsc_khz: u64, top: &mut CodeLabel) -> R {
        if rate > 0 {
            self.pace(rate, tsc_khz, top)
        } else {
            self.bind(top)
        }
    }

    /// Emits the runtime library and the data, and assembles the image for [`CODE_GPA`].
    pub fn finish(mut self) -> R<Image> {
        self.emit_library()?;
        // Data: the hex digits first (its label marks the end of the instructions), then the
        // strings and tables.
        self.a.set_label(&mut self.hex_digits)?;
        self.a.db(b"0123456789abcdef")?;
        let strings = std::mem::take(&mut self.strings);
        for (mut label, bytes) in strings {
            self.a.set_label(&mut label)?;
            self.a.db(&bytes)?;
        }
        let result = self.a.assemble_options(
            CODE_GPA,
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )?;
        let text_len = (result.label_ip(&self.hex_digits)? - CODE_GPA) as usize;
        Ok(Image {
            bytes: result.inner.code_buffer,
            text_len,
        })
    }

    fn emit_library(&mut self) -> R {
        // print_bytes(rsi = data, rcx = length)
        {
            let a = &mut self.a;
            a.set_label(&mut self.print_bytes)?;
            let mut top = a.create_label();
            let mut done = a.create_label();
            a.mov(dx, COM1_PORT as u32)?;
            a.set_label(&mut top)?;
            a.test(rcx, rcx)?;
            a.jz(done)?;
            a.mov(al, byte_ptr(rsi))?;
            a.out(dx, al)?;
            a.inc(rsi)?;
            a.dec(rcx)?;
            a.jmp(top)?;
            a.set_label(&mut done)?;
            a.ret()?;
        }
        // print_dec(rax): digits into a buffer below the return address, then print_bytes.
        {
            let print_bytes = self.print_bytes;
            let a = &mut self.a;
            a.set_label(&mut self.print_dec)?;
            let mut digit = a.create_label();
            a.mov(rdi, rsp)?; // end of the buffer (exclusive)
            a.sub(rsp, 32)?;
            a.mov(r8, rdi)?;
            a.mov(ecx, 10)?;
            a.set_label(&mut digit)?;
            a.xor(edx, edx)?;
            a.div(rcx)?;
            a.add(edx, b'0' as i32)?;
            a.dec(rdi)?;
            a.mov(byte_ptr(rdi), dl)?;
            a.test(rax, rax)?;
            a.jnz(digit)?;
            a.mov(rsi, rdi)?;
            a.mov(rcx, r8)?;
            a.sub(rcx, rdi)?;
            a.call(print_bytes)?;
            a.add(rsp, 32)?;
            a.ret()?;
        }
        // print_hex(rax): 16 lower-case hex digits.
        {
            let print_bytes = self.print_bytes;
            let hex_digits = self.hex_digits;
            let a = &mut self.a;
            a.set_label(&mut self.print_hex)?;
            let mut digit = a.create_label();
            a.sub(rsp, 24)?; // buffer [rsp, rsp + 16)
            a.lea(r9, ptr(hex_digits))?;
            a.lea(rdi, qword_ptr(rsp + 16))?;
            a.set_label(&mut digit)?;
            a.mov(edx, eax)?;
            a.and(edx, 15)?;
            a.movzx(edx, byte_ptr(r9 + rdx))?;
            a.dec(rdi)?;
            a.mov(byte_ptr(rdi), dl)?;
            a.shr(rax, 4)?;
            a.cmp(rdi, rsp)?;
            a.ja(digit)?;
            a.mov(rsi, rsp)?;
            a.mov(ecx, 16)?;
            a.call(print_bytes)?;
            a.add(rsp, 24)?;
            a.ret()?;
        }
        // rng_next: state += GOLDEN; rax = mix64(state)  (splitmix64)
        {
            let mix = self.mix64;
            let a = &mut self.a;
            a.set_label(&mut self.rng_next)?;
            a.mov(rax, cb(RNG_STATE_OFFSET))?;
            a.mov(rdx, GOLDEN)?;
            a.add(rax, rdx)?;
            a.mov(cb(RNG_STATE_OFFSET), rax)?;
            a.jmp(mix)?; // tail call
        }
        // mix64(rax) -> rax, clobbers rdx. Must match `model::mix64`.
        {
            let a = &mut self.a;
            a.set_label(&mut self.mix64)?;
            a.mov(rdx, rax)?;
            a.shr(rdx, 30)?;
            a.xor(rax, rdx)?;
            a.mov(rdx, 0xbf58_476d_1ce4_e5b9u64)?;
            a.imul_2(rax, rdx)?;
            a.mov(rdx, rax)?;
            a.shr(rdx, 27)?;
            a.xor(rax, rdx)?;
            a.mov(rdx, 0x94d0_49bb_1331_11ebu64)?;
            a.imul_2(rax, rdx)?;
            a.mov(rdx, rax)?;
            a.shr(rdx, 31)?;
            a.xor(rax, rdx)?;
            a.ret()?;
        }
        Ok(())
    }
}
