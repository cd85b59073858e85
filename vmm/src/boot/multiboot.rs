//! Multiboot v1 loader, enough to run the reference guest of `shared/anchors/qemu/bare/` the way
//! QEMU's `-kernel` does.
//!
//! The image is an ELF (32- or 64-bit) with a multiboot header in its first 8 KiB; its PT_LOAD
//! segments are copied to their physical addresses. (An a.out-kludge header, flag bit 16, is
//! honoured too.) The guest starts in 32-bit protected mode without paging at CPL0, with
//! EAX = 0x2BADB002 and EBX = the multiboot information structure:
//!
//! ```text
//!  MBI_GPA + 0   flags        bit 0 mem_lower/upper, bit 2 cmdline, bit 6 mmap
//!          + 4   mem_lower    KiB below 1 MiB (640)
//!          + 8   mem_upper    KiB above 1 MiB
//!          + 16  cmdline      -> CMDLINE_GPA, NUL terminated
//!          + 44  mmap_length
//!          + 48  mmap_addr    -> MMAP_GPA: {size=20, base u64, len u64, type u32} entries
//! ```

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::memory::{GuestMemory, MemoryError};

const HEADER_MAGIC: u32 = 0x1BAD_B002;
const BOOT_MAGIC: u64 = 0x2BAD_B002;
const MBI_GPA: u64 = 0x9000;
const MMAP_GPA: u64 = 0x9400;
const CMDLINE_GPA: u64 = 0x9800;
const CMDLINE_MAX: usize = 0x800 - 1;

