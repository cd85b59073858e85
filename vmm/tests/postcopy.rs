//! Postcopy's destination side against real KVM: a VM restored on memory whose pages arrive on
//! demand through userfaultfd (`LazyMemory`, minor faults on fallocated memfds) runs the ledger
//! on exactly as if its memory had been copied first.
//!
//! These tests need `/dev/kvm` (and userfaultfd); without it they fail, never skip.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use understudy_vmm::guests::{ledger_ticks, LedgerParams, Workload};
use understudy_vmm::memory::split_regions;
use understudy_vmm::{
    Boot, GuestMemory, LazyMemory, MemorySink, OutputGate, Vm, VmConfig, PAGE_SIZE,
};

/// Fails (never skips) when the machine has no usable KVM.
fn require_kvm() {
    if let Err(e) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs read-write access to /dev/kvm, which failed: {e}");
    }
}

/// One KVM test at a time: the machines have two cores and the latencies need them.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(name: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "{name}: n={} p50={:?} p99={:?} max={:?}",
        v.len(),
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v.last().copied().unwrap_or_default()
    )
}

fn read_page(memory: &GuestMemory, page: u64) -> Vec<u8> {
    let mut gpa = page * PAGE_SIZE;
    // Page indices count over regions in order; the regions here are contiguous from 0.
    debug_assert!(memory
        .specs()
        .windows(2)
        .all(|w| w[0].gpa + w[0].size == w[1].gpa));
    gpa += memory.specs()[0].gpa;
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    memory.read(gpa, &mut buf).unwrap();
    buf
}

