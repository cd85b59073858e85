//! QUIC endpoints and connections between authenticated Understudy nodes.
//!
//! An [`Endpoint`] owns one UDP socket. A server endpoint accepts connections and can also
//! connect out (the backup listens for the primary and connects to the witness with the same
//! socket); a client endpoint only connects. Every connection is mutually authenticated
//! (see [`crate::tls`]), and [`Connection::peer_name`] says which node is on the other side.
//!
//! # Admission
//!
//! In TLS 1.3 the client finishes its handshake *before* the server has checked the client's
//! certificate, so a bare QUIC client would report "connected" and only later see the server
//! refuse it. To give both sides a definite answer, the server confirms each connection it
//! admits by opening the first server-initiated unidirectional stream and sending one frame,
//! [`ADMISSION`], on it; [`Endpoint::connect`] returns only after reading it:
//!
//! ```text
//!  client (connect)                                     server (accept)
//!     | --- Initial: ClientHello, ALPN understudy/1 ----> |
//!     | <-- ServerHello, cert, CertificateRequest ------- |
//!     | --- client cert, CertificateVerify, Finished ---> |  verify client cert against the CA
//!     |                                                   |  refuse: CONNECTION_CLOSE + TLS alert
//!     | <-- uni stream 3: frame "understudy/1 admitted" - |  admit: accept() returns Connection
//!  connect() returns Connection                           |
//! ```
//!
//! A refused handshake fails on both sides with a [`HandshakeFailure`] that names the cause
//! ("peer certificate not signed by our CA", "... expired ...", no client certificate, ALPN
//! mismatch); the server also logs it with `tracing::warn!`. Applications therefore see only
//! admitted connections, and their own unidirectional streams start after the admission stream.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{ConnectionError, VarInt};
use rustls_pki_types::CertificateDer;
use thiserror::Error;

use crate::certs::{cert_name, Identity};
use crate::stream::{
    self, AcceptStreamError, ControlChannel, FrameReader, FrameSender, OpenStreamError,
};
use crate::tls::{self, TlsConfigError, TransportOptions};
use crate::ErrorChain;

/// The frame a server sends on its first unidirectional stream to admit a client.
pub const ADMISSION: &[u8] = b"understudy/1 admitted";

/// Application close code: the connection was refused after the TLS handshake
/// (e.g. the certificate names no node).
pub const CLOSE_REFUSED: u32 = 0x5246; // "RF"

/// Who rejected a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectedBy {
    /// This side refused the peer (and told the peer with a TLS alert).
    Us,
    /// The peer refused us.
    Peer,
}

/// Why a handshake failed, in terms an operator can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// A certificate was not signed by the verifying side's CA.
    UnknownCa(RejectedBy),
    /// A certificate is expired or not yet valid.
    CertificateExpired(RejectedBy),
    /// The client presented no certificate (`Us`: the peer sent none; `Peer`: we sent none).
    NoClientCertificate(RejectedBy),
    /// The server's certificate does not name the node we connected to.
    WrongName,
    /// A certificate lacks the client-auth or server-auth usage.
    WrongUsage(RejectedBy),
    /// A certificate's signature does not verify: signed by another CA that has the same name
    /// as ours, or altered.
    BadSignature(RejectedBy),
    /// A certificate was refused for another reason (e.g. bad encoding).
    BadCertificate(RejectedBy),
    /// The peer does not offer ALPN `understudy/1`.
    AlpnMismatch(RejectedBy),
    /// Another TLS failure, identified by its TLS alert number.
    Tls {
        /// Who sent the alert.
        by: RejectedBy,
        /// The TLS alert description.
        alert: u8,
    },
    /// The peer closed the connection after the TLS handshake instead of admitting it.
    Refused,
    /// The peer did not answer in time.
    TimedOut,
    /// The peer shares no QUIC version with us.
    VersionMismatch,
    /// The connection broke for a reason unrelated to authentication.
    ConnectionLost,
}

const SAME_CA_HINT: &str = "every node needs a certificate issued from the same \
                            `understudy certs init` CA";
