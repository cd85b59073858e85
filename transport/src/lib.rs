//! Understudy's network transport: QUIC (quinn) between mutually authenticated nodes, and
//! length-delimited frames of opaque bytes.
//!
//! - [`certs`]: the private CA and node certificates (`understudy certs init|issue`), and
//!   loading them with errors that say which file is missing and how to create it.
//! - [`tls`]: rustls configurations (client certificate required, ALPN `understudy/1`, the `ring`
//!   provider passed explicitly) and the quinn transport tuning for bulk transfer.
//! - [`endpoint`]: [`Endpoint`] (`server`, `client`, `connect`, `accept`) and [`Connection`],
//!   which knows the peer's node name; handshake failures are classified as
//!   [`HandshakeFailure`] on both sides.
//! - [`stream`]: `u32`-length-prefixed frames on QUIC streams with a reader-side size limit,
//!   and [`ControlChannel`] for request/response style control traffic.
//!
//! The transport knows nothing of the messages it carries: the `protocol` crate encodes them to
//! bytes, and this crate moves the bytes.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::path::Path;
//! use understudy_transport::{Endpoint, Identity, TlsFiles, TransportOptions};
//!
//! let dir = Path::new("/etc/understudy/certs");
//! let backup = Identity::load(&TlsFiles::in_dir(dir, "backup"))?;
//! let endpoint = Endpoint::server("0.0.0.0:4433".parse()?, &backup, &TransportOptions::default())?;
//! while let Some(incoming) = endpoint.accept().await {
//!     let Ok(conn) = incoming else { continue }; // refused handshakes are logged already
//!     if conn.peer_name() != "primary" {
//!         conn.close(1, "only the primary replicates to a backup");
//!         continue;
//!     }
//!     let mut control = conn.accept_control(64 * 1024).await?;
//!     while let Some(frame) = control.recv().await? {
//!         control.send(&frame).await?;
//!     }
//! }
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod certs;
pub mod endpoint;
pub mod lease;
pub mod messages;
pub mod stream;
pub mod tls;

pub use certs::{Identity, TlsFiles, Validity};
pub use endpoint::{
    AcceptError, BindError, ConnectError, Connection, Endpoint, HandshakeFailure, Incoming,
    RejectedBy,
};
pub use stream::{
    AcceptStreamError, ControlChannel, FrameReader, FrameSender, OpenStreamError, RecvFrameError,
    SendFrameError,
};
pub use tls::{TransportOptions, ALPN};

/// Re-exported so callers can name `Bytes` frames without their own dependency.
pub use bytes::Bytes;
/// Re-exported: some errors carry quinn types (e.g. [`quinn::ConnectionError`]).
pub use quinn;
/// Re-exported for callers that build a non-standard TLS setup with [`tls`].
pub use rustls;

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
