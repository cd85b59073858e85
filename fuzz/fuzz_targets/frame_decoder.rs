//! Raw bytes, pushed in pieces, into `FrameDecoder`: never panics, stops at the first error,
//! and every message it yields re-encodes to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_protocol::frame::decode_frame;
use understudy_protocol::{FrameDecoder, FrameError, Limits, Message, Mode};

fn limits() -> Limits {
    Limits {
        max_frame_len: 1 << 16,
        ..Limits::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step % 64) + 1;
    let mut d = FrameDecoder::new(limits());
    let mut failed = false;
    for piece in rest.chunks(step) {
        d.push(piece);
        loop {
            match d.next() {
                Ok(Some(m)) => {
                    assert!(!failed);
                    // A Hello of a future version is read leniently; it need not re-encode.
                    if matches!(&m, Message::Hello(h) if h.mode == Mode::Invalid) {
                        continue;
                    }
                    let mut again = Vec::new();
                    m.encode(&mut again);
                    assert_eq!(decode_frame(&again, &limits()).unwrap(), m);
                }
                Ok(None) => break,
                Err(FrameError::Poisoned) => {
                    assert!(failed);
                    break;
                }
                Err(e) => {
                    failed = true;
                    let r = e.reject();
                    assert!(!r.reason.is_empty());
                    break;
                }
            }
        }
    }
});
