//! Moving a running VM to another host: the algorithms, their policies and their report.
//!
//! Every algorithm reuses the protection pipeline (capture thread -> encoder -> QUIC -> the
//! destination's verified, all-or-nothing epochs) and ends like a planned switchover: the
//! guest pauses on the source, the final epoch carries the VM state, the destination commits
//! it and is told to take over (`Promote`), and the source's VM is dropped once the
//! destination runs it. What differs is what happens *before* the pause:
//!
//! - **precopy**: the live full sync is round 0; each later round ships, while the guest runs,
//!   the pages it dirtied during the previous round. [`PrecopyPolicy::decide`] ends the rounds.
//! - **quick-eviction** (Fernando et al., UCC 2016): after the full sync, live snapshots of the
//!   dirty pages go out in the background at the interval of [`QuickEviction::interval`], for
//!   as long as the VM stays, so that an eviction (`understudy evict`) only ships the last dirt.
//!
//! Neither pauses the guest before the final epoch, and the source keeps a complete VM until
//! the destination confirms it runs its copy: one host failing during the move loses nothing.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a VM is moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Iterative live rounds, then a short stop-and-copy.
    Precopy,
    /// Background live snapshots at an adaptive interval; the eviction ships the last dirt.
    QuickEviction,
    /// Switch first: the destination runs the VM at once and pulls pages on demand while the
    /// source pushes the rest. The VM is lost if either host fails before the last page.
    Postcopy,
    /// One live pass of every page, then postcopy for the pages dirtied since.
    Hybrid,
}

impl Algorithm {
    /// Every algorithm, in the order the help lists them.
    pub const ALL: [Algorithm; 4] = [
        Algorithm::Precopy,
        Algorithm::QuickEviction,
        Algorithm::Postcopy,
        Algorithm::Hybrid,
    ];

    /// Whether the VM runs on the destination before all its memory is there (postcopy,
    /// hybrid): then one host failing during the move loses it.
    pub fn is_postcopy(self) -> bool {
        matches!(self, Algorithm::Postcopy | Algorithm::Hybrid)
    }

    /// The name used on the command line, in logs and in metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Precopy => "precopy",
            Algorithm::QuickEviction => "quick-eviction",
            Algorithm::Postcopy => "postcopy",
            Algorithm::Hybrid => "hybrid",
        }
    }
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Algorithm::ALL.iter().map(|a| a.name()).collect();
                format!("unknown algorithm {s:?}: use one of {}", names.join(", "))
            })
    }
}

/// What precopy does when its rounds do not converge (the guest dirties pages faster than the
/// link ships them, so the final set never fits the downtime budget).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoConvergence {
    /// Stop the guest and ship whatever is dirty anyway: the move completes with a downtime
    /// above the budget (reported).
    StopAndCopy,
    /// Give up: the VM keeps running on the source, the destination discards its image, and
    /// the report says why.
    Abort,
}

impl std::str::FromStr for NoConvergence {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stop-and-copy" => Ok(NoConvergence::StopAndCopy),
            "abort" => Ok(NoConvergence::Abort),
            _ => Err(format!(
                "unknown strategy {s:?}: use stop-and-copy or abort"
            )),
        }
    }
}

/// Precopy's convergence policy.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrecopyPolicy {
    /// The downtime the final stop-and-copy may take.
    pub downtime_budget: Duration,
    /// Live rounds after the full sync, at most.
    pub max_rounds: u32,
    /// Time from the start of the full sync after which the rounds end.
    pub timeout: Duration,
    /// What happens when the rounds end without converging.
    pub on_no_convergence: NoConvergence,
}

impl Default for PrecopyPolicy {
    fn default() -> Self {
        PrecopyPolicy {
            downtime_budget: Duration::from_millis(50),
            max_rounds: 30,
            timeout: Duration::from_secs(60),
            on_no_convergence: NoConvergence::StopAndCopy,
        }
    }
}

/// What precopy does after a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Ship another live round.
    Continue,
    /// Converged: pause and ship the final dirty set.
    StopAndCopy,
    /// Not converged within the limits: apply [`PrecopyPolicy::on_no_convergence`].
    GiveUp,
}

