//! `cargo bench -p understudy-protocol`: page codec throughput on a mixed page corpus.
//!
//! Corpus: 40% zero pages, 30% pages of ELF binaries under /usr/lib, 20% text (C headers under
//! /usr/include and text files under /usr/share), 10% random; then 5% of all pages are
//! overwritten with copies of other binary or text pages (duplicates), and the pages are
//! shuffled. Figures are GB/s of raw 4 KiB pages (1 GB = 1e9 bytes): `wall` is the best run by
//! wall clock, `cpu` the mean on-CPU time of the thread over the runs (the machines are shared
//! with other jobs, which inflates wall time; the scheduler's accounting has 4 ms steps, hence
//! the mean rather than the best).
//!
//! Scenarios:
//! * `full sync`: every page dirty against an empty (all-zero) backup: epoch 1 of a new session.
//! * `steady`: the image was synced; 25% of the pages are then rewritten with fresh content of
//!   the same mix, and 5% get a few bytes changed (Delta candidates); those 30% are the epoch.
//!
//! Environment: `BENCH_PAGES` (default 32768 = 128 MiB), `BENCH_REPS` (default 5),
//! (1024 pages and 1 run when started without `--bench`, as `cargo test --all-targets` does),
//! `BENCH_LEVEL` (zstd level), `BENCH_CHUNK_PAGES` (data pages per chunk).

use std::fs;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use understudy_protocol::{
    ChunkDecoder, DirtyPage, EncodedEpoch, EncoderConfig, EncoderState, EpochAssembler,
    FrameDecoder, Limits, Message, Replica, PAGE_SIZE,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() && depth < 6 {
            walk(&e.path(), out, depth + 1);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

fn is_zero(p: &[u8]) -> bool {
    p.iter().all(|&b| b == 0)
}

/// Up to `want` non-zero pages of ELF files under /usr/lib, at most 256 from each file.
fn binary_pages(want: usize) -> Vec<Vec<u8>> {
    let mut files = Vec::new();
    walk(Path::new("/usr/lib"), &mut files, 0);
    let mut pages = Vec::new();
    for f in files {
        if pages.len() >= want {
            break;
        }
        let Ok(meta) = fs::metadata(&f) else { continue };
        if meta.len() < 64 << 10 || meta.len() > 64 << 20 {
            continue;
        }
        let Ok(data) = fs::read(&f) else { continue };
        if !data.starts_with(b"\x7fELF") {
            continue;
        }
        for p in data.chunks_exact(PAGE_SIZE).take(256) {
            if !is_zero(p) && pages.len() < want {
                pages.push(p.to_vec());
            }
        }
    }
    pages
}

/// Up to `want` pages of text: C headers and text files, concatenated and cut into pages.
fn text_pages(want: usize) -> Vec<Vec<u8>> {
    let mut files = Vec::new();
    walk(Path::new("/usr/include"), &mut files, 0);
    walk(Path::new("/usr/share/doc"), &mut files, 0);
    let mut stream = Vec::new();
    for f in files {
        if stream.len() >= want * PAGE_SIZE {
            break;
        }
        let ext = f.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !matches!(ext, "h" | "txt" | "md" | "html" | "py" | "rst") {
            continue;
        }
        if let Ok(d) = fs::read(&f) {
            if d.iter().take(512).all(|&b| b != 0) {
                stream.extend_from_slice(&d);
            }
        }
    }
    stream
        .chunks_exact(PAGE_SIZE)
        .take(want)
        .map(<[u8]>::to_vec)
        .collect()
}

fn synthetic_text(rng: &mut Rng) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the", "page", "memory", "epoch", "backup", "primary", "int", "return", "struct", "static",
        "const", "void", "if", "else", "for", "while", "=", "{", "}", ";", "\n",
    ];
    let mut s = Vec::with_capacity(PAGE_SIZE);
    while s.len() < PAGE_SIZE {
        s.extend_from_slice(WORDS[rng.below(WORDS.len())].as_bytes());
        s.push(b' ');
    }
    s.truncate(PAGE_SIZE);
    s
}

struct Corpus {
    image: Vec<u8>,
    from_files: (usize, usize),
    binary: Vec<Vec<u8>>,
    text: Vec<Vec<u8>>,
}

