#!/usr/bin/env bash
# Sets up everything the tests need (apt packages, the test guest) and runs the whole suite:
# formatting, lints, unit, component (real qemu-img / qemu-storage-daemon) and end-to-end
# tests (real QEMU guests under TCG, real TLS on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
mkdir -p .cache
export VMREPL_CACHE="${VMREPL_CACHE:-$PWD/.cache/guest}"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --workspace --no-fail-fast 2>&1 | tee .cache/test.log
echo "== summary"
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' .cache/test.log
