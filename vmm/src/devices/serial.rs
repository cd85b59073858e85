//! COM1 (a 16550 UART from vm-superio) whose output passes through an [`OutputGate`].
//!
//! Output commit: every byte the guest writes is tagged with the epoch in which it was written.
//! The epoch of the bytes written since the last capture is `current`; a capture *seals* it
//! (`seal()` returns E and moves on to E+1). The owner releases bytes up to an epoch once the
//! backup acknowledged it. A gate in pass-through mode (no replication) writes straight to the
//! sink.
//!
//! ```text
//!   guest out 0x3f8 --> Serial (THR) --> GateWriter --> OutputGate --held by epoch--> sink
//!                                                            |                   \-> ConsoleFile
//!                                                            ^ seal() at capture, release(E) on Ack(E)
//! ```
//!
//! Every byte has an *offset* in the VM's console stream: how many bytes the guest had written
//! before it, since boot. The gate counts them, a state blob carries the offset of its epoch's
//! first byte, and a restored VM's gate continues from there. A [`ConsoleFile`] writes each
//! byte at its offset (`pwrite`), so a byte emitted twice (by a primary that released it and
//! by a promoted backup that could not know) is stored once: the file is the exactly-once copy
//! of the console; the stream sink (stdout) may show such a byte twice.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// Number of I/O ports a 16550 occupies.
pub const SERIAL_PORTS: u16 = 8;

/// The sink for released console bytes.
pub type Sink = Box<dyn Write + Send>;

#[derive(Debug)]
struct Held {
    epoch: u64,
    /// Console stream offset of `bytes[0]`.
    at: u64,
    bytes: Vec<u8>,
    since: Instant,
}

struct GateInner {
    gated: bool,
    current: u64,
    held: VecDeque<Held>,
    held_bytes: usize,
    sink: Sink,
    /// Console stream offset of the next byte the guest writes.
    next_at: u64,
    file: Option<ConsoleFile>,
    /// The last write to `file` failed (logged once until a write succeeds again).
    file_failing: bool,
}

impl GateInner {
    /// Writes `bytes` (at stream offset `at`, if known) to the sink and the console file.
    fn emit(&mut self, at: Option<u64>, bytes: &[u8]) -> std::io::Result<()> {
        if let Some(file) = &self.file {
            let r = match at {
                Some(at) => file.write_at(at, bytes),
                None => Err(ConsoleFileError::UnknownOffset {
                    path: file.path.clone(),
                    len: bytes.len(),
                }),
            };
            match r {
                Ok(()) if self.file_failing => {
                    self.file_failing = false;
                    tracing::info!(path = %file.path.display(), "the console file is written again");
                }
                Ok(()) => {}
                Err(e) if !self.file_failing => {
                    self.file_failing = true;
                    tracing::error!(error = %error_chain(&e), "console output is missing from the console file");
                }
                Err(_) => {}
            }
        }
        self.sink.write_all(bytes)
    }
}

/// `e` and its causes, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Holds console output back until the epoch it was written in is committed.
pub struct OutputGate {
    inner: Mutex<GateInner>,
}

impl std::fmt::Debug for OutputGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("OutputGate")
            .field("gated", &g.gated)
            .field("current", &g.current)
            .field("held_bytes", &g.held_bytes)
            .finish()
    }
}

impl OutputGate {
    /// A gate that writes straight through (no replication).
    pub fn passthrough(sink: Sink) -> Arc<Self> {
        Self::make(false, 0, sink)
    }

    /// A gate that holds bytes; bytes written from now on belong to `epoch`.
    pub fn gated(sink: Sink, epoch: u64) -> Arc<Self> {
        Self::make(true, epoch, sink)
    }

