//! Taking over: win the VM's lease from the witness, promote the hot image to a running VM (its
//! memfds become the new VM's memory, no copy), and keep the lease while the VM runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use understudy_transport::lease::{LeaseBackend, LeaseState, WitnessLease};
use understudy_transport::Endpoint;
use understudy_vmm::state::DEFAULT_STATE_LIMIT;
use understudy_vmm::{GuestMemory, OutputGate, Vm, VmState};

use understudy_primary::{
    keep_lease, protect_running, Guard, Keeper, LeaseSource, PrimaryError, Succession, Summary,
};
use understudy_protocol::Successor;

use crate::session::{BackupError, Held};
use crate::BackupConfig;

/// How long the backup keeps trying to win the lease before giving up.
const LEASE_PATIENCE: Duration = Duration::from_secs(30);

async fn connect(cfg: &BackupConfig, endpoint: &Endpoint) -> Option<WitnessLease> {
    let addr = cfg.witness?;
    match WitnessLease::connect(endpoint, addr, "witness", &cfg.vm_id).await {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(error = %e, "cannot reach the witness");
            None
        }
    }
}

/// Wins the lease (waiting out the old holder's), or gives up after `LEASE_PATIENCE`.
async fn win_lease(
    cfg: &BackupConfig,
    endpoint: &Endpoint,
    stop: &AtomicBool,
) -> Option<(WitnessLease, LeaseState)> {
    let started = Instant::now();
    let mut lease = None;
    let mut not_ours = 0;
    while started.elapsed() < LEASE_PATIENCE && !stop.load(Ordering::SeqCst) {
        if lease.is_none() {
            lease = connect(cfg, endpoint).await;
        }
        if let Some(l) = &mut lease {
            // A promoted VM has no successor until it is protected again.
            match l.request(cfg.lease_ttl, &Successor::Nobody).await {
                Ok(s) if s.granted => return lease.map(|l| (l, s)),
                Ok(s) if s.remaining.is_zero() => {
                    // Expired, but its holder named another successor (or nobody: it ran
                    // unprotected, so our image lacks output the outside has seen).
                    not_ours += 1;
                    if not_ours >= 10 {
                        error!(holder = %s.holder,
                            "the witness will not hand us the lease: its last holder did not name us as successor (it may have run unprotected after losing us); not promoting");
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Ok(s) if started.elapsed() > cfg.lease_ttl * 4 => {
                    // A dead holder's lease runs out within one lease length; this one keeps
                    // being renewed, so its holder is alive and reaches the witness.
                    error!(holder = %s.holder,
                        "the lease holder keeps renewing its lease: it is alive (a partition between it and us?); not promoting");
                    return None;
                }
                Ok(s) => {
                    info!(holder = %s.holder, remaining_ms = s.remaining.as_millis() as u64,
                        "the lease is still held; waiting for it to expire");
                    tokio::time::sleep(
                        s.remaining
                            .clamp(Duration::from_millis(5), Duration::from_millis(50)),
                    )
                    .await;
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "lease request failed");
                    lease = None;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn promote(
    held: &Held,
    gate: Arc<OutputGate>,
    dirty_logging: bool,
) -> Result<(Vm, Arc<OutputGate>, u64), String> {
    let mut h = held.lock().unwrap_or_else(|e| e.into_inner());
    if !h.promotable() {
        return Err(format!(
            "the image at epoch {} is not a consistent checkpoint (the full sync had not finished)",
            h.replica.epoch()
        ));
    }
    let (epoch, blob) = h.state.clone().expect("promotable implies a state");
    let state = VmState::decode(&blob, DEFAULT_STATE_LIMIT).map_err(|e| e.to_string())?;
    // The VM made ahead of time over the hot image (the usual case), or a new one.
    let vm = match h.prepared.take() {
        Some(p) if p.fits(&state) => p.restore(&state, Arc::clone(&gate), false),
        _ => {
            let fds = h.image.memory().clone_fds().map_err(|e| e.to_string())?;
            let memory =
                GuestMemory::from_fds(&state.regions, fds, false).map_err(|e| e.to_string())?;
            Vm::restore(memory, &state, Arc::clone(&gate), dirty_logging, false)
        }
    }
    .map_err(|e| e.to_string())?;
    Ok((vm, gate, epoch))
}

/// What a takeover starts from.
pub(crate) struct Takeover {
    /// The hot image and the last committed state.
    pub held: Held,
    /// Committed output the old primary never said it released, epoch by epoch.
    pub unreleased: Vec<crate::session::ConsoleRun>,
    /// `primary_failed` or `admin` (planned switchover), for the promotions metric.
    pub reason: &'static str,
    /// Planned switchover: the primary's connection, closed with code 4 once the VM runs here.
    pub confirm: Option<understudy_transport::Connection>,
}

/// Fails over: lease, promotion, then runs the VM (keeping the lease) until stopped. Returns
/// whether it promoted (false: no witness, or the lease was not ours to take).
pub(crate) async fn take_over(
    cfg: &BackupConfig,
    endpoint: &Endpoint,
    t: Takeover,
    stop: Arc<AtomicBool>,
) -> Result<bool, BackupError> {
    let Takeover {
        held,
        unreleased,
        reason,
        confirm,
    } = t;
    let decided = Instant::now();
    // Without a witness, only the source itself can hand the VM over (a move, or a planned
    // switchover): it has paused its guest for good and waits for our "running". Silence alone
    // never promotes, since nobody could fence the old primary.
    let lease = match (cfg.witness, &confirm) {
        (None, None) => {
            warn!("no --witness configured: this backup never promotes on its own");
            return Ok(false);
        }
        (None, Some(_)) => {
            info!(
                "no witness: taking over on the source's hand-over (its guest is stopped for good)"
            );
            None
        }
        (Some(_), _) => match win_lease(cfg, endpoint, &stop).await {
            Some(l) => Some(l),
            None => {
                error!("could not win the VM's lease; not promoting (another node may run the VM)");
                metrics::counter!("understudy_promotions_total", "reason" => "lease_refused")
                    .increment(1);
                return Ok(false);
            }
        },
    };
    let lease_wait = decided.elapsed();
    // Output of committed epochs the old primary never said it released comes first: the VM
    // resumes after those epochs and will not write it again. The primary may have released
    // some of it (and died before telling us): stdout then shows it twice, while the console
    // file gets the same bytes at the same offsets, so it holds them once.
    let gate = OutputGate::passthrough(Box::new(std::io::stdout()));
    if let Some(file) = &cfg.console_file {
        gate.attach_file(file.clone());
    }
    if !unreleased.is_empty() {
        let bytes: usize = unreleased.iter().map(|(_, b)| b.len()).sum();
        for (at, b) in &unreleased {
            let _ = gate.emit_at(*at, b);
        }
        info!(
            bytes,
            from_offset = ?unreleased[0].0,
            "emitted committed output the old primary had not reported released"
        );
    }
    let t = Instant::now();
    let held2 = Arc::clone(&held);
    let reprotect = cfg
        .protect_to
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let logging = reprotect.is_some();
    // On the VM start thread: the vCPU threads inherit its normal priority.
    let (vm, gate, epoch) = match cfg
        .vm_thread
        .run(move || promote(&held2, gate, logging))
        .await
    {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            error!(error = %e, "promotion failed");
            return Err(BackupError::Promote(e));
        }
        Err(e) => return Err(BackupError::Promote(e)),
    };
    let promotion = t.elapsed();
    if let Some(conn) = confirm {
        conn.close(4, "promoted: the VM runs on the backup");
    }
    metrics::counter!("understudy_promotions_total", "reason" => reason).increment(1);
    cfg.status.update(|s| {
        s.role = "promoted".into();
        s.last_epoch = epoch;
    });
    cfg.status.set_state("running", None);
    metrics::histogram!("understudy_promotion_seconds").record(promotion.as_secs_f64());
    info!(
        epoch,
        lease_wait_ms = format!("{:.1}", lease_wait.as_secs_f64() * 1e3),
        promotion_us = promotion.as_micros() as u64,
        "promoted: the VM runs here from the last committed epoch"
    );

    // Keep the lease while the VM runs: renewals name the successor the protection loop wants
    // (nobody until a new backup holds a consistent epoch), and the guest is stopped when our
    // view of the lease ends while no backup is heard from either.
    let fenced = Arc::new(AtomicBool::new(false));
    let succession = Succession::new(Successor::Nobody, true);
    succession.confirm(Successor::Nobody);
    // Never updated unless re-protecting: then a silent new backup counts like a primary's.
    let backup_heard = Arc::new(std::sync::Mutex::new(
        Instant::now()
            .checked_sub(cfg.failure_timeout)
            .unwrap_or_else(Instant::now),
    ));
    let keeper = match (lease, cfg.witness) {
        (Some((lease, state)), Some(witness)) => tokio::spawn(keep_lease(
            LeaseSource {
                endpoint: endpoint.clone(),
                witness,
                vm_id: cfg.vm_id.clone(),
                margin: Duration::from_millis(100),
            },
            lease,
            state,
            Keeper {
                ttl: cfg.lease_ttl,
                failure_timeout: cfg.failure_timeout,
                backup_heard: Arc::clone(&backup_heard),
                fenced: Arc::clone(&fenced),
                succession: Arc::clone(&succession),
            },
        )),
        _ => tokio::spawn(async {}),
    };
    // Re-protection: the promoted VM becomes a primary for a new backup.
    let mut running = match reprotect {
        None => Running::Here(vm),
        Some(pcfg) => {
            info!(backup = %pcfg.backup, "re-protecting the promoted VM with a new backup");
            let guard = Guard {
                stop: Arc::clone(&stop),
                fenced: Arc::clone(&fenced),
                backup_heard: Arc::clone(&backup_heard),
                succession: Arc::clone(&succession),
            };
            Running::Protected(tokio::spawn(async move {
                protect_running(vm, gate, &pcfg, guard).await
            }))
        }
    };

    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if fenced.load(Ordering::SeqCst) {
            if let Running::Here(vm) = &mut running {
                let _ = tokio::task::block_in_place(|| vm.pause());
                error!("fenced: the lease could not be renewed; the guest is paused");
            }
            break;
        }
        match &running {
            Running::Here(vm) => {
                if let Some(r) = vm.exit_reason() {
                    info!(reason = ?r, "the promoted guest stopped");
                    break;
                }
            }
            Running::Protected(task) => {
                if task.is_finished() {
                    break;
                }
            }
        }
    }
    keeper.abort();
    if let Running::Protected(task) = running {
        match task.await {
            Ok(Ok((_vm, summary))) => info!(
                sessions = summary.sessions,
                last_acked = summary.last_acked,
                "the promoted VM's protection ended"
            ),
            Ok(Err(e)) => error!(error = %e, "the promoted VM's protection ended"),
            Err(e) => error!(error = %e, "the promoted VM's protection task failed"),
        }
    }
    Ok(true)
}

/// The promoted VM: run here alone, or handed to a protection loop (re-protection).
enum Running {
    Here(Vm),
    Protected(tokio::task::JoinHandle<Result<(Vm, Summary), PrimaryError>>),
}
