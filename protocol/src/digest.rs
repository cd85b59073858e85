//! Page hashes and the image digest.
//!
//! Every page is named by its blake3 hash ([`PageHash`]). The image digest is the root of a
//! binary Merkle tree over the page hashes in page-index order:
//!
//! ```text
//!   digest = keyed_blake3(ROOT_KEY, top || page_count u64 LE)
//!   top    = the single node of the last level
//!   level 0 (leaves): leaf[i] = blake3(page i)                       (n nodes)
//!   level k+1:        node[j] = keyed_blake3(NODE_KEY, l || r)       (ceil(len_k / 2) nodes)
//!                     l = level_k[2j], r = level_k[2j+1], or 32 zero bytes past the end
//! ```
//!
//! Why a Merkle tree: it is sound by the collision resistance of blake3 alone (two images with
//! the same digest and page count would give a blake3 collision somewhere on the path where they
//! first differ), it binds every hash to its index, and an update costs O(log n) node hashes per
//! changed page, far less when the changed pages share paths (a whole-image epoch costs about
//! one node hash per page). Additive or XOR multiset hashes are O(1) per page but over a 256-bit
//! group they fall to generalised-birthday attacks (Wagner), so they are not used. Node and root
//! hashes are keyed with distinct constant keys, which separates them from leaf hashes (plain
//! blake3) and from each other.
//!
//! Both ends keep a [`PageTree`]: the primary's encoder for the image the backup will hold after
//! each encoded epoch, the backup for the image it holds. Each epoch's `Commit` carries the
//! digest; the backup checks it before applying anything. Memory: 64 bytes per guest page (leaf
//! and inner nodes), 16 MiB for a 1 GiB guest.

use std::fmt;

use crate::limits::PAGE_SIZE;

/// blake3 hash of one page's content.
pub type PageHash = [u8; 32];

/// blake3 of a page of 4096 zero bytes.
pub const ZERO_PAGE_HASH: PageHash = [
    0xb6, 0xfb, 0x73, 0xfc, 0x46, 0x93, 0x8c, 0x98, 0x1e, 0x2b, 0x0b, 0x4b, 0x1e, 0xf2, 0x82, 0xad,
    0xcf, 0xc8, 0x98, 0x54, 0xd0, 0x1b, 0xfe, 0x39, 0x72, 0xfd, 0xc4, 0x78, 0x5b, 0x41, 0xb2, 0xc7,
];

const NODE_KEY: [u8; 32] = *b"understudy image digest node v1.";
const ROOT_KEY: [u8; 32] = *b"understudy image digest root v1.";
const EMPTY: PageHash = [0u8; 32];

/// blake3 of a page.
pub fn hash_page(page: &[u8; PAGE_SIZE]) -> PageHash {
    *blake3::hash(page).as_bytes()
}

fn root_of(top: &PageHash, pages: u32) -> Digest {
    let mut buf = [0u8; 40];
    buf[..32].copy_from_slice(top);
    buf[32..].copy_from_slice(&u64::from(pages).to_le_bytes());
    Digest(*blake3::keyed_hash(&ROOT_KEY, &buf).as_bytes())
}

/// The digest of a whole guest image (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Digest(pub [u8; 32]);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

fn node(l: &PageHash, r: &PageHash) -> PageHash {
    let mut buf = [0u8; 64];
    buf[..32].copy_from_slice(l);
    buf[32..].copy_from_slice(r);
    *blake3::keyed_hash(&NODE_KEY, &buf).as_bytes()
}

fn build_level(child: &[PageHash]) -> Vec<PageHash> {
    let mut out = Vec::with_capacity(child.len().div_ceil(2));
    // Runs of equal pairs (a zeroed image) cost one hash.
    let mut memo: Option<(PageHash, PageHash, PageHash)> = None;
    for pair in child.chunks(2) {
        let l = pair[0];
        let r = pair.get(1).copied().unwrap_or(EMPTY);
        let v = match memo {
            Some((ml, mr, mv)) if ml == l && mr == r => mv,
            _ => {
                let v = node(&l, &r);
                memo = Some((l, r, v));
                v
            }
        };
        out.push(v);
    }
    out
}

/// The page hashes of an image and the Merkle tree over them, updated incrementally.
#[derive(Clone, Debug)]
pub struct PageTree {
    /// `levels[0]` are the leaves; the last level has one node (none for an empty image).
    levels: Vec<Vec<PageHash>>,
    /// Leaves changed since the last [`PageTree::digest`].
    pending: Vec<u32>,
    root: Digest,
}

impl PageTree {
    /// The tree of an image of `pages` zero pages.
    pub fn zeroed(pages: u32) -> Self {
        Self::from_hashes(vec![ZERO_PAGE_HASH; pages as usize])
    }

    /// The digest of an image of `pages` zero pages, without building the tree: O(log n).
    pub fn zeroed_digest(pages: u32) -> Digest {
        // Each level is `count` nodes, all equal to `common` but the last, which is `last`.
        let (mut count, mut common, mut last) = (pages, ZERO_PAGE_HASH, ZERO_PAGE_HASH);
        if count == 0 {
            last = EMPTY;
        }
        while count > 1 {
            let next_common = node(&common, &common);
            let next_last = if count % 2 == 0 {
                node(&common, &last)
            } else {
                node(&last, &EMPTY)
            };
            count = count.div_ceil(2);
            common = next_common;
            last = next_last;
        }
        root_of(&last, pages)
    }