    fn make(gated: bool, current: u64, sink: Sink) -> Arc<Self> {
        Arc::new(OutputGate {
            inner: Mutex::new(GateInner {
                gated,
                current,
                held: VecDeque::new(),
                held_bytes: 0,
                sink,
                next_at: 0,
                file: None,
                file_failing: false,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateInner> {
        // A panic while holding the lock cannot leave the queue inconsistent (every update is a
        // single push/pop), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Also writes every byte that leaves the gate into `file`, at its stream offset.
    pub fn attach_file(&self, file: ConsoleFile) {
        self.lock().file = Some(file);
    }

    /// Bytes from the guest.
    pub fn write(&self, bytes: &[u8]) {
        let mut g = self.lock();
        let at = g.next_at;
        g.next_at += bytes.len() as u64;
        if !g.gated {
            let _ = g.emit(Some(at), bytes);
            let _ = g.sink.flush();
            return;
        }
        let epoch = g.current;
        g.held_bytes += bytes.len();
        match g.held.back_mut() {
            Some(h) if h.epoch == epoch => h.bytes.extend_from_slice(bytes),
            _ => g.held.push_back(Held {
                epoch,
                at,
                bytes: bytes.to_vec(),
                since: Instant::now(),
            }),
        }
    }

    /// The console stream offset of the next byte the guest writes (saved in the VM state).
    pub fn stream_offset(&self) -> u64 {
        self.lock().next_at
    }

    /// Continues the console stream of a restored VM: its next byte has offset `at` (`None`
    /// from a state that did not carry it: then nothing more goes to the console file, whose
    /// offsets would be wrong).
    pub fn continue_at(&self, at: Option<u64>) {
        let mut g = self.lock();
        match at {
            Some(at) => g.next_at = at,
            None => {
                if let Some(f) = g.file.take() {
                    tracing::error!(path = %f.path.display(),
                        "the VM state (format 2, from an older build) does not say where its console output belongs: not writing the console file from here on; upgrade every node");
                }
            }
        }
    }

    /// Emits bytes another copy of the VM wrote at stream offset `at` (a promoted replica
    /// writing the output its old primary may not have released), to the sink and the file.
    pub fn emit_at(&self, at: Option<u64>, bytes: &[u8]) -> std::io::Result<()> {
        let mut g = self.lock();
        g.emit(at, bytes)?;
        g.sink.flush()
    }

    /// Ends the current epoch (called while the vCPUs are paused at a capture): returns its
    /// number E; later bytes belong to E+1.
    pub fn seal(&self) -> u64 {
        let mut g = self.lock();
        let e = g.current;
        g.current += 1;
        e
    }

    /// Like [`OutputGate::seal`], and also returns the stream offset of the sealed epoch's
    /// first byte and a copy of its bytes (they travel with the epoch's checkpoint, so that a
    /// promoted replica can emit them if this copy never releases them). Without bytes, the
    /// offset is that of the next byte.
    pub fn seal_copy(&self) -> (u64, u64, Vec<u8>) {
        let mut g = self.lock();
        let e = g.current;
        g.current += 1;
        match g.held.back() {
            Some(h) if h.epoch == e => (e, h.at, h.bytes.clone()),
            _ => (e, g.next_at, Vec::new()),
        }
    }

    /// The epoch that bytes written now belong to.
    pub fn current_epoch(&self) -> u64 {
        self.lock().current
    }

    /// Starts holding output; bytes from now on belong to `epoch`, and so do bytes still held
    /// from earlier epochs (e.g. written while the VM booted, before its first session): they
    /// go out with `epoch`, the first checkpoint a replica can resume from, which carries them
    /// (see [`OutputGate::seal_copy`]), so a replica promoted from it emits them if this copy
    /// never did. Released earlier, on the Ack of an epoch without VM state, they would be lost
    /// when this copy dies before that Ack.
    pub fn hold_from(&self, epoch: u64) {
        let mut g = self.lock();
        g.gated = true;
        g.current = epoch;
        // Held bytes are contiguous in the stream: merge them into one entry for `epoch`.
        if let Some(mut first) = g.held.pop_front() {
            while let Some(h) = g.held.pop_front() {
                first.bytes.extend_from_slice(&h.bytes);
            }
            first.epoch = epoch;
            g.held.push_back(first);
        }
    }

    /// Writes every held byte of epochs `<= epoch` to the sink; returns the byte count.
    pub fn release(&self, epoch: u64) -> std::io::Result<usize> {
        let mut g = self.lock();
        let mut n = 0;
        while g.held.front().is_some_and(|h| h.epoch <= epoch) {
            let h = g.held.pop_front().expect("front checked");
            g.held_bytes -= h.bytes.len();
            n += h.bytes.len();
            g.emit(Some(h.at), &h.bytes)?;
        }
        if n > 0 {
            g.sink.flush()?;
        }
        Ok(n)
    }

    /// Stops holding: releases everything held and passes later bytes straight through
    /// (a primary that runs on unprotected).
    pub fn open(&self) -> std::io::Result<usize> {
        let n = self.release(u64::MAX)?;
        self.lock().gated = false;
        Ok(n)
    }

    /// Drops every held byte (the copy of the VM that wrote them is abandoned).
    pub fn discard(&self) -> usize {
        let mut g = self.lock();
        let n = g.held_bytes;
        g.held.clear();
        g.held_bytes = 0;
        n
    }

    /// Bytes held back now, and how long the oldest of them has waited.
    pub fn held(&self) -> (usize, Option<std::time::Duration>) {
        let g = self.lock();
        (g.held_bytes, g.held.front().map(|h| h.since.elapsed()))
    }
}

/// A console file written by offset: each byte goes to its offset in the VM's console stream
/// (`pwrite`), so writing the same bytes again leaves one copy. Opened without truncation:
/// a promoted backup writes into the file its primary wrote (shared storage).
#[derive(Clone, Debug)]
pub struct ConsoleFile {
    path: PathBuf,
    file: Arc<File>,
}

/// A console file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleFileError {
    #[error("cannot open the console file {path} (check that its directory exists and that this user may write it)")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {len} console bytes at offset {at} of {path} (check free space, quota and permissions; the bytes are still on stdout)")]
    Write {
        path: PathBuf,
        at: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("{len} console bytes for {path} come from a VM state of an older build, which does not say where they belong; not written (they are on stdout)")]
    UnknownOffset { path: PathBuf, len: usize },
}

impl ConsoleFile {
    /// Opens (or creates) `path` for writing, keeping what it holds.
    pub fn open(path: &Path) -> Result<Self, ConsoleFileError> {
        let file = File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| ConsoleFileError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(ConsoleFile {
            path: path.to_path_buf(),
            file: Arc::new(file),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `bytes` at stream offset `at`.
    pub fn write_at(&self, at: u64, bytes: &[u8]) -> Result<(), ConsoleFileError> {
        self.file
            .write_all_at(bytes, at)
            .map_err(|source| ConsoleFileError::Write {
                path: self.path.clone(),
                at,
                len: bytes.len(),
                source,
            })
    }
}

/// A sink that keeps every byte in memory, shareable between the gate and a reader (tests,
/// drills and benchmarks read the console from it).
#[derive(Clone, Default)]
pub struct MemorySink(Arc<Mutex<Vec<u8>>>);

impl MemorySink {
    /// Everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.contents()).into_owned()
    }
}

impl Write for MemorySink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The serial device's `Write` end: forwards bytes to the gate.
pub struct GateWriter(pub Arc<OutputGate>);

impl Write for GateWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Interrupts are not wired: the built-in guests poll, and the multiboot guest only polls LSR.
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// COM1 behind an output gate.
pub struct SerialConsole {
    base: u16,
    dev: Serial<NoInterrupt, NoEvents, GateWriter>,
}

impl SerialConsole {
    /// A fresh UART at `base`.
    pub fn new(base: u16, gate: Arc<OutputGate>) -> Self {
        SerialConsole {
            base,
            dev: Serial::new(NoInterrupt, GateWriter(gate)),
        }
    }

    /// A UART continuing from a saved state; fails on a state no UART can be in (an input
    /// FIFO longer than the device's).
    pub fn from_state(
        base: u16,
        gate: Arc<OutputGate>,
        state: &SerialState,
    ) -> Result<Self, SerialStateError> {
        let dev = Serial::from_state(state, NoInterrupt, NoEvents, GateWriter(gate))
            .map_err(|e| SerialStateError(format!("{e:?}")))?;
        Ok(SerialConsole { base, dev })
    }

    /// Whether `port` belongs to this UART.
    pub fn handles(&self, port: u16) -> bool {
        (self.base..self.base + SERIAL_PORTS).contains(&port)
    }

    /// A guest `out` to one of our ports.
    pub fn port_write(&mut self, port: u16, value: u8) {
        let _ = self.dev.write((port - self.base) as u8, value);
    }

    /// A guest `in` from one of our ports.
    pub fn port_read(&mut self, port: u16) -> u8 {
        self.dev.read((port - self.base) as u8)
    }

    /// The device registers.
    pub fn state(&self) -> SerialState {
        self.dev.state()
    }

    /// The gate behind the device.
    pub fn gate(&self) -> &Arc<OutputGate> {
        &self.dev.writer().0
    }
}

/// A saved UART state that vm-superio refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid serial device state: {0}")]
pub struct SerialStateError(String);

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn gate_releases_by_epoch() {
        let out = Shared::default();
        let gate = OutputGate::gated(Box::new(out.clone()), 1);
        gate.write(b"a");
        assert_eq!(gate.seal(), 1);
        gate.write(b"b");
        assert_eq!(gate.seal(), 2);
        gate.write(b"c");
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(gate.release(1).unwrap(), 1);
        assert_eq!(&*out.0.lock().unwrap(), b"a");
        assert_eq!(gate.held().0, 2);
        gate.release(2).unwrap();
        assert_eq!(&*out.0.lock().unwrap(), b"ab");
        assert_eq!(gate.discard(), 1);
    }

    #[test]
    fn bytes_held_before_a_session_go_out_with_its_first_checkpoint() {
        let out = Shared::default();
        let gate = OutputGate::gated(Box::new(out.clone()), 1);
        gate.write(b"boot ");
        gate.seal();
        gate.write(b"more ");
        // A session whose first consistent epoch is 5 (epochs 1..=4 are its sync).
        gate.hold_from(5);
        gate.write(b"sync");
        assert_eq!(
            gate.release(4).unwrap(),
            0,
            "a sync epoch's Ack releases nothing"
        );
        assert_eq!(gate.seal_copy(), (5, 0, b"boot more sync".to_vec()));
        assert_eq!(gate.release(5).unwrap(), 14);
        assert_eq!(&*out.0.lock().unwrap(), b"boot more sync");
    }

    #[test]
    fn every_byte_has_its_stream_offset() {
        let gate = OutputGate::gated(Box::new(std::io::sink()), 1);
        gate.write(b"ab");
        assert_eq!(gate.seal_copy(), (1, 0, b"ab".to_vec()));
        assert_eq!(gate.seal_copy(), (2, 2, Vec::new()));
        gate.write(b"c");
        gate.write(b"d");
        assert_eq!(gate.seal_copy(), (3, 2, b"cd".to_vec()));
        assert_eq!(gate.stream_offset(), 4);
        gate.discard();
        gate.write(b"e");
        assert_eq!(gate.seal_copy(), (4, 4, b"e".to_vec()));
    }

    #[test]
    fn the_console_file_holds_a_byte_emitted_twice_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console");
        // The primary releases epochs 1 and 2, then dies.
        let primary = OutputGate::gated(Box::new(std::io::sink()), 1);
        primary.attach_file(ConsoleFile::open(&path).unwrap());
        primary.write(b"tick 1\n");
        let (_, at1, e1) = primary.seal_copy();
        primary.write(b"tick 2\n");
        let (_, at2, e2) = primary.seal_copy();
        primary.release(2).unwrap();
        // The backup never heard that they were released: it emits both again, then the
        // promoted VM continues after epoch 2.
        let out = Shared::default();
        let promoted = OutputGate::passthrough(Box::new(out.clone()));
        promoted.attach_file(ConsoleFile::open(&path).unwrap());
        promoted.emit_at(Some(at1), &e1).unwrap();
        promoted.emit_at(Some(at2), &e2).unwrap();
        promoted.continue_at(Some(at2 + e2.len() as u64));
        promoted.write(b"tick 3\n");
        assert_eq!(&*out.0.lock().unwrap(), b"tick 1\ntick 2\ntick 3\n");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"tick 1\ntick 2\ntick 3\n",
            "each byte once"
        );
    }

    #[test]
    fn a_console_file_that_cannot_be_written_does_not_stop_the_console() {
        let out = Shared::default();
        let gate = OutputGate::gated(Box::new(out.clone()), 1);
        let full = ConsoleFile::open(Path::new("/dev/full")).unwrap();
        let e = full.write_at(0, b"x").unwrap_err().to_string();
        assert!(e.contains("/dev/full") && e.contains("free space"), "{e}");
        gate.attach_file(full);
        gate.write(b"tick 1\n");
        gate.seal();
        assert_eq!(gate.release(1).unwrap(), 7);
        assert_eq!(&*out.0.lock().unwrap(), b"tick 1\n");
    }

    #[test]
    fn a_console_file_that_cannot_be_opened_names_its_path() {
        let e = ConsoleFile::open(Path::new("/nonexistent-dir/console")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("/nonexistent-dir/console") && text.contains("directory exists"),
            "{text}"
        );
    }

    #[test]
    fn passthrough_writes_at_once() {
        let out = Shared::default();
        let gate = OutputGate::passthrough(Box::new(out.clone()));
        let mut s = SerialConsole::new(0x3f8, gate);
        for b in b"hi" {
            s.port_write(0x3f8, *b);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        assert!(s.port_read(0x3fd) & 0x20 != 0, "THR empty");
    }
}
