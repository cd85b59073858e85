//! Length-delimited frames over QUIC streams.
//!
//! A stream carries a sequence of frames. Each frame is a big-endian `u32` length followed by
//! that many bytes of payload; the transport never looks inside the payload (the `protocol`
//! crate defines what it means):
//!
//! ```text
//!  0               4                                   4 + len
//!  +---------------+-----------------------------------+---------------+----
//!  | len (u32, BE) | payload (len bytes)               | len (u32, BE) | ...
//!  +---------------+-----------------------------------+---------------+----
//! ```
//!
//! A stream that ends exactly at a frame boundary ends cleanly ([`FrameReader::read_frame`]
//! returns `Ok(None)`); one that ends inside a frame is an error. Empty frames are allowed.
//!
//! The reader sets a maximum frame length. A length prefix above it is rejected before anything
//! is allocated, and the reader then stops the stream with [`STOP_FRAME_TOO_LARGE`] so the
//! sender's next write fails instead of filling the window with bytes nobody will read.
//!
//! Streams:
//! - unidirectional: [`open_uni`] gives a [`FrameSender`], [`accept_uni`] a [`FrameReader`]
//!   (bulk page data, one stream per batch or per worker);
//! - bidirectional: [`ControlChannel`] wraps one stream in both directions for control messages.
//!   QUIC tells the peer about a new stream only when data arrives on it, so the side that
//!   opens a control channel must send the first frame.

use bytes::{Bytes, BytesMut};
use quinn::{ConnectionError, RecvStream, SendStream, VarInt};
use thiserror::Error;

/// Size of the length prefix in bytes.
pub const FRAME_HEADER_LEN: usize = 4;

/// Application error code with which a reader stops a stream after rejecting an oversize frame.
pub const STOP_FRAME_TOO_LARGE: u32 = 0x46_52; // "FR"

/// Why a frame could not be sent.
#[derive(Debug, Error)]
pub enum SendFrameError {
    /// The payload does not fit the `u32` length prefix.
    #[error("frame of {len} bytes does not fit the 32-bit length prefix")]
    TooLarge {
        /// Payload length.
        len: usize,
    },
    /// The peer stopped reading this stream; `code` is its reason
    /// ([`STOP_FRAME_TOO_LARGE`] if it rejected a frame as too large).
    #[error("the peer stopped reading this stream (code {code})")]
    Stopped {
        /// The peer's stop code.
        code: u64,
    },
    /// The connection is gone.
    #[error("connection lost while sending a frame")]
    ConnectionLost(#[source] ConnectionError),
    /// The stream was already finished or reset by us.
    #[error("the stream is already finished")]
    Finished,
}

impl From<quinn::WriteError> for SendFrameError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(code) => Self::Stopped {
                code: code.into_inner(),
            },
            quinn::WriteError::ConnectionLost(e) => Self::ConnectionLost(e),
            quinn::WriteError::ClosedStream | quinn::WriteError::ZeroRttRejected => Self::Finished,
        }
    }
}

