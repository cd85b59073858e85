//! Protocol messages over transport frames: one `understudy-protocol` frame (header included)
//! per transport frame, so a stream carries a sequence of whole messages.

use understudy_protocol::{FrameError, Limits, Message};

use crate::stream::{FrameSender, SendFrameError};

/// Why a received frame is not one message.
#[derive(Debug, thiserror::Error)]
pub enum MessageDecodeError {
    /// The bytes are not a valid frame.
    #[error("malformed message")]
    Frame(#[from] FrameError),
}

/// Encodes `msg` as one protocol frame.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    msg.encode(&mut out);
    out
}

/// Decodes exactly one message from a transport frame, within `limits` (missing or extra
/// bytes are an error).
pub fn decode(frame: &[u8], limits: &Limits) -> Result<Message, MessageDecodeError> {
    Ok(understudy_protocol::frame::decode_frame(frame, limits)?)
}

/// Sends `msg` as one frame.
pub async fn send(sender: &mut FrameSender, msg: &Message) -> Result<(), SendFrameError> {
    sender.send(&encode(msg)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use understudy_protocol::{Commit, Digest};

    #[test]
    fn a_commit_with_a_state_blob_round_trips() {
        let limits = Limits::default();
        for n in [0, 100, 7000, 70_000] {
            let msg = Message::Commit(Commit {
                epoch: 5,
                chunk_count: 3,
                page_count: 9,
                digest: Digest::default(),
                state: vec![7; n],
            });
            assert_eq!(
                decode(&encode(&msg), &limits).unwrap(),
                msg,
                "state of {n} bytes"
            );
        }
    }
}
