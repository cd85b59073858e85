#!/usr/bin/env bash
# Fuzz smoke test for CI: replays every target's seed corpus, then fuzzes each target for
# FUZZ_SECONDS (default 30) seconds. Fails on any crash, leak or timeout.
#
# Our toolchain is stable, so targets run without a sanitizer (`-s none`); set
# FUZZ_SANITIZER=address to build with AddressSanitizer through RUSTC_BOOTSTRAP=1.
# New inputs go to a scratch corpus (fuzz/corpus-work, ignored by git); fuzz/corpus holds
# the committed seeds only.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
seconds="${FUZZ_SECONDS:-30}"
sanitizer="${FUZZ_SANITIZER:-none}"
targets=(frame_decoder frame_payload chunk_decoder epoch_commit state_blob)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/ci.sh: installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

if [[ "$sanitizer" != none ]]; then
    export RUSTC_BOOTSTRAP=1
fi

cd "$root"
cargo fuzz build -s "$sanitizer" --fuzz-dir fuzz

for t in "${targets[@]}"; do
    work="$here/corpus-work/$t"
    mkdir -p "$work"
    echo "== $t: replaying fuzz/corpus/$t"
    cargo fuzz run -s "$sanitizer" --fuzz-dir fuzz "$t" "$here/corpus/$t" -- -runs=0
    echo "== $t: fuzzing for ${seconds}s"
    cargo fuzz run -s "$sanitizer" --fuzz-dir fuzz "$t" "$work" "$here/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
echo "fuzz: ${#targets[@]} passed, 0 failed"
