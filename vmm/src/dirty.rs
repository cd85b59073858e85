//! The set of pages dirtied in one epoch, per region.

use crate::memory::{RegionSpec, PAGE_SIZE};

/// Pages written since the previous `take_dirty`, one bitmap per region (bit i = page i of the
/// region, least significant bit first).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtySet {
    regions: Vec<(RegionSpec, Vec<u64>)>,
}

impl DirtySet {
    /// Wraps per-region bitmaps.
    pub fn new(regions: Vec<(RegionSpec, Vec<u64>)>) -> Self {
        DirtySet { regions }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.regions
            .iter()
            .map(|(_, b)| b.iter().map(|w| w.count_ones() as usize).sum::<usize>())
            .sum()
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.regions.iter().all(|(_, b)| b.iter().all(|w| *w == 0))
    }

    /// Guest-physical addresses of the dirty pages, ascending within each region.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|(spec, bits)| {
            let limit = spec.pages();
            bits.iter().enumerate().flat_map(move |(wi, &w)| {
                BitIter(w)
                    .map(move |b| wi as u64 * 64 + b)
                    .filter(move |&p| p < limit)
                    .map(move |p| spec.gpa + p * PAGE_SIZE)
            })
        })
    }

    /// Adds every page of `other` (regions must match).
    pub fn merge(&mut self, other: &DirtySet) {
        if self.regions.is_empty() {
            *self = other.clone();
            return;
        }
        for ((_, a), (_, b)) in self.regions.iter_mut().zip(&other.regions) {
            for (x, y) in a.iter_mut().zip(b) {
                *x |= *y;
            }
        }
    }

    /// The per-region bitmaps.
    pub fn bitmaps(&self) -> &[(RegionSpec, Vec<u64>)] {
        &self.regions
    }
}

struct BitIter(u64);

impl Iterator for BitIter {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros() as u64;
        self.0 &= self.0 - 1;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_map_bits_to_addresses() {
        let a = RegionSpec {
            gpa: 0,
            size: 70 * PAGE_SIZE,
        };
        let b = RegionSpec {
            gpa: 70 * PAGE_SIZE,
            size: 4 * PAGE_SIZE,
        };
        let d = DirtySet::new(vec![(a, vec![1 | 1 << 63, 1 << 5]), (b, vec![0b1000])]);
        let pages: Vec<u64> = d.pages().map(|g| g / PAGE_SIZE).collect();
        assert_eq!(pages, vec![0, 63, 69, 73]);
        assert_eq!(d.count(), 4);
    }
}
