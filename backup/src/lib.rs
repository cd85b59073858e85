//! The backup: receives a primary's epochs over QUIC, verifies them and applies each one to the
//! hot image as a single step, then acknowledges it.
//!
//! ```text
//!  uni streams --chunk--> decode + verify (blocking pool) --> EpochAssembler(E) (any order)
//!  control stream: Hello -> Welcome | Reject
//!                  Commit(E) --+
//!                              +--> when every chunk of E is in: assembler.commit() under
//!                                   the image lock (a promotion sees all of E or none of it),
//!                                   digest checked, state blob kept --> Ack(E)
//! ```
//!
//! The hot image lives in memfds ([`understudy_vmm::GuestMemory`]), so a promotion can hand
//! them to a new VM without a copy. A session is one primary; a bad peer (an undecodable frame,
//! an epoch out of order, a commit whose chunks never come, a digest mismatch) gets a clear log
//! line and a closed connection, and nothing of the offending epoch is applied.

mod failover;
mod image;
mod persist;
mod postcopy;
mod session;
mod vmthread;

pub use vmthread::VmThread;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use image::{HotImage, Replicated};
pub use session::{run, BackupError};
use understudy_transport::TlsFiles;

/// Everything the backup needs.
pub struct BackupConfig {
    /// Where to listen (UDP, QUIC).
    pub listen: SocketAddr,
    /// Our certificate, key and the CA.
    pub tls: TlsFiles,
    /// The VM this backup protects; a primary for another VM is refused.
    pub vm_id: String,
    /// Test knob: hold every `Ack` this long.
    pub ack_delay: Duration,
    /// Test knob: a JSON line per `Ack` sent (epoch, time).
    pub ack_journal: Option<PathBuf>,
    /// When the primary says goodbye: leave the image and the last state blob here.
    pub dump_dir: Option<PathBuf>,
    /// Keep the hot image and committed state on disk here, crash-consistently.
    pub image_dir: Option<PathBuf>,
    /// Exit after the first session instead of waiting for the next primary.
    pub exit_after_session: bool,
    /// With a `Commit` waiting for its chunks, how long no chunk at all may arrive before the
    /// session is ended.
    pub chunk_timeout: Duration,
    /// Silence from the primary after which it is declared failed.
    pub failure_timeout: Duration,
    /// The witness that grants the VM's lease; without one, the backup never promotes.
    pub witness: Option<std::net::SocketAddr>,
    /// Lease length asked of the witness.
    pub lease_ttl: Duration,
    /// After a promotion, protect the VM with this backup (re-protection); taken once.
    pub protect_to: std::sync::Mutex<Option<understudy_primary::PrimaryConfig>>,
    /// What the admin endpoint reports.
    pub status: understudy_primary::status::StatusBoard,
    /// After a promotion, also write console bytes at their stream offsets here (the file the
    /// primary writes: each byte ends up in it once).
    pub console_file: Option<understudy_vmm::ConsoleFile>,
    /// Where VMs are started (promotion, postcopy destination): a thread at the priority the
    /// process started with, whatever `--nice` did to the rest.
    pub vm_thread: std::sync::Arc<VmThread>,
}
