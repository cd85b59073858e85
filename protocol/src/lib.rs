//! # understudy-protocol
//!
//! The wire protocol and page codec of Understudy, **sans-IO**: no sockets, no clocks, no tokio.
//! Bytes go in, messages, decoded chunks and bytes come out (the way `quinn-proto` is built), so
//! every rule of the wire is tested without a network, and every decoder is fuzzed (`fuzz/`).
//!
//! | module | what it holds |
//! |---|---|
//! | [`frame`] | the fixed 16-byte frame header, [`FrameDecoder`] (incremental, bounded) |
//! | [`message`] | control messages ([`Hello`], [`Welcome`], [`Reject`], [`Commit`], [`Ack`], ...) |
//! | [`handshake`] | [`answer_hello`]: a received [`Hello`] and local expectations in, [`Welcome`] or an actionable [`Reject`] out |
//! | [`codec`] | the memory stream: page records, chunks, [`EncoderState`], [`ChunkDecoder`], [`EpochAssembler`] |
//! | [`digest`] | [`PageTree`]: the page hashes of an image and its Merkle root, the image [`Digest`] |
//! | [`limits`] | [`Limits`]: every length, count and index read from the wire is bounded by it |
//!
//! ## Versions
//! Frames carry the protocol version they are encoded in. This build speaks versions
//! [`MIN_PROTOCOL_VERSION`]`..=`[`PROTOCOL_VERSION`] (the current and the previous one):
//!
//! | version | what changed |
//! |---|---|
//! | 1 | control messages as in [`message`]; chunk format 1 (records `Zero`, `Full`, `Ref`) |
//! | 2 | chunk format 2 adds `Delta` records (XOR against the page's previous content); messages unchanged |
//! | 3 | chunk format 3: records without the page's blake3 hash (5 bytes, `Ref` 9, instead of 44); the backup derives the hashes and the `Commit`'s image digest verifies them; messages unchanged |
//!
//! A version-2 frame carries chunk formats 1 and 2, a version-3 frame formats 1 to 3. Version 1
//! is no longer spoken: its frames are refused (a `Hello` naming it gets a `Reject`).
//!
//! The memory stream (the chunk format, [`codec::CHUNK_FORMAT`]) is versioned on its own in every
//! chunk header; the VM state blob in [`Commit`] is opaque bytes that the `vmm` crate versions.
//!
//! ## One epoch, primary to backup
//! ```text
//!  primary                                                     backup
//!  Hello{versions, vm, layout, mode, base} ------------------->
//!                      <--------------------- Welcome{version, resumed, epoch, digest} | Reject{reason}
//!  capture E (vCPUs paused), then EncoderState::encode_epoch(E)
//!  Chunk(E, seq 0) ========= parallel QUIC streams ==========> ChunkDecoder::decode (any worker)
//!  Chunk(E, seq 1) ==========================================> EpochAssembler::add (any order)
//!  Commit{E, chunks, pages, state, digest} ------------------> EpochAssembler::commit:
//!                                                                verify all, check digest, apply
//!                      <----------------------------------------- Ack(E)
//!  release E's output
//!  Heartbeat <---------------------------------------------------> Heartbeat   (both ways)
//!  Evict / Promote / Goodbye  ------------------------------------>
//! ```
//!
//! ## Using it
//! ```
//! use understudy_protocol::*;
//!
//! let pages = 64u32;
//! // Primary: per-VM encoder state; the backup starts from an all-zero image.
//! let mut encoder = EncoderState::new(pages, EncoderConfig::default());
//! let mut guest = vec![0u8; pages as usize * PAGE_SIZE];
//! guest[PAGE_SIZE..2 * PAGE_SIZE].fill(0xab); // page 1 dirtied
//! guest[5 * PAGE_SIZE..6 * PAGE_SIZE].fill(0xab); // page 5: same content
//! let staged: Vec<(u32, Page)> = [1u32, 5]
//!     .iter()
//!     .map(|&i| (i, guest[i as usize * PAGE_SIZE..][..PAGE_SIZE].try_into().unwrap()))
//!     .collect();
//! let dirty: Vec<DirtyPage> = staged
//!     .iter()
//!     .map(|(i, p)| DirtyPage { index: *i, data: p, base: None })
//!     .collect();
//! let epoch = encoder.encode_epoch(1, &dirty, 2).unwrap(); // 2 worker threads
//! assert_eq!((epoch.stats.full, epoch.stats.refs), (1, 1));
//! let mut wire = Vec::new();
//! for frame in &epoch.chunks {
//!     wire.extend_from_slice(frame); // one frame per QUIC stream, in any order
//! }
//! Message::Commit(epoch.commit(b"vcpu+device state".to_vec())).encode(&mut wire);
//!
//! // Backup: frames in, chunks decoded (on any worker), staged, committed at Commit.
//! let limits = Limits::default();
//! let mut replica = Replica::zeroed(pages);
//! let mut image = vec![0u8; pages as usize * PAGE_SIZE]; // or memfd-backed memory
//! let mut frames = FrameDecoder::new(limits.clone());
//! let mut chunks = ChunkDecoder::new(limits.clone(), pages.into());
//! let mut staging = EpochAssembler::new(1, limits.clone());
//! frames.push(&wire);
//! while let Some(msg) = frames.next().unwrap() {
//!     match msg {
//!         Message::Chunk(c) => staging.add(chunks.decode_frame(&c).unwrap()).unwrap(),
//!         Message::Commit(c) => {
//!             let done = staging.commit(&c, &mut replica, &mut image).unwrap();
//!             assert_eq!(done.digest, c.digest);
//!             // ... then send Message::Ack(Ack { epoch: c.epoch })
//!         }
//!         _ => {}
//!     }
//! }
//! assert_eq!(image, guest);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod digest;
pub mod frame;
pub mod handshake;
pub mod limits;
pub mod message;
mod wire;

