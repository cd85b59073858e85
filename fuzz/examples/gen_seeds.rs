//! Writes the seed corpus under `fuzz/corpus/<target>/` from real encoder output:
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds`.

use std::fs;
use std::path::Path;

use understudy_protocol::{
    Ack, Commit, Digest, DirtyPage, EncoderConfig, EncoderState, EpochDigest, Goodbye,
    GoodbyeReason, Heartbeat, Hello, MemoryLayout, Message, Mode, Reject, RejectCode, Welcome,
    PAGE_SIZE,
};

use understudy_vmm::state::vcpu::XsaveArea;
use understudy_vmm::state::{VcpuState, DEFAULT_STATE_LIMIT, STATE_VERSION_MIN};
use understudy_vmm::{RegionSpec, VmState};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    // Messages.
    let msgs = [
        Message::Hello(Hello {
            min_version: 2,
            max_version: 3,
            mode: Mode::Protect,
            vm_id: "vm".into(),
            layout: MemoryLayout::flat(64),
            base: Some(EpochDigest {
                epoch: 3,
                digest: Digest([7; 32]),
            }),
        }),
        Message::Welcome(Welcome {
            version: 3,
            resumed: false,
            epoch: 0,
            digest: Digest([1; 32]),
        }),
        Message::Reject(Reject {
            code: RejectCode::Version,
            reason: "upgrade the backup".into(),
        }),
        Message::Commit(Commit {
            epoch: 5,
            chunk_count: 2,
            page_count: 9,
            digest: Digest([2; 32]),
            state: b"state".to_vec(),
        }),
        Message::Ack(Ack { epoch: 5 }),
        Message::Heartbeat(Heartbeat {
            sent_ns: 10,
            echo_ns: 5,
            hold_ns: 1,
        }),
        Message::Goodbye(Goodbye {
            reason: GoodbyeReason::Done,
            text: "bye".into(),
        }),
    ];
    let mut stream = vec![7u8]; // frame_decoder: first byte is the push step
    for (i, m) in msgs.iter().enumerate() {
        let mut f = Vec::new();
        m.encode(&mut f);
        stream.extend_from_slice(&f);
        // frame_payload: kind, version, flags, payload
        let mut p = vec![f[6], f[4], 3];
        p.extend_from_slice(&f[16..]);
        write("frame_payload", &format!("msg{i}"), &p);
        let mut one = vec![16u8];
        one.extend_from_slice(&f);
        write("frame_decoder", &format!("msg{i}"), &one);
    }
    write("frame_decoder", "stream", &stream);

    // Chunks from a real encoder: mixed content, two epochs (the second with Ref and Delta).
    let pages = 24usize;
    let mut img = vec![0u8; pages * PAGE_SIZE];
    for i in 0..pages {
        let p = &mut img[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
        match i % 4 {
            0 => {}
            1 => p
                .iter_mut()
                .enumerate()
                .for_each(|(k, b)| *b = (k * 7 + i) as u8),
            2 => p.copy_from_slice(
                &b"the quick brown fox jumps over the lazy dog. ".repeat(92)[..PAGE_SIZE],
            ),
            _ => p
                .iter_mut()
                .enumerate()
                .for_each(|(k, b)| *b = ((k as u32).wrapping_mul(2654435761) >> 13) as u8),
        }
    }
    // Chunk format 2 (protocol 2) seeds keep their names; format 3 seeds are `f3-...`.
    for (version, prefix) in [(2u16, ""), (3, "f3-")] {
        let cfg = EncoderConfig {
            version,
            data_pages_per_chunk: 4,
            ..EncoderConfig::default()
        };
        let mut st = EncoderState::new(pages as u32, cfg);
        let list = |img: &[u8], base: Option<&[u8]>| -> Vec<(u32, Vec<u8>, Option<Vec<u8>>)> {
            (0..pages)
                .map(|i| {
                    let r = i * PAGE_SIZE..(i + 1) * PAGE_SIZE;
                    (
                        i as u32,
                        img[r.clone()].to_vec(),
                        base.map(|b| b[r].to_vec()),
                    )
                })
                .collect()
        };
        let owned = list(&img, None);
        let dirty: Vec<DirtyPage<'_>> = owned
            .iter()
            .map(|(i, d, _)| DirtyPage {
                index: *i,
                data: d.as_slice().try_into().unwrap(),
                base: None,
            })
            .collect();
        let e1 = st.encode_epoch(1, &dirty, 1).unwrap();
        let mut next = img.clone();
        next[5 * PAGE_SIZE + 9] ^= 0xff; // delta
        let (a, b) = next.split_at_mut(9 * PAGE_SIZE);
        b[..PAGE_SIZE].copy_from_slice(&a[PAGE_SIZE..2 * PAGE_SIZE]); // page 9 = page 1: Ref
        next[2 * PAGE_SIZE..3 * PAGE_SIZE].fill(0); // zero
        let owned2 = list(&next, Some(&img));
        let dirty2: Vec<DirtyPage<'_>> = owned2
            .iter()
            .filter(|(i, _, _)| [2, 5, 9].contains(i))
            .map(|(i, d, b)| DirtyPage {
                index: *i,
                data: d.as_slice().try_into().unwrap(),
                base: b.as_ref().map(|b| b.as_slice().try_into().unwrap()),
            })
            .collect();
        let e2 = st.encode_epoch(2, &dirty2, 1).unwrap();
        for (name, f) in e1
            .chunks
            .iter()
            .take(3)
            .map(|f| ("e1", f))
            .chain(e2.chunks.iter().map(|f| ("e2", f)))
            .enumerate()
            .map(|(k, (e, f))| (format!("{prefix}{e}-{k}"), f))
        {
            // chunk_decoder: version, image pages - 1, payload (a seed that decodes)
            let decoded = understudy_protocol::decode_chunk(
                version,
                &f[16..],
                pages as u64,
                &understudy_protocol::Limits::default(),
            );
            assert!(decoded.is_ok(), "seed chunk does not decode: {decoded:?}");
            assert_eq!(decoded.unwrap().format, version);
            let mut c = vec![version as u8, (pages - 1) as u8];
            c.extend_from_slice(&f[16..]);
            write("chunk_decoder", &name, &c);
            let mut fd = vec![13u8];
            fd.extend_from_slice(f);
            write("frame_decoder", &format!("chunk-{name}"), &fd);
        }
    }

    // epoch_commit: order byte, then (page, kind|flags, source, fill) records.
    write(
        "epoch_commit",
        "mixed",
        &[
            0, 0, 1, 0, 9, 1, 1, 2, 5, 2, 2, 0, 0, 3, 3, 0, 7, 0x83, 4, 1, 6, 2, 1, 0,
        ],
    );
    write(
        "epoch_commit",
        "chain",
        &[3, 1, 1, 0, 7, 2, 2, 1, 0, 3, 2, 2, 0],
    );
    write("epoch_commit", "empty", &[0]);
    // The same in chunk format 3 (order byte bit 0x40), and one whose Full data is altered.
    write(
        "epoch_commit",
        "f3-mixed",
        &[
            0x40, 0, 1, 0, 9, 1, 1, 2, 5, 2, 2, 0, 0, 3, 3, 0, 7, 0x83, 4, 1, 6, 2, 1, 0,
        ],
    );
    write(
        "epoch_commit",
        "f3-chain",
        &[0x43, 1, 1, 0, 7, 2, 2, 1, 0, 3, 2, 2, 0],
    );
    write(
        "epoch_commit",
        "f3-altered",
        &[0x40, 0, 0x41, 0, 9, 1, 1, 2, 5],
    );
    state_seeds();
    println!("seeds written");
}

/// `state_blob` seeds (its first byte: 1 = the rest is a whole blob, 0 / 2 = the rest is the
/// payload of a blob the harness writes with format version 3 / 2): a one-vCPU and a two-vCPU
/// state, whole and as payloads, a version 2 payload, and cut and altered copies.
fn state_seeds() {
    let with_mode = |mode: u8, bytes: &[u8]| [&[mode][..], bytes].concat();
    let mut v0 = VcpuState::default();
    v0.regs.rip = 0x1_0000;
    v0.regs.rsp = 0x3_0000;
    v0.regs.rflags = 0x3002;
    v0.sregs.cr3 = 0x1000;
    v0.msrs = vec![(0x10, 123_456_789), (0x174, 0), (0xc000_0102, 0)];
    let mut v1 = v0.clone();
    v1.regs.rip = 0x1_0040;
    v1.xsave = Some(XsaveArea::default());
    v1.xcrs = Some(Default::default());
    let small = VmState {
        regions: vec![RegionSpec {
            gpa: 0,
            size: 16 << 20,
        }],
        tsc_khz: 2_600_000,
        irqchip: false,
        vcpus: vec![v0.clone()],
        serial: Default::default(),
        console: Vec::new(),
        console_offset: Some(0),
    };
    let two = VmState {
        regions: vec![
            RegionSpec {
                gpa: 0,
                size: 16 << 20,
            },
            RegionSpec {
                gpa: 16 << 20,
                size: 16 << 20,
            },
        ],
        vcpus: vec![v0, v1],
        console: b"tick 1 ok\n".to_vec(),
        console_offset: Some(4096),
        ..small.clone()
    };
    for (name, state) in [("one-vcpu", &small), ("two-vcpus", &two)] {
        let b = state.encode();
        assert_eq!(VmState::decode(&b, DEFAULT_STATE_LIMIT).as_ref(), Ok(state));
        write("state_blob", &format!("{name}-blob"), &with_mode(1, &b));
        write(
            "state_blob",
            &format!("{name}-payload"),
            &with_mode(0, &b[24..]),
        );
    }
    // Version 2: the CONSOLE section (the last) without the offset.
    let b = two.encode();
    let console = &two.console;
    let at = b.len() - (8 + 1 + 8 + 4 + console.len());
    let mut v2 = b[24..at].to_vec();
    v2.extend_from_slice(&4u16.to_le_bytes());
    v2.extend_from_slice(&0u16.to_le_bytes());
    v2.extend_from_slice(&(4 + console.len() as u32).to_le_bytes());
    v2.extend_from_slice(&(console.len() as u32).to_le_bytes());
    v2.extend_from_slice(console);
    let mut v2_blob = b[..24].to_vec();
    v2_blob[8..10].copy_from_slice(&STATE_VERSION_MIN.to_le_bytes());
    v2_blob[12..16].copy_from_slice(&(v2.len() as u32).to_le_bytes());
    v2_blob[16..20].copy_from_slice(&crc32fast::hash(&v2).to_le_bytes());
    v2_blob.extend_from_slice(&v2);
    let decoded = VmState::decode(&v2_blob, DEFAULT_STATE_LIMIT).expect("the version 2 seed");
    assert_eq!((&decoded.console, decoded.console_offset), (console, None));
    write("state_blob", "v2-payload", &with_mode(2, &v2));
    // Cut and altered.
    let b = small.encode();
    write("state_blob", "cut-header", &with_mode(1, &b[..24]));
    write(
        "state_blob",
        "cut-payload",
        &with_mode(0, &b[24..b.len() / 2]),
    );
    let mut long_section = b[24..].to_vec();
    long_section[7] = 0x7f; // the VM section's length
    write(
        "state_blob",
        "section-too-long",
        &with_mode(0, &long_section),
    );
    let mut bad_crc = b.clone();
    bad_crc[40] ^= 1;
    write("state_blob", "bad-crc", &with_mode(1, &bad_crc));
    let mut old = b.clone();
    old[8] = 1; // format version 1
    write("state_blob", "version-1", &with_mode(1, &old));
    write("state_blob", "v3-payload-as-v2", &with_mode(2, &b[24..]));
}
