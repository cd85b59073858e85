//! Chunk format 3 (protocol version 3): records without hashes. Round trips of every record
//! kind match format 2 byte for byte; damage that format 2 caught with a record's hash is caught
//! by the image digest at commit, with nothing applied; the variable-length records section is
//! strictly bounded; and the records are 39 bytes smaller per page.

mod common;

use common::{mutate_page, Link, Rng};
use proptest::prelude::*;
use understudy_protocol::codec::{
    record_len, RecordKind, CHUNK_HEADER_LEN, RECORD_LEN, RECORD_LEN_V3, REF_RECORD_LEN_V3,
};
use understudy_protocol::frame::{begin_frame, finish_frame};
use understudy_protocol::{
    decode_chunk, ChunkDecoder, DecodeError, DecodedChunk, EncoderConfig, FrameDecoder, FrameKind,
    Limits, Message, PAGE_SIZE, ZERO_PAGE_HASH,
};

fn config(version: u16, data_pages: u32, records: u32) -> EncoderConfig {
    EncoderConfig {
        version,
        data_pages_per_chunk: data_pages,
        records_per_chunk: records,
        ..EncoderConfig::default()
    }
}

/// The chunk payload of a complete frame.
fn payload(frame: &[u8]) -> &[u8] {
    &frame[16..]
}

/// A `Chunk` frame of protocol `version` around `payload` (valid header and CRC).
fn frame(version: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    let s = begin_frame(&mut f, version, FrameKind::Chunk);
    f.extend_from_slice(payload);
    finish_frame(&mut f, s).unwrap();
    f
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// A format-3 payload taken apart: (header, records section, decompressed data).
struct Parts {
    header: Vec<u8>,
    records: Vec<u8>,
    data: Vec<u8>,
}

/// One format-3 record: (offset in the records section, kind, page, source).
fn records3(section: &[u8]) -> Vec<(usize, u8, u32, u32)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < section.len() {
        let kind = section[at];
        let page = u32_at(section, at + 1);
        let source = if kind == RecordKind::Ref as u8 {
            u32_at(section, at + 5)
        } else {
            0
        };
        out.push((at, kind, page, source));
        at += if kind == RecordKind::Ref as u8 { 9 } else { 5 };
    }
    out
}

fn split(p: &[u8]) -> Parts {
    assert_eq!(u16::from_le_bytes([p[0], p[1]]), 3, "a format-3 chunk");
    let clen = u32_at(p, 24) as usize;
    let data_pages = u32_at(p, 20) as usize;
    let records = p[CHUNK_HEADER_LEN..p.len() - clen].to_vec();
    let data = if clen == 0 {
        Vec::new()
    } else {
        zstd::bulk::decompress(&p[p.len() - clen..], data_pages * PAGE_SIZE).unwrap()
    };
    Parts {
        header: p[..CHUNK_HEADER_LEN].to_vec(),
        records,
        data,
    }
}

fn join(parts: &Parts) -> Vec<u8> {
    let z = if parts.data.is_empty() {
        Vec::new()
    } else {
        zstd::bulk::compress(&parts.data, 1).unwrap()
    };
    let mut p = parts.header.clone();
    p[24..28].copy_from_slice(&(z.len() as u32).to_le_bytes());
    p.extend_from_slice(&parts.records);
    p.extend_from_slice(&z);
    p
}

/// Epoch 1 writes pages 0..5 with random content; epoch 2 (returned, not delivered) has one
/// record of each kind: page 1 `Delta`, page 2 `Zero`, page 5 `Ref` to page 0, page 6 `Full`.
fn every_kind_link(version: u16) -> (Link, understudy_protocol::codec::EncodedEpoch, Rng) {
    let mut rng = Rng(77);
    let pages = 8;
    let mut link = Link::new(pages, config(version, 64, 4096));
    rng.fill(&mut link.primary[..5 * PAGE_SIZE]);
    let enc = link.encode(&[0, 1, 2, 3, 4], true);
    let frames = enc.chunks.clone();
    link.deliver(&enc, &frames, &mut rng).unwrap();
    link.check_same();
    link.primary[PAGE_SIZE + 40] ^= 0x5a; // page 1: a small edit
    link.primary[2 * PAGE_SIZE..3 * PAGE_SIZE].fill(0); // page 2: zero
    let p0 = link.primary[..PAGE_SIZE].to_vec();
    link.primary[5 * PAGE_SIZE..6 * PAGE_SIZE].copy_from_slice(&p0); // page 5 = page 0
    rng.fill(&mut link.primary[6 * PAGE_SIZE..7 * PAGE_SIZE]); // page 6: new content
    let enc = link.encode(&[1, 2, 5, 6], true);
    let s = enc.stats;
    assert_eq!(
        (s.delta, s.zero, s.refs, s.full),
        (1, 1, 1, 1),
        "one record of each kind: {s:?}"
    );
    (link, enc, rng)
}

