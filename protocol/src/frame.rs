//! Framing: every message on a stream is one frame, a fixed 16-byte header and a payload.
//!
//! ```text
//!  0               4               6               8                              12              16
//!  +---------------+---------------+---------------+------------------------------+---------------+
//!  | magic "USTD"  | version u16   | kind u16      | payload length u32           | crc32 u32     |
//!  +---------------+---------------+---------------+------------------------------+---------------+
//!  | payload (length bytes; layout per kind, see `message` and `codec`)                           |
//!  +----------------------------------------------------------------------------------------------+
//! ```
//!
//! * All integers are little-endian.
//! * `version` is the protocol version the frame is encoded in. The receiver accepts the current
//!   and the previous version ([`crate::MIN_PROTOCOL_VERSION`]`..=`[`crate::PROTOCOL_VERSION`]).
//!   One exception: a `Hello` frame is accepted at *any* version >= 1, because the first bytes of
//!   a `Hello` payload are frozen forever; that lets the handshake answer an unknown version with
//!   a [`Reject`] that says what to upgrade, rather than drop the connection.
//! * `kind` is a [`FrameKind`]; 0 is `Invalid` and is never sent.
//! * `length` is checked against [`Limits::max_frame_len`] before any payload is buffered.
//! * `crc32` (IEEE) covers header bytes 0..12 and the payload. With TLS under us it guards against
//!   our own bugs, not against an attacker; page contents are also covered end to end by blake3.

use crate::limits::Limits;
use crate::message::{Message, MessageError, Reject, RejectCode};
use crate::{version_supported, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"USTD";
/// Size of the frame header.
pub const FRAME_HEADER_LEN: usize = 16;

/// What a frame carries. `Invalid = 0` is never sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    /// Never sent; a frame of kind 0 is rejected.
    Invalid = 0,
    /// [`crate::Hello`]
    Hello = 1,
    /// [`crate::Welcome`]
    Welcome = 2,
    /// [`crate::Reject`]
    Reject = 3,
    /// [`crate::Commit`]
    Commit = 4,
    /// [`crate::Ack`]
    Ack = 5,
    /// [`crate::Heartbeat`]
    Heartbeat = 6,
    /// [`crate::Promote`]
    Promote = 7,
    /// [`crate::Evict`]
    Evict = 8,
    /// [`crate::Goodbye`]
    Goodbye = 9,
    /// A chunk of page records ([`crate::ChunkFrame`], format in [`crate::codec`]).
    Chunk = 10,
    /// [`crate::Lease`]
    Lease = 11,
    /// [`crate::LeaseReply`]
    LeaseReply = 12,
    /// [`crate::Demand`]
    Demand = 13,
}

impl FrameKind {
    /// The kind for a wire value, `None` for 0 and unknown values.
    pub fn from_wire(v: u16) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Hello,
            2 => FrameKind::Welcome,
            3 => FrameKind::Reject,
            4 => FrameKind::Commit,
            5 => FrameKind::Ack,
            6 => FrameKind::Heartbeat,
            7 => FrameKind::Promote,
            8 => FrameKind::Evict,
            9 => FrameKind::Goodbye,
            10 => FrameKind::Chunk,
            11 => FrameKind::Lease,
            12 => FrameKind::LeaseReply,
            13 => FrameKind::Demand,
            _ => return None,
        })
    }
}