/// Epochs of fewer pages than this are not used to rate the link (their time is the fixed
/// cost of an epoch, not the link's rate); a final set this small ships within any downtime
/// budget on a link a VM can be moved over (256 KiB).
pub const RATED_MIN_PAGES: u64 = 64;

impl PrecopyPolicy {
    /// After `rounds` live rounds and `elapsed` since the full sync began, with `dirty` pages
    /// dirtied since the last round was read and a link that ships `pages_per_s` (0 = not
    /// measured yet): stop and copy when the final set would go out within the downtime
    /// budget, or is too small to rate the link by; give up when the round limit or the
    /// timeout is reached first.
    pub fn decide(&self, rounds: u32, elapsed: Duration, dirty: u64, pages_per_s: f64) -> Decision {
        if dirty < RATED_MIN_PAGES
            || (pages_per_s > 0.0 && dirty as f64 / pages_per_s <= budget_s(self))
        {
            Decision::StopAndCopy
        } else if rounds >= self.max_rounds || elapsed >= self.timeout {
            Decision::GiveUp
        } else {
            Decision::Continue
        }
    }
}

fn budget_s(p: &PrecopyPolicy) -> f64 {
    p.downtime_budget.as_secs_f64()
}

/// Quick eviction's snapshot interval rule.
///
/// An eviction asked for at a random moment finds at most `n1 = dirty_rate * (interval +
/// read)` pages dirtied since the last snapshot was read, where `read` is how long a snapshot
/// takes to read. It ships them in a last live snapshot, the *tail* (the guest runs on), waits
/// for its Ack, then pauses the guest and ships what the guest dirtied meanwhile, `n2 =
/// dirty_rate * (fixed + n1 / link_rate + read)` pages, with the state. The guest's downtime is
/// then the time to ship `n2` pages, not `n1`. Each of the two epochs takes `n / link_rate`
/// plus a fixed cost (reading, one round trip, the destination's commit; for the final one
/// also the state and the restore), so the eviction takes
///
/// ```text
/// eviction = 2 * fixed + n1 / link_rate + n2 / link_rate
/// ```
///
/// and, with `x = n1 / link_rate` and `q = dirty_rate / link_rate`, the longest interval that
/// keeps it under the target is
///
/// ```text
/// x        = (target - 2 * fixed - q * (fixed + read)) / (1 + q)
/// interval = x * link_rate / dirty_rate - read
/// ```
///
/// clamped to `[min_interval, max_interval]`: longer intervals ship fewer pages in the
/// background (a page rewritten twice within one interval goes once), so the rule picks the
/// cheapest interval that meets the target. At `min_interval` the target may be out of reach
/// (the guest dirties faster than the link ships): [`QuickEviction::reachable`] says so.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuickEviction {
    /// The eviction time to stay under (`--eviction-target`).
    pub target: Duration,
    /// Shortest interval between snapshots (bounds the background cost at high dirty rates).
    pub min_interval: Duration,
    /// Longest interval (an idle guest still gets a fresh snapshot this often).
    pub max_interval: Duration,
}

impl Default for QuickEviction {
    fn default() -> Self {
        QuickEviction {
            target: Duration::from_millis(50),
            min_interval: Duration::from_millis(10),
            max_interval: Duration::from_secs(2),
        }
    }
}

/// What quick eviction knows about the guest and the link, measured as it runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observed {
    /// Distinct pages dirtied per second (from the last snapshots).
    pub dirty_rate: f64,
    /// Pages per second the link and the destination absorb (from the last snapshots' acks).
    pub link_rate: f64,
    /// The eviction's fixed cost: pause, state, a round trip, the destination's restore.
    pub fixed: Duration,
    /// How long reading a snapshot takes.
    pub read: Duration,
}

impl QuickEviction {
    /// The next snapshot interval.
    pub fn interval(&self, o: &Observed) -> Duration {
        let fixed = o.fixed.as_secs_f64();
        let secs = if o.dirty_rate <= 0.0 {
            f64::INFINITY
        } else if o.link_rate <= 0.0 {
            0.0
        } else {
            let q = o.dirty_rate / o.link_rate;
            let spare =
                self.target.as_secs_f64() - 2.0 * fixed - q * (fixed + o.read.as_secs_f64());
            if spare <= 0.0 {
                0.0
            } else {
                spare / (1.0 + q) / q - o.read.as_secs_f64()
            }
        };
        let lo = self.min_interval.as_secs_f64();
        let hi = self.max_interval.as_secs_f64();
        Duration::from_secs_f64(secs.clamp(lo, hi))
    }

