//! Frames, messages, versions and the handshake.

mod common;

use proptest::prelude::*;
use understudy_protocol::frame::{begin_frame, decode_frame, finish_frame};
use understudy_protocol::{
    answer_hello, Ack, Commit, Demand, Digest, EpochDigest, Evict, FrameDecoder, FrameError,
    FrameKind, Goodbye, GoodbyeReason, Heartbeat, Hello, Lease, LeaseReply, Limits, LocalEnd,
    MemoryLayout, Message, Mode, PageTree, Promote, Region, Reject, RejectCode, Successor, Welcome,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

fn digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest)
}

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 _.\u{e9}\u{4e2d}-]{0,40}"
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        1u16..4,
        0u16..3,
        prop_oneof![
            Just(Mode::Protect),
            Just(Mode::Migrate),
            Just(Mode::Postcopy)
        ],
        text(),
        prop::collection::vec((0u64..1 << 20, 1u64..1 << 16), 0..5),
        prop::option::of((any::<u64>(), digest())),
    )
        .prop_map(|(min, span, mode, vm_id, regions, base)| Hello {
            min_version: min,
            max_version: min + span,
            mode,
            vm_id,
            layout: MemoryLayout {
                regions: regions
                    .into_iter()
                    .map(|(g, p)| Region {
                        gpa: g * 4096,
                        pages: p,
                    })
                    .collect(),
            },
            base: base.map(|(epoch, digest)| EpochDigest { epoch, digest }),
        })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        hello().prop_map(Message::Hello),
        (1u16..3, any::<bool>(), any::<u64>(), digest()).prop_map(
            |(version, resumed, epoch, digest)| {
                Message::Welcome(Welcome {
                    version,
                    resumed,
                    epoch,
                    digest,
                })
            }
        ),
        (
            prop_oneof![
                Just(RejectCode::Version),
                Just(RejectCode::Layout),
                Just(RejectCode::Other)
            ],
            text()
        )
            .prop_map(|(code, reason)| Message::Reject(Reject { code, reason })),
        (
            any::<u64>(),
            0u32..1000,
            0u32..100_000,
            digest(),
            prop::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(
                |(epoch, chunk_count, page_count, digest, state)| Message::Commit(Commit {
                    epoch,
                    chunk_count,
                    page_count,
                    digest,
                    state
                })
            ),
        any::<u64>().prop_map(|epoch| Message::Ack(Ack { epoch })),
        any::<[u64; 3]>().prop_map(|[a, b, c]| Message::Heartbeat(Heartbeat {
            sent_ns: a,
            echo_ns: b,
            hold_ns: c
        })),
        any::<u64>().prop_map(|epoch| Message::Promote(Promote { epoch })),
        (
            text(),
            text(),
            any::<u32>(),
            any::<u64>(),
            prop_oneof![
                Just(Successor::Any),
                Just(Successor::Nobody),
                text().prop_map(Successor::Only)
            ]
        )
            .prop_map(|(vm_id, holder, ttl_ms, seq, successor)| {
                Message::Lease(Lease {
                    vm_id,
                    holder,
                    ttl_ms,
                    seq,
                    successor,
                })
            }),
        (any::<bool>(), text(), any::<u32>(), any::<u64>()).prop_map(
            |(granted, holder, ttl_ms, seq)| Message::LeaseReply(LeaseReply {
                granted,
                holder,
                ttl_ms,
                seq,
            })
        ),
        any::<u64>().prop_map(|final_epoch| Message::Evict(Evict { final_epoch })),
        proptest::collection::vec(0u32..(1 << 22), 0..64)
            .prop_map(|pages| Message::Demand(Demand { pages })),
        (
            prop_oneof![Just(GoodbyeReason::Done), Just(GoodbyeReason::Error)],
            text()
        )
            .prop_map(|(reason, text)| Message::Goodbye(Goodbye { reason, text })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(256), ..ProptestConfig::default() })]

    /// Messages survive encode -> arbitrary splits -> decode, in both accepted versions.
    #[test]
    fn messages_roundtrip_in_pieces(
        msgs in prop::collection::vec(message(), 1..6),
        cuts in prop::collection::vec(any::<u16>(), 0..8),
        old in any::<bool>(),
    ) {
        let version = if old { MIN_PROTOCOL_VERSION } else { PROTOCOL_VERSION };
        let mut bytes = Vec::new();
        for m in &msgs {
            m.encode_version(version, &mut bytes);
        }
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c as usize % (bytes.len() + 1)).collect();
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let mut d = FrameDecoder::new(Limits::default());
        let mut got = Vec::new();
        let mut at = 0;
        for c in cuts {
            d.push(&bytes[at..c]);
            at = c;
            while let Some(m) = d.next().unwrap() {
                got.push(m);
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(d.buffered(), 0);
    }

    /// Arbitrary bytes never panic the frame decoder, and it stops at the first error.
    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400), magic in any::<bool>()) {
        let mut d = FrameDecoder::new(Limits::default());
        if magic {
            d.push(b"USTD");
        }
        d.push(&bytes);
        let mut failed = false;
        for _ in 0..8 {
            match d.next() {
                Ok(Some(_)) => prop_assert!(!failed),
                Ok(None) => break,
                Err(FrameError::Poisoned) => prop_assert!(failed),
                Err(_) => failed = true,
            }
        }
    }

    /// Arbitrary payloads behind a valid header and CRC never panic the message decoders.
    #[test]
    fn any_payload_of_any_kind(kind in 1u16..=10, version in 1u16..=9, payload in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut f = Vec::new();
        let start = begin_frame(&mut f, version, FrameKind::from_wire(kind).unwrap());
        f.extend_from_slice(&payload);
        finish_frame(&mut f, start).unwrap();
        let _ = decode_frame(&f, &Limits::default());
    }
}

