//! Fixtures shared by the transport tests: a throw-away PKI, endpoints on 127.0.0.1, and a
//! tracing subscriber that captures warnings.

#![allow(dead_code)] // each test file uses a different part of the fixtures

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tempfile::TempDir;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};
use understudy_transport::certs::{self, CaOptions};
use understudy_transport::{
    AcceptError, Connection, Endpoint, Identity, TlsFiles, TransportOptions, Validity,
};

/// A CA in a temporary directory with certificates for `primary`, `backup` and `witness`.
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        certs::init_ca(dir.path(), &CaOptions::default()).expect("init CA");
        for name in ["primary", "backup", "witness"] {
            certs::issue(dir.path(), name, Validity::node_default()).expect("issue");
        }
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir().join(certs::CA_CERT_FILE)
    }

    /// Node `name`'s identity, trusting this CA.
    pub fn identity(&self, name: &str) -> Identity {
        Identity::load(&TlsFiles::in_dir(self.dir(), name)).expect("load identity")
    }

    /// Issues (or re-issues) `name` with an explicit validity.
    pub fn issue(&self, name: &str, validity: Validity) {
        certs::issue(self.dir(), name, validity).expect("issue");
    }
}

/// A validity period that ended yesterday.
pub fn expired() -> Validity {
    let now = SystemTime::now();
    let day = Duration::from_secs(24 * 60 * 60);
    Validity::between(now - 10 * day, now - day)
}

pub fn opts() -> TransportOptions {
    TransportOptions {
        handshake_timeout: Duration::from_secs(5),
        ..TransportOptions::default()
    }
}

pub fn any_local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn server(identity: &Identity) -> (Endpoint, SocketAddr) {
    let endpoint = Endpoint::server(any_local(), identity, &opts()).expect("server endpoint");
    let addr = endpoint.local_addr().expect("local addr");
    (endpoint, addr)
}

pub fn client(identity: &Identity) -> Endpoint {
    Endpoint::client(any_local(), identity, &opts()).expect("client endpoint")
}

/// A connected pair: (client side, server side), `primary` connecting to `backup`.
pub async fn pair(pki: &Pki) -> (Connection, Connection, Endpoint, Endpoint) {
    let (server, addr) = server(&pki.identity("backup"));
    let client = client(&pki.identity("primary"));
    let (client_conn, server_conn) = tokio::join!(client.connect(addr, "backup"), async {
        server.accept().await.expect("endpoint open")
    });
    (
        client_conn.expect("connect"),
        server_conn.expect("accept"),
        client,
        server,
    )
}

/// Runs one refused handshake: `client` connects to `server` as `server_name`. Returns the
/// client's error text, the server's accept error, and checks the server accepted nothing else.
pub async fn refused(
    client: &Endpoint,
    server: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> (understudy_transport::ConnectError, AcceptError) {
    let (connected, accepted) = tokio::join!(client.connect(addr, server_name), async {
        server.accept().await.expect("endpoint open")
    });
    let client_err = match connected {
        Ok(conn) => panic!("connect succeeded, peer {}", conn.peer_name()),
        Err(e) => e,
    };
    let server_err = match accepted {
        Ok(conn) => panic!("server admitted {}", conn.peer_name()),
        Err(e) => e,
    };
    // Nothing else reaches the application.
    let next = tokio::time::timeout(Duration::from_millis(200), server.accept()).await;
    assert!(next.is_err(), "server saw another connection");
    (client_err, server_err)
}

/// Captured log events: (level, message and fields).
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<(Level, String)>>>);

impl Captured {
    pub fn warnings(&self) -> Vec<String> {
        let events = self.0.lock().unwrap();
        events
            .iter()
            .filter(|(level, _)| *level == Level::WARN)
            .map(|(_, text)| text.clone())
            .collect()
    }
}

/// A subscriber that records warnings and errors from this crate.
pub struct CaptureSubscriber(pub Captured);

struct TextVisitor(String);

impl Visit for TextVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl Subscriber for CaptureSubscriber {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= Level::WARN && metadata.target().starts_with("understudy_transport")
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut visitor = TextVisitor(String::new());
        event.record(&mut visitor);
        (self.0)
            .0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), visitor.0));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// Installs a capturing subscriber for the current thread (tokio tests run on one thread).
pub fn capture_logs() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let guard = tracing::subscriber::set_default(CaptureSubscriber(captured.clone()));
    (captured, guard)
}
