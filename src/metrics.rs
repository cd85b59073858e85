//! The Prometheus exporter (`--metrics ADDR`) and the catalog of every metric Understudy emits.
//!
//! Naming: `understudy_` prefix, base units (seconds, bytes) in the name, `_total` on counters,
//! labels with a handful of fixed values only. `dashboards/` may only name metrics of
//! [`CATALOG`] (tests/dashboards.rs), and a protect + failover run must emit every one of them
//! (tests/observability.rs).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// What Prometheus type a metric has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Label names, each with its few allowed values.
pub type Labels = &'static [(&'static str, &'static [&'static str])];

/// One metric of the catalog.
#[derive(Clone, Copy, Debug)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    /// The HELP text; says the unit.
    pub help: &'static str,
    /// Labels and the values each may take (empty: one value per process, e.g. the version).
    /// Read by the tests, which check that nothing else is attached.
    #[allow(dead_code)]
    pub labels: Labels,
    /// Histogram bucket upper bounds, in the metric's base unit (empty for the other kinds).
    pub buckets: &'static [f64],
}

const fn counter(name: &'static str, labels: Labels, help: &'static str) -> MetricDef {
    MetricDef {
        name,
        kind: Kind::Counter,
        help,
        labels,
        buckets: &[],
    }
}

const fn gauge(name: &'static str, labels: Labels, help: &'static str) -> MetricDef {
    MetricDef {
        name,
        kind: Kind::Gauge,
        help,
        labels,
        buckets: &[],
    }
}

const fn histogram(name: &'static str, buckets: &'static [f64], help: &'static str) -> MetricDef {
    MetricDef {
        name,
        kind: Kind::Histogram,
        help,
        labels: &[],
        buckets,
    }
}

/// 100 us .. 100 ms: the capture pause.
const PAUSE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];
/// 1 .. 1e6 pages (4 GiB of 4 KiB pages).
const PAGE_BUCKETS: &[f64] = &[
    1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6,
];
/// 1 ms .. 10 s: capture to Ack (the RPO of each epoch), output held back.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// 100 us .. 1 s: applying one epoch to the hot image.
const APPLY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// 100 us .. 30 s: lease won to the restored VM running.
const PROMOTION_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

/// The `algorithm` label of the migration metrics: the algorithms of `understudy migrate`
/// (postcopy and hybrid to come), anything else as `other`.
const ALGORITHMS: &[&str] = &["precopy", "quick-eviction", "postcopy", "hybrid", "other"];

