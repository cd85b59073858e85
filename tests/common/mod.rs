//! Fixtures for the end-to-end tests: certificates, free ports, `understudy` processes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_understudy");

/// Fails (never skips) when the machine has no usable KVM.
pub fn require_kvm() {
    if let Err(e) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs read-write access to /dev/kvm, which failed: {e}");
    }
}

/// A CA in `dir` with node certificates for `names`.
pub fn certs(dir: &Path, names: &[&str]) {
    let ok = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let d = dir.to_str().unwrap();
    ok(&["certs", "init", "--dir", d]);
    for n in names {
        ok(&["certs", "issue", "--dir", d, "--name", n]);
    }
}

/// A UDP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process whose stdout and stderr go to files (read them at any time).
pub struct Proc {
    pub child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Proc {
    pub fn spawn(dir: &Path, label: &str, args: &[String]) -> Proc {
        let stdout = dir.join(format!("{label}.out"));
        let stderr = dir.join(format!("{label}.err"));
        let child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(std::fs::File::create(&stdout).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
            .spawn()
            .unwrap();
        Proc {
            child,
            stdout,
            stderr,
        }
    }

    pub fn out(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn err(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until stderr contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        let t = Instant::now();
        while !self.err().contains(needle) {
            assert!(
                t.elapsed() < timeout,
                "no {needle:?} within {timeout:?}: {}",
                self.err()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to end.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if t.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("process did not end within {timeout:?}: {}", self.err());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Runs `understudy ARGS` to the end.
pub fn run(args: &[String]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}
