//! Out-of-range indices and over-limit chunks are rejected without allocating past the limits.
//!
//! A counting global allocator records, per thread, the largest single allocation made while a
//! decoder runs; each case checks it against what the limits allow.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use understudy_protocol::codec::{ChunkDecoder, DecodeError, RecordKind};
use understudy_protocol::frame::{begin_frame, finish_frame};
use understudy_protocol::{FrameDecoder, FrameError, FrameKind, Limits, ZERO_PAGE_HASH};

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the slot may be gone while the thread is being torn down.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the only
// addition is recording the requested size in a const-initialised thread-local `Cell`, which
// neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as our caller's: `layout` has a non-zero size.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr`/`layout` come from `System` as above; `new_size` is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Largest single allocation made by `f` on this thread.
fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

struct Rec {
    page: u32,
    kind: u8,
    source: u32,
    hash: [u8; 32],
}

fn chunk(
    records: &[Rec],
    declared_records: u32,
    data_pages: u32,
    data: &[u8],
    compress: bool,
) -> Vec<u8> {
    let z = if compress && !data.is_empty() {
        zstd::bulk::compress(data, 1).unwrap()
    } else {
        data.to_vec()
    };
    let mut p = Vec::new();
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&0u16.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&1u64.to_le_bytes());
    p.extend_from_slice(&declared_records.to_le_bytes());
    p.extend_from_slice(&data_pages.to_le_bytes());
    p.extend_from_slice(&(z.len() as u32).to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    for r in records {
        p.extend_from_slice(&r.page.to_le_bytes());
        p.push(r.kind);
        p.extend_from_slice(&[0, 0, 0]);
        p.extend_from_slice(&r.source.to_le_bytes());
        p.extend_from_slice(&r.hash);
    }
    p.extend_from_slice(&z);
    p
}

fn full(page: u32, content: &[u8]) -> Rec {
    Rec {
        page,
        kind: RecordKind::Full as u8,
        source: 0,
        hash: *blake3::hash(content).as_bytes(),
    }
}

const SMALL: usize = 64 << 10;

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(64), ..ProptestConfig::default() })]

    /// A page index (or Ref source) at or past the image size is rejected before any data is
    /// decompressed.
    #[test]
    fn out_of_range_page_is_rejected(pages in 1u64..10_000, past in 0u32..1000, as_source in any::<bool>()) {
        let bad = (pages as u32).saturating_add(past);
        let content = vec![7u8; 4096];
        let mut recs = vec![full(0, &content)];
        if as_source {
            recs.push(Rec { page: 0, kind: RecordKind::Ref as u8, source: bad, hash: [0; 32] });
        } else {
            recs.push(Rec { page: bad, kind: RecordKind::Zero as u8, source: 0, hash: ZERO_PAGE_HASH });
        }
        let p = chunk(&recs, 2, 1, &content, true);
        let mut dec = ChunkDecoder::new(Limits::default(), pages);
        let (r, largest) = largest_alloc(|| dec.decode(2, &p));
        let is_out_of_range = matches!(r, Err(DecodeError::PageOutOfRange { .. }));
        prop_assert!(is_out_of_range, "{:?}", r);
        prop_assert!(largest < SMALL, "allocated {}", largest);
    }

    /// Counts over the limits, or not backed by the payload, fail before allocation.
    #[test]
    fn over_limit_counts_are_rejected(records in any::<u32>(), data_pages in any::<u32>()) {
        let limits = Limits { max_chunk_records: 1000, max_chunk_data_pages: 16, ..Limits::default() };
        let p = chunk(&[], records, data_pages, &[1, 2, 3], false);
        let mut dec = ChunkDecoder::new(limits, 1 << 20);
        let (r, largest) = largest_alloc(|| dec.decode(2, &p));
        prop_assert!(r.is_err());
        prop_assert!(largest < SMALL, "allocated {} for {:?}", largest, r);
    }

    /// Format 3 (variable records): counts over the limits or not backed by the payload fail
    /// before allocation too, whatever the records section holds.
    #[test]
    fn format_3_counts_are_bounded(
        records in any::<u32>(),
        data_pages in any::<u32>(),
        body in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let limits = Limits { max_chunk_records: 1000, max_chunk_data_pages: 16, ..Limits::default() };
        let mut p = chunk(&[], records, data_pages, &[], false);
        p[0..2].copy_from_slice(&3u16.to_le_bytes());
        p.extend_from_slice(&body);
        let mut dec = ChunkDecoder::new(limits, 1 << 20);
        let (r, largest) = largest_alloc(|| dec.decode(3, &p));
        if records > 1000 || data_pages > 16 || records > 40 {
            prop_assert!(r.is_err());
        }
        prop_assert!(largest < SMALL, "allocated {} for {:?}", largest, r);
    }

    /// A frame header announcing up to 4 GiB allocates nothing for it.
    #[test]
    fn frame_length_is_checked_before_buffering(len in any::<u32>()) {
        let limits = Limits { max_frame_len: 1 << 20, ..Limits::default() };
        let mut h = Vec::new();
        let s = begin_frame(&mut h, 2, FrameKind::Chunk);
        finish_frame(&mut h, s).unwrap();
        h[8..12].copy_from_slice(&len.to_le_bytes());
        let mut d = FrameDecoder::new(limits);
        let (r, largest) = largest_alloc(|| { d.push(&h); d.next() });
        if len > 1 << 20 {
            let too_long = matches!(r, Err(FrameError::TooLong { .. }));
            prop_assert!(too_long);
        } else {
            prop_assert!(matches!(r, Ok(None)));
        }
        prop_assert!(largest < SMALL);
    }
}

