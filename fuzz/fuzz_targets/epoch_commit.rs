//! Differential test of staging and commit against a model of the `Ref` rule.
//!
//! The input describes one epoch over an 8-page image: 4 bytes per record (page, kind and
//! flags, source, fill byte), cut into chunks where a flag says so and delivered in an order
//! drawn from the first byte, whose bit 0x40 picks chunk format 3 (records without hashes)
//! over format 2. The harness writes real chunks (format 2: correct hashes unless a flag
//! corrupts one; format 3: the flag alters a Full page's data, a Delta or a Ref's source),
//! runs them through `ChunkDecoder`, `EpochAssembler` and `commit` against the digest an honest
//! primary would send, and checks the outcome against the model: a valid epoch must apply and
//! give the model's image and digest; an invalid one (page written twice, Ref to itself, Ref
//! to a Ref destination, a wrong hash, format 3: content that changes the image) must be
//! rejected with the image and replica untouched.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_protocol::{
    ChunkDecoder, Commit, EpochAssembler, Limits, PageTree, Replica, PAGE_SIZE, ZERO_PAGE_HASH,
};

const PAGES: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Zero = 1,
    Full = 2,
    Ref = 3,
    Delta = 4,
}

struct Rec {
    page: usize,
    kind: Kind,
    source: usize,
    fill: u8,
    corrupt: bool,
    cut_before: bool,
}