    /// The worst-case eviction time if snapshots are `interval` apart: the tail snapshot of
    /// the pages dirtied since the last one, then the paused final epoch of those dirtied
    /// while the tail went out.
    pub fn expected_eviction(&self, o: &Observed, interval: Duration) -> Duration {
        if o.link_rate <= 0.0 {
            return Duration::from_secs_f64(1e9);
        }
        let fixed = o.fixed.as_secs_f64();
        let tail = o.dirty_rate * (interval + o.read).as_secs_f64() / o.link_rate;
        let last = o.dirty_rate * (fixed + tail + o.read.as_secs_f64()) / o.link_rate;
        Duration::from_secs_f64((2.0 * fixed + tail + last).min(1e9))
    }

    /// Whether the target can be met at all (at the shortest interval).
    pub fn reachable(&self, o: &Observed) -> bool {
        self.expected_eviction(o, self.min_interval) <= self.target
    }

    /// The interval while the link is not rated yet (only snapshots of at least
    /// [`RATED_MIN_PAGES`] rate it): long enough for a snapshot to carry about that many pages
    /// at `dirty_rate` pages/s, so that the link gets rated, within the interval bounds. An idle
    /// guest gets `max_interval`; a set that small ships within any target.
    pub fn unrated_interval(&self, dirty_rate: f64) -> Duration {
        let secs = if dirty_rate <= 0.0 {
            f64::INFINITY
        } else {
            RATED_MIN_PAGES as f64 / dirty_rate
        };
        Duration::from_secs_f64(secs.clamp(
            self.min_interval.as_secs_f64(),
            self.max_interval.as_secs_f64(),
        ))
    }
}

/// A smoothed rate: each new sample weighs `alpha`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ewma {
    value: Option<f64>,
}

impl Ewma {
    /// Adds a sample; returns the smoothed value.
    pub fn add(&mut self, sample: f64, alpha: f64) -> f64 {
        let v = match self.value {
            None => sample,
            Some(v) => v + alpha * (sample - v),
        };
        self.value = Some(v);
        v
    }

    /// The smoothed value, if any sample came in.
    pub fn get(&self) -> Option<f64> {
        self.value
    }
}

/// A move under way, as the capture thread sees it.
pub(crate) struct Plan {
    pub algorithm: Algorithm,
    pub precopy: PrecopyPolicy,
    pub quick: QuickEviction,
    /// Quick eviction: the eviction was asked for.
    pub evict: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// What the capture thread measured, for the report.
    pub record: std::sync::Arc<std::sync::Mutex<MoveRecord>>,
    /// The delta base cache's bound asked for by the move's request, in bytes.
    pub delta_cache: Option<u64>,
}

/// What the capture thread measured during a move.
#[derive(Clone, Debug, Default)]
pub(crate) struct MoveRecord {
    /// Live rounds (or snapshots) after the full sync.
    pub rounds: u64,
    /// Pages of the final, paused epoch.
    pub final_pages: u64,
    /// Quick eviction: pages of the tail, the live snapshot the eviction ships before pausing.
    pub tail_pages: Option<u64>,
    /// When the final pause began.
    pub paused_at: Option<std::time::Instant>,
    /// The guest's progress counter when the move started and at the final pause.
    pub progress_start: Option<(std::time::Instant, u64)>,
    pub progress_end: Option<(std::time::Instant, u64)>,
    /// The guest's work rate (progress counter per second) just before the move.
    pub rate_before: Option<f64>,
    /// Precopy gave up and aborted: why.
    pub aborted: Option<String>,
    /// Precopy stopped without converging (stop-and-copy strategy).
    pub forced: bool,
    /// Pages the move sent as `Delta` records.
    pub delta_pages: u64,
}

