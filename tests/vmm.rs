//! The VMM across processes: a VM restored by another `understudy` process from the memfds and
//! the state blob continues the ledger.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use understudy_vmm::guests::ledger_ticks;
use understudy_vmm::guests::Workload;
use understudy_vmm::{Boot, MemorySink, OutputGate, Vm, VmConfig};

/// (c) Pause a ledger VM here, hand its memfds (as /proc/PID/fd paths) and its state blob to a
/// separate `understudy run --restore-state` process: the restored guest's first tick is the
/// next N and its self-checks pass.
#[test]
fn restore_in_another_process_continues_the_ledger() {
    if let Err(e) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs read-write access to /dev/kvm, which failed: {e}");
    }
    let mut config = VmConfig::new(256 << 20);
    config.regions = understudy_vmm::memory::split_regions(256 << 20, 2);
    let flags: HashMap<String, String> = [("verify-every".to_string(), "500".to_string())].into();
    let workload = Workload::from_cli("ledger", &flags).unwrap();
    let sink = MemorySink::default();
    let mut vm = Vm::boot(
        &config,
        Boot::Workload(&workload),
        OutputGate::passthrough(Box::new(sink.clone())),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    vm.pause().unwrap();
    let before = sink.text();
    let last = *ledger_ticks(&before)
        .last()
        .expect("the ledger ticked before the pause");

    let dir = tempfile::tempdir().unwrap();
    let state_path = dir.path().join("vm.state");
    std::fs::write(&state_path, vm.state().unwrap().encode()).unwrap();
    let pid = std::process::id();
    let memfds: Vec<String> = vm
        .memory()
        .regions()
        .iter()
        .map(|r| {
            format!(
                "/proc/{pid}/fd/{}",
                r.fd().expect("run's guest memory is memfds").as_raw_fd()
            )
        })
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args(["run", "--seconds", "1.5", "--restore-state"])
        .arg(&state_path)
        .arg("--memfd")
        .args(&memfds)
        .output()
        .unwrap();
    let after = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "restore failed: {stderr}");
    assert!(!after.contains("CORRUPT"), "{after}");
    // A line cut by the pause is finished by the restored VM, so judge the joined console.
    let joined = ledger_ticks(&format!("{before}{after}"));
    let restored = ledger_ticks(&after);
    assert!(
        restored.len() >= 3,
        "restored VM barely ticked: {after}\n{stderr}"
    );
    let first_after = joined[joined.iter().position(|&t| t == last).unwrap() + 1];
    assert_eq!(first_after, last + 1, "first tick after restore");
    assert!(
        joined.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks: {joined:?}"
    );
    drop(vm);
}
