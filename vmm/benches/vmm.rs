//! `cargo bench -p understudy-vmm --bench vmm`: the micro-VMM's latencies on real KVM.
//!
//! 1. **pause**: the duration of `Vm::pause()` (kick every vCPU out of `KVM_RUN`, each saves its
//!    state and acks), in the replication loop: dirty logging on, unpaced `ledger` guest,
//!    epochs of 0.2-0.8 ms, `take_dirty` + `resume` after every pause (not timed). 1 and 2 vCPUs
//!    (the second spins in the park loop).
//! 2. **take_dirty**: the duration of `Vm::take_dirty()` on a paused VM, 256 MiB and 1 GiB:
//!    (a) ~2k pages per epoch dirtied by the `dirty` guest (paced 25k pages/s, sequential, 80 ms
//!    epochs), so they are in KVM's log; (b) every page of guest memory dirty: the unpaced
//!    `dirty` guest makes one sequential pass over the whole data area per epoch (in KVM's log)
//!    and the VMM writes one byte (the one already there) of each of the 256 pages below the
//!    data area through `GuestMemory::write`; (c) every page dirty through `GuestMemory::write`
//!    alone, KVM's log (nearly) clean: the fixed cost of `take_dirty` itself.
//! 3. **restore**: a running `idle` guest (progress counter bumped after every `pause`
//!    instruction) is paused, its state taken, the old VM dropped; then timed:
//!    `GuestMemory::from_fds(specs, fds, false)` (mmap), `Vm::restore(.., false, false)`, and a
//!    poll (volatile read + `sched_yield`) of the progress counter at `PROGRESS_GPA` from the
//!    return of `restore` until it changes (= the guest executed). The next round restores from
//!    the VM just restored. A second series makes the VM ahead of time
//!    (`Vm::prepare_restore`: VM, memory slots, vCPUs with CPUID, untimed, as a backup does
//!    while it replicates) and times `PreparedRestore::restore` (state load, vCPU threads) to
//!    the counter moving: the promotion path.
//!
//! 4. **uffd**: postcopy's on-demand pages (`LazyMemory`, userfaultfd minor faults on a
//!    fallocated 256 MiB memfd, no VM): the VMM touches one absent page at a time (strided,
//!    so no two share a cache line of state) while a handler thread waits for the fault, copies
//!    the page from a source mapping, `fill`s it (pwrite + `UFFDIO_CONTINUE`). Timed: the
//!    access (fault raised -> handler -> woken: the stall a faulting thread sees) and the
//!    handler's part (fault read -> page written and CONTINUE returned). A vCPU sees the same
//!    round trip plus KVM's exit and shadow-walk (vmm/tests/postcopy.rs prints it for a guest).
//!
//! Every row also shows how many cores other processes used while it ran (from `/proc/stat`
//! minus this process's CPU time): the machine has 2 cores and is shared with other jobs.
//!
//! The pause rows are followed by where the time of each 1-vCPU pause went
//! (`Vm::pause_profile`): the kick, the vCPU leaving `KVM_RUN`, each state-save ioctl and the
//! hand-off back to the pausing thread. The parts' percentiles are taken separately, so their
//! p99s do not add up to the pause's p99.
//!
//! Environment: `BENCH_PAUSES` (default 2500 per row), `BENCH_PAUSE_VCPUS` (default `1,2`),
//! `BENCH_DIRTY_EPOCHS` (default 60), `BENCH_RESTORES` (default 200 per size, so that p99 is
//! not simply the max), `BENCH_UFFD_FAULTS` (default 5000),
//! `BENCH_SECTIONS` (default `pause,dirty,restore,uffd`).

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use understudy_vmm::guests::layout::{DATA_GPA, PROGRESS_GPA};
use understudy_vmm::guests::Workload;
use understudy_vmm::{Boot, GuestMemory, MemorySink, OutputGate, Vm, VmConfig, VmState, PAGE_SIZE};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Panics (never skips) when the machine has no usable KVM.
fn require_kvm() {
    if let Err(e) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "the vmm bench measures real KVM and needs read-write access to /dev/kvm, which \
             failed: {e}"
        );
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn workload(name: &str, flags: &[(&str, &str)]) -> Workload {
    let map: HashMap<String, String> = flags
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Workload::from_cli(name, &map).expect("workload flags")
}

