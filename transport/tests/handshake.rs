//! Mutual TLS between nodes: who gets in, who is refused, and what both sides are told.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{client, expired, pair, refused, server, Pki};
use understudy_transport::endpoint::RejectedBy::{Peer, Us};
use understudy_transport::{tls, Endpoint, HandshakeFailure, Identity, TlsFiles};

const MAX_FRAME: u32 = 1 << 20;

#[tokio::test]
async fn same_ca_connects_and_exchanges_frames() {
    let pki = Pki::new();
    let (client_conn, server_conn, _client, _server) = pair(&pki).await;
    assert_eq!(client_conn.peer_name(), "backup");
    assert_eq!(server_conn.peer_name(), "primary");

    // Control channel: the opener speaks first; the server echoes every frame reversed.
    let echo = tokio::spawn({
        let server_conn = server_conn.clone();
        async move {
            let mut control = server_conn.accept_control(MAX_FRAME).await.unwrap();
            while let Some(frame) = control.recv().await.unwrap() {
                let mut frame = frame.to_vec();
                frame.reverse();
                control.send(&frame).await.unwrap();
            }
            control.finish().unwrap();
        }
    });
    let mut control = client_conn.open_control(MAX_FRAME).await.unwrap();
    for msg in [&b"hello"[..], b"", &[7u8; 100_000]] {
        control.send(msg).await.unwrap();
        let mut reply = control.recv().await.unwrap().expect("reply").to_vec();
        reply.reverse();
        assert_eq!(reply, msg);
    }
    control.finish().unwrap();
    assert_eq!(control.recv().await.unwrap(), None);
    echo.await.unwrap();

    // Many parallel unidirectional streams, several frames each.
    const STREAMS: u32 = 200;
    const FRAMES: u32 = 5;
    let receiver = tokio::spawn({
        let server_conn = server_conn.clone();
        async move {
            let mut readers = Vec::new();
            for _ in 0..STREAMS {
                let mut reader = server_conn.accept_uni(MAX_FRAME).await.unwrap();
                readers.push(tokio::spawn(async move {
                    let mut frames = Vec::new();
                    while let Some(frame) = reader.read_frame().await.unwrap() {
                        frames.push(frame);
                    }
                    frames
                }));
            }
            let mut by_stream = BTreeMap::new();
            for reader in readers {
                let frames = reader.await.unwrap();
                let id = u32::from_be_bytes(frames[0][..4].try_into().unwrap());
                by_stream.insert(id, frames);
            }
            by_stream
        }
    });
    let mut senders = Vec::new();
    for id in 0..STREAMS {
        let client_conn = client_conn.clone();
        senders.push(tokio::spawn(async move {
            let mut sender = client_conn.open_uni().await.unwrap();
            for seq in 0..FRAMES {
                let mut frame = id.to_be_bytes().to_vec();
                frame.extend(std::iter::repeat_n(
                    seq as u8,
                    (id * 97 + seq) as usize % 5000,
                ));
                if seq % 2 == 0 {
                    sender.send(&frame).await.unwrap();
                } else {
                    sender.send_bytes(frame.into()).await.unwrap();
                }
            }
            sender.finish().unwrap();
            sender.finished().await.unwrap();
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    let by_stream = receiver.await.unwrap();
    assert_eq!(by_stream.len(), STREAMS as usize);
    for (id, frames) in by_stream {
        assert_eq!(frames.len(), FRAMES as usize, "stream {id}");
        for (seq, frame) in frames.iter().enumerate() {
            assert_eq!(frame[..4], id.to_be_bytes());
            assert_eq!(frame.len() - 4, (id as usize * 97 + seq) % 5000);
            assert!(frame[4..].iter().all(|&b| b == seq as u8));
        }
    }
}

#[tokio::test]
async fn server_endpoint_also_connects_out() {
    // The backup accepts the primary and connects to the witness with one socket.
    let pki = Pki::new();
    let (witness, witness_addr) = server(&pki.identity("witness"));
    let (backup, _) = server(&pki.identity("backup"));
    let (conn, accepted) = tokio::join!(backup.connect(witness_addr, "witness"), witness.accept());
    assert_eq!(conn.unwrap().peer_name(), "witness");
    assert_eq!(accepted.unwrap().unwrap().peer_name(), "backup");
}

/// Identity of node `name` issued by `issuer`, trusting `trusted`'s CA.
fn cross_identity(issuer: &Pki, trusted: &Pki, name: &str) -> Identity {
    let mut files = TlsFiles::in_dir(issuer.dir(), name);
    files.ca_cert = trusted.ca_cert();
    Identity::load(&files).unwrap()
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused_by_the_server() {
    let pki = Pki::new();
    let other = Pki::new();
    let (server, addr) = server(&pki.identity("backup"));
    // Trusts our CA (so it accepts the server) but presents a certificate from another CA.
    let client = client(&cross_identity(&other, &pki, "primary"));
    let (client_err, server_err) = refused(&client, &server, addr, "backup").await;

    assert_eq!(
        server_err.handshake_failure(),
        Some(HandshakeFailure::UnknownCa(Us))
    );
    let text = server_err.to_string();
    assert!(
        text.contains("peer certificate not signed by our CA"),
        "{text}"
    );
    assert_eq!(
        client_err.handshake_failure(),
        Some(HandshakeFailure::UnknownCa(Peer))
    );
    let text = client_err.to_string();
    assert!(text.contains("not signed by its CA"), "{text}");
}

#[tokio::test]
async fn node_from_another_ca_refuses_our_server() {
    let pki = Pki::new();
    let other = Pki::new();
    let (server, addr) = server(&pki.identity("backup"));
    // Entirely from another CA: the client already refuses the server's certificate.
    let client = client(&other.identity("primary"));
    let (client_err, server_err) = refused(&client, &server, addr, "backup").await;

    assert_eq!(
        client_err.handshake_failure(),
        Some(HandshakeFailure::UnknownCa(Us))
    );
    assert!(client_err
        .to_string()
        .contains("peer certificate not signed by our CA"));
    assert_eq!(
        server_err.handshake_failure(),
        Some(HandshakeFailure::UnknownCa(Peer))
    );
    assert!(server_err.to_string().contains("not signed by its CA"));
}

#[tokio::test]
async fn expired_client_cert_is_refused() {
    let pki = Pki::new();
    pki.issue("primary", expired());
    let (server, addr) = server(&pki.identity("backup"));
    let client = client(&pki.identity("primary"));
    let (client_err, server_err) = refused(&client, &server, addr, "backup").await;

    assert_eq!(
        server_err.handshake_failure(),
        Some(HandshakeFailure::CertificateExpired(Us))
    );
    assert!(
        server_err.to_string().contains("peer certificate expired"),
        "{server_err}"
    );
    assert_eq!(
        client_err.handshake_failure(),
        Some(HandshakeFailure::CertificateExpired(Peer))
    );
    assert!(
        client_err.to_string().contains("certificate expired"),
        "{client_err}"
    );
}

#[tokio::test]
async fn expired_server_cert_is_refused_by_the_client() {
    let pki = Pki::new();
    pki.issue("backup", expired());
    let (server, addr) = server(&pki.identity("backup"));
    let client = client(&pki.identity("primary"));
    let (client_err, server_err) = refused(&client, &server, addr, "backup").await;
    assert_eq!(
        client_err.handshake_failure(),
        Some(HandshakeFailure::CertificateExpired(Us))
    );
    assert!(client_err.to_string().contains("expired"), "{client_err}");
    assert_eq!(
        server_err.handshake_failure(),
        Some(HandshakeFailure::CertificateExpired(Peer))
    );
}

/// A client endpoint with a hand-made rustls configuration.
fn custom_client(crypto: rustls::ClientConfig) -> Endpoint {
    let opts = common::opts();
    let config = tls::quic_client_config(crypto, &opts).unwrap();
    Endpoint::with_configs(common::any_local(), None, config, "custom", &opts).unwrap()
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let pki = Pki::new();
    let (server, addr) = server(&pki.identity("backup"));
    let mut roots = rustls::RootCertStore::empty();
    for ca in pki.identity("backup").ca_certs() {
        roots.add(ca.clone()).unwrap();
    }
    let mut crypto = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(Arc::new(roots))
        .with_no_client_auth();
    crypto.alpn_protocols = vec![tls::ALPN.to_vec()];
    let client = custom_client(crypto);
    let (client_err, server_err) = refused(&client, &server, addr, "backup").await;

    assert_eq!(
        server_err.handshake_failure(),
        Some(HandshakeFailure::NoClientCertificate(Us))
    );
    assert!(
        server_err.to_string().contains("no client certificate"),
        "{server_err}"
    );
    assert_eq!(
        client_err.handshake_failure(),
        Some(HandshakeFailure::NoClientCertificate(Peer))
    );
}

#[tokio::test]
async fn wrong_alpn_is_refused() {
    let pki = Pki::new();
    let (server, addr) = server(&pki.identity("backup"));
    let mut crypto = tls::client_crypto(&pki.identity("primary")).unwrap();
    crypto.alpn_protocols = vec![b"understudy/0".to_vec()];
    let client = custom_client(crypto);
    let (client_err, server_err) = refused(&client, &server, addr, "backup").await;

    assert_eq!(
        server_err.handshake_failure(),
        Some(HandshakeFailure::AlpnMismatch(Us))
    );
    assert_eq!(
        client_err.handshake_failure(),
        Some(HandshakeFailure::AlpnMismatch(Peer))
    );
    assert!(client_err.to_string().contains("ALPN"), "{client_err}");
}

#[tokio::test]
async fn wrong_server_name_is_refused_by_the_client() {
    let pki = Pki::new();
    let (server, addr) = server(&pki.identity("backup"));
    let client = client(&pki.identity("primary"));
    // We expect the witness, but the backup answers.
    let (client_err, server_err) = refused(&client, &server, addr, "witness").await;
    assert_eq!(
        client_err.handshake_failure(),
        Some(HandshakeFailure::WrongName)
    );
    assert!(client_err.to_string().contains("`witness`"), "{client_err}");
    assert_eq!(
        server_err.handshake_failure(),
        Some(HandshakeFailure::BadCertificate(Peer))
    );
}

#[tokio::test]
async fn nobody_listening_times_out_with_a_hint() {
    let pki = Pki::new();
    // Bind a UDP port and never answer on it.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let opts = understudy_transport::TransportOptions {
        handshake_timeout: std::time::Duration::from_millis(300),
        ..common::opts()
    };
    let client = Endpoint::client(common::any_local(), &pki.identity("primary"), &opts).unwrap();
    let err = client.connect(addr, "backup").await.unwrap_err();
    assert_eq!(err.handshake_failure(), Some(HandshakeFailure::TimedOut));
    assert!(err.to_string().contains("is it running"), "{err}");
}
