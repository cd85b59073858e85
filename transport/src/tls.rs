//! rustls and quinn configuration: mutual TLS over the private CA, ALPN `understudy/1`, and a
//! transport tuned for bulk page transfer.
//!
//! Both sides authenticate:
//!
//! | side   | presents             | verifies the peer with                                    |
//! |--------|----------------------|-----------------------------------------------------------|
//! | server | its node certificate | [`WebPkiClientVerifier`]: client cert REQUIRED, signed by the CA, client-auth usage, in its validity period |
//! | client | its node certificate | webpki server verification: signed by the CA, server-auth usage, DNS name = the name passed to `connect` |
//!
//! Only TLS 1.3 is offered (QUIC requires it). The `ring` provider is passed explicitly with
//! `builder_with_provider`, so nothing depends on a process-wide default provider. Session
//! resumption is disabled: every connection verifies the full certificate chain, so a certificate
//! that expired since the last connection is refused, and handshakes are rare enough (a few per
//! failover) that the extra round of signatures costs nothing.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::RootCertStore;
use thiserror::Error;

use crate::certs::Identity;

/// The one application protocol both sides offer. A peer that offers anything else is refused.
pub const ALPN: &[u8] = b"understudy/1";

/// Why a TLS or QUIC configuration could not be built.
#[derive(Debug, Error)]
pub enum TlsConfigError {
    /// The CA certificate cannot be used as a trust anchor.
    #[error("the CA certificate cannot be used as a trust anchor (is ca.pem really a CA?)")]
    BadCa(#[source] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("cannot build the client-certificate verifier from the CA")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
    /// rustls refused the certificate, key or protocol settings.
    #[error("the node certificate or key is unusable (does the key belong to the certificate?)")]
    Rustls(#[source] rustls::Error),
    /// The crypto provider lacks the cipher suite QUIC needs for its initial packets.
    #[error("the crypto provider cannot protect QUIC initial packets")]
    Quic(#[source] NoInitialCipherSuite),
    /// A transport option is out of range.
    #[error("transport option out of range: {0}")]
    Option(&'static str),
}

/// Transport tuning shared by client and server connections.
///
/// The defaults keep a ~1 GB/s page stream busy over a LAN (MACHINE.md measured ~1.2 GB/s on
/// loopback with windows this large; quinn's defaults are sized for 100 Mbit/s at 100 ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportOptions {
    /// A connection with no traffic for this long is closed. Keepalives keep a healthy
    /// connection busy, so this is the time to notice a dead or partitioned peer.
    pub idle_timeout: Duration,
    /// Interval between keepalive packets; must be well below `idle_timeout`.
    pub keep_alive: Duration,
    /// How many bytes one stream may have in flight unacknowledged by the reader.
    pub stream_receive_window: u32,
    /// How many bytes all streams of a connection together may have in flight to us.
    pub connection_receive_window: u32,
    /// How many bytes we buffer for sending across all streams of a connection.
    pub send_window: u64,
    /// How many unidirectional streams the peer may have open at once.
    pub max_concurrent_uni_streams: u32,
    /// How many bidirectional streams the peer may have open at once.
    pub max_concurrent_bidi_streams: u32,
    /// How long a handshake (TLS plus the server's admission, see [`crate::endpoint`]) may take.
    pub handshake_timeout: Duration,
    /// Requested UDP socket send and receive buffer size. The kernel caps it at
    /// `net.core.rmem_max` / `net.core.wmem_max`; with Linux's default cap (208 KiB) a fast
    /// sender overflows the receiver's socket and loses packets, which the congestion controller
    /// answers by slowing down. The endpoint logs the size it actually got.
    pub udp_buffer_size: usize,
    /// Upper bound for path MTU discovery (largest UDP payload tried). quinn's default, 1452,
    /// fits Ethernet; on a jumbo-frame replication link raise it (e.g. 8952) to cut per-packet
    /// CPU. Discovery never exceeds what the path really carries.
    pub max_udp_payload: u16,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            stream_receive_window: 16 << 20,
            connection_receive_window: 64 << 20,
            send_window: 64 << 20,
            max_concurrent_uni_streams: 256,
            max_concurrent_bidi_streams: 16,
            handshake_timeout: Duration::from_secs(10),
            udp_buffer_size: 4 << 20,
            max_udp_payload: 1452,
        }
    }
}

/// The crypto provider every configuration here uses: `ring`.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(identity: &Identity) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for ca in identity.ca_certs() {
        roots.add(ca.clone()).map_err(TlsConfigError::BadCa)?;
    }
    Ok(roots)
}

