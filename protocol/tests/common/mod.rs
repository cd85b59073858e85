//! Fixtures shared by the protocol tests: a deterministic page generator and a simulated
//! primary -> backup link that runs every epoch through frames, chunk decoding (in a shuffled
//! order), staging and commit.
#![allow(dead_code)]

use understudy_protocol::codec::EncodedEpoch;
use understudy_protocol::{
    ApplyError, ChunkDecoder, CommitOutcome, DirtyPage, EncoderConfig, EncoderState,
    EpochAssembler, FrameDecoder, Limits, Message, PageTree, Replica, PAGE_SIZE,
};

/// Proptest cases: `n`, or `PROPTEST_CASES` from the environment (for long local runs).
pub fn cases(n: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n)
}

/// splitmix64: a tiny deterministic generator.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

pub fn page(img: &[u8], i: usize) -> &[u8; PAGE_SIZE] {
    img[i * PAGE_SIZE..][..PAGE_SIZE].try_into().unwrap()
}

/// Writes new content into page `i` of `img`: zero, a copy of another page, one of a few
/// shared patterns, a small edit of its current content, or random bytes.
pub fn mutate_page(rng: &mut Rng, img: &mut [u8], i: usize, pages: usize) {
    let mut buf = [0u8; PAGE_SIZE];
    match rng.below(6) {
        0 => {}
        1 => {
            let j = rng.below(pages as u64) as usize;
            buf.copy_from_slice(page(img, j));
        }
        2 => {
            let pat = rng.below(3) as u8 + 1;
            for (k, b) in buf.iter_mut().enumerate() {
                *b = pat.wrapping_mul(k as u8 | 1);
            }
        }
        3 => {
            buf.copy_from_slice(page(img, i));
            for _ in 0..=rng.below(8) {
                let at = rng.below(PAGE_SIZE as u64) as usize;
                buf[at] = buf[at].wrapping_add(1 + rng.below(255) as u8);
            }
        }
        _ => rng.fill(&mut buf),
    }
    img[i * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&buf);
}

/// Primary and backup connected by an in-memory link.
pub struct Link {
    pub pages: usize,
    pub limits: Limits,
    pub primary: Vec<u8>,
    /// What the primary believes the backup holds (the base for `Delta`).
    pub shadow: Vec<u8>,
    pub encoder: EncoderState,
    pub backup: Vec<u8>,
    pub replica: Replica,
    pub epoch: u64,
    pub threads: usize,
}

impl Link {
    pub fn new(pages: usize, config: EncoderConfig) -> Self {
        Link {
            pages,
            limits: Limits::default(),
            primary: vec![0; pages * PAGE_SIZE],
            shadow: vec![0; pages * PAGE_SIZE],
            encoder: EncoderState::new(pages as u32, config),
            backup: vec![0; pages * PAGE_SIZE],
            replica: Replica::zeroed(pages as u32),
            epoch: 0,
            threads: 1,
        }
    }

    /// Encodes `dirty` pages of the primary as the next epoch.
    pub fn encode(&mut self, dirty: &[u32], with_base: bool) -> EncodedEpoch {
        self.epoch += 1;
        let list: Vec<DirtyPage<'_>> = dirty
            .iter()
            .map(|&i| DirtyPage {
                index: i,
                data: page(&self.primary, i as usize),
                base: with_base.then(|| page(&self.shadow, i as usize)),
            })
            .collect();
        let enc = self
            .encoder
            .encode_epoch(self.epoch, &list, self.threads)
            .expect("encode");
        for &i in dirty {
            let r = i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE;
            let src = self.primary[r.clone()].to_vec();
            self.shadow[r].copy_from_slice(&src);
        }
        enc
    }

    /// Sends the frames (in `order`) and the commit through frame and chunk decoders.
    pub fn deliver(
        &mut self,
        enc: &EncodedEpoch,
        frames: &[Vec<u8>],
        rng: &mut Rng,
    ) -> Result<CommitOutcome, String> {
        let mut order: Vec<usize> = (0..frames.len()).collect();
        rng.shuffle(&mut order);
        let mut asm = EpochAssembler::new(enc.epoch, self.limits.clone());
        let mut dec = ChunkDecoder::new(self.limits.clone(), self.pages as u64);
        for k in order {
            let mut fd = FrameDecoder::new(self.limits.clone());
            // Push in two pieces at a random split.
            let f = &frames[k];
            let cut = rng.below(f.len() as u64 + 1) as usize;
            fd.push(&f[..cut]);
            let first = fd.next().map_err(|e| format!("frame: {e}"))?;
            fd.push(&f[cut..]);
            let msg = match first {
                Some(m) => m,
                None => fd
                    .next()
                    .map_err(|e| format!("frame: {e}"))?
                    .ok_or("incomplete frame")?,
            };
            let Message::Chunk(cf) = msg else {
                return Err("not a chunk".into());
            };
            let chunk = dec.decode_frame(&cf).map_err(|e| format!("decode: {e}"))?;
            asm.add(chunk).map_err(|e| format!("stage: {e}"))?;
        }
        let mut commit_bytes = Vec::new();
        Message::Commit(enc.commit(b"vm state".to_vec())).encode(&mut commit_bytes);
        let mut fd = FrameDecoder::new(self.limits.clone());
        fd.push(&commit_bytes);
        let Some(Message::Commit(commit)) = fd.next().map_err(|e| format!("commit frame: {e}"))?
        else {
            return Err("not a commit".into());
        };
        asm.commit(&commit, &mut self.replica, &mut self.backup)
            .map_err(|e: ApplyError| format!("commit: {e}"))
    }

    pub fn check_same(&mut self) {
        assert!(
            self.primary == self.backup,
            "backup image differs from primary"
        );
        let want = PageTree::from_image(&self.primary).digest();
        assert_eq!(self.encoder.digest(), want, "encoder digest");
        assert_eq!(self.replica.digest(), want, "replica digest");
        assert_eq!(self.replica.epoch(), self.epoch);
    }
}
