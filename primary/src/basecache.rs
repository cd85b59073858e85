//! The delta base cache: what the backup holds for pages this session sent, so that a page
//! sent again can go as a `Delta` (`page XOR base`, see the codec's module docs) instead of
//! whole.
//!
//! After each epoch is encoded, the encoder thread remembers every page of it with the hash
//! the encoder recorded for it ([`BaseCache::remember`]). That is the content the backup holds
//! once the epoch commits, and since the backup applies epochs in order and every encoded
//! epoch is applied (or the session ends), it is the content at the start of the next epoch
//! the encoder plans. A base is handed out only when its hash equals the hash the encoder
//! believes the backup holds for that page ([`BaseCache::get`]), so a page that changed in
//! some way the cache did not see (a delta resync's `Zero` records, a `Ref` copied into it:
//! both update the encoder's hashes like any record) simply gets no base: a stale entry can
//! cost a `Full` record, never a wrong `Delta`.
//!
//! The cache belongs to one session (a new session starts from a full or delta resync with no
//! known base) and is bounded: at most `capacity` pages, allocated in blocks of 2 MiB as pages
//! are admitted (zero pages are never stored), in anonymous huge-page memory
//! ([`HugeBuffer`]): a move drops the cache inside its eviction time, and 512 MiB of 4 KiB
//! pages takes the host about 35 ms to free, against about 2 ms in 2 MiB pages. When it is full, a new page evicts one chosen
//! by the CLOCK rule: the hand skips (once) pages that were sent again since they were
//! admitted, so the pages a guest keeps rewriting stay, and the first of those read once by a
//! sync go first. Every operation is O(1) amortized.
//!
//! ```text
//!  slot_of[page] --> slot --> blocks[slot / 512][slot % 512]  (4 KiB content)
//!                             hashes[slot], owner[slot], referenced[slot]
//! ```

use understudy_protocol::{DirtyPage, Page, PageHash, PageTree, PAGE_SIZE, ZERO_PAGE_HASH};
use understudy_vmm::HugeBuffer;

/// The cache's bound in bytes for a session: what the move's request asked for, else what the
/// primary was configured with, else [`crate::DEFAULT_MOVE_DELTA_CACHE`] for a move and
/// nothing for protection: there it would cost a memcpy per dirty page in every epoch and its
/// memory for as long as the VM is protected, which only a link-bound primary should pay.
pub(crate) fn budget(requested: Option<u64>, configured: Option<u64>, moving: bool) -> u64 {
    requested.or(configured).unwrap_or(if moving {
        crate::DEFAULT_MOVE_DELTA_CACHE
    } else {
        0
    })
}

/// Pages per allocation block (2 MiB).
const BLOCK_PAGES: usize = 512;
const NONE: u32 = u32::MAX;

/// The content last sent for up to `capacity` pages; see the module docs.
pub(crate) struct BaseCache {
    /// Page index -> slot, or `NONE`. Empty when the cache is disabled.
    slot_of: Vec<u32>,
    /// Slot -> page index, or `NONE` for a free slot.
    owner: Vec<u32>,
    /// Slot -> blake3 of its content.
    hashes: Vec<PageHash>,
    /// Slot -> sent again since admitted or since the hand last passed (CLOCK bit).
    referenced: Vec<bool>,
    /// Slot contents, `BLOCK_PAGES` pages per block (the last one may be shorter).
    blocks: Vec<HugeBuffer>,
    /// Slots emptied by [`BaseCache::forget`], reused first.
    free: Vec<u32>,
    /// The CLOCK hand: the next slot considered for eviction.
    hand: u32,
    /// Slots at most.
    capacity: u32,
}

impl BaseCache {
    /// A cache for an image of `pages` pages holding at most `bytes` of page content (rounded
    /// down to whole pages; more than the image is never used). 0 disables it.
    pub(crate) fn new(pages: u32, bytes: u64) -> Self {
        let capacity = (bytes / PAGE_SIZE as u64).min(u64::from(pages)) as u32;
        BaseCache {
            slot_of: if capacity > 0 {
                vec![NONE; pages as usize]
            } else {
                Vec::new()
            },
            owner: Vec::new(),
            hashes: Vec::new(),
            referenced: Vec::new(),
            blocks: Vec::new(),
            free: Vec::new(),
            hand: 0,
            capacity,
        }
    }

