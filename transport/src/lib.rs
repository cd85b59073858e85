//! Understudy's network transport: QUIC (quinn) between mutually authenticated nodes, and
//! length-delimited frames of opaque bytes.
//!
//! - [`certs`]: the private CA and node certificates (`understudy certs init|issue`), and
//!   loading them with errors that say which file is missing and how to create it.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod certs;

pub use certs::{Identity, TlsFiles, Validity};

/// Displays an error followed by its `source()` chain, for log lines.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}
