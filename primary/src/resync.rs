//! Delta resync: what a backup that kept an earlier image (`backup --image-dir`) still needs.
//!
//! The primary keeps, across sessions:
//! - a change clock, advanced by every read of the dirty log (each capture, and the reset that
//!   starts a session), and per page the clock of the last read that found it dirty;
//! - a bounded history `image digest -> clock` of the consistent epochs it encoded: the image
//!   of such an epoch is guest memory as it was at that read;
//! - the encoder's page hashes at the end of the last session (the image the backup would hold
//!   once it had committed everything sent).
//!
//! A backup that holds an image with digest `D` at clock `G` lacks exactly the pages whose
//! last change is after `G`: a page that no read found dirty since then has the content it had
//! at `G`, and its hash in the last session's tree is the hash of that content (it was last
//! sent at or before `G`, or read unchanged by a later full sync). Those pages, and only those,
//! are unknown to the primary's encoder, so they enter the tree as [`UNKNOWN`]. The session
//! first zeroes them on the backup (one epoch of `Zero` records, after which both trees agree
//! again), then sends their content like a full sync sends every page.

use std::collections::VecDeque;

use understudy_protocol::{Digest, PageHash, PageTree};

/// A leaf that no page content hashes to: the primary does not know what the backup holds.
pub(crate) const UNKNOWN: PageHash = [0xA5; 32];

/// Consistent epochs remembered; a backup whose image is older gets a full sync. At 25 ms
/// epochs this is about 27 minutes of protection.
pub(crate) const MAX_HISTORY: usize = 1 << 16;

/// What a resumed session sends.
#[derive(Debug)]
pub(crate) struct Delta {
    /// The clock of the backup's image.
    pub base_clock: u64,
    /// Pages changed since then, ascending.
    pub pages: Vec<u32>,
    /// The backup's page hashes as the primary knows them: [`UNKNOWN`] for `pages`.
    pub tree: PageTree,
}

/// The primary's memory of what it sent, across sessions.
#[derive(Debug)]
pub(crate) struct ResyncBook {
    clock: u64,
    last_changed: Vec<u64>,
    history: VecDeque<(Digest, u64)>,
    tree: Option<PageTree>,
}

impl ResyncBook {
    /// Nothing sent yet for a memory of `pages` pages.
    pub fn new(pages: u32) -> Self {
        ResyncBook {
            clock: 0,
            last_changed: vec![0; pages as usize],
            history: VecDeque::new(),
            tree: None,
        }
    }

    /// One read of the dirty log found `pages` dirty; returns the clock of that read.
    pub fn changed(&mut self, pages: &[u32]) -> u64 {
        self.clock += 1;
        for &p in pages {
            if let Some(c) = self.last_changed.get_mut(p as usize) {
                *c = self.clock;
            }
        }
        self.clock
    }

    /// A consistent epoch was encoded: its image (`digest`) is memory as read at `clock`.
    pub fn encoded(&mut self, digest: Digest, clock: u64) {
        if self.history.len() == MAX_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((digest, clock));
    }

    /// The encoder's hashes when a session ended; `None` when they are not trustworthy (the
    /// encoder failed mid-epoch), which makes the next session a full sync.
    pub fn session_ended(&mut self, tree: Option<PageTree>) {
        self.tree = tree;
    }

    /// The newest image a backup may hold and its clock (offered in `Hello` as the base).
    pub fn newest(&self) -> Option<(Digest, u64)> {
        self.tree.as_ref()?;
        self.history.back().copied()
    }

    /// Whether a backup holding `digest` can be brought up to date with a delta.
    pub fn knows(&self, digest: &Digest) -> bool {
        self.tree.is_some() && self.history.iter().any(|(d, _)| d == digest)
    }

