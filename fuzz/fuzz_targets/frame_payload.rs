//! Any payload behind a valid header and CRC, for every kind and several versions: the message
//! decoders never panic, what decodes re-encodes byte for byte (the encoding is canonical), and
//! a decoded `Hello` always gets a `Welcome` in both ends' version ranges or a `Reject` with a
//! reason.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_protocol::frame::{begin_frame, decode_frame, finish_frame};
use understudy_protocol::{
    answer_hello, FrameKind, Limits, LocalEnd, MemoryLayout, Message, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};

fuzz_target!(|data: &[u8]| {
    let [kind, version, flags, payload @ ..] = data else {
        return;
    };
    let Some(kind) = FrameKind::from_wire(u16::from(*kind % 11)) else {
        return;
    };
    let version = u16::from(*version % 8);
    let mut frame = Vec::new();
    let start = begin_frame(&mut frame, version, kind);
    frame.extend_from_slice(payload);
    finish_frame(&mut frame, start).unwrap();
    let limits = Limits {
        max_frame_len: 1 << 16,
        max_text_len: 64,
        max_regions: 8,
        ..Limits::default()
    };
    let Ok(msg) = decode_frame(&frame, &limits) else {
        return;
    };
    if version <= PROTOCOL_VERSION {
        let mut again = Vec::new();
        msg.encode_version(version, &mut again);
        assert_eq!(again, frame, "non-canonical encoding of {:?}", msg.kind());
    }
    if let Message::Hello(h) = &msg {
        let mut end = LocalEnd::new("vm");
        // This build's range, or only its newest version.
        end.min_version = MIN_PROTOCOL_VERSION + u16::from(flags & 1);
        end.limits = limits.clone();
        if flags & 2 != 0 {
            end.held = Some((
                MemoryLayout::flat(64),
                understudy_protocol::EpochDigest {
                    epoch: 3,
                    digest: understudy_protocol::Digest([7; 32]),
                },
            ));
        }
        match answer_hello(h, &end) {
            Message::Welcome(w) => {
                assert!(w.version >= h.min_version.max(end.min_version));
                assert!(w.version <= h.max_version.min(end.max_version));
                assert_eq!(h.vm_id, "vm");
            }
            Message::Reject(r) => assert!(!r.reason.is_empty()),
            other => panic!("handshake answered {other:?}"),
        }
    }
});
