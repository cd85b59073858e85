//! vCPU threads: run loop, port I/O, and the kick that takes a vCPU out of `KVM_RUN`.
//!
//! The kick (MACHINE.md): each vCPU thread keeps a pointer to its `kvm_run` in a thread-local
//! that the SIGRTMIN handler reads. The controller first records the request (pause or stop)
//! under the vCPU's lock, then signals the thread; the handler sets `immediate_exit = 1`.
//! `KVM_RUN` then returns EINTR, or, if the signal landed between two `KVM_RUN` calls, the next
//! `KVM_RUN` returns at once. Either way the thread re-reads the request before entering the guest
//! again, so a kick is never lost. The thread clears `immediate_exit`, saves its state, acks and
//! parks.
//!
//! The save, on the vCPU thread (where the time goes: `Vm::pause_profile`, and the bench's
//! pause rows). Every vCPU ioctl costs ~5 us on PVM whatever it copies, so a pause uses as few
//! as it can (`SaveFrom::Pause`):
//!
//! ```text
//!  kick ─> KVM_RUN returns EINTR ─> save ─────────────────────────────────────────> ack
//!                                   KVM_GET_MSRS (TSC and the rest), KVM_GET_XSAVE,
//!                                   KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_VCPU_EVENTS;
//!                                   XCRs, debug regs: read once while confined to CPL3;
//!                                   FPU from the XSAVE area; MP state RUNNABLE without LAPIC
//! ```
//!
//! Not `KVM_CAP_SYNC_REGS` (regs, sregs and events copied into `kvm_run` at every exit, three
//! ioctls fewer): with it on, this PVM host stalled the guest for whole epochs and stopped it
//! between a page fill and its progress count far more often (the dirty-set test failed 6 of 55
//! runs, 0 of 55 without; no page went unreported), for a reason not found.
//!
//! The pausing thread spins on `Shared::acked` (at most `SPIN_LIMIT`) while the vCPU thread is
//! on another CPU, and otherwise sleeps on the condvar: asleep, its CPU halts, and waking it
//! costs ~22 us on an idle machine here.
//!
//! A pause that finds the thread handling a port I/O or MMIO exit first enters `KVM_RUN` once
//! more with `immediate_exit` set, so that KVM finishes that instruction before the state is
//! saved.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::serial::SerialConsole;
use crate::guests::layout::EXIT_PORT;
use crate::state::vcpu::{ExitSaveCache, KvmVcpu, SaveFrom, SaveSteps};
use crate::state::{VcpuState, VcpuStateError};

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer was set by this very thread to its vCPU's `kvm_run` mapping, which
        // stays mapped until the thread clears the pointer before dropping the vCPU; a volatile
        // byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
}

/// The CPU the calling thread runs on (-1 if unknown).
fn current_cpu() -> i32 {
    // SAFETY: sched_getcpu(3) takes no arguments and only reports the calling thread's CPU.
    unsafe { libc::sched_getcpu() }
}

/// How long the pausing thread spins, at most, for a vCPU that runs on another CPU, before it
/// sleeps on the condvar. Sleeping, its CPU halts (`haltpoll.guest_halt_poll_ns=0` here) and
/// waking it took ~22 us of every pause on an idle machine; spinning, 0.5 us. A save takes
/// 25-30 us, so 100 us covers it with room and bounds the waste when the vCPU thread stalls.
const SPIN_LIMIT: Duration = Duration::from_micros(100);

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler once per process.
pub(crate) fn install_kick_handler() -> Result<(), std::io::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote its exit code to the exit port.
    Guest(u32),
    /// The guest triple-faulted.
    Shutdown,
    /// The guest halted (CPL0 guests only; a CPL3 `hlt` faults).
    Halt,
    /// KVM failed to run the vCPU.
    Failed(String),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct Ctl {
    want: Want,
    /// Bumped by every pause request; the vCPU saves its state once per value.
    pause_seq: u64,
    /// The `pause_seq` whose state `saved` holds (or held, before the controller took it).
    saved_seq: u64,
    parked: bool,
    saved: Option<Result<VcpuState, VcpuStateError>>,
    /// Where the time of the save in `saved` went.
    report: SaveReport,
    done: bool,
}

/// The vCPU thread's side of one pause, for the pause profile.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SaveReport {
    /// The thread saw the pause request (out of `KVM_RUN`, or between two runs).
    pub noticed: Instant,
    /// The state was saved and about to be published.
    pub saved: Instant,
    /// Each ioctl of the save.
    pub steps: SaveSteps,
}

/// What the controller and a vCPU thread share.
pub(crate) struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// `Ctl::saved_seq`, stored once that save is in `Ctl::saved`: what the pausing thread spins on.
    acked: AtomicU64,
    /// `Ctl::done`, likewise.
    ended: AtomicBool,
    /// The CPU the vCPU thread was on when it last left `KVM_RUN`.
    cpu: AtomicI32,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where a VM's exits are reported.
pub(crate) struct ExitLatch {
    reason: Mutex<Option<ExitReason>>,
    cv: Condvar,
}

