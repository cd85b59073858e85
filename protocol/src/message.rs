//! Control messages and their payload layouts.
//!
//! Each message is the payload of one frame (see [`crate::frame`]); `Message::encode` writes the
//! frame header too. Integers are little-endian; `text` is a `u16` byte length and UTF-8 bytes;
//! `digest` is 32 bytes. Every enum has `Invalid = 0`, which decoders reject.
//!
//! | kind | payload |
//! |---|---|
//! | `Hello` (1) | `min_version u16, max_version u16, mode u8, vm_id text, page_size u32, region_count u16, region_count x (gpa u64, pages u64), has_base u8, [base_epoch u64, base_digest]` |
//! | `Welcome` (2) | `version u16, resumed u8, epoch u64, digest` |
//! | `Reject` (3) | `code u16, reason text` |
//! | `Commit` (4) | `epoch u64, chunk_count u32, page_count u32, digest, state_len u32, state` |
//! | `Ack` (5) | `epoch u64` |
//! | `Heartbeat` (6) | `sent_ns u64, echo_ns u64, hold_ns u64` |
//! | `Promote` (7) | `epoch u64` |
//! | `Evict` (8) | `final_epoch u64` |
//! | `Goodbye` (9) | `reason u16, text` |
//! | `Chunk` (10) | a chunk, see [`crate::codec`] |
//! | `Lease` (11) | `vm_id text, holder text, ttl_ms u32, seq u64[, successor u8, name text]` |
//! | `LeaseReply` (12) | `granted u8, holder text, ttl_ms u32, seq u64` |
//! | `Demand` (13) | `count u32, count x page u32` |
//!
//! In a postcopy move ([`Mode::Postcopy`]) the source's first `Commit` carries only the VM
//! state; the destination runs the VM at once and asks for the pages its guest touches first
//! with `Demand`, while the source pushes every page in the background.
//!
//! `Lease`/`LeaseReply` travel between a node (primary or backup) and the witness: a node may
//! run the VM only while it holds the lease (fencing against split brain). The holder also
//! names who may take the lease over once it expires ([`Successor`]): a primary that runs on
//! unprotected says "nobody", because its backup's image no longer holds what the outside has
//! seen. A `Lease` that ends after `seq` (the first layout) means [`Successor::Any`].
//!
//! The `Hello` layout up to `has_base` is frozen for every future version (later versions may
//! only append), so that any build can read the versions a peer speaks and answer it.

use crate::digest::Digest;
use crate::frame::{begin_frame, finish_frame, FrameKind};
use crate::limits::{Limits, PAGE_SIZE};
use crate::wire::{put_u16, put_u32, put_u64, Reader};
use crate::PROTOCOL_VERSION;

