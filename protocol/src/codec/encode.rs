//! The encoder: dirty pages of an epoch in, chunk frames and the epoch's digest out.
//!
//! The work is split so that the heavy parts run on any number of threads with no shared lock:
//! 1. [`summarize_pages`] (parallel, pure): zero check and blake3 of each dirty page.
//! 2. [`EncoderState::plan_epoch`] (one thread, cheap: a few hash-map look-ups per page): decides
//!    each page's record against the per-VM state (last-sent hashes, content index), updates
//!    that state and the image digest, and cuts the records into chunks.
//! 3. [`EpochPlan::encode_chunk`] (parallel, `&self`): compresses one chunk's data pages and
//!    writes its frame; each worker brings its own [`ChunkCompressor`].
//!
//! [`EncoderState::encode_epoch`] runs all three with scoped threads.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::Cursor;
use std::ops::Range;

use super::{
    chunk_format_for, differing_words, format_carries_hashes, is_zero_page, max_record_len,
    xor_pages, RecordKind, CHUNK_HEADER_LEN,
};
use crate::digest::{hash_page, Digest, PageHash, PageTree, ZERO_PAGE_HASH};
use crate::frame::{begin_frame, finish_frame, FrameKind};
use crate::limits::{Page, PAGE_SIZE};
use crate::message::Commit;
use crate::wire::{put_u16, put_u32, put_u64};
use crate::PROTOCOL_VERSION;

/// Why an epoch could not be encoded. After an error from [`EncoderState::plan_epoch`] nothing
/// changed; after an error from encoding chunks the state is already at the new epoch, so the
/// session should be resynchronised.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// Epochs must be encoded in order, each exactly once.
    #[error("epoch {got} encoded after epoch {last}: epochs must follow each other")]
    EpochOrder {
        /// The last epoch encoded.
        last: u64,
        /// The epoch asked for.
        got: u64,
    },
    /// A page index outside the image.
    #[error("page {index} is outside the image of {pages} pages")]
    PageOutOfRange {
        /// The index.
        index: u32,
        /// Image size.
        pages: u32,
    },
    /// The same page twice in one epoch.
    #[error("page {0} appears twice in one epoch")]
    DuplicatePage(u32),
    /// Summaries and pages do not match.
    #[error("{summaries} summaries for {pages} pages")]
    SummaryCount {
        /// Summaries given.
        summaries: usize,
        /// Pages given.
        pages: usize,
    },
    /// The pages given to [`EpochPlan::encode_chunk`] are not those planned.
    #[error("the pages passed to encode a chunk are not those of the plan")]
    PagesChanged,
    /// No chunk with that sequence number.
    #[error("chunk {0} is not in the plan")]
    NoSuchChunk(u32),
    /// zstd failed.
    #[error("zstd compression failed")]
    Compress(#[source] std::io::Error),
    /// An encoding thread panicked.
    #[error("an encoding thread panicked")]
    Worker,
    /// A chunk frame would exceed 4 GiB (impossible with sane settings).
    #[error("chunk frame too large")]
    ChunkTooLarge,
}

/// One dirty page handed to the encoder.
#[derive(Clone, Copy, Debug)]
pub struct DirtyPage<'a> {
    /// Page index (in the layout's page index space).
    pub index: u32,
    /// The page's content at capture (a copy in the staging buffer).
    pub data: &'a Page,
    /// Optional: the content this page had when last passed to the encoder (what the backup
    /// holds). With it the encoder may send a `Delta` (XOR) instead of the whole page. It must
    /// be exactly that content, or the backup will refuse the epoch.
    pub base: Option<&'a Page>,
}

/// Result of the parallel per-page pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSummary {
    /// blake3 of the page.
    pub hash: PageHash,
    /// The page is all zero.
    pub zero: bool,
    /// A base was given and differs from the page in at most a quarter of its 8-byte words.
    pub delta: bool,
    /// Rough compressibility class from the distinct byte values in a sample: 0 text-like,
    /// 1 code/data, 2 incompressible (random or already compressed). `Full` pages are grouped
    /// by class into chunks, so that zstd builds its entropy tables over similar content and
    /// incompressible pages do not spoil them for the others.
    pub class: u8,
}