fn fill_mix(rng: &mut Rng, c: &Corpus, slots: &[usize], image: &mut [u8]) {
    let n = slots.len();
    let mut kinds: Vec<u8> = (0..n)
        .map(|i| match i * 100 / n.max(1) {
            0..=39 => 0,
            40..=69 => 1,
            70..=89 => 2,
            _ => 3,
        })
        .collect();
    for i in (1..n).rev() {
        kinds.swap(i, rng.below(i + 1));
    }
    for (&slot, &k) in slots.iter().zip(&kinds) {
        let dst = &mut image[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE];
        match k {
            0 => dst.fill(0),
            1 => dst.copy_from_slice(&c.binary[rng.below(c.binary.len())]),
            2 => dst.copy_from_slice(&c.text[rng.below(c.text.len())]),
            _ => rng.fill(dst),
        }
    }
}

fn corpus(pages: usize, rng: &mut Rng) -> Corpus {
    let binary = binary_pages(pages * 30 / 100 + 1);
    let text = text_pages(pages * 20 / 100 + 1);
    let from_files = (binary.len(), text.len());
    let mut c = Corpus {
        image: vec![0u8; pages * PAGE_SIZE],
        from_files,
        binary,
        text,
    };
    // Pad the pools with synthetic pages if this machine lacks files (never on ours).
    while c.binary.len() < pages * 30 / 100 + 1 {
        let mut p = vec![0u8; PAGE_SIZE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = if i % 3 == 0 {
                rng.next() as u8
            } else {
                (i / 16) as u8
            };
        }
        c.binary.push(p);
    }
    while c.text.len() < pages * 20 / 100 + 1 {
        c.text.push(synthetic_text(rng));
    }
    // Each pool page is used once for the first image, in a shuffled layout.
    let mut slots: Vec<usize> = (0..pages).collect();
    for i in (1..pages).rev() {
        slots.swap(i, rng.below(i + 1));
    }
    let (z, b, t) = (pages * 40 / 100, pages * 30 / 100, pages * 20 / 100);
    for (k, &slot) in slots.iter().enumerate() {
        let dst = &mut c.image[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE];
        if k < z {
        } else if k < z + b {
            dst.copy_from_slice(&c.binary[k - z]);
        } else if k < z + b + t {
            dst.copy_from_slice(&c.text[k - z - b]);
        } else {
            rng.fill(dst);
        }
    }
    // 5% duplicates: binary/text slots that become copies of other binary/text pages.
    let bt = &slots[z..z + b + t];
    for _ in 0..pages * 5 / 100 {
        let (dst, src) = (bt[rng.below(bt.len())], bt[rng.below(bt.len())]);
        if dst != src {
            let page = c.image[src * PAGE_SIZE..(src + 1) * PAGE_SIZE].to_vec();
            c.image[dst * PAGE_SIZE..(dst + 1) * PAGE_SIZE].copy_from_slice(&page);
        }
    }
    c
}

/// On-CPU time of the calling thread, from the scheduler's accounting. It advances in steps of
/// a scheduler tick (4 ms here), so callers average it over runs. `None` where unavailable.
fn thread_cpu() -> Option<Duration> {
    let s = fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Wall and on-CPU time of `f` run on this thread, so that figures stay meaningful on a machine
/// shared with other jobs.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration, Duration) {
    let c0 = thread_cpu();
    let t0 = Instant::now();
    let out = f();
    let wall = t0.elapsed();
    let cpu = match (c0, thread_cpu()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => wall,
    };
    (out, wall, cpu)
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn pages_of<'a>(img: &'a [u8], idx: &[u32], base: Option<&'a [u8]>) -> Vec<DirtyPage<'a>> {
    idx.iter()
        .map(|&i| {
            let r = i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE;
            DirtyPage {
                index: i,
                data: img[r.clone()].try_into().unwrap(),
                base: base.map(|b| b[r].try_into().unwrap()),
            }
        })
        .collect()
}

/// Decodes and commits an encoded epoch: chunks decoded on `threads` threads (on this thread
/// when 1), staged and committed on this thread.
fn decode_epoch(enc: &EncodedEpoch, replica: &mut Replica, image: &mut Vec<u8>, threads: usize) {
    let limits = Limits::default();
    let pages = replica.page_count() as u64;
    let decode_all = |frames: &[Vec<u8>]| {
        let mut fd = FrameDecoder::new(limits.clone());
        let mut dec = ChunkDecoder::new(limits.clone(), pages);
        let mut out = Vec::with_capacity(frames.len());
        for f in frames {
            fd.push(f);
            let Ok(Some(Message::Chunk(c))) = fd.next() else {
                panic!("bad frame")
            };
            out.push(dec.decode_frame(&c).expect("decode"));
        }
        out
    };
    let decoded: Vec<_> = if threads == 1 {
        decode_all(&enc.chunks)
    } else {
        let per = enc.chunks.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let jobs: Vec<_> = enc
                .chunks
                .chunks(per)
                .map(|frames| s.spawn(|| decode_all(frames)))
                .collect();
            jobs.into_iter().flat_map(|j| j.join().unwrap()).collect()
        })
    };
    let mut asm = EpochAssembler::new(enc.epoch, limits.clone());
    for c in decoded {
        asm.add(c).unwrap();
    }
    asm.commit(&enc.commit(Vec::new()), replica, image)
        .expect("commit");
}