const REISSUE_HINT: &str = "re-issue it with `understudy certs issue --name NAME` \
                            and check both clocks";

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use RejectedBy::{Peer, Us};
        match self {
            Self::UnknownCa(Us) => {
                write!(f, "peer certificate not signed by our CA ({SAME_CA_HINT})")
            }
            Self::UnknownCa(Peer) => write!(
                f,
                "the peer refused our certificate: not signed by its CA ({SAME_CA_HINT})"
            ),
            Self::CertificateExpired(Us) => {
                write!(
                    f,
                    "peer certificate expired or not yet valid ({REISSUE_HINT})"
                )
            }
            Self::CertificateExpired(Peer) => write!(
                f,
                "the peer refused our certificate: certificate expired or not yet valid \
                 ({REISSUE_HINT})"
            ),
            Self::NoClientCertificate(Us) => write!(
                f,
                "the peer presented no client certificate (every node must connect with its \
                 own certificate)"
            ),
            Self::NoClientCertificate(Peer) => {
                write!(
                    f,
                    "the peer requires a client certificate and we presented none"
                )
            }
            Self::WrongName => write!(
                f,
                "the peer's certificate does not name the node we connected to (check the \
                 address and the expected node name)"
            ),
            Self::WrongUsage(Us) => write!(
                f,
                "peer certificate lacks the client/server-auth usage (issue it with \
                 `understudy certs issue`)"
            ),
            Self::WrongUsage(Peer) => write!(
                f,
                "the peer refused our certificate: it lacks the client/server-auth usage \
                 (issue it with `understudy certs issue`)"
            ),
            Self::BadSignature(Us) => write!(
                f,
                "peer certificate signature does not verify against our CA (issued by another CA \
                 of the same name?) ({SAME_CA_HINT})"
            ),
            Self::BadSignature(Peer) => write!(
                f,
                "the peer refused our certificate: its signature does not verify against the \
                 peer's CA ({SAME_CA_HINT})"
            ),
            Self::BadCertificate(Us) => write!(f, "peer certificate is invalid"),
            Self::BadCertificate(Peer) => write!(f, "the peer refused our certificate as invalid"),
            Self::AlpnMismatch(_) => write!(
                f,
                "the peer does not speak {} (ALPN mismatch: is it an Understudy node of a \
                 compatible version?)",
                String::from_utf8_lossy(tls::ALPN)
            ),
            Self::Tls { by: Us, alert } => {
                write!(f, "TLS handshake failed (we sent alert {alert})")
            }
            Self::Tls { by: Peer, alert } => {
                write!(f, "the peer aborted the TLS handshake (alert {alert})")
            }
            Self::Refused => write!(f, "the peer refused the connection after the handshake"),
            Self::TimedOut => write!(
                f,
                "no answer from the peer in time (is it running, listening on that address, \
                 and is UDP to it allowed?)"
            ),
            Self::VersionMismatch => write!(f, "the peer speaks no QUIC version we support"),
            Self::ConnectionLost => write!(f, "the connection broke during the handshake"),
        }
    }
}

// TLS alert descriptions (RFC 8446 section 6).
const ALERT_BAD_CERTIFICATE: u8 = 42;
const ALERT_UNSUPPORTED_CERTIFICATE: u8 = 43;
const ALERT_CERTIFICATE_EXPIRED: u8 = 45;
const ALERT_DECRYPT_ERROR: u8 = 51;
const ALERT_UNKNOWN_CA: u8 = 48;
const ALERT_CERTIFICATE_REQUIRED: u8 = 116;
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

impl HandshakeFailure {
    /// Classifies the error that ended a connection during its handshake.
    pub fn from_connection_error(err: &ConnectionError) -> Self {
        match err {
            ConnectionError::TransportError(e) => match tls_alert(u64::from(e.code)) {
                Some(alert) => Self::from_alert(alert, RejectedBy::Us, &e.reason),
                None => Self::ConnectionLost,
            },
            ConnectionError::ConnectionClosed(close) => {
                match tls_alert(u64::from(close.error_code)) {
                    Some(alert) => Self::from_alert(
                        alert,
                        RejectedBy::Peer,
                        &String::from_utf8_lossy(&close.reason),
                    ),
                    None => Self::ConnectionLost,
                }
            }
            ConnectionError::ApplicationClosed(_) => Self::Refused,
            ConnectionError::TimedOut => Self::TimedOut,
            ConnectionError::VersionMismatch => Self::VersionMismatch,
            ConnectionError::Reset
            | ConnectionError::LocallyClosed
            | ConnectionError::CidsExhausted => Self::ConnectionLost,
        }
    }

