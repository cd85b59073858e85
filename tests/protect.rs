//! Protect mode end to end: `understudy backup` and `understudy primary` as separate processes
//! on loopback, real KVM guests, real QUIC with mutual TLS.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use understudy_vmm::guests::ledger_ticks;

/// These tests are about replication, not failure detection: with four pairs of processes on
/// two cores, the 300 ms default once let a stall end a session (and the `--once` backup) in CI.
const FAILURE_TIMEOUT: &str = "2s";

fn backup_args(dir: &std::path::Path, port: u16, extra: &[&str]) -> Vec<String> {
    let mut a = s(&["backup", "--certs"]);
    a.push(dir.join("certs").display().to_string());
    a.extend(s(&["--listen", &format!("127.0.0.1:{port}"), "--once"]));
    a.extend(s(&["--failure-timeout", FAILURE_TIMEOUT]));
    a.extend(s(extra));
    a
}

fn primary_args(dir: &std::path::Path, port: u16, certs: &str, extra: &[&str]) -> Vec<String> {
    let mut a = s(&[
        "primary",
        "--backup",
        &format!("127.0.0.1:{port}"),
        "--certs",
    ]);
    a.push(dir.join(certs).display().to_string());
    a.extend(s(&["--workload", "ledger", "--memory", "256M"]));
    a.extend(s(&["--failure-timeout", FAILURE_TIMEOUT]));
    a.extend(s(extra));
    a
}

/// (1) At least 100 epochs of the ledger guest (256 MiB); the primary stops after its last
/// epoch with the guest paused, and the backup's image at that committed epoch is
/// byte-identical to the primary's memory, and so are the VM state blobs.
#[test]
fn backup_image_is_byte_identical_after_many_epochs() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(&d.join("certs"), &["primary", "backup"]);
    let port = free_port();
    let bdump = d.join("bdump").display().to_string();
    let pdump = d.join("pdump").display().to_string();
    let mut backup = Proc::spawn(d, "backup", &backup_args(d, port, &["--dump-dir", &bdump]));
    backup.wait_for("backup listening", Duration::from_secs(10));
    let mut primary = Proc::spawn(
        d,
        "primary",
        &primary_args(d, port, "certs", &["--epochs", "120", "--dump-dir", &pdump]),
    );
    assert!(
        primary.wait(Duration::from_secs(120)).success(),
        "{}",
        primary.err()
    );
    assert!(
        backup.wait(Duration::from_secs(30)).success(),
        "{}",
        backup.err()
    );
    let err = primary.err();
    assert!(
        err.contains("acked=12"),
        "fewer than 100 epochs acknowledged: {err}"
    );
    let a = std::fs::read(d.join("pdump/memory.img")).unwrap();
    let b = std::fs::read(d.join("bdump/memory.img")).unwrap();
    assert_eq!(a.len(), 256 << 20);
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "images differ at byte {first_diff:?}");
    assert_eq!(a, b);
    let sa = std::fs::read(d.join("pdump/state.bin")).unwrap();
    let sb = std::fs::read(d.join("bdump/state.bin")).unwrap();
    assert!(!sa.is_empty());
    assert_eq!(sa, sb, "state blobs differ");
    let t = ledger_ticks(&primary.out());
    assert!(!primary.out().contains("CORRUPT"));
    assert!(
        t.len() >= 5 && t.windows(2).all(|w| w[1] == w[0] + 1),
        "{t:?}"
    );
}

fn journal(path: &std::path::Path) -> Vec<HashMap<String, u128>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            l.trim_matches(|c| c == '{' || c == '}')
                .split(',')
                .map(|kv| {
                    let (k, v) = kv.split_once(':').unwrap();
                    (k.trim_matches('"').to_string(), v.parse().unwrap())
                })
                .collect()
        })
        .collect()
}

/// (2) Output commit: with a backup that holds every Ack for 500 ms, no console byte of epoch E
/// reaches the primary's sink before the backup sent Ack(E) (the backup journals when it sent
/// each Ack; the primary journals each release), and the released console is complete.
#[test]
fn console_bytes_wait_for_their_epochs_ack() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(&d.join("certs"), &["primary", "backup"]);
    let port = free_port();
    let acks = d.join("acks.jsonl").display().to_string();
    let releases = d.join("releases.jsonl").display().to_string();
    let mut backup = Proc::spawn(
        d,
        "backup",
        &backup_args(d, port, &["--ack-delay", "500ms", "--ack-journal", &acks]),
    );
    backup.wait_for("backup listening", Duration::from_secs(10));
    let mut primary = Proc::spawn(
        d,
        "primary",
        &primary_args(
            d,
            port,
            "certs",
            &[
                "--epochs",
                "80",
                "--max-in-flight",
                "16",
                "--release-journal",
                &releases,
            ],
        ),
    );
    assert!(
        primary.wait(Duration::from_secs(120)).success(),
        "{}",
        primary.err()
    );
    backup.wait(Duration::from_secs(30));
    let acked: HashMap<u128, u128> = journal(&d.join("acks.jsonl"))
        .into_iter()
        .map(|r| (r["epoch"], r["unix_ns"]))
        .collect();
    let released = journal(&d.join("releases.jsonl"));
    let mut with_bytes = 0;
    for r in &released {
        let (e, at, n) = (r["epoch"], r["unix_ns"], r["bytes"]);
        let ack = acked
            .get(&e)
            .unwrap_or_else(|| panic!("epoch {e} released without an Ack"));
        assert!(
            at >= *ack,
            "epoch {e}: {n} bytes released {} ns before its Ack",
            ack - at
        );
        if n > 0 {
            with_bytes += 1;
        }
    }
    assert!(
        with_bytes >= 5,
        "too few epochs carried output: {released:?}"
    );
    let t = ledger_ticks(&primary.out());
    assert!(
        t.len() >= 5 && t.windows(2).all(|w| w[1] == w[0] + 1),
        "{t:?}"
    );
}

