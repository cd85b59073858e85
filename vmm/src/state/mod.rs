//! VM state: what it takes to continue a CPL3 guest exactly, saved component by component and
//! serialised as one versioned blob.
//!
//! The blob is opaque to the wire protocol; it is versioned on its own (`STATE_VERSION`), apart
//! from the memory stream.
//!
//! ```text
//!  offset  size  field
//!  0       8     magic  "USVMSTAT"
//!  8       2     version (little endian; this build writes STATE_VERSION, reads it and the one before)
//!  10      2     flags (0)
//!  12      4     payload length in bytes
//!  16      4     CRC-32 of the payload
//!  20      4     reserved (0)
//!  24      ...   payload: sections, each
//!                  tag u16 | reserved u16 | length u32 | bytes
//!                VM (once), then VCPU (one per vCPU, in id order), then SERIAL (once),
//!                then (version 2) CONSOLE: the console bytes the guest wrote in the epoch
//!                this state closes, not yet released to the outside
//!
//!  CONSOLE section, version 3            CONSOLE section, version 2
//!    known u8 (0 or 1)                     length u32 | bytes
//!    offset u64 (0 unless known)
//!    length u32 | bytes
//!
//!  offset: where the first of these bytes sits in the VM's console stream (every byte the
//!  guest has written since boot, counted from 0); with it, a console sink keyed by offset
//!  stores a byte written twice (by the old primary and by the promoted VM) once.
//!  A version 2 blob decodes with the offset unknown.
//! ```
//!
//! Decoding checks the magic, the version, the declared length against a caller-set limit
//! *before* reading the payload, the CRC, and every section length; it never panics on input.

pub mod vcpu;

pub use vcpu::{VcpuState, VcpuStateError};

use vm_superio::serial::SerialState;

use crate::memory::RegionSpec;

/// The state format this build writes (2 adds the CONSOLE section, 3 the console bytes' offset
/// in the VM's console stream).
pub const STATE_VERSION: u16 = 3;
/// The oldest state format this build reads (the one before `STATE_VERSION`).
pub const STATE_VERSION_MIN: u16 = 2;
/// Default upper bound on a blob's size when decoding.
pub const DEFAULT_STATE_LIMIT: usize = 1 << 20;

const MAGIC: &[u8; 8] = b"USVMSTAT";
const HEADER: usize = 24;
const TAG_VM: u16 = 1;
const TAG_VCPU: u16 = 2;
const TAG_SERIAL: u16 = 3;
const TAG_CONSOLE: u16 = 4;
/// Upper bound on the console bytes of one epoch in a state blob.
const MAX_CONSOLE: usize = 256 << 10;
const MAX_VCPUS: usize = 64;
const MAX_REGIONS: usize = 64;

