//! The page codec: the memory stream of an epoch, as chunks of page records.
//!
//! ## Records
//! The primary encodes each dirty page of epoch `E` as one record:
//!
//! | kind | when | carries |
//! |---|---|---|
//! | (none) | blake3 equals the hash last sent for this page | nothing is sent |
//! | `Zero` (1) | the page is all zero | - |
//! | `Full` (2) | otherwise | the page, zstd-compressed with the chunk's other data pages |
//! | `Ref` (3) | the content is held by another page `source` (rule below) | `source` |
//! | `Delta` (4, format 2) | few bytes changed and the caller passed the previous content | `page XOR previous`, compressed like `Full` |
//!
//! In formats 1 and 2 every record carries the blake3 hash of the page's new content. The
//! decoder verifies it for `Full` pages as soon as a chunk is decoded, for `Delta` and `Ref`
//! pages at commit, and checks that `Zero` records carry the hash of the zero page.
//!
//! Format 3 records carry no hash (32 of the 44 bytes of a format-2 record): the backup derives
//! each page's hash itself, `Full` from the decompressed data, `Zero` as the zero page's,
//! `Delta` from the result of the XOR and `Ref` from its source's final content, both at commit.
//! Verification then rests on the `Commit`'s image digest (the Merkle root over all page
//! hashes, [`crate::digest`]), which [`EpochAssembler::commit`] checks *before* it writes
//! anything: a damaged or forged epoch is refused whole, with the image and the replica as they
//! were. Either way nothing unverified reaches the image.
//!
//! ## The `Ref` rule
//! `Ref(source)` for page `p` in epoch `E` means: *page `p` gets the content that page `source`
//! has at the end of epoch `E`*, where
//! * `source != p`, and `source` is **not itself the destination of a `Ref`** in epoch `E`;
//! * so `source`'s content at the end of `E` is either given by its own `Zero`/`Full`/`Delta`
//!   record of `E`, or, if `E` has no record for it, is its content at the start of `E` (the
//!   backup's image after `E - 1`).
//!
//! This makes the result independent of the order of chunks and of records: the backup stages
//! all chunks of `E` (they may arrive in any order over parallel streams), and at `Commit(E)`
//! first writes every `Zero`/`Full`/`Delta` page, then copies every `Ref` from its (now final)
//! source. `Delta` is relative to the page's own content at the start of `E`. The encoder takes
//! sources from pages that it sends as `Full`/`Delta` (or unchanged) in the same epoch, and from
//! its content index of the backup's image, for pages not dirtied in `E`.
//!
//! ## Chunk layout (the payload of a `Chunk` frame)
//! ```text
//!  0        2        4        8                16         20           24               28         32
//!  +--------+--------+--------+----------------+----------+------------+----------------+----------+
//!  | format | flags  | seq    | epoch u64      | records  | data_pages | compressed_len | reserved |
//!  | u16    | u16=0  | u32    |                | u32      | u32        | u32            | u32 = 0  |
//!  +--------+--------+--------+----------------+----------+------------+----------------+----------+
//!  | format 1, 2: records x 44 bytes:                                                            |
//!  |   page u32 | kind u8 | reserved [u8; 3] = 0 | source u32 (Ref, else 0) | blake3 hash [32]    |
//!  | format 3: records of 5 bytes (Ref: 9), no padding:                                          |
//!  |   kind u8 | page u32 | source u32 (Ref only)                                               |
//!  +----------------------------------------------------------------------------------------------+
//!  | one zstd frame of compressed_len bytes, decompressing to exactly data_pages x 4096 bytes:    |
//!  | the Full and Delta payloads in record order (empty when data_pages = 0)                       |
//!  +----------------------------------------------------------------------------------------------+
//! ```
//! The payload ends exactly after the zstd frame, so in format 3 the records section is the
//! `payload - 32 - compressed_len` bytes between header and data, and its `records` records
//! must fill it exactly. `format` is the memory-stream version: 1 (`Zero`, `Full`, `Ref`),
//! 2 (adds `Delta`) or 3 (as 2, records without hashes). A frame of protocol version 2 carries
//! formats 1 or 2; version 3 carries 1, 2 or 3 (a frame never carries a format newer than its
//! version). The encoder puts about 64 data pages (256 KiB) in a chunk.

mod apply;
mod decode;
mod encode;

pub use apply::{ApplyError, CommitOutcome, EpochAssembler, PageImage, Replica};
pub use decode::{decode_chunk, ChunkDecoder, DecodeError, DecodedChunk, DecodedRecord};
pub use encode::{
    summarize_pages, ChunkCompressor, ChunkPlan, DirtyPage, EncodeError, EncodedEpoch,
    EncoderConfig, EncoderState, EpochPlan, EpochStats, PageSummary,
};