/// Why a frame payload does not decode as its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The payload ended inside `field`.
    #[error("payload ends inside {0}")]
    Truncated(&'static str),
    /// Bytes left after the last field.
    #[error("{0} unexpected bytes after the payload")]
    Trailing(usize),
    /// An enum field holds 0 (`Invalid`) or an unknown value.
    #[error("invalid {field} value {value}")]
    InvalidEnum {
        /// Which field.
        field: &'static str,
        /// The value.
        value: u64,
    },
    /// A length or count is over its limit.
    #[error("{field} of {len} is over the limit of {max}")]
    OverLimit {
        /// Which field.
        field: &'static str,
        /// What arrived.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A text field is not UTF-8.
    #[error("{0} is not UTF-8")]
    Utf8(&'static str),
    /// The page size is not 4096.
    #[error("page size {0} is not supported (only 4096)")]
    PageSize(u32),
    /// A region is empty, not aligned or wraps around.
    #[error("memory region {index} (gpa {gpa:#x}, {pages} pages) is empty, unaligned or wraps")]
    BadRegion {
        /// Region index.
        index: usize,
        /// Its start.
        gpa: u64,
        /// Its size in pages.
        pages: u64,
    },
    /// A chunk frame's format does not fit the frame's protocol version.
    #[error("chunk format {format} cannot travel in a version {version} frame")]
    ChunkFormat {
        /// Chunk format.
        format: u16,
        /// Frame version.
        version: u16,
    },
}

type MResult<T> = Result<T, MessageError>;

fn need<T>(v: Option<T>, field: &'static str) -> MResult<T> {
    v.ok_or(MessageError::Truncated(field))
}

fn read_text(r: &mut Reader<'_>, field: &'static str, limits: &Limits) -> MResult<String> {
    let len = need(r.u16(), field)?;
    if len > limits.max_text_len {
        return Err(MessageError::OverLimit {
            field,
            len: len.into(),
            max: limits.max_text_len.into(),
        });
    }
    let bytes = need(r.bytes(len.into()), field)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| MessageError::Utf8(field))
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    // Longer text is cut at a character boundary to fit the u16 length.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    put_u16(out, end as u16);
    out.extend_from_slice(&s.as_bytes()[..end]);
}

fn read_digest(r: &mut Reader<'_>, field: &'static str) -> MResult<Digest> {
    need(r.array::<32>(), field).map(Digest)
}

fn done(r: &Reader<'_>) -> MResult<()> {
    match r.remaining() {
        0 => Ok(()),
        n => Err(MessageError::Trailing(n)),
    }
}

/// What the primary asks the backup to do with the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Mode {
    /// Never sent.
    Invalid = 0,
    /// Continuous checkpointing: keep a hot standby.
    Protect = 1,
    /// A planned move: the backup takes over at the end.
    Migrate = 2,
    /// A postcopy move: the destination runs the VM from the first `Commit` (state only) and
    /// pulls pages on demand.
    Postcopy = 3,
}

impl Mode {
    fn from_wire(v: u8) -> MResult<Mode> {
        match v {
            1 => Ok(Mode::Protect),
            2 => Ok(Mode::Migrate),
            3 => Ok(Mode::Postcopy),
            _ => Err(MessageError::InvalidEnum {
                field: "mode",
                value: v.into(),
            }),
        }
    }
}

/// One guest memory region. The protocol's page index space is the regions' pages concatenated
/// in order: page `i` of region `k` has index `pages(0) + ... + pages(k-1) + i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    /// Guest-physical start, page aligned.
    pub gpa: u64,
    /// Size in pages, not zero.
    pub pages: u64,
}

/// The guest memory layout.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct MemoryLayout {
    /// Regions in page-index order.
    pub regions: Vec<Region>,
}

impl MemoryLayout {
    /// A single region at guest-physical 0.
    pub fn flat(pages: u64) -> Self {
        MemoryLayout {
            regions: vec![Region { gpa: 0, pages }],
        }
    }

    /// Total pages, i.e. the size of the page index space (saturating).
    pub fn total_pages(&self) -> u64 {
        self.regions
            .iter()
            .fold(0u64, |a, r| a.saturating_add(r.pages))
    }
}

/// An epoch and the image digest after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EpochDigest {
    /// The epoch.
    pub epoch: u64,
    /// Digest of the whole image after that epoch.
    pub digest: Digest,
}

/// First message, primary to backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the primary speaks.
    pub min_version: u16,
    /// Newest protocol version the primary speaks.
    pub max_version: u16,
    /// Protect or migrate.
    pub mode: Mode,
    /// The VM's id.
    pub vm_id: String,
    /// Guest memory layout (fixes the page index space).
    pub layout: MemoryLayout,
    /// An offer to resume: the newest image the primary sent (its epoch in the primary's own
    /// numbering, and its digest). With it, a backup that kept an image says which (`Welcome`
    /// with `resumed`); without it, the backup starts empty.
    pub base: Option<EpochDigest>,
}

/// The backup accepts the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Protocol version both ends use from now on.
    pub version: u16,
    /// `true`: the primary offered to resume and the backup kept the image named here; the
    /// session's epochs (numbered from 1 again) apply on top of it. `false`: the backup has
    /// reset its image to all zeros (epoch 0) and the primary starts a full sync.
    pub resumed: bool,
    /// The epoch the backup's image is at, in the numbering of its store (0 when not resumed).
    pub epoch: u64,
    /// The digest of the backup's image at `epoch`.
    pub digest: Digest,
}

