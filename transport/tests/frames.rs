//! Length-delimited frames over real QUIC streams: limits, clean ends, truncation.

mod common;

use common::{pair, Pki};
use understudy_transport::stream::STOP_FRAME_TOO_LARGE;
use understudy_transport::{RecvFrameError, SendFrameError};

#[tokio::test]
async fn oversize_length_prefix_is_rejected_without_allocating() {
    let pki = Pki::new();
    let (client, server, _c, _s) = pair(&pki).await;
    let mut sender = client.open_uni().await.unwrap();
    // A length prefix announcing ~4 GiB, followed by a few bytes. Were the reader to trust it,
    // it would allocate 4 GiB and then wait for bytes that never come.
    let raw = sender.stream_mut();
    raw.write_all(&0xFFFF_FFF0u32.to_be_bytes()).await.unwrap();
    raw.write_all(b"tiny").await.unwrap();
    let mut reader = server.accept_uni(1 << 20).await.unwrap();
    match reader.read_frame().await {
        Err(RecvFrameError::TooLarge { len, max }) => {
            assert_eq!(len, 0xFFFF_FFF0);
            assert_eq!(max, 1 << 20);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // The reader is out of sync now and says so.
    assert!(matches!(
        reader.read_frame().await,
        Err(RecvFrameError::Poisoned)
    ));
    let text = RecvFrameError::TooLarge { len: 5, max: 4 }.to_string();
    assert_eq!(text, "peer sent a 5-byte frame, more than the 4-byte limit");
}

#[tokio::test]
async fn oversize_frame_stops_the_sender() {
    let pki = Pki::new();
    let (client, server, _c, _s) = pair(&pki).await;
    // Larger than the stream receive window, so the sender blocks until the reader stops it.
    let big = vec![1u8; 32 << 20];
    let send = tokio::spawn(async move {
        let mut sender = client.open_uni().await.unwrap();
        sender.send(&big).await
    });
    let mut reader = server.accept_uni(1 << 20).await.unwrap();
    assert!(matches!(
        reader.read_frame().await,
        Err(RecvFrameError::TooLarge { len, .. }) if len == 32 << 20
    ));
    match send.await.unwrap() {
        Err(SendFrameError::Stopped { code }) => assert_eq!(code, u64::from(STOP_FRAME_TOO_LARGE)),
        other => panic!("expected Stopped, got {other:?}"),
    }
}

#[tokio::test]
async fn frame_at_the_limit_is_accepted() {
    let pki = Pki::new();
    let (client, server, _c, _s) = pair(&pki).await;
    let mut sender = client.open_uni().await.unwrap();
    let payload: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    sender.send(&payload).await.unwrap();
    sender.send(&[]).await.unwrap();
    sender.finish().unwrap();
    let mut reader = server.accept_uni(4096).await.unwrap();
    assert_eq!(
        reader.read_frame().await.unwrap().as_deref(),
        Some(&payload[..])
    );
    assert_eq!(reader.read_frame().await.unwrap().as_deref(), Some(&[][..]));
    assert_eq!(reader.read_frame().await.unwrap(), None);
}

#[tokio::test]
async fn stream_ending_inside_a_frame_is_truncated() {
    let pki = Pki::new();
    let (client, server, _c, _s) = pair(&pki).await;
    let mut sender = client.open_uni().await.unwrap();
    let raw = sender.stream_mut();
    raw.write_all(&100u32.to_be_bytes()).await.unwrap();
    raw.write_all(&[0u8; 60]).await.unwrap();
    sender.finish().unwrap();
    let mut reader = server.accept_uni(1024).await.unwrap();
    match reader.read_frame().await {
        Err(RecvFrameError::Truncated { expected, got }) => {
            assert_eq!((expected, got), (100, 60));
        }
        other => panic!("expected Truncated, got {other:?}"),
    }

    // Inside the length prefix.
    let mut sender = client.open_uni().await.unwrap();
    sender.stream_mut().write_all(&[0, 0]).await.unwrap();
    sender.finish().unwrap();
    let mut reader = server.accept_uni(1024).await.unwrap();
    assert!(matches!(
        reader.read_frame().await,
        Err(RecvFrameError::Truncated {
            expected: 4,
            got: 2
        })
    ));
}

#[tokio::test]
async fn reset_stream_is_reported_with_its_code() {
    let pki = Pki::new();
    let (client, server, _c, _s) = pair(&pki).await;
    let mut sender = client.open_uni().await.unwrap();
    sender.send(b"first").await.unwrap();
    let mut reader = server.accept_uni(1024).await.unwrap();
    assert_eq!(
        reader.read_frame().await.unwrap().as_deref(),
        Some(&b"first"[..])
    );
    sender.reset(7);
    assert!(matches!(
        reader.read_frame().await,
        Err(RecvFrameError::Reset { code: 7 })
    ));
}

#[tokio::test]
async fn closed_connection_fails_streams() {
    let pki = Pki::new();
    let (client, server, _c, _s) = pair(&pki).await;
    client.close(3, "shutting down");
    let err = server.accept_uni(1024).await.unwrap_err();
    match err.0 {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code.into_inner(), 3);
            assert_eq!(&close.reason[..], b"shutting down");
        }
        other => panic!("expected ApplicationClosed, got {other:?}"),
    }
}

#[tokio::test]
async fn large_frames_arrive_intact() {
    let pki = Pki::new();
    let (client, server, _c, _s) = pair(&pki).await;
    // Several MiB per frame: each arrives in many QUIC packets and is reassembled.
    let frames: Vec<Vec<u8>> = (0..4u32)
        .map(|n| {
            (0..(3 << 20) + n)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
                .collect()
        })
        .collect();
    let send = tokio::spawn({
        let frames = frames.clone();
        async move {
            let mut sender = client.open_uni().await.unwrap();
            for frame in &frames {
                sender.send(frame).await.unwrap();
            }
            sender.finish().unwrap();
            sender.finished().await.unwrap();
        }
    });
    let mut reader = server.accept_uni(4 << 20).await.unwrap();
    for frame in &frames {
        let got = reader.read_frame().await.unwrap().expect("frame");
        assert_eq!(got.len(), frame.len());
        assert!(got[..] == frame[..]);
    }
    assert_eq!(reader.read_frame().await.unwrap(), None);
    send.await.unwrap();
}
