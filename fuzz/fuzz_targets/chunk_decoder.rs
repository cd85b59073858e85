//! Any bytes as a chunk payload: `ChunkDecoder::decode` never panics, never exceeds the limits,
//! and what it accepts is consistent (indices in range, one data page per Full/Delta record,
//! every Full page matching its hash).
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_protocol::codec::RecordKind;
use understudy_protocol::{ChunkDecoder, Limits, PAGE_SIZE};

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
    assert!(c.records.len() <= limits.max_chunk_records as usize);
    let data_records = c.records.iter().filter(|r| r.kind.has_data()).count();
    assert!(data_records <= limits.max_chunk_data_pages as usize);
    assert_eq!(c.data.len(), data_records * PAGE_SIZE);
    for r in &c.records {
        assert!(u64::from(r.page) < image_pages);
        if r.kind == RecordKind::Ref {
            assert!(u64::from(r.source) < image_pages && r.source != r.page);
        }
        if r.kind == RecordKind::Full {
            let page = c.data_page(r.slot).unwrap();
            assert_eq!(*blake3::hash(page).as_bytes(), r.hash);
        }
    }
});