/// Why a session was refused; see [`Reject`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum RejectCode {
    /// Never sent.
    Invalid = 0,
    /// No common protocol version.
    Version = 1,
    /// The VM id is not the one this backup serves.
    VmId = 2,
    /// The memory layout is unsupported or differs from the held image.
    Layout = 3,
    /// The mode is not accepted here.
    Mode = 4,
    /// The peer sent something undecodable.
    Malformed = 5,
    /// Anything else; the reason says what.
    Other = 6,
}

impl RejectCode {
    fn from_wire(v: u16) -> MResult<RejectCode> {
        Ok(match v {
            1 => RejectCode::Version,
            2 => RejectCode::VmId,
            3 => RejectCode::Layout,
            4 => RejectCode::Mode,
            5 => RejectCode::Malformed,
            6 => RejectCode::Other,
            _ => {
                return Err(MessageError::InvalidEnum {
                    field: "reject code",
                    value: v.into(),
                })
            }
        })
    }
}

/// The backup refuses the session; `reason` tells a person what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// Machine-readable cause.
    pub code: RejectCode,
    /// Human-readable, actionable reason.
    pub reason: String,
}

/// End of epoch `epoch`: all its chunks were sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// The epoch.
    pub epoch: u64,
    /// Chunks of the epoch (their `seq` are `0..chunk_count`).
    pub chunk_count: u32,
    /// Page records in those chunks.
    pub page_count: u32,
    /// Image digest after the epoch.
    pub digest: Digest,
    /// vCPU and device state at the epoch's capture; opaque here (the `vmm` crate owns it).
    pub state: Vec<u8>,
}

/// The backup applied and verified epoch `epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The epoch.
    pub epoch: u64,
}

/// Liveness and RTT, both ways. Timestamps are nanoseconds on the *sender's* clock, supplied by
/// the caller (this crate has no clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// When this heartbeat was sent.
    pub sent_ns: u64,
    /// `sent_ns` of the last heartbeat received from the peer (0 if none yet).
    pub echo_ns: u64,
    /// Time between receiving that heartbeat and sending this one.
    pub hold_ns: u64,
}

impl Heartbeat {
    /// The reply to `received`, sent at `now_ns` by an end that received it at `received_at_ns`.
    pub fn reply(received: &Heartbeat, received_at_ns: u64, now_ns: u64) -> Heartbeat {
        Heartbeat {
            sent_ns: now_ns,
            echo_ns: received.sent_ns,
            hold_ns: now_ns.saturating_sub(received_at_ns),
        }
    }

    /// Round-trip time seen by the end that receives this heartbeat at `now_ns` (its own clock,
    /// the clock `echo_ns` was taken on). `None` without an echo or if the clocks do not add up.
    pub fn rtt_ns(&self, now_ns: u64) -> Option<u64> {
        if self.echo_ns == 0 {
            return None;
        }
        now_ns.checked_sub(self.echo_ns)?.checked_sub(self.hold_ns)
    }
}

/// Take over now from the last committed epoch, which must be `epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Promote {
    /// The epoch the backup must have committed.
    pub epoch: u64,
}

/// Postcopy: pages the destination's guest is waiting for; the source sends them before
/// anything else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Demand {
    /// Page indices (at most the limits' `max_chunk_records`).
    pub pages: Vec<u32>,
}

/// Planned eviction: `final_epoch` is the last epoch the primary sends; after committing it the
/// backup takes over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evict {
    /// The last epoch.
    pub final_epoch: u64,
}

/// Asks the witness for the VM's lease, or renews it: granted when nobody else holds an
/// unexpired lease for `vm_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The VM.
    pub vm_id: String,
    /// Who asks (its certificate name).
    pub holder: String,
    /// How long the lease should last from the witness's receipt.
    pub ttl_ms: u32,
    /// Echoed in the reply, to match replies to requests.
    pub seq: u64,
    /// Who may take the lease over when it expires (set by the holder).
    pub successor: Successor,
}