fn backup_end() -> LocalEnd {
    LocalEnd::new("vm-a")
}

fn hello_for(min: u16, max: u16) -> Hello {
    Hello {
        min_version: min,
        max_version: max,
        mode: Mode::Protect,
        vm_id: "vm-a".into(),
        layout: MemoryLayout::flat(4096),
        base: None,
    }
}

fn reject_of(m: Message) -> Reject {
    match m {
        Message::Reject(r) => r,
        other => panic!("expected a Reject, got {other:?}"),
    }
}

#[test]
fn unknown_newer_version_gets_an_actionable_reject() {
    // A Hello frame of a future version 7, with fields appended that this build does not know.
    let mut encoded = Vec::new();
    Message::Hello(hello_for(7, 7)).encode_version(7, &mut encoded);
    let mut bytes = Vec::new();
    let s = begin_frame(&mut bytes, 7, FrameKind::Hello);
    bytes.extend_from_slice(&encoded[16..]);
    bytes.extend_from_slice(&[1, 2, 3, 4]);
    finish_frame(&mut bytes, s).unwrap();

    let mut d = FrameDecoder::new(Limits::default());
    d.push(&bytes);
    let Some(Message::Hello(h)) = d.next().unwrap() else {
        panic!("a Hello of any version is readable")
    };
    let r = reject_of(answer_hello(&h, &backup_end()));
    assert_eq!(r.code, RejectCode::Version);
    assert_eq!(
        r.reason,
        "protocol version 7 is not supported by this backup (it speaks 2..3); upgrade the backup"
    );
    // And through the wire, the Reject reaches the primary intact.
    let mut out = Vec::new();
    Message::Reject(r.clone()).encode(&mut out);
    assert_eq!(
        decode_frame(&out, &Limits::default()).unwrap(),
        Message::Reject(r)
    );
}