/// Every metric Understudy declares. Nothing else may be emitted or named by a dashboard.
pub const CATALOG: &[MetricDef] = &[
    // Counters.
    counter(
        "understudy_epochs_total",
        &[("outcome", &["acked", "applied", "refused"])],
        "Epochs by outcome (count): acked (primary: the backup acknowledged it); applied or \
         refused (backup).",
    ),
    counter(
        "understudy_pages_total",
        &[("kind", &["zero", "unchanged", "ref", "full", "delta"])],
        "Dirty pages encoded by the primary, by codec record kind (count): zero, unchanged, ref, \
         full, delta.",
    ),
    counter(
        "understudy_bytes_raw_total",
        &[],
        "Bytes of dirty guest pages before encoding (bytes).",
    ),
    counter(
        "understudy_bytes_encoded_total",
        &[],
        "Bytes of encoded epoch chunks after dedup and compression (bytes).",
    ),
    counter(
        "understudy_bytes_wire_total",
        &[],
        "Bytes written to the backup's QUIC streams, framing included (bytes).",
    ),
    counter(
        "understudy_promotions_total",
        &[("reason", &["primary_failed", "admin", "lease_refused"])],
        "Promotions attempted by this backup, by reason (count): primary_failed, admin, \
         lease_refused (the lease could not be won, so the backup did not promote).",
    ),
    counter(
        "understudy_fenced_total",
        &[],
        "Times this node stopped its VM because it lost the lease (count).",
    ),
    counter(
        "understudy_lease_handovers_total",
        &[],
        "Witness: leases granted to a node other than the last holder (count).",
    ),
    counter(
        "understudy_drills_total",
        &[],
        "Failover drills run (count).",
    ),
    counter(
        "understudy_drills_passed_total",
        &[],
        "Failover drills that passed (count).",
    ),
    counter(
        "understudy_resyncs_total",
        &[("kind", &["full", "delta"])],
        "Primary: sessions that began with a full sync or a delta resync (count).",
    ),
    counter(
        "understudy_digest_mismatches_total",
        &[],
        "Epochs whose image digest after apply differed from the primary's (count).",
    ),
    counter(
        "understudy_migrations_total",
        &[("algorithm", ALGORITHMS), ("outcome", &["ok", "failed"])],
        "Source: moves of this VM to another host (`understudy migrate`), by algorithm and \
         outcome (count): ok (the destination runs the VM), failed (the VM stayed here).",
    ),
    // Gauges.
    gauge(
        "understudy_epoch_interval_seconds",
        &[],
        "Primary: time between the last two epoch captures (seconds).",
    ),
    gauge(
        "understudy_replication_lag_seconds",
        &[],
        "Primary: capture to Ack of the last acknowledged epoch, the current RPO (seconds).",
    ),
    gauge(
        "understudy_last_committed_epoch",
        &[],
        "The last epoch acknowledged (primary) or applied (backup) (epoch number).",
    ),
    gauge(
        "understudy_role",
        &[("role", &["primary", "backup", "witness"])],
        "This node's role (1 for the current role): primary, backup or witness.",
    ),
    gauge(
        "understudy_peer_connected",
        &[],
        "Whether the peer (the primary's backup, the backup's primary) is connected (0 or 1).",
    ),
    gauge(
        "understudy_protected",
        &[],
        "Primary: whether a backup is committing our epochs (0 or 1).",
    ),
    gauge(
        "understudy_heartbeat_rtt_seconds",
        &[],
        "Round-trip time of the last heartbeat (seconds).",
    ),
    gauge(
        "understudy_heartbeat_age_seconds",
        &[],
        "Time since the peer was last heard from (seconds).",
    ),
    gauge(
        "understudy_output_held_bytes",
        &[],
        "Primary: guest console output held back until its epoch is acknowledged (bytes).",
    ),
    gauge(
        "understudy_guest_progress",
        &[],
        "The guest's own progress counter (ledger ticks; count).",
    ),
    gauge(
        "understudy_drill_last_success_timestamp_seconds",
        &[],
        "Unix time of the last failover drill that passed (seconds since the epoch).",
    ),
    gauge(
        "understudy_migration_downtime_seconds",
        &[("algorithm", ALGORITHMS)],
        "Source: downtime of the last successful move, the guest paused here to the \
         destination's \"running\" arriving (an upper bound) (seconds).",
    ),
    gauge(
        "understudy_migration_eviction_seconds",
        &[("algorithm", ALGORITHMS)],
        "Source: eviction time of the last successful move, the move (quick eviction: the \
         evict) asked for to no VM state left here (seconds).",
    ),
    gauge(
        "understudy_migration_wire_bytes",
        &[("algorithm", ALGORITHMS)],
        "Source: bytes the last successful move put on the wire, chunks and control (bytes).",
    ),
    gauge(
        "understudy_migration_throughput_ratio",
        &[("algorithm", ALGORITHMS)],
        "Source: the guest's work rate during the last successful move divided by its rate \
         just before it (ratio; 1 = no slowdown).",
    ),
    gauge(
        "understudy_migration_vm_at_risk",
        &[("algorithm", ALGORITHMS)],
        "Source: whether one host failing during the last successful move would have lost \
         the VM (0 or 1).",
    ),
    gauge(
        "understudy_delta_cache_bytes",
        &[],
        "Primary: memory held by the delta base cache of the current session, the content \
         last sent of pages that may go again as deltas (bytes; 0 when off).",
    ),
    gauge(
        "understudy_snapshot_interval_seconds",
        &[],
        "Source, quick eviction: the current interval between background snapshots shipped \
         to the destination before the eviction (seconds).",
    ),
    gauge(
        "understudy_build_info",
        &[("version", &[])],
        "Always 1; the version label is the understudy release.",
    ),
    // Histograms.
    histogram(
        "understudy_pause_seconds",
        PAUSE_BUCKETS,
        "Primary: how long the guest's vCPUs stood still for an epoch capture (seconds).",
    ),
    histogram(
        "understudy_dirty_pages",
        PAGE_BUCKETS,
        "Primary: pages dirtied per epoch (pages).",
    ),
    histogram(
        "understudy_commit_latency_seconds",
        LATENCY_BUCKETS,
        "Primary: epoch capture to the backup's Ack (seconds).",
    ),
    histogram(
        "understudy_apply_seconds",
        APPLY_BUCKETS,
        "Backup: applying one committed epoch to the hot image (seconds).",
    ),
    histogram(
        "understudy_promotion_seconds",
        PROMOTION_BUCKETS,
        "Backup: lease won to the promoted VM running (seconds).",
    ),
    histogram(
        "understudy_output_hold_seconds",
        LATENCY_BUCKETS,
        "Primary: how long console output was held back before release (seconds).",
    ),
];