/// A running ledger is paused and its state saved; a new VM is restored on fresh, fallocated
/// memfds registered with `LazyMemory`, with none of the old memory copied. A handler thread
/// fills each faulting page from the old VM's memory, a pusher thread fills all pages in order
/// in the background, and a probe thread touches absent pages from the VMM to time the stall an
/// access sees. The guest must continue its ledger exactly (next tick numbers, no CORRUPT), some
/// faults must have been served on demand, and once every page is present, each page the
/// restored guest has not written since (dirty log) must equal the source at the pause.
#[test]
fn ledger_continues_on_memory_filled_on_demand() {
    let _one = serial();
    require_kvm();
    let specs = split_regions(64 << 20, 2);
    let w = Workload::Ledger(LedgerParams {
        pages: 4096,
        ..LedgerParams::default()
    });
    let sink = MemorySink::default();
    let config = VmConfig {
        regions: specs.clone(),
        vcpus: 1,
        dirty_logging: false,
        backing: Default::default(),
    };
    let mut vm = Vm::boot(
        &config,
        Boot::Workload(&w),
        OutputGate::passthrough(Box::new(sink.clone())),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    vm.pause().unwrap();
    let state = vm.state().unwrap();
    let before = sink.text();
    assert!(ledger_ticks(&before).len() >= 2, "{before}");
    // The source: the old VM's memory, frozen from here on.
    let source = vm.shutdown();
    let pages = source.size() / PAGE_SIZE;
    let snapshot: Vec<u8> = {
        let mut v = Vec::with_capacity(source.size() as usize);
        source.write_image(&mut v).unwrap();
        v
    };

    // Destination: fresh, fallocated memfds (GuestMemory::new), mapped a second time without
    // populating and registered for minor faults.
    let staging = GuestMemory::new(&specs).unwrap();
    let (memory, lazy) = LazyMemory::map(&specs, staging.clone_fds().unwrap()).unwrap();
    drop(staging);
    let lazy = Arc::new(lazy);
    let stop = Arc::new(AtomicBool::new(false));
    let on_demand = Arc::new(AtomicU64::new(0));

    // Fault handler: copy the page from the source, write it into the memfd, CONTINUE.
    let handler = {
        let (lazy, source, stop, on_demand) = (
            Arc::clone(&lazy),
            Arc::clone(&source),
            Arc::clone(&stop),
            Arc::clone(&on_demand),
        );
        std::thread::Builder::new()
            .name("uffd-handler".into())
            .spawn(move || {
                let mut latencies = Vec::new();
                let mut repeats = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let Some(f) = lazy.wait_fault(Duration::from_millis(10)).unwrap() else {
                        continue;
                    };
                    let t = Instant::now();
                    let page = read_page(&source, f.page_index);
                    let wrote = lazy.fill(f.page_index, &page).unwrap();
                    if wrote == 1 {
                        latencies.push(t.elapsed());
                        on_demand.fetch_add(1, Ordering::Relaxed);
                    } else {
                        // Already present or being filled by the pusher (whose CONTINUE wakes
                        // the faulting thread).
                        repeats += 1;
                    }
                }
                (latencies, repeats)
            })
            .unwrap()
    };

    let restored = MemorySink::default();
    let t_restore = Instant::now();
    let mut vm2 = Vm::restore(
        Arc::clone(&memory),
        &state,
        OutputGate::passthrough(Box::new(restored.clone())),
        true,
        false,
    )
    .unwrap();

    // Probe: the stall a first access sees (fault raised, handled, woken), from the VMM side.
    let probe = {
        let (lazy, memory, stop) = (Arc::clone(&lazy), Arc::clone(&memory), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut stalls = Vec::new();
            let mut p = pages - 1;
            while !stop.load(Ordering::Acquire) && stalls.len() < 300 && p > 0 {
                if !lazy.is_present(p) {
                    let t = Instant::now();
                    read_page(&memory, p);
                    stalls.push(t.elapsed());
                }
                p = p.saturating_sub(37);
                std::thread::sleep(Duration::from_micros(500));
            }
            stalls
        })
    };

    // Let the guest fault its working set in on demand before the background push starts.
    std::thread::sleep(Duration::from_millis(150));
    let demand_before_push = on_demand.load(Ordering::Relaxed);
    let t_push = Instant::now();
    let pushed = {
        let (lazy, source) = (Arc::clone(&lazy), Arc::clone(&source));
        std::thread::spawn(move || {
            let batch = 64u64;
            let mut pushed = 0;
            let mut p = 0;
            let mut buf = Vec::with_capacity((batch * PAGE_SIZE) as usize);
            while p < pages {
                let n = batch.min(pages - p);
                buf.clear();
                for i in 0..n {
                    buf.extend_from_slice(&read_page(&source, p + i));
                }
                pushed += lazy.fill(p, &buf).unwrap();
                p += n;
                // About 256 MB/s: a fast link, slow enough that faults keep coming meanwhile.
                std::thread::sleep(Duration::from_micros(900));
            }
            pushed
        })
        .join()
        .unwrap()
    };
    let push_time = t_push.elapsed();
    let all_present_after = t_restore.elapsed();
    assert!(lazy.all_present(), "{lazy:?}");

    // Let the guest run on complete memory, then stop it and check.
    std::thread::sleep(Duration::from_millis(300));
    vm2.pause().unwrap();
    stop.store(true, Ordering::Release);
    let (latencies, repeats) = handler.join().unwrap();
    let stalls = probe.join().unwrap();
    assert_eq!(vm2.exit_reason(), None);

    let after = restored.text();
    let all = format!("{before}{after}");
    assert!(!all.contains("CORRUPT"), "{all}");
    let t_before = ledger_ticks(&before);
    let t_after = ledger_ticks(&after);
    assert!(t_after.len() >= 3, "the restored VM did not tick: {after}");
    let t_all = ledger_ticks(&all);
    assert!(
        t_all.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks: {t_all:?}"
    );
    // (The pause may cut a line; the joined console is what must read as one run.)
    assert!(t_all.last() > t_before.last(), "{all}");

    let served = on_demand.load(Ordering::Relaxed);
    assert!(served > 0, "no fault was served on demand");
    assert_eq!(served + pushed, pages, "every page filled exactly once");

    // Every page the restored guest did not write since the restore equals the source.
    let dirty: std::collections::BTreeSet<u64> = vm2.take_dirty().unwrap().pages().collect();
    let mut compared = 0;
    for page in 0..pages {
        let gpa = specs[0].gpa + page * PAGE_SIZE;
        if dirty.contains(&gpa) {
            continue;
        }
        let at = (page * PAGE_SIZE) as usize;
        assert!(
            read_page(&memory, page) == snapshot[at..at + PAGE_SIZE as usize],
            "page {page} (gpa {gpa:#x}) differs from the source"
        );
        compared += 1;
    }
    assert!(
        compared > pages / 2,
        "only {compared} of {pages} pages compared"
    );
    drop(vm2);
    let lazy = Arc::try_unwrap(lazy).expect("threads are done");
    let faults = lazy.faults_seen();
    lazy.unregister().unwrap();

    eprintln!(
        "postcopy: {pages} pages; {} faults read, {served} served on demand \
         ({demand_before_push} before the push started), {repeats} already present/in flight; \
         {pushed} pushed in {push_time:?}; all present {all_present_after:?} after restore; \
         {} ticks after restore; {compared} untouched pages equal the source, {} dirtied",
        faults,
        t_after.len(),
        dirty.len(),
    );
    eprintln!(
        "{}",
        summary("fault read -> page written + CONTINUE done", latencies)
    );
    eprintln!(
        "{}",
        summary(
            "VMM access to an absent page (fault + handler + wake)",
            stalls
        )
    );
}

