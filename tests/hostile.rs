//! A client with a valid certificate that sends malformed or hostile frames: the backup closes
//! its connection with the reason, applies nothing, and keeps serving its real primary (whose
//! image ends byte-identical). A second connection while a primary is served is refused as busy.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use understudy_protocol::{Hello, Limits, MemoryLayout, Message, Mode, Region};
use understudy_transport::{messages, Endpoint, Identity, TlsFiles, TransportOptions};

fn backup(d: &Path, port: u16, dump: &Path) -> Proc {
    let b = Proc::spawn(
        d,
        "backup",
        &s(&[
            "backup",
            "--certs",
            &d.join("certs").display().to_string(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            // Below the failure timeout, so a commit without chunks is caught as such rather
            // than as a silent primary.
            "--chunk-timeout",
            "100ms",
            "--dump-dir",
            &dump.display().to_string(),
        ]),
    );
    b.wait_for("backup listening", Duration::from_secs(10));
    b
}

fn hello(pages: u64) -> Message {
    Message::Hello(Hello {
        min_version: understudy_protocol::MIN_PROTOCOL_VERSION,
        max_version: understudy_protocol::PROTOCOL_VERSION,
        mode: Mode::Protect,
        vm_id: "vm-1".into(),
        layout: MemoryLayout {
            regions: vec![Region { gpa: 0, pages }],
        },
        base: None,
    })
}

/// Connects with the CA-signed `primary` certificate: a peer the backup must trust, sending
/// what no primary sends.
async fn mallory(d: &Path, addr: SocketAddr) -> (Endpoint, understudy_transport::Connection) {
    let id = Identity::load(&TlsFiles::in_dir(&d.join("certs"), "primary")).unwrap();
    let ep = Endpoint::client(
        "127.0.0.1:0".parse().unwrap(),
        &id,
        &TransportOptions::default(),
    )
    .unwrap();
    let conn = ep.connect(addr, "backup").await.unwrap();
    (ep, conn)
}

async fn wait_closed(conn: &understudy_transport::Connection) -> String {
    for _ in 0..500 {
        if let Some(r) = conn.close_reason() {
            return r.to_string();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the backup did not close the hostile connection within 5 s");
}

/// A hostile session that got as far as the backup's Welcome; returns its control sender.
async fn welcomed(
    d: &Path,
    addr: SocketAddr,
) -> (
    Endpoint,
    understudy_transport::Connection,
    understudy_transport::FrameSender,
) {
    let limits = Limits::default();
    let (ep, conn) = mallory(d, addr).await;
    let (mut tx, mut rx) = conn
        .open_control(limits.max_frame_len)
        .await
        .unwrap()
        .split();
    messages::send(&mut tx, &hello(16384)).await.unwrap();
    let welcome = rx.read_frame().await.unwrap().unwrap();
    assert!(matches!(
        messages::decode(&welcome, &limits),
        Ok(Message::Welcome(_))
    ));
    (ep, conn, tx)
}

/// Runs the hostile sessions one after another; returns the close reasons.
async fn attacks(d: &Path, addr: SocketAddr) -> Vec<String> {
    let limits = Limits::default();
    let mut reasons = Vec::new();
    // 1. Garbage instead of a Hello.
    let (_ep, conn) = mallory(d, addr).await;
    let (mut tx, _rx) = conn
        .open_control(limits.max_frame_len)
        .await
        .unwrap()
        .split();
    tx.send(b"\x00\x01garbage that is no protocol frame")
        .await
        .unwrap();
    reasons.push(wait_closed(&conn).await);
    // 2. A valid Hello, then a chunk stream carrying junk.
    let (_ep, conn, _tx) = welcomed(d, addr).await;
    let mut uni = conn.open_uni().await.unwrap();
    uni.send(&[0xff; 64]).await.unwrap();
    let _ = uni.finish();
    reasons.push(wait_closed(&conn).await);
    // 3. A valid Hello, then a Commit whose chunks never come; 4. a Commit out of order.
    for (epoch, chunk_count, page_count) in [(1, 3, 10), (99, 0, 0)] {
        let (_ep, conn, mut tx) = welcomed(d, addr).await;
        let commit = Message::Commit(understudy_protocol::Commit {
            epoch,
            chunk_count,
            page_count,
            digest: understudy_protocol::Digest([7; 32]),
            state: Vec::new(),
        });
        messages::send(&mut tx, &commit).await.unwrap();
        reasons.push(wait_closed(&conn).await);
    }
    reasons
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn real_primary(d: &Path, port: u16, dump: &Path) -> Proc {
    Proc::spawn(
        d,
        "primary",
        &s(&[
            "primary",
            "--certs",
            &d.join("certs").display().to_string(),
            "--backup",
            &format!("127.0.0.1:{port}"),
            "--workload",
            "ledger",
            "--memory",
            "64M",
            "--epochs",
            "60",
            "--dump-dir",
            &dump.display().to_string(),
        ]),
    )
}

fn assert_same_images(d: &Path) {
    let a = std::fs::read(d.join("pdump/memory.img")).unwrap();
    let b = std::fs::read(d.join("bdump/memory.img")).unwrap();
    assert_eq!(a.len(), 64 << 20);
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "images differ at byte {first_diff:?}");
    let sa = std::fs::read(d.join("pdump/state.bin")).unwrap();
    let sb = std::fs::read(d.join("bdump/state.bin")).unwrap();
    assert_eq!(sa, sb, "state blobs differ");
}

#[test]
fn hostile_frames_are_refused_and_the_real_primary_is_served_after_them() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(&d.join("certs"), &["primary", "backup"]);
    let port = free_port();
    let b = backup(d, port, &d.join("bdump"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let reasons = runtime().block_on(attacks(d, addr));
    println!("close reasons: {reasons:#?}");
    let log = b.err();
    for needle in [
        "undecodable Hello",
        "undecodable chunk frame",
        "announced 3 chunks, 0 arrived",
        "Commit for epoch 99 while expecting 1",
    ] {
        assert!(
            log.contains(needle),
            "the backup does not log {needle:?}:\n{log}"
        );
    }
    assert!(
        !log.contains("committed epoch"),
        "something was applied:\n{log}"
    );
    // The real primary: served normally, its image byte-identical at the end.
    let mut p = real_primary(d, port, &d.join("pdump"));
    assert!(p.wait(Duration::from_secs(120)).success(), "{}", p.err());
    b.wait_for("dumped image", Duration::from_secs(20));
    assert_same_images(d);
}

#[test]
fn a_second_connection_is_refused_as_busy_while_a_primary_is_served() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(&d.join("certs"), &["primary", "backup"]);
    let port = free_port();
    let b = backup(d, port, &d.join("bdump"));
    let mut p = real_primary(d, port, &d.join("pdump"));
    p.wait_for("PROTECTED: the backup committed", Duration::from_secs(60));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The refusal arrives during the connection's admission: connect fails, saying why.
    let reason = runtime().block_on(async {
        let id = Identity::load(&TlsFiles::in_dir(&d.join("certs"), "primary")).unwrap();
        let ep = Endpoint::client(
            "127.0.0.1:0".parse().unwrap(),
            &id,
            &TransportOptions::default(),
        )
        .unwrap();
        match ep.connect(addr, "backup").await {
            Ok(conn) => wait_closed(&conn).await,
            Err(e) => format!("{e:?}"),
        }
    });
    assert!(reason.contains("busy"), "{reason}");
    assert!(p.wait(Duration::from_secs(120)).success(), "{}", p.err());
    b.wait_for("dumped image", Duration::from_secs(20));
    assert!(b.err().contains("already serves a primary"), "{}", b.err());
    assert_same_images(d);
}