    fn from_alert(alert: u8, by: RejectedBy, reason: &str) -> Self {
        match alert {
            ALERT_UNKNOWN_CA => Self::UnknownCa(by),
            ALERT_CERTIFICATE_EXPIRED => Self::CertificateExpired(by),
            ALERT_CERTIFICATE_REQUIRED => Self::NoClientCertificate(by),
            ALERT_NO_APPLICATION_PROTOCOL => Self::AlpnMismatch(by),
            ALERT_UNSUPPORTED_CERTIFICATE => Self::WrongUsage(by),
            // rustls sends bad_certificate both for a name mismatch and for a malformed
            // certificate; only the side that verified knows which (from its own error text).
            ALERT_BAD_CERTIFICATE if by == RejectedBy::Us && reason.contains("NotValidForName") => {
                Self::WrongName
            }
            ALERT_BAD_CERTIFICATE
                if by == RejectedBy::Us && reason.contains("not valid for name") =>
            {
                Self::WrongName
            }
            ALERT_BAD_CERTIFICATE => Self::BadCertificate(by),
            // decrypt_error also covers a bad handshake signature; only a certificate signature
            // failure is worth its own message.
            ALERT_DECRYPT_ERROR if reason.contains("BadSignature") => Self::BadSignature(by),
            alert => Self::Tls { by, alert },
        }
    }
}

/// The TLS alert carried by a QUIC CRYPTO_ERROR code (0x100-0x1ff), if it is one.
fn tls_alert(code: u64) -> Option<u8> {
    if (0x100..0x200).contains(&code) {
        u8::try_from(code & 0xff).ok()
    } else {
        None
    }
}

/// Why an endpoint could not be created.
#[derive(Debug, Error)]
pub enum BindError {
    /// The TLS or transport configuration is unusable.
    #[error("invalid TLS configuration for node `{name}`")]
    Tls {
        /// This node's name.
        name: String,
        /// The configuration error.
        #[source]
        source: TlsConfigError,
    },
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr} (is the address in use, or not local?)")]
    Bind {
        /// The address to bind.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// Binding needs a running tokio runtime.
    #[error("no tokio runtime: create endpoints from inside a tokio runtime")]
    NoRuntime,
}

/// Why [`Endpoint::connect`] failed.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The connection could not even start (bad server name, endpoint closed, ...).
    #[error("cannot start a connection to `{server_name}` at {addr}")]
    Start {
        /// The server's address.
        addr: SocketAddr,
        /// The node name we expected.
        server_name: String,
        /// quinn's reason.
        #[source]
        source: quinn::ConnectError,
    },
    /// The handshake failed; `reason` says why.
    #[error("connection to `{server_name}` at {addr} failed: {reason}")]
    Handshake {
        /// The server's address.
        addr: SocketAddr,
        /// The node name we expected.
        server_name: String,
        /// The cause, classified.
        reason: HandshakeFailure,
        /// The QUIC error it was classified from.
        #[source]
        source: ConnectionError,
    },
    /// The server did not admit the connection within the handshake timeout.
    #[error(
        "connection to `{server_name}` at {addr} failed: {reason} (no admission within {timeout:?})",
        reason = HandshakeFailure::TimedOut
    )]
    Timeout {
        /// The server's address.
        addr: SocketAddr,
        /// The node name we expected.
        server_name: String,
        /// The handshake timeout.
        timeout: Duration,
    },
    /// The server completed TLS but sent something other than the admission frame.
    #[error(
        "`{server_name}` at {addr} completed the TLS handshake but did not admit us as an \
         Understudy node ({detail})"
    )]
    Admission {
        /// The server's address.
        addr: SocketAddr,
        /// The node name we expected.
        server_name: String,
        /// What went wrong.
        detail: String,
    },
}