/// The five properties of one move (Svärd et al.), as the source measured them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The algorithm.
    pub algorithm: String,
    /// Whether the destination runs the VM now.
    pub ok: bool,
    /// What happened, in words.
    pub message: String,
    /// Guest paused on the source to the destination's "running" reaching the source (an
    /// upper bound of the downtime), in milliseconds.
    pub downtime_ms: Option<f64>,
    /// The move was asked for to the source's VM being gone, in milliseconds.
    pub eviction_ms: Option<f64>,
    /// Bytes the source put on the wire for this move (chunks and control).
    pub wire_bytes: u64,
    /// Live rounds (precopy) or background snapshots (quick eviction) after the full sync.
    pub rounds: u64,
    /// Pages in the final, paused epoch.
    pub final_pages: u64,
    /// Quick eviction: pages of the tail, the live snapshot of the pages dirtied since the
    /// last background snapshot, shipped after the eviction was asked for and before the pause.
    #[serde(default)]
    pub tail_pages: Option<u64>,
    /// Pages sent again as a `Delta` against the content the destination already held (see
    /// `--delta-cache`) rather than whole.
    #[serde(default)]
    pub delta_pages: u64,
    /// The guest's own work rate during the move divided by its rate just before it (1.0 = no
    /// slowdown), read from the guest's progress counter.
    pub throughput_ratio: Option<f64>,
    /// Whether one host failing during the move would lose the VM.
    pub vm_lost_if_a_host_fails: bool,
}

/// Builds the report of a move from what the capture thread and the session measured.
pub(crate) fn report(
    algorithm: Algorithm,
    record: &MoveRecord,
    ok: bool,
    message: String,
    downtime_ms: Option<f64>,
    eviction_ms: Option<f64>,
    wire_bytes: u64,
) -> MigrationReport {
    let during = match (record.progress_start, record.progress_end) {
        // Postcopy pauses at once: no window to measure here (the guest runs on the
        // destination during the move).
        (Some((t0, p0)), Some((t1, p1))) if t1 - t0 > std::time::Duration::from_millis(200) => {
            Some(p1.saturating_sub(p0) as f64 / (t1 - t0).as_secs_f64())
        }
        _ => None,
    };
    let throughput_ratio = match (during, record.rate_before) {
        (Some(d), Some(b)) if b > 0.0 => Some(d / b),
        _ => None,
    };
    let mut message = message;
    if record.forced {
        message.push_str(" (precopy did not converge: stopped and copied anyway)");
    }
    MigrationReport {
        algorithm: algorithm.name().into(),
        ok,
        message,
        downtime_ms,
        eviction_ms,
        wire_bytes,
        rounds: record.rounds,
        final_pages: record.final_pages,
        tail_pages: record.tail_pages,
        delta_pages: record.delta_pages,
        throughput_ratio,
        // Precopy and quick eviction: the source keeps its complete VM until the destination
        // confirms it runs the final epoch, so a destination failure loses nothing. Postcopy
        // and hybrid: between the switch and the last page neither host has the whole VM.
        vm_lost_if_a_host_fails: algorithm.is_postcopy(),
    }
}

/// Publishes a move's report as metrics (labelled by algorithm: four values at most).
pub(crate) fn record_metrics(r: &MigrationReport) {
    let a = algorithm_label(&r.algorithm);
    let outcome = if r.ok { "ok" } else { "failed" };
    metrics::counter!("understudy_migrations_total", "algorithm" => a, "outcome" => outcome)
        .increment(1);
    if !r.ok {
        return;
    }
    if let Some(ms) = r.downtime_ms {
        metrics::gauge!("understudy_migration_downtime_seconds", "algorithm" => a).set(ms / 1e3);
    }
    if let Some(ms) = r.eviction_ms {
        metrics::gauge!("understudy_migration_eviction_seconds", "algorithm" => a).set(ms / 1e3);
    }
    metrics::gauge!("understudy_migration_wire_bytes", "algorithm" => a).set(r.wire_bytes as f64);
    if let Some(t) = r.throughput_ratio {
        metrics::gauge!("understudy_migration_throughput_ratio", "algorithm" => a).set(t);
    }
    metrics::gauge!("understudy_migration_vm_at_risk", "algorithm" => a)
        .set(if r.vm_lost_if_a_host_fails { 1.0 } else { 0.0 });
}

