//! Page codec: encode -> frames -> decode -> commit reproduces the primary, in any chunk order;
//! damaged chunks are rejected; the `Ref` rule holds across chunks.

mod common;

use common::{mutate_page, Link, Rng};
use proptest::prelude::*;
use understudy_protocol::codec::RecordKind;
use understudy_protocol::{
    ChunkDecoder, EncoderConfig, EpochAssembler, FrameDecoder, Message, Replica,
    MIN_PROTOCOL_VERSION, PAGE_SIZE, PROTOCOL_VERSION,
};

fn config(version: u16, data_pages: u32, records: u32) -> EncoderConfig {
    EncoderConfig {
        version,
        data_pages_per_chunk: data_pages,
        records_per_chunk: records,
        ..EncoderConfig::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(128), ..ProptestConfig::default() })]

    /// Random images, random dirty sets, many epochs, both spoken versions (chunk formats 2
    /// and 3), tiny and normal
    /// chunks, 1 or 2 threads, shuffled chunk order: the backup ends equal to the primary and
    /// all three digests agree after every epoch.
    #[test]
    fn roundtrip_many_epochs(
        seed in any::<u64>(),
        pages in 1usize..80,
        epochs in 1usize..8,
        version in MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION,
        data_pages in prop_oneof![Just(1u32), Just(3), Just(64)],
        records in prop_oneof![Just(2u32), Just(5), Just(4096)],
        with_base in any::<bool>(),
        threads in 1usize..=2,
    ) {
        let mut rng = Rng(seed);
        let mut link = Link::new(pages, config(version, data_pages, records));
        link.threads = threads;
        for _ in 0..epochs {
            let mut dirty: Vec<u32> = (0..pages as u32).filter(|_| rng.below(3) == 0).collect();
            rng.shuffle(&mut dirty);
            for &i in &dirty {
                mutate_page(&mut rng, &mut link.primary, i as usize, pages);
            }
            let enc = link.encode(&dirty, with_base);
            prop_assert_eq!(enc.stats.pages, dirty.len() as u64);
            let frames = enc.chunks.clone();
            let out = link.deliver(&enc, &frames, &mut rng);
            prop_assert!(out.is_ok(), "{:?}", out);
            link.check_same();
        }
    }

    /// Any single bit flip in a chunk frame is caught by the frame decoder.
    #[test]
    fn bit_flip_in_frame_is_rejected(seed in any::<u64>(), bit in any::<u64>()) {
        let mut rng = Rng(seed);
        let mut link = Link::new(24, config(2, 4, 4096));
        let dirty: Vec<u32> = (0..24).collect();
        for &i in &dirty {
            mutate_page(&mut rng, &mut link.primary, i as usize, 24);
        }
        let enc = link.encode(&dirty, false);
        prop_assume!(!enc.chunks.is_empty());
        let k = rng.below(enc.chunks.len() as u64) as usize;
        let mut frame = enc.chunks[k].clone();
        let bit = (bit % (frame.len() as u64 * 8)) as usize;
        frame[bit / 8] ^= 1 << (bit % 8);
        let mut fd = FrameDecoder::new(link.limits.clone());
        fd.push(&frame);
        match fd.next() {
            Err(_) => {}
            Ok(None) => {} // a flipped length that now waits for more bytes: never applied
            Ok(Some(m)) => prop_assert!(false, "damaged frame decoded: {:?}", m.kind()),
        }
    }

    /// A bit flip in the chunk payload *behind* the CRC (as if the sender were buggy) is
    /// rejected at decode or at commit, and the image is then untouched; or, for the few flips
    /// that do not change the meaning (e.g. a Ref to another page with the same content), the
    /// backup still ends equal to the primary.
    #[test]
    fn bit_flip_in_payload_never_corrupts(
        seed in any::<u64>(),
        bit in any::<u64>(),
        version in MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION,
    ) {
        let mut rng = Rng(seed);
        let pages = 24;
        let mut link = Link::new(pages, config(version, 4, 4096));
        let first: Vec<u32> = (0..pages as u32).collect();
        for &i in &first {
            mutate_page(&mut rng, &mut link.primary, i as usize, pages);
        }
        let enc = link.encode(&first, true);
        let frames = enc.chunks.clone();
        link.deliver(&enc, &frames, &mut rng).unwrap();
        let dirty: Vec<u32> = (0..pages as u32).filter(|_| rng.below(2) == 0).collect();
        for &i in &dirty {
            mutate_page(&mut rng, &mut link.primary, i as usize, pages);
        }
        let enc = link.encode(&dirty, true);
        prop_assume!(!enc.chunks.is_empty());
        let k = rng.below(enc.chunks.len() as u64) as usize;
        let mut frames = enc.chunks.clone();
        let payload_bits = (frames[k].len() - 16) as u64 * 8;
        let bit = (bit % payload_bits) as usize + 16 * 8;
        frames[k][bit / 8] ^= 1 << (bit % 8);
        // Recompute the CRC so that only the chunk's own checks stand.
        let crc = {
            let mut h = crc32fast::Hasher::new();
            h.update(&frames[k][..12]);
            h.update(&frames[k][16..]);
            h.finalize()
        };
        frames[k][12..16].copy_from_slice(&crc.to_le_bytes());
        let before = link.backup.clone();
        let replica_before = link.replica.clone();
        match link.deliver(&enc, &frames, &mut rng) {
            Err(_) => {
                prop_assert!(link.backup == before, "rejected epoch left writes behind");
                prop_assert_eq!(link.replica.epoch(), replica_before.epoch());
                let mut r = replica_before;
                prop_assert_eq!(link.replica.digest(), r.digest());
            }
            Ok(_) => link.check_same(),
        }
    }
}