/// Class limits on the distinct byte values among 256 bytes sampled every 16 bytes (uniform
/// random bytes give about 162, text about 40-70, x86 code 90-130).
const CLASS_LIMITS: [u32; 2] = [CLASS_TEXT_MAX, CLASS_CODE_MAX];
const CLASS_TEXT_MAX: u32 = 72;
const CLASS_CODE_MAX: u32 = 140;

fn page_class(page: &Page) -> u8 {
    let mut seen = [0u8; 256];
    let mut distinct = 0u32;
    for b in page.iter().step_by(16) {
        let s = &mut seen[*b as usize];
        distinct += u32::from(*s == 0);
        *s = 1;
    }
    CLASS_LIMITS.iter().filter(|&&l| distinct > l).count() as u8
}

/// Pages whose content differs from the base in more 8-byte words than this go `Full`.
const DELTA_MAX_DIFF_WORDS: usize = PAGE_SIZE / 8 / 4;

/// Step 1: zero check and blake3 of each page. Pure; split `pages` across threads at will and
/// concatenate the results in order.
pub fn summarize_pages(pages: &[DirtyPage<'_>]) -> Vec<PageSummary> {
    pages.iter().map(summarize).collect()
}

fn summarize(p: &DirtyPage<'_>) -> PageSummary {
    let zero = is_zero_page(p.data);
    let hash = if zero {
        ZERO_PAGE_HASH
    } else {
        hash_page(p.data)
    };
    let delta = !zero
        && p.base
            .is_some_and(|b| differing_words(b, p.data) <= DELTA_MAX_DIFF_WORDS);
    let class = if zero { 0 } else { page_class(p.data) };
    PageSummary {
        hash,
        zero,
        delta,
        class,
    }
}

/// Encoder settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncoderConfig {
    /// Protocol version negotiated in `Welcome`: it picks the chunk format
    /// ([`super::chunk_format_for`]; 1 disables `Delta`, 3 drops the hashes from records).
    pub version: u16,
    /// zstd level (1 is the measured sweet spot; negative levels are faster and larger).
    pub zstd_level: i32,
    /// `Full`/`Delta` pages per chunk (64 = 256 KiB zstd frames; must not exceed the
    /// receiver's `max_chunk_data_pages`).
    pub data_pages_per_chunk: u32,
    /// Records per chunk at most (must not exceed the receiver's `max_chunk_records`).
    pub records_per_chunk: u32,
    /// Look up identical content elsewhere in the backup's image (`Ref` records).
    pub dedup: bool,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            version: PROTOCOL_VERSION,
            zstd_level: 1,
            data_pages_per_chunk: 64,
            records_per_chunk: 4096,
            dedup: true,
        }
    }
}

/// Hasher for keys that are already uniform (a prefix of a blake3 hash).
#[derive(Default)]
struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type PrefixMap<V> = HashMap<u64, V, BuildHasherDefault<PrefixHasher>>;

fn prefix(h: &PageHash) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    u64::from_le_bytes(b)
}

/// Per-VM encoder state: the page hashes the backup holds (the hash last sent for each page)
/// with their Merkle tree, and a content index from hash to a page of the backup's image that
/// holds that content.
#[derive(Debug)]
pub struct EncoderState {
    config: EncoderConfig,
    tree: PageTree,
    /// Hash prefix -> a page that held that content when inserted; checked against `tree`
    /// before use, so stale entries only cost a missed `Ref`.
    index: PrefixMap<u32>,
    /// `stamp[p] == gen`: page `p` is dirty in the epoch being planned.
    stamp: Vec<u32>,
    gen: u32,
    epoch: u64,
    compressors: Vec<ChunkCompressor>,
}

/// Counts for one epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochStats {
    /// Dirty pages given.
    pub pages: u64,
    /// Unchanged (nothing sent).
    pub unchanged: u64,
    /// `Zero` records.
    pub zero: u64,
    /// `Ref` records.
    pub refs: u64,
    /// `Full` records.
    pub full: u64,
    /// `Delta` records.
    pub delta: u64,
    /// Chunk frame bytes (headers included); filled by [`EncoderState::encode_epoch`].
    pub wire_bytes: u64,
}