/// Why a frame could not be decoded. After any of these the stream is out of step: close it.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The first four bytes are not [`MAGIC`]: the peer does not speak this protocol.
    #[error("bad frame magic {found:02x?} (the peer does not speak the Understudy protocol)")]
    BadMagic {
        /// What arrived instead.
        found: [u8; 4],
    },
    /// A frame of a protocol version this build does not accept.
    #[error("frame of protocol version {version} (this end speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// The version in the header.
        version: u16,
    },
    /// The kind is 0 or unknown.
    #[error("invalid frame kind {0}")]
    InvalidKind(u16),
    /// The payload length is over [`Limits::max_frame_len`].
    #[error("frame payload of {len} bytes is over the limit of {max}")]
    TooLong {
        /// Declared length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The CRC does not match: the bytes were damaged.
    #[error("frame checksum mismatch (header says {expected:#010x}, bytes give {actual:#010x})")]
    Checksum {
        /// CRC in the header.
        expected: u32,
        /// CRC of the bytes received.
        actual: u32,
    },
    /// The payload does not decode as its kind.
    #[error("malformed {kind:?} payload")]
    Payload {
        /// The frame kind.
        kind: FrameKind,
        /// What is wrong with it.
        #[source]
        source: MessageError,
    },
    /// [`decode_frame`] was given fewer bytes than one frame.
    #[error("truncated frame: {have} of {need} bytes")]
    Truncated {
        /// Bytes given.
        have: usize,
        /// Bytes the header asks for.
        need: usize,
    },
    /// [`decode_frame`] was given more bytes than one frame.
    #[error("{0} bytes after the frame")]
    Trailing(usize),
    /// An earlier call failed; the decoder does not resynchronise.
    #[error("frame decoder stopped after an earlier error")]
    Poisoned,
}

impl FrameError {
    /// A [`Reject`] to send the peer before closing, with a reason a person can act on.
    pub fn reject(&self) -> Reject {
        match self {
            FrameError::UnsupportedVersion { version } => Reject {
                code: RejectCode::Version,
                reason: crate::handshake::version_reason(*version, *version, "this end"),
            },
            FrameError::BadMagic { .. } => Reject {
                code: RejectCode::Malformed,
                reason: "the stream does not start with an Understudy frame; check that the \
                         peer address is an Understudy backup or primary"
                    .into(),
            },
            other => Reject {
                code: RejectCode::Malformed,
                reason: format!(
                    "undecodable frame ({other}); both ends should run the same or adjacent \
                     Understudy releases"
                ),
            },
        }
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version the frame is encoded in.
    pub version: u16,
    /// Wire kind (already validated by [`FrameHeader::parse`]).
    pub kind: FrameKind,
    /// Payload length.
    pub len: u32,
    /// CRC32 over header bytes 0..12 and the payload.
    pub crc: u32,
}

impl FrameHeader {
    /// Parses and validates a header against `limits`.
    pub fn parse(b: &[u8; FRAME_HEADER_LEN], limits: &Limits) -> Result<FrameHeader, FrameError> {
        let [m0, m1, m2, m3, v0, v1, k0, k1, l0, l1, l2, l3, c0, c1, c2, c3] = *b;
        if [m0, m1, m2, m3] != MAGIC {
            return Err(FrameError::BadMagic {
                found: [m0, m1, m2, m3],
            });
        }
        let version = u16::from_le_bytes([v0, v1]);
        let raw_kind = u16::from_le_bytes([k0, k1]);
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        let crc = u32::from_le_bytes([c0, c1, c2, c3]);
        let kind = FrameKind::from_wire(raw_kind).ok_or(FrameError::InvalidKind(raw_kind))?;
        // A Hello is readable at any version so that the handshake can answer it.
        let readable = version_supported(version) || (kind == FrameKind::Hello && version >= 1);
        if !readable {
            return Err(FrameError::UnsupportedVersion { version });
        }
        if len > limits.max_frame_len {
            return Err(FrameError::TooLong {
                len,
                max: limits.max_frame_len,
            });
        }
        Ok(FrameHeader {
            version,
            kind,
            len,
            crc,
        })
    }
}

fn crc_of(header12: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header12);
    h.update(payload);
    h.finalize()
}

/// Starts a frame in `out`: writes a header with a placeholder length and CRC and returns the
/// offset of the header, to hand to [`finish_frame`] once the payload is appended.
pub fn begin_frame(out: &mut Vec<u8>, version: u16, kind: FrameKind) -> usize {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&[0u8; 8]);
    start
}