#[test]
fn version_ranges_negotiate_or_reject() {
    let end = backup_end();
    let w = |m| match m {
        Message::Welcome(w) => w,
        other => panic!("{other:?}"),
    };
    assert_eq!(w(answer_hello(&hello_for(1, 3), &end)).version, 3);
    assert_eq!(w(answer_hello(&hello_for(2, 3), &end)).version, 3);
    // A primary of the previous version: the session goes on at version 2 (downgrade).
    assert_eq!(w(answer_hello(&hello_for(1, 2), &end)).version, 2);
    assert_eq!(w(answer_hello(&hello_for(2, 2), &end)).version, 2);
    assert_eq!(w(answer_hello(&hello_for(3, 9), &end)).version, 3);
    let r = reject_of(answer_hello(&hello_for(4, 5), &end));
    assert!(
        r.reason
            .contains("protocol versions 4..5 are not supported"),
        "{}",
        r.reason
    );
    assert!(r.reason.ends_with("upgrade the backup"));
    // Version 1 is no longer spoken.
    let r = reject_of(answer_hello(&hello_for(1, 1), &end));
    assert_eq!(r.code, RejectCode::Version);
    assert!(r.reason.ends_with("upgrade the primary"), "{}", r.reason);
    let mut old_backup = backup_end();
    old_backup.min_version = 3;
    let r = reject_of(answer_hello(&hello_for(2, 2), &old_backup));
    assert!(r.reason.ends_with("upgrade the primary"), "{}", r.reason);
}

#[test]
fn unsupported_frame_version_maps_to_reject() {
    let mut bytes = Vec::new();
    Message::Ack(Ack { epoch: 3 }).encode_version(9, &mut bytes);
    let mut d = FrameDecoder::new(Limits::default());
    d.push(&bytes);
    let err = d.next().unwrap_err();
    assert!(matches!(err, FrameError::UnsupportedVersion { version: 9 }));
    let r = err.reject();
    assert_eq!(r.code, RejectCode::Version);
    assert!(
        r.reason.contains("protocol version 9 is not supported"),
        "{}",
        r.reason
    );
    assert!(r.reason.contains("upgrade"));
    assert!(matches!(d.next(), Err(FrameError::Poisoned)));
    // Version 1 is no longer spoken: its frames (but Hello) are refused the same way.
    let mut bytes = Vec::new();
    Message::Ack(Ack { epoch: 3 }).encode_version(1, &mut bytes);
    let err = decode_frame(&bytes, &Limits::default()).unwrap_err();
    assert!(matches!(err, FrameError::UnsupportedVersion { version: 1 }));
    assert_eq!(err.reject().code, RejectCode::Version);
    // Version 0 is never valid, not even for Hello.
    let mut bytes = Vec::new();
    Message::Hello(hello_for(1, 2)).encode_version(0, &mut bytes);
    assert!(decode_frame(&bytes, &Limits::default()).is_err());
}

#[test]
fn handshake_checks_vm_layout_mode_and_resume() {
    let mut end = backup_end();
    let mut h = hello_for(1, 2);
    h.vm_id = "vm-b".into();
    let r = reject_of(answer_hello(&h, &end));
    assert_eq!(r.code, RejectCode::VmId);
    assert!(r.reason.contains("\"vm-a\", not \"vm-b\""), "{}", r.reason);

    let mut h = hello_for(1, 2);
    h.layout = MemoryLayout::flat(1 << 30);
    let r = reject_of(answer_hello(&h, &end));
    assert_eq!(r.code, RejectCode::Layout);
    assert!(
        r.reason.contains("raise the backup's max_image_pages"),
        "{}",
        r.reason
    );

    end.modes = vec![Mode::Protect];
    let mut h = hello_for(1, 2);
    h.mode = Mode::Migrate;
    assert_eq!(reject_of(answer_hello(&h, &end)).code, RejectCode::Mode);

    // Fresh start: epoch 0, digest of the zero image.
    let h = hello_for(1, 2);
    let Message::Welcome(w) = answer_hello(&h, &end) else {
        panic!()
    };
    assert!(!w.resumed);
    assert_eq!(w.digest, PageTree::zeroed(4096).digest());

    // A primary that offers to resume (any base) learns what the backup holds; the primary
    // decides whether it knows that image. Without the offer: a full sync.
    let held = EpochDigest {
        epoch: 41,
        digest: Digest([9; 32]),
    };
    end.held = Some((MemoryLayout::flat(4096), held));
    let mut h = hello_for(1, 2);
    h.base = Some(EpochDigest {
        epoch: 57,
        digest: Digest([3; 32]),
    });
    let Message::Welcome(w) = answer_hello(&h, &end) else {
        panic!()
    };
    assert!(w.resumed);
    assert_eq!((w.epoch, w.digest), (41, held.digest));
    h.base = None;
    let Message::Welcome(w) = answer_hello(&h, &end) else {
        panic!()
    };
    assert!(!w.resumed);
    assert_eq!(w.epoch, 0);
    h.base = Some(held);
    // A base with another layout than the held image: say which to fix.
    h.layout = MemoryLayout::flat(2048);
    let r = reject_of(answer_hello(&h, &end));
    assert_eq!(r.code, RejectCode::Layout);
    assert!(r.reason.contains("1 region / 2048 pages"), "{}", r.reason);
}