impl ConnectError {
    /// The classified handshake failure, if this error is one.
    pub fn handshake_failure(&self) -> Option<HandshakeFailure> {
        match self {
            Self::Handshake { reason, .. } => Some(*reason),
            Self::Timeout { .. } => Some(HandshakeFailure::TimedOut),
            Self::Start { .. } | Self::Admission { .. } => None,
        }
    }
}

/// Why an incoming connection was not admitted. The server has already logged it.
#[derive(Debug, Error)]
pub enum AcceptError {
    /// The handshake failed; `reason` says why.
    #[error("refused connection from {remote}: {reason}")]
    Handshake {
        /// The client's address.
        remote: SocketAddr,
        /// The cause, classified.
        reason: HandshakeFailure,
        /// The QUIC error it was classified from.
        #[source]
        source: ConnectionError,
    },
    /// The handshake did not complete within the handshake timeout.
    #[error("refused connection from {remote}: handshake not completed within {timeout:?}")]
    Timeout {
        /// The client's address.
        remote: SocketAddr,
        /// The handshake timeout.
        timeout: Duration,
    },
    /// The client's certificate (signed by our CA) names no node.
    #[error(
        "refused connection from {remote}: its certificate names no node (issue node \
         certificates with `understudy certs issue --name NAME`)"
    )]
    NoPeerName {
        /// The client's address.
        remote: SocketAddr,
    },
    /// The connection was lost while admitting it.
    #[error("connection from `{peer}` at {remote} lost while admitting it")]
    Admission {
        /// The client's address.
        remote: SocketAddr,
        /// The client's node name.
        peer: String,
        /// The cause.
        #[source]
        source: stream::SendFrameError,
    },
}

impl AcceptError {
    /// The classified handshake failure, if this error is one.
    pub fn handshake_failure(&self) -> Option<HandshakeFailure> {
        match self {
            Self::Handshake { reason, .. } => Some(*reason),
            Self::Timeout { .. } => Some(HandshakeFailure::TimedOut),
            Self::NoPeerName { .. } | Self::Admission { .. } => None,
        }
    }

    /// The client's address.
    pub fn remote(&self) -> SocketAddr {
        match self {
            Self::Handshake { remote, .. }
            | Self::Timeout { remote, .. }
            | Self::NoPeerName { remote }
            | Self::Admission { remote, .. } => *remote,
        }
    }
}

/// A QUIC endpoint (one UDP socket) of an Understudy node.
#[derive(Debug, Clone)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    name: Arc<str>,
    handshake_timeout: Duration,
}

impl Endpoint {
    /// Listens on `addr` (port 0 picks a free port; see [`Self::local_addr`]). The endpoint
    /// accepts connections from nodes whose certificates our CA signed, and can also connect out
    /// with the same identity.
    pub fn server(
        addr: SocketAddr,
        identity: &Identity,
        opts: &TransportOptions,
    ) -> Result<Self, BindError> {
        let tls_error = |source| BindError::Tls {
            name: identity.name().to_owned(),
            source,
        };
        let server = tls::server_config(identity, opts).map_err(tls_error)?;
        let client = tls::client_config(identity, opts).map_err(tls_error)?;
        Self::with_configs(addr, Some(server), client, identity.name(), opts)
    }

    /// Binds `bind` (usually `0.0.0.0:0`) for outgoing connections only.
    pub fn client(
        bind: SocketAddr,
        identity: &Identity,
        opts: &TransportOptions,
    ) -> Result<Self, BindError> {
        let client = tls::client_config(identity, opts).map_err(|source| BindError::Tls {
            name: identity.name().to_owned(),
            source,
        })?;
        Self::with_configs(bind, None, client, identity.name(), opts)
    }

