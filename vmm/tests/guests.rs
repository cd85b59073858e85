//! The built-in guests under KVM: `dirty` holds its page rate, `ledger` ticks and stops, its
//! memory matches the Rust model exactly, it survives being captured and restored into a copy
//! of its memory at arbitrary instants, and it reports stale and torn pages as CORRUPT.
//!
//! These tests need `/dev/kvm`; without it they fail (they never pass silently).

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use understudy_vmm::guests::layout::*;
use understudy_vmm::guests::model::{self, Ledger, Rng, WORDS_PER_PAGE};
use understudy_vmm::guests::{DirtyParams, LedgerParams, Pattern, Workload};
use understudy_vmm::{Boot, ExitReason, GuestMemory, OutputGate, Vm, VmConfig};

/// One KVM test at a time: the machines have two cores and the rate checks need one of them.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the guest tests run the built-in guests under KVM and need \
         /dev/kvm (a host with KVM, and access to /dev/kvm for this user)"
    );
}

/// Collects console output.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn boot(w: &Workload, memory: u64, dirty_logging: bool) -> (Vm, Console) {
    boot_vcpus(w, memory, dirty_logging, 1)
}

fn boot_vcpus(w: &Workload, memory: u64, dirty_logging: bool, vcpus: u8) -> (Vm, Console) {
    require_kvm();
    let console = Console::default();
    let config = VmConfig {
        dirty_logging,
        backing: Default::default(),
        vcpus,
        ..VmConfig::new(memory)
    };
    let gate = OutputGate::passthrough(Box::new(console.clone()));
    let vm = Vm::boot(&config, Boot::Workload(w), gate)
        .unwrap_or_else(|e| panic!("booting {} failed: {e}", w.name()));
    (vm, console)
}

fn read_u64(vm: &Vm, gpa: u64) -> u64 {
    vm.memory().read_u64(gpa).unwrap()
}

fn cb(vm: &Vm, offset: u64) -> u64 {
    read_u64(vm, CONTROL_GPA + offset)
}

