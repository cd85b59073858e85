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
//!                                                            ^ seal() at capture, release(E) on Ack(E)
//! ```

use std::collections::VecDeque;
use std::io::Write;
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
    bytes: Vec<u8>,
    since: Instant,
}

struct GateInner {
    gated: bool,
    current: u64,
    held: VecDeque<Held>,
    held_bytes: usize,
    sink: Sink,
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
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateInner> {
        // A panic while holding the lock cannot leave the queue inconsistent (every update is a
        // single push/pop), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes from the guest.
    pub fn write(&self, bytes: &[u8]) {
        let mut g = self.lock();
        if !g.gated {
            let _ = g.sink.write_all(bytes);
            let _ = g.sink.flush();
            return;
        }
        let epoch = g.current;
        g.held_bytes += bytes.len();
        match g.held.back_mut() {
            Some(h) if h.epoch == epoch => h.bytes.extend_from_slice(bytes),
            _ => g.held.push_back(Held {
                epoch,
                bytes: bytes.to_vec(),
                since: Instant::now(),
            }),
        }
    }

    /// Ends the current epoch (called while the vCPUs are paused at a capture): returns its
    /// number E; later bytes belong to E+1.
    pub fn seal(&self) -> u64 {
        let mut g = self.lock();
        let e = g.current;
        g.current += 1;
        e
    }

    /// Like [`OutputGate::seal`], and also returns a copy of the sealed epoch's bytes (they
    /// travel with the epoch's checkpoint, so that a promoted replica can emit them if this
    /// copy never releases them).
    pub fn seal_copy(&self) -> (u64, Vec<u8>) {
        let mut g = self.lock();
        let e = g.current;
        g.current += 1;
        let bytes = match g.held.back() {
            Some(h) if h.epoch == e => h.bytes.clone(),
            _ => Vec::new(),
        };
        (e, bytes)
    }

    /// The epoch that bytes written now belong to.
    pub fn current_epoch(&self) -> u64 {
        self.lock().current
    }

    /// Starts holding output; bytes from now on belong to `epoch`.
    pub fn hold_from(&self, epoch: u64) {
        let mut g = self.lock();
        g.gated = true;
        g.current = epoch;
    }

    /// Writes every held byte of epochs `<= epoch` to the sink; returns the byte count.
    pub fn release(&self, epoch: u64) -> std::io::Result<usize> {
        let mut g = self.lock();
        let mut n = 0;
        while g.held.front().is_some_and(|h| h.epoch <= epoch) {
            let h = g.held.pop_front().expect("front checked");
            g.held_bytes -= h.bytes.len();
            n += h.bytes.len();
            g.sink.write_all(&h.bytes)?;
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