/// (3) A primary whose certificate comes from another CA cannot connect; the backup logs why
/// and applies nothing.
#[test]
fn primary_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(&d.join("certs"), &["primary", "backup"]);
    certs(&d.join("other"), &["primary"]);
    std::fs::copy(d.join("certs/ca.pem"), d.join("other/real-ca.pem")).unwrap();
    // The impostor trusts our CA (so it could verify the backup) but its own cert is foreign.
    std::fs::rename(d.join("other/real-ca.pem"), d.join("other/ca.pem")).unwrap();
    let port = free_port();
    let bdump = d.join("bdump").display().to_string();
    let backup = Proc::spawn(d, "backup", &backup_args(d, port, &["--dump-dir", &bdump]));
    backup.wait_for("backup listening", Duration::from_secs(10));
    let out = run(&primary_args(d, port, "other", &["--epochs", "5"]));
    let perr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the impostor connected: {perr}");
    assert!(
        perr.to_lowercase().contains("ca"),
        "primary's error does not say why: {perr}"
    );
    backup.wait_for("refused a connection", Duration::from_secs(10));
    let berr = backup.err();
    assert!(
        berr.contains("not signed by our CA"),
        "backup does not say why: {berr}"
    );
    assert!(!berr.contains("session accepted"), "{berr}");
    assert!(!d.join("bdump").exists(), "the backup wrote an image");
}

/// (4) A primary outlives its backup: when the backup dies it runs on unprotected (the ledger
/// keeps ticking, output is no longer held), reconnects when a backup is back at the address,
/// re-protects with a full sync, and the new backup's image ends byte-identical to the
/// primary's memory. The console holds every tick exactly once across all of it.
#[test]
fn primary_runs_on_unprotected_and_reprotects_with_a_new_backup() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(&d.join("certs"), &["primary", "backup"]);
    let port = free_port();
    let first = Proc::spawn(d, "backup1", &backup_args(d, port, &[]));
    first.wait_for("backup listening", Duration::from_secs(10));
    let pdump = d.join("pdump").display().to_string();
    let mut primary = Proc::spawn(
        d,
        "primary",
        &primary_args(
            d,
            port,
            "certs",
            &[
                "--memory",
                "128M",
                "--epochs",
                "120",
                "--dump-dir",
                &pdump,
                "--reconnect-interval",
                "200ms",
            ],
        ),
    );
    primary.wait_for("PROTECTED: the backup committed", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    drop(first); // SIGKILL: the backup host is gone
    primary.wait_for("UNPROTECTED", Duration::from_secs(10));
    let ticks_when_lost = ledger_ticks(&primary.out()).len();
    std::thread::sleep(Duration::from_millis(1500));
    let unprotected_ticks = ledger_ticks(&primary.out()).len() - ticks_when_lost;
    assert!(
        unprotected_ticks >= 2,
        "the guest did not run on unprotected: {unprotected_ticks} ticks in 1.5 s\n{}",
        primary.err()
    );
    let bdump = d.join("bdump").display().to_string();
    let mut second = Proc::spawn(d, "backup2", &backup_args(d, port, &["--dump-dir", &bdump]));
    assert!(
        primary.wait(Duration::from_secs(120)).success(),
        "{}",
        primary.err()
    );
    assert!(
        second.wait(Duration::from_secs(30)).success(),
        "{}",
        second.err()
    );
    let err = primary.err();
    assert!(
        err.contains("a backup accepted us again; re-protecting")
            && err.matches("full sync sent").count() == 2
            && err.contains("sessions=2"),
        "the primary did not re-protect in a second session: {err}"
    );
    let a = std::fs::read(d.join("pdump/memory.img")).unwrap();
    let b = std::fs::read(d.join("bdump/memory.img")).unwrap();
    assert_eq!(a.len(), 128 << 20);
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "images differ at byte {first_diff:?}");
    let sa = std::fs::read(d.join("pdump/state.bin")).unwrap();
    let sb = std::fs::read(d.join("bdump/state.bin")).unwrap();
    assert_eq!(sa, sb, "state blobs differ");
    let out = primary.out();
    assert!(!out.contains("CORRUPT"), "{out}");
    let t = ledger_ticks(&out);
    assert!(
        t.len() >= 10 && t[0] == 1 && t.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks not exactly once in order: {t:?}"
    );
    println!(
        "ticks: {} in all, {unprotected_ticks} while unprotected for 1.5 s",
        t.len()
    );
}
