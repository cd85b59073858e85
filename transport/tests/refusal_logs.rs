//! The server logs every refused handshake with `tracing::warn!`, naming the reason.
//!
//! A separate test binary: tracing caches per-callsite interest process-wide, so log capture is
//! only reliable when every test in the binary installs the capturing subscriber first.

mod common;

use common::{capture_logs, client, expired, pair, refused, server, Pki};
use understudy_transport::{Identity, TlsFiles};

#[tokio::test]
async fn foreign_ca_is_logged_as_such() {
    let (logs, _guard) = capture_logs();
    let pki = Pki::new();
    let other = Pki::new();
    let (server, addr) = server(&pki.identity("backup"));
    let mut files = TlsFiles::in_dir(other.dir(), "primary");
    files.ca_cert = pki.ca_cert();
    let client = client(&Identity::load(&files).unwrap());
    refused(&client, &server, addr, "backup").await;

    let warnings = logs.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("refused incoming connection"),
        "{warnings:?}"
    );
    assert!(
        warnings[0].contains("peer certificate not signed by our CA"),
        "{warnings:?}"
    );
    assert!(warnings[0].contains("node=backup"), "{warnings:?}");
}

#[tokio::test]
async fn expired_certificate_is_logged_as_such() {
    let (logs, _guard) = capture_logs();
    let pki = Pki::new();
    pki.issue("primary", expired());
    let (server, addr) = server(&pki.identity("backup"));
    let client = client(&pki.identity("primary"));
    refused(&client, &server, addr, "backup").await;

    let warnings = logs.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("peer certificate expired"),
        "{warnings:?}"
    );
}

#[tokio::test]
async fn admitted_connection_logs_no_warning() {
    let (logs, _guard) = capture_logs();
    let pki = Pki::new();
    let _pair = pair(&pki).await;
    assert!(logs.warnings().is_empty(), "{:?}", logs.warnings());
}