#[derive(Clone, Copy, Debug)]
struct PlannedRecord {
    /// Position in the `pages` slice.
    pos: u32,
    kind: RecordKind,
    source: u32,
}

/// One chunk of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkPlan {
    /// Sequence number in the epoch.
    pub seq: u32,
    records: Range<usize>,
    data_pages: u32,
    /// All its data pages look incompressible: compressed at [`DENSE_LEVEL`].
    dense: bool,
}

/// zstd level for chunks of incompressible-looking pages: fast, and on random bytes no larger
/// than level 1.
const DENSE_LEVEL: i32 = -7;

/// Step 2's result: every record of the epoch, cut into chunks.
#[derive(Debug)]
pub struct EpochPlan {
    /// The epoch.
    pub epoch: u64,
    /// Protocol version of the frames.
    pub version: u16,
    /// Image digest after the epoch.
    pub digest: Digest,
    /// Counts.
    pub stats: EpochStats,
    /// The chunks.
    pub chunks: Vec<ChunkPlan>,
    records: Vec<PlannedRecord>,
    /// The hashes of the pages, by position (copied from the summaries).
    hashes: Vec<PageHash>,
    page_indices: Vec<u32>,
}

/// A zstd context and scratch space for one encoding thread.
pub struct ChunkCompressor {
    zstd: zstd::bulk::Compressor<'static>,
    level: i32,
    current: i32,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for ChunkCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCompressor")
            .field("level", &self.level)
            .finish()
    }
}

impl ChunkCompressor {
    /// A compressor at zstd `level`.
    pub fn new(level: i32) -> Result<Self, EncodeError> {
        Ok(ChunkCompressor {
            zstd: zstd::bulk::Compressor::new(level).map_err(EncodeError::Compress)?,
            level,
            current: level,
            scratch: Vec::new(),
        })
    }
}

/// All chunks of an epoch, encoded.
#[derive(Debug)]
pub struct EncodedEpoch {
    /// The epoch.
    pub epoch: u64,
    /// One complete `Chunk` frame each (header included), in `seq` order; send them on any
    /// streams in any order.
    pub chunks: Vec<Vec<u8>>,
    /// Page records in the chunks.
    pub page_count: u32,
    /// Image digest after the epoch.
    pub digest: Digest,
    /// Counts.
    pub stats: EpochStats,
}

impl EncodedEpoch {
    /// The `Commit` to send after the chunks, with the VM state blob.
    pub fn commit(&self, state: Vec<u8>) -> Commit {
        Commit {
            epoch: self.epoch,
            chunk_count: self.chunks.len() as u32,
            page_count: self.page_count,
            digest: self.digest,
            state,
        }
    }
}

impl EncoderState {
    /// State for a backup that holds an all-zero image of `pages` pages at epoch 0 (a fresh
    /// backup, or one that answered `Welcome { resumed: false }`).
    pub fn new(pages: u32, config: EncoderConfig) -> Self {
        Self::with_tree(PageTree::zeroed(pages), 0, config)
    }

    /// State for a backup that holds an image with these page hashes at `epoch` (resume).
    pub fn from_tree(tree: PageTree, epoch: u64, config: EncoderConfig) -> Self {
        Self::with_tree(tree, epoch, config)
    }

    fn with_tree(tree: PageTree, epoch: u64, config: EncoderConfig) -> Self {
        let n = tree.page_count();
        let mut index = PrefixMap::default();
        for (i, h) in tree.hashes().iter().enumerate() {
            if *h != ZERO_PAGE_HASH {
                index.entry(prefix(h)).or_insert(i as u32);
            }
        }
        EncoderState {
            config,
            tree,
            index,
            stamp: vec![0; n as usize],
            gen: 0,
            epoch,
            compressors: Vec::new(),
        }
    }

    /// The last epoch encoded (the one the backup will hold once it commits everything sent).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The page hashes and tree of the image the backup will hold.
    pub fn tree(&self) -> &PageTree {
        &self.tree
    }

    /// The digest of that image.
    pub fn digest(&mut self) -> Digest {
        self.tree.digest()
    }

    /// Entries in the content index (at most the number of pages).
    pub fn index_len(&self) -> usize {
        self.index.len()
    }