#[test]
fn heartbeat_rtt() {
    let a1 = Heartbeat {
        sent_ns: 1_000,
        echo_ns: 0,
        hold_ns: 0,
    };
    assert_eq!(a1.rtt_ns(5_000), None);
    // B got it at its 70_000, replies at its 70_300.
    let b1 = Heartbeat::reply(&a1, 70_000, 70_300);
    // A receives B's reply at 1_900: RTT = 1_900 - 1_000 - 300.
    assert_eq!(b1.rtt_ns(1_900), Some(600));
}

#[test]
fn limits_reject_before_buffering() {
    let limits = Limits {
        max_frame_len: 1000,
        max_state_len: 100,
        max_text_len: 10,
        max_regions: 2,
        ..Limits::default()
    };
    // A header announcing a long frame fails as soon as the header is in.
    let mut bytes = Vec::new();
    let s = begin_frame(&mut bytes, PROTOCOL_VERSION, FrameKind::Commit);
    bytes.resize(bytes.len() + 2000, 0);
    finish_frame(&mut bytes, s).unwrap();
    let mut d = FrameDecoder::new(limits.clone());
    d.push(&bytes[..16]);
    assert!(matches!(
        d.next(),
        Err(FrameError::TooLong {
            len: 2000,
            max: 1000
        })
    ));

    let big_state = Message::Commit(Commit {
        epoch: 1,
        chunk_count: 0,
        page_count: 0,
        digest: Digest::default(),
        state: vec![0; 101],
    });
    let mut bytes = Vec::new();
    big_state.encode(&mut bytes);
    assert!(decode_frame(&bytes, &limits).is_err());

    let mut h = hello_for(1, 2);
    h.vm_id = "x".repeat(11);
    let mut bytes = Vec::new();
    Message::Hello(h).encode(&mut bytes);
    assert!(decode_frame(&bytes, &limits).is_err());

    let mut h = hello_for(1, 2);
    h.layout.regions = vec![Region { gpa: 0, pages: 1 }; 3];
    let mut bytes = Vec::new();
    Message::Hello(h).encode(&mut bytes);
    assert!(decode_frame(&bytes, &limits).is_err());

    // Invalid = 0 is rejected in every enum.
    let mut h = hello_for(1, 2);
    h.mode = Mode::Invalid;
    let mut bytes = Vec::new();
    Message::Hello(h).encode(&mut bytes);
    assert!(decode_frame(&bytes, &Limits::default()).is_err());
    let mut bytes = Vec::new();
    let s = begin_frame(&mut bytes, PROTOCOL_VERSION, FrameKind::Invalid);
    finish_frame(&mut bytes, s).unwrap();
    assert!(matches!(
        decode_frame(&bytes, &Limits::default()),
        Err(FrameError::InvalidKind(0))
    ));
}