pub use codec::{
    decode_chunk, summarize_pages, ApplyError, ChunkDecoder, ChunkPlan, CommitOutcome, DecodeError,
    DecodedChunk, DirtyPage, EncodeError, EncodedEpoch, EncoderConfig, EncoderState,
    EpochAssembler, EpochPlan, EpochStats, PageImage, PageSummary, Replica,
};
pub use digest::{Digest, PageHash, PageTree, ZERO_PAGE_HASH};
pub use frame::{decode_frame, FrameDecoder, FrameError, FrameKind, FRAME_HEADER_LEN, MAGIC};
pub use handshake::{answer_hello, LocalEnd};
pub use limits::{Limits, Page, PAGE_SIZE};
pub use message::{
    Ack, ChunkFrame, Commit, Demand, EpochDigest, Evict, Goodbye, GoodbyeReason, Heartbeat, Hello,
    Lease, LeaseReply, MemoryLayout, Message, MessageError, Mode, Promote, Region, Reject,
    RejectCode, Successor, Welcome,
};

/// The protocol version this build speaks and sends.
pub const PROTOCOL_VERSION: u16 = 3;
/// The oldest protocol version this build still accepts (the previous one).
pub const MIN_PROTOCOL_VERSION: u16 = 2;

/// The most epochs a primary may have between capture and the backup's `Ack`. A primary sends
/// chunks of epoch E only once epoch E - MAX_EPOCHS_IN_FLIGHT is acknowledged, and a backup
/// acknowledges only what it has applied, so a backup stages chunks for at most this many
/// epochs beyond its last applied one and refuses anything further ahead. One constant for both
/// sides: when the primary's window was larger than the backup's, a backup that fell behind
/// applying (a stall under load) ended a healthy session.
pub const MAX_EPOCHS_IN_FLIGHT: u64 = 16;

/// Whether a backup whose last applied epoch is `applied` may stage a chunk of `epoch`.
pub fn epoch_in_window(epoch: u64, applied: u64) -> bool {
    epoch > applied && epoch - applied <= MAX_EPOCHS_IN_FLIGHT
}

/// Whether this build accepts frames of protocol `version`.
pub fn version_supported(version: u16) -> bool {
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_stages_every_epoch_a_primary_may_have_in_flight() {
        // The primary's fullest window: epochs applied+1 ..= applied+MAX in flight, the backup
        // has applied (and acknowledged) nothing beyond `applied`.
        for applied in [0, 1, 1000] {
            for e in applied + 1..=applied + MAX_EPOCHS_IN_FLIGHT {
                assert!(epoch_in_window(e, applied), "epoch {e} after {applied}");
            }
            assert!(!epoch_in_window(applied, applied), "an applied epoch again");
            assert!(!epoch_in_window(
                applied + MAX_EPOCHS_IN_FLIGHT + 1,
                applied
            ));
        }
        assert!(!epoch_in_window(u64::MAX, 0));
    }
}
