//! The VM state blob decoder (`VmState::decode`, vmm/src/state/) on arbitrary bytes: it must
//! refuse what it cannot read with an error and never panic, and a state it accepts must
//! encode to a blob that decodes to the same state.
//!
//! The first input byte says how the rest is used. Odd: as the whole blob. Even: as the
//! payload (the sections) of a blob whose header the harness writes, with the right length and
//! CRC-32 and the newest format version this build reads (bit 1 clear) or the oldest (bit 1
//! set), so that the fuzzer gets past the checksum to the section parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_vmm::state::{DEFAULT_STATE_LIMIT, STATE_VERSION, STATE_VERSION_MIN};
use understudy_vmm::VmState;

/// A blob header (see the layout in vmm/src/state/mod.rs) in front of `payload`.
fn blob(version: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(24 + payload.len());
    b.extend_from_slice(b"USVMSTAT");
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let wrapped;
    let input = if mode & 1 == 1 {
        rest
    } else {
        let version = if mode & 2 == 0 {
            STATE_VERSION
        } else {
            STATE_VERSION_MIN
        };
        wrapped = blob(version, rest);
        &wrapped
    };
    let Ok(state) = VmState::decode(input, DEFAULT_STATE_LIMIT) else {
        return;
    };
    // No limit on the second decode: a version 2 blob re-encodes as version 3, 9 bytes longer.
    let again = VmState::decode(&state.encode(), usize::MAX)
        .unwrap_or_else(|e| panic!("an accepted state re-encodes to a blob it refuses: {e}"));
    assert!(
        again == state,
        "the state changed in an encode/decode round trip"
    );
});
