//! Any bytes as a chunk payload: `ChunkDecoder::decode` never panics, never exceeds the limits,
//! and what it accepts is consistent (indices in range, one data page per Full/Delta record,
//! every Full page matching its hash, formats no newer than the frame's version; the first
//! byte picks the version, 0 to 3, so every chunk format, 3 included, is reached).
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_protocol::codec::RecordKind;
use understudy_protocol::{ChunkDecoder, Limits, PAGE_SIZE, ZERO_PAGE_HASH};

fuzz_target!(|data: &[u8]| {
    let [version, pages, payload @ ..] = data else {
        return;
    };
    let version = u16::from(version % 4);
    let image_pages = u64::from(*pages) + 1;
    let limits = Limits {
        max_chunk_records: 512,
        max_chunk_data_pages: 32,
        ..Limits::default()
    };
    let mut dec = ChunkDecoder::new(limits.clone(), image_pages);
    let Ok(c) = dec.decode(version, payload) else {
        return;
    };
    assert!(c.format >= 1 && c.format <= version);
    assert!(c.records.len() <= limits.max_chunk_records as usize);
    let data_records = c.records.iter().filter(|r| r.kind.has_data()).count();
    assert!(data_records <= limits.max_chunk_data_pages as usize);
    assert_eq!(c.data.len(), data_records * PAGE_SIZE);
    for r in &c.records {
        assert!(u64::from(r.page) < image_pages);
        if r.kind == RecordKind::Ref {
            assert!(u64::from(r.source) < image_pages && r.source != r.page);
        }
        match r.kind {
            RecordKind::Full => {
                // Verified against the record (formats 1, 2) or derived from the data (3).
                let page = c.data_page(r.slot).unwrap();
                assert_eq!(Some(*blake3::hash(page).as_bytes()), r.hash);
            }
            RecordKind::Zero => assert_eq!(r.hash, Some(ZERO_PAGE_HASH)),
            // Format 3 leaves these to the commit; formats 1 and 2 carry them.
            _ => assert_eq!(r.hash.is_none(), c.format == 3),
        }
    }
});
