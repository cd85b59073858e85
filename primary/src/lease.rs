//! Holding the VM's lease while the guest runs, and naming who may take it over.
//!
//! Two rules keep a VM from running twice or rolling back what the outside has seen:
//! - *Fencing*: a holder that is cut off from the witness and from its backup stops its guest
//!   before its lease can expire at the witness (its own view of the lease ends `margin`
//!   earlier, and an expiry check runs on its own timer, not behind a pending request).
//! - *Succession*: the holder tells the witness who may take the lease over after it expires:
//!   the backup that holds its committed epochs, or nobody while it runs unprotected (its
//!   output then goes out without a backup having the state behind it, so that backup's
//!   image is stale). Output held back for a lost backup is released only after the witness
//!   confirmed "nobody".

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use understudy_protocol::Successor;
use understudy_transport::lease::{LeaseBackend, LeaseState, WitnessLease};
use understudy_transport::Endpoint;

/// The successor the protection loop wants named, and the one the witness last confirmed.
#[derive(Debug)]
pub struct Succession {
    state: Mutex<(Successor, Option<Successor>)>,
    /// Hand the lease over now (a planned switchover): renew it with no time left.
    release: AtomicBool,
    released: AtomicBool,
    /// Whether a lease keeper exists; without a witness nothing is ever confirmed.
    arbitrated: bool,
}

impl Succession {
    /// A succession that a lease keeper confirms (`arbitrated`), or none (no witness).
    pub fn new(initial: Successor, arbitrated: bool) -> Arc<Self> {
        Arc::new(Succession {
            state: Mutex::new((initial, None)),
            release: AtomicBool::new(false),
            released: AtomicBool::new(false),
            arbitrated,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Successor, Option<Successor>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the lease keeper to name `s` at its next renewal (which comes at once).
    pub fn want(&self, s: Successor) {
        self.lock().0 = s;
    }

    /// The successor to send with the next renewal.
    pub fn wanted(&self) -> Successor {
        self.lock().0.clone()
    }

    /// The witness granted a renewal that named `s`.
    pub fn confirm(&self, s: Successor) {
        self.lock().1 = Some(s);
    }

    /// Asks the lease keeper to end our lease now, leaving it to the wanted successor.
    pub fn release(&self) {
        self.release.store(true, Ordering::SeqCst);
    }

    /// Whether the witness has ended our lease (always true without a witness).
    pub fn released(&self) -> bool {
        !self.arbitrated || self.released.load(Ordering::SeqCst)
    }

    /// Whether the witness has confirmed the wanted successor (always true without a witness).
    pub fn settled(&self) -> bool {
        let g = self.lock();
        !self.arbitrated || g.1.as_ref() == Some(&g.0)
    }
}

/// Where the lease comes from.
pub struct LeaseSource {
    pub endpoint: Endpoint,
    pub witness: SocketAddr,
    pub vm_id: String,
    pub margin: Duration,
}

impl LeaseSource {
    pub async fn connect(&self) -> Result<WitnessLease, String> {
        let mut lease = WitnessLease::connect(&self.endpoint, self.witness, "witness", &self.vm_id)
            .await
            .map_err(|e| e.to_string())?;
        lease.margin = self.margin;
        Ok(lease)
    }
}

/// What the lease keeper watches and sets.
pub struct Keeper {
    pub ttl: Duration,
    pub failure_timeout: Duration,
    pub backup_heard: Arc<Mutex<Instant>>,
    pub fenced: Arc<AtomicBool>,
    pub succession: Arc<Succession>,
}

/// Renews the lease (naming the wanted successor, reconnecting to the witness when the link
/// broke) until fenced; a separate timer fences this node when its view of the lease has run
/// out while the backup is silent too (cut off from both other votes).
pub async fn keep_lease(src: LeaseSource, mut lease: WitnessLease, first: LeaseState, k: Keeper) {
    let valid_until = Arc::new(Mutex::new(first.valid_until));
    let checker = {
        let valid_until = Arc::clone(&valid_until);
        let backup_heard = Arc::clone(&k.backup_heard);
        let fenced = Arc::clone(&k.fenced);
        let quiet = k.failure_timeout / 2;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let expired =
                    Instant::now() >= *valid_until.lock().unwrap_or_else(|e| e.into_inner());
                let backup_silent = backup_heard
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .elapsed()
                    > quiet;
                if expired && backup_silent {
                    error!("fenced: cut off from the witness and the backup; stopping the guest");
                    metrics::counter!("understudy_fenced_total").increment(1);
                    fenced.store(true, Ordering::SeqCst);
                    return;
                }
            }
        })
    };
    let mut broken = false;
    while !k.fenced.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let wanted = k.succession.wanted();
        if k.succession.release.load(Ordering::SeqCst) {
            // The guest is paused for good: hand the lease to the successor at once.
            match lease.request(Duration::ZERO, &wanted).await {
                Ok(s) if s.granted => {
                    info!(successor = ?wanted, "lease handed over");
                    k.succession.released.store(true, Ordering::SeqCst);
                    break;
                }
                Ok(s) => warn!(holder = %s.holder, "the witness refused the hand-over"),
                Err(e) => warn!(error = %e, "lease hand-over failed"),
            }
            continue;
        }
        let left = valid_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_duration_since(Instant::now());
        // Our view of a grant lasts ttl - margin (200 ms of a 300 ms lease): renew halfway.
        if left >= k.ttl / 3 && k.succession.settled() {
            continue;
        }
        if broken || lease.is_broken() {
            match src.connect().await {
                Ok(l) => {
                    info!("reconnected to the witness");
                    lease = l;
                    broken = false;
                }
                Err(e) => {
                    if !broken {
                        warn!(error = %e, "cannot reach the witness to renew the lease");
                    }
                    broken = true;
                    continue;
                }
            }
        }
        match lease.request(k.ttl, &wanted).await {
            Ok(s) if s.granted => {
                *valid_until.lock().unwrap_or_else(|e| e.into_inner()) = s.valid_until;
                if !k.succession.settled() {
                    info!(successor = ?wanted, "the witness confirmed our successor");
                }
                k.succession.confirm(wanted);
            }
            Ok(s) => warn!(holder = %s.holder, "the witness refused to renew our lease"),
            Err(e) => warn!(error = %e, "lease renewal failed"),
        }
    }
    checker.abort();
}