    /// Settings.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// Step 2: decides every page's record and updates the state to the end of `epoch`, which
    /// must be the last epoch + 1. `summaries[i]` must be the summary of `pages[i]`.
    pub fn plan_epoch(
        &mut self,
        epoch: u64,
        pages: &[DirtyPage<'_>],
        summaries: &[PageSummary],
    ) -> Result<EpochPlan, EncodeError> {
        if Some(epoch) != self.epoch.checked_add(1) {
            return Err(EncodeError::EpochOrder {
                last: self.epoch,
                got: epoch,
            });
        }
        if summaries.len() != pages.len() || pages.len() > u32::MAX as usize {
            return Err(EncodeError::SummaryCount {
                summaries: summaries.len(),
                pages: pages.len(),
            });
        }
        let n = self.tree.page_count();
        self.gen = match self.gen.checked_add(1) {
            Some(g) => g,
            None => {
                self.stamp.iter_mut().for_each(|s| *s = 0);
                1
            }
        };
        let gen = self.gen;
        // Mark the dirty set (and validate it) before any decision: a `Ref` source taken from
        // the index must not be dirty in this epoch.
        for (i, p) in pages.iter().enumerate() {
            let Some(s) = self.stamp.get_mut(p.index as usize) else {
                self.unmark(&pages[..i]);
                return Err(EncodeError::PageOutOfRange {
                    index: p.index,
                    pages: n,
                });
            };
            if *s == gen {
                self.unmark(&pages[..i]);
                return Err(EncodeError::DuplicatePage(p.index));
            }
            *s = gen;
        }

        let delta_ok = chunk_format_for(self.config.version) >= 2;
        let mut stats = EpochStats {
            pages: pages.len() as u64,
            ..EpochStats::default()
        };
        let mut records = Vec::with_capacity(pages.len());
        // Content sent (or kept) in this epoch: hash prefix -> position in `pages`.
        let mut epoch_map: PrefixMap<u32> = PrefixMap::default();
        for (pos, (p, s)) in pages.iter().zip(summaries).enumerate() {
            let pos = pos as u32;
            let old = self.tree.get(p.index).copied().unwrap_or(ZERO_PAGE_HASH);
            if s.hash == old {
                stats.unchanged += 1;
                if !s.zero {
                    epoch_map.entry(prefix(&s.hash)).or_insert(pos);
                }
                continue;
            }
            if s.zero {
                stats.zero += 1;
                records.push(PlannedRecord {
                    pos,
                    kind: RecordKind::Zero,
                    source: 0,
                });
                continue;
            }
            let key = prefix(&s.hash);
            let mut source = None;
            if self.config.dedup {
                if let Some(&q) = epoch_map.get(&key) {
                    if summaries.get(q as usize).is_some_and(|x| x.hash == s.hash) {
                        source = pages.get(q as usize).map(|x| x.index);
                    }
                }
                if source.is_none() {
                    if let Some(&q) = self.index.get(&key) {
                        let clean = self.stamp.get(q as usize).is_some_and(|&st| st != gen);
                        if q != p.index && clean && self.tree.get(q) == Some(&s.hash) {
                            source = Some(q);
                        }
                    }
                }
            }
            match source {
                Some(q) => {
                    stats.refs += 1;
                    records.push(PlannedRecord {
                        pos,
                        kind: RecordKind::Ref,
                        source: q,
                    });
                }
                None => {
                    let kind = if delta_ok && s.delta && p.base.is_some() {
                        stats.delta += 1;
                        RecordKind::Delta
                    } else {
                        stats.full += 1;
                        RecordKind::Full
                    };
                    epoch_map.entry(key).or_insert(pos);
                    records.push(PlannedRecord {
                        pos,
                        kind,
                        source: 0,
                    });
                }
            }
        }

        // The backup's image at the end of the epoch. An index entry for the content a page
        // loses is dropped, so the index never holds more entries than the image has pages.
        for (p, s) in pages.iter().zip(summaries) {
            let old = self.tree.set(p.index, s.hash).unwrap_or(ZERO_PAGE_HASH);
            if old != s.hash {
                let k = prefix(&old);
                if self.index.get(&k) == Some(&p.index) {
                    self.index.remove(&k);
                }
            }
            if !s.zero {
                self.index.insert(prefix(&s.hash), p.index);
            }
        }
        let digest = self.tree.digest();
        self.epoch = epoch;

        // Group Full pages by class (records without data stay first, in class 0).
        let class = |r: &PlannedRecord| match r.kind {
            RecordKind::Full => summaries.get(r.pos as usize).map_or(0, |s| s.class),
            _ => 0,
        };
        records.sort_by_key(class);

        // Cut into chunks: at most `per_data` data pages and `per_rec` records each, and a new
        // chunk where the class of the data pages changes.
        let per_data = self.config.data_pages_per_chunk.max(1);
        let per_rec = self.config.records_per_chunk.max(1) as usize;
        let mut chunks = Vec::new();
        let mut start = 0usize;
        let mut data = 0u32;
        let mut chunk_class = None;
        for (i, r) in records.iter().enumerate() {
            let c = r.kind.has_data().then(|| class(r));
            let class_change = c.is_some() && chunk_class.is_some() && c != chunk_class;
            if i - start == per_rec || (c.is_some() && (data == per_data || class_change)) {
                chunks.push(ChunkPlan {
                    seq: chunks.len() as u32,
                    records: start..i,
                    data_pages: data,
                    dense: chunk_class == Some(2),
                });
                start = i;
                data = 0;
                chunk_class = None;
            }
            if c.is_some() {
                data += 1;
                chunk_class = c;
            }
        }
        if start < records.len() {
            chunks.push(ChunkPlan {
                seq: chunks.len() as u32,
                records: start..records.len(),
                data_pages: data,
                dense: chunk_class == Some(2),
            });
        }
        Ok(EpochPlan {
            epoch,
            version: self.config.version,
            digest,
            stats,
            chunks,
            records,
            hashes: summaries.iter().map(|s| s.hash).collect(),
            page_indices: pages.iter().map(|p| p.index).collect(),
        })
    }

    fn unmark(&mut self, pages: &[DirtyPage<'_>]) {
        let prev = self.gen.wrapping_sub(1);
        for p in pages {
            if let Some(s) = self.stamp.get_mut(p.index as usize) {
                *s = prev;
            }
        }
    }

    /// Steps 1 to 3 on `threads` scoped threads (1 = the calling thread only): the chunk frames
    /// of `epoch`, ready to send, and what the `Commit` needs.
    pub fn encode_epoch(
        &mut self,
        epoch: u64,
        pages: &[DirtyPage<'_>],
        threads: usize,
    ) -> Result<EncodedEpoch, EncodeError> {
        let threads = threads.max(1);
        let summaries = if threads == 1 || pages.len() < 64 {
            summarize_pages(pages)
        } else {
            let per = pages.len().div_ceil(threads);
            std::thread::scope(|s| {
                let parts: Vec<_> = pages
                    .chunks(per)
                    .map(|part| s.spawn(move || summarize_pages(part)))
                    .collect();
                let mut out = Vec::with_capacity(pages.len());
                for h in parts {
                    // A worker that panicked cannot happen (summarize is panic-free); treat it
                    // like one that returned nothing so the count check below reports it.
                    out.extend(h.join().unwrap_or_default());
                }
                out
            })
        };
        let plan = self.plan_epoch(epoch, pages, &summaries)?;
        while self.compressors.len() < threads {
            self.compressors
                .push(ChunkCompressor::new(self.config.zstd_level)?);
        }
        let n = plan.chunks.len();
        let mut frames: Vec<Vec<u8>> = vec![Vec::new(); n];
        if threads == 1 || n < 2 {
            let c = &mut self.compressors[0];
            for (seq, out) in frames.iter_mut().enumerate() {
                plan.encode_chunk(seq as u32, pages, c, out)?;
            }
        } else {
            let per = n.div_ceil(threads);
            let plan = &plan;
            std::thread::scope(|s| {
                let jobs: Vec<_> = frames
                    .chunks_mut(per)
                    .zip(self.compressors.iter_mut())
                    .enumerate()
                    .map(|(t, (outs, c))| {
                        s.spawn(move || -> Result<(), EncodeError> {
                            for (k, out) in outs.iter_mut().enumerate() {
                                plan.encode_chunk((t * per + k) as u32, pages, c, out)?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                jobs.into_iter()
                    .try_for_each(|j| j.join().unwrap_or(Err(EncodeError::Worker)))
            })?;
        }
        let mut stats = plan.stats;
        stats.wire_bytes = frames.iter().map(|f| f.len() as u64).sum();
        Ok(EncodedEpoch {
            epoch,
            chunks: frames,
            page_count: plan.records.len() as u32,
            digest: plan.digest,
            stats,
        })
    }
}

impl EpochPlan {
    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Page records in all chunks (the `Commit`'s `page_count`).
    pub fn page_count(&self) -> u32 {
        self.records.len() as u32
    }

    /// Step 3: appends the complete `Chunk` frame `seq` to `out`. `pages` must be the slice
    /// given to [`EncoderState::plan_epoch`]. Callable from any thread.
    pub fn encode_chunk(
        &self,
        seq: u32,
        pages: &[DirtyPage<'_>],
        compressor: &mut ChunkCompressor,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let chunk = self
            .chunks
            .get(seq as usize)
            .ok_or(EncodeError::NoSuchChunk(seq))?;
        if pages.len() != self.page_indices.len() {
            return Err(EncodeError::PagesChanged);
        }
        let records = self
            .records
            .get(chunk.records.clone())
            .ok_or(EncodeError::PagesChanged)?;
        let frame_start = begin_frame(out, self.version, FrameKind::Chunk);
        let format = chunk_format_for(self.version);
        put_u16(out, format);
        put_u16(out, 0);
        put_u32(out, seq);
        put_u64(out, self.epoch);
        put_u32(out, records.len() as u32);
        put_u32(out, chunk.data_pages);
        let clen_at = out.len();
        put_u32(out, 0);
        put_u32(out, 0);
        debug_assert_eq!(out.len() - frame_start, 16 + CHUNK_HEADER_LEN);
        out.reserve(records.len() * max_record_len(format));
        let with_hash = format_carries_hashes(format);
        let scratch = &mut compressor.scratch;
        scratch.clear();
        for r in records {
            let pos = r.pos as usize;
            let (Some(page), Some(hash), Some(&index)) = (
                pages.get(pos),
                self.hashes.get(pos),
                self.page_indices.get(pos),
            ) else {
                return Err(EncodeError::PagesChanged);
            };
            if page.index != index {
                return Err(EncodeError::PagesChanged);
            }
            if with_hash {
                put_u32(out, index);
                out.push(r.kind as u8);
                out.extend_from_slice(&[0, 0, 0]);
                put_u32(out, r.source);
                out.extend_from_slice(hash);
            } else {
                // Format 3: the backup derives the hash; the encoder keeps it for dedup.
                out.push(r.kind as u8);
                put_u32(out, index);
                if r.kind == RecordKind::Ref {
                    put_u32(out, r.source);
                }
            }
            match r.kind {
                RecordKind::Full => scratch.extend_from_slice(page.data),
                RecordKind::Delta => {
                    let base = page.base.ok_or(EncodeError::PagesChanged)?;
                    let at = scratch.len();
                    scratch.resize(at + PAGE_SIZE, 0);
                    xor_pages(page.data, base, &mut scratch[at..]);
                }
                _ => {}
            }
        }
        if !scratch.is_empty() {
            let level = if chunk.dense {
                DENSE_LEVEL
            } else {
                compressor.level
            };
            if level != compressor.current {
                compressor
                    .zstd
                    .set_compression_level(level)
                    .map_err(EncodeError::Compress)?;
                compressor.current = level;
            }
            let before = out.len();
            out.reserve(zstd::zstd_safe::compress_bound(scratch.len()));
            let mut cur = Cursor::new(&mut *out);
            cur.set_position(before as u64);
            let written = compressor
                .zstd
                .compress_to_buffer(scratch.as_slice(), &mut cur)
                .map_err(EncodeError::Compress)?;
            let clen = u32::try_from(written).map_err(|_| EncodeError::ChunkTooLarge)?;
            out[clen_at..clen_at + 4].copy_from_slice(&clen.to_le_bytes());
        }
        finish_frame(out, frame_start).ok_or(EncodeError::ChunkTooLarge)?;
        Ok(())
    }
}
