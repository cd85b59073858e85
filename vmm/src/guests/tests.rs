//! Unit tests of the guest generators (no KVM needed): every workload assembles for a range of
//! parameters, fits in CODE_MAX, decodes cleanly, uses only CPL3-safe instructions, and bad
//! parameters are rejected with errors naming the flag and the allowed range.

use std::collections::HashMap;

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

use super::layout::*;
use super::*;

const ENV: GuestEnv = GuestEnv {
    memory_bytes: 256 << 20,
    tsc_khz: 2_600_000,
};

fn flags(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Decodes the instruction part of an image, checking that it decodes exactly and contains
/// nothing a CPL3 guest cannot run.
fn decode(image: &asm::Image) -> Vec<Instruction> {
    assert!(image.text_len > 0 && image.text_len <= image.bytes.len());
    let text = &image.bytes[..image.text_len];
    let mut decoder = Decoder::with_ip(64, text, CODE_GPA, DecoderOptions::NONE);
    let mut out = Vec::new();
    let mut len = 0;
    for ins in &mut decoder {
        assert!(!ins.is_invalid(), "invalid instruction at {:#x}", ins.ip());
        len += ins.len();
        out.push(ins);
    }
    assert_eq!(
        len, image.text_len,
        "instructions do not end where the data starts"
    );
    let end = CODE_GPA + image.bytes.len() as u64;
    for ins in &out {
        // Privileged or trapping instructions have no place in a CPL3 guest.
        assert!(
            !matches!(
                ins.mnemonic(),
                Mnemonic::Hlt
                    | Mnemonic::Cli
                    | Mnemonic::Sti
                    | Mnemonic::Int
                    | Mnemonic::Int3
                    | Mnemonic::Syscall
                    | Mnemonic::Iretq
                    | Mnemonic::Wrmsr
                    | Mnemonic::Rdmsr
            ),
            "{ins} at {:#x}",
            ins.ip()
        );
        // Port I/O only to COM1 and the exit port, through dx.
        if ins.mnemonic() == Mnemonic::Out {
            assert_eq!(ins.op0_register(), Register::DX, "{ins}");
        }
        // Branches stay inside the image.
        if ins.op0_kind() == OpKind::NearBranch64 {
            let t = ins.near_branch_target();
            assert!((CODE_GPA..end).contains(&t), "{ins} leaves the image");
        }
        // RIP-relative operands point into the image; absolute ones into the control block.
        if (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory)
            && ins.code() != Code::Lea_r64_m
        {
            if ins.is_ip_rel_memory_operand() {
                let t = ins.ip_rel_memory_address();
                assert!((CODE_GPA..end).contains(&t), "{ins}");
            } else if ins.memory_base() == Register::None && ins.memory_index() == Register::None {
                let t = ins.memory_displacement64();
                assert!(
                    (CONTROL_GPA..CONTROL_GPA + PAGE_SIZE).contains(&t),
                    "{ins} at {:#x}",
                    ins.ip()
                );
            }
        }
    }
    out
}

fn image(w: &Workload) -> asm::Image {
    w.validate(&ENV).unwrap();
    let img = emit(w, &ENV).unwrap();
    let prog = build(w, &ENV).unwrap();
    assert_eq!(prog.code, img.bytes);
    assert_eq!(prog.entry, CODE_GPA);
    assert!(prog.code.len() <= CODE_MAX);
    img
}

fn writes_progress(ins: &[Instruction]) -> bool {
    ins.iter().any(|i| {
        i.op0_kind() == OpKind::Memory
            && i.memory_base() == Register::None
            && !i.is_ip_rel_memory_operand()
            && i.memory_displacement64() == PROGRESS_GPA
            && matches!(i.mnemonic(), Mnemonic::Inc | Mnemonic::Mov)
    })
}

#[test]
fn idle_assembles() {
    for spins in [1, 100, 10_000, 1_000_000_000] {
        let img = image(&Workload::Idle(IdleParams { spins }));
        let ins = decode(&img);
        assert!(writes_progress(&ins));
        assert!(ins.iter().any(|i| i.mnemonic() == Mnemonic::Pause));
    }
}

#[test]
fn dirty_assembles_for_many_parameters() {
    let patterns = [
        Pattern::Sequential,
        Pattern::Random,
        Pattern::HotCold {
            hot_set_pct: 10,
            hot_writes_pct: 90,
        },
        Pattern::HotCold {
            hot_set_pct: 100,
            hot_writes_pct: 50,
        },
        Pattern::HotCold {
            hot_set_pct: 1,
            hot_writes_pct: 0,
        },
    ];
    let mixes = [
        ContentMix::default(),
        ContentMix {
            zero: 100,
            dup: 0,
            text: 0,
            random: 0,
        },
        ContentMix {
            zero: 0,
            dup: 0,
            text: 0,
            random: 100,
        },
        ContentMix {
            zero: 0,
            dup: 50,
            text: 50,
            random: 0,
        },
    ];
    for rate in [0, 1, 2_000, 30_000, MAX_RATE] {
        for ws in [
            PAGE_SIZE,
            3 * PAGE_SIZE + 1,
            64 << 20,
            (256 << 20) - DATA_GPA,
        ] {
            for pattern in patterns {
                for mix in mixes {
                    let p = DirtyParams {
                        rate,
                        working_set_bytes: ws,
                        pattern,
                        mix,
                        seed: 42,
                    };
                    let ins = decode(&image(&Workload::Dirty(p)));
                    assert!(writes_progress(&ins));
                    assert_eq!(
                        ins.iter().any(|i| i.mnemonic() == Mnemonic::Rdtsc),
                        rate > 0,
                        "only paced guests read the TSC"
                    );
                }
            }
        }
    }
}

#[test]
fn ledger_assembles_for_many_parameters() {
    for pages in [1, 2, 2048, 65_280] {
        for verify_every in [1, 500, 1_000_000_000] {
            for rate in [0, 10_000, MAX_RATE] {
                for stop_after_ticks in [0, 1, 1_000] {
                    let p = LedgerParams {
                        pages,
                        verify_every,
                        rate,
                        stop_after_ticks,
                        seed: 9,
                    };
                    let img = image(&Workload::Ledger(p));
                    let ins = decode(&img);
                    assert!(writes_progress(&ins));
                    let data = &img.bytes[img.text_len..];
                    for s in [
                        "tick ",
                        " ok\n",
                        "CORRUPT page=",
                        "CORRUPT checksum",
                        "CORRUPT versions",
                    ] {
                        assert!(data.windows(s.len()).any(|w| w == s.as_bytes()), "{s}");
                    }
                }
            }
        }
    }
}

#[test]
fn defaults_build_for_256m() {
    for name in ["idle", "dirty", "ledger"] {
        let w = Workload::from_cli(name, &HashMap::new()).unwrap();
        assert_eq!(w.name(), name);
        let prog = build(&w, &ENV).unwrap();
        assert!(!prog.code.is_empty() && prog.code.len() <= CODE_MAX);
    }
}

#[test]
fn cli_parses_the_documented_example() {
    let w = Workload::from_cli(
        "dirty",
        &flags(&[
            ("--rate", "10000"),
            ("--working-set", "64M"),
            ("--pattern", "random"),
            ("--mix", "zero=40,dup=10,text=30,random=20"),
        ]),
    )
    .unwrap();
    assert_eq!(
        w,
        Workload::Dirty(DirtyParams {
            rate: 10_000,
            working_set_bytes: 64 << 20,
            pattern: Pattern::Random,
            mix: ContentMix {
                zero: 40,
                dup: 10,
                text: 30,
                random: 20
            },
            ..DirtyParams::default()
        })
    );
    let w = Workload::from_cli(
        "dirty",
        &flags(&[
            ("pattern", "hotcold"),
            ("hot-set", "20"),
            ("hot-writes", "80%"),
        ]),
    )
    .unwrap();
    let Workload::Dirty(p) = w else { panic!() };
    assert_eq!(
        p.pattern,
        Pattern::HotCold {
            hot_set_pct: 20,
            hot_writes_pct: 80
        }
    );
    let w = Workload::from_cli(
        "ledger",
        &flags(&[
            ("pages", "4096"),
            ("verify-every", "250"),
            ("rate", "0"),
            ("stop-after-ticks", "5"),
            ("seed", "0x1234"),
        ]),
    )
    .unwrap();
    assert_eq!(
        w,
        Workload::Ledger(LedgerParams {
            pages: 4096,
            verify_every: 250,
            rate: 0,
            stop_after_ticks: 5,
            seed: 0x1234
        })
    );
}

#[test]
fn sizes_parse() {
    let p = |v| parse_size_in("working-set", v, 1, u64::MAX);
    assert_eq!(p("4096"), Ok(4096));
    assert_eq!(p("64M"), Ok(64 << 20));
    assert_eq!(p("64MiB"), Ok(64 << 20));
    assert_eq!(p("512k"), Ok(512 << 10));
    assert_eq!(p("1G"), Ok(1 << 30));
    assert!(p("64X").is_err());
    assert!(p("M").is_err());
    assert!(p("-1").is_err());
    assert_eq!(fmt_size(64 << 20), "64M");
    assert_eq!(fmt_size(4097), "4097");
}

/// Asserts that `from_cli` fails and the message contains all of `needles`.
fn rejects(name: &str, pairs: &[(&str, &str)], needles: &[&str]) {
    let err = Workload::from_cli(name, &flags(pairs))
        .unwrap_err()
        .to_string();
    for n in needles {
        assert!(err.contains(n), "{err:?} does not mention {n:?}");
    }
}

#[test]
fn bad_cli_values_are_rejected_clearly() {
    rejects("busy", &[], &["unknown workload", "idle, dirty, ledger"]);
    rejects("dirty", &[("rate", "2000000")], &["--rate", "0..=1000000"]);
    rejects("dirty", &[("rate", "fast")], &["--rate", "0..=1000000"]);
    rejects(
        "dirty",
        &[("working-set", "0")],
        &["--working-set", "4K..=4G"],
    );
    rejects("dirty", &[("working-set", "8T")], &["--working-set"]);
    rejects(
        "dirty",
        &[("pattern", "zigzag")],
        &["--pattern", "sequential, random, hotcold"],
    );
    rejects(
        "dirty",
        &[("mix", "zero=50,text=40")],
        &["--mix", "add up to 100, got 90"],
    );
    rejects(
        "dirty",
        &[("mix", "zero=50,bits=50")],
        &["--mix", "unknown kind \"bits\""],
    );
    rejects("dirty", &[("mix", "zero=50,zero=50")], &["--mix", "twice"]);
    rejects("dirty", &[("mix", "zero")], &["--mix"]);
    rejects(
        "dirty",
        &[("hot-set", "10")],
        &["--hot-set", "only with --pattern hotcold"],
    );
    rejects(
        "dirty",
        &[("pattern", "hotcold"), ("hot-set", "0")],
        &["--hot-set", "1..=100"],
    );
    rejects(
        "dirty",
        &[("pattern", "hotcold"), ("hot-writes", "101")],
        &["--hot-writes", "0..=100"],
    );
    rejects(
        "dirty",
        &[("pages", "10")],
        &["--pages", "not a flag of the dirty workload", "working-set"],
    );
    rejects("ledger", &[("pages", "0")], &["--pages", "1..=1048576"]);
    rejects(
        "ledger",
        &[("verify-every", "0")],
        &["--verify-every", "1..=1000000000"],
    );
    rejects("ledger", &[("rate", "-5")], &["--rate", "0..=1000000"]);
    rejects(
        "ledger",
        &[("working-set", "1M")],
        &["--working-set", "ledger", "pages"],
    );
    rejects("idle", &[("spins", "0")], &["--spins", "1..=1000000000"]);
}

#[test]
fn workloads_must_fit_in_guest_memory() {
    let small = GuestEnv {
        memory_bytes: 32 << 20,
        tsc_khz: 2_000_000,
    };
    // The default dirty working set (64 MiB) does not fit in 32 MiB.
    let w = Workload::from_cli("dirty", &HashMap::new()).unwrap();
    let err = build(&w, &small).unwrap_err().to_string();
    assert!(
        err.contains("--working-set") && err.contains("at most 31M (32505856 bytes)"),
        "{err}"
    );
    // Exactly the data area fits; one more page does not.
    let fit = (32 << 20) - DATA_GPA;
    let w = Workload::from_cli("dirty", &flags(&[("working-set", &fit.to_string())])).unwrap();
    build(&w, &small).unwrap();
    let over = (fit + PAGE_SIZE).to_string();
    let w = Workload::from_cli("dirty", &flags(&[("working-set", &over)])).unwrap();
    assert!(build(&w, &small).is_err());
    // Ledger pages likewise.
    let w = Workload::from_cli("ledger", &flags(&[("pages", "7936")])).unwrap();
    build(&w, &small).unwrap();
    let w = Workload::from_cli("ledger", &flags(&[("pages", "7937")])).unwrap();
    let err = build(&w, &small).unwrap_err().to_string();
    assert!(err.contains("--pages"), "{err}");
    // The default ledger works with 256 MiB guests.
    let w = Workload::from_cli("ledger", &HashMap::new()).unwrap();
    build(&w, &ENV).unwrap();
}

#[test]
fn paced_workloads_need_the_tsc_frequency() {
    let no_tsc = GuestEnv {
        memory_bytes: 256 << 20,
        tsc_khz: 0,
    };
    let w = Workload::from_cli("dirty", &HashMap::new()).unwrap();
    let err = build(&w, &no_tsc).unwrap_err().to_string();
    assert!(err.contains("tsc_khz"), "{err}");
    // Unpaced ones do not.
    let w = Workload::from_cli("dirty", &flags(&[("rate", "0")])).unwrap();
    build(&w, &no_tsc).unwrap();
    build(&Workload::Idle(IdleParams::default()), &no_tsc).unwrap();
}

#[test]
fn guest_constants_match_the_model() {
    // The generator bakes the model's constants into the code: find them as immediates.
    let img = image(&Workload::Ledger(LedgerParams::default()));
    let ins = decode(&img);
    let imms: Vec<u64> = ins
        .iter()
        .filter(|i| i.op1_kind() == OpKind::Immediate64)
        .map(|i| i.immediate64())
        .collect();
    for c in [
        model::GOLDEN,
        model::LEDGER_IDX_MUL,
        model::LEDGER_SALT,
        model::LEDGER_WORD_STEP,
        0xbf58_476d_1ce4_e5b9,
        0x94d0_49bb_1331_11eb,
        WORKLOAD_ID_LEDGER,
        LedgerParams::default().seed,
    ] {
        assert!(imms.contains(&c), "{c:#x} not in the ledger code");
    }
}