    /// The delta for a backup holding `digest`, read after the session's reset of the dirty
    /// log (so that every change up to now is in `last_changed`).
    pub fn delta(&self, digest: &Digest) -> Option<Delta> {
        let tree = self.tree.as_ref()?;
        // Equal digests mean equal images: the newest such epoch gives the smallest delta.
        let base_clock = self
            .history
            .iter()
            .rev()
            .find(|(d, _)| d == digest)
            .map(|&(_, c)| c)?;
        let pages: Vec<u32> = self
            .last_changed
            .iter()
            .enumerate()
            .filter(|&(_, &c)| c > base_clock)
            .map(|(p, _)| p as u32)
            .collect();
        let mut tree = tree.clone();
        for &p in &pages {
            tree.set(p, UNKNOWN);
        }
        Some(Delta {
            base_clock,
            pages,
            tree,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use understudy_protocol::ZERO_PAGE_HASH;

    fn d(b: u8) -> Digest {
        Digest([b; 32])
    }

    fn book_with_tree(pages: u32) -> ResyncBook {
        let mut b = ResyncBook::new(pages);
        b.session_ended(Some(PageTree::zeroed(pages)));
        b
    }

    #[test]
    fn the_delta_is_every_page_changed_after_the_backups_epoch_and_no_other() {
        let mut b = book_with_tree(8);
        let c1 = b.changed(&[0, 1]);
        b.encoded(d(1), c1);
        let c2 = b.changed(&[2]);
        b.encoded(d(2), c2);
        let _c3 = b.changed(&[1, 5]); // captured, never encoded (the session died)
        let _reset = b.changed(&[7]); // dirtied while unprotected, read by the next session
        let delta = b.delta(&d(1)).expect("epoch 1 is known");
        assert_eq!(delta.base_clock, c1);
        assert_eq!(delta.pages, vec![1, 2, 5, 7]);
        assert_eq!(b.delta(&d(2)).unwrap().pages, vec![1, 5, 7]);
        // Only the delta pages are unknown in the tree the encoder starts from.
        let leaves = delta.tree.hashes();
        for p in 0..8u32 {
            let want = if delta.pages.contains(&p) {
                UNKNOWN
            } else {
                ZERO_PAGE_HASH
            };
            assert_eq!(leaves[p as usize], want, "page {p}");
        }
    }

    #[test]
    fn an_unknown_image_or_a_lost_tree_means_a_full_sync() {
        let mut b = book_with_tree(4);
        let c = b.changed(&[0]);
        b.encoded(d(1), c);
        assert!(b.knows(&d(1)));
        assert!(!b.knows(&d(9)));
        assert!(b.delta(&d(9)).is_none());
        b.session_ended(None);
        assert!(!b.knows(&d(1)));
        assert!(b.delta(&d(1)).is_none());
        assert!(b.newest().is_none());
    }

    #[test]
    fn equal_images_resume_from_the_newest_epoch_that_had_them() {
        let mut b = book_with_tree(4);
        let c1 = b.changed(&[0]);
        b.encoded(d(1), c1);
        let c2 = b.changed(&[]);
        b.encoded(d(1), c2); // an idle epoch: same image
        b.changed(&[3]);
        let delta = b.delta(&d(1)).unwrap();
        assert_eq!(delta.base_clock, c2);
        assert_eq!(delta.pages, vec![3]);
        assert_eq!(b.newest(), Some((d(1), c2)));
    }

    #[test]
    fn history_is_bounded_and_forgets_the_oldest() {
        let mut b = book_with_tree(1);
        for i in 0..(MAX_HISTORY as u64 + 10) {
            let c = b.changed(&[]);
            let mut digest = [0u8; 32];
            digest[..8].copy_from_slice(&i.to_le_bytes());
            b.encoded(Digest(digest), c);
        }
        assert_eq!(b.history.len(), MAX_HISTORY);
        let mut first = [0u8; 32];
        first[..8].copy_from_slice(&0u64.to_le_bytes());
        assert!(!b.knows(&Digest(first)), "the oldest epochs are forgotten");
    }
}
