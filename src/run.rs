//! `understudy run`: a guest alone, no replication.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tracing::{info, warn};
use understudy_vmm::guests::layout::{EXIT_CORRUPT, PROGRESS_GPA};
use understudy_vmm::state::DEFAULT_STATE_LIMIT;
use understudy_vmm::{Boot, ExitReason, GuestMemory, OutputGate, Vm, VmConfig, VmState};

use crate::workload::GuestArgs;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Stop after this many seconds (0 = until the guest exits or Ctrl-C).
    #[arg(long, default_value_t = 0.0)]
    seconds: f64,
    /// Boot this multiboot v1 image instead of a built-in workload (as QEMU's -kernel).
    #[arg(long, conflicts_with = "restore_state")]
    guest_image: Option<PathBuf>,
    /// Kernel command line for --guest-image.
    #[arg(long, default_value = "", requires = "guest_image")]
    cmdline: String,
    /// Continue a saved VM: its state blob (written by a pause of another VM).
    #[arg(long, requires = "memfd")]
    restore_state: Option<PathBuf>,
    /// With --restore-state: the guest memory, one memfd path per region in order (for example
    /// /proc/PID/fd/N of the process that holds it). Mapped, not copied.
    #[arg(long, num_args = 1..)]
    memfd: Vec<PathBuf>,
    /// Track dirty pages while running (costs the guest ~23 us per first write to a page).
    #[arg(long)]
    dirty_logging: bool,
    /// Also write the console into this file, each byte at its offset in the VM's console
    /// stream (pwrite; never truncated; a restored VM continues at its state's offset).
    #[arg(long)]
    console_file: Option<PathBuf>,
}

pub fn run(args: RunArgs) -> Result<i32> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let gate = OutputGate::passthrough(Box::new(std::io::stdout()));
    if let Some(file) = crate::protect::console_file(args.console_file.as_deref())? {
        gate.attach_file(file);
    }
    let started = Instant::now();
    let vm = if let Some(path) = &args.restore_state {
        let blob = std::fs::read(path)
            .with_context(|| format!("reading the state blob {}", path.display()))?;
        let state = VmState::decode(&blob, DEFAULT_STATE_LIMIT)
            .with_context(|| format!("{} is not a usable VM state", path.display()))?;
        let fds = args
            .memfd
            .iter()
            .map(|p| {
                File::options()
                    .read(true)
                    .write(true)
                    .open(p)
                    .map(OwnedFd::from)
                    .with_context(|| format!("opening guest memory {}", p.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let memory = GuestMemory::from_fds(&state.regions, fds, false)?;
        let vm = Vm::restore(memory, &state, gate, args.dirty_logging, false)?;
        info!(
            elapsed_us = started.elapsed().as_micros() as u64,
            vcpus = state.vcpus.len(),
            "restored VM is running"
        );
        vm
    } else {
        let mut config = VmConfig::new(args.guest.memory_bytes()?);
        config.regions = args.guest.regions()?;
        config.vcpus = args.guest.vcpus;
        config.dirty_logging = args.dirty_logging;
        match &args.guest_image {
            Some(path) => {
                let image = std::fs::read(path)
                    .with_context(|| format!("reading the guest image {}", path.display()))?;
                Vm::boot(
                    &config,
                    Boot::Multiboot {
                        image: &image,
                        cmdline: &args.cmdline,
                    },
                    gate,
                )?
            }
            None => {
                let workload = args.guest.workload()?;
                info!(workload = workload.name(), memory = %args.guest.memory, "booting");
                Vm::boot(&config, Boot::Workload(&workload), gate)?
            }
        }
    };

    let deadline = (args.seconds > 0.0).then(|| started + Duration::from_secs_f64(args.seconds));
    let exit = loop {
        if let Some(r) = vm.wait_exit(Duration::from_millis(50)) {
            break Some(r);
        }
        if stop.load(Ordering::SeqCst) {
            info!("interrupted; stopping the guest");
            break None;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break None;
        }
    };
    let progress = vm.memory().read_u64(PROGRESS_GPA).unwrap_or(0);
    let secs = started.elapsed().as_secs_f64();
    drop(vm);
    info!(
        seconds = format!("{secs:.2}"),
        progress,
        per_second = (progress as f64 / secs) as u64,
        "guest stopped"
    );
    match exit {
        None | Some(ExitReason::Guest(0)) => Ok(0),
        Some(ExitReason::Guest(EXIT_CORRUPT)) => {
            warn!("the guest reported CORRUPT");
            Ok(1)
        }
        Some(ExitReason::Guest(code)) => bail!("the guest exited with code {code}"),
        Some(other) => bail!("the guest stopped: {other:?}"),
    }
}