fn page(mem: &GuestMemory, index: u64) -> Vec<u64> {
    let mut bytes = vec![0u8; PAGE_SIZE as usize];
    mem.read(DATA_GPA + index * PAGE_SIZE, &mut bytes).unwrap();
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Checks that `text` is the ledger banner followed by `tick 1 ok` .. `tick n ok` and nothing
/// else; returns n.
fn check_ticks(text: &str) -> u64 {
    assert!(!text.contains("CORRUPT"), "console:\n{text}");
    let mut lines = text.lines();
    let banner = lines.next().unwrap_or_default();
    assert!(banner.starts_with("ledger pages="), "console:\n{text}");
    let mut n = 0;
    for line in lines {
        n += 1;
        assert_eq!(line, format!("tick {n} ok"), "console:\n{text}");
    }
    n
}

#[test]
fn dirty_holds_its_rate_under_dirty_logging() {
    let _one = serial();
    let mut report = Vec::new();
    for rate in [2_000u64, 10_000, 30_000] {
        let w = Workload::Dirty(DirtyParams {
            rate,
            working_set_bytes: 64 << 20,
            pattern: Pattern::Random,
            ..DirtyParams::default()
        });
        let (mut vm, _console) = boot(&w, 256 << 20, true);
        // Replicate-like epochs: collect the dirty log every 100 ms, so that most writes are a
        // page's first write in its epoch (the expensive case under dirty logging).
        let epoch = Duration::from_millis(100);
        let start = Instant::now();
        let warmup = Duration::from_millis(500);
        let measure = Duration::from_millis(2_500);
        let mut first = None;
        let mut dirty_pages = 0;
        let mut next = start + epoch;
        while next <= start + warmup + measure {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            dirty_pages += vm.take_dirty().unwrap().count();
            if first.is_none() && next >= start + warmup {
                first = Some((Instant::now(), read_u64(&vm, PROGRESS_GPA)));
            }
            next += epoch;
        }
        let (t0, p0) = first.unwrap();
        let (t1, p1) = (Instant::now(), read_u64(&vm, PROGRESS_GPA));
        let measured = (p1 - p0) as f64 / (t1 - t0).as_secs_f64();
        let rebases = cb(&vm, PACE_REBASES_OFFSET);
        assert_eq!(vm.exit_reason(), None, "the dirty guest stopped");
        assert_eq!(cb(&vm, WORKLOAD_ID_OFFSET), WORKLOAD_ID_DIRTY);
        drop(vm);
        let line = format!(
            "dirty rate={rate}/s measured={measured:.0}/s ({:+.1}%) rebases={rebases} \
             dirty pages collected={dirty_pages}",
            (measured / rate as f64 - 1.0) * 100.0
        );
        eprintln!("{line}");
        report.push((rate, measured, line));
    }
    for (rate, measured, line) in report {
        let err = (measured / rate as f64 - 1.0).abs();
        assert!(err <= 0.10, "not within ±10% of the target: {line}");
    }
}

#[test]
fn dirty_catches_up_at_most_100ms_after_a_pause() {
    let _one = serial();
    let rate = 10_000u64;
    let w = Workload::Dirty(DirtyParams {
        rate,
        working_set_bytes: 16 << 20,
        ..DirtyParams::default()
    });
    let (mut vm, _console) = boot(&w, 64 << 20, false);
    std::thread::sleep(Duration::from_millis(500));
    vm.pause().unwrap();
    let rebases = cb(&vm, PACE_REBASES_OFFSET);
    std::thread::sleep(Duration::from_secs(1));
    let p0 = read_u64(&vm, PROGRESS_GPA);
    let t0 = Instant::now();
    vm.resume();
    std::thread::sleep(Duration::from_millis(1_000));
    let (p1, t1) = (read_u64(&vm, PROGRESS_GPA), Instant::now());
    let on_schedule = rate as f64 * (t1 - t0).as_secs_f64();
    let extra = (p1 - p0) as f64 - on_schedule;
    eprintln!(
        "dirty after a 1 s pause: {} pages in {:?}, {extra:+.0} beyond the schedule",
        p1 - p0,
        t1 - t0
    );
    // Catch-up is capped at 100 ms worth (1000 pages), not the 10000 pages of the pause.
    assert!(
        extra > 0.5 * (rate / 10) as f64 && extra < 1.5 * (rate / 10) as f64,
        "{} pages in {:?} after the pause",
        p1 - p0,
        t1 - t0
    );
    assert_eq!(cb(&vm, PACE_REBASES_OFFSET), rebases + 1);
}

#[test]
fn dirty_writes_the_content_mix() {
    let _one = serial();
    let pages = 4096u64;
    let w = Workload::from_cli(
        "dirty",
        &[
            ("rate", "0"),
            ("working-set", "16M"),
            ("pattern", "sequential"),
            ("mix", "zero=40,dup=10,text=30,random=20"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    )
    .unwrap();
    let (mut vm, _console) = boot(&w, 64 << 20, false);
    while read_u64(&vm, PROGRESS_GPA) < 3 * pages {
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.pause().unwrap();
    // The page the guest was writing when it was paused may be torn (half old, half new
    // content): leave it and its neighbours out.
    let cursor = read_u64(&vm, PROGRESS_GPA) % pages;
    let torn = |i: u64| (i + pages - cursor) % pages <= 1 || (cursor + pages - i) % pages <= 1;
    let templates: Vec<Vec<u64>> = (0..4).map(model::dup_template).collect();
    let mut counts = [0u64; 4]; // zero, dup, text, random
    for i in (0..pages).filter(|&i| !torn(i)) {
        let words = page(vm.memory(), i);
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let kind = if words.iter().all(|&w| w == 0) {
            0
        } else if templates.contains(&words) {
            1
        } else if bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b == b' ' || b == b'\n')
        {
            assert_eq!(bytes[bytes.len() - 1], b'\n', "text page {i}");
            let text = String::from_utf8(bytes).unwrap();
            assert!(
                text.split_whitespace()
                    .all(|w| understudy_vmm::guests::TEXT_WORDS.contains(&w)),
                "text page {i}: {text}"
            );
            assert!(text.lines().count() > 40, "text page {i}: {text}");
            2
        } else {
            3
        };
        counts[kind] += 1;
    }
    eprintln!("dirty content of {pages} pages: zero/dup/text/random = {counts:?}");
    for (count, pct) in counts.iter().zip([40u64, 10, 30, 20]) {
        let share = *count as f64 / pages as f64 * 100.0;
        assert!((share - pct as f64).abs() < 4.0, "{counts:?}");
    }
}

#[test]
fn dirty_hotcold_sends_most_writes_to_the_hot_pages() {
    let _one = serial();
    let pages = 4096u64;
    let hot = pages / 10;
    let w = Workload::Dirty(DirtyParams {
        rate: 20_000,
        working_set_bytes: pages * PAGE_SIZE,
        pattern: Pattern::HotCold {
            hot_set_pct: 10,
            hot_writes_pct: 90,
        },
        mix: understudy_vmm::guests::ContentMix {
            zero: 0,
            dup: 0,
            text: 0,
            random: 100,
        },
        ..DirtyParams::default()
    });
    let (mut vm, _console) = boot(&w, 64 << 20, false);
    while read_u64(&vm, PROGRESS_GPA) < 10_000 {
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.pause().unwrap();
    let writes = read_u64(&vm, PROGRESS_GPA);
    let written = |i: u64| page(vm.memory(), i).iter().any(|&w| w != 0);
    let hot_written = (0..hot).filter(|&i| written(i)).count() as u64;
    let cold_written = (hot..pages).filter(|&i| written(i)).count() as f64;
    let cold = (pages - hot) as f64;
    let expected = cold * (1.0 - (-(writes as f64) * 0.1 / cold).exp());
    eprintln!(
        "hotcold after {writes} writes: {hot_written}/{hot} hot pages, {cold_written} cold pages \
         written (expected ~{expected:.0})"
    );
    assert_eq!(hot_written, hot);
    assert!((cold_written / expected - 1.0).abs() < 0.25);
}

#[test]
fn idle_idles() {
    let _one = serial();
    let w = Workload::from_cli("idle", &Default::default()).unwrap();
    let (vm, console) = boot(&w, 64 << 20, false);
    std::thread::sleep(Duration::from_millis(300));
    let p0 = read_u64(&vm, PROGRESS_GPA);
    std::thread::sleep(Duration::from_millis(500));
    let p1 = read_u64(&vm, PROGRESS_GPA);
    assert!(p1 > p0, "idle makes no progress ({p0} -> {p1})");
    assert_eq!(vm.exit_reason(), None);
    assert_eq!(cb(&vm, WORKLOAD_ID_OFFSET), WORKLOAD_ID_IDLE);
    assert_eq!(console.text(), "");
    eprintln!("idle: {} rounds/s", (p1 - p0) * 2);
}

#[test]
fn ledger_ticks_in_order_and_matches_the_model() {
    let _one = serial();
    let p = LedgerParams {
        stop_after_ticks: 20,
        ..LedgerParams::default()
    };
    let (vm, console) = boot(&Workload::Ledger(p.clone()), 256 << 20, true);
    let t = Instant::now();
    let exit = vm.wait_exit(Duration::from_secs(60));
    let elapsed = t.elapsed();
    let text = console.text();
    assert_eq!(exit, Some(ExitReason::Guest(0)), "console:\n{text}");
    assert_eq!(check_ticks(&text), 20);
    eprintln!("ledger: 20 ticks in {elapsed:?}");

    // Memory matches the Rust model after exactly 20 * verify_every steps.
    let steps = cb(&vm, LEDGER_STEPS_OFFSET);
    assert_eq!(steps, 20 * p.verify_every);
    assert_eq!(cb(&vm, LEDGER_TICKS_OFFSET), 20);
    let mut m = Ledger::new(p.pages, p.seed);
    while m.steps < steps {
        m.step();
    }
    assert_eq!(cb(&vm, LEDGER_CHECKSUM_OFFSET), m.checksum);
    assert_eq!(cb(&vm, LEDGER_RNG_OFFSET), m.rng.0);
    for i in 0..p.pages {
        assert_eq!(
            page(vm.memory(), i),
            model::page_words(i, m.versions[i as usize]),
            "page {i}"
        );
    }
}

#[test]
fn ledger_runs_on_the_first_vcpu_only() {
    let _one = serial();
    let p = LedgerParams {
        pages: 256,
        stop_after_ticks: 5,
        ..LedgerParams::default()
    };
    let (vm, console) = boot_vcpus(&Workload::Ledger(p.clone()), 32 << 20, false, 2);
    let exit = vm.wait_exit(Duration::from_secs(30));
    let text = console.text();
    assert_eq!(exit, Some(ExitReason::Guest(0)), "console:\n{text}");
    assert_eq!(check_ticks(&text), 5);
    assert_eq!(cb(&vm, LEDGER_STEPS_OFFSET), 5 * p.verify_every);
}

#[test]
fn ledger_continues_from_a_copy_captured_at_any_instant() {
    let _one = serial();
    let p = LedgerParams {
        pages: 512,
        verify_every: 200,
        rate: 20_000,
        ..LedgerParams::default()
    };
    let memory = 32 << 20;
    let (mut vm, console) = boot(&Workload::Ledger(p), memory, false);
    let mut consoles = vec![console];
    // Capture at uneven instants (mid-step, mid-verify, mid-print all happen), restore into a
    // fresh copy of the memory, and carry on there; the old VM is dropped.
    for (round, ms) in [137u64, 59, 211, 7, 301, 83, 1, 173]
        .into_iter()
        .enumerate()
    {
        std::thread::sleep(Duration::from_millis(ms));
        vm.pause().unwrap();
        let state = vm.state().unwrap();
        let copy = GuestMemory::new(&vm.memory().specs()).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut gpa = 0;
        while gpa < memory {
            vm.memory().read(gpa, &mut buf).unwrap();
            copy.write_untracked(gpa, &buf).unwrap();
            gpa += buf.len() as u64;
        }
        assert_eq!(vm.exit_reason(), None, "round {round}");
        drop(vm);
        let console = Console::default();
        let gate = OutputGate::passthrough(Box::new(console.clone()));
        vm = Vm::restore(copy, &state, gate, false, false).unwrap();
        consoles.push(console);
    }
    std::thread::sleep(Duration::from_millis(300));
    vm.pause().unwrap();
    let text: String = consoles.iter().map(Console::text).collect();
    assert_eq!(vm.exit_reason(), None, "console:\n{text}");
    // The output may end mid-line; check the complete lines.
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let ticks = check_ticks(complete);
    assert!(ticks >= 5, "only {ticks} ticks:\n{text}");
    assert!(cb(&vm, LEDGER_TICKS_OFFSET) >= ticks);
    eprintln!("ledger: {ticks} ticks across 8 capture/restore rounds");
}

/// Pages that the ledger will not touch in the next `steps` steps (nor in a step already under
/// way) given the PRNG state in its control block.
fn untouched_pages(vm: &Vm, pages: u64, steps: u64) -> Vec<u64> {
    let mut rng = Rng(cb(vm, LEDGER_RNG_OFFSET).wrapping_sub(model::GOLDEN));
    let mut touched = vec![false; pages as usize];
    for _ in 0..steps + 2 {
        touched[model::scale_high32(rng.next(), pages) as usize] = true;
    }
    (0..pages).filter(|&i| !touched[i as usize]).collect()
}

#[test]
fn ledger_reports_a_stale_page() {
    let _one = serial();
    let p = LedgerParams {
        pages: 64,
        verify_every: 500,
        rate: 10_000,
        ..LedgerParams::default()
    };
    let (mut vm, console) = boot(&Workload::Ledger(p.clone()), 32 << 20, false);
    while cb(&vm, LEDGER_TICKS_OFFSET) < 2 {
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.pause().unwrap();
    let before: Vec<Vec<u64>> = (0..p.pages).map(|i| page(vm.memory(), i)).collect();
    vm.resume();
    std::thread::sleep(Duration::from_millis(200));
    vm.pause().unwrap();
    // A page that moved on goes back to its older, self-consistent content: what a missed
    // dirty page looks like. (Not the page of a step under way, which would overwrite it.)
    // Later steps may bump the stale page again; the checksum still no longer matches.
    let stale = untouched_pages(&vm, p.pages, 0)
        .into_iter()
        .find(|&i| page(vm.memory(), i)[0] > before[i as usize][0])
        .expect("no page moved on in 200 ms");
    let old: Vec<u8> = before[stale as usize]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    vm.memory()
        .write(DATA_GPA + stale * PAGE_SIZE, &old)
        .unwrap();
    vm.resume();
    let exit = vm.wait_exit(Duration::from_secs(10));
    let text = console.text();
    assert_eq!(
        exit,
        Some(ExitReason::Guest(EXIT_CORRUPT)),
        "console:\n{text}"
    );
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("CORRUPT checksum running=0x"),
        "console:\n{text}"
    );
    eprintln!("stale page {stale}: {last}");
}

#[test]
fn ledger_reports_a_torn_page() {
    let _one = serial();
    let p = LedgerParams {
        pages: 2048,
        verify_every: 1000,
        rate: 10_000,
        ..LedgerParams::default()
    };
    let (mut vm, console) = boot(&Workload::Ledger(p.clone()), 32 << 20, false);
    while cb(&vm, LEDGER_TICKS_OFFSET) < 1 {
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.pause().unwrap();
    let torn = untouched_pages(&vm, p.pages, p.verify_every)[7];
    let gpa = DATA_GPA + torn * PAGE_SIZE + 8 * 300;
    let word = read_u64(&vm, gpa);
    vm.memory().write(gpa, &(!word).to_le_bytes()).unwrap();
    vm.resume();
    let exit = vm.wait_exit(Duration::from_secs(10));
    let text = console.text();
    assert_eq!(
        exit,
        Some(ExitReason::Guest(EXIT_CORRUPT)),
        "console:\n{text}"
    );
    let last = text.lines().last().unwrap_or_default();
    let version = page(vm.memory(), torn)[0];
    assert!(
        last.starts_with(&format!(
            "CORRUPT page={torn} version={version} word=300 expected=0x{word:016x} found=0x{:016x} steps=",
            !word
        )),
        "console:\n{text}"
    );
    assert_eq!(WORDS_PER_PAGE, 512);
    eprintln!("torn page {torn}: {last}");
}