/// A rustls server configuration that presents `identity` and requires a client certificate
/// signed by `identity`'s CA.
pub fn server_crypto(identity: &Identity) -> Result<rustls::ServerConfig, TlsConfigError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(identity)?),
        provider.clone(),
    )
    .build()
    .map_err(TlsConfigError::ClientVerifier)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsConfigError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain().to_vec(), identity.key().clone_key())
        .map_err(TlsConfigError::Rustls)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A rustls client configuration that presents `identity` and verifies the server against
/// `identity`'s CA.
pub fn client_crypto(identity: &Identity) -> Result<rustls::ClientConfig, TlsConfigError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsConfigError::Rustls)?
        .with_root_certificates(root_store(identity)?)
        .with_client_auth_cert(identity.cert_chain().to_vec(), identity.key().clone_key())
        .map_err(TlsConfigError::Rustls)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// The quinn transport configuration for `opts`.
pub fn transport_config(opts: &TransportOptions) -> Result<TransportConfig, TlsConfigError> {
    let idle = IdleTimeout::try_from(opts.idle_timeout)
        .map_err(|_| TlsConfigError::Option("idle_timeout"))?;
    if opts.keep_alive >= opts.idle_timeout {
        return Err(TlsConfigError::Option(
            "keep_alive must be shorter than idle_timeout",
        ));
    }
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(opts.max_udp_payload);
    let mut transport = TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(opts.keep_alive))
        .stream_receive_window(VarInt::from_u32(opts.stream_receive_window))
        .receive_window(VarInt::from_u32(opts.connection_receive_window))
        .send_window(opts.send_window)
        .max_concurrent_uni_streams(VarInt::from_u32(opts.max_concurrent_uni_streams))
        .max_concurrent_bidi_streams(VarInt::from_u32(opts.max_concurrent_bidi_streams))
        .mtu_discovery_config(Some(mtu))
        .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    Ok(transport)
}

/// Wraps a rustls server configuration and transport options into a quinn server configuration.
pub fn quic_server_config(
    crypto: rustls::ServerConfig,
    opts: &TransportOptions,
) -> Result<quinn::ServerConfig, TlsConfigError> {
    let crypto = QuicServerConfig::try_from(crypto).map_err(TlsConfigError::Quic)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(opts)?));
    Ok(config)
}

/// Wraps a rustls client configuration and transport options into a quinn client configuration.
pub fn quic_client_config(
    crypto: rustls::ClientConfig,
    opts: &TransportOptions,
) -> Result<quinn::ClientConfig, TlsConfigError> {
    let crypto = QuicClientConfig::try_from(crypto).map_err(TlsConfigError::Quic)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(opts)?));
    Ok(config)
}

/// [`server_crypto`] wrapped by [`quic_server_config`].
pub fn server_config(
    identity: &Identity,
    opts: &TransportOptions,
) -> Result<quinn::ServerConfig, TlsConfigError> {
    quic_server_config(server_crypto(identity)?, opts)
}

/// [`client_crypto`] wrapped by [`quic_client_config`].
pub fn client_config(
    identity: &Identity,
    opts: &TransportOptions,
) -> Result<quinn::ClientConfig, TlsConfigError> {
    quic_client_config(client_crypto(identity)?, opts)
}
