//! The backup side of an epoch: stage decoded chunks, then at `Commit` verify everything and
//! apply it to the image in one step.
//!
//! [`EpochAssembler::commit`] checks, in order: the epoch follows the replica's; every chunk
//! `0..chunk_count` is there and the record count matches; every page is written at most once;
//! `Delta` results and `Ref` sources hash to their records' hashes (the `Ref` rule is in
//! [`crate::codec`]); the new image digest equals the `Commit`'s. Records without a hash
//! (chunk format 3) take the one derived here: a `Delta` the hash of its result, a `Ref` its
//! source's final hash; for them the digest is the check. Only then does it write to the
//! image: first `Zero`/`Full`/`Delta` pages, then `Ref` copies. A failed commit writes nothing
//! and leaves the replica as it was.

use super::decode::{DecodedChunk, DecodedRecord};
use super::{as_page, xor_pages, RecordKind};
use crate::digest::{hash_page, Digest, PageHash, PageTree, ZERO_PAGE_HASH};
use crate::limits::{Limits, Page, PAGE_SIZE};
use crate::message::Commit;

/// Guest memory the backup applies epochs into: its hot image (memfd-backed memory), or a
/// `Vec<u8>` in tests. Indices passed in are always below [`PageImage::page_count`].
pub trait PageImage {
    /// Number of pages.
    fn page_count(&self) -> u64;
    /// Copies page `index` into `out`.
    fn read_page(&self, index: u32, out: &mut Page);
    /// Overwrites page `index`.
    fn write_page(&mut self, index: u32, data: &Page);
    /// Zeroes page `index`.
    fn zero_page(&mut self, index: u32) {
        self.write_page(index, &[0u8; PAGE_SIZE]);
    }
}

fn page_range(index: u32) -> std::ops::Range<usize> {
    let start = index as usize * PAGE_SIZE;
    start..start + PAGE_SIZE
}

impl PageImage for [u8] {
    fn page_count(&self) -> u64 {
        (self.len() / PAGE_SIZE) as u64
    }
    fn read_page(&self, index: u32, out: &mut Page) {
        if let Some(src) = self.get(page_range(index)) {
            out.copy_from_slice(src);
        }
    }
    fn write_page(&mut self, index: u32, data: &Page) {
        if let Some(dst) = self.get_mut(page_range(index)) {
            dst.copy_from_slice(data);
        }
    }
    fn zero_page(&mut self, index: u32) {
        if let Some(dst) = self.get_mut(page_range(index)) {
            dst.fill(0);
        }
    }
}

impl PageImage for Vec<u8> {
    fn page_count(&self) -> u64 {
        self.as_slice().page_count()
    }
    fn read_page(&self, index: u32, out: &mut Page) {
        self.as_slice().read_page(index, out)
    }
    fn write_page(&mut self, index: u32, data: &Page) {
        self.as_mut_slice().write_page(index, data)
    }
    fn zero_page(&mut self, index: u32) {
        self.as_mut_slice().zero_page(index)
    }
}

