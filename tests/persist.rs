//! Backup persistence (`--image-dir`, issue 8): the backup is SIGKILLed at random moments while
//! it serves a primary, and each restart finds the last committed epoch intact on disk (its
//! digest verified against the one the primary sent with that epoch). The primary keeps the
//! ledger running throughout and is protected again by each restarted backup.

mod common;

use std::time::Duration;

use common::{certs, free_port, require_kvm, s, Proc};
use understudy_vmm::guests::ledger_ticks;

#[test]
fn a_backup_killed_at_random_moments_finds_its_last_committed_epoch_intact() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(&d.join("certs"), &["primary", "backup"]);
    let c = d.join("certs").display().to_string();
    let img = d.join("img").display().to_string();
    let addr = format!("127.0.0.1:{}", free_port());
    let backup_args = s(&[
        "backup",
        "--certs",
        &c,
        "--listen",
        &addr,
        "--image-dir",
        &img,
        "--failure-timeout",
        "2s",
    ]);
    let mut backup = Proc::spawn(d, "backup0", &backup_args);
    backup.wait_for("backup listening", Duration::from_secs(10));
    assert!(
        backup.err().contains("no stored image yet"),
        "{}",
        backup.err()
    );
    let primary = Proc::spawn(
        d,
        "primary",
        &s(&[
            "primary",
            "--certs",
            &c,
            "--backup",
            &addr,
            "--workload",
            "ledger",
            "--memory",
            "128M",
            "--reconnect-interval",
            "200ms",
            "--failure-timeout",
            "1s",
        ]),
    );
    let protected = |n: usize| {
        let t = std::time::Instant::now();
        while primary
            .err()
            .matches("PROTECTED: the backup committed")
            .count()
            < n
        {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "not protected {n} times: {}",
                primary.err()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    protected(1);
    // Kill points spread over a few epochs after protection (25 ms each), not all alike.
    let mut seed = std::process::id() as u64 | 1;
    for round in 1..=3usize {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(300 + seed % 1200));
        let _ = backup.child.kill(); // SIGKILL, mid-epoch or mid-write
        let _ = backup.child.wait();
        backup = Proc::spawn(d, &format!("backup{round}"), &backup_args);
        backup.wait_for("backup listening", Duration::from_secs(30));
        let err = backup.err();
        let line = err
            .lines()
            .find(|l| l.contains("stored image intact"))
            .unwrap_or_else(|| panic!("round {round}: no intact image after the kill: {err}"));
        assert!(!err.contains("stored image is damaged"), "{err}");
        println!("round {round}: {line}");
        protected(round + 1);
    }
    let out = primary.out();
    assert!(!out.contains("CORRUPT"), "{out}");
    let t = ledger_ticks(&out);
    assert!(
        t.len() >= 3 && t[0] == 1 && t.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks not exactly once in order: {t:?}"
    );
}

/// Unmounts a test filesystem when dropped.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The backup's disk fills while it persists: the backup says why and ends the session, the
/// primary runs on unprotected, and what is on disk is still a consistent committed epoch.
#[test]
fn a_full_disk_ends_the_session_with_a_reason_and_corrupts_nothing() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(&d.join("certs"), &["primary", "backup"]);
    let c = d.join("certs").display().to_string();
    let img = d.join("img");
    std::fs::create_dir_all(&img).unwrap();
    // A 40 MiB filesystem for a 64 MiB guest: the image cannot fit.
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=40m", "tmpfs"])
        .arg(&img)
        .output()
        .unwrap_or_else(|e| panic!("this test needs `mount` (util-linux): {e}"));
    assert!(
        mount.status.success(),
        "this test needs to mount a small tmpfs (root): {}",
        String::from_utf8_lossy(&mount.stderr)
    );
    let _mounted = Mounted(img.clone());
    let img = img.display().to_string();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut backup = Proc::spawn(
        d,
        "backup",
        &s(&[
            "backup",
            "--certs",
            &c,
            "--listen",
            &addr,
            "--image-dir",
            &img,
            "--once",
        ]),
    );
    backup.wait_for("backup listening", Duration::from_secs(10));
    let primary = Proc::spawn(
        d,
        "primary",
        &s(&[
            "primary",
            "--certs",
            &c,
            "--backup",
            &addr,
            "--workload",
            "dirty",
            "--memory",
            "64M",
            "--working-set",
            "48M",
            "--mix",
            "random=100",
            "--rate",
            "5000",
            "--reconnect-interval",
            "500ms",
        ]),
    );
    primary.wait_for("UNPROTECTED", Duration::from_secs(60));
    let status = backup.wait(Duration::from_secs(30));
    let err = backup.err();
    assert!(
        err.contains("can no longer keep its image on disk") && err.contains("No space left"),
        "no clear reason for the full disk: {status} {err}"
    );
    // The primary keeps its guest running without a backup.
    std::thread::sleep(Duration::from_millis(500));
    assert!(primary.err().contains("UNPROTECTED"), "{}", primary.err());
    // Nothing corrupt on disk: a new backup over the same directory finds a consistent epoch
    // (or, if not even the first checkpoint fit, no image at all), never a damaged one.
    let check = Proc::spawn(
        d,
        "check",
        &s(&[
            "backup",
            "--certs",
            &c,
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--image-dir",
            &img,
        ]),
    );
    check.wait_for("backup listening", Duration::from_secs(30));
    let err = check.err();
    assert!(!err.contains("stored image is damaged"), "{err}");
    assert!(
        err.contains("stored image intact") || err.contains("no stored image yet"),
        "{err}"
    );
    println!(
        "{}",
        err.lines()
            .find(|l| l.contains("stored image") || l.contains("no stored image"))
            .unwrap_or_default()
    );
}