struct Row {
    enc_wall: Duration,
    enc_cpu: Duration,
    dec_wall: Duration,
    dec_cpu: Duration,
}

impl Row {
    fn new() -> Self {
        Row {
            enc_wall: Duration::MAX,
            enc_cpu: Duration::ZERO,
            dec_wall: Duration::MAX,
            dec_cpu: Duration::ZERO,
        }
    }
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn print_row(name: &str, threads: usize, bytes: usize, r: &Row, enc: &EncodedEpoch) {
    let s = enc.stats;
    let cpu = |d: Duration| {
        if threads == 1 {
            format!("{:.2}", gbps(bytes, d))
        } else {
            "-".into()
        }
    };
    println!(
        "{:<10} {:>3} {:>8.2} {:>8} {:>8.2} {:>8} {:>9.3}   zero {} unchanged {} ref {} full {} delta {} chunks {}",
        name,
        threads,
        gbps(bytes, r.enc_wall),
        cpu(r.enc_cpu),
        gbps(bytes, r.dec_wall),
        cpu(r.dec_cpu),
        s.wire_bytes as f64 / bytes as f64,
        s.zero,
        s.unchanged,
        s.refs,
        s.full,
        s.delta,
        enc.chunks.len()
    );
}

fn main() {
    // `cargo bench` passes `--bench`. Without it (`cargo test --all-targets` runs benches as
    // tests) this is a quick smoke run on a small corpus.
    let full = std::env::args().any(|a| a == "--bench");
    let pages: usize = env("BENCH_PAGES").unwrap_or(if full { 32768 } else { 1024 });
    let reps: usize = env::<usize>("BENCH_REPS")
        .unwrap_or(if full { 5 } else { 1 })
        .max(1);
    let mut config = EncoderConfig::default();
    if let Some(l) = env("BENCH_LEVEL") {
        config.zstd_level = l;
    }
    if let Some(c) = env("BENCH_CHUNK_PAGES") {
        config.data_pages_per_chunk = c;
    }
    let mut rng = Rng(0x5eed);
    let c = corpus(pages, &mut rng);
    let raw = pages * PAGE_SIZE;
    println!(
        "corpus: {pages} pages ({} MiB): 40% zero, 30% binary ({} pages read from ELF files \
         under /usr/lib), 20% text ({} pages read from /usr/include, /usr/share/doc), 10% \
         random, 5% of pages duplicates",
        raw >> 20,
        c.from_files.0,
        c.from_files.1
    );
    println!(
        "encoder: zstd level {}, {} data pages per chunk; {reps} runs; GB/s = 1e9 bytes of raw \
         pages per second: wall = best run by wall clock, cpu = mean on-CPU time of the (single) \
         thread",
        config.zstd_level, config.data_pages_per_chunk
    );

    // References on the same pages.
    let mut dst = vec![1u8; raw];
    let (mut memcpy, mut b3) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..reps {
        let (_, _, cpu) = timed(|| {
            for _ in 0..4 {
                dst.copy_from_slice(&c.image);
                black_box(&dst);
            }
        });
        memcpy += cpu / (4 * reps as u32);
        let (_, _, cpu) = timed(|| {
            for p in c.image.chunks_exact(PAGE_SIZE) {
                black_box(blake3::hash(p));
            }
        });
        b3 += cpu / reps as u32;
    }
    println!(
        "reference: memcpy {:.2} GB/s, blake3 per page {:.2} GB/s (1 thread, on-CPU)",
        gbps(raw, memcpy),
        gbps(raw, b3)
    );
    println!(
        "{:<10} {:>3} {:>8} {:>8} {:>8} {:>8} {:>9}   records",
        "scenario", "thr", "enc wall", "enc cpu", "dec wall", "dec cpu", "wire/raw"
    );

    let all: Vec<u32> = (0..pages as u32).collect();
    // Steady-state epoch: 25% of pages rewritten with the mix, 5% edited in a few bytes.
    let mut srng = Rng(0xbeef);
    let mut next = c.image.clone();
    let mut idx: Vec<usize> = (0..pages).collect();
    for i in (1..pages).rev() {
        idx.swap(i, srng.below(i + 1));
    }
    let (rewrite, rest) = idx.split_at(pages / 4);
    let edit = &rest[..pages / 20];
    fill_mix(&mut srng, &c, rewrite, &mut next);
    for &p in edit {
        for _ in 0..4 {
            let at = p * PAGE_SIZE + srng.below(PAGE_SIZE);
            next[at] ^= 0x5a;
        }
    }
    let mut dirty: Vec<u32> = rewrite.iter().chain(edit).map(|&p| p as u32).collect();
    dirty.sort_unstable();
    let dirty_bytes = dirty.len() * PAGE_SIZE;

    for threads in [1usize, 2] {
        // Full sync: every page against an all-zero backup.
        let mut row = Row::new();
        let mut enc = None;
        let mut synced = None;
        for _ in 0..reps {
            let mut st = EncoderState::new(pages as u32, config.clone());
            let list = pages_of(&c.image, &all, None);
            let (e, wall, cpu) = timed(|| st.encode_epoch(1, &list, threads).unwrap());
            row.enc_wall = row.enc_wall.min(wall);
            row.enc_cpu += cpu / reps as u32;
            enc = Some(e);
            synced = Some(st);
        }
        let (enc, synced) = (enc.unwrap(), synced.unwrap());
        let mut replica0 = None;
        for _ in 0..reps {
            let mut replica = Replica::zeroed(pages as u32);
            let mut image = vec![0u8; raw];
            image.fill(0); // fault the pages in outside the measurement
            let ((), wall, cpu) = timed(|| decode_epoch(&enc, &mut replica, &mut image, threads));
            row.dec_wall = row.dec_wall.min(wall);
            row.dec_cpu += cpu / reps as u32;
            assert!(image == c.image, "decoded image differs");
            replica0 = Some((replica, image));
        }
        print_row("full sync", threads, raw, &row, &enc);

        // Steady state, from the synced image.
        let (replica0, image0) = replica0.unwrap();
        let mut row = Row::new();
        let mut enc2 = None;
        for _ in 0..reps {
            let mut st = EncoderState::from_tree(synced.tree().clone(), 1, config.clone());
            let list = pages_of(&next, &dirty, Some(&c.image));
            let (e, wall, cpu) = timed(|| st.encode_epoch(2, &list, threads).unwrap());
            row.enc_wall = row.enc_wall.min(wall);
            row.enc_cpu += cpu / reps as u32;
            enc2 = Some(e);
        }
        let enc2 = enc2.unwrap();
        for _ in 0..reps {
            let mut replica = replica0.clone();
            let mut image = image0.clone();
            let ((), wall, cpu) = timed(|| decode_epoch(&enc2, &mut replica, &mut image, threads));
            row.dec_wall = row.dec_wall.min(wall);
            row.dec_cpu += cpu / reps as u32;
            assert!(image == next, "decoded image differs (steady)");
        }
        print_row("steady", threads, dirty_bytes, &row, &enc2);
    }
    println!(
        "targets (full sync, 1 thread): encode >= 0.5 GB/s per core, decode >= 1.0 GB/s per \
         core, wire <= 0.33 x raw"
    );
}
