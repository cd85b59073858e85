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

/// A planned switchover: requested by the admin endpoint, carried out by the protection loop.
#[derive(Debug, Default)]
pub struct Switchover {
    requested: std::sync::atomic::AtomicBool,
    report: Mutex<Option<SwitchoverReport>>,
    done: tokio::sync::Notify,
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
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
        self.done.notify_waiters();
    }

    /// Waits for the outcome, up to `timeout`.
    pub async fn wait(&self, timeout: std::time::Duration) -> Option<SwitchoverReport> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.done.notified();
            if let Some(r) = self
                .report
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return Some(r);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                return self
                    .report
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
            }
        }
    }
}
