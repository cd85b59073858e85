//! Test and audit journal: one JSON line per console release.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Appends `{"epoch":E,"bytes":N,"unix_ns":T}` lines.
pub struct Journal(Option<std::fs::File>);

impl Journal {
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        Ok(Journal(match path {
            Some(p) => Some(std::fs::File::create(p)?),
            None => None,
        }))
    }

    /// The time to record for a release: take it *before* the bytes go to the sink, so that
    /// the journal never shows a release later than it happened.
    pub fn now() -> u128 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    }

    pub fn record(&mut self, epoch: u64, bytes: usize, unix_ns: u128) {
        if let Some(f) = &mut self.0 {
            let _ = writeln!(
                f,
                r#"{{"epoch":{epoch},"bytes":{bytes},"unix_ns":{unix_ns}}}"#
            );
        }
    }
}
