//! Peers the backup must refuse, each with a reason an operator can act on, on both sides, and
//! nothing applied: a primary for another VM, one with an expired certificate, and one that
//! speaks no protocol version the backup speaks (too new, or too old: version 1). (A certificate from another CA: tests/protect.rs.)

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;

fn backup(d: &Path, port: u16) -> Proc {
    let b = Proc::spawn(
        d,
        "backup",
        &s(&[
            "backup",
            "--certs",
            &d.join("certs").display().to_string(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--once",
        ]),
    );
    b.wait_for("backup listening", Duration::from_secs(10));
    b
}

/// Runs a primary to its end; returns its stderr (it must fail).
fn refused_primary(d: &Path, port: u16, extra: &[&str]) -> String {
    let mut args = s(&[
        "primary",
        "--certs",
        &d.join("certs").display().to_string(),
        "--backup",
        &format!("127.0.0.1:{port}"),
        "--workload",
        "ledger",
        "--memory",
        "64M",
        "--epochs",
        "5",
    ]);
    args.extend(s(extra));
    let out = run(&args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "the primary was not refused:\n{err}");
    err
}

fn assert_nothing_applied(b: &Proc) {
    let err = b.err();
    assert!(
        !err.contains("committed epoch") && !err.contains("session accepted"),
        "the backup accepted or applied something:\n{err}"
    );
}

#[test]
fn a_primary_for_another_vm_is_refused_with_the_reason() {
    require_kvm(); // the primary boots its guest before it says hello
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(&d.join("certs"), &["primary", "backup"]);
    let port = free_port();
    let b = backup(d, port);
    let err = refused_primary(d, port, &["--vm-id", "vm-2"]);
    assert!(
        err.contains("refused") && err.contains("vm-2"),
        "the primary does not say why:\n{err}"
    );
    b.wait_for("refused the primary", Duration::from_secs(10));
    assert!(
        b.err().contains("vm-2"),
        "the backup does not say why:\n{}",
        b.err()
    );
    assert_nothing_applied(&b);
}

#[test]
fn an_expired_certificate_is_refused_with_the_reason() {
    require_kvm(); // the primary boots its guest before it says hello
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(&d.join("certs"), &["primary", "backup"]);
    // Replace the primary's certificate with one that expired yesterday (same CA).
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    understudy_transport::certs::issue(
        &d.join("certs"),
        "primary",
        understudy_transport::certs::Validity::between(now - 3 * day, now - day),
    )
    .expect("issuing an expired certificate");
    let port = free_port();
    let b = backup(d, port);
    let err = refused_primary(d, port, &[]);
    assert!(
        err.to_lowercase().contains("expired"),
        "the primary does not say why:\n{err}"
    );
    b.wait_for("refused a connection", Duration::from_secs(10));
    assert!(
        b.err().to_lowercase().contains("expired"),
        "the backup does not say why:\n{}",
        b.err()
    );
    assert_nothing_applied(&b);
}

#[test]
fn a_protocol_version_the_backup_does_not_speak_is_refused_with_the_reason() {
    require_kvm(); // the primary boots its guest before it says hello
                   // A primary too new (9), and one too old: version 1 is no longer spoken since protocol 3.
    for (versions, advice) in [
        ("9-9", "upgrade the backup"),
        ("1-1", "upgrade the primary"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        certs(&d.join("certs"), &["primary", "backup"]);
        let port = free_port();
        let b = backup(d, port);
        let err = refused_primary(d, port, &["--announce-versions", versions]);
        assert!(
            err.contains("refused") && err.to_lowercase().contains("version"),
            "{versions}: the primary does not say why:\n{err}"
        );
        assert!(err.contains(advice), "{versions}: no advice:\n{err}");
        b.wait_for("refused the primary", Duration::from_secs(10));
        assert!(
            b.err().to_lowercase().contains("version"),
            "{versions}: the backup does not say why:\n{}",
            b.err()
        );
        assert_nothing_applied(&b);
    }
}