    /// The encoder's input for one epoch: page `indices[k]` holds `bytes`' k-th page, or zero
    /// for every page with `zeroes` (a delta resync's first epoch). A page gets a base only
    /// where the cache holds the content whose hash `tree` (the encoder's, before the epoch)
    /// says the backup holds.
    pub(crate) fn pages<'a>(
        &'a self,
        tree: &PageTree,
        indices: &[u32],
        bytes: &'a [u8],
        zeroes: bool,
    ) -> Vec<DirtyPage<'a>> {
        static ZERO: Page = [0u8; PAGE_SIZE];
        if zeroes {
            return indices
                .iter()
                .map(|&index| DirtyPage {
                    index,
                    data: &ZERO,
                    base: None,
                })
                .collect();
        }
        indices
            .iter()
            .zip(bytes.chunks_exact(PAGE_SIZE))
            .map(|(&index, data)| DirtyPage {
                index,
                data: data.first_chunk::<PAGE_SIZE>().unwrap_or(&ZERO),
                base: tree.get(index).and_then(|held| self.get(index, held)),
            })
            .collect()
    }

    /// After the epoch given to [`BaseCache::pages`] was encoded, with `tree` the encoder's
    /// hashes after it: remembers each page's content with the hash the encoder recorded for
    /// it. Zero pages are forgotten (they need no copy, and a `Full` of a nearly zero page
    /// compresses as well as its `Delta` would).
    pub(crate) fn encoded(&mut self, tree: &PageTree, indices: &[u32], bytes: &[u8], zeroes: bool) {
        if !self.enabled() {
            return;
        }
        if zeroes {
            indices.iter().for_each(|&i| self.forget(i));
            return;
        }
        for (&index, data) in indices.iter().zip(bytes.chunks_exact(PAGE_SIZE)) {
            match (tree.get(index), data.first_chunk::<PAGE_SIZE>()) {
                (Some(h), Some(data)) if *h != ZERO_PAGE_HASH => self.remember(index, data, h),
                _ => self.forget(index),
            }
        }
    }

    /// Whether the cache stores anything at all.
    pub(crate) fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// The content cached for page `index` if its hash is `held` (the hash of what the backup
    /// holds there), else `None`.
    pub(crate) fn get(&self, index: u32, held: &PageHash) -> Option<&Page> {
        let slot = *self.slot_of.get(index as usize)?;
        if slot == NONE || self.hashes.get(slot as usize) != Some(held) {
            return None;
        }
        self.content(slot)
    }

    /// Page `index` now holds `data`, whose blake3 is `hash`, on the backup (once the epoch
    /// just encoded commits). Pages outside the image are ignored.
    pub(crate) fn remember(&mut self, index: u32, data: &Page, hash: &PageHash) {
        let Some(&at) = self.slot_of.get(index as usize) else {
            return;
        };
        let slot = if at != NONE {
            // Sent again: a page the guest keeps rewriting, worth keeping.
            self.referenced[at as usize] = true;
            at
        } else {
            let Some(s) = self.admit() else { return };
            self.slot_of[index as usize] = s;
            self.owner[s as usize] = index;
            s
        };
        self.hashes[slot as usize] = *hash;
        if let Some(c) = self.content_mut(slot) {
            c.copy_from_slice(data);
        }
    }

    /// Page `index` is no longer known (it became zero, or its content is not what it was).
    pub(crate) fn forget(&mut self, index: u32) {
        let Some(at) = self.slot_of.get_mut(index as usize) else {
            return;
        };
        let slot = std::mem::replace(at, NONE);
        if slot != NONE {
            self.owner[slot as usize] = NONE;
            self.referenced[slot as usize] = false;
            self.free.push(slot);
        }
    }

    /// Pages cached now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.owner.len() - self.free.len()
    }

    /// Bytes of page content allocated (what the cache costs in memory, bookkeeping aside).
    pub(crate) fn bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.len() as u64).sum()
    }

    /// A slot for a new page: a free one, a new one while below capacity, or the CLOCK victim.
    fn admit(&mut self) -> Option<u32> {
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        let used = self.owner.len() as u32;
        if used < self.capacity {
            if (used as usize).is_multiple_of(BLOCK_PAGES) {
                let len = BLOCK_PAGES.min((self.capacity - used) as usize);
                match HugeBuffer::new(len * PAGE_SIZE) {
                    Ok(b) => self.blocks.push(b),
                    Err(e) => {
                        // The host is out of memory (or mappings): the cache stops growing
                        // and recycles what it has; pages it cannot hold go as Full records.
                        tracing::warn!(error = %e, "the delta base cache cannot grow");
                        self.capacity = used;
                        return self.admit();
                    }
                }
            }
            self.owner.push(NONE);
            self.hashes.push([0; 32]);
            self.referenced.push(false);
            return Some(used);
        }
        if used == 0 {
            return None;
        }
        // Full (and no slot is free): every slot has an owner. Each pass of the hand clears
        // a bit that a later `remember` set, so this is O(1) amortized.
        loop {
            let s = self.hand;
            self.hand = (self.hand + 1) % used;
            let r = &mut self.referenced[s as usize];
            if std::mem::take(r) {
                continue;
            }
            let old = std::mem::replace(&mut self.owner[s as usize], NONE);
            if let Some(o) = self.slot_of.get_mut(old as usize) {
                *o = NONE;
            }
            return Some(s);
        }
    }

    fn content(&self, slot: u32) -> Option<&Page> {
        let s = slot as usize;
        let block = self.blocks.get(s / BLOCK_PAGES)?;
        let at = (s % BLOCK_PAGES) * PAGE_SIZE;
        block.get(at..at + PAGE_SIZE)?.first_chunk::<PAGE_SIZE>()
    }

    fn content_mut(&mut self, slot: u32) -> Option<&mut [u8]> {
        let s = slot as usize;
        let block = self.blocks.get_mut(s / BLOCK_PAGES)?;
        let at = (s % BLOCK_PAGES) * PAGE_SIZE;
        block.get_mut(at..at + PAGE_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(v: u8) -> Page {
        [v; PAGE_SIZE]
    }

    fn hash(v: u8) -> PageHash {
        [v; 32]
    }

    #[test]
    fn a_base_is_given_only_for_the_hash_the_backup_holds() {
        let mut c = BaseCache::new(16, 4 * PAGE_SIZE as u64);
        assert!(c.enabled());
        assert_eq!(c.get(3, &hash(1)), None);
        c.remember(3, &page(1), &hash(1));
        assert_eq!(c.get(3, &hash(1)), Some(&page(1)));
        // The backup holds something else there (a Ref, a Zero record): no base.
        assert_eq!(c.get(3, &hash(2)), None);
        // Sent again with new content: the entry follows.
        c.remember(3, &page(2), &hash(2));
        assert_eq!(c.get(3, &hash(2)), Some(&page(2)));
        assert_eq!(c.get(3, &hash(1)), None);
        assert_eq!(c.len(), 1);
        // Pages outside the image are ignored.
        c.remember(16, &page(1), &hash(1));
        assert_eq!(c.get(16, &hash(1)), None);
    }

    #[test]
    fn forgetting_frees_the_slot_for_another_page() {
        let mut c = BaseCache::new(16, 2 * PAGE_SIZE as u64);
        c.remember(0, &page(1), &hash(1));
        c.remember(1, &page(2), &hash(2));
        c.forget(0);
        assert_eq!(c.get(0, &hash(1)), None);
        assert_eq!(c.len(), 1);
        c.remember(2, &page(3), &hash(3));
        // Page 1 was not evicted: the freed slot was used.
        assert_eq!(c.get(1, &hash(2)), Some(&page(2)));
        assert_eq!(c.get(2, &hash(3)), Some(&page(3)));
        c.forget(0);
        c.forget(99);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn it_never_holds_more_than_its_capacity_and_keeps_pages_sent_again() {
        let cap = 3 * BLOCK_PAGES as u32 / 2;
        let mut c = BaseCache::new(10_000, u64::from(cap) * PAGE_SIZE as u64 + 100);
        // A sync reads every page once; a few of them are rewritten and sent again.
        for i in 0..cap {
            c.remember(i, &page(i as u8), &hash(i as u8));
        }
        for i in [5, 7] {
            c.remember(i, &page(9), &hash(9));
        }
        for i in cap..2 * cap {
            c.remember(i, &page(i as u8), &hash(i as u8));
            assert!(c.len() <= cap as usize);
        }
        assert_eq!(c.len(), cap as usize);
        // Two blocks: one whole and one half.
        assert_eq!(c.bytes(), u64::from(cap) * PAGE_SIZE as u64);
        // The rewritten pages survived a whole turn of the hand; the others read once went.
        assert_eq!(c.get(5, &hash(9)), Some(&page(9)));
        assert_eq!(c.get(7, &hash(9)), Some(&page(9)));
        assert_eq!(c.get(6, &hash(6)), None);
        assert_eq!(
            c.get(2 * cap - 1, &hash((2 * cap - 1) as u8)).map(|p| p[0]),
            Some((2 * cap - 1) as u8)
        );
        // Every page is where the map says.
        for i in 0..2 * cap {
            if let Some(p) = c.slot_of.get(i as usize).filter(|&&s| s != NONE) {
                assert_eq!(c.owner[*p as usize], i);
            }
        }
    }

    #[test]
    fn zero_bytes_or_a_tiny_budget_disable_it() {
        for bytes in [0, PAGE_SIZE as u64 - 1] {
            let mut c = BaseCache::new(16, bytes);
            assert!(!c.enabled());
            c.remember(1, &page(1), &hash(1));
            assert_eq!(c.get(1, &hash(1)), None);
            assert_eq!((c.len(), c.bytes()), (0, 0));
        }
        // More than the image holds is capped at the image.
        let c = BaseCache::new(4, 1 << 30);
        assert_eq!(c.capacity, 4);
    }

    /// The primary's encoder with this cache, and the backup's decoder and apply, over a run
    /// of epochs like a move's.
    struct Sim {
        guest: Vec<u8>,
        encoder: understudy_protocol::EncoderState,
        cache: BaseCache,
        replica: understudy_protocol::Replica,
        image: Vec<u8>,
        epoch: u64,
        rng: u64,
    }

    impl Sim {
        fn new(pages: u32, cache_pages: u64) -> Self {
            Sim {
                guest: vec![0; pages as usize * PAGE_SIZE],
                encoder: understudy_protocol::EncoderState::new(pages, Default::default()),
                cache: BaseCache::new(pages, cache_pages * PAGE_SIZE as u64),
                replica: understudy_protocol::Replica::zeroed(pages),
                image: vec![0; pages as usize * PAGE_SIZE],
                epoch: 0,
                rng: 0x9e37_79b9_7f4a_7c15,
            }
        }

        fn word(&mut self) -> u64 {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng
        }

        fn page_mut(&mut self, i: u32) -> &mut [u8] {
            let at = i as usize * PAGE_SIZE;
            &mut self.guest[at..at + PAGE_SIZE]
        }

        /// Random (incompressible) content.
        fn fill(&mut self, i: u32) {
            let words: Vec<u64> = (0..PAGE_SIZE / 8).map(|_| self.word()).collect();
            for (w, b) in words.iter().zip(self.page_mut(i).chunks_exact_mut(8)) {
                b.copy_from_slice(&w.to_le_bytes());
            }
        }

        /// What the bench's guest does: one 8-byte word of the page changes.
        fn touch(&mut self, i: u32) {
            let w = self.word();
            let at = (w as usize % (PAGE_SIZE / 8)) * 8;
            self.page_mut(i)[at..at + 8].copy_from_slice(&w.to_le_bytes());
        }

        /// Captures, encodes, decodes and applies one epoch of `indices`; the backup must end
        /// with exactly the guest's memory.
        fn ship(&mut self, indices: &[u32], zeroes: bool) -> understudy_protocol::EpochStats {
            use understudy_protocol::{
                ChunkDecoder, EpochAssembler, FrameDecoder, Limits, Message,
            };
            let staging: Vec<u8> = if zeroes {
                Vec::new()
            } else {
                indices
                    .iter()
                    .flat_map(|&i| self.page_mut(i).to_vec())
                    .collect()
            };
            self.epoch += 1;
            let dirty = self
                .cache
                .pages(self.encoder.tree(), indices, &staging, zeroes);
            let enc = self
                .encoder
                .encode_epoch(self.epoch, &dirty, 2)
                .expect("encode");
            drop(dirty);
            self.cache
                .encoded(self.encoder.tree(), indices, &staging, zeroes);
            assert!(self.cache.len() as u32 <= self.cache.capacity);

            let limits = Limits::default();
            let mut staged = EpochAssembler::new(self.epoch, limits.clone());
            let mut chunks =
                ChunkDecoder::new(limits.clone(), u64::from(self.replica.page_count()));
            for frame in &enc.chunks {
                let mut fd = FrameDecoder::new(limits.clone());
                fd.push(frame);
                let Ok(Some(Message::Chunk(c))) = fd.next() else {
                    panic!("not a chunk frame");
                };
                staged
                    .add(chunks.decode_frame(&c).expect("decode"))
                    .expect("stage");
            }
            staged
                .commit(&enc.commit(Vec::new()), &mut self.replica, &mut self.image)
                .unwrap_or_else(|e| panic!("epoch {} refused: {e}", self.epoch));
            if zeroes {
                for &i in indices {
                    self.page_mut(i).fill(0);
                }
            }
            assert!(
                self.image == self.guest,
                "epoch {}: the images differ",
                self.epoch
            );
            enc.stats
        }
    }

    #[test]
    fn epochs_with_bases_from_the_cache_rebuild_the_guest_exactly() {
        let pages = 64u32;
        // Room for 24 of the 48 non-zero pages: evictions happen.
        let mut s = Sim::new(pages, 24);
        for i in 0..48 {
            s.fill(i);
        }
        let all: Vec<u32> = (0..pages).collect();
        let sync = s.ship(&all, false);
        assert_eq!(sync.delta, 0);
        assert_eq!(s.cache.len(), 24);

        // Live rounds: one word of many pages changes; the cached ones go as deltas.
        let round: Vec<u32> = (0..48).step_by(2).collect();
        for &i in &round {
            s.touch(i);
        }
        let r1 = s.ship(&round, false);
        assert!(r1.delta > 0 && r1.delta <= 24, "{r1:?}");
        // The same pages again: now all of them are cached (pages sent twice stay).
        for &i in &round {
            s.touch(i);
        }
        let r2 = s.ship(&round, false);
        assert_eq!(r2.delta, round.len() as u64, "{r2:?}");

        // Page 4 becomes zero, page 6 a copy of page 7 (a Ref), page 8 changes a word.
        s.page_mut(4).fill(0);
        let seven = s.page_mut(7).to_vec();
        s.page_mut(6).copy_from_slice(&seven);
        s.touch(8);
        let r3 = s.ship(&[4, 6, 8], false);
        assert_eq!((r3.zero, r3.refs, r3.delta), (1, 1, 1), "{r3:?}");
        // Their bases are what the backup holds now: the zero page has none, the copy has
        // page 7's content.
        for i in [4, 6, 8] {
            s.touch(i);
        }
        let r4 = s.ship(&[4, 6, 8], false);
        assert_eq!((r4.full, r4.delta), (1, 2), "{r4:?}");

        // A delta resync's first epoch zeroes pages on the backup; what follows has no base,
        // even though the guest still holds nearly what the cache does.
        let kept: Vec<Vec<u8>> = [10, 12].map(|i| s.page_mut(i).to_vec()).into();
        s.ship(&[10, 12], true);
        for (i, k) in [10, 12].into_iter().zip(&kept) {
            s.page_mut(i).copy_from_slice(k);
            s.touch(i);
        }
        let r5 = s.ship(&[10, 12], false);
        assert_eq!((r5.full, r5.delta), (2, 0), "{r5:?}");

        // Many more rounds over every page: whatever the cache holds, the image stays exact.
        for k in 0..6 {
            let dirty: Vec<u32> = (0..pages).filter(|i| (i + k) % 3 != 0).collect();
            for &i in &dirty {
                s.touch(i);
            }
            s.ship(&dirty, false);
        }
    }
}