/// Completes the frame begun at `start`: fills in the payload length and the CRC.
///
/// Returns the payload length, or `None` if the payload is longer than `u32::MAX` (then `out` is
/// truncated back to `start`).
pub fn finish_frame(out: &mut Vec<u8>, start: usize) -> Option<u32> {
    let payload_start = start + FRAME_HEADER_LEN;
    let Some(len) = out
        .len()
        .checked_sub(payload_start)
        .and_then(|l| u32::try_from(l).ok())
    else {
        out.truncate(start);
        return None;
    };
    let (head, payload) = out.split_at_mut(payload_start);
    let header = &mut head[start..];
    header[8..12].copy_from_slice(&len.to_le_bytes());
    let crc = crc_of(&header[..12], payload);
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    Some(len)
}

/// Decodes exactly one frame from `bytes` (no more, no less).
pub fn decode_frame(bytes: &[u8], limits: &Limits) -> Result<Message, FrameError> {
    let mut d = FrameDecoder::new(limits.clone());
    let Some(hdr) = bytes.first_chunk::<FRAME_HEADER_LEN>() else {
        return Err(FrameError::Truncated {
            have: bytes.len(),
            need: FRAME_HEADER_LEN,
        });
    };
    let h = FrameHeader::parse(hdr, limits)?;
    let need = FRAME_HEADER_LEN + h.len as usize;
    if bytes.len() < need {
        return Err(FrameError::Truncated {
            have: bytes.len(),
            need,
        });
    }
    if bytes.len() > need {
        return Err(FrameError::Trailing(bytes.len() - need));
    }
    d.push(bytes);
    match d.next()? {
        Some(m) => Ok(m),
        None => Err(FrameError::Truncated {
            have: bytes.len(),
            need,
        }),
    }
}

/// Incremental frame decoder for one stream: push bytes as they arrive, pull messages.
///
/// It buffers at most what was pushed and never reserves memory from a length read off the
/// wire. After an error it returns [`FrameError::Poisoned`]: a byte stream cannot be
/// resynchronised, the stream must be closed.
///
/// ```
/// use understudy_protocol::{Ack, FrameDecoder, Limits, Message};
/// let mut bytes = Vec::new();
/// Message::Ack(Ack { epoch: 7 }).encode(&mut bytes);
/// let mut d = FrameDecoder::new(Limits::default());
/// d.push(&bytes[..5]);
/// assert!(d.next().unwrap().is_none());
/// d.push(&bytes[5..]);
/// assert_eq!(d.next().unwrap(), Some(Message::Ack(Ack { epoch: 7 })));
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    limits: Limits,
    buf: Vec<u8>,
    start: usize,
    header: Option<FrameHeader>,
    failed: bool,
}

impl FrameDecoder {
    /// A decoder bounded by `limits`.
    pub fn new(limits: Limits) -> Self {
        FrameDecoder {
            limits,
            buf: Vec::new(),
            start: 0,
            header: None,
            failed: false,
        }
    }

    /// Appends bytes received from the stream (dropped once the decoder has failed).
    pub fn push(&mut self, data: &[u8]) {
        if self.failed {
            return;
        }
        if self.start > 0 && self.start >= self.buf.len() - self.start {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes pushed but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Message>, FrameError> {
        if self.failed {
            return Err(FrameError::Poisoned);
        }
        let r = self.next_inner();
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn next_inner(&mut self) -> Result<Option<Message>, FrameError> {
        let avail = &self.buf[self.start..];
        let header = match self.header {
            Some(h) => h,
            None => {
                let Some(hdr) = avail.first_chunk::<FRAME_HEADER_LEN>() else {
                    return Ok(None);
                };
                let h = FrameHeader::parse(hdr, &self.limits)?;
                self.header = Some(h);
                h
            }
        };
        let total = FRAME_HEADER_LEN + header.len as usize;
        let Some(frame) = avail.get(..total) else {
            return Ok(None);
        };
        let (head, payload) = frame.split_at(FRAME_HEADER_LEN);
        let actual = crc_of(&head[..12], payload);
        if actual != header.crc {
            return Err(FrameError::Checksum {
                expected: header.crc,
                actual,
            });
        }
        let msg = Message::decode_payload(header.version, header.kind, payload, &self.limits)
            .map_err(|source| FrameError::Payload {
                kind: header.kind,
                source,
            })?;
        self.start += total;
        self.header = None;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(msg))
    }
}