fn decode3(p: &[u8], pages: u64) -> Result<DecodedChunk, DecodeError> {
    decode_chunk(3, p, pages, &Limits::default())
}

#[test]
fn every_record_kind_round_trips_in_format_3() {
    let (mut link, enc, mut rng) = every_kind_link(3);
    // Exactly: 3 records of 5 bytes and one Ref of 9, no padding.
    let section: usize = enc
        .chunks
        .iter()
        .map(|f| split(payload(f)).records.len())
        .sum();
    assert_eq!(section, 3 * RECORD_LEN_V3 + REF_RECORD_LEN_V3);
    let mut records = Vec::new();
    for f in &enc.chunks {
        let c = decode3(payload(f), 8).unwrap();
        assert_eq!(c.format, 3);
        records.extend(c.records);
    }
    assert_eq!(records.len(), 4);
    for r in &records {
        match r.kind {
            RecordKind::Zero => assert_eq!((r.page, r.hash), (2, Some(ZERO_PAGE_HASH))),
            RecordKind::Full => {
                assert_eq!(r.page, 6);
                let want = *blake3::hash(&link.primary[6 * PAGE_SIZE..7 * PAGE_SIZE]).as_bytes();
                assert_eq!(r.hash, Some(want), "the decoder derives Full hashes");
            }
            RecordKind::Ref => assert_eq!((r.page, r.source, r.hash), (5, 0, None)),
            RecordKind::Delta => assert_eq!((r.page, r.hash), (1, None)),
            RecordKind::Invalid => panic!("invalid kind decoded"),
        }
    }
    let frames = enc.chunks.clone();
    let out = link.deliver(&enc, &frames, &mut rng).unwrap();
    assert_eq!(out.digest, enc.digest);
    assert_eq!(out.pages, 4);
    link.check_same();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(48), ..ProptestConfig::default() })]

    /// The same epochs through format 2 and format 3 give byte-identical images, the same
    /// digests and the same records; format 3 is never larger on the wire.
    #[test]
    fn format_3_images_equal_format_2(
        seed in any::<u64>(),
        pages in 1usize..64,
        epochs in 1usize..6,
        data_pages in prop_oneof![Just(1u32), Just(4), Just(64)],
        records in prop_oneof![Just(3u32), Just(4096)],
        with_base in any::<bool>(),
    ) {
        let mut rng = Rng(seed);
        let mut v2 = Link::new(pages, config(2, data_pages, records));
        let mut v3 = Link::new(pages, config(3, data_pages, records));
        for _ in 0..epochs {
            let mut dirty: Vec<u32> = (0..pages as u32).filter(|_| rng.below(2) == 0).collect();
            rng.shuffle(&mut dirty);
            for &i in &dirty {
                mutate_page(&mut rng, &mut v2.primary, i as usize, pages);
            }
            v3.primary.copy_from_slice(&v2.primary);
            let e2 = v2.encode(&dirty, with_base);
            let e3 = v3.encode(&dirty, with_base);
            prop_assert_eq!(e2.stats.pages, e3.stats.pages);
            prop_assert_eq!(
                (e2.stats.zero, e2.stats.full, e2.stats.refs, e2.stats.delta),
                (e3.stats.zero, e3.stats.full, e3.stats.refs, e3.stats.delta)
            );
            prop_assert_eq!(e2.chunks.len(), e3.chunks.len());
            prop_assert_eq!(e2.digest, e3.digest);
            let refs = e3.stats.refs;
            let others = u64::from(e3.page_count) - refs;
            prop_assert_eq!(
                e2.stats.wire_bytes - e3.stats.wire_bytes,
                others * (RECORD_LEN - RECORD_LEN_V3) as u64
                    + refs * (RECORD_LEN - REF_RECORD_LEN_V3) as u64
            );
            let f2 = e2.chunks.clone();
            let f3 = e3.chunks.clone();
            let mut r2 = rng.clone();
            prop_assert!(v2.deliver(&e2, &f2, &mut r2).is_ok());
            let out = v3.deliver(&e3, &f3, &mut rng);
            prop_assert!(out.is_ok(), "{:?}", out);
            v2.check_same();
            v3.check_same();
            prop_assert!(v2.backup == v3.backup, "format 2 and 3 images differ");
            prop_assert_eq!(v2.replica.digest(), v3.replica.digest());
        }
    }

    /// Cutting a format-3 chunk anywhere, or adding bytes anywhere between its header and its
    /// zstd frame (or at its end), is refused, never a panic.
    #[test]
    fn cut_or_padded_format_3_chunks_are_refused(at in any::<u64>(), extra in 1usize..12) {
        let (_link, enc, _) = every_kind_link(3);
        let k = (at >> 32) as usize % enc.chunks.len();
        let p = payload(&enc.chunks[k]).to_vec();
        let cut = (at % p.len() as u64) as usize;
        prop_assert!(decode3(&p[..cut], 8).is_err(), "cut at {}", cut);
        let parts = split(&p);
        let insert_at = CHUNK_HEADER_LEN + (at as usize % (parts.records.len() + 1));
        let mut padded = p.clone();
        padded.splice(insert_at..insert_at, std::iter::repeat_n(0u8, extra));
        prop_assert!(decode3(&padded, 8).is_err(), "{} bytes at {}", extra, insert_at);
        let mut tail = p.clone();
        tail.extend(std::iter::repeat_n(1u8, extra));
        prop_assert!(decode3(&tail, 8).is_err());
    }
}