/// Why an epoch was not applied. The image and the replica are unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A chunk or commit of another epoch.
    #[error("epoch {got} does not follow the replica's epoch {have}")]
    Epoch {
        /// The replica's epoch.
        have: u64,
        /// What arrived.
        got: u64,
    },
    /// A chunk for another epoch than the assembler's.
    #[error("chunk of epoch {got} given to the assembler of epoch {expected}")]
    ChunkEpoch {
        /// Assembler's epoch.
        expected: u64,
        /// Chunk's epoch.
        got: u64,
    },
    /// Two chunks with one sequence number.
    #[error("chunk {0} received twice")]
    DuplicateChunk(u32),
    /// Sequence number or chunk count over the limit.
    #[error("chunk {seq} is over the limit of {max} chunks per epoch")]
    TooManyChunks {
        /// The seq.
        seq: u32,
        /// The limit.
        max: u32,
    },
    /// More records staged than the image may have pages.
    #[error("{records} page records staged for one epoch, over the limit of {max}")]
    TooManyRecords {
        /// Records with this chunk.
        records: u64,
        /// `max_image_pages`.
        max: u64,
    },
    /// Chunks missing or extra at commit.
    #[error("commit announces {announced} chunks, {received} received (or seqs not 0..n)")]
    ChunkCount {
        /// In the Commit.
        announced: u32,
        /// Staged.
        received: u32,
    },
    /// Record count differs from the commit.
    #[error("commit announces {announced} pages, chunks hold {received}")]
    PageCount {
        /// In the Commit.
        announced: u32,
        /// Staged.
        received: u64,
    },
    /// The image is smaller or larger than the replica's page tree.
    #[error("image has {image} pages, replica {replica}")]
    ImageSize {
        /// Image pages.
        image: u64,
        /// Replica pages.
        replica: u32,
    },
    /// A page index outside the image.
    #[error("page {0} is outside the image")]
    PageOutOfRange(u32),
    /// A page written twice in one epoch.
    #[error("page {0} is written twice in one epoch")]
    DuplicatePage(u32),
    /// A `Ref` whose source is itself a `Ref` destination in this epoch.
    #[error("page {page} refers to page {src}, itself a Ref destination in this epoch")]
    RefChain {
        /// Destination.
        page: u32,
        /// Source.
        src: u32,
    },
    /// A `Ref` whose source does not hold the content it claims.
    #[error("page {page} refers to page {src}, whose content has another hash")]
    RefHash {
        /// Destination.
        page: u32,
        /// Source.
        src: u32,
    },
    /// A `Delta` that does not produce the content it claims (wrong base).
    #[error("page {0}: delta applied to the held content does not match its hash")]
    DeltaHash(u32),
    /// A `Full` record without its data page.
    #[error("page {0}: Full record without its data")]
    MissingData(u32),
    /// A `Zero` record that claims another hash than the zero page's.
    #[error("page {0}: Zero record with another hash than the zero page's")]
    ZeroHash(u32),
    /// A record of kind `Invalid` (never decoded; only in a hand-built chunk).
    #[error("page {0}: record of invalid kind")]
    InvalidRecord(u32),
    /// The image digest after the epoch differs from the primary's.
    #[error("image digest after epoch {epoch} is {ours}, the primary's is {theirs}")]
    Digest {
        /// The epoch.
        epoch: u64,
        /// Computed here.
        ours: Digest,
        /// From the Commit.
        theirs: Digest,
    },
}

/// What the backup knows about its image: the page hashes (verified) with their Merkle tree,
/// and the last committed epoch.
#[derive(Clone, Debug)]
pub struct Replica {
    tree: PageTree,
    epoch: u64,
    /// Per page: `(gen << 32) | (record number + 1)` while a commit is checked.
    mark: Vec<u64>,
    gen: u32,
}

impl Replica {
    /// An all-zero image of `pages` pages at epoch 0.
    pub fn zeroed(pages: u32) -> Self {
        Self::from_tree(PageTree::zeroed(pages), 0)
    }

    /// An image with these hashes at `epoch` (e.g. after loading a persisted image:
    /// `PageTree::from_image`).
    pub fn from_tree(tree: PageTree, epoch: u64) -> Self {
        let n = tree.page_count() as usize;
        Replica {
            tree,
            epoch,
            mark: vec![0; n],
            gen: 0,
        }
    }

    /// Last committed epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Number of pages.
    pub fn page_count(&self) -> u32 {
        self.tree.page_count()
    }

    /// The page hashes and tree.
    pub fn tree(&self) -> &PageTree {
        &self.tree
    }

    /// Digest of the image at [`Replica::epoch`].
    pub fn digest(&mut self) -> Digest {
        self.tree.digest()
    }

    fn next_gen(&mut self) -> u64 {
        self.gen = match self.gen.checked_add(1) {
            Some(g) => g,
            None => {
                self.mark.iter_mut().for_each(|m| *m = 0);
                1
            }
        };
        u64::from(self.gen) << 32
    }
}

/// What a successful commit did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitOutcome {
    /// The committed epoch.
    pub epoch: u64,
    /// Pages written.
    pub pages: u64,
    /// Image digest after it.
    pub digest: Digest,
}

/// Stages the decoded chunks of one epoch until its `Commit`.
#[derive(Debug)]
pub struct EpochAssembler {
    epoch: u64,
    limits: Limits,
    chunks: Vec<DecodedChunk>,
    seqs: std::collections::HashSet<u32>,
    records: u64,
}

