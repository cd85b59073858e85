//! Loopback throughput of the transport: one process, a server and a client endpoint on
//! 127.0.0.1, frames pushed over unidirectional streams, MB/s printed at the end.
//!
//! ```text
//! cargo run --release -p understudy-transport --example throughput -- [MiB] [streams] [frame KiB]
//! ```
//!
//! Defaults: 1024 MiB over 1 stream in 256 KiB frames; `UNDERSTUDY_MAX_UDP_PAYLOAD` overrides
//! [`TransportOptions::max_udp_payload`]. Not a test: numbers depend on the machine
//! and on whatever else runs on it.

use std::time::Instant;

use understudy_transport::certs::{self, CaOptions};
use understudy_transport::{Bytes, Endpoint, Identity, TlsFiles, TransportOptions, Validity};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>());
    let total_mib = args.next().transpose()?.unwrap_or(1024);
    let streams = args.next().transpose()?.unwrap_or(1).max(1);
    let frame_kib = args.next().transpose()?.unwrap_or(256).max(1);
    let frame_len = usize::try_from(frame_kib * 1024)?;
    let frames_per_stream = (total_mib * 1024 / frame_kib).div_ceil(streams);

    let dir = tempfile::tempdir()?;
    certs::init_ca(dir.path(), &CaOptions::default())?;
    for name in ["primary", "backup"] {
        certs::issue(dir.path(), name, Validity::node_default())?;
    }
    // UNDERSTUDY_MAX_UDP_PAYLOAD=8952 shows what a jumbo-frame link would gain (loopback
    // carries 64 KiB datagrams).
    let mut opts = TransportOptions::default();
    if let Ok(payload) = std::env::var("UNDERSTUDY_MAX_UDP_PAYLOAD") {
        opts.max_udp_payload = payload.parse()?;
    }
    let backup = Identity::load(&TlsFiles::in_dir(dir.path(), "backup"))?;
    let primary = Identity::load(&TlsFiles::in_dir(dir.path(), "primary"))?;
    let server = Endpoint::server("127.0.0.1:0".parse()?, &backup, &opts)?;
    let client = Endpoint::client("127.0.0.1:0".parse()?, &primary, &opts)?;
    let addr = server.local_addr()?;

    let receiver = tokio::spawn(async move {
        let conn = server.accept().await.expect("endpoint open")?;
        let mut tasks = Vec::new();
        for _ in 0..streams {
            let mut reader = conn.accept_uni(u32::try_from(frame_len)?).await?;
            tasks.push(tokio::spawn(async move {
                let mut bytes = 0u64;
                while let Some(frame) = reader.read_frame().await? {
                    bytes += frame.len() as u64;
                }
                Ok::<_, understudy_transport::RecvFrameError>(bytes)
            }));
        }
        let mut bytes = 0;
        for task in tasks {
            bytes += task.await??;
        }
        // Keep the connection until the client has seen every stream acknowledged.
        conn.closed().await;
        Ok::<_, BoxError>(bytes)
    });

    let conn = client.connect(addr, "backup").await?;
    let payload = Bytes::from(vec![0xa5u8; frame_len]);
    let start = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..streams {
        let conn = conn.clone();
        let payload = payload.clone();
        senders.push(tokio::spawn(async move {
            let mut sender = conn.open_uni().await?;
            for _ in 0..frames_per_stream {
                sender.send_bytes(payload.clone()).await?;
            }
            sender.finish()?;
            sender.finished().await?;
            Ok::<_, BoxError>(())
        }));
    }
    for sender in senders {
        sender.await??;
    }
    let elapsed = start.elapsed();
    let stats = conn.stats();
    conn.close(0, "done");
    let bytes = receiver.await??;
    client.wait_idle().await;

    let mb_per_s = bytes as f64 / 1e6 / elapsed.as_secs_f64();
    println!(
        "{} MiB over {streams} stream(s) in {frame_kib} KiB frames: {:.2} s, {mb_per_s:.0} MB/s",
        bytes >> 20,
        elapsed.as_secs_f64()
    );
    println!(
        "sender: {} packets, {} lost, {} congestion events, path MTU {}, cwnd {} KiB, rtt {:?}",
        stats.path.sent_packets,
        stats.path.lost_packets,
        stats.path.congestion_events,
        stats.path.current_mtu,
        stats.path.cwnd >> 10,
        stats.path.rtt
    );
    Ok(())
}