/// On PVM a vCPU waiting for a page cannot leave `KVM_RUN`: KVM's shadow page-table walker
/// reads the guest's page tables with `__get_user`, the kick's signal makes the wait give up,
/// and the walk is retried at once, inside the kernel, until the page is present (the thread
/// spins meanwhile). So `pause()` waits for the pending page: here it returns once a helper
/// fills the memory 300 ms after the kick, and the guest continues correctly.
#[test]
fn pause_waits_for_a_pending_fault() {
    let _one = serial();
    require_kvm();
    let specs = split_regions(32 << 20, 1);
    let w = Workload::Ledger(LedgerParams {
        pages: 256,
        ..LedgerParams::default()
    });
    let sink = MemorySink::default();
    let mut vm = Vm::boot(
        &VmConfig::new(32 << 20),
        Boot::Workload(&w),
        OutputGate::passthrough(Box::new(sink.clone())),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    vm.pause().unwrap();
    let state = vm.state().unwrap();
    let source = vm.shutdown();
    let staging = GuestMemory::new(&specs).unwrap();
    let (memory, lazy) = LazyMemory::map(&specs, staging.clone_fds().unwrap()).unwrap();
    let lazy = Arc::new(lazy);
    let restored = MemorySink::default();
    let mut vm2 = Vm::restore(
        Arc::clone(&memory),
        &state,
        OutputGate::passthrough(Box::new(restored.clone())),
        false,
        false,
    )
    .unwrap();
    let f = lazy
        .wait_fault(Duration::from_secs(5))
        .unwrap()
        .expect("the restored vCPU faults on its first page");
    // Nobody answers yet: the vCPU waits in the fault. Pause it; a helper serves every page
    // 300 ms later and measures the vCPU thread's CPU time meanwhile.
    let helper = {
        let (lazy, source) = (Arc::clone(&lazy), Arc::clone(&source));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let c0 = vcpu_cpu_time();
            std::thread::sleep(Duration::from_millis(250));
            let spun = vcpu_cpu_time().saturating_sub(c0);
            let mut buf = vec![0u8; source.size() as usize];
            source.read(0, &mut buf).unwrap();
            lazy.fill(0, &buf).unwrap();
            spun
        })
    };
    let t = Instant::now();
    let paused = vm2.pause();
    let pause_time = t.elapsed();
    let spun = helper.join().unwrap();
    eprintln!(
        "first fault {f:?}; pause with that fault pending returned after {pause_time:?} \
         (pages served 300 ms after the kick): {paused:?}; the vCPU thread used {spun:?} of CPU \
         in 250 ms while it waited"
    );
    paused.unwrap();
    assert!(lazy.all_present());
    vm2.resume();
    std::thread::sleep(Duration::from_millis(300));
    vm2.pause().unwrap();
    assert_eq!(vm2.exit_reason(), None);
    let all = format!("{}{}", sink.text(), restored.text());
    assert!(!all.contains("CORRUPT"), "{all}");
    let t = ledger_ticks(&all);
    assert!(ledger_ticks(&restored.text()).len() >= 2, "{all}");
    assert!(t.windows(2).all(|w| w[1] == w[0] + 1), "ticks: {t:?}");
}

/// CPU time used so far by this process's vCPU threads (from `/proc/self/task/*/schedstat`).
fn vcpu_cpu_time() -> Duration {
    let mut ns = 0;
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.starts_with("vcpu") {
            let s = std::fs::read_to_string(e.path().join("schedstat")).unwrap_or_default();
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(ns)
}