/// The metrics label for an algorithm name (a fixed set of values).
fn algorithm_label(name: &str) -> &'static str {
    Algorithm::ALL
        .into_iter()
        .map(Algorithm::name)
        .find(|n| *n == name)
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn precopy_stops_when_the_final_set_fits_the_budget() {
        let p = PrecopyPolicy::default(); // 50 ms budget
                                          // 100k pages/s link: 5,000 pages take 50 ms (fits), 5,001 do not.
        assert_eq!(p.decide(1, MS, 5_000, 100_000.0), Decision::StopAndCopy);
        assert_eq!(p.decide(1, MS, 5_001, 100_000.0), Decision::Continue);
        assert_eq!(p.decide(1, MS, 0, 0.0), Decision::StopAndCopy);
        // An idle guest's rounds are too small to rate the link by: no endless rounds of 1 page.
        assert_eq!(p.decide(1, MS, 1, 0.0), Decision::StopAndCopy);
        assert_eq!(p.decide(1, MS, RATED_MIN_PAGES, 0.0), Decision::Continue);
    }

    #[test]
    fn precopy_gives_up_at_the_round_limit_or_the_timeout_never_loops() {
        let p = PrecopyPolicy {
            max_rounds: 5,
            timeout: Duration::from_secs(3),
            ..PrecopyPolicy::default()
        };
        // A guest that dirties 1M pages per round on a 10k pages/s link never converges.
        let mut rounds = 0;
        while p.decide(rounds, rounds * Duration::from_millis(100), 1_000_000, 1e4)
            == Decision::Continue
        {
            rounds += 1;
        }
        assert_eq!(rounds, 5);
        assert_eq!(
            p.decide(1, Duration::from_secs(3), 1_000_000, 1e4),
            Decision::GiveUp
        );
    }

    fn observed(dirty_rate: f64, link_rate: f64) -> Observed {
        Observed {
            dirty_rate,
            link_rate,
            fixed: 5 * MS,
            read: MS,
        }
    }

    #[test]
    fn quick_eviction_picks_the_longest_interval_that_meets_the_target() {
        // 50 ms target, 10 ms .. 2 s; 10k pages/s dirtied, 100k pages/s link, 5 ms fixed.
        let q = QuickEviction::default();
        let o = observed(10_000.0, 100_000.0);
        let i = q.interval(&o);
        // q = 0.1: (50 - 10 - 0.1 * 6) / 1.1 = 35.82 ms of shipping for the tail, which the
        // guest dirties in 358.2 ms, less the 1 ms read.
        assert!(
            (i.as_secs_f64() - (0.0394 / 1.1 * 10.0 - 0.001)).abs() < 1e-9,
            "{i:?}"
        );
        // Worst-case eviction at that interval is the target; longer would miss it.
        let e = q.expected_eviction(&o, i);
        assert!((e.as_secs_f64() - 0.050).abs() < 1e-9, "{e:?}");
        assert!(q.expected_eviction(&o, i + 10 * MS) > q.target);
        assert!(q.reachable(&o));
        // Twice the dirty rate, about half the interval; an idle guest gets the maximum.
        assert!(q.interval(&observed(20_000.0, 100_000.0)) < i / 2 + MS);
        assert_eq!(q.interval(&observed(0.0, 100_000.0)), q.max_interval);
    }

    #[test]
    fn quick_eviction_before_the_link_is_rated_waits_for_a_ratable_snapshot() {
        let q = QuickEviction::default(); // 10 ms .. 2 s
        assert_eq!(q.unrated_interval(0.0), q.max_interval);
        assert_eq!(q.unrated_interval(1_000.0), Duration::from_millis(64));
        assert_eq!(q.unrated_interval(30_000.0), q.min_interval);
    }

    #[test]
    fn quick_eviction_says_when_the_target_is_out_of_reach() {
        let q = QuickEviction::default();
        // The guest dirties faster than the link ships: the shortest interval, and a warning.
        let o = observed(1_000_000.0, 100_000.0);
        assert_eq!(q.interval(&o), q.min_interval);
        assert!(!q.reachable(&o));
        // A fixed cost above the target leaves no room at all.
        let slow = Observed {
            fixed: 60 * MS,
            ..observed(1_000.0, 100_000.0)
        };
        assert_eq!(q.interval(&slow), q.min_interval);
        assert!(!q.reachable(&slow));
    }

    #[test]
    fn ewma_starts_at_the_first_sample_and_follows() {
        let mut e = Ewma::default();
        assert_eq!(e.get(), None);
        assert_eq!(e.add(100.0, 0.5), 100.0);
        assert_eq!(e.add(200.0, 0.5), 150.0);
    }
}
