//! The primary: runs the guest and protects it by continuous checkpointing to a backup.
//!
//! ```text
//!  capture thread          encoder thread             tokio tasks
//!  --------------          --------------             -----------
//!  wait: interval, and     EncoderState::             chunks on parallel uni streams,
//!  a free in-flight slot   encode_epoch (workers)     then Commit(E) on the control stream
//!  pause                        |                            |
//!  state + take_dirty           |                     control reader: Ack(E) ->
//!  copy dirty pages -----> Captured(E) -----> Encoded(E) ---> release E's console bytes,
//!  seal console epoch E                                      free E's slot (backpressure)
//!  resume
//! ```
//!
//! Before the first consistent epoch, a *full sync* ships every page while the guest runs, as
//! sync epochs whose `Commit` carries no VM state (the backup's image is not promotable yet).
//! Dirty logging starts before the sync, so the first consistent epoch carries every page the
//! guest changed meanwhile, and after it the backup's image equals the guest's at its capture.
//! At most `max_in_flight` epochs are between capture and `Ack`; when the backup or the link
//! falls behind, the capture thread waits for a slot and the next epoch simply gets longer.

mod basecache;
mod capture;
mod journal;
mod lease;
pub mod migrate;
mod postcopy;
mod resync;
mod session;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use capture::PageMap;
pub use lease::{keep_lease, Keeper, LeaseSource, Succession};
pub use session::{protect_running, run, Guard, OnBackupLoss, PrimaryError, Summary};
use understudy_transport::TlsFiles;
use understudy_vmm::guests::Workload;
use understudy_vmm::RegionSpec;

/// Default epoch length.
pub const DEFAULT_EPOCH: Duration = Duration::from_millis(25);
/// Default bound on epochs between capture and `Ack`.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 2;

/// Default bound of the delta base cache of a move session (`PrimaryConfig::delta_cache`):
/// enough for every non-zero page of a guest up to 1 GiB, so that each page the guest rewrites
/// during the move goes again as a few bytes of `Delta` instead of whole.
pub const DEFAULT_MOVE_DELTA_CACHE: u64 = 1 << 30;

/// A multiboot v1 kernel and its command line (as QEMU's `-kernel` / `-append`).
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// Where it came from (for logs).
    pub name: String,
    pub image: Vec<u8>,
    pub cmdline: String,
}

/// Everything the primary needs.
pub struct PrimaryConfig {
    /// Identifies the VM to the backup.
    pub vm_id: String,
    /// Where the backup listens.
    pub backup: SocketAddr,
    /// The name in the backup's certificate.
    pub backup_name: String,
    /// Our certificate, key and the CA.
    pub tls: TlsFiles,
    /// The guest.
    pub workload: Workload,
    /// A multiboot v1 image to boot instead of `workload`.
    pub guest_image: Option<GuestImage>,
    /// Guest memory layout.
    pub regions: Vec<RegionSpec>,
    /// vCPUs.
    pub vcpus: u8,
    /// Epoch length.
    pub epoch: Duration,
    /// Epochs between capture and `Ack`, at most.
    pub max_in_flight: usize,
    /// Encoder worker threads.
    pub encode_threads: usize,
    /// Nice value (0-19) of the encoder and its workers: above the vCPUs' 0, a CPU-bound
    /// host gives the guest its CPU first, and epochs get longer (backpressure) instead.
    pub encoder_nice: i32,
    /// Pages per full-sync epoch.
    pub sync_batch_pages: u32,
    /// Where released console bytes go.
    pub console: Box<dyn std::io::Write + Send + Sync>,
    /// Also write each released console byte at its stream offset here (exactly once across
    /// a failover when the backup writes the same file).
    pub console_file: Option<understudy_vmm::ConsoleFile>,
    /// Test knob: never tell the backup that an epoch's output is released, so that a
    /// promotion emits output this primary already released (the console file must still
    /// hold it once).
    pub no_release_echo: bool,
    /// Test knob: a JSON line per output release (epoch, bytes, time).
    pub release_journal: Option<PathBuf>,
    /// Stop after this many consistent epochs (0 = run until stopped).
    pub stop_after_epochs: u64,
    /// On a stop: leave guest memory and the last committed state blob here.
    pub dump_dir: Option<PathBuf>,
    /// Show a progress bar for the full sync (a terminal); otherwise log lines.
    pub progress_bar: bool,
    /// How often to send a heartbeat to the backup.
    pub heartbeat_interval: Duration,
    /// Silence from the backup after which it is considered lost.
    pub failure_timeout: Duration,
    /// The witness granting the VM's lease (fencing); without one, no lease is taken.
    pub witness: Option<SocketAddr>,
    /// Lease length asked of the witness.
    pub lease_ttl: Duration,
    /// Test knob (drills): SIGKILL this process at a phase of a consistent epoch.
    pub kill_at: Option<KillAt>,
    /// What to do with the guest while no backup protects it.
    pub on_backup_loss: OnBackupLoss,
    /// How often to try to reach the backup again after losing it.
    pub reconnect_interval: Duration,
    /// Test knob: the protocol versions announced in Hello (default: the ones this build speaks).
    pub versions: Option<(u16, u16)>,
    /// What the admin endpoint reports.
    pub status: status::StatusBoard,
    /// A planned switchover to the backup, requested through the admin endpoint.
    pub switchover: std::sync::Arc<status::Switchover>,
    /// No backup: the VM runs unprotected until it is moved (`understudy migrate`); `backup`
    /// and `backup_name` are not used.
    pub standalone: bool,
    /// A move to another host, requested through the admin endpoint.
    pub migration: std::sync::Arc<status::Migration>,
    /// Bytes of page content the encoder may keep to send pages it sent before as `Delta`
    /// records (the backup's content XOR the new one). `None`: [`DEFAULT_MOVE_DELTA_CACHE`]
    /// for moves (precopy, quick eviction; a move's request may set its own), none for
    /// protection sessions; `Some(0)` disables it.
    pub delta_cache: Option<u64>,
}

/// Where in an epoch a drill kills the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillPhase {
    /// During the pause, after the dirty set was taken.
    Capture,
    /// After the epoch's chunks were sent, before its Commit.
    Send,
    /// Right after the Commit was sent.
    Commit,
    /// On the Ack, before the epoch's console bytes are released.
    Ack,
}

/// Kill at `phase` of the first consistent epoch numbered at least `epoch`.
#[derive(Clone, Copy, Debug)]
pub struct KillAt {
    pub phase: KillPhase,
    pub epoch: u64,
}

impl KillAt {
    pub(crate) fn check(kill: Option<KillAt>, phase: KillPhase, epoch: u64) {
        if let Some(k) = kill {
            if k.phase == phase && epoch >= k.epoch {
                tracing::warn!(?phase, epoch, "drill: killing this primary now");
                understudy_vmm::sigkill_self();
            }
        }
    }
}