impl ExitLatch {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(ExitLatch {
            reason: Mutex::new(None),
            cv: Condvar::new(),
        })
    }
    fn set(&self, r: ExitReason) {
        let mut g = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(r);
        }
        self.cv.notify_all();
    }
    pub(crate) fn get(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    pub(crate) fn wait(&self, timeout: std::time::Duration) -> Option<ExitReason> {
        let g = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |r| r.is_none())
            .unwrap_or_else(|e| e.into_inner());
        g.clone()
    }
}

/// What a vCPU thread needs besides its fd.
pub(crate) struct VcpuEnv {
    pub serial: Arc<Mutex<SerialConsole>>,
    pub exit: Arc<ExitLatch>,
    pub msrs: Arc<[u32]>,
    pub xsave: bool,
    pub lapic: bool,
}

/// The outcome of waiting for a vCPU to park.
// One value per vCPU per pause, moved straight into the VM's state: boxing the 6.6 KB state
// would only add an allocation to the pause path.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Parked {
    /// Parked, with the state it saved (or the error saving it) and where the time went.
    Saved(Result<VcpuState, VcpuStateError>, SaveReport),
    /// The vCPU thread has ended (the guest stopped).
    Ended,
    /// It did not leave KVM_RUN in time.
    TimedOut,
}