/// Alters a format-3 epoch's chunk, delivers it with the honest `Commit`, and checks that the
/// commit is refused on the image digest with the image and the replica untouched; then that
/// the honest chunk still commits.
fn refused_at_commit(what: &str, alter: impl Fn(&mut Parts) -> bool) {
    let (mut link, enc, mut rng) = every_kind_link(3);
    let mut altered = 0;
    let bad: Vec<Vec<u8>> = enc
        .chunks
        .iter()
        .map(|f| {
            let mut parts = split(payload(f));
            if alter(&mut parts) {
                altered += 1;
                frame(3, &join(&parts))
            } else {
                f.clone()
            }
        })
        .collect();
    assert_eq!(altered, 1, "{what}: one chunk altered");
    let image_before = link.backup.clone();
    let digest_before = link.replica.digest();
    let epoch_before = link.replica.epoch();
    let err = link
        .deliver(&enc, &bad, &mut rng)
        .expect_err("an altered format-3 epoch must be refused");
    assert!(
        err.starts_with("commit: image digest after epoch 2"),
        "{what}: {err}"
    );
    assert!(link.backup == image_before, "{what}: the image was written");
    assert_eq!(
        link.replica.digest(),
        digest_before,
        "{what}: replica digest"
    );
    assert_eq!(link.replica.epoch(), epoch_before, "{what}: replica epoch");
    let frames = enc.chunks.clone();
    link.deliver(&enc, &frames, &mut rng).unwrap();
    link.check_same();
}

/// Data slot of the record for `page` in this chunk, if it has one (the data pages follow the
/// record order).
fn slot_of(parts: &Parts, page: u32) -> Option<usize> {
    records3(&parts.records)
        .iter()
        .filter(|r| r.1 == RecordKind::Full as u8 || r.1 == RecordKind::Delta as u8)
        .position(|r| r.2 == page)
}

#[test]
fn altered_full_data_is_refused_at_commit() {
    refused_at_commit("Full data", |p| {
        let Some(slot) = slot_of(p, 6) else {
            return false;
        };
        p.data[slot * PAGE_SIZE + 1000] ^= 0x01;
        true
    });
}