/// A zstd bomb (a tiny frame that inflates to 64 MiB) declared as one page fails and allocates
/// about one page.
#[test]
fn decompression_bomb_is_bounded() {
    let bomb = vec![0u8; 64 << 20];
    let z = zstd::bulk::compress(&bomb, 19).unwrap();
    assert!(z.len() < 64 << 10);
    let content = vec![0u8; 4096];
    let mut p = chunk(&[full(0, &content)], 1, 1, &[], false);
    // Patch in the bomb as the compressed data.
    p[24..28].copy_from_slice(&(z.len() as u32).to_le_bytes());
    p.extend_from_slice(&z);
    let mut dec = ChunkDecoder::new(Limits::default(), 16);
    let _ = dec.decode(2, &[]); // warm the zstd context outside the measurement
    let (r, largest) = largest_alloc(|| dec.decode(2, &p));
    assert!(
        matches!(
            r,
            Err(DecodeError::Decompress { .. }) | Err(DecodeError::DataSize { .. })
        ),
        "{r:?}"
    );
    assert!(largest <= 1 << 20, "allocated {largest}");
}

/// A chunk at the limits decodes, one page over does not.
#[test]
fn chunk_at_the_limit_decodes() {
    let limits = Limits {
        max_chunk_data_pages: 4,
        max_chunk_records: 6,
        ..Limits::default()
    };
    let pages: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i + 1; 4096]).collect();
    let recs: Vec<Rec> = (0..5).map(|i| full(i as u32, &pages[i])).collect();
    let mut dec = ChunkDecoder::new(limits, 16);
    let data4: Vec<u8> = pages[..4].concat();
    let ok = chunk(&recs[..4], 4, 4, &data4, true);
    let (r, largest) = largest_alloc(|| dec.decode(2, &ok));
    assert_eq!(r.unwrap().records.len(), 4);
    assert!(largest <= 4 * 4096 + 4096, "{largest}");
    let data5: Vec<u8> = pages.concat();
    let over = chunk(&recs, 5, 5, &data5, true);
    assert!(matches!(
        dec.decode(2, &over),
        Err(DecodeError::OverLimit { .. })
    ));
}