/// The exporter as Understudy configures it: real Prometheus histograms (buckets from the
/// catalog), not summaries.
fn builder() -> Result<PrometheusBuilder> {
    let mut builder = PrometheusBuilder::new();
    for def in CATALOG.iter().filter(|d| d.kind == Kind::Histogram) {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(def.name.to_string()), def.buckets)
            .with_context(|| format!("buckets of {}", def.name))?;
    }
    Ok(builder)
}

/// Serves `/metrics` on `addr` when given; metric macros are no-ops otherwise.
pub fn install(addr: Option<SocketAddr>) -> Result<()> {
    let Some(addr) = addr else {
        return Ok(());
    };
    builder()?
        .with_http_listener(addr)
        .install()
        .with_context(|| format!("serving metrics on {addr}"))?;
    describe();
    metrics::gauge!("understudy_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    tracing::info!(%addr, "metrics endpoint up");
    Ok(())
}

/// Parses `--metrics`: `HOST:PORT`, or a bare `PORT` on 127.0.0.1 (metrics stay on loopback
/// unless an address is named explicitly).
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!("{s:?}: use a port (on 127.0.0.1) or HOST:PORT, e.g. 9100 or 0.0.0.0:9100")
    })
}

/// Makes the counters `names` appear at 0 (for every allowed value of their labels) before
/// their first event, so that rates, increases and alerts see a series from the start rather
/// than none (a promotion or a fence may never happen in a process's life). Histograms named
/// here are registered too: they are served with empty buckets (count 0) until the first
/// sample.
pub fn zero_counters(names: &[&'static str]) {
    for def in CATALOG.iter().filter(|d| names.contains(&d.name)) {
        match (def.kind, def.labels) {
            (Kind::Counter, labels) => {
                // Every combination of the allowed values (a label without listed values,
                // like `version`, cannot be zeroed).
                let mut sets: Vec<Vec<metrics::Label>> = vec![Vec::new()];
                for (label, values) in labels.iter() {
                    sets = sets
                        .iter()
                        .flat_map(|set| {
                            values.iter().map(move |v| {
                                let mut set = set.clone();
                                set.push(metrics::Label::new(*label, *v));
                                set
                            })
                        })
                        .collect();
                }
                for set in sets {
                    metrics::counter!(def.name, set).increment(0);
                }
            }
            (Kind::Histogram, []) => {
                // Registering is enough: the exporter renders a registered histogram.
                let _ = metrics::histogram!(def.name);
            }
            _ => {}
        }
    }
}

/// HELP and TYPE lines for every metric of the catalog.
fn describe() {
    for def in CATALOG {
        match def.kind {
            Kind::Counter => metrics::describe_counter!(def.name, def.help),
            Kind::Gauge => metrics::describe_gauge!(def.name, def.help),
            Kind::Histogram => metrics::describe_histogram!(def.name, def.help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_names_follow_prometheus_conventions() {
        let mut seen = std::collections::HashSet::new();
        for d in CATALOG {
            let n = d.name;
            assert!(seen.insert(n), "{n} is in the catalog twice");
            assert!(n.starts_with("understudy_"), "{n}: no understudy_ prefix");
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{n}: not snake_case"
            );
            assert!(!d.help.is_empty(), "{n}: no help text");
            assert_eq!(
                d.kind == Kind::Counter,
                n.ends_with("_total"),
                "{n}: counters and only counters end in _total"
            );
            for bad in [
                "_milliseconds",
                "_microseconds",
                "_nanoseconds",
                "_ms",
                "_us",
                "_ns",
                "_minutes",
                "_hours",
                "_kilobytes",
                "_megabytes",
                "_kib",
                "_mib",
                "_kb",
                "_mb",
                "_percent",
            ] {
                assert!(
                    !n.contains(&format!("{bad}_")) && !n.ends_with(bad),
                    "{n}: {bad} is not a base unit"
                );
            }
            // Time is in seconds and sizes in bytes, said in the name.
            if d.help.contains("(seconds") {
                let base = n.strip_suffix("_total").unwrap_or(n);
                assert!(base.ends_with("_seconds"), "{n}: time without _seconds");
            }
            if d.help.contains("(bytes)") {
                assert!(
                    n.split('_').any(|w| w == "bytes"),
                    "{n}: a size without bytes in its name"
                );
            }
            for (l, values) in d.labels {
                assert!(
                    ["outcome", "kind", "reason", "role", "version", "algorithm"].contains(l),
                    "{n}: label {l} is not one of the low-cardinality labels"
                );
                assert!(values.len() <= 8, "{n}: label {l} has too many values");
                assert!(
                    !values.is_empty() || *l == "version",
                    "{n}: label {l} must list its values"
                );
            }
            if d.kind == Kind::Histogram {
                assert!(!d.buckets.is_empty(), "{n}: a histogram without buckets");
                assert!(
                    d.buckets.windows(2).all(|w| w[0] < w[1]) && d.buckets[0] > 0.0,
                    "{n}: buckets must be positive and increasing"
                );
            } else {
                assert!(d.buckets.is_empty(), "{n}: buckets on a non-histogram");
            }
        }
    }

    /// What the endpoint serves, through the same exporter configuration as `install`.
    fn render(emit: impl FnOnce()) -> String {
        let recorder = builder().unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            emit();
        });
        handle.render()
    }

    #[test]
    fn histograms_are_served_with_buckets_and_help() {
        let text = render(|| {
            metrics::histogram!("understudy_pause_seconds").record(0.0003);
            metrics::counter!("understudy_fenced_total").increment(1);
        });
        assert!(
            text.contains("# TYPE understudy_pause_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("understudy_pause_seconds_bucket{le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(text.contains("understudy_pause_seconds_bucket{le=\"+Inf\"} 1"));
        assert!(
            !text.contains("quantile="),
            "a summary, not a histogram: {text}"
        );
        assert!(text.contains("# HELP understudy_fenced_total "), "{text}");
        assert!(
            text.contains("# TYPE understudy_fenced_total counter"),
            "{text}"
        );
    }

    #[test]
    fn zeroed_counters_and_registered_histograms_are_served_before_any_event() {
        let text = render(|| {
            zero_counters(&[
                "understudy_promotions_total",
                "understudy_fenced_total",
                "understudy_promotion_seconds",
            ])
        });
        for reason in ["primary_failed", "admin", "lease_refused"] {
            assert!(
                text.contains(&format!(
                    "understudy_promotions_total{{reason=\"{reason}\"}} 0"
                )),
                "{text}"
            );
        }
        assert!(text.contains("understudy_fenced_total 0"), "{text}");
        assert!(
            !text.contains("understudy_migrations_total"),
            "not asked for: {text}"
        );
        assert!(
            text.contains("understudy_promotion_seconds_bucket{le=\"+Inf\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("understudy_promotion_seconds_count 0"),
            "{text}"
        );
    }

    #[test]
    fn counters_with_two_labels_are_zeroed_for_every_combination() {
        let text = render(|| zero_counters(&["understudy_migrations_total"]));
        for algorithm in ALGORITHMS {
            for outcome in ["ok", "failed"] {
                let line = format!(
                    "understudy_migrations_total{{algorithm=\"{algorithm}\",outcome=\"{outcome}\"}} 0"
                );
                assert!(text.contains(&line), "no {line}: {text}");
            }
        }
        let samples = text
            .lines()
            .filter(|l| l.starts_with("understudy_migrations_total{"))
            .count();
        assert_eq!(samples, ALGORITHMS.len() * 2, "{text}");
    }

    #[test]
    fn histogram_buckets_span_their_ranges() {
        let get = |n: &str| CATALOG.iter().find(|d| d.name == n).unwrap().buckets;
        let pause = get("understudy_pause_seconds");
        assert_eq!((pause[0], *pause.last().unwrap()), (0.0001, 0.1));
        let pages = get("understudy_dirty_pages");
        assert_eq!((pages[0], *pages.last().unwrap()), (1.0, 1e6));
    }
}
