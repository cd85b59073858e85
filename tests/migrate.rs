//! Moving a running VM (`understudy migrate`, `understudy evict`) between real processes over
//! QUIC: an unprotected primary with an admin endpoint is the source, an `understudy backup`
//! the destination. With every algorithm (precopy, quick eviction, postcopy, hybrid) the ledger
//! guest must continue on the destination with every tick exactly once (the source's console,
//! then the destination's) and no CORRUPT; a precopy that cannot converge (a link slower than
//! the guest dirties pages, through `understudy relay`) must end through its named strategy
//! within its timeout, with a report that says so; a source that dies mid-postcopy loses the
//! VM, and the destination says so.

mod common;

use std::time::{Duration, Instant};

use common::{certs, free_port, free_tcp_port, require_kvm, run, s, Proc};
use understudy_vmm::guests::ledger_ticks;

struct Pair {
    dst: Proc,
    src: Proc,
    admin: String,
    to: String,
    /// Last: the processes' logs live here, and a failing test prints them when they drop.
    _dir: tempfile::TempDir,
}

/// A destination backup and a standalone source primary running `guest`, both up.
fn pair(guest: &[&str], via_relay: Option<&[&str]>) -> (Pair, Option<Proc>) {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(&d.join("certs"), &["primary", "backup"]);
    let c = d.join("certs").display().to_string();
    let dst_addr = format!("127.0.0.1:{}", free_port());
    let dst = Proc::spawn(
        d,
        "dst",
        &s(&[
            "backup",
            "--certs",
            &c,
            "--listen",
            &dst_addr,
            "--once",
            "--failure-timeout",
            "2s",
        ]),
    );
    dst.wait_for("backup listening", Duration::from_secs(10));
    let (to, relay) = match via_relay {
        None => (dst_addr.clone(), None),
        Some(knobs) => {
            let r_addr = format!("127.0.0.1:{}", free_port());
            let mut a = s(&["relay", "--listen", &r_addr, "--to", &dst_addr]);
            a.extend(s(knobs));
            let relay = Proc::spawn(d, "relay", &a);
            relay.wait_for("relay up", Duration::from_secs(10));
            (r_addr, Some(relay))
        }
    };
    let admin = format!("127.0.0.1:{}", free_tcp_port());
    let mut a = s(&["primary", "--certs", &c, "--admin", &admin]);
    a.extend(s(&["--linger-after-move", "0s"]));
    a.extend(s(guest));
    let src = Proc::spawn(d, "src", &a);
    src.wait_for("guest running", Duration::from_secs(30));
    src.wait_for("admin endpoint up", Duration::from_secs(10));
    (
        Pair {
            _dir: dir,
            dst,
            src,
            admin,
            to,
        },
        relay,
    )
}