use crate::limits::{Page, PAGE_SIZE};

/// Current memory-stream (chunk) format.
pub const CHUNK_FORMAT: u16 = 3;
/// Oldest chunk format still decoded.
pub const MIN_CHUNK_FORMAT: u16 = 1;
/// Size of the chunk header.
pub const CHUNK_HEADER_LEN: usize = 32;
/// Size of one record in chunk formats 1 and 2 (format 3: [`record_len`]).
pub const RECORD_LEN: usize = 44;
/// Size of a format-3 record without a source (`Zero`, `Full`, `Delta`).
pub const RECORD_LEN_V3: usize = 5;
/// Size of a format-3 `Ref` record.
pub const REF_RECORD_LEN_V3: usize = 9;

/// Size of a record of `kind` in chunk `format`.
pub fn record_len(format: u16, kind: RecordKind) -> usize {
    match (format >= 3, kind) {
        (false, _) => RECORD_LEN,
        (true, RecordKind::Ref) => REF_RECORD_LEN_V3,
        (true, _) => RECORD_LEN_V3,
    }
}

/// The smallest record of chunk `format` (so `records x min_record_len` bounds a chunk's
/// records section from below).
pub fn min_record_len(format: u16) -> usize {
    if format >= 3 {
        RECORD_LEN_V3
    } else {
        RECORD_LEN
    }
}

/// The largest record of chunk `format`.
pub fn max_record_len(format: u16) -> usize {
    if format >= 3 {
        REF_RECORD_LEN_V3
    } else {
        RECORD_LEN
    }
}

/// Whether records of chunk `format` carry the blake3 hash of their page (formats 1 and 2).
pub fn format_carries_hashes(format: u16) -> bool {
    format < 3
}

/// The chunk format an encoder uses for protocol `version`.
pub fn chunk_format_for(version: u16) -> u16 {
    version.clamp(MIN_CHUNK_FORMAT, CHUNK_FORMAT)
}

/// Whether a frame of protocol `version` may carry a chunk of `format`: a known format no newer
/// than the version (version 2: formats 1 and 2; version 3: 1, 2 and 3).
pub fn chunk_format_allowed(version: u16, format: u16) -> bool {
    (MIN_CHUNK_FORMAT..=CHUNK_FORMAT).contains(&format) && format <= version
}

/// Kind of a page record. `Invalid = 0` is never sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// Never sent.
    Invalid = 0,
    /// All-zero page.
    Zero = 1,
    /// Whole page in the chunk's data.
    Full = 2,
    /// Copy of another page (see the `Ref` rule in the module docs).
    Ref = 3,
    /// XOR against the page's content at the start of the epoch, in the chunk's data.
    Delta = 4,
}

impl RecordKind {
    /// The kind for a wire value allowed in chunk `format`.
    pub fn from_wire(v: u8, format: u16) -> Option<RecordKind> {
        match v {
            1 => Some(RecordKind::Zero),
            2 => Some(RecordKind::Full),
            3 => Some(RecordKind::Ref),
            4 if format >= 2 => Some(RecordKind::Delta),
            _ => None,
        }
    }

    /// Whether the record has a page of data in the chunk.
    pub fn has_data(self) -> bool {
        matches!(self, RecordKind::Full | RecordKind::Delta)
    }
}

/// Whether a page is all zero (a u64 OR-fold, vectorised by the compiler).
pub fn is_zero_page(page: &Page) -> bool {
    let (words, _) = page.as_chunks::<8>();
    words
        .chunks(64)
        .all(|blk| blk.iter().fold(0u64, |a, w| a | u64::from_ne_bytes(*w)) == 0)
}

/// Number of 8-byte words that differ between two pages.
pub(crate) fn differing_words(a: &Page, b: &Page) -> usize {
    let (wa, _) = a.as_chunks::<8>();
    let (wb, _) = b.as_chunks::<8>();
    wa.iter().zip(wb).filter(|(x, y)| x != y).count()
}

/// `out = a XOR b`.
pub(crate) fn xor_pages(a: &Page, b: &[u8], out: &mut [u8]) {
    for ((o, x), y) in out.iter_mut().zip(a.iter()).zip(b.iter()) {
        *o = x ^ y;
    }
}

/// Reads a `Page` from a slice of exactly `PAGE_SIZE` bytes.
pub(crate) fn as_page(s: &[u8]) -> Option<&Page> {
    s.first_chunk::<PAGE_SIZE>()
}