    /// Builds an endpoint from ready quinn configurations (for tools and tests that need a
    /// non-standard TLS setup; nodes use [`Self::server`] and [`Self::client`]). `name` is only
    /// used in log lines; of `opts`, only the handshake timeout and the UDP buffer size are used
    /// here (the rest is in the quinn configurations).
    pub fn with_configs(
        bind: SocketAddr,
        server: Option<quinn::ServerConfig>,
        client: quinn::ClientConfig,
        name: &str,
        opts: &TransportOptions,
    ) -> Result<Self, BindError> {
        let runtime = quinn::default_runtime().ok_or(BindError::NoRuntime)?;
        let socket = std::net::UdpSocket::bind(bind)
            .map_err(|source| BindError::Bind { addr: bind, source })?;
        size_socket_buffers(&socket, opts.udp_buffer_size, name);
        let mut inner =
            quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
                .map_err(|source| BindError::Bind { addr: bind, source })?;
        inner.set_default_client_config(client);
        Ok(Self {
            inner,
            name: name.into(),
            handshake_timeout: opts.handshake_timeout,
        })
    }

    /// The address the socket is bound to (with the real port if bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connects to the node `server_name` (e.g. `backup`) at `addr`. The server must present a
    /// certificate for that name signed by our CA, accept ours, and admit us.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Connection, ConnectError> {
        let connecting =
            self.inner
                .connect(addr, server_name)
                .map_err(|source| ConnectError::Start {
                    addr,
                    server_name: server_name.to_owned(),
                    source,
                })?;
        let handshake = async {
            let handshake_error = |source: ConnectionError| ConnectError::Handshake {
                addr,
                server_name: server_name.to_owned(),
                reason: HandshakeFailure::from_connection_error(&source),
                source,
            };
            let conn = connecting.await.map_err(handshake_error)?;
            // Wait for the server's verdict on our certificate (see the module docs).
            let mut admission = stream::accept_uni(&conn, ADMISSION.len() as u32)
                .await
                .map_err(|e| handshake_error(e.0))?;
            match admission.read_frame().await {
                Ok(Some(frame)) if frame == ADMISSION => Ok(conn),
                Ok(other) => Err(ConnectError::Admission {
                    addr,
                    server_name: server_name.to_owned(),
                    detail: format!("unexpected admission frame {other:?}"),
                }),
                Err(stream::RecvFrameError::ConnectionLost(e)) => Err(handshake_error(e)),
                Err(e) => Err(ConnectError::Admission {
                    addr,
                    server_name: server_name.to_owned(),
                    detail: e.to_string(),
                }),
            }
        };
        let conn = match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(ConnectError::Timeout {
                    addr,
                    server_name: server_name.to_owned(),
                    timeout: self.handshake_timeout,
                })
            }
        };
        // The TLS layer verified that the certificate names `server_name`.
        let peer_name = peer_name(&conn).unwrap_or_else(|| server_name.to_owned());
        tracing::debug!(node = %self.name, peer = %peer_name, %addr, "connected");
        Ok(Connection {
            inner: conn,
            peer_name: peer_name.into(),
        })
    }

    /// Waits for the next incoming connection and runs its handshake. Returns `None` once the
    /// endpoint is closed. A refused handshake yields `Some(Err(..))` (already logged with
    /// `tracing::warn!`); keep accepting after it.
    ///
    /// Handshakes run one at a time here, each bounded by the handshake timeout. To run them
    /// concurrently, use [`Self::accept_incoming`] and spawn [`Incoming::handshake`].
    pub async fn accept(&self) -> Option<Result<Connection, AcceptError>> {
        Some(self.accept_incoming().await?.handshake().await)
    }

    /// Waits for the next incoming connection attempt, without running its handshake.
    pub async fn accept_incoming(&self) -> Option<Incoming> {
        let inner = self.inner.accept().await?;
        Some(Incoming {
            inner,
            name: self.name.clone(),
            handshake_timeout: self.handshake_timeout,
        })
    }

    /// Closes every connection with `code` and `reason`, and stops accepting.
    pub fn close(&self, code: u32, reason: &str) {
        self.inner.close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Waits until every connection is closed and its close has been sent, so the peers learn
    /// about it (call before exiting after [`Self::close`]).
    pub async fn wait_idle(&self) {
        self.inner.wait_idle().await;
    }

    /// The underlying quinn endpoint.
    pub fn quinn(&self) -> &quinn::Endpoint {
        &self.inner
    }
}