/// Saves and restores one component of a VM (a vCPU, a device).
pub trait Persist {
    /// The component's saved state.
    type State;
    /// What can go wrong.
    type Error;
    /// Captures the component's state (the VM must be paused).
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Puts a saved state back into the component.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

/// Everything besides guest memory.
#[derive(Clone, Debug, PartialEq)]
pub struct VmState {
    /// Guest memory layout (the memory itself travels separately).
    pub regions: Vec<RegionSpec>,
    /// TSC frequency the guest was started with, in kHz.
    pub tsc_khz: u32,
    /// Whether the VM has an in-kernel interrupt controller (multiboot guests).
    pub irqchip: bool,
    /// One state per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialState,
    /// Console bytes written in the epoch this state closes (output commit: a promoted replica
    /// emits them if the old primary never released them). Empty outside replication.
    pub console: Vec<u8>,
    /// Offset of `console[0]` in the VM's console stream (bytes the guest has written since
    /// boot); with `console` empty, the offset of the next byte. `None` from a format 2 blob.
    pub console_offset: Option<u64>,
}

/// Why a state blob was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateDecodeError {
    #[error("state blob is {0} bytes, shorter than its header")]
    Truncated(usize),
    #[error("not a VM state blob (bad magic)")]
    Magic,
    #[error("state format version {found} is not supported (this build reads {min}..={max})")]
    Version { found: u16, min: u16, max: u16 },
    #[error("state blob has flags {flags:#x} / reserved {reserved:#x} this build does not know")]
    Flags { flags: u16, reserved: u32 },
    #[error("state blob declares {declared} bytes, above the limit of {limit}")]
    TooLarge { declared: usize, limit: usize },
    #[error("state blob declares {declared} payload bytes but carries {actual}")]
    Length { declared: usize, actual: usize },
    #[error("state blob checksum mismatch (corrupted in transit or on disk)")]
    Checksum,
    #[error("malformed state section: {0}")]
    Section(&'static str),
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
}

impl VmState {
    /// Serialises the state into a blob.
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Writer::default();
        payload.section(TAG_VM, |w| {
            w.u32(self.tsc_khz);
            w.u8(self.irqchip as u8);
            w.u32(self.regions.len() as u32);
            for r in &self.regions {
                w.u64(r.gpa);
                w.u64(r.size);
            }
        });
        for v in &self.vcpus {
            payload.section(TAG_VCPU, |w| v.encode(w));
        }
        payload.section(TAG_SERIAL, |w| encode_serial(&self.serial, w));
        payload.section(TAG_CONSOLE, |w| {
            w.u8(self.console_offset.is_some() as u8);
            w.u64(self.console_offset.unwrap_or(0));
            w.bytes(&self.console)
        });
        let payload = payload.0;
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Parses a blob, refusing anything over `limit` bytes.
    pub fn decode(blob: &[u8], limit: usize) -> Result<Self, StateDecodeError> {
        if blob.len() < HEADER {
            return Err(StateDecodeError::Truncated(blob.len()));
        }
        if &blob[..8] != MAGIC {
            return Err(StateDecodeError::Magic);
        }
        let version = u16::from_le_bytes([blob[8], blob[9]]);
        if !(STATE_VERSION_MIN..=STATE_VERSION).contains(&version) {
            return Err(StateDecodeError::Version {
                found: version,
                min: STATE_VERSION_MIN,
                max: STATE_VERSION,
            });
        }
        let flags = u16::from_le_bytes([blob[10], blob[11]]);
        let reserved = u32::from_le_bytes(blob[20..24].try_into().expect("4 bytes"));
        if flags != 0 || reserved != 0 {
            return Err(StateDecodeError::Flags { flags, reserved });
        }
        let declared = u32::from_le_bytes(blob[12..16].try_into().expect("4 bytes")) as usize;
        if declared.saturating_add(HEADER) > limit {
            return Err(StateDecodeError::TooLarge {
                declared: declared + HEADER,
                limit,
            });
        }
        let payload = &blob[HEADER..];
        if payload.len() != declared {
            return Err(StateDecodeError::Length {
                declared,
                actual: payload.len(),
            });
        }
        let crc = u32::from_le_bytes(blob[16..20].try_into().expect("4 bytes"));
        if crc32fast::hash(payload) != crc {
            return Err(StateDecodeError::Checksum);
        }

        let mut r = Reader(payload);
        let mut vm = r.section(TAG_VM)?;
        let tsc_khz = vm.u32()?;
        let irqchip = vm.u8()? != 0;
        let n = vm.u32()? as usize;
        if n == 0 || n > MAX_REGIONS {
            return Err(StateDecodeError::Section("region count out of range"));
        }
        let mut regions = Vec::with_capacity(n);
        for _ in 0..n {
            regions.push(RegionSpec {
                gpa: vm.u64()?,
                size: vm.u64()?,
            });
        }
        vm.end()?;
        let mut vcpus = Vec::new();
        while r.peek_tag() == Some(TAG_VCPU) {
            if vcpus.len() == MAX_VCPUS {
                return Err(StateDecodeError::Section("too many vCPUs"));
            }
            let mut s = r.section(TAG_VCPU)?;
            vcpus.push(VcpuState::decode(&mut s)?);
            s.end()?;
        }
        if vcpus.is_empty() {
            return Err(StateDecodeError::Section("no vCPU state"));
        }
        let mut s = r.section(TAG_SERIAL)?;
        let serial = decode_serial(&mut s)?;
        s.end()?;
        let mut c = r.section(TAG_CONSOLE)?;
        let console_offset = if version >= 3 {
            let known = c.u8()?;
            let offset = c.u64()?;
            match (known, offset) {
                (1, o) => Some(o),
                (0, 0) => None,
                _ => return Err(StateDecodeError::Section("console offset malformed")),
            }
        } else {
            None
        };
        let console = c.bytes(MAX_CONSOLE)?.to_vec();
        c.end()?;
        if console_offset.is_some_and(|o| o.checked_add(console.len() as u64).is_none()) {
            return Err(StateDecodeError::Section("console offset out of range"));
        }
        r.end()?;
        Ok(VmState {
            regions,
            tsc_khz,
            irqchip,
            vcpus,
            serial,
            console,
            console_offset,
        })
    }
}

fn encode_serial(s: &SerialState, w: &mut Writer) {
    for b in [
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ] {
        w.u8(b);
    }
    w.bytes(&s.in_buffer);
}

fn decode_serial(r: &mut Reader<'_>) -> Result<SerialState, StateDecodeError> {
    let mut b = [0u8; 9];
    for x in &mut b {
        *x = r.u8()?;
    }
    let in_buffer = r.bytes(64)?.to_vec();
    Ok(SerialState {
        baud_divisor_low: b[0],
        baud_divisor_high: b[1],
        interrupt_enable: b[2],
        interrupt_identification: b[3],
        line_control: b[4],
        line_status: b[5],
        modem_control: b[6],
        modem_status: b[7],
        scratch: b[8],
        in_buffer,
    })
}

/// Little-endian writer for state sections.
#[derive(Default)]
pub struct Writer(Vec<u8>);

impl Writer {
    fn section(&mut self, tag: u16, f: impl FnOnce(&mut Writer)) {
        let mut inner = Writer::default();
        f(&mut inner);
        self.u16(tag);
        self.u16(0);
        self.u32(inner.0.len() as u32);
        self.0.extend_from_slice(&inner.0);
    }
    /// Appends a byte.
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    /// Appends a u16.
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a u32.
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a u64.
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a length-prefixed byte string.
    pub fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
}

/// Bounds-checked little-endian reader for state sections.
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateDecodeError> {
        if self.0.len() < n {
            return Err(StateDecodeError::Section("section shorter than its fields"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn peek_tag(&self) -> Option<u16> {
        (self.0.len() >= 2).then(|| u16::from_le_bytes([self.0[0], self.0[1]]))
    }
    fn section(&mut self, tag: u16) -> Result<Reader<'a>, StateDecodeError> {
        if self.u16()? != tag {
            return Err(StateDecodeError::Section("unexpected section"));
        }
        self.u16()?;
        let len = self.u32()? as usize;
        Ok(Reader(self.take(len)?))
    }
    fn end(&self) -> Result<(), StateDecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(StateDecodeError::Section("trailing bytes"))
        }
    }
    /// Reads a byte.
    pub fn u8(&mut self) -> Result<u8, StateDecodeError> {
        Ok(self.take(1)?[0])
    }
    /// Reads a u16.
    pub fn u16(&mut self) -> Result<u16, StateDecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    /// Reads a u32.
    pub fn u32(&mut self) -> Result<u32, StateDecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    /// Reads a u64.
    pub fn u64(&mut self) -> Result<u64, StateDecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    /// Reads a length-prefixed byte string of at most `max` bytes.
    pub fn bytes(&mut self, max: usize) -> Result<&'a [u8], StateDecodeError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(StateDecodeError::Section("byte string over its limit"));
        }
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        VmState {
            regions: vec![RegionSpec {
                gpa: 0,
                size: 16 << 20,
            }],
            tsc_khz: 2_600_000,
            irqchip: false,
            vcpus: vec![VcpuState::default()],
            serial: SerialState::default(),
            console: b"tick 1 ok\n".to_vec(),
            console_offset: Some(4096),
        }
    }

    /// A format 2 blob (no console offset) as a build before format 3 wrote it.
    fn encode_v2(s: &VmState) -> Vec<u8> {
        let v3 = s.encode();
        let payload = &v3[HEADER..];
        // The CONSOLE section is last: tag, reserved, length, then known u8 and offset u64.
        let console_at = payload.len() - (8 + 1 + 8 + 4 + s.console.len());
        let mut p = payload[..console_at].to_vec();
        let mut w = Writer::default();
        w.section(TAG_CONSOLE, |w| w.bytes(&s.console));
        p.extend_from_slice(&w.0);
        let mut out = v3[..HEADER].to_vec();
        out[8..10].copy_from_slice(&2u16.to_le_bytes());
        out[12..16].copy_from_slice(&(p.len() as u32).to_le_bytes());
        out[16..20].copy_from_slice(&crc32fast::hash(&p).to_le_bytes());
        out.extend_from_slice(&p);
        out
    }

    #[test]
    fn reads_format_2_with_the_console_offset_unknown() {
        let s = sample();
        let old = VmState::decode(&encode_v2(&s), DEFAULT_STATE_LIMIT).unwrap();
        assert_eq!(old.console, s.console);
        assert_eq!(old.console_offset, None);
        assert_eq!(
            VmState {
                console_offset: Some(4096),
                ..old
            },
            s
        );
    }

    #[test]
    fn an_unknown_console_offset_round_trips() {
        let s = VmState {
            console_offset: None,
            ..sample()
        };
        let blob = s.encode();
        assert_eq!(VmState::decode(&blob, DEFAULT_STATE_LIMIT).unwrap(), s);
    }

    #[test]
    fn refuses_format_1_and_console_offsets_that_overflow() {
        let mut b = sample().encode();
        b[8..10].copy_from_slice(&1u16.to_le_bytes());
        assert!(matches!(
            VmState::decode(&b, DEFAULT_STATE_LIMIT),
            Err(StateDecodeError::Version { found: 1, .. })
        ));
        let s = VmState {
            console_offset: Some(u64::MAX - 3),
            ..sample()
        };
        assert_eq!(
            VmState::decode(&s.encode(), DEFAULT_STATE_LIMIT),
            Err(StateDecodeError::Section("console offset out of range"))
        );
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let blob = s.encode();
        assert_eq!(VmState::decode(&blob, DEFAULT_STATE_LIMIT).unwrap(), s);
    }

    #[test]
    fn refuses_bad_blobs_without_panicking() {
        let blob = sample().encode();
        for len in 0..blob.len() {
            assert!(VmState::decode(&blob[..len], DEFAULT_STATE_LIMIT).is_err());
        }
        for i in 0..blob.len() {
            let mut b = blob.clone();
            b[i] ^= 0x10;
            assert!(
                VmState::decode(&b, DEFAULT_STATE_LIMIT).is_err(),
                "flip at {i}"
            );
        }
        let mut b = blob.clone();
        b[8] = 9;
        assert!(matches!(
            VmState::decode(&b, DEFAULT_STATE_LIMIT),
            Err(StateDecodeError::Version { found: 9, .. })
        ));
        assert!(matches!(
            VmState::decode(&blob, 100),
            Err(StateDecodeError::TooLarge { .. })
        ));
    }
}