/// Who may take a lease over after it expires.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Successor {
    /// Any node (wire 1).
    Any,
    /// Only the node with this certificate name (wire 2): the backup that holds our epochs.
    Only(String),
    /// Nobody (wire 3): the holder runs unprotected; only it may renew.
    Nobody,
}

impl Successor {
    /// Whether `node` may take over an expired lease.
    pub fn admits(&self, node: &str) -> bool {
        match self {
            Successor::Any => true,
            Successor::Only(n) => n == node,
            Successor::Nobody => false,
        }
    }
}

/// The witness's answer to a [`Lease`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseReply {
    /// Whether the asker now holds the lease.
    pub granted: bool,
    /// Who holds it now.
    pub holder: String,
    /// If granted: the lease's length; otherwise how long the current holder's lease still runs.
    pub ttl_ms: u32,
    /// The request's `seq`.
    pub seq: u64,
}

/// Why a session ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum GoodbyeReason {
    /// Never sent.
    Invalid = 0,
    /// Normal end (the VM stopped, or protection was turned off).
    Done = 1,
    /// The migration finished.
    Migrated = 2,
    /// A protocol error; the text says which.
    Error = 3,
    /// The process is shutting down.
    Shutdown = 4,
}

impl GoodbyeReason {
    fn from_wire(v: u16) -> MResult<GoodbyeReason> {
        Ok(match v {
            1 => GoodbyeReason::Done,
            2 => GoodbyeReason::Migrated,
            3 => GoodbyeReason::Error,
            4 => GoodbyeReason::Shutdown,
            _ => {
                return Err(MessageError::InvalidEnum {
                    field: "goodbye reason",
                    value: v.into(),
                })
            }
        })
    }
}

/// Last message of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Goodbye {
    /// Why.
    pub reason: GoodbyeReason,
    /// Details for a person.
    pub text: String,
}

/// A chunk of page records as it came off the wire (CRC-checked, not yet decoded). Decode it on
/// any worker thread with [`crate::ChunkDecoder`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkFrame {
    /// Protocol version of the frame it arrived in.
    pub version: u16,
    /// Epoch, read from the chunk header.
    pub epoch: u64,
    /// Sequence number within the epoch, read from the chunk header.
    pub seq: u32,
    /// The chunk bytes (the frame payload).
    pub payload: Vec<u8>,
}

