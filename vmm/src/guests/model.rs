//! Pure-Rust reference model of the guests' PRNG, of `dirty`'s template pages and of the
//! `ledger` guest: the same functions the generated code computes, so tests (and tools) can
//! predict and check guest memory.
//!
//! Ledger page `i` at version `v` (a 4 KiB page at `DATA_GPA + i * 4096`, 512 u64 words):
//!
//! ```text
//! seed(i, v) = mix64((i * LEDGER_IDX_MUL + v) ^ LEDGER_SALT)        (wrapping arithmetic)
//! word[0]    = v
//! word[1]    = i
//! word[j]    = seed(i, v) + j * LEDGER_WORD_STEP                     for j in 2..512
//! checksum   = sum over all pages of seed(i, v_i)                    (wrapping)
//! ```
//!
//! `mix64` is a bijection, so two versions of one page have different seeds and differ in every
//! word from 2 on: a page that reverted to an older (self-consistent) version leaves a checksum
//! that no longer matches, and a torn page fails the word check.
//!
//! A step: `r = rng_next()`, page `i = ((r >> 32) * pages) >> 32`, `v_i += 1`, checksum updated
//! by `- seed(i, old) + seed(i, new)`, the page rewritten.

use super::layout::PAGE_SIZE;

/// The splitmix64 increment (2^64 / golden ratio).
pub const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
/// Multiplier of the page index in [`page_seed`].
pub const LEDGER_IDX_MUL: u64 = 0xd1b5_4a32_d192_ed03;
/// Salt of [`page_seed`].
pub const LEDGER_SALT: u64 = 0x4c45_4447_4552_2121;
/// Step between successive content words of a ledger page.
pub const LEDGER_WORD_STEP: u64 = 0x2545_f491_4f6c_dd1d;
/// u64 words in a page.
pub const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;

/// The splitmix64 finalizer (a bijection on u64).
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The guests' PRNG (splitmix64) whose state lives in the control block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rng(pub u64);

impl Rng {
    /// Advances the state and returns the next output.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix64(self.0)
    }
}

/// `((r >> 32) * n) >> 32`: the guests' multiply-shift mapping of a PRNG output to `0..n`.
pub fn scale_high32(r: u64, n: u64) -> u64 {
    ((r >> 32) * n) >> 32
}

/// One xorshift64 step (13, 7, 17), as `dirty`'s page fills use it.
pub fn xorshift64(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// The words of `dirty`'s duplicate template page `t` (0..4): an xorshift64 stream from
/// `TEMPLATE_SEEDS[t]`, each word's high half zero.
pub fn dup_template(t: usize) -> Vec<u64> {
    let mut x = super::TEMPLATE_SEEDS[t];
    (0..WORDS_PER_PAGE)
        .map(|_| {
            x = xorshift64(x);
            x & 0xffff_ffff
        })
        .collect()
}

/// Seed of ledger page `index` at `version`; also its term in the checksum.
pub fn page_seed(index: u64, version: u64) -> u64 {
    mix64(index.wrapping_mul(LEDGER_IDX_MUL).wrapping_add(version) ^ LEDGER_SALT)
}

/// Word `j` of ledger page `index` at `version`.
pub fn page_word(index: u64, version: u64, j: usize) -> u64 {
    match j {
        0 => version,
        1 => index,
        _ => page_seed(index, version).wrapping_add((j as u64).wrapping_mul(LEDGER_WORD_STEP)),
    }
}

/// The whole content of ledger page `index` at `version`.
pub fn page_words(index: u64, version: u64) -> Vec<u64> {
    (0..WORDS_PER_PAGE)
        .map(|j| page_word(index, version, j))
        .collect()
}

/// A mismatch found by [`Ledger::verify_memory`] or [`verify_page`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerFault {
    /// A page word does not match the page's version.
    Page {
        /// Page index.
        index: u64,
        /// Version read from word 0.
        version: u64,
        /// Word index.
        word: usize,
        /// Expected value.
        expected: u64,
        /// Value found.
        found: u64,
    },
    /// The checksum recomputed from the pages differs from the running one.
    Checksum {
        /// Running checksum.
        running: u64,
        /// Checksum recomputed from the pages.
        computed: u64,
    },
    /// The versions do not add up to the step count.
    Versions {
        /// Sum of the page versions.
        sum: u64,
        /// Step counter.
        steps: u64,
    },
}

/// Checks one page image (512 words) against its own version; returns the version and seed.
pub fn verify_page(index: u64, words: &[u64]) -> Result<(u64, u64), LedgerFault> {
    let version = words[0];
    for (j, &found) in words.iter().enumerate().skip(1) {
        let expected = page_word(index, version, j);
        if found != expected {
            return Err(LedgerFault::Page {
                index,
                version,
                word: j,
                expected,
                found,
            });
        }
    }
    Ok((version, page_seed(index, version)))
}