/// Why a frame could not be received.
#[derive(Debug, Error)]
pub enum RecvFrameError {
    /// The length prefix exceeds the reader's limit. Nothing was allocated for it, and the stream
    /// has been stopped.
    #[error("peer sent a {len}-byte frame, more than the {max}-byte limit")]
    TooLarge {
        /// The announced payload length.
        len: u64,
        /// The reader's limit.
        max: u32,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({got} of {expected} bytes)")]
    Truncated {
        /// Bytes the current part (length prefix or payload) needed.
        expected: usize,
        /// Bytes that arrived before the end.
        got: usize,
    },
    /// The peer reset the stream with an application error code.
    #[error("the peer abandoned the stream (code {code})")]
    Reset {
        /// The peer's reset code.
        code: u64,
    },
    /// The connection is gone.
    #[error("connection lost while receiving a frame")]
    ConnectionLost(#[source] ConnectionError),
    /// A previous frame on this stream failed; the stream is no longer in sync.
    #[error("an earlier frame on this stream was rejected; the stream is unusable")]
    Poisoned,
}

/// Why a stream could not be opened.
#[derive(Debug, Error)]
#[error("cannot open a stream: the connection is gone")]
pub struct OpenStreamError(#[source] pub ConnectionError);

/// Why no stream could be accepted. A peer that closed the connection normally shows up as
/// [`ConnectionError::ApplicationClosed`].
#[derive(Debug, Error)]
#[error("no more streams: the connection is gone")]
pub struct AcceptStreamError(#[source] pub ConnectionError);

fn header(len: usize) -> Result<[u8; FRAME_HEADER_LEN], SendFrameError> {
    u32::try_from(len)
        .map(u32::to_be_bytes)
        .map_err(|_| SendFrameError::TooLarge { len })
}

/// Sends one frame (length prefix, then `payload`) on `stream`.
pub async fn send_frame(stream: &mut SendStream, payload: &[u8]) -> Result<(), SendFrameError> {
    let header = header(payload.len())?;
    stream.write_all(&header).await?;
    stream.write_all(payload).await?;
    Ok(())
}

/// Sends one frame whose payload is already in a [`Bytes`], without copying it.
pub async fn send_frame_bytes(
    stream: &mut SendStream,
    payload: Bytes,
) -> Result<(), SendFrameError> {
    let header = header(payload.len())?;
    let mut chunks = [Bytes::copy_from_slice(&header), payload];
    stream.write_all_chunks(&mut chunks).await?;
    Ok(())
}

/// The sending half of a framed stream.
#[derive(Debug)]
pub struct FrameSender {
    stream: SendStream,
}

impl FrameSender {
    /// Wraps a quinn send stream.
    pub fn new(stream: SendStream) -> Self {
        Self { stream }
    }

    /// Sends one frame.
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), SendFrameError> {
        send_frame(&mut self.stream, payload).await
    }

    /// Sends one frame without copying the payload.
    pub async fn send_bytes(&mut self, payload: Bytes) -> Result<(), SendFrameError> {
        send_frame_bytes(&mut self.stream, payload).await
    }

    /// Ends the stream after the frames already sent. Returns at once; see [`Self::finished`]
    /// to wait for the peer.
    pub fn finish(&mut self) -> Result<(), SendFrameError> {
        self.stream.finish().map_err(|_| SendFrameError::Finished)
    }

    /// Waits until the peer has received everything up to the end of the stream (after
    /// [`Self::finish`]), or stopped reading it.
    pub async fn finished(&mut self) -> Result<(), SendFrameError> {
        match self.stream.stopped().await {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(SendFrameError::Stopped {
                code: code.into_inner(),
            }),
            Err(quinn::StoppedError::ConnectionLost(e)) => Err(SendFrameError::ConnectionLost(e)),
            Err(quinn::StoppedError::ZeroRttRejected) => Err(SendFrameError::Finished),
        }
    }

    /// Abandons the stream: the peer's reader fails with [`RecvFrameError::Reset`].
    pub fn reset(&mut self, code: u32) {
        // Resetting a stream that is already closed is not an error worth reporting.
        let _ = self.stream.reset(VarInt::from_u32(code));
    }

    /// The underlying quinn stream (e.g. to set its priority).
    pub fn stream_mut(&mut self) -> &mut SendStream {
        &mut self.stream
    }

    /// Unwraps the quinn stream.
    pub fn into_inner(self) -> SendStream {
        self.stream
    }
}

/// The receiving half of a framed stream: reads one frame at a time, at most `max_frame_len`
/// bytes each.
#[derive(Debug)]
pub struct FrameReader {
    stream: RecvStream,
    max_frame_len: u32,
    poisoned: bool,
}

impl FrameReader {
    /// Wraps a quinn receive stream; frames longer than `max_frame_len` are rejected.
    pub fn new(stream: RecvStream, max_frame_len: u32) -> Self {
        Self {
            stream,
            max_frame_len,
            poisoned: false,
        }
    }

    /// The largest payload this reader accepts.
    pub fn max_frame_len(&self) -> u32 {
        self.max_frame_len
    }

    /// Reads the next frame. Returns `Ok(None)` when the peer finished the stream at a frame
    /// boundary. After an error the reader is poisoned and every later call fails.
    ///
    /// A frame that arrived in one piece is returned without copying; otherwise its pieces are
    /// copied once into a buffer of exactly the announced length.
    pub async fn read_frame(&mut self) -> Result<Option<Bytes>, RecvFrameError> {
        if self.poisoned {
            return Err(RecvFrameError::Poisoned);
        }
        let result = self.read_frame_inner().await;
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    async fn read_frame_inner(&mut self) -> Result<Option<Bytes>, RecvFrameError> {
        let mut header = [0u8; FRAME_HEADER_LEN];
        let mut got = 0;
        while got < FRAME_HEADER_LEN {
            match self.next_chunk(FRAME_HEADER_LEN - got).await? {
                Some(chunk) => {
                    header[got..got + chunk.len()].copy_from_slice(&chunk);
                    got += chunk.len();
                }
                None if got == 0 => return Ok(None),
                None => {
                    return Err(RecvFrameError::Truncated {
                        expected: FRAME_HEADER_LEN,
                        got,
                    })
                }
            }
        }
        let len = u32::from_be_bytes(header);
        if len > self.max_frame_len {
            // Tell the sender to stop instead of draining a frame we will never read.
            let _ = self.stream.stop(VarInt::from_u32(STOP_FRAME_TOO_LARGE));
            return Err(RecvFrameError::TooLarge {
                len: u64::from(len),
                max: self.max_frame_len,
            });
        }
        // `len <= max_frame_len`: every buffer below is bounded by the caller's limit.
        let len = len as usize;
        if len == 0 {
            return Ok(Some(Bytes::new()));
        }
        let truncated = |got| RecvFrameError::Truncated { expected: len, got };
        let first = self.next_chunk(len).await?.ok_or_else(|| truncated(0))?;
        if first.len() == len {
            return Ok(Some(first));
        }
        let mut payload = BytesMut::with_capacity(len);
        payload.extend_from_slice(&first);
        while payload.len() < len {
            let chunk = self
                .next_chunk(len - payload.len())
                .await?
                .ok_or_else(|| truncated(payload.len()))?;
            payload.extend_from_slice(&chunk);
        }
        Ok(Some(payload.freeze()))
    }

    /// The next piece of the stream, at most `max` bytes; `None` at the end of the stream.
    async fn next_chunk(&mut self, max: usize) -> Result<Option<Bytes>, RecvFrameError> {
        match self.stream.read_chunk(max, true).await {
            Ok(chunk) => Ok(chunk.map(|c| c.bytes)),
            Err(quinn::ReadError::Reset(code)) => Err(RecvFrameError::Reset {
                code: code.into_inner(),
            }),
            Err(quinn::ReadError::ConnectionLost(e)) => Err(RecvFrameError::ConnectionLost(e)),
            Err(_) => Err(RecvFrameError::Poisoned),
        }
    }

    /// Tells the peer we will read no more (its writes fail with `Stopped { code }`).
    pub fn stop(&mut self, code: u32) {
        let _ = self.stream.stop(VarInt::from_u32(code));
    }

    /// Unwraps the quinn stream.
    pub fn into_inner(self) -> RecvStream {
        self.stream
    }
}

/// Send priority of control streams; data streams keep quinn's default, 0.
pub const CONTROL_PRIORITY: i32 = 16;

/// One bidirectional stream carrying frames both ways, for control messages (hello, epoch
/// commits, acks, heartbeats).
#[derive(Debug)]
pub struct ControlChannel {
    sender: FrameSender,
    reader: FrameReader,
}

impl ControlChannel {
    /// Wraps both halves of a bidirectional stream. Its frames go out before chunk data
    /// (stream priority [`CONTROL_PRIORITY`]): heartbeats, commits, acks and lease messages
    /// must not wait behind megabytes of pages, or a busy link (a full sync on a loaded host)
    /// looks like a silent peer and a healthy node is declared failed or fences itself.
    pub fn new(send: SendStream, recv: RecvStream, max_frame_len: u32) -> Self {
        // Only fails on a stream already closed, which the first send reports anyway.
        let _ = send.set_priority(CONTROL_PRIORITY);
        Self {
            sender: FrameSender::new(send),
            reader: FrameReader::new(recv, max_frame_len),
        }
    }

    /// Sends one control frame.
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), SendFrameError> {
        self.sender.send(payload).await
    }

    /// Receives one control frame; `Ok(None)` when the peer finished its side.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, RecvFrameError> {
        self.reader.read_frame().await
    }

    /// Ends our sending side (the peer's `recv` then returns `Ok(None)`).
    pub fn finish(&mut self) -> Result<(), SendFrameError> {
        self.sender.finish()
    }

    /// Splits into halves that separate tasks can own (one sends, one receives).
    pub fn split(self) -> (FrameSender, FrameReader) {
        (self.sender, self.reader)
    }
}

/// Opens a unidirectional stream for sending frames.
pub async fn open_uni(conn: &quinn::Connection) -> Result<FrameSender, OpenStreamError> {
    conn.open_uni()
        .await
        .map(FrameSender::new)
        .map_err(OpenStreamError)
}

/// Waits for the peer to open a unidirectional stream, and reads frames of at most
/// `max_frame_len` bytes from it.
pub async fn accept_uni(
    conn: &quinn::Connection,
    max_frame_len: u32,
) -> Result<FrameReader, AcceptStreamError> {
    conn.accept_uni()
        .await
        .map(|s| FrameReader::new(s, max_frame_len))
        .map_err(AcceptStreamError)
}

/// Opens a control channel. The peer learns about it with the first frame we send.
pub async fn open_control(
    conn: &quinn::Connection,
    max_frame_len: u32,
) -> Result<ControlChannel, OpenStreamError> {
    conn.open_bi()
        .await
        .map(|(send, recv)| ControlChannel::new(send, recv, max_frame_len))
        .map_err(OpenStreamError)
}

/// Waits for the peer to open a control channel (and send its first frame).
pub async fn accept_control(
    conn: &quinn::Connection,
    max_frame_len: u32,
) -> Result<ControlChannel, AcceptStreamError> {
    conn.accept_bi()
        .await
        .map(|(send, recv)| ControlChannel::new(send, recv, max_frame_len))
        .map_err(AcceptStreamError)
}
