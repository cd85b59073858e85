//! `understudy primary` and `understudy backup`: protect mode.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tracing::info;
use understudy_backup::BackupConfig;
use understudy_primary::PrimaryConfig;
use understudy_protocol::MAX_EPOCHS_IN_FLIGHT;
use understudy_transport::TlsFiles;

use crate::workload::GuestArgs;

/// Failure detection and fencing, shared by primary and backup.
#[derive(Args, Clone, Debug)]
pub struct FailoverArgs {
    /// The witness (host:port) that grants the VM's lease; without it there is no fencing and
    /// the backup never promotes.
    #[arg(long)]
    pub witness: Option<SocketAddr>,
    /// Lease length asked of the witness (renewed well before it ends).
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// Silence from the peer after which it is declared failed.
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    pub failure_timeout: Duration,
}

/// TLS material shared by every role.
#[derive(Args, Clone, Debug)]
pub struct TlsArgs {
    /// Directory with ca.pem and this node's NAME.pem / NAME.key (see `understudy certs`).
    #[arg(long, default_value = "certs")]
    pub certs: PathBuf,
    /// This node's certificate name.
    #[arg(long)]
    pub name: Option<String>,
}

impl TlsArgs {
    pub fn files(&self, default_name: &str) -> TlsFiles {
        TlsFiles::in_dir(&self.certs, self.name.as_deref().unwrap_or(default_name))
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "ms"));
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 25ms, 1.5s or 500us"))?;
    let secs = match unit {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}: use us, ms or s")),
    };
    if !(0.0..=3600.0).contains(&secs) {
        return Err(format!("{s} is out of range (0..=1h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn parse_phase(s: &str) -> Result<understudy_primary::KillPhase, String> {
    use understudy_primary::KillPhase::*;
    Ok(match s {
        "capture" => Capture,
        "send" => Send,
        "commit" => Commit,
        "ack" => Ack,
        _ => return Err(format!("{s:?}: use capture, send, commit or ack")),
    })
}

fn parse_epoch(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(10) {
        return Err(format!("--epoch {s} is out of range: use 1ms..=10s"));
    }
    Ok(d)
}

fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    ctrlc::set_handler(move || s.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    Ok(stop)
}

/// `--console-file`: opened now, so that a path that cannot be written stops the command
/// before the guest starts.
pub fn console_file(path: Option<&std::path::Path>) -> Result<Option<understudy_vmm::ConsoleFile>> {
    Ok(path.map(understudy_vmm::ConsoleFile::open).transpose()?)
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The default of `--vcpu-nice` for a VM that runs unprotected (a primary without `--backup`).
pub const STANDALONE_VCPU_NICE: i32 = -5;

/// `--vcpu-nice`: the guest's CPU priority on this host.
#[derive(Args, Clone, Copy)]
pub struct VcpuArgs {
    /// CPU priority (nice, -20..=19) of the guest's vCPU threads. Default: -5 for a VM without
    /// --backup (it runs unprotected until it is moved), 0 for a protected VM and on a backup.
    /// Below 0 the guest wins the CPU over this node's replication work and anything else at
    /// normal priority: on a 2-core host a move's full sync kept a spinning guest off the CPU
    /// for 17-25 ms at a time at 0, and for at most ~7-9 ms at -5. A protected VM stays at 0 by
    /// default because its heartbeats and lease renewals must not wait behind busy vCPUs on a
    /// host short of CPU (a node that misses them is fenced or taken over), and because its
    /// epochs then stretch and its pauses grow (unpaced guest: 35 ms p50 at -5, 18 ms at 0).
    /// Raising a priority needs CAP_SYS_NICE (root has it); without it the vCPUs run at the
    /// process's priority and a warning says so.
    #[arg(long, allow_hyphen_values = true, value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub vcpu_nice: Option<i32>,
}

impl VcpuArgs {
    /// Sets the priority for every vCPU thread this process starts (`protected`: the VM has a
    /// backup, or this is one); warns and goes on at the process's priority when it may not.
    pub fn apply(self, protected: bool) {
        let nice = self
            .vcpu_nice
            .unwrap_or(if protected { 0 } else { STANDALONE_VCPU_NICE });
        if let Err(e) = understudy_vmm::set_vcpu_nice(nice) {
            tracing::warn!(
                error = %e,
                vcpu_nice = nice,
                "cannot run the vCPUs at this priority (raising it needs CAP_SYS_NICE): they run at the process's priority; pass --vcpu-nice 0 to silence this"
            );
        }
    }
}

#[derive(Args)]
pub struct PrimaryArgs {
    /// Read any of these flags from a TOML file (keys = long flag names); the command line wins.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The backup's address (host:port, UDP). Without it the VM runs unprotected until it is
    /// moved to another host with `understudy migrate --admin ...` (needs --admin).
    #[arg(long)]
    backup: Option<SocketAddr>,
    /// The name in the backup's certificate.
    #[arg(long, default_value = "backup")]
    backup_name: String,
    /// The VM's id; the backup refuses a primary for another VM.
    #[arg(long, default_value = "vm-1")]
    vm_id: String,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    vcpu: VcpuArgs,
    #[command(flatten)]
    guest: GuestArgs,
    /// Boot this multiboot v1 image instead of a built-in workload (as QEMU's -kernel), e.g.
    /// the reference guest of the QEMU anchors, so that both run the same guest.
    #[arg(long)]
    guest_image: Option<PathBuf>,
    /// Kernel command line for --guest-image.
    #[arg(long, default_value = "", requires = "guest_image")]
    cmdline: String,
    /// Epoch length (checkpoint interval), 1ms..=10s.
    #[arg(long, default_value = "25ms", value_parser = parse_epoch)]
    epoch: Duration,
    /// Epochs between capture and the backup's Ack at most; when reached, epochs get longer.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=MAX_EPOCHS_IN_FLIGHT))]
    max_in_flight: u64,
    /// Encoder worker threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    encode_threads: u64,
    /// CPU priority (nice, 0-19) of the encoder threads, which compress and hash the dirty
    /// pages. The vCPUs keep 0: when the host runs out of CPU, the guest keeps its share and
    /// the epochs get longer (the backup's image lags more) instead. 0 treats both alike.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    encoder_nice: i32,
    /// Pages per full-sync epoch.
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(256..=262144))]
    sync_batch: u32,
    /// Stop after this many consistent epochs, leaving the guest paused (0 = run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    epochs: u64,
    /// With --epochs: write guest memory (memory.img) and the last committed state (state.bin) here.
    #[arg(long)]
    dump_dir: Option<PathBuf>,
    #[command(flatten)]
    failover: FailoverArgs,
    /// Test knob (drills): SIGKILL this process at a phase (capture, send, commit, ack) of the
    /// consistent epoch given by --kill-epoch.
    #[arg(long, hide = true, requires = "kill_epoch", value_parser = parse_phase)]
    kill_at: Option<understudy_primary::KillPhase>,
    /// Test knob: see --kill-at.
    #[arg(long, hide = true)]
    kill_epoch: Option<u64>,
    /// Test knob: announce protocol versions MIN-MAX in Hello (e.g. 0-0, a version nobody
    /// speaks), to check how a backup refuses a primary it cannot talk to.
    #[arg(long, hide = true, value_parser = parse_versions)]
    announce_versions: Option<(u16, u16)>,
    /// Heartbeat interval on the control stream.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Test knob: append a JSON line per console release (epoch, bytes, unix_ns) to this file.
    #[arg(long, hide = true)]
    release_journal: Option<PathBuf>,
    /// Test knob: never tell the backup that an epoch's output was released, so that a
    /// promoted backup emits output this primary already released.
    #[arg(long, hide = true)]
    no_release_echo: bool,
    /// Also write the console into this file, each byte at its offset in the VM's console
    /// stream (pwrite; never truncated). Give the backup the same file (shared storage): what
    /// both write lands once, so the file holds every byte exactly once, across a failover
    /// too. stdout still shows the console, where a failover may repeat an epoch's output.
    /// Give each new VM a new file: one that held a longer console keeps its tail.
    #[arg(long)]
    console_file: Option<PathBuf>,
    /// Serve Prometheus metrics: a port (on 127.0.0.1) or HOST:PORT, e.g. 9100.
    #[arg(long, value_parser = crate::metrics::parse_addr)]
    metrics: Option<SocketAddr>,
    /// When the backup is lost: `continue` runs the guest on unprotected (console output is
    /// no longer held back) while reconnecting; `pause` pauses it until a backup is back.
    /// Either way a reconnected backup gets a full sync, or only the pages changed since the
    /// epoch it kept if it keeps its image on disk (`backup --image-dir`).
    #[arg(long, default_value = "continue", value_parser = parse_on_backup_loss)]
    on_backup_loss: understudy_primary::OnBackupLoss,
    /// How often to try to reach a lost backup again.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    reconnect_interval: Duration,
    /// After the VM moved to another host (`understudy migrate`), keep serving metrics and the
    /// admin endpoint this long before exiting, so that Prometheus scrapes the move's figures.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    linger_after_move: Duration,
    /// Serve the admin endpoint (`understudy status`, `understudy promote`) on this address,
    /// e.g. 127.0.0.1:7600. Plain HTTP: bind it to loopback or a management network.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Memory (e.g. 512M, 1G; 0 = off) for the content last sent of each page, so that a page
    /// sent again goes as a Delta: its XOR with what the other side holds, compressed, a few
    /// bytes when the guest changed a word of it. Unset: 1G for moves (`understudy migrate`,
    /// which may set its own), where the sync and the live rounds or snapshots resend pages
    /// the guest rewrites, and 1G holds every non-zero page of a guest up to 1 GiB; off for
    /// protection, where it costs a copy of each dirty page every epoch and the memory for
    /// as long as the VM is protected. Given, it applies to both. Filled only as pages are
    /// sent (zero pages take nothing), freed when the session ends; when full, pages read once
    /// make room first.
    #[arg(long, value_parser = parse_delta_cache)]
    delta_cache: Option<u64>,
}

/// `--delta-cache`: a size from 0 (off) to the largest guest memory.
pub fn parse_delta_cache(s: &str) -> Result<u64, String> {
    let max = understudy_vmm::memory::MAX_MEMORY;
    understudy_vmm::guests::parse_size_in("delta-cache", s, 0, max).map_err(|_| {
        format!(
            "use a size like 512M or 1G, at most {}G (0 = off)",
            max >> 30
        )
    })
}

fn parse_versions(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: use MIN-MAX, e.g. 1-2"))?;
    let p = |x: &str| x.parse::<u16>().map_err(|e| format!("{x:?}: {e}"));
    Ok((p(a)?, p(b)?))
}

fn parse_on_backup_loss(s: &str) -> Result<understudy_primary::OnBackupLoss, String> {
    match s {
        "continue" => Ok(understudy_primary::OnBackupLoss::Continue),
        "pause" => Ok(understudy_primary::OnBackupLoss::Pause),
        _ => Err(format!("{s:?}: use continue or pause")),
    }
}

pub fn primary(args: PrimaryArgs) -> Result<i32> {
    let _ = &args.config;
    crate::metrics::install(args.metrics)?;
    args.vcpu.apply(args.backup.is_some());
    crate::metrics::zero_counters(&[
        "understudy_epochs_total",
        "understudy_fenced_total",
        "understudy_bytes_raw_total",
        "understudy_bytes_encoded_total",
        "understudy_bytes_wire_total",
        "understudy_pages_total",
        "understudy_migrations_total",
    ]);
    let stop = stop_flag()?;
    let status = understudy_primary::status::StatusBoard::new("primary", &args.vm_id);
    let switchover = understudy_primary::status::Switchover::new();
    let migration = understudy_primary::status::Migration::new();
    let admin = args.admin.map(|addr| {
        (
            addr,
            crate::admin::Admin {
                status: status.clone(),
                switchover: Some(Arc::clone(&switchover)),
                migration: Some(Arc::clone(&migration)),
            },
        )
    });
    let standalone = args.backup.is_none();
    if standalone && args.failover.witness.is_some() {
        bail!("--witness fences a protected VM: give --backup too, or leave --witness out");
    }
    if standalone && args.admin.is_none() {
        bail!("without --backup the VM runs unprotected and can only be moved through the admin endpoint: give --admin ADDR (or --backup ADDR to protect it)");
    }
    let guest_image = match &args.guest_image {
        None => None,
        Some(path) => Some(understudy_primary::GuestImage {
            name: path.display().to_string(),
            image: std::fs::read(path).with_context(|| {
                format!(
                    "reading the guest image {} (a multiboot v1 kernel)",
                    path.display()
                )
            })?,
            cmdline: args.cmdline.clone(),
        }),
    };
    let cfg = PrimaryConfig {
        vm_id: args.vm_id,
        guest_image,
        backup: args
            .backup
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        backup_name: args.backup_name,
        tls: args.tls.files("primary"),
        workload: args.guest.workload()?,
        regions: args.guest.regions()?,
        vcpus: args.guest.vcpus,
        epoch: args.epoch,
        max_in_flight: args.max_in_flight as usize,
        encode_threads: args.encode_threads as usize,
        encoder_nice: args.encoder_nice,
        sync_batch_pages: args.sync_batch,
        console: Box::new(std::io::stdout()),
        console_file: console_file(args.console_file.as_deref())?,
        no_release_echo: args.no_release_echo,
        release_journal: args.release_journal,
        stop_after_epochs: args.epochs,
        dump_dir: args.dump_dir,
        progress_bar: std::io::stderr().is_terminal(),
        heartbeat_interval: args.heartbeat_interval,
        failure_timeout: args.failover.failure_timeout,
        witness: args.failover.witness,
        lease_ttl: args.failover.lease_ttl,
        kill_at: args.kill_at.map(|phase| understudy_primary::KillAt {
            phase,
            epoch: args.kill_epoch.unwrap_or(0),
        }),
        on_backup_loss: args.on_backup_loss,
        reconnect_interval: args.reconnect_interval,
        status,
        switchover,
        versions: args.announce_versions,
        standalone,
        migration,
        delta_cache: args.delta_cache,
    };
    let linger = args.linger_after_move;
    let summary = runtime()?.block_on(async move {
        if let Some((addr, admin)) = admin {
            crate::admin::serve(addr, admin).await?;
        }
        match understudy_primary::run(cfg, stop).await {
            Err(understudy_primary::PrimaryError::Moved(summary)) => {
                info!("the VM runs on the destination now; nothing of it is left here");
                crate::admin::drain(Duration::from_secs(5)).await;
                if !linger.is_zero() {
                    info!(
                        seconds = linger.as_secs_f64(),
                        "serving metrics a while longer (--linger-after-move)"
                    );
                    tokio::time::sleep(linger).await;
                }
                Ok(summary)
            }
            r => Ok::<_, anyhow::Error>(r?),
        }
    })?;
    info!(
        sessions = summary.sessions,
        sync_epochs = summary.sync_epochs,
        last_epoch = summary.last_epoch,
        last_acked = summary.last_acked,
        wire_bytes = summary.wire_bytes,
        raw_bytes = summary.raw_bytes,
        "primary finished"
    );
    Ok(0)
}

#[derive(Args)]
pub struct BackupArgs {
    /// Read any of these flags from a TOML file (keys = long flag names); the command line wins.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (UDP, QUIC).
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// CPU priority (nice, 0-19) of the backup's replication work: receiving, decoding and
    /// applying epochs, heartbeats. 10 keeps it below the VMs of this host (at 0 it preempted
    /// a guest on the same 2-core host for 16-23 ms at a time during a full sync, at 10 for
    /// 5-9 ms), but on a busy host the backup then syncs and recovers more slowly (a restarted
    /// backup's resync, a move's full sync), so the default is 0. A VM this backup starts
    /// (promotion, postcopy) runs its vCPUs at --vcpu-nice (at 0, the default: at the priority
    /// the process started with), and the persist writer keeps the process's original priority; after a promotion with --protect-to, the re-protection's
    /// threads run at this value.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    nice: i32,
    /// The VM this backup protects; a primary for another VM id is refused.
    #[arg(long, default_value = "vm-1")]
    vm_id: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// When the primary says goodbye: write the image (memory.img) and last state (state.bin) here.
    #[arg(long)]
    dump_dir: Option<PathBuf>,
    /// Exit after serving one primary instead of waiting for the next.
    #[arg(long)]
    once: bool,
    /// Keep the hot image and the committed VM state on disk in this directory,
    /// crash-consistently (a journal of committed epochs folded into an image file). A
    /// restarted backup checks what it finds there and reports its epoch; the primary that
    /// sent that image then sends only the pages changed since (delta resync), any other
    /// primary a full sync.
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// With a Commit waiting for its chunks: how long no chunk at all may arrive before the
    /// session is ended (a slow link that keeps delivering is given the time it needs).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    chunk_timeout: Duration,
    #[command(flatten)]
    failover: FailoverArgs,
    #[command(flatten)]
    vcpu: VcpuArgs,
    /// Test knob: hold every Ack this long.
    #[arg(long, hide = true, default_value = "0ms", value_parser = parse_duration)]
    ack_delay: Duration,
    /// Test knob: append a JSON line per Ack sent (epoch, unix_ns) to this file.
    #[arg(long, hide = true)]
    ack_journal: Option<PathBuf>,
    /// Serve Prometheus metrics: a port (on 127.0.0.1) or HOST:PORT, e.g. 9101.
    #[arg(long, value_parser = crate::metrics::parse_addr)]
    metrics: Option<SocketAddr>,
    /// Re-protection: after promoting, protect the VM with the backup at this address (full
    /// sync, then epochs, as a primary would).
    #[arg(long)]
    protect_to: Option<SocketAddr>,
    /// The name in the certificate of the --protect-to backup (it must differ from ours, so
    /// that the witness tells the two apart).
    #[arg(long, default_value = "backup2")]
    protect_to_name: String,
    /// Epoch length when re-protecting, 1ms..=10s.
    #[arg(long, default_value = "25ms", value_parser = parse_epoch)]
    protect_epoch: Duration,
    /// Serve the admin endpoint (`understudy status`) on this address, e.g. 127.0.0.1:7601.
    /// Plain HTTP: bind it to loopback or a management network.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// After a promotion, also write the console into this file at each byte's offset in the
    /// VM's console stream: give it the primary's --console-file (shared storage), and output
    /// the primary released and this backup emits again lands once.
    #[arg(long)]
    console_file: Option<PathBuf>,
}

/// What a promoted backup needs to protect its VM with a new backup.
fn reprotect_config(
    args: &BackupArgs,
    to: SocketAddr,
    status: &understudy_primary::status::StatusBoard,
) -> PrimaryConfig {
    PrimaryConfig {
        vm_id: args.vm_id.clone(),
        backup: to,
        backup_name: args.protect_to_name.clone(),
        tls: args.tls.files("backup"),
        // The VM already runs: guest, layout and vCPUs come from it.
        workload: understudy_vmm::guests::Workload::Idle(Default::default()),
        guest_image: None,
        regions: Vec::new(),
        vcpus: 1,
        epoch: args.protect_epoch,
        max_in_flight: understudy_primary::DEFAULT_MAX_IN_FLIGHT,
        encode_threads: 2,
        encoder_nice: 10,
        sync_batch_pages: 16384,
        console: Box::new(std::io::sink()),
        // The promoted VM's gate already writes the console file.
        console_file: None,
        no_release_echo: false,
        release_journal: None,
        stop_after_epochs: 0,
        dump_dir: None,
        progress_bar: false,
        heartbeat_interval: Duration::from_millis(50),
        failure_timeout: args.failover.failure_timeout,
        witness: None,
        lease_ttl: args.failover.lease_ttl,
        kill_at: None,
        on_backup_loss: understudy_primary::OnBackupLoss::Continue,
        reconnect_interval: Duration::from_secs(1),
        status: status.clone(),
        switchover: understudy_primary::status::Switchover::new(),
        versions: None,
        standalone: false,
        migration: understudy_primary::status::Migration::new(),
        // Protection: no delta cache (see `primary --delta-cache`).
        delta_cache: None,
    }
}

pub fn backup(args: BackupArgs) -> Result<i32> {
    let _ = &args.config;
    crate::metrics::install(args.metrics)?;
    args.vcpu.apply(true);
    crate::metrics::zero_counters(&[
        "understudy_epochs_total",
        "understudy_promotions_total",
        "understudy_digest_mismatches_total",
        "understudy_fenced_total",
        "understudy_promotion_seconds",
    ]);
    let stop = stop_flag()?;
    let status = understudy_primary::status::StatusBoard::new("backup", &args.vm_id);
    let protect_to = args
        .protect_to
        .map(|to| reprotect_config(&args, to, &status));
    let admin = args.admin.map(|addr| {
        (
            addr,
            crate::admin::Admin {
                status: status.clone(),
                switchover: None,
                migration: None,
            },
        )
    });
    let cfg = BackupConfig {
        listen: args.listen,
        tls: args.tls.files("backup"),
        vm_id: args.vm_id,
        ack_delay: args.ack_delay,
        ack_journal: args.ack_journal,
        dump_dir: args.dump_dir,
        image_dir: args.image_dir,
        exit_after_session: args.once,
        chunk_timeout: args.chunk_timeout,
        failure_timeout: args.failover.failure_timeout,
        witness: args.failover.witness,
        lease_ttl: args.failover.lease_ttl,
        protect_to: std::sync::Mutex::new(protect_to),
        status,
        console_file: console_file(args.console_file.as_deref())?,
        vm_thread: std::sync::Arc::new(
            understudy_backup::VmThread::start().context("starting the VM start thread")?,
        ),
    };
    // Every thread made from here on (the runtime's) inherits the lower priority; the VM
    // start thread above keeps the original one for the vCPUs.
    if args.nice > 0 {
        understudy_vmm::set_thread_nice(args.nice)
            .with_context(|| format!("lowering the backup's priority to nice {}", args.nice))?;
    }
    runtime()?.block_on(async move {
        if let Some((addr, admin)) = admin {
            crate::admin::serve(addr, admin).await?;
        }
        Ok::<_, anyhow::Error>(understudy_backup::run(cfg, stop).await?)
    })?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("25ms"), Ok(Duration::from_millis(25)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_epoch("0ms").is_err());
        assert!(parse_epoch("11s").is_err());
    }
}
