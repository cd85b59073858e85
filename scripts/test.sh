#!/usr/bin/env bash
# The project's test command (README, second command; `.ci/run` runs exactly this).
# Installs what it needs, then runs every test of the workspace against real KVM and replays
# the fuzz targets. Needs /dev/kvm: tests that cannot use it fail and say so.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-deps.sh
ensure_deps

echo "== cargo test (workspace, real KVM and QUIC)"
cargo test --workspace --all-targets --locked --no-fail-fast -- --test-threads=2

echo "== fuzz targets: corpus replay + ${FUZZ_SECONDS:-30}s each"
bash fuzz/ci.sh