fn page(img: &[u8], i: usize) -> &[u8] {
    &img[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
}

fn delta_payload(fill: u8) -> Vec<u8> {
    let mut x = vec![0u8; PAGE_SIZE];
    x[usize::from(fill) * 16] = fill | 1;
    x
}

fn hash(p: &[u8]) -> [u8; 32] {
    *blake3::hash(p).as_bytes()
}

fuzz_target!(|data: &[u8]| {
    let Some((&order_seed, rest)) = data.split_first() else {
        return;
    };
    let mut initial = vec![0u8; PAGES * PAGE_SIZE];
    for i in 0..PAGES {
        initial[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].fill((i % 3) as u8 * 0x11);
    }
    let recs: Vec<Rec> = rest
        .chunks_exact(4)
        .take(32)
        .map(|b| Rec {
            page: usize::from(b[0]) % PAGES,
            kind: match b[1] % 4 {
                0 => Kind::Zero,
                1 => Kind::Full,
                2 => Kind::Ref,
                _ => Kind::Delta,
            },
            source: usize::from(b[2]) % PAGES,
            fill: b[3],
            corrupt: b[1] & 0x40 != 0,
            cut_before: b[1] & 0x80 != 0,
        })
        .collect();

    // Chunk format: 2 (records carry hashes; `corrupt` flips a record's hash) or 3 (no hashes;
    // `corrupt` alters what the hash covered: a Full page's data, a Delta's XOR, a Ref's source;
    // nothing for Zero). Either way only the image digest or a record check can catch it.
    let format: u16 = if order_seed & 0x40 != 0 { 3 } else { 2 };
    let v3 = format == 3;
    let sent_source = |r: &Rec| {
        if v3 && r.corrupt && r.kind == Kind::Ref {
            (r.source + 1) % PAGES
        } else {
            r.source
        }
    };
    let sent_delta = |r: &Rec| {
        let mut x = delta_payload(r.fill);
        if v3 && r.corrupt {
            x[PAGE_SIZE - 1] ^= 1;
        }
        x
    };
    let sent_full = |r: &Rec| {
        let mut x = vec![r.fill; PAGE_SIZE];
        if v3 && r.corrupt {
            x[0] ^= 1;
        }
        x
    };

    // The model: which records are well formed (each page written once, no Ref to itself or to
    // a Ref destination), and the content each record gives its page under the `Ref` rule.
    let mut written = [None::<usize>; PAGES];
    let mut dup = false;
    for (k, r) in recs.iter().enumerate() {
        if written[r.page].is_some() {
            dup = true;
        }
        written[r.page] = Some(k);
    }
    // (well formed, content per record) for the records with these sources and payloads.
    let describe = |source: &dyn Fn(&Rec) -> usize,
                    full: &dyn Fn(&Rec) -> Vec<u8>,
                    delta: &dyn Fn(&Rec) -> Vec<u8>|
     -> (bool, Vec<Vec<u8>>) {
        let mut ok = !dup;
        let mut content: Vec<Vec<u8>> = recs
            .iter()
            .map(|r| match r.kind {
                Kind::Zero => vec![0u8; PAGE_SIZE],
                Kind::Full => full(r),
                Kind::Delta => page(&initial, r.page)
                    .iter()
                    .zip(delta(r))
                    .map(|(a, b)| a ^ b)
                    .collect(),
                Kind::Ref => Vec::new(),
            })
            .collect();
        for (k, r) in recs.iter().enumerate() {
            if r.kind != Kind::Ref {
                continue;
            }
            let src = source(r);
            let src_is_ref = written[src].is_some_and(|j| recs[j].kind == Kind::Ref);
            if src == r.page || src_is_ref {
                ok = false;
            }
            content[k] = match written[src] {
                Some(j) if recs[j].kind != Kind::Ref => content[j].clone(),
                _ => page(&initial, src).to_vec(),
            };
        }
        (ok, content)
    };
    let apply = |content: &[Vec<u8>]| {
        let mut img = initial.clone();
        for (k, r) in recs.iter().enumerate() {
            img[r.page * PAGE_SIZE..(r.page + 1) * PAGE_SIZE].copy_from_slice(&content[k]);
        }
        img
    };
    let honest_full = |r: &Rec| vec![r.fill; PAGE_SIZE];
    let honest_delta = |r: &Rec| delta_payload(r.fill);
    let (honest_ok, content) = describe(&|r: &Rec| r.source, &honest_full, &honest_delta);
    // The digest an honest primary would send: the image the honest records describe (applied
    // in order, even when they are malformed), so only the records' own faults can make the
    // commit fail.
    let honest_image = apply(&content);
    let (sent_ok, sent_content) = describe(&sent_source, &sent_full, &sent_delta);
    let valid = if v3 {
        // Without hashes a change is refused exactly when it changes the image.
        sent_ok && apply(&sent_content) == honest_image
    } else {
        honest_ok && !recs.iter().any(|r| r.corrupt)
    };
    let expected = if valid {
        honest_image.clone()
    } else {
        initial.clone()
    };

    // Real chunks.
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    for (k, r) in recs.iter().enumerate() {
        if chunks.is_empty() || r.cut_before {
            chunks.push(Vec::new());
        }
        chunks.last_mut().unwrap().push(k);
    }
    let mut payloads = Vec::new();
    for (seq, ks) in chunks.iter().enumerate() {
        let mut recbytes = Vec::new();
        let mut raw = Vec::new();
        for &k in ks {
            let r = &recs[k];
            let src = if r.kind == Kind::Ref {
                sent_source(r) as u32
            } else {
                0
            };
            if v3 {
                recbytes.push(r.kind as u8);
                recbytes.extend_from_slice(&(r.page as u32).to_le_bytes());
                if r.kind == Kind::Ref {
                    recbytes.extend_from_slice(&src.to_le_bytes());
                }
            } else {
                let mut h = match r.kind {
                    Kind::Zero => ZERO_PAGE_HASH,
                    _ => hash(&content[k]),
                };
                if r.corrupt {
                    h[0] ^= 1;
                }
                recbytes.extend_from_slice(&(r.page as u32).to_le_bytes());
                recbytes.push(r.kind as u8);
                recbytes.extend_from_slice(&[0, 0, 0]);
                recbytes.extend_from_slice(&src.to_le_bytes());
                recbytes.extend_from_slice(&h);
            }
            match r.kind {
                Kind::Full => raw.extend_from_slice(&sent_full(r)),
                Kind::Delta => raw.extend_from_slice(&sent_delta(r)),
                _ => {}
            }
        }
        let z = if raw.is_empty() {
            Vec::new()
        } else {
            zstd::bulk::compress(&raw, 1).unwrap()
        };
        let mut p = Vec::new();
        p.extend_from_slice(&format.to_le_bytes());
        p.extend_from_slice(&0u16.to_le_bytes());
        p.extend_from_slice(&(seq as u32).to_le_bytes());
        p.extend_from_slice(&1u64.to_le_bytes());
        p.extend_from_slice(&(ks.len() as u32).to_le_bytes());
        p.extend_from_slice(&((raw.len() / PAGE_SIZE) as u32).to_le_bytes());
        p.extend_from_slice(&(z.len() as u32).to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&recbytes);
        p.extend_from_slice(&z);
        payloads.push(p);
    }
    // Delivery order: a rotation and an optional reversal.
    let n = payloads.len().max(1);
    payloads.rotate_left(usize::from(order_seed) % n);
    if order_seed & 0x80 != 0 {
        payloads.reverse();
    }

    let limits = Limits::default();
    let mut dec = ChunkDecoder::new(limits.clone(), PAGES as u64);
    let mut asm = EpochAssembler::new(1, limits);
    for p in &payloads {
        if let Ok(c) = dec.decode(format, p) {
            asm.add(c).unwrap();
        }
    }
    let mut image = initial.clone();
    let mut replica = Replica::from_tree(PageTree::from_image(&initial), 0);
    let digest_before = replica.digest();
    let commit = Commit {
        epoch: 1,
        chunk_count: chunks.len() as u32,
        page_count: recs.len() as u32,
        digest: PageTree::from_image(&honest_image).digest(),
        state: Vec::new(),
    };
    let out = asm.commit(&commit, &mut replica, &mut image);
    if valid {
        let o = out.unwrap_or_else(|e| panic!("valid epoch rejected: {e}"));
        assert!(image == expected, "applied image differs from the model");
        assert_eq!(o.digest, PageTree::from_image(&expected).digest());
        assert_eq!(replica.digest(), o.digest);
        assert_eq!(replica.epoch(), 1);
    } else {
        assert!(out.is_err(), "invalid epoch applied");
        assert!(image == initial, "rejected epoch wrote to the image");
        assert_eq!(replica.epoch(), 0);
        assert_eq!(replica.digest(), digest_before);
    }
});