/// The controller's handle on one vCPU thread.
pub(crate) struct VcpuHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts a thread running `fd`; it parks at once if `start_paused`.
    pub(crate) fn spawn(
        id: usize,
        fd: VcpuFd,
        env: VcpuEnv,
        start_paused: bool,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                want: if start_paused { Want::Pause } else { Want::Run },
                pause_seq: u64::from(start_paused),
                saved_seq: 0,
                parked: false,
                saved: None,
                report: SaveReport {
                    noticed: Instant::now(),
                    saved: Instant::now(),
                    steps: SaveSteps::default(),
                },
                done: false,
            }),
            cv: Condvar::new(),
            acked: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            cpu: AtomicI32::new(-1),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                crate::apply_vcpu_nice();
                run_thread(fd, env, &s)
            })?;
        Ok(VcpuHandle {
            shared,
            thread: Some(thread),
        })
    }

    /// Records `want` and kicks the thread unless it is `Run`; returns when the kick was sent.
    fn request(&self, want: Want) -> Instant {
        let mut c = self.shared.lock();
        if c.done {
            return Instant::now();
        }
        c.want = want;
        if want == Want::Pause {
            c.pause_seq += 1;
            c.saved = None;
        }
        drop(c);
        self.shared.cv.notify_all();
        let kicked = Instant::now();
        if want != Want::Run {
            if let Some(t) = &self.thread {
                // An error here means the thread already ended, which `done` reports.
                let _ = t.kill(kick_signal());
            }
        }
        kicked
    }

    /// Asks the vCPU to leave the guest and park (does not wait); returns when the signal
    /// was sent.
    pub(crate) fn kick_pause(&self) -> Instant {
        self.request(Want::Pause)
    }

    /// Waits until the vCPU is parked with its state saved for the latest pause request.
    pub(crate) fn wait_parked(&self, timeout: std::time::Duration) -> Parked {
        // Spin first, but only while the vCPU thread is on another CPU: on the same CPU the spin
        // would keep it from running (measured: a plain spin raised the p50 from 41 to 245 us on
        // a busy machine, and the 2-vCPU p50 from 60 to 178 us on an idle one).
        let seq = self.shared.lock().pause_seq;
        let start = Instant::now();
        let s = &self.shared;
        while s.acked.load(Ordering::Acquire) != seq
            && !s.ended.load(Ordering::Acquire)
            && s.cpu.load(Ordering::Relaxed) != current_cpu()
            && start.elapsed() < SPIN_LIMIT
        {
            std::hint::spin_loop();
        }
        let c = self.shared.lock();
        let (mut c, t) = self
            .shared
            .cv
            .wait_timeout_while(c, timeout, |c| {
                !(c.done || c.parked && c.saved_seq == c.pause_seq)
            })
            .unwrap_or_else(|e| e.into_inner());
        match c.saved.take() {
            Some(s) if c.parked => Parked::Saved(s, c.report),
            _ if c.done => Parked::Ended,
            _ if t.timed_out() => Parked::TimedOut,
            _ => Parked::Ended,
        }
    }

    /// Lets a parked vCPU run again.
    pub(crate) fn resume(&self) {
        self.request(Want::Run);
    }

    /// Stops and joins the thread.
    pub(crate) fn stop(&mut self) {
        self.request(Want::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_thread(mut fd: VcpuFd, env: VcpuEnv, shared: &Shared) {
    KVM_RUN.with(|p| p.set(fd.get_kvm_run()));
    let outcome = run_loop(&mut fd, &env, shared);
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    if let Some(reason) = outcome {
        env.exit.set(reason);
    }
    let mut c = shared.lock();
    c.done = true;
    shared.ended.store(true, Ordering::Release);
    drop(c);
    shared.cv.notify_all();
}

/// Saves a parked vCPU whose last `KVM_RUN` returned with nothing left to complete.
fn save(
    fd: &VcpuFd,
    env: &VcpuEnv,
    cache: &mut ExitSaveCache,
    steps: &mut SaveSteps,
) -> Result<VcpuState, VcpuStateError> {
    let vcpu = KvmVcpu {
        fd,
        msrs: &env.msrs,
        xsave: env.xsave,
        lapic: env.lapic,
    };
    let state = vcpu.save_timed(SaveFrom::Pause { cache }, steps)?;
    if cfg!(debug_assertions) {
        // Tests run debug builds: every pause there proves the shortcut equal to the ioctls.
        let reference = vcpu.save_timed(SaveFrom::Ioctls, &mut SaveSteps::default())?;
        if let Some(part) = state.first_difference(&reference) {
            return Err(VcpuStateError::ExitSaveDiffers(part));
        }
    }
    Ok(state)
}

/// Returns why the guest stopped, or `None` when the controller asked it to.
fn run_loop(fd: &mut VcpuFd, env: &VcpuEnv, shared: &Shared) -> Option<ExitReason> {
    // Whether the last `KVM_RUN` returned with nothing left to complete, so that the vCPU's
    // state is whole. Not after a port I/O or MMIO exit: the next `KVM_RUN` finishes that
    // instruction (moves RIP past an OUT, puts an IN's value in RAX); a state saved before would
    // repeat it. Not before the first run either, to be safe about what a fresh vCPU holds.
    let mut settled = false;
    // The pause being served: when this thread saw it, and the steps of its save so far.
    let mut serving: Option<(Instant, SaveSteps)> = None;
    let mut cache = ExitSaveCache::default();
    loop {
        let finishing_exit;
        {
            let mut c = shared.lock();
            // Parked: save once per pause request, then wait for the next request. A resume
            // followed at once by another pause bumps `pause_seq`, so the state is saved again
            // for that pause instead of the controller waiting for a save that never comes.
            while c.want == Want::Pause {
                if c.saved_seq != c.pause_seq {
                    let (noticed, mut steps) =
                        *serving.get_or_insert_with(|| (Instant::now(), SaveSteps::default()));
                    if !settled {
                        // Let KVM finish the last exit first: a `KVM_RUN` with immediate_exit
                        // set completes it and returns EINTR before entering the guest.
                        break;
                    }
                    let seq = c.pause_seq;
                    drop(c);
                    fd.set_kvm_immediate_exit(0);
                    let saved = save(fd, env, &mut cache, &mut steps);
                    let report = SaveReport {
                        noticed,
                        saved: Instant::now(),
                        steps,
                    };
                    serving = None;
                    c = shared.lock();
                    if c.pause_seq == seq {
                        c.saved = Some(saved);
                        c.saved_seq = seq;
                        c.report = report;
                        c.parked = true;
                        shared.acked.store(seq, Ordering::Release);
                        // Wake the controller after unlocking: notified under the lock, it would
                        // wake only to block on the mutex until `wait_while` below releases it
                        // (two more context switches; ~10 us of every pause here).
                        drop(c);
                        shared.cv.notify_all();
                        c = shared.lock();
                    }
                    continue;
                }
                c = shared
                    .cv
                    .wait_while(c, |c| c.want == Want::Pause && c.saved_seq == c.pause_seq)
                    .unwrap_or_else(|e| e.into_inner());
            }
            c.parked = false;
            finishing_exit = c.want == Want::Pause;
            if !finishing_exit {
                // A pause withdrawn before its save (the controller gave up waiting).
                serving = None;
            }
            if c.want == Want::Stop {
                return None;
            }
        }
        if finishing_exit {
            fd.set_kvm_immediate_exit(1);
        }
        let ran = Instant::now();
        let exit = fd.run();
        shared.cpu.store(current_cpu(), Ordering::Relaxed);
        settled = matches!(&exit, Ok(VcpuExit::Intr))
            || matches!(&exit, Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN);
        if let (true, Some((_, steps))) = (finishing_exit, serving.as_mut()) {
            steps.push("KVM_RUN to finish an I/O exit", ran.elapsed());
        }
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port == EXIT_PORT {
                    let mut code = [0u8; 4];
                    let n = data.len().min(4);
                    code[..n].copy_from_slice(&data[..n]);
                    return Some(ExitReason::Guest(u32::from_le_bytes(code)));
                }
                let mut serial = env.serial.lock().unwrap_or_else(|e| e.into_inner());
                if serial.handles(port) {
                    for b in data.iter() {
                        serial.port_write(port, *b);
                    }
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                let mut serial = env.serial.lock().unwrap_or_else(|e| e.into_inner());
                let v = if serial.handles(port) {
                    serial.port_read(port)
                } else {
                    0xff
                };
                data.fill(v);
            }
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(..)) | Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::Hlt) => return Some(ExitReason::Halt),
            Ok(VcpuExit::Shutdown) => return Some(ExitReason::Shutdown),
            Ok(other) => return Some(ExitReason::Failed(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR => fd.set_kvm_immediate_exit(0),
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => return Some(ExitReason::Failed(format!("KVM_RUN: {e}"))),
        }
    }
}
