#!/usr/bin/env bash
# Sets up everything the tests need (apt packages, the test guest) and runs the whole suite:
# formatting, lints, unit, component (real qemu-img / qemu-storage-daemon) and end-to-end
# tests (real QEMU guests under TCG, real TLS on loopback), then the package test
# (scripts/test-package.sh: the .deb built, installed with dpkg, run and purged).
#
# `--quick`: formatting, lints and the unit tests of every crate (`cargo test --workspace
# --lib`: the engine's decisions against fakes, the state machines, the database on a temporary
# SQLite). It needs neither root, nor QEMU, nor the test guest, and runs in seconds once built.
set -euo pipefail
cd "$(dirname "$0")/.."
# The pinned Rust toolchain (rust-toolchain.toml) before any cargo command: scripts/toolchain.sh.
. scripts/toolchain.sh
if [ "${1:-}" = "--quick" ]; then
    echo "== cargo fmt --check"
    cargo fmt --all -- --check
    echo "== cargo clippy"
    cargo clippy --workspace --all-targets --quiet -- -D warnings
    echo "== cargo test --lib (quick tier)"
    cargo test --workspace --lib --quiet 2>&1 | tee /dev/stderr |
        awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f; exit f > 0 }'
    exit
fi
./scripts/setup.sh
mkdir -p .cache
export VMREPL_CACHE="${VMREPL_CACHE:-$PWD/.cache/guest}"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --workspace --no-fail-fast 2>&1 | tee .cache/test.log
# The .deb: built, installed with dpkg, run from /usr/bin, purged (docs/install.md). One test
# in the summary; its failure fails the run.
echo "== package (scripts/test-package.sh)"
package=0
./scripts/test-package.sh 2>&1 | tee .cache/test-package.log || package=1
echo "== summary"
awk -v package=$package '/^test result:/ { p += $4; f += $6 }
    END { if (package) f++; else p++; printf "%d passed, %d failed\n", p, f }' .cache/test.log
if [ $package != 0 ]; then
    echo "the package test failed: .cache/test-package.log"
    exit 1
fi
echo "package test: passed"