/// The ledger's whole state, as the guest keeps it in the control block and the data area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    /// Version of each page.
    pub versions: Vec<u64>,
    /// Steps done (the progress counter).
    pub steps: u64,
    /// Running checksum.
    pub checksum: u64,
    /// PRNG state.
    pub rng: Rng,
}

impl Ledger {
    /// The state right after the guest's initialisation: all pages at version 0.
    pub fn new(pages: u64, seed: u64) -> Self {
        let checksum = (0..pages).fold(0u64, |c, i| c.wrapping_add(page_seed(i, 0)));
        Ledger {
            versions: vec![0; pages as usize],
            steps: 0,
            checksum,
            rng: Rng(seed),
        }
    }

    /// One step, as the guest does it. Returns the page it bumped.
    pub fn step(&mut self) -> u64 {
        let pages = self.versions.len() as u64;
        let index = scale_high32(self.rng.next(), pages);
        let old = self.versions[index as usize];
        let new = old + 1;
        self.checksum = self
            .checksum
            .wrapping_sub(page_seed(index, old))
            .wrapping_add(page_seed(index, new));
        self.versions[index as usize] = new;
        self.steps += 1;
        index
    }

    /// The checksum recomputed from the versions.
    pub fn recompute_checksum(&self) -> u64 {
        self.versions
            .iter()
            .enumerate()
            .fold(0u64, |c, (i, &v)| c.wrapping_add(page_seed(i as u64, v)))
    }

    /// Verifies guest pages (`page(i)` returns the 512 words of page `i`) against a running
    /// checksum and step count, in the guest's order: pages, checksum, versions.
    pub fn verify_memory(
        pages: u64,
        running_checksum: u64,
        steps: u64,
        mut page: impl FnMut(u64) -> Vec<u64>,
    ) -> Result<(), LedgerFault> {
        let mut sum = 0u64;
        let mut versions = 0u64;
        for i in 0..pages {
            let (v, seed) = verify_page(i, &page(i))?;
            sum = sum.wrapping_add(seed);
            versions = versions.wrapping_add(v);
        }
        if sum != running_checksum {
            return Err(LedgerFault::Checksum {
                running: running_checksum,
                computed: sum,
            });
        }
        if versions != steps {
            return Err(LedgerFault::Versions {
                sum: versions,
                steps,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix64_known_values() {
        // splitmix64 with seed 0: the first outputs are well known.
        let mut r = Rng(0);
        assert_eq!(r.next(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn incremental_checksum_matches_recomputed() {
        let mut l = Ledger::new(64, 7);
        for _ in 0..10_000 {
            l.step();
            if l.steps.is_multiple_of(997) {
                assert_eq!(l.checksum, l.recompute_checksum());
            }
        }
        assert_eq!(l.checksum, l.recompute_checksum());
        assert_eq!(l.versions.iter().sum::<u64>(), l.steps);
        let ok = Ledger::verify_memory(64, l.checksum, l.steps, |i| {
            page_words(i, l.versions[i as usize])
        });
        assert_eq!(ok, Ok(()));
    }

    #[test]
    fn steps_cover_all_pages() {
        let mut l = Ledger::new(100, 1);
        for _ in 0..5_000 {
            l.step();
        }
        assert!(l.versions.iter().all(|&v| v > 0));
    }

    #[test]
    fn stale_page_is_detected() {
        let mut l = Ledger::new(32, 3);
        while l.versions[5] < 2 {
            l.step();
        }
        let stale = l.versions[5] - 1;
        let r = Ledger::verify_memory(32, l.checksum, l.steps, |i| {
            let v = if i == 5 {
                stale
            } else {
                l.versions[i as usize]
            };
            page_words(i, v)
        });
        assert!(matches!(r, Err(LedgerFault::Checksum { .. })), "{r:?}");
    }

    #[test]
    fn torn_page_is_detected() {
        let l = Ledger::new(8, 3);
        let r = Ledger::verify_memory(8, l.checksum, l.steps, |i| {
            let mut w = page_words(i, 0);
            if i == 3 {
                let newer = page_words(3, 1);
                w[300..].copy_from_slice(&newer[300..]);
            }
            w
        });
        assert!(
            matches!(
                r,
                Err(LedgerFault::Page {
                    index: 3,
                    word: 300,
                    ..
                })
            ),
            "{r:?}"
        );
    }

    #[test]
    fn versions_of_one_page_differ_in_every_content_word() {
        for v in 0..50 {
            let a = page_words(9, v);
            let b = page_words(9, v + 1);
            assert!((1..WORDS_PER_PAGE).all(|j| j == 1 || a[j] != b[j]));
        }
    }
}
