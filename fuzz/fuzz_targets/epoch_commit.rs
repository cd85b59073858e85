//! Differential test of staging and commit against a model of the `Ref` rule.
//!
//! The input describes one epoch over an 8-page image: 4 bytes per record (page, kind and
//! flags, source, fill byte), cut into chunks where a flag says so and delivered in an order
//! drawn from the first byte. The harness writes real chunks (correct hashes unless a flag
//! corrupts one), runs them through `ChunkDecoder`, `EpochAssembler` and `commit`, and checks
//! the outcome against the model: a valid epoch must apply and give the model's image and
//! digest; an invalid one (page written twice, Ref to itself, Ref to a Ref destination, a
//! wrong hash) must be rejected with the image and replica untouched.
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

    // The model.
    let mut valid = true;
    let mut written = [None::<usize>; PAGES];
    for (k, r) in recs.iter().enumerate() {
        if written[r.page].is_some() {
            valid = false;
        }
        written[r.page] = Some(k);
    }
    let mut expected = initial.clone();
    let mut content: Vec<Vec<u8>> = Vec::new();
    for r in &recs {
        let new = match r.kind {
            Kind::Zero => vec![0u8; PAGE_SIZE],
            Kind::Full => vec![r.fill; PAGE_SIZE],
            Kind::Delta => page(&initial, r.page)
                .iter()
                .zip(delta_payload(r.fill))
                .map(|(a, b)| a ^ b)
                .collect(),
            Kind::Ref => Vec::new(),
        };
        content.push(new);
    }
    let final_of = |p: usize, content: &Vec<Vec<u8>>| -> Vec<u8> {
        match written[p] {
            Some(k) if recs[k].kind != Kind::Ref => content[k].clone(),
            _ => page(&initial, p).to_vec(),
        }
    };
    for (k, r) in recs.iter().enumerate() {
        if r.kind == Kind::Ref {
            let src_is_ref = written[r.source].is_some_and(|j| recs[j].kind == Kind::Ref);
            if r.source == r.page || src_is_ref {
                valid = false;
            }
            content[k] = final_of(r.source, &content);
        }
        if r.corrupt {
            valid = false;
        }
    }
    if valid {
        for (k, r) in recs.iter().enumerate() {
            expected[r.page * PAGE_SIZE..(r.page + 1) * PAGE_SIZE].copy_from_slice(&content[k]);
        }
    }

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
            let src = if r.kind == Kind::Ref {
                r.source as u32
            } else {
                0
            };
            recbytes.extend_from_slice(&src.to_le_bytes());
            recbytes.extend_from_slice(&h);
            match r.kind {
                Kind::Full => raw.extend_from_slice(&content[k]),
                Kind::Delta => raw.extend_from_slice(&delta_payload(r.fill)),
                _ => {}
            }
        }
        let z = if raw.is_empty() {
            Vec::new()
        } else {
            zstd::bulk::compress(&raw, 1).unwrap()
        };
        let mut p = Vec::new();
        p.extend_from_slice(&2u16.to_le_bytes());
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
        if let Ok(c) = dec.decode(2, p) {
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
        // The digest an honest primary would send: the model's image when valid, and when
        // invalid the image the records describe (applied in order), so only the records'
        // own faults can make the commit fail.
        digest: {
            let mut img = initial.clone();
            for (k, r) in recs.iter().enumerate() {
                img[r.page * PAGE_SIZE..(r.page + 1) * PAGE_SIZE].copy_from_slice(&content[k]);
            }
            PageTree::from_image(&img).digest()
        },
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