impl ChunkFrame {
    /// Wraps an encoded chunk payload (as made by the encoder), reading epoch and seq.
    pub fn from_payload(version: u16, payload: Vec<u8>) -> MResult<ChunkFrame> {
        let mut r = Reader::new(&payload);
        let format = need(r.u16(), "chunk format")?;
        let _flags = need(r.u16(), "chunk flags")?;
        let seq = need(r.u32(), "chunk seq")?;
        let epoch = need(r.u64(), "chunk epoch")?;
        if !crate::codec::chunk_format_allowed(version, format) {
            return Err(MessageError::ChunkFormat { format, version });
        }
        Ok(ChunkFrame {
            version,
            epoch,
            seq,
            payload,
        })
    }
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Reject`].
    Reject(Reject),
    /// See [`Commit`].
    Commit(Commit),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`Promote`].
    Promote(Promote),
    /// See [`Lease`].
    Lease(Lease),
    /// See [`LeaseReply`].
    LeaseReply(LeaseReply),
    /// See [`Evict`].
    Evict(Evict),
    /// See [`Demand`].
    Demand(Demand),
    /// See [`Goodbye`].
    Goodbye(Goodbye),
    /// See [`ChunkFrame`].
    Chunk(ChunkFrame),
}

impl Message {
    /// The frame kind this message travels as.
    pub fn kind(&self) -> FrameKind {
        match self {
            Message::Hello(_) => FrameKind::Hello,
            Message::Welcome(_) => FrameKind::Welcome,
            Message::Reject(_) => FrameKind::Reject,
            Message::Commit(_) => FrameKind::Commit,
            Message::Ack(_) => FrameKind::Ack,
            Message::Heartbeat(_) => FrameKind::Heartbeat,
            Message::Promote(_) => FrameKind::Promote,
            Message::Lease(_) => FrameKind::Lease,
            Message::LeaseReply(_) => FrameKind::LeaseReply,
            Message::Evict(_) => FrameKind::Evict,
            Message::Demand(_) => FrameKind::Demand,
            Message::Goodbye(_) => FrameKind::Goodbye,
            Message::Chunk(_) => FrameKind::Chunk,
        }
    }

    /// Appends the message as one frame of the current [`PROTOCOL_VERSION`] (a chunk keeps the
    /// version it was made for).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let version = match self {
            Message::Chunk(c) => c.version,
            _ => PROTOCOL_VERSION,
        };
        self.encode_version(version, out);
    }

    /// Appends the message as one frame of protocol `version` (the one negotiated in
    /// [`Welcome`]). Messages are laid out alike in every supported version.
    pub fn encode_version(&self, version: u16, out: &mut Vec<u8>) {
        let start = begin_frame(out, version, self.kind());
        self.encode_payload(out);
        // Payloads are far below 4 GiB (text is cut to u16, blobs come from the caller's own
        // state); should one not fit, the frame is dropped rather than sent corrupt.
        let _ = finish_frame(out, start);
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello(h) => {
                put_u16(out, h.min_version);
                put_u16(out, h.max_version);
                out.push(h.mode as u8);
                put_text(out, &h.vm_id);
                put_u32(out, PAGE_SIZE as u32);
                let n = h.layout.regions.len().min(u16::MAX as usize);
                put_u16(out, n as u16);
                for r in &h.layout.regions[..n] {
                    put_u64(out, r.gpa);
                    put_u64(out, r.pages);
                }
                match h.base {
                    None => out.push(0),
                    Some(b) => {
                        out.push(1);
                        put_u64(out, b.epoch);
                        out.extend_from_slice(&b.digest.0);
                    }
                }
            }
            Message::Welcome(w) => {
                put_u16(out, w.version);
                out.push(w.resumed as u8);
                put_u64(out, w.epoch);
                out.extend_from_slice(&w.digest.0);
            }
            Message::Reject(r) => {
                put_u16(out, r.code as u16);
                put_text(out, &r.reason);
            }
            Message::Commit(c) => {
                put_u64(out, c.epoch);
                put_u32(out, c.chunk_count);
                put_u32(out, c.page_count);
                out.extend_from_slice(&c.digest.0);
                put_u32(out, c.state.len().min(u32::MAX as usize) as u32);
                out.extend_from_slice(&c.state);
            }
            Message::Ack(a) => put_u64(out, a.epoch),
            Message::Heartbeat(h) => {
                put_u64(out, h.sent_ns);
                put_u64(out, h.echo_ns);
                put_u64(out, h.hold_ns);
            }
            Message::Promote(p) => put_u64(out, p.epoch),
            Message::Lease(l) => {
                put_text(out, &l.vm_id);
                put_text(out, &l.holder);
                put_u32(out, l.ttl_ms);
                put_u64(out, l.seq);
                match &l.successor {
                    Successor::Any => out.push(1),
                    Successor::Only(name) => {
                        out.push(2);
                        put_text(out, name);
                    }
                    Successor::Nobody => out.push(3),
                }
            }
            Message::LeaseReply(l) => {
                out.push(l.granted as u8);
                put_text(out, &l.holder);
                put_u32(out, l.ttl_ms);
                put_u64(out, l.seq);
            }
            Message::Evict(e) => put_u64(out, e.final_epoch),
            Message::Demand(d) => {
                put_u32(out, d.pages.len() as u32);
                for p in &d.pages {
                    put_u32(out, *p);
                }
            }
            Message::Goodbye(g) => {
                put_u16(out, g.reason as u16);
                put_text(out, &g.text);
            }
            Message::Chunk(c) => out.extend_from_slice(&c.payload),
        }
    }

    /// Decodes the payload of a frame of `kind` and `version` (header already validated).
    pub fn decode_payload(
        version: u16,
        kind: FrameKind,
        payload: &[u8],
        limits: &Limits,
    ) -> Result<Message, MessageError> {
        let mut r = Reader::new(payload);
        let msg = match kind {
            FrameKind::Invalid => {
                return Err(MessageError::InvalidEnum {
                    field: "frame kind",
                    value: 0,
                })
            }
            FrameKind::Hello if version > PROTOCOL_VERSION => {
                // A newer peer. Its versions are in the frozen prefix; the rest is read if it
                // can be, so that the handshake answers with a Reject naming the versions.
                let min_version = need(r.u16(), "min version")?;
                let max_version = need(r.u16(), "max version")?;
                let mut whole = Reader::new(payload);
                let hello = decode_hello(&mut whole, limits).unwrap_or(Hello {
                    min_version,
                    max_version,
                    mode: Mode::Invalid,
                    vm_id: String::new(),
                    layout: MemoryLayout::default(),
                    base: None,
                });
                return Ok(Message::Hello(hello));
            }
            FrameKind::Hello => Message::Hello(decode_hello(&mut r, limits)?),
            FrameKind::Welcome => {
                let version = need(r.u16(), "version")?;
                let resumed = match need(r.u8(), "resumed")? {
                    0 => false,
                    1 => true,
                    v => {
                        return Err(MessageError::InvalidEnum {
                            field: "resumed",
                            value: v.into(),
                        })
                    }
                };
                Message::Welcome(Welcome {
                    version,
                    resumed,
                    epoch: need(r.u64(), "epoch")?,
                    digest: read_digest(&mut r, "digest")?,
                })
            }
            FrameKind::Reject => Message::Reject(Reject {
                code: RejectCode::from_wire(need(r.u16(), "reject code")?)?,
                reason: read_text(&mut r, "reason", limits)?,
            }),
            FrameKind::Commit => {
                let epoch = need(r.u64(), "epoch")?;
                let chunk_count = need(r.u32(), "chunk count")?;
                if chunk_count > limits.max_chunks_per_epoch {
                    return Err(MessageError::OverLimit {
                        field: "chunk count",
                        len: chunk_count.into(),
                        max: limits.max_chunks_per_epoch.into(),
                    });
                }
                let page_count = need(r.u32(), "page count")?;
                if u64::from(page_count) > limits.max_image_pages {
                    return Err(MessageError::OverLimit {
                        field: "page count",
                        len: page_count.into(),
                        max: limits.max_image_pages,
                    });
                }
                let digest = read_digest(&mut r, "digest")?;
                let state_len = need(r.u32(), "state length")?;
                if state_len > limits.max_state_len {
                    return Err(MessageError::OverLimit {
                        field: "state blob",
                        len: state_len.into(),
                        max: limits.max_state_len.into(),
                    });
                }
                let state = need(r.bytes(state_len as usize), "state")?.to_vec();
                Message::Commit(Commit {
                    epoch,
                    chunk_count,
                    page_count,
                    digest,
                    state,
                })
            }
            FrameKind::Ack => Message::Ack(Ack {
                epoch: need(r.u64(), "epoch")?,
            }),
            FrameKind::Heartbeat => Message::Heartbeat(Heartbeat {
                sent_ns: need(r.u64(), "sent_ns")?,
                echo_ns: need(r.u64(), "echo_ns")?,
                hold_ns: need(r.u64(), "hold_ns")?,
            }),
            FrameKind::Promote => Message::Promote(Promote {
                epoch: need(r.u64(), "epoch")?,
            }),
            FrameKind::Lease => Message::Lease(Lease {
                vm_id: read_text(&mut r, "vm id", limits)?,
                holder: read_text(&mut r, "holder", limits)?,
                ttl_ms: need(r.u32(), "ttl")?,
                seq: need(r.u64(), "seq")?,
                successor: if r.remaining() == 0 {
                    Successor::Any
                } else {
                    match need(r.u8(), "successor")? {
                        1 => Successor::Any,
                        2 => Successor::Only(read_text(&mut r, "successor", limits)?),
                        3 => Successor::Nobody,
                        v => {
                            return Err(MessageError::InvalidEnum {
                                field: "successor",
                                value: v.into(),
                            })
                        }
                    }
                },
            }),
            FrameKind::LeaseReply => Message::LeaseReply(LeaseReply {
                granted: match need(r.u8(), "granted")? {
                    0 => false,
                    1 => true,
                    v => {
                        return Err(MessageError::InvalidEnum {
                            field: "granted",
                            value: v.into(),
                        })
                    }
                },
                holder: read_text(&mut r, "holder", limits)?,
                ttl_ms: need(r.u32(), "ttl")?,
                seq: need(r.u64(), "seq")?,
            }),
            FrameKind::Evict => Message::Evict(Evict {
                final_epoch: need(r.u64(), "final epoch")?,
            }),
            FrameKind::Demand => {
                let count = need(r.u32(), "demand count")?;
                if count > limits.max_chunk_records {
                    return Err(MessageError::OverLimit {
                        field: "demanded pages",
                        len: count.into(),
                        max: limits.max_chunk_records.into(),
                    });
                }
                let mut pages = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let page = need(r.u32(), "demanded page")?;
                    if u64::from(page) >= limits.max_image_pages {
                        return Err(MessageError::OverLimit {
                            field: "demanded page index",
                            len: page.into(),
                            max: limits.max_image_pages,
                        });
                    }
                    pages.push(page);
                }
                Message::Demand(Demand { pages })
            }
            FrameKind::Goodbye => Message::Goodbye(Goodbye {
                reason: GoodbyeReason::from_wire(need(r.u16(), "goodbye reason")?)?,
                text: read_text(&mut r, "text", limits)?,
            }),
            FrameKind::Chunk => {
                return ChunkFrame::from_payload(version, payload.to_vec()).map(Message::Chunk)
            }
        };
        done(&r)?;
        Ok(msg)
    }
}

fn decode_hello(r: &mut Reader<'_>, limits: &Limits) -> MResult<Hello> {
    let min_version = need(r.u16(), "min version")?;
    let max_version = need(r.u16(), "max version")?;
    let mode = Mode::from_wire(need(r.u8(), "mode")?)?;
    let vm_id = read_text(r, "vm id", limits)?;
    let page_size = need(r.u32(), "page size")?;
    if page_size as usize != PAGE_SIZE {
        return Err(MessageError::PageSize(page_size));
    }
    let count = need(r.u16(), "region count")?;
    if count > limits.max_regions {
        return Err(MessageError::OverLimit {
            field: "region count",
            len: count.into(),
            max: limits.max_regions.into(),
        });
    }
    let mut regions = Vec::with_capacity(count.into());
    let mut total = 0u64;
    for index in 0..count as usize {
        let gpa = need(r.u64(), "region gpa")?;
        let pages = need(r.u64(), "region pages")?;
        let bad = pages == 0
            || gpa % PAGE_SIZE as u64 != 0
            || pages
                .checked_mul(PAGE_SIZE as u64)
                .and_then(|b| gpa.checked_add(b))
                .is_none();
        if bad {
            return Err(MessageError::BadRegion { index, gpa, pages });
        }
        total = total.saturating_add(pages);
        if total > limits.max_image_pages {
            return Err(MessageError::OverLimit {
                field: "memory size in pages",
                len: total,
                max: limits.max_image_pages,
            });
        }
        regions.push(Region { gpa, pages });
    }
    let base = match need(r.u8(), "base flag")? {
        0 => None,
        1 => Some(EpochDigest {
            epoch: need(r.u64(), "base epoch")?,
            digest: read_digest(r, "base digest")?,
        }),
        v => {
            return Err(MessageError::InvalidEnum {
                field: "base flag",
                value: v.into(),
            })
        }
    };
    Ok(Hello {
        min_version,
        max_version,
        mode,
        vm_id,
        layout: MemoryLayout { regions },
        base,
    })
}