    /// The tree over the given page hashes (at most `u32::MAX` of them are addressable).
    pub fn from_hashes(leaves: Vec<PageHash>) -> Self {
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let next = build_level(levels.last().map(Vec::as_slice).unwrap_or(&[]));
            levels.push(next);
        }
        let mut t = PageTree {
            levels,
            pending: Vec::new(),
            root: Digest::default(),
        };
        t.root = t.compute_root();
        t
    }

    /// The tree of the pages of `image` (hashes every page: O(image)).
    pub fn from_image<I: crate::PageImage + ?Sized>(image: &I) -> Self {
        let n = image.page_count().min(u32::MAX.into()) as u32;
        let mut page = [0u8; PAGE_SIZE];
        let leaves = (0..n)
            .map(|i| {
                image.read_page(i, &mut page);
                hash_page(&page)
            })
            .collect();
        Self::from_hashes(leaves)
    }

    /// Number of pages.
    pub fn page_count(&self) -> u32 {
        self.levels.first().map_or(0, |l| l.len() as u32)
    }

    /// All page hashes, by page index.
    pub fn hashes(&self) -> &[PageHash] {
        self.levels.first().map_or(&[], Vec::as_slice)
    }

    /// The hash of page `index`.
    pub fn get(&self, index: u32) -> Option<&PageHash> {
        self.hashes().get(index as usize)
    }

    /// Sets the hash of page `index`; returns the previous one, `None` if out of range.
    pub fn set(&mut self, index: u32, hash: PageHash) -> Option<PageHash> {
        let leaf = self.levels.first_mut()?.get_mut(index as usize)?;
        let old = *leaf;
        if old != hash {
            *leaf = hash;
            self.pending.push(index);
        }
        Some(old)
    }

    /// The image digest, bringing the tree up to date first: O(changed pages x log n).
    pub fn digest(&mut self) -> Digest {
        if !self.pending.is_empty() {
            self.refresh();
        }
        self.root
    }

    /// The digest as of the last [`PageTree::digest`] call, if no page changed since.
    pub fn digest_if_fresh(&self) -> Option<Digest> {
        self.pending.is_empty().then_some(self.root)
    }

    fn refresh(&mut self) {
        let mut idx = std::mem::take(&mut self.pending);
        idx.sort_unstable();
        idx.dedup();
        for level in 1..self.levels.len() {
            for i in idx.iter_mut() {
                *i /= 2;
            }
            idx.dedup();
            let (lower, upper) = self.levels.split_at_mut(level);
            let (Some(child), Some(cur)) = (lower.last(), upper.first_mut()) else {
                break;
            };
            for &p in &idx {
                let p = p as usize;
                let l = child.get(2 * p).copied().unwrap_or(EMPTY);
                let r = child.get(2 * p + 1).copied().unwrap_or(EMPTY);
                if let Some(slot) = cur.get_mut(p) {
                    *slot = node(&l, &r);
                }
            }
        }
        idx.clear();
        self.pending = idx;
        self.root = self.compute_root();
    }

    fn compute_root(&self) -> Digest {
        let top = self
            .levels
            .last()
            .and_then(|l| l.first())
            .copied()
            .unwrap_or(EMPTY);
        root_of(&top, self.page_count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_page_hash_is_blake3_of_zeros() {
        assert_eq!(hash_page(&[0u8; PAGE_SIZE]), ZERO_PAGE_HASH);
    }

    #[test]
    fn incremental_equals_rebuilt() {
        for n in [0u32, 1, 2, 3, 5, 8, 13, 64, 100] {
            let mut t = PageTree::zeroed(n);
            let mut leaves = vec![ZERO_PAGE_HASH; n as usize];
            for step in 0..n.min(20) {
                let i = (step * 7 + 3) % n;
                let h = *blake3::hash(&step.to_le_bytes()).as_bytes();
                t.set(i, h);
                leaves[i as usize] = h;
                if step % 3 == 0 {
                    assert_eq!(t.digest(), PageTree::from_hashes(leaves.clone()).digest());
                }
            }
            assert_eq!(t.digest(), PageTree::from_hashes(leaves).digest());
        }
    }

    #[test]
    fn digest_binds_position_and_size() {
        let a = *blake3::hash(b"a").as_bytes();
        let b = *blake3::hash(b"b").as_bytes();
        let mut x = PageTree::from_hashes(vec![a, b]);
        let mut y = PageTree::from_hashes(vec![b, a]);
        assert_ne!(x.digest(), y.digest());
        assert_ne!(
            PageTree::zeroed(3).digest(),
            PageTree::zeroed(4).digest(),
            "page count is bound"
        );
        assert_eq!(x.set(9, a), None);
        for n in 0..70 {
            assert_eq!(
                PageTree::zeroed_digest(n),
                PageTree::zeroed(n).digest(),
                "n={n}"
            );
        }
    }
}
