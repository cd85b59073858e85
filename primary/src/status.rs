//! What a node tells an operator about itself (`understudy status`), and the planned switchover
//! request (`understudy promote`), shared between the protection loop and the admin endpoint.

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A node's status as the admin endpoint reports it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    /// primary, backup, or promoted (a backup that took over).
    pub role: String,
    /// The VM.
    pub vm_id: String,
    /// starting, syncing, protected, unprotected, paused, fenced, stopped, handed-over (a
    /// primary); listening, receiving, hot, promoting, running (a backup).
    pub state: String,
    /// The certificate name of the node at the other end, if connected.
    pub peer: Option<String>,
    /// The last epoch the backup committed (primary: acknowledged; backup: applied).
    pub last_epoch: u64,
    /// Age of the backup's image when the last epoch was acknowledged (the RPO), in seconds.
    pub lag_seconds: Option<f64>,
    /// When `state` last changed, Unix seconds.
    pub since_unix: f64,
    /// A line an operator can act on, if something needs attention.
    pub note: Option<String>,
}

/// The shared status of one node.
#[derive(Clone, Debug, Default)]
pub struct StatusBoard(Arc<Mutex<NodeStatus>>);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl StatusBoard {
    /// A board for `role` of `vm_id`, in state `starting`.
    pub fn new(role: &str, vm_id: &str) -> Self {
        let b = StatusBoard::default();
        b.update(|s| {
            s.role = role.to_string();
            s.vm_id = vm_id.to_string();
        });
        b.set_state("starting", None);
        b
    }

    /// A copy of the status now.
    pub fn get(&self) -> NodeStatus {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes fields in place.
    pub fn update(&self, f: impl FnOnce(&mut NodeStatus)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Moves to `state` (with an optional note for the operator).
    pub fn set_state(&self, state: &str, note: Option<String>) {
        self.update(|s| {
            if s.state != state {
                s.state = state.to_string();
                s.since_unix = unix_now();
            }
            s.note = note;
        });
    }
}

/// How a planned switchover went.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SwitchoverReport {
    /// Whether the backup took over.
    pub ok: bool,
    /// The last epoch, committed by the backup, that it resumed from.
    pub epoch: u64,
    /// Guest paused on the primary to the backup's "running" signal reaching the primary (an
    /// upper bound of the guest's downtime), in milliseconds.
    pub downtime_ms: Option<f64>,
    /// What happened, in words.
    pub message: String,
}

/// The outcome of a request carried out elsewhere: whoever carries it out records it, whoever
/// asked waits for it.
#[derive(Debug)]
pub struct Outcome<R> {
    report: Mutex<Option<R>>,
    done: tokio::sync::Notify,
}

impl<R> Default for Outcome<R> {
    fn default() -> Self {
        Outcome {
            report: Mutex::new(None),
            done: tokio::sync::Notify::new(),
        }
    }
}

impl<R: Clone> Outcome<R> {
    /// Records the outcome and wakes whoever waits for it.
    pub fn finish(&self, report: R) {
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
        self.done.notify_waiters();
    }

    fn get(&self) -> Option<R> {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits for the outcome, up to `timeout`.
    pub async fn wait(&self, timeout: std::time::Duration) -> Option<R> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.done.notified();
            if let Some(r) = self.get() {
                return Some(r);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                return self.get();
            }
        }
    }
}

/// A planned switchover: requested by the admin endpoint, carried out by the protection loop.
#[derive(Debug, Default)]
pub struct Switchover {
    requested: std::sync::atomic::AtomicBool,
    outcome: Outcome<SwitchoverReport>,
}

impl Switchover {
    /// A switchover handle.
    pub fn new() -> Arc<Self> {
        Arc::new(Switchover::default())
    }

    /// Asks for a switchover; returns false if one was asked for already.
    pub fn request(&self) -> bool {
        !self
            .requested
            .swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether a switchover was asked for.
    pub fn requested(&self) -> bool {
        self.requested.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records the outcome and wakes whoever waits for it.
    pub fn finish(&self, report: SwitchoverReport) {
        self.outcome.finish(report);
    }

    /// Waits for the outcome, up to `timeout`.
    pub async fn wait(&self, timeout: std::time::Duration) -> Option<SwitchoverReport> {
        self.outcome.wait(timeout).await
    }
}

/// A request to move the VM to another host (`understudy migrate`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MigrateRequest {
    /// How.
    pub algorithm: crate::migrate::Algorithm,
    /// The destination (an `understudy backup` listening there).
    pub to: std::net::SocketAddr,
    /// The name in the destination's certificate.
    pub to_name: String,
    /// Precopy's convergence policy.
    #[serde(default)]
    pub precopy: crate::migrate::PrecopyPolicy,
    /// Quick eviction's target and interval bounds.
    #[serde(default)]
    pub quick: crate::migrate::QuickEviction,
    /// Bytes the source may keep to send pages again as deltas (`None`: the primary's own
    /// setting or default; 0 disables it).
    #[serde(default)]
    pub delta_cache: Option<u64>,
}

/// A move of the VM: requested by the admin endpoint, carried out by the primary's main loop.
#[derive(Debug, Default)]
pub struct Migration {
    request: Mutex<Option<MigrateRequest>>,
    /// When the move, and (quick eviction) the eviction, were asked for.
    asked: Mutex<(Option<Instant>, Option<Instant>)>,
    /// Quick eviction: the eviction itself was asked for (`understudy evict`).
    evict: Arc<std::sync::atomic::AtomicBool>,
    /// The move's report.
    pub outcome: Outcome<crate::migrate::MigrationReport>,
}

impl Migration {
    /// A migration handle.
    pub fn new() -> Arc<Self> {
        Arc::new(Migration::default())
    }

    /// Asks for a move; returns false if one was asked for already.
    pub fn request(&self, r: MigrateRequest) -> bool {
        let mut slot = self.request.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return false;
        }
        *slot = Some(r);
        *self.asked.lock().unwrap_or_else(|e| e.into_inner()) = (Some(Instant::now()), None);
        true
    }

    /// Forgets a move that failed, so that another may be asked for.
    pub(crate) fn clear(&self) {
        *self.request.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.evict.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// When the eviction was asked for: the move's request, or for quick eviction the evict.
    pub(crate) fn eviction_asked(&self) -> Option<Instant> {
        let a = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        a.1.or(a.0)
    }

    /// The move asked for, if any.
    pub fn requested(&self) -> Option<MigrateRequest> {
        self.request
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks a quick-eviction move to evict now; false unless one is under way.
    pub fn evict(&self) -> bool {
        let quick = self
            .requested()
            .is_some_and(|r| r.algorithm == crate::migrate::Algorithm::QuickEviction);
        let first = quick && !self.evict.swap(true, std::sync::atomic::Ordering::SeqCst);
        if first {
            self.asked.lock().unwrap_or_else(|e| e.into_inner()).1 = Some(Instant::now());
        }
        first
    }

    /// The eviction flag the capture thread watches.
    pub(crate) fn evict_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        Arc::clone(&self.evict)
    }
}