fn boot(config: &VmConfig, w: &Workload, sink: &MemorySink) -> Vm {
    Vm::boot(
        config,
        Boot::Workload(w),
        OutputGate::passthrough(Box::new(sink.clone())),
    )
    .unwrap_or_else(|e| panic!("booting a VM on /dev/kvm failed: {e}"))
}

fn progress(vm: &Vm) -> u64 {
    vm.memory()
        .read_u64(PROGRESS_GPA)
        .expect("progress counter")
}

fn assert_running(vm: &Vm, sink: &MemorySink, what: &str) {
    assert!(
        vm.exit_reason().is_none(),
        "{what}: the guest stopped: {:?}\n{}",
        vm.exit_reason(),
        sink.text()
    );
    assert!(!sink.text().contains("CORRUPT"), "{what}: {}", sink.text());
}

// ---------------------------------------------------------------------------------------------
// Statistics and machine load

#[derive(Clone, Copy)]
struct Stats {
    n: usize,
    min: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

/// Nearest-rank percentiles.
fn stats(mut v: Vec<Duration>) -> Stats {
    assert!(!v.is_empty());
    v.sort();
    let pick = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Stats {
        n: v.len(),
        min: v[0],
        p50: pick(0.50),
        p99: pick(0.99),
        max: v[v.len() - 1],
    }
}

fn median_u(mut v: Vec<usize>) -> usize {
    v.sort_unstable();
    v[v.len() / 2]
}

/// CPU time counters, in USER_HZ ticks (100/s on Linux x86).
#[derive(Clone, Copy)]
struct CpuSample {
    at: Instant,
    busy: u64,
    steal: u64,
    me: u64,
}

const USER_HZ: f64 = 100.0;

fn cpu_sample() -> CpuSample {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy = get(0) + get(1) + get(2) + get(5) + get(6);
    let me_stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the ")" that ends the command name: state is field 3, utime 14, stime 15.
    let rest = me_stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let g: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let me = g.get(11).copied().unwrap_or(0) + g.get(12).copied().unwrap_or(0);
    CpuSample {
        at: Instant::now(),
        busy,
        steal: get(7),
        me,
    }
}

/// Cores used by other processes, and stolen, between two samples.
fn others(a: &CpuSample, b: &CpuSample) -> (f64, f64) {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
    let other = (b.busy - a.busy).saturating_sub(b.me - a.me) as f64 / USER_HZ / secs;
    let steal = (b.steal - a.steal) as f64 / USER_HZ / secs;
    (other, steal)
}

// ---------------------------------------------------------------------------------------------
// The table

struct Row {
    what: String,
    stats: Stats,
    /// `Some(limit)`: a target for p99.
    target: Option<Duration>,
    reference: String,
    other_cores: f64,
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn print_table(rows: &[Row]) {
    println!(
        "| measurement | n | min us | p50 us | p99 us | max us | target / MACHINE.md reference | verdict | other load (cores) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|---|---:|");
    for r in rows {
        let verdict = match r.target {
            Some(limit) if r.stats.p99 <= limit => "ok",
            Some(_) => "MISS",
            None => "-",
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} |",
            r.what,
            r.stats.n,
            us(r.stats.min),
            us(r.stats.p50),
            us(r.stats.p99),
            us(r.stats.max),
            r.reference,
            verdict,
            r.other_cores
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1. pause

/// One pause series: the pause durations, and where the time went on vCPU 0 (one
/// `(part, durations)` per part, in order: see `Vm::pause_profile`).
struct PauseFigures {
    total: Stats,
    parts: Vec<(String, Stats)>,
    other: f64,
}

fn bench_pause(vcpus: u8, pauses: usize) -> PauseFigures {
    let mut config = VmConfig::new(64 * MIB);
    config.vcpus = vcpus;
    config.dirty_logging = true;
    let w = workload("ledger", &[("rate", "0"), ("verify-every", "2000")]);
    let sink = MemorySink::default();
    let mut vm = boot(&config, &w, &sink);
    std::thread::sleep(Duration::from_millis(50));
    let mut times = Vec::with_capacity(pauses);
    let mut parts: Vec<(String, Vec<Duration>)> = Vec::new();
    let before = cpu_sample();
    for i in 0..pauses + 50 {
        std::thread::sleep(Duration::from_micros(200 + (i as u64 % 7) * 100));
        let t = Instant::now();
        vm.pause().expect("pause");
        let d = t.elapsed();
        if i >= 50 {
            times.push(d);
            let p = &vm.pause_profile().vcpus[0];
            let mut row = vec![
                ("kick: pause() -> signal sent".to_string(), p.kick),
                (
                    "exit: signal -> vCPU thread out of KVM_RUN".to_string(),
                    p.exit,
                ),
                ("save: all state ioctls".to_string(), p.save),
            ];
            row.extend(p.steps.iter().map(|(n, d)| (format!("save: {n}"), d)));
            row.push((
                "hand-off: state saved -> pause() sees it".to_string(),
                p.handoff,
            ));
            for (name, d) in row {
                match parts.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, v)) => v.push(d),
                    None => parts.push((name, vec![d])),
                }
            }
        }
        assert_eq!(vm.state().expect("state").vcpus.len(), usize::from(vcpus));
        vm.take_dirty().expect("take_dirty");
        vm.resume();
    }
    let after = cpu_sample();
    let p = progress(&vm);
    assert!(p > 0, "the ledger made no progress");
    assert_running(&vm, &sink, "pause bench");
    PauseFigures {
        total: stats(times),
        parts: parts.into_iter().map(|(n, v)| (n, stats(v))).collect(),
        other: others(&before, &after).0,
    }
}

// ---------------------------------------------------------------------------------------------
// 2. take_dirty

struct DirtyFigures {
    paced: Stats,
    paced_pages: usize,
    paced_other: f64,
    vmm_all: Stats,
    vmm_all_pages: usize,
    vmm_all_other: f64,
}

/// (a) and (c) on one VM of `bytes`.
fn bench_dirty(bytes: u64, epochs: usize) -> DirtyFigures {
    let mut config = VmConfig::new(bytes);
    config.dirty_logging = true;
    let w = workload(
        "dirty",
        &[
            ("rate", "25000"),
            ("working-set", "128M"),
            ("pattern", "sequential"),
        ],
    );
    let sink = MemorySink::default();
    let mut vm = boot(&config, &w, &sink);
    std::thread::sleep(Duration::from_millis(100));
    vm.pause().expect("pause");
    vm.take_dirty().expect("take_dirty");

    // (a) ~2k guest-dirtied pages per epoch.
    let mut times = Vec::with_capacity(epochs);
    let mut counts = Vec::with_capacity(epochs);
    let before = cpu_sample();
    for _ in 0..epochs {
        vm.resume();
        std::thread::sleep(Duration::from_millis(80));
        vm.pause().expect("pause");
        let t = Instant::now();
        let d = vm.take_dirty().expect("take_dirty");
        times.push(t.elapsed());
        counts.push(d.count());
    }
    let after = cpu_sample();
    assert_running(&vm, &sink, "take_dirty (a)");
    let paced = stats(times);
    let paced_pages = median_u(counts);
    let paced_other = others(&before, &after).0;

    // (c) every page dirty, written by the VMM while the guest is paused.
    let total_pages = (bytes / PAGE_SIZE) as usize;
    let vmm_epochs = (epochs / 2).max(10);
    let mut times = Vec::with_capacity(vmm_epochs);
    let before = cpu_sample();
    for _ in 0..vmm_epochs {
        vm.resume();
        std::thread::sleep(Duration::from_millis(5));
        vm.pause().expect("pause");
        let mem = Arc::clone(vm.memory());
        let mut b = [0u8; 1];
        for gpa in (0..bytes).step_by(PAGE_SIZE as usize) {
            // Write back the byte that is there: every page dirty, no content changed.
            mem.read(gpa, &mut b).expect("read");
            mem.write(gpa, &b).expect("write");
        }
        let t = Instant::now();
        let d = vm.take_dirty().expect("take_dirty");
        times.push(t.elapsed());
        assert_eq!(d.count(), total_pages, "all pages dirty");
    }
    let after = cpu_sample();
    assert_running(&vm, &sink, "take_dirty (c)");
    DirtyFigures {
        paced,
        paced_pages,
        paced_other,
        vmm_all: stats(times),
        vmm_all_pages: total_pages,
        vmm_all_other: others(&before, &after).0,
    }
}

/// (b) every page dirty, nearly all of them in KVM's log: each epoch the unpaced `dirty` guest
/// makes one sequential pass over the whole data area (`DATA_GPA`..end), and the VMM writes back
/// one byte of each page below `DATA_GPA` (256 pages) that the guest does not write.
/// Returns (take_dirty stats, pages, guest-dirtied pages, epoch length p50, other cores).
fn bench_dirty_all(bytes: u64, epochs: usize) -> (Stats, usize, usize, Duration, f64) {
    let mut config = VmConfig::new(bytes);
    config.dirty_logging = true;
    let ws_bytes = bytes - DATA_GPA;
    let ws_pages = ws_bytes / PAGE_SIZE;
    let ws = format!("{}K", ws_bytes / 1024);
    let w = workload(
        "dirty",
        &[
            ("rate", "0"),
            ("working-set", ws.as_str()),
            ("pattern", "sequential"),
            ("mix", "zero=100,dup=0,text=0,random=0"),
        ],
    );
    let sink = MemorySink::default();
    let mut vm = boot(&config, &w, &sink);
    std::thread::sleep(Duration::from_millis(50));
    vm.pause().expect("pause");
    vm.take_dirty().expect("take_dirty");
    let total_pages = (bytes / PAGE_SIZE) as usize;
    let mut times = Vec::with_capacity(epochs);
    let mut epoch_len = Vec::with_capacity(epochs);
    let mut guest_pages = Vec::with_capacity(epochs);
    let before = cpu_sample();
    for _ in 0..epochs {
        let p0 = progress(&vm);
        let start = Instant::now();
        vm.resume();
        while progress(&vm) < p0 + ws_pages + 1 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the dirty guest is too slow"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        vm.pause().expect("pause");
        epoch_len.push(start.elapsed());
        let mem = Arc::clone(vm.memory());
        let mut b = [0u8; 1];
        for gpa in (0..DATA_GPA).step_by(PAGE_SIZE as usize) {
            mem.read(gpa, &mut b).expect("read");
            mem.write(gpa, &b).expect("write");
        }
        let t = Instant::now();
        let d = vm.take_dirty().expect("take_dirty");
        times.push(t.elapsed());
        assert_eq!(d.count(), total_pages, "all pages dirty");
        guest_pages.push(d.pages().filter(|g| *g >= DATA_GPA).count());
    }
    let after = cpu_sample();
    assert_running(&vm, &sink, "take_dirty (b)");
    (
        stats(times),
        total_pages,
        median_u(guest_pages),
        stats(epoch_len).p50,
        others(&before, &after).0,
    )
}

// ---------------------------------------------------------------------------------------------
// 3. restore

struct RestoreFigures {
    from_fds: Stats,
    restore: Stats,
    first_progress: Stats,
    total: Stats,
    other: f64,
}

/// Time of one poll of the progress counter: a volatile read and a `sched_yield` (the
/// granularity of the restore measurement).
fn poll_granularity() -> Duration {
    let sink = MemorySink::default();
    let mut vm = boot(
        &VmConfig::new(16 * MIB),
        &workload("idle", &[("spins", "1")]),
        &sink,
    );
    vm.pause().expect("pause");
    let n = 200_000u32;
    let t = Instant::now();
    let mut acc = 0u64;
    for _ in 0..n {
        acc = acc.wrapping_add(progress(&vm));
        std::thread::yield_now();
    }
    std::hint::black_box(acc);
    t.elapsed() / n
}

/// Like [`bench_restore`], but the VM is made ahead of time ([`Vm::prepare_restore`], as the
/// backup does while it replicates): timed from `PreparedRestore::restore` to the guest's
/// progress counter moving. Returns (restore call, total).
fn bench_prepared_restore(bytes: u64, rounds: usize) -> (Stats, Stats) {
    let w = workload("idle", &[("spins", "1")]);
    let sink = MemorySink::default();
    let mut vm = boot(&VmConfig::new(bytes), &w, &sink);
    std::thread::sleep(Duration::from_millis(20));
    let warmup = 3;
    let (mut call, mut total) = (vec![], vec![]);
    for i in 0..rounds + warmup {
        vm.pause().expect("pause");
        let state: VmState = vm.state().expect("state");
        let specs = vm.memory().specs();
        let fds = vm.memory().clone_fds().expect("dup memfds");
        let p0 = progress(&vm);
        drop(vm);
        let gate = OutputGate::passthrough(Box::new(sink.clone()));
        let memory = GuestMemory::from_fds(&specs, fds, false).expect("from_fds");
        let n = u8::try_from(state.vcpus.len()).expect("vcpus");
        let prepared = Vm::prepare_restore(memory, n, state.irqchip, false)
            .unwrap_or_else(|e| panic!("Vm::prepare_restore on /dev/kvm failed: {e}"));

        let t0 = Instant::now();
        let vm2 = prepared
            .restore(&state, gate, false)
            .unwrap_or_else(|e| panic!("PreparedRestore::restore failed: {e}"));
        let t1 = Instant::now();
        let mem = Arc::clone(vm2.memory());
        let mut spins = 0u64;
        while mem.read_u64(PROGRESS_GPA).expect("progress") == p0 {
            spins += 1;
            if spins.is_multiple_of(1 << 20) {
                assert!(
                    t1.elapsed() < Duration::from_secs(5),
                    "the restored guest did not run"
                );
            }
            std::thread::yield_now();
        }
        let t2 = Instant::now();
        if i >= warmup {
            call.push(t1 - t0);
            total.push(t2 - t0);
        }
        vm = vm2;
    }
    assert_running(&vm, &sink, "prepared restore");
    (stats(call), stats(total))
}

fn bench_restore(bytes: u64, rounds: usize) -> RestoreFigures {
    let w = workload("idle", &[("spins", "1")]);
    let sink = MemorySink::default();
    let mut vm = boot(&VmConfig::new(bytes), &w, &sink);
    std::thread::sleep(Duration::from_millis(20));
    let warmup = 3;
    let (mut a, mut b, mut c, mut total) = (vec![], vec![], vec![], vec![]);
    let before = cpu_sample();
    for i in 0..rounds + warmup {
        vm.pause().expect("pause");
        let state: VmState = vm.state().expect("state");
        let specs = vm.memory().specs();
        let fds = vm.memory().clone_fds().expect("dup memfds");
        let p0 = progress(&vm);
        drop(vm);
        let gate = OutputGate::passthrough(Box::new(sink.clone()));

        let t0 = Instant::now();
        let memory = GuestMemory::from_fds(&specs, fds, false).expect("from_fds");
        let t1 = Instant::now();
        let vm2 = Vm::restore(memory, &state, gate, false, false)
            .unwrap_or_else(|e| panic!("Vm::restore on /dev/kvm failed: {e}"));
        let t2 = Instant::now();
        let mem = Arc::clone(vm2.memory());
        let mut spins = 0u64;
        while mem.read_u64(PROGRESS_GPA).expect("progress") == p0 {
            spins += 1;
            if spins.is_multiple_of(1 << 20) {
                assert!(
                    t2.elapsed() < Duration::from_secs(5),
                    "the restored guest did not run"
                );
            }
            // Yield rather than spin: on 2 cores with one busy elsewhere, a pure spin keeps
            // the new vCPU thread off a CPU for a whole scheduler slice (~6 ms measured).
            std::thread::yield_now();
        }
        let t3 = Instant::now();
        if i >= warmup {
            a.push(t1 - t0);
            b.push(t2 - t1);
            c.push(t3 - t2);
            total.push(t3 - t0);
        }
        vm = vm2;
    }
    let after = cpu_sample();
    assert_running(&vm, &sink, "restore");
    RestoreFigures {
        from_fds: stats(a),
        restore: stats(b),
        first_progress: stats(c),
        total: stats(total),
        other: others(&before, &after).0,
    }
}

// ---------------------------------------------------------------------------------------------

fn header() {
    let cmd = |c: &str, args: &[&str]| -> String {
        Command::new(c)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "?".into());
    let vmx = cpuinfo.contains(" vmx") || cpuinfo.contains(" svm");
    println!("understudy-vmm bench: pause, take_dirty, restore on real KVM");
    println!(
        "date:    {}",
        cmd("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
    );
    println!(
        "host:    {model}, nproc {}, kernel {}, {}",
        cmd("nproc", &[]),
        cmd("uname", &["-r"]),
        if vmx {
            "vmx/svm present"
        } else {
            "no vmx/svm flag (PVM KVM)"
        }
    );
    println!(
        "load:    {} (loadavg at start)",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}

/// Section 4: `faults` on-demand page round trips on a `LazyMemory` of `bytes`. Returns (the
/// access as the faulting thread sees it, the handler's part, other load).
fn bench_uffd(bytes: u64, faults: usize) -> (Stats, Stats, f64) {
    let specs = [understudy_vmm::RegionSpec {
        gpa: 0,
        size: bytes,
    }];
    let source = GuestMemory::new(&specs).expect("source memory");
    for p in (0..bytes / PAGE_SIZE).step_by(7) {
        source
            .write_untracked(p * PAGE_SIZE, &p.to_le_bytes())
            .expect("source page");
    }
    let staging = GuestMemory::new(&specs).expect("destination memfd");
    let (memory, lazy) = understudy_vmm::LazyMemory::map(&specs, staging.clone_fds().unwrap())
        .unwrap_or_else(|e| panic!("userfaultfd minor mode: {e}"));
    drop(staging);
    let lazy = Arc::new(lazy);
    let source = Arc::new(source);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler = {
        let (lazy, source, done) = (Arc::clone(&lazy), Arc::clone(&source), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut times = Vec::new();
            let mut page = vec![0u8; PAGE_SIZE as usize];
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let Some(f) = lazy
                    .wait_fault(Duration::from_millis(5))
                    .expect("wait_fault")
                else {
                    continue;
                };
                let t = Instant::now();
                source.read(f.gpa, &mut page).expect("source read");
                lazy.fill(f.page_index, &page).expect("fill");
                times.push(t.elapsed());
            }
            times
        })
    };
    let pages = bytes / PAGE_SIZE;
    let n = (faults as u64).min(pages);
    let stride = (pages / n).max(1);
    let cpu0 = cpu_sample();
    let mut access = Vec::with_capacity(n as usize);
    for i in 0..n {
        let gpa = i * stride * PAGE_SIZE;
        let t = Instant::now();
        let v = memory.read_u64(gpa).expect("read");
        access.push(t.elapsed());
        std::hint::black_box(v);
    }
    let cpu1 = cpu_sample();
    done.store(true, std::sync::atomic::Ordering::Release);
    let handled = handler.join().expect("handler");
    (stats(access), stats(handled), others(&cpu0, &cpu1).0)
}

fn main() {
    require_kvm();
    Vm::warm_up().unwrap_or_else(|e| panic!("warming up KVM (/dev/kvm) failed: {e}"));
    header();
    let pauses = env_usize("BENCH_PAUSES", 2500).max(1);
    let dirty_epochs = env_usize("BENCH_DIRTY_EPOCHS", 60).max(2);
    let restores = env_usize("BENCH_RESTORES", 200).max(1);
    let sections =
        std::env::var("BENCH_SECTIONS").unwrap_or_else(|_| "pause,dirty,restore,uffd".into());
    let run = |name: &str| sections.split(',').any(|s| s.trim() == name);
    let started = Instant::now();
    let cpu0 = cpu_sample();
    let mut rows = Vec::new();

    eprintln!("[1/4] pause ...");
    let pause_vcpus = std::env::var("BENCH_PAUSE_VCPUS").unwrap_or_else(|_| "1,2".into());
    let pause_vcpus = pause_vcpus
        .split(',')
        .filter_map(|v| v.trim().parse::<u8>().ok());
    for vcpus in pause_vcpus.filter(|_| run("pause")) {
        let f = bench_pause(vcpus, pauses);
        rows.push(Row {
            what: format!("pause, {vcpus} vCPU, ledger unpaced, dirty log on"),
            stats: f.total,
            target: (vcpus == 1).then_some(Duration::from_micros(100)),
            reference: if vcpus == 1 {
                "target p99 <= 100 us; ref p50 31 / p99 54 us".into()
            } else {
                "(no target); ref (1 vCPU) p50 31 / p99 54 us".into()
            },
            other_cores: f.other,
        });
        if vcpus == 1 {
            for (part, s) in f.parts {
                rows.push(Row {
                    what: format!("pause, {vcpus} vCPU, part: {part}"),
                    stats: s,
                    target: None,
                    reference: "-".into(),
                    other_cores: f.other,
                });
            }
        }
    }

    eprintln!("[2/4] take_dirty ...");
    let mut notes = Vec::new();
    let mut vmm_rows = Vec::new();
    let sizes = [(256 * MIB, "256 MiB"), (GIB, "1 GiB")];
    for (bytes, name) in sizes.into_iter().filter(|_| run("dirty")) {
        let f = bench_dirty(bytes, dirty_epochs);
        rows.push(Row {
            what: format!(
                "take_dirty {name}, (a) ~2k dirty: median {} guest-dirtied pages",
                f.paced_pages
            ),
            stats: f.paced,
            target: None,
            reference: if bytes == 256 * MIB {
                "ref GET_DIRTY_LOG 256 MiB ~2k dirty: p50 56 us".into()
            } else {
                "-".into()
            },
            other_cores: f.paced_other,
        });
        vmm_rows.push(Row {
            what: format!(
                "take_dirty {name}, (c) all {} dirty, VMM-written only",
                f.vmm_all_pages
            ),
            stats: f.vmm_all,
            target: None,
            reference: "- (KVM log clean: take_dirty's fixed cost)".into(),
            other_cores: f.vmm_all_other,
        });
    }
    let all_epochs = (dirty_epochs / 4).clamp(2, 15);
    for (bytes, name) in sizes.into_iter().filter(|_| run("dirty")) {
        let (s, pages, guest, epoch, other) = bench_dirty_all(bytes, all_epochs);
        rows.push(Row {
            what: format!(
                "take_dirty {name}, (b) all {pages} dirty: {guest} guest + {} VMM-written",
                pages - guest
            ),
            stats: s,
            target: None,
            reference: if bytes == GIB {
                "ref GET_DIRTY_LOG 1 GiB all dirty: ~1.5 ms".into()
            } else {
                "-".into()
            },
            other_cores: other,
        });
        notes.push(format!(
            "{name}: one pass took {:.2} s (p50)",
            epoch.as_secs_f64()
        ));
    }
    rows.extend(vmm_rows);

    eprintln!("[3/4] restore ...");
    let grain = poll_granularity();
    for (bytes, name) in sizes.into_iter().filter(|_| run("restore")) {
        let f = bench_restore(bytes, restores);
        let reference = if bytes == GIB {
            "target <= 1 ms (p99); ref 0.59 ms"
        } else {
            "ref 0.44 ms"
        };
        for (part, s, target, r) in [
            ("GuestMemory::from_fds (mmap)", f.from_fds, false, "-"),
            ("Vm::restore", f.restore, false, "-"),
            (
                "restore return -> progress moved",
                f.first_progress,
                false,
                "-",
            ),
            (
                "total: from_fds -> guest executed",
                f.total,
                bytes == GIB,
                reference,
            ),
        ] {
            rows.push(Row {
                what: format!("restore {name}: {part}"),
                stats: s,
                target: target.then_some(Duration::from_millis(1)),
                reference: r.into(),
                other_cores: f.other,
            });
        }
        let (call, total) = bench_prepared_restore(bytes, restores);
        for (part, s, target) in [
            ("PreparedRestore::restore", call, false),
            ("total: state load -> guest executed", total, bytes == GIB),
        ] {
            rows.push(Row {
                what: format!("restore {name}, VM prepared ahead (the backup's path): {part}"),
                stats: s,
                target: target.then_some(Duration::from_millis(1)),
                reference: "-".into(),
                other_cores: f.other,
            });
        }
    }

    eprintln!("[4/4] uffd ...");
    if run("uffd") {
        let faults = env_usize("BENCH_UFFD_FAULTS", 5000).max(1);
        let (access, handler, other) = bench_uffd(256 * MIB, faults);
        for (part, s) in [
            (
                "VMM access to an absent page (fault -> fill -> woken)",
                access,
            ),
            (
                "handler: fault read -> pwrite + UFFDIO_CONTINUE done",
                handler,
            ),
        ] {
            rows.push(Row {
                what: format!("uffd minor fault 256 MiB: {part}"),
                stats: s,
                target: None,
                reference: "-".into(),
                other_cores: other,
            });
        }
    }

    let cpu1 = cpu_sample();
    let (other, steal) = others(&cpu0, &cpu1);
    println!();
    print_table(&rows);
    println!();
    println!("notes:");
    println!("- percentiles are nearest-rank: with fewer than 100 samples p99 is the max.");
    println!(
        "- pause = duration of vm.pause(): kick to all vCPUs parked with state saved; epochs of \
         0.2-0.8 ms, take_dirty + resume between pauses; the 2nd vCPU spins in the park loop."
    );
    println!(
        "- take_dirty (a): dirty guest paced at 25k pages/s, 80 ms epochs, sequential over 128 MiB: \
         the pages are in KVM's dirty log."
    );
    println!(
        "- take_dirty (b): unpaced dirty guest, one sequential pass over the whole data area \
         (DATA_GPA..end) per epoch, so those pages are in KVM's log; the 256 pages below DATA_GPA \
         made dirty by GuestMemory::write (1 byte per page, written back) while paused; {}.",
        notes.join("; ")
    );
    println!(
        "- take_dirty (c): every page made dirty by GuestMemory::write alone while paused: \
         reported from the VMM's bitmap, KVM's log holds only the paced guest's few pages."
    );
    println!(
        "- restore: idle guest (spins=1, the counter moves every few ns of guest time); progress \
         polled in a loop of read + sched_yield, one poll = {:.2} us (the granularity of the \
         'progress moved' rows); each round restores from the previous VM's state; dropping the \
         previous VM is not timed.",
        grain.as_secs_f64() * 1e6
    );
    if run("uffd") {
        println!(
            "- uffd: LazyMemory over a fallocated 256 MiB memfd, no VM; the VMM reads one u64 of \
             an absent page at a time (strided over the memory); a handler thread copies the page \
             from a source mapping and fill()s it (pwrite + UFFDIO_CONTINUE, which wakes the \
             reader). A vCPU's fault adds KVM's exit and shadow walk (vmm/tests/postcopy.rs)."
        );
    }
    println!(
        "- machine: other processes used {other:.2} cores on average during the run, steal \
         {steal:.2} cores; bench wall time {:.1} s.",
        started.elapsed().as_secs_f64()
    );
}