impl EpochAssembler {
    /// The pages the staged chunks write, in chunk order (a page may appear in several chunks
    /// of an epoch only if they were sent so; the last one wins on apply).
    pub fn pages(&self) -> impl Iterator<Item = u32> + '_ {
        self.chunks
            .iter()
            .flat_map(|c| c.records.iter().map(|r| r.page))
    }

    /// An empty staging area for `epoch`.
    pub fn new(epoch: u64, limits: Limits) -> Self {
        EpochAssembler {
            epoch,
            limits,
            chunks: Vec::new(),
            seqs: Default::default(),
            records: 0,
        }
    }

    /// The epoch staged.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Chunks staged so far.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Stages a decoded chunk (any order).
    pub fn add(&mut self, chunk: DecodedChunk) -> Result<(), ApplyError> {
        if chunk.epoch != self.epoch {
            return Err(ApplyError::ChunkEpoch {
                expected: self.epoch,
                got: chunk.epoch,
            });
        }
        if chunk.seq >= self.limits.max_chunks_per_epoch {
            return Err(ApplyError::TooManyChunks {
                seq: chunk.seq,
                max: self.limits.max_chunks_per_epoch,
            });
        }
        // Each page is written at most once per epoch, so more records than pages can only be
        // an attack or a bug: refuse them before staging grows past the image size.
        let records = self.records + chunk.records.len() as u64;
        if records > self.limits.max_image_pages {
            return Err(ApplyError::TooManyRecords {
                records,
                max: self.limits.max_image_pages,
            });
        }
        if !self.seqs.insert(chunk.seq) {
            return Err(ApplyError::DuplicateChunk(chunk.seq));
        }
        self.records = records;
        self.chunks.push(chunk);
        Ok(())
    }

    /// Verifies the staged epoch against `commit` and `replica` and, if every check passes,
    /// applies it to `image` and advances `replica`. On error nothing was written.
    pub fn commit<I: PageImage + ?Sized>(
        &self,
        commit: &Commit,
        replica: &mut Replica,
        image: &mut I,
    ) -> Result<CommitOutcome, ApplyError> {
        if commit.epoch != self.epoch || Some(commit.epoch) != replica.epoch.checked_add(1) {
            return Err(ApplyError::Epoch {
                have: replica.epoch,
                got: commit.epoch,
            });
        }
        if image.page_count() != u64::from(replica.page_count()) {
            return Err(ApplyError::ImageSize {
                image: image.page_count(),
                replica: replica.page_count(),
            });
        }
        // Seqs are unique (checked in `add`), so n of them all below n are exactly 0..n.
        let n = self.chunks.len() as u32;
        if commit.chunk_count != n || self.seqs.iter().any(|&s| s >= n) {
            return Err(ApplyError::ChunkCount {
                announced: commit.chunk_count,
                received: n,
            });
        }
        if u64::from(commit.page_count) != self.records {
            return Err(ApplyError::PageCount {
                announced: commit.page_count,
                received: self.records,
            });
        }

        // Flatten records: g -> (chunk, record).
        let flat: Vec<(&DecodedChunk, &DecodedRecord)> = self
            .chunks
            .iter()
            .flat_map(|c| c.records.iter().map(move |r| (c, r)))
            .collect();
        let gen = replica.next_gen();
        let pages = replica.page_count();
        let mark_of = |mark: &[u64], page: u32| -> Option<usize> {
            match mark.get(page as usize) {
                Some(&m) if m >> 32 == gen >> 32 => ((m & 0xffff_ffff) as usize).checked_sub(1),
                _ => None,
            }
        };
        for (g, (_, r)) in flat.iter().enumerate() {
            let Some(m) = replica.mark.get_mut(r.page as usize) else {
                return Err(ApplyError::PageOutOfRange(r.page));
            };
            if *m >> 32 == gen >> 32 {
                return Err(ApplyError::DuplicatePage(r.page));
            }
            *m = gen | (g as u64 + 1);
        }

        // New hashes, verified where the record carries one, derived where it does not;
        // Delta results computed. First every record but `Ref`, then `Ref` from its source.
        let deltas = flat
            .iter()
            .filter(|(_, r)| r.kind == RecordKind::Delta)
            .count();
        let mut delta_buf = vec![0u8; deltas * PAGE_SIZE];
        let mut delta_slot = vec![0u32; flat.len()];
        let mut hashes = vec![ZERO_PAGE_HASH; flat.len()];
        let mut next_delta = 0usize;
        let mut base = [0u8; PAGE_SIZE];
        for (g, (c, r)) in flat.iter().enumerate() {
            hashes[g] = match r.kind {
                RecordKind::Zero => match r.hash {
                    Some(h) if h != ZERO_PAGE_HASH => return Err(ApplyError::ZeroHash(r.page)),
                    _ => ZERO_PAGE_HASH,
                },
                RecordKind::Full => {
                    let data = c.data_page(r.slot).ok_or(ApplyError::MissingData(r.page))?;
                    match r.hash {
                        // Verified against the data when the chunk was decoded.
                        Some(h) => h,
                        None => hash_page(data),
                    }
                }
                RecordKind::Delta => {
                    let xor = c.data_page(r.slot).ok_or(ApplyError::DeltaHash(r.page))?;
                    image.read_page(r.page, &mut base);
                    let out = &mut delta_buf[next_delta * PAGE_SIZE..(next_delta + 1) * PAGE_SIZE];
                    xor_pages(&base, xor, out);
                    let h = as_page(out)
                        .map(hash_page)
                        .ok_or(ApplyError::DeltaHash(r.page))?;
                    if r.hash.is_some_and(|claimed| claimed != h) {
                        return Err(ApplyError::DeltaHash(r.page));
                    }
                    delta_slot[g] = next_delta as u32;
                    next_delta += 1;
                    h
                }
                RecordKind::Ref => continue,
                RecordKind::Invalid => return Err(ApplyError::InvalidRecord(r.page)),
            };
        }
        for (g, (_, r)) in flat.iter().enumerate() {
            if r.kind != RecordKind::Ref {
                continue;
            }
            let expected: Option<PageHash> = match mark_of(&replica.mark, r.source) {
                Some(sg) => match flat.get(sg) {
                    Some((_, s)) if s.kind == RecordKind::Ref => {
                        return Err(ApplyError::RefChain {
                            page: r.page,
                            src: r.source,
                        })
                    }
                    Some(_) => hashes.get(sg).copied(),
                    None => None,
                },
                None => replica.tree.get(r.source).copied(),
            };
            let Some(h) = expected.filter(|h| r.hash.is_none_or(|claimed| claimed == *h)) else {
                return Err(ApplyError::RefHash {
                    page: r.page,
                    src: r.source,
                });
            };
            hashes[g] = h;
        }

        // Digest check on the tree, undone on mismatch.
        let mut old = Vec::with_capacity(flat.len());
        for ((_, r), h) in flat.iter().zip(&hashes) {
            let prev = replica.tree.set(r.page, *h).unwrap_or(ZERO_PAGE_HASH);
            old.push((r.page, prev));
        }
        let ours = replica.tree.digest();
        if ours != commit.digest {
            for (page, h) in old.into_iter().rev() {
                replica.tree.set(page, h);
            }
            replica.tree.digest();
            return Err(ApplyError::Digest {
                epoch: commit.epoch,
                ours,
                theirs: commit.digest,
            });
        }
        debug_assert!(flat.iter().all(|(_, r)| r.page < pages));

        // Apply: every check passed.
        for (g, (c, r)) in flat.iter().enumerate() {
            match r.kind {
                RecordKind::Zero => image.zero_page(r.page),
                RecordKind::Full => {
                    if let Some(p) = c.data_page(r.slot) {
                        image.write_page(r.page, p);
                    }
                }
                RecordKind::Delta => {
                    let at = delta_slot[g] as usize * PAGE_SIZE;
                    if let Some(p) = delta_buf.get(at..).and_then(as_page) {
                        image.write_page(r.page, p);
                    }
                }
                RecordKind::Ref | RecordKind::Invalid => {}
            }
        }
        for (_, r) in &flat {
            if r.kind == RecordKind::Ref {
                image.read_page(r.source, &mut base);
                image.write_page(r.page, &base);
            }
        }
        replica.epoch = commit.epoch;
        Ok(CommitOutcome {
            epoch: commit.epoch,
            pages: flat.len() as u64,
            digest: ours,
        })
    }
}