fn one_epoch(link: &mut Link, rng: &mut Rng, dirty: &[u32]) {
    let enc = link.encode(dirty, false);
    let frames = enc.chunks.clone();
    link.deliver(&enc, &frames, rng).unwrap();
    link.check_same();
}

/// The tricky `Ref` cases: a page whose old content moves elsewhere while it is overwritten,
/// two pages swapping contents, duplicates within one epoch split across chunks.
#[test]
fn refs_across_overwritten_pages_and_chunks() {
    let mut rng = Rng(7);
    let pages = 16;
    let mut link = Link::new(pages, config(2, 1, 2));
    for i in 0..pages {
        rng.fill(&mut link.primary[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
    }
    let all: Vec<u32> = (0..pages as u32).collect();
    one_epoch(&mut link, &mut rng, &all);

    // Swap pages 0 and 1; copy page 2 to 3 and overwrite 2; 4..8 get one new content.
    let p = |img: &Vec<u8>, i: usize| img[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].to_vec();
    let (a, b, c) = (
        p(&link.primary, 0),
        p(&link.primary, 1),
        p(&link.primary, 2),
    );
    link.primary[..PAGE_SIZE].copy_from_slice(&b);
    link.primary[PAGE_SIZE..2 * PAGE_SIZE].copy_from_slice(&a);
    link.primary[3 * PAGE_SIZE..4 * PAGE_SIZE].copy_from_slice(&c);
    rng.fill(&mut link.primary[2 * PAGE_SIZE..3 * PAGE_SIZE]);
    let mut fresh = vec![0u8; PAGE_SIZE];
    rng.fill(&mut fresh);
    for i in 4..8 {
        link.primary[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(&fresh);
    }
    let enc = link.encode(&[3, 1, 0, 2, 7, 4, 5, 6], false);
    // 3 can Ref nothing (page 2 changes); 4..7: one Full and three Refs.
    assert_eq!(enc.stats.refs, 3, "{:?}", enc.stats);
    assert!(enc.chunks.len() >= 4);
    let frames = enc.chunks.clone();
    link.deliver(&enc, &frames, &mut rng).unwrap();
    link.check_same();

    // Content that exists on a clean page is sent as a Ref to it.
    let seven = p(&link.primary, 7);
    link.primary[9 * PAGE_SIZE..10 * PAGE_SIZE].copy_from_slice(&seven);
    let enc = link.encode(&[9], false);
    assert_eq!(enc.stats.refs, 1);
    let frames = enc.chunks.clone();
    link.deliver(&enc, &frames, &mut rng).unwrap();
    link.check_same();
}

#[test]
fn unchanged_pages_send_nothing_and_zero_pages_send_no_data() {
    let mut rng = Rng(1);
    let mut link = Link::new(8, EncoderConfig::default());
    let enc = link.encode(&[0, 1, 2], false);
    assert_eq!(enc.stats.unchanged, 3);
    assert!(enc.chunks.is_empty());
    let frames = enc.chunks.clone();
    link.deliver(&enc, &frames, &mut rng).unwrap();
    rng.fill(&mut link.primary[..PAGE_SIZE]);
    one_epoch(&mut link, &mut rng, &[0]);
    link.primary[..PAGE_SIZE].fill(0);
    let enc = link.encode(&[0], false);
    assert_eq!(enc.stats.zero, 1);
    // header 16 + chunk header 32 + one format-3 record of 5 bytes, no data (format 2: 44)
    assert_eq!(enc.stats.wire_bytes, 16 + 32 + 5);
    let frames = enc.chunks.clone();
    link.deliver(&enc, &frames, &mut rng).unwrap();
    link.check_same();
}

#[test]
fn delta_is_used_for_small_edits_and_checked_against_the_held_page() {
    // Format 2 checks the Delta result against its record's hash, format 3 (no hashes) through
    // the image digest: either way the epoch is refused whole.
    for (version, why) in [(2, "delta"), (3, "digest")] {
        let mut rng = Rng(3);
        let mut link = Link::new(4, config(version, 64, 4096));
        rng.fill(&mut link.primary);
        let enc = link.encode(&[0, 1, 2, 3], true);
        let frames = enc.chunks.clone();
        link.deliver(&enc, &frames, &mut rng).unwrap();
        link.primary[100] ^= 0xff;
        link.primary[PAGE_SIZE + 7] ^= 1;
        let enc = link.encode(&[0, 1], true);
        assert_eq!(enc.stats.delta, 2, "{:?}", enc.stats);
        assert!(enc.stats.wire_bytes < 400, "{:?}", enc.stats);
        // The backup's page 0 is not what the primary thinks: the delta must be refused.
        let mut frames = enc.chunks.clone();
        link.backup[5] ^= 1;
        let before = link.backup.clone();
        let r = link.deliver(&enc, &frames.clone(), &mut rng);
        let err = r.unwrap_err();
        assert!(err.contains(why), "version {version}: {err}");
        assert!(link.backup == before, "a refused epoch wrote to the image");
        link.backup[5] ^= 1;
        frames.reverse();
        link.deliver(&enc, &frames, &mut rng).unwrap();
        link.check_same();
    }
}

#[test]
fn commit_rejects_missing_duplicate_and_foreign_chunks() {
    let mut rng = Rng(5);
    let pages = 32;
    let mut link = Link::new(pages, config(2, 2, 4096));
    rng.fill(&mut link.primary);
    let all: Vec<u32> = (0..pages as u32).collect();
    let enc = link.encode(&all, false);
    assert!(enc.chunks.len() > 2);
    let limits = link.limits.clone();
    let decode = |f: &Vec<u8>| {
        let mut fd = FrameDecoder::new(limits.clone());
        fd.push(f);
        let Some(Message::Chunk(c)) = fd.next().unwrap() else {
            panic!()
        };
        ChunkDecoder::new(limits.clone(), pages as u64)
            .decode_frame(&c)
            .unwrap()
    };
    let commit = enc.commit(vec![]);
    let mut replica = Replica::zeroed(pages as u32);
    let mut image = vec![0u8; pages * PAGE_SIZE];

    // Missing chunk.
    let mut asm = EpochAssembler::new(1, limits.clone());
    for f in &enc.chunks[1..] {
        asm.add(decode(f)).unwrap();
    }
    assert!(asm.commit(&commit, &mut replica, &mut image).is_err());
    // Duplicate chunk.
    assert!(asm.add(decode(&enc.chunks[1])).is_err());
    // Wrong epoch.
    let mut other = EpochAssembler::new(2, limits.clone());
    assert!(other.add(decode(&enc.chunks[0])).is_err());
    // Wrong digest.
    let mut asm = EpochAssembler::new(1, limits.clone());
    for f in &enc.chunks {
        asm.add(decode(f)).unwrap();
    }
    let mut bad = commit.clone();
    bad.digest.0[0] ^= 1;
    assert!(asm.commit(&bad, &mut replica, &mut image).is_err());
    assert!(image.iter().all(|&b| b == 0), "nothing applied");
    assert_eq!(replica.epoch(), 0);
    let out = asm.commit(&commit, &mut replica, &mut image).unwrap();
    assert_eq!(out.digest, commit.digest);
    assert_eq!(image, link.primary);
    // The same epoch again does not apply.
    assert!(asm.commit(&commit, &mut replica, &mut image).is_err());
}

#[test]
fn handcrafted_ref_chain_is_rejected() {
    // Encode a real epoch, then rewrite a Full record into a Ref whose source is a Ref dest.
    let mut rng = Rng(9);
    let pages = 8;
    let mut link = Link::new(pages, config(2, 64, 4096));
    let mut x = vec![0u8; PAGE_SIZE];
    rng.fill(&mut x);
    for i in 0..3 {
        link.primary[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(&x);
    }
    let enc = link.encode(&[0, 1, 2], false);
    assert_eq!(enc.stats.refs, 2);
    let mut fd = FrameDecoder::new(link.limits.clone());
    fd.push(&enc.chunks[0]);
    let Some(Message::Chunk(c)) = fd.next().unwrap() else {
        panic!()
    };
    let mut chunk = ChunkDecoder::new(link.limits.clone(), pages as u64)
        .decode_frame(&c)
        .unwrap();
    // Records: 0 Full, 1 Ref(0), 2 Ref(0) (in some order) -> make it 2 Ref(1).
    let r2 = chunk.records.iter_mut().find(|r| r.page == 2).unwrap();
    assert_eq!((r2.kind, r2.source), (RecordKind::Ref, 0));
    r2.source = 1;
    let mut asm = EpochAssembler::new(1, link.limits.clone());
    asm.add(chunk).unwrap();
    let err = asm
        .commit(&enc.commit(vec![]), &mut link.replica, &mut link.backup)
        .unwrap_err();
    assert!(err.to_string().contains("Ref destination"), "{err}");
}

/// The random workload of `roundtrip_many_epochs` really produces every kind of record.
#[test]
fn roundtrip_exercises_every_record_kind() {
    let mut rng = Rng(11);
    let pages = 64;
    let mut link = Link::new(pages, config(2, 8, 16));
    let mut total = understudy_protocol::EpochStats::default();
    for _ in 0..12 {
        let dirty: Vec<u32> = (0..pages as u32).filter(|_| rng.below(2) == 0).collect();
        for &i in &dirty {
            mutate_page(&mut rng, &mut link.primary, i as usize, pages);
        }
        let enc = link.encode(&dirty, true);
        let s = enc.stats;
        total.zero += s.zero;
        total.refs += s.refs;
        total.full += s.full;
        total.delta += s.delta;
        total.unchanged += s.unchanged;
        let frames = enc.chunks.clone();
        link.deliver(&enc, &frames, &mut rng).unwrap();
        link.check_same();
    }
    assert!(
        total.zero > 0 && total.refs > 0 && total.full > 0 && total.delta > 0,
        "{total:?}"
    );
    // The content index forgets content that left the image: bounded by the page count.
    assert!(
        link.encoder.index_len() <= pages,
        "{}",
        link.encoder.index_len()
    );
}

/// Decoders and plans are shared across worker threads: they must be `Send`/`Sync`.
#[test]
fn codec_types_cross_threads() {
    fn send<T: Send>() {}
    fn sync<T: Sync>() {}
    send::<understudy_protocol::ChunkDecoder>();
    send::<understudy_protocol::DecodedChunk>();
    send::<understudy_protocol::EncoderState>();
    send::<understudy_protocol::codec::ChunkCompressor>();
    sync::<understudy_protocol::EpochPlan>();
    sync::<understudy_protocol::Replica>();
}

/// The frames do not depend on the number of encoding threads.
#[test]
fn encoding_is_deterministic_across_thread_counts() {
    let pages = 200;
    let mut rng = Rng(21);
    let mut a = Link::new(pages, config(2, 8, 4096));
    let mut b = Link::new(pages, config(2, 8, 4096));
    b.threads = 2;
    for _ in 0..3 {
        let dirty: Vec<u32> = (0..pages as u32).filter(|_| rng.below(2) == 0).collect();
        for &i in &dirty {
            mutate_page(&mut rng, &mut a.primary, i as usize, pages);
        }
        b.primary.copy_from_slice(&a.primary);
        let ea = a.encode(&dirty, true);
        let eb = b.encode(&dirty, true);
        assert_eq!(ea.chunks, eb.chunks);
        assert_eq!(ea.digest, eb.digest);
    }
}