#[test]
fn altered_delta_is_refused_at_commit() {
    refused_at_commit("Delta data", |p| {
        let Some(slot) = slot_of(p, 1) else {
            return false;
        };
        p.data[slot * PAGE_SIZE + 7] ^= 0x80;
        true
    });
}

#[test]
fn altered_ref_source_is_refused_at_commit() {
    refused_at_commit("Ref source", |p| {
        let Some((off, _, page, source)) = records3(&p.records)
            .into_iter()
            .find(|r| r.1 == RecordKind::Ref as u8)
        else {
            return false;
        };
        assert_eq!((page, source), (5, 0));
        // Page 3 holds other content and is not written in this epoch.
        p.records[off + 5..off + 9].copy_from_slice(&3u32.to_le_bytes());
        true
    });
}

#[test]
fn altered_page_index_is_refused_at_commit() {
    refused_at_commit("Full page index", |p| {
        let Some((off, ..)) = records3(&p.records)
            .into_iter()
            .find(|r| r.1 == RecordKind::Full as u8)
        else {
            return false;
        };
        p.records[off + 1..off + 5].copy_from_slice(&7u32.to_le_bytes());
        true
    });
}

#[test]
fn a_version_2_frame_may_not_carry_format_3() {
    let (link, enc, _) = every_kind_link(3);
    let p = payload(&enc.chunks[0]);
    assert_eq!(u16::from_le_bytes([p[0], p[1]]), 3);
    assert!(matches!(
        decode_chunk(2, p, 8, &Limits::default()),
        Err(DecodeError::Format {
            format: 3,
            version: 2
        })
    ));
    let mut fd = FrameDecoder::new(link.limits.clone());
    fd.push(&frame(2, p));
    let err = fd
        .next()
        .expect_err("a version-2 frame with a format-3 chunk");
    let why = std::error::Error::source(&err).map(|e| e.to_string());
    assert_eq!(
        why.as_deref(),
        Some("chunk format 3 cannot travel in a version 2 frame"),
        "{err}"
    );
    // The same chunk in a version-3 frame decodes; version 3 still carries format 2.
    let mut fd = FrameDecoder::new(link.limits.clone());
    fd.push(&frame(3, p));
    let Some(Message::Chunk(c)) = fd.next().unwrap() else {
        panic!("not a chunk")
    };
    ChunkDecoder::new(link.limits.clone(), 8)
        .decode_frame(&c)
        .unwrap();
    let (_, enc2, _) = every_kind_link(2);
    let p2 = payload(&enc2.chunks[0]);
    assert_eq!(
        decode_chunk(3, p2, 8, &Limits::default()).unwrap().format,
        2
    );
    // Version 1 is not spoken any more.
    let mut fd = FrameDecoder::new(link.limits.clone());
    fd.push(&frame(1, p2));
    assert!(fd.next().is_err());
}

/// A format-3 chunk header declaring `declared` records, then a Zero record for each of `pages`.
fn zero_chunk(pages: &[u32], declared: u32) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&3u16.to_le_bytes());
    p.extend_from_slice(&0u16.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&1u64.to_le_bytes());
    p.extend_from_slice(&declared.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    for &page in pages {
        p.push(RecordKind::Zero as u8);
        p.extend_from_slice(&page.to_le_bytes());
    }
    p
}