/// Asks for `size`-byte UDP buffers and logs what the kernel granted. Best effort: a small
/// buffer costs speed, not correctness.
fn size_socket_buffers(socket: &std::net::UdpSocket, size: usize, name: &str) {
    let Ok(state) = quinn::udp::UdpSocketState::new(socket.into()) else {
        return;
    };
    let _ = state.set_recv_buffer_size(socket.into(), size);
    let _ = state.set_send_buffer_size(socket.into(), size);
    let recv = state.recv_buffer_size(socket.into()).unwrap_or(0);
    let send = state.send_buffer_size(socket.into()).unwrap_or(0);
    if recv < size || send < size {
        tracing::info!(
            node = %name,
            requested = size,
            recv,
            send,
            "UDP buffers smaller than requested; raise net.core.rmem_max and \
             net.core.wmem_max for full replication throughput"
        );
    } else {
        tracing::debug!(node = %name, recv, send, "UDP buffers sized");
    }
}

/// An incoming connection attempt whose handshake has not run yet.
#[derive(Debug)]
pub struct Incoming {
    inner: quinn::Incoming,
    name: Arc<str>,
    handshake_timeout: Duration,
}

impl Incoming {
    /// The client's address (not yet authenticated).
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Refuses the attempt without a handshake (e.g. when shutting down).
    pub fn refuse(self) {
        self.inner.refuse();
    }

    /// Runs the handshake: verifies the client's certificate, reads its node name, and admits it.
    /// A failure is logged with `tracing::warn!` and returned.
    pub async fn handshake(self) -> Result<Connection, AcceptError> {
        let remote = self.inner.remote_address();
        let result = match tokio::time::timeout(self.handshake_timeout, admit(self.inner)).await {
            Ok(result) => result,
            Err(_) => Err(AcceptError::Timeout {
                remote,
                timeout: self.handshake_timeout,
            }),
        };
        match &result {
            Ok(conn) => {
                tracing::debug!(node = %self.name, peer = %conn.peer_name(), %remote, "admitted")
            }
            Err(e) => tracing::warn!(
                node = %self.name,
                %remote,
                error = %ErrorChain(e),
                "refused incoming connection"
            ),
        }
        result
    }
}

async fn admit(incoming: quinn::Incoming) -> Result<Connection, AcceptError> {
    let remote = incoming.remote_address();
    let handshake_error = |source: ConnectionError| AcceptError::Handshake {
        remote,
        reason: HandshakeFailure::from_connection_error(&source),
        source,
    };
    let conn = incoming
        .accept()
        .map_err(handshake_error)?
        .await
        .map_err(handshake_error)?;
    let Some(peer) = peer_name(&conn) else {
        conn.close(
            VarInt::from_u32(CLOSE_REFUSED),
            b"certificate names no node",
        );
        return Err(AcceptError::NoPeerName { remote });
    };
    let admission_error = |source| AcceptError::Admission {
        remote,
        peer: peer.clone(),
        source,
    };
    let mut admission = stream::open_uni(&conn)
        .await
        .map_err(|e| admission_error(stream::SendFrameError::ConnectionLost(e.0)))?;
    admission.send(ADMISSION).await.map_err(admission_error)?;
    admission.finish().map_err(admission_error)?;
    Ok(Connection {
        inner: conn,
        peer_name: peer.into(),
    })
}

/// The node name in the certificate the peer presented.
fn peer_name(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast_ref::<Vec<CertificateDer<'static>>>()?;
    cert_name(certs.first()?)
}

/// An admitted, mutually authenticated connection to another node.
///
/// Cloning is cheap; clones refer to the same connection.
#[derive(Debug, Clone)]
pub struct Connection {
    inner: quinn::Connection,
    peer_name: Arc<str>,
}

impl Connection {
    /// The peer's node name from its certificate (e.g. `primary`), verified by our CA.
    pub fn peer_name(&self) -> &str {
        &self.peer_name
    }

    /// The peer's current address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Opens a unidirectional stream for sending frames.
    pub async fn open_uni(&self) -> Result<FrameSender, OpenStreamError> {
        stream::open_uni(&self.inner).await
    }

