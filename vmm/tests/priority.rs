//! `set_vcpu_nice`: the guest's vCPU threads run at the priority the process set, and a value
//! the process may not use is refused without changing anything. Its own binary: the setting
//! is process-wide.

use understudy_vmm::guests::Workload;
use understudy_vmm::{Boot, MemorySink, OutputGate, Vm, VmConfig};

/// The nice value (field 19 of /proc/.../stat) of this process's thread named `name`.
fn nice_of(name: &str) -> Option<i64> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            // The fields after the parenthesised command; nice is field 19, the 17th after it.
            let rest = &stat[stat.rfind(')')? + 2..];
            return rest.split(' ').nth(16)?.parse().ok();
        }
    }
    None
}

#[test]
fn vcpu_threads_run_at_the_set_priority() {
    if let Err(e) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs read-write access to /dev/kvm, which failed: {e}");
    }
    assert!(understudy_vmm::set_vcpu_nice(20).is_err());
    assert!(understudy_vmm::set_vcpu_nice(-21).is_err());
    assert_eq!(
        understudy_vmm::vcpu_nice(),
        0,
        "a refused value changes nothing"
    );
    if let Err(e) = understudy_vmm::set_vcpu_nice(-5) {
        panic!("this test needs CAP_SYS_NICE (run it as root) to raise a thread's priority: {e}");
    }
    assert_eq!(understudy_vmm::vcpu_nice(), -5);
    let sink = MemorySink::default();
    let w = Workload::from_cli("idle", &Default::default()).unwrap();
    let vm = Vm::boot(
        &VmConfig::new(16 << 20),
        Boot::Workload(&w),
        OutputGate::passthrough(Box::new(sink)),
    )
    .unwrap();
    // The thread sets its priority as it starts; give it the moment it needs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut seen = None;
    while std::time::Instant::now() < deadline {
        seen = nice_of("vcpu0");
        if seen == Some(-5) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(seen, Some(-5), "the vCPU thread's nice value");
    // The rest of the process is left as it was.
    let me = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let rest = &me[me.rfind(')').unwrap() + 2..];
    assert_eq!(
        rest.split(' ').nth(16),
        Some("0"),
        "the test thread's nice value"
    );
    drop(vm);
}