#[test]
fn the_variable_records_section_is_strictly_checked() {
    // Well formed.
    let ok = zero_chunk(&[0, 1, 2], 3);
    assert_eq!(ok.len(), CHUNK_HEADER_LEN + 3 * 5);
    assert_eq!(decode3(&ok, 8).unwrap().records.len(), 3);
    // One byte short: the records do not fit.
    assert!(matches!(
        decode3(&ok[..ok.len() - 1], 8),
        Err(DecodeError::Length { .. })
    ));
    // One byte extra: the records do not fill their section.
    let mut extra = ok.clone();
    extra.push(0);
    assert!(matches!(
        decode3(&extra, 8),
        Err(DecodeError::Length {
            expected: 47,
            actual: 48
        })
    ));
    // More bytes than the declared records could take even as Refs.
    let mut long = ok.clone();
    long.extend_from_slice(&[0; 13]);
    assert!(matches!(decode3(&long, 8), Err(DecodeError::Length { .. })));
    // A Ref whose source is cut off: fits the 5-byte minimum, truncated as a 9-byte Ref.
    let mut cut_ref = zero_chunk(&[0], 2);
    cut_ref.push(RecordKind::Ref as u8);
    cut_ref.extend_from_slice(&1u32.to_le_bytes());
    cut_ref.extend_from_slice(&[0, 0]);
    assert!(matches!(
        decode3(&cut_ref, 8),
        Err(DecodeError::Truncated("records"))
    ));
    // Unknown kinds.
    for kind in [0u8, 5, 0xff] {
        let mut p = zero_chunk(&[0], 1);
        p[CHUNK_HEADER_LEN] = kind;
        assert!(
            matches!(decode3(&p, 8), Err(DecodeError::Kind { index: 0, kind: k }) if k == kind),
            "kind {kind}"
        );
    }
    // A Ref to itself, and one outside the image.
    for (source, self_ref) in [(4u32, true), (8, false)] {
        let mut p = zero_chunk(&[], 1);
        p.push(RecordKind::Ref as u8);
        p.extend_from_slice(&4u32.to_le_bytes());
        p.extend_from_slice(&source.to_le_bytes());
        let r = decode3(&p, 8);
        if self_ref {
            assert!(
                matches!(r, Err(DecodeError::SelfRef { page: 4, .. })),
                "{r:?}"
            );
        } else {
            assert!(
                matches!(r, Err(DecodeError::PageOutOfRange { page: 8, .. })),
                "{r:?}"
            );
        }
    }
    // A page outside the image.
    assert!(matches!(
        decode3(&zero_chunk(&[8], 1), 8),
        Err(DecodeError::PageOutOfRange { page: 8, .. })
    ));
    // A Full record without data pages declared.
    let mut p = zero_chunk(&[0], 1);
    p[CHUNK_HEADER_LEN] = RecordKind::Full as u8;
    assert!(matches!(
        decode3(&p, 8),
        Err(DecodeError::DataPages {
            declared: 0,
            actual: 1
        })
    ));
    // A count over the limit is refused before the records are read.
    let limits = Limits {
        max_chunk_records: 2,
        ..Limits::default()
    };
    assert!(matches!(
        decode_chunk(3, &ok, 8, &limits),
        Err(DecodeError::OverLimit { .. })
    ));
    assert_eq!(record_len(3, RecordKind::Ref), 9);
    assert_eq!(record_len(2, RecordKind::Ref), RECORD_LEN);
}

/// The claim behind format 3: for N incompressible `Full` pages, the chunks are exactly
/// (44 - 5) x N bytes smaller than in format 2 (same chunks, same zstd frames).
#[test]
fn format_3_saves_39_bytes_per_full_page() {
    let n = 1000usize;
    let mut rng = Rng(99);
    let mut v2 = Link::new(
        n,
        EncoderConfig {
            version: 2,
            ..EncoderConfig::default()
        },
    );
    let mut v3 = Link::new(n, EncoderConfig::default());
    rng.fill(&mut v2.primary);
    v3.primary.copy_from_slice(&v2.primary);
    let all: Vec<u32> = (0..n as u32).collect();
    let e2 = v2.encode(&all, false);
    let e3 = v3.encode(&all, false);
    assert_eq!((e2.stats.full, e3.stats.full), (n as u64, n as u64));
    assert_eq!(e2.chunks.len(), e3.chunks.len());
    assert_eq!(
        e2.stats.wire_bytes - e3.stats.wire_bytes,
        ((RECORD_LEN - RECORD_LEN_V3) * n) as u64
    );
    assert_eq!(RECORD_LEN - RECORD_LEN_V3, 39);
    for (a, b) in e2.chunks.iter().zip(&e3.chunks) {
        let records = u32_at(payload(a), 16) as usize;
        assert_eq!(a.len() - b.len(), 39 * records);
        // The zstd frames are the same bytes.
        let clen = u32_at(payload(a), 24) as usize;
        assert_eq!(a[a.len() - clen..], b[b.len() - clen..]);
    }
    let f3 = e3.chunks.clone();
    v3.deliver(&e3, &f3, &mut rng).unwrap();
    v3.check_same();
}