/// Waits until the console `out` of `p` holds at least `n` ledger ticks.
fn wait_ticks(p: &Proc, n: usize, timeout: Duration) {
    let t = Instant::now();
    while ledger_ticks(&p.out()).len() < n {
        assert!(
            t.elapsed() < timeout,
            "fewer than {n} ticks within {timeout:?}: {}",
            p.err()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `delta pages N` of a move's report as `migrate` / `evict` print it.
fn delta_pages(report: &str) -> u64 {
    report
        .split("delta pages ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no delta pages in the report: {report}"))
}

/// Moves a ledger guest with `algorithm` (and `migrate` flags `extra`) and checks the ledger
/// across the move; returns the move's report.
fn ledger_moves(algorithm: &str, extra: &[&str]) -> String {
    let (mut p, _relay) = pair(&["--workload", "ledger", "--memory", "256M"], None);
    wait_ticks(&p.src, 3, Duration::from_secs(30));
    let mut args = s(&[
        "migrate",
        "--admin",
        &p.admin,
        "--algorithm",
        algorithm,
        "--to",
        &p.to,
    ]);
    args.extend(s(extra));
    let out = run(&args);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "migrate: {text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.src.err()
    );
    let report = if algorithm == "quick-eviction" {
        // Background snapshots for a while, then the eviction ships the last dirt.
        assert!(text.contains("snapshots are being shipped"), "{text}");
        std::thread::sleep(Duration::from_millis(1500));
        let ev = run(&s(&["evict", "--admin", &p.admin]));
        let ev_text = String::from_utf8_lossy(&ev.stdout).to_string();
        assert!(
            ev.status.success(),
            "evict: {ev_text}{}",
            String::from_utf8_lossy(&ev.stderr)
        );
        assert!(ev_text.contains("quick-eviction done"), "{ev_text}");
        println!("{ev_text}");
        ev_text
    } else {
        assert!(text.contains(&format!("{algorithm} done")), "{text}");
        println!("{text}");
        text
    };
    assert!(
        p.src.wait(Duration::from_secs(30)).success(),
        "{}",
        p.src.err()
    );
    assert!(p.src.err().contains("nothing of it is left here"));
    let before = ledger_ticks(&p.src.out());
    wait_ticks(&p.dst, 3, Duration::from_secs(30));
    let _ = p.dst.child.kill();
    let _ = p.dst.child.wait();
    // What an observer sees: the source's console, then the destination's (a line the guest
    // was writing at the pause starts on one and ends on the other).
    let seen = format!("{}{}", p.src.out(), p.dst.out());
    assert!(!seen.contains("CORRUPT"), "{seen}");
    let all = ledger_ticks(&seen);
    let after = all.len() - before.len();
    assert!(
        !before.is_empty() && after >= 2 && all[0] == 1 && all.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks not exactly once in order across the move: {all:?}"
    );
    println!(
        "{algorithm}: {} ticks on the source, then {} on the destination",
        before.len(),
        after
    );
    report
}

/// Precopy and quick eviction resend pages the guest rewrote since the sync; the ledger's
/// control block (a few counters) changes with every step, so some of them go as `Delta`
/// records against the content the destination already holds, and the destination (which
/// checks every page's hash and the image digest, and whose ledger re-verifies every page)
/// continues the guest exactly.
#[test]
fn precopy_moves_the_ledger_with_every_tick_once() {
    let report = ledger_moves("precopy", &[]);
    assert!(delta_pages(&report) > 0, "{report}");
}

#[test]
fn quick_eviction_moves_the_ledger_with_every_tick_once() {
    let report = ledger_moves("quick-eviction", &[]);
    assert!(delta_pages(&report) > 0, "{report}");
    // The eviction shipped the dirt since the last snapshot live before it paused the guest.
    assert!(report.contains("after a live tail of"), "{report}");
}

/// `--delta-cache 0`: every page goes whole, and the move still works.
#[test]
fn precopy_without_a_delta_cache_sends_no_deltas() {
    let report = ledger_moves("precopy", &["--delta-cache", "0"]);
    assert_eq!(delta_pages(&report), 0, "{report}");
}

#[test]
fn postcopy_moves_the_ledger_with_every_tick_once() {
    ledger_moves("postcopy", &[]);
}

#[test]
fn hybrid_moves_the_ledger_with_every_tick_once() {
    ledger_moves("hybrid", &[]);
}

/// Postcopy's risk, shown: the source dies after the switch, before the destination has every
/// page. The destination cannot continue the VM; it says that the VM is lost and exits with
/// an error (the migrate command warned before it started).
#[test]
fn a_source_that_dies_mid_postcopy_loses_the_vm() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(&d.join("certs"), &["primary", "backup"]);
    let c = d.join("certs").display().to_string();
    let dst_addr = format!("127.0.0.1:{}", free_port());
    let mut dst = Proc::spawn(
        d,
        "dst",
        &s(&[
            "backup",
            "--certs",
            &c,
            "--listen",
            &dst_addr,
            "--once",
            "--failure-timeout",
            "1s",
        ]),
    );
    dst.wait_for("backup listening", Duration::from_secs(10));
    // A slow link, so that the pages take a while after the switch.
    let r_addr = format!("127.0.0.1:{}", free_port());
    let relay = Proc::spawn(
        d,
        "relay",
        &s(&[
            "relay", "--listen", &r_addr, "--to", &dst_addr, "--rate", "1000000",
        ]),
    );
    relay.wait_for("relay up", Duration::from_secs(10));
    let admin = format!("127.0.0.1:{}", free_tcp_port());
    let mut src = Proc::spawn(
        d,
        "src",
        &s(&[
            "primary",
            "--certs",
            &c,
            "--admin",
            &admin,
            "--workload",
            "ledger",
            "--memory",
            "256M",
        ]),
    );
    src.wait_for("admin endpoint up", Duration::from_secs(30));
    wait_ticks(&src, 2, Duration::from_secs(30));
    let mover = std::process::Command::new(common::BIN)
        .args(s(&[
            "migrate",
            "--admin",
            &admin,
            "--algorithm",
            "postcopy",
            "--to",
            &r_addr,
        ]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    src.wait_for("serving its pages", Duration::from_secs(30));
    let _ = src.child.kill(); // SIGKILL: the source host dies after the switch
    let _ = src.child.wait();
    let status = dst.wait(Duration::from_secs(30));
    let err = dst.err();
    assert!(!status.success(), "the destination exited cleanly: {err}");
    assert!(
        err.contains("the VM is lost") && err.contains("pages never arrived"),
        "{err}"
    );
    let out = mover.wait_with_output().unwrap();
    let warned = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        warned.contains("the VM is lost"),
        "no warning before the move: {warned}"
    );
    let lost = err
        .lines()
        .find(|l| l.contains("pages never arrived"))
        .unwrap_or_default()
        .to_string();
    println!("{lost}");
    drop(relay);
}

/// A guest dirtying ~20k pages/s over 8 MiB behind a 4 MB/s link: every round ships most of the
/// working set, far more than a 20 ms budget allows; precopy cannot converge.
fn unconvergeable(strategy: &str) -> (Pair, Option<Proc>, std::process::Output, Duration) {
    let (p, relay) = pair(
        &[
            "--workload",
            "dirty",
            "--memory",
            "64M",
            "--rate",
            "20000",
            "--working-set",
            "8M",
        ],
        Some(&["--rate", "4000000"]),
    );
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let out = run(&s(&[
        "migrate",
        "--admin",
        &p.admin,
        "--algorithm",
        "precopy",
        "--to",
        &p.to,
        "--max-rounds",
        "5",
        "--timeout",
        "40s",
        "--downtime-budget",
        "20ms",
        "--on-no-convergence",
        strategy,
    ]));
    (p, relay, out, t.elapsed())
}

#[test]
fn precopy_that_cannot_converge_aborts_and_the_vm_stays() {
    let (mut p, _relay, out, took) = unconvergeable("abort");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}took {:.1} s", took.as_secs_f64());
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("precopy FAILED") && text.contains("did not converge after 5 rounds"),
        "{text}\n{}",
        p.src.err()
    );
    assert!(text.contains("the VM keeps running here"), "{text}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    // The source still runs its guest, and says so.
    std::thread::sleep(Duration::from_millis(300));
    assert!(p.src.child.try_wait().unwrap().is_none(), "{}", p.src.err());
    let status = run(&s(&["status", "--admin", &p.admin, "--json"]));
    let st = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(st.contains("\"unprotected\""), "{st}");
    let _ = p.dst.child.kill();
}

#[test]
fn precopy_that_cannot_converge_stops_and_copies_when_told_to() {
    let (mut p, _relay, out, took) = unconvergeable("stop-and-copy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}took {:.1} s", took.as_secs_f64());
    assert!(out.status.success(), "{text}\n{}", p.src.err());
    assert!(
        text.contains("precopy done") && text.contains("did not converge: stopped and copied"),
        "{text}"
    );
    assert!(
        p.src.wait(Duration::from_secs(30)).success(),
        "{}",
        p.src.err()
    );
    let _ = p.dst.child.kill();
}