    /// Waits for the peer to open a unidirectional stream, and reads frames of at most
    /// `max_frame_len` bytes from it.
    pub async fn accept_uni(&self, max_frame_len: u32) -> Result<FrameReader, AcceptStreamError> {
        stream::accept_uni(&self.inner, max_frame_len).await
    }

    /// Opens a control channel (a bidirectional stream); the peer learns of it from our first
    /// frame.
    pub async fn open_control(
        &self,
        max_frame_len: u32,
    ) -> Result<ControlChannel, OpenStreamError> {
        stream::open_control(&self.inner, max_frame_len).await
    }

    /// Waits for the peer to open a control channel and send its first frame.
    pub async fn accept_control(
        &self,
        max_frame_len: u32,
    ) -> Result<ControlChannel, AcceptStreamError> {
        stream::accept_control(&self.inner, max_frame_len).await
    }

    /// Closes the connection at once with an application `code` and `reason` the peer sees.
    /// Unacknowledged stream data is abandoned: wait for [`FrameSender::finished`] first if it
    /// matters.
    pub fn close(&self, code: u32, reason: &str) {
        self.inner.close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Waits until the connection is closed, and says why.
    pub async fn closed(&self) -> ConnectionError {
        self.inner.closed().await
    }

    /// Why the connection closed, or `None` while it is open.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        self.inner.close_reason()
    }

    /// Current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.inner.rtt()
    }

    /// Transfer statistics (bytes, packets, congestion events).
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.inner.stats()
    }

    /// The underlying quinn connection.
    pub fn quinn(&self) -> &quinn::Connection {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::{ConnectionClose, TransportErrorCode};

    fn closed_by_peer(alert: u8, reason: &str) -> ConnectionError {
        ConnectionError::ConnectionClosed(ConnectionClose {
            error_code: TransportErrorCode::crypto(alert),
            frame_type: None,
            reason: bytes::Bytes::copy_from_slice(reason.as_bytes()),
        })
    }

    #[test]
    fn alerts_from_the_peer_are_classified() {
        use HandshakeFailure as F;
        use RejectedBy::Peer;
        let cases = [
            (48, F::UnknownCa(Peer)),
            (45, F::CertificateExpired(Peer)),
            (116, F::NoClientCertificate(Peer)),
            (120, F::AlpnMismatch(Peer)),
            (43, F::WrongUsage(Peer)),
            (42, F::BadCertificate(Peer)),
            (
                40,
                F::Tls {
                    by: Peer,
                    alert: 40,
                },
            ),
        ];
        for (alert, expected) in cases {
            assert_eq!(
                HandshakeFailure::from_connection_error(&closed_by_peer(alert, "")),
                expected,
                "alert {alert}"
            );
        }
        assert_eq!(
            HandshakeFailure::from_connection_error(&closed_by_peer(
                51,
                "invalid peer certificate: BadSignature"
            )),
            F::BadSignature(Peer)
        );
    }

    #[test]
    fn non_tls_errors_are_classified() {
        assert_eq!(
            HandshakeFailure::from_connection_error(&ConnectionError::TimedOut),
            HandshakeFailure::TimedOut
        );
        assert_eq!(
            HandshakeFailure::from_connection_error(&ConnectionError::Reset),
            HandshakeFailure::ConnectionLost
        );
        let not_crypto = ConnectionError::ConnectionClosed(ConnectionClose {
            error_code: TransportErrorCode::PROTOCOL_VIOLATION,
            frame_type: None,
            reason: bytes::Bytes::new(),
        });
        assert_eq!(
            HandshakeFailure::from_connection_error(&not_crypto),
            HandshakeFailure::ConnectionLost
        );
    }

    #[test]
    fn messages_name_the_cause() {
        let text = HandshakeFailure::UnknownCa(RejectedBy::Us).to_string();
        assert!(
            text.starts_with("peer certificate not signed by our CA"),
            "{text}"
        );
        let text = HandshakeFailure::CertificateExpired(RejectedBy::Peer).to_string();
        assert!(text.contains("certificate expired"), "{text}");
    }
}