/// Why an image could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum MultibootError {
    #[error("no multiboot v1 header in the first 8 KiB of the image")]
    NoHeader,
    #[error("the multiboot header checksum is wrong")]
    Checksum,
    #[error("the image is neither ELF nor has an a.out-kludge multiboot header")]
    NotElf,
    #[error("malformed image: {0}")]
    Malformed(&'static str),
    #[error("the command line is {0} bytes; at most 2047 fit")]
    CmdlineTooLong(usize),
    #[error("a segment does not fit in guest memory")]
    Memory(#[source] MemoryError),
}

/// Where the loaded guest starts.
#[derive(Clone, Copy, Debug)]
pub struct MultibootEntry {
    /// First instruction (32-bit protected mode).
    pub entry: u64,
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// Loads `image` into `mem`, writes the multiboot information with `cmdline`.
pub fn load(
    mem: &GuestMemory,
    image: &[u8],
    cmdline: &str,
) -> Result<MultibootEntry, MultibootError> {
    let hdr = (0..image.len().min(8192).saturating_sub(11))
        .step_by(4)
        .find(|&o| u32_at(image, o) == Some(HEADER_MAGIC))
        .ok_or(MultibootError::NoHeader)?;
    let flags = u32_at(image, hdr + 4).ok_or(MultibootError::NoHeader)?;
    let sum = u32_at(image, hdr + 8).ok_or(MultibootError::NoHeader)?;
    if HEADER_MAGIC.wrapping_add(flags).wrapping_add(sum) != 0 {
        return Err(MultibootError::Checksum);
    }
    let entry = if flags & (1 << 16) != 0 {
        load_aout_kludge(mem, image, hdr)?
    } else {
        load_elf(mem, image)?
    };
    if cmdline.len() > CMDLINE_MAX {
        return Err(MultibootError::CmdlineTooLong(cmdline.len()));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write(CMDLINE_GPA, &c).map_err(MultibootError::Memory)?;

    let size = mem.size();
    let mut mmap = Vec::new();
    for (base, len, kind) in [(0u64, 0x9_fc00u64, 1u32), (0x10_0000, size - 0x10_0000, 1)] {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&kind.to_le_bytes());
    }
    mem.write(MMAP_GPA, &mmap).map_err(MultibootError::Memory)?;
    let mut mbi = [0u8; 52];
    let put =
        |mbi: &mut [u8; 52], o: usize, v: u32| mbi[o..o + 4].copy_from_slice(&v.to_le_bytes());
    put(&mut mbi, 0, 1 | (1 << 2) | (1 << 6));
    put(&mut mbi, 4, 640);
    put(
        &mut mbi,
        8,
        ((size - 0x10_0000) / 1024).min(u32::MAX as u64) as u32,
    );
    put(&mut mbi, 16, CMDLINE_GPA as u32);
    put(&mut mbi, 44, mmap.len() as u32);
    put(&mut mbi, 48, MMAP_GPA as u32);
    mem.write(MBI_GPA, &mbi).map_err(MultibootError::Memory)?;
    Ok(MultibootEntry { entry })
}

fn load_aout_kludge(mem: &GuestMemory, image: &[u8], hdr: usize) -> Result<u64, MultibootError> {
    let f = |i: usize| u32_at(image, hdr + 12 + 4 * i).ok_or(MultibootError::NoHeader);
    let (header_addr, load_addr, load_end, bss_end, entry) = (f(0)?, f(1)?, f(2)?, f(3)?, f(4)?);
    let offset = (hdr as u64)
        .checked_sub(u64::from(header_addr.wrapping_sub(load_addr)))
        .ok_or(MultibootError::Malformed("load address after header"))? as usize;
    let end = if load_end == 0 {
        image.len()
    } else {
        offset + load_end.saturating_sub(load_addr) as usize
    };
    let data = image
        .get(offset..end.min(image.len()))
        .ok_or(MultibootError::Malformed("load range outside the file"))?;
    mem.write(u64::from(load_addr), data)
        .map_err(MultibootError::Memory)?;
    if bss_end > load_end && load_end != 0 {
        let zeros = vec![0u8; (bss_end - load_end) as usize];
        mem.write(u64::from(load_end), &zeros)
            .map_err(MultibootError::Memory)?;
    }
    Ok(u64::from(entry))
}

fn load_elf(mem: &GuestMemory, image: &[u8]) -> Result<u64, MultibootError> {
    if image.get(..4) != Some(b"\x7fELF") {
        return Err(MultibootError::NotElf);
    }
    let bad = MultibootError::Malformed("truncated ELF header");
    let is64 = match image.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err(MultibootError::Malformed("unknown ELF class")),
    };
    let (entry, phoff, phentsize, phnum) = if is64 {
        (
            u64_at(image, 24).ok_or(bad)?,
            u64_at(image, 32).ok_or(MultibootError::Malformed("phoff"))? as usize,
            u16_at(image, 54).ok_or(MultibootError::Malformed("phentsize"))? as usize,
            u16_at(image, 56).ok_or(MultibootError::Malformed("phnum"))? as usize,
        )
    } else {
        (
            u64::from(u32_at(image, 24).ok_or(bad)?),
            u32_at(image, 28).ok_or(MultibootError::Malformed("phoff"))? as usize,
            u16_at(image, 42).ok_or(MultibootError::Malformed("phentsize"))? as usize,
            u16_at(image, 44).ok_or(MultibootError::Malformed("phnum"))? as usize,
        )
    };
    for i in 0..phnum {
        let ph = phoff
            .checked_add(
                i.checked_mul(phentsize)
                    .ok_or(MultibootError::Malformed("ph"))?,
            )
            .ok_or(MultibootError::Malformed("ph"))?;
        let trunc = || MultibootError::Malformed("truncated program header");
        let kind = u32_at(image, ph).ok_or_else(trunc)?;
        if kind != 1 {
            continue; // PT_LOAD only
        }
        let (offset, paddr, filesz, memsz) = if is64 {
            (
                u64_at(image, ph + 8).ok_or_else(trunc)?,
                u64_at(image, ph + 24).ok_or_else(trunc)?,
                u64_at(image, ph + 32).ok_or_else(trunc)?,
                u64_at(image, ph + 40).ok_or_else(trunc)?,
            )
        } else {
            (
                u64::from(u32_at(image, ph + 4).ok_or_else(trunc)?),
                u64::from(u32_at(image, ph + 12).ok_or_else(trunc)?),
                u64::from(u32_at(image, ph + 16).ok_or_else(trunc)?),
                u64::from(u32_at(image, ph + 20).ok_or_else(trunc)?),
            )
        };
        if filesz > memsz || memsz > mem.size() {
            return Err(MultibootError::Malformed("segment sizes"));
        }
        let data = image
            .get(offset as usize..(offset + filesz) as usize)
            .ok_or(MultibootError::Malformed("segment outside the file"))?;
        mem.write(paddr, data).map_err(MultibootError::Memory)?;
        if memsz > filesz {
            let zeros = vec![0u8; (memsz - filesz) as usize];
            mem.write(paddr + filesz, &zeros)
                .map_err(MultibootError::Memory)?;
        }
    }
    Ok(entry)
}

fn flat32(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Adjusts fresh `sregs` for the multiboot hand-off: flat 32-bit protected mode, no paging.
pub fn setup_sregs(sregs: &mut kvm_sregs) {
    sregs.cs = flat32(0x08, 11);
    let d = flat32(0x10, 3);
    sregs.ds = d;
    sregs.es = d;
    sregs.fs = d;
    sregs.gs = d;
    sregs.ss = d;
    sregs.cr0 = (sregs.cr0 | 1) & !(1 << 31);
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// Registers at the multiboot entry.
pub fn initial_regs(entry: &MultibootEntry) -> kvm_regs {
    kvm_regs {
        rip: entry.entry,
        rax: BOOT_MAGIC,
        rbx: MBI_GPA,
        rflags: 0x2,
        ..Default::default()
    }
}
