//! Protect mode over a link slower than the guest's dirty rate (issue 8): the `dirty` guest
//! writes ~20k pages/s while `understudy relay` passes 1 MB/s. Backpressure must hold: epochs
//! get longer instead of piling up, and neither process's private memory grows while it runs.

mod common;

use std::time::{Duration, Instant};

use common::{certs, free_port, free_tcp_port, require_kvm, s, scrape_metric, Proc};

/// A process's private (anonymous) resident memory in bytes: heap and buffers, not the guest
/// memory, which lives in shared memfds.
fn rss_anon(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[test]
fn a_link_slower_than_the_dirty_rate_lengthens_epochs_and_memory_stays_bounded() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(&d.join("certs"), &["primary", "backup"]);
    let c = d.join("certs").display().to_string();
    let b_addr = format!("127.0.0.1:{}", free_port());
    let r_addr = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let backup = Proc::spawn(
        d,
        "backup",
        &s(&[
            "backup",
            "--certs",
            &c,
            "--listen",
            &b_addr,
            "--once",
            "--failure-timeout",
            "3s",
        ]),
    );
    backup.wait_for("backup listening", Duration::from_secs(10));
    let relay = Proc::spawn(
        d,
        "relay",
        &s(&[
            "relay", "--listen", &r_addr, "--to", &b_addr, "--rate", "1000000",
        ]),
    );
    relay.wait_for("relay up", Duration::from_secs(10));
    let primary = Proc::spawn(
        d,
        "primary",
        &s(&[
            "primary",
            "--certs",
            &c,
            "--backup",
            &r_addr,
            "--workload",
            "dirty",
            "--memory",
            "64M",
            "--working-set",
            "32M",
            "--rate",
            "20000",
            "--metrics",
            &metrics,
            "--failure-timeout",
            "3s",
        ]),
    );
    primary.wait_for("PROTECTED: the backup committed", Duration::from_secs(120));
    let (pp, bp) = (primary.child.id(), backup.child.id());
    let mut samples: Vec<(u64, u64)> = Vec::new();
    let mut intervals = Vec::new();
    let committed = || scrape_metric(&metrics, "understudy_last_committed_epoch").unwrap_or(0.0);
    let committed_before = committed();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(16) {
        let (p, b) = (rss_anon(pp), rss_anon(bp));
        assert!(
            p.is_some() && b.is_some(),
            "a process ended: primary {}\nbackup {}",
            primary.err(),
            backup.err()
        );
        samples.push((p.unwrap(), b.unwrap()));
        if let Some(i) = scrape_metric(&metrics, "understudy_epoch_interval_seconds") {
            intervals.push(i);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let window = t.elapsed().as_secs_f64();
    let epochs_in_window = committed() - committed_before;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let half = samples.len() / 2;
    let max_of = |v: &[(u64, u64)], f: fn(&(u64, u64)) -> u64| v.iter().map(f).max().unwrap();
    let (first, second) = samples.split_at(half);
    let (p1, p2) = (max_of(first, |x| x.0), max_of(second, |x| x.0));
    let (b1, b2) = (max_of(first, |x| x.1), max_of(second, |x| x.1));
    let longest = intervals.iter().copied().fold(0.0, f64::max);
    println!(
        "private memory, first / second half of 16 s: primary {:.0} / {:.0} MiB, backup {:.0} / \
         {:.0} MiB; longest epoch interval {:.0} ms (25 ms asked); relay: {}",
        mib(p1),
        mib(p2),
        mib(b1),
        mib(b2),
        longest * 1e3,
        relay
            .err()
            .lines()
            .rev()
            .find(|l| l.contains("dropped"))
            .unwrap_or("")
    );
    // Backpressure: the in-flight window fills and the capture waits, so epochs get longer.
    // The interval gauge is set when an epoch ends, so an epoch still waiting when the window
    // closes does not show there: the epochs committed in the window give the mean length.
    let mean = window / epochs_in_window.max(1.0);
    println!(
        "{epochs_in_window} epochs committed in {window:.1} s: mean epoch {:.0} ms",
        mean * 1e3
    );
    assert!(
        longest > 0.2 || mean > 0.2,
        "epochs never got longer than {:.0} ms (mean {:.0} ms) on a link slower than the dirty \
         rate: {intervals:?}",
        longest * 1e3,
        mean * 1e3
    );
    // Bounded: no growth from one half to the next beyond noise, and modest in absolute terms.
    for (who, a, b) in [("primary", p1, p2), ("backup", b1, b2)] {
        assert!(
            b <= a + (32 << 20),
            "{who}'s private memory grew from {:.0} to {:.0} MiB",
            mib(a),
            mib(b)
        );
        assert!(b < 1 << 30, "{who} holds {:.0} MiB", mib(b));
    }
}
