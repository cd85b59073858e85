//! Failover end to end through `understudy drill`: witness, backup and primary processes; the
//! primary is SIGKILLed at a phase of an epoch; the backup wins the lease and promotes; the
//! ledger continues with every tick exactly once.
//!
//! The remaining window (a kill after the primary released E's output but before its release
//! Ack reached the backup repeats E's output) is not tested; see docs/ARCHITECTURE.md.

mod common;

use common::*;

fn drill(kill_at: &str, repeat: &str) {
    require_kvm();
    let out = run(&s(&[
        "drill",
        "--repeat",
        repeat,
        "--kill-at",
        kill_at,
        "--memory",
        "128M",
        "--warmup",
        "1",
        "--json",
    ]));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "drill --kill-at {kill_at} failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("\"passed\": true"), "{report}");
    assert!(!report.contains("\"passed\": false"), "{report}");
}

#[test]
fn primary_killed_during_capture_fails_over() {
    drill("capture", "1");
}

#[test]
fn primary_killed_between_chunks_and_commit_fails_over() {
    drill("send", "1");
}

#[test]
fn primary_killed_after_commit_fails_over() {
    drill("commit", "1");
}

#[test]
fn primary_killed_between_ack_and_release_fails_over_without_losing_output() {
    drill("ack", "1");
}

#[test]
fn primary_killed_at_a_random_moment_fails_over() {
    drill("random", "1");
}
