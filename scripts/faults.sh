#!/usr/bin/env bash
# The fault matrix of issue 13, on its own: every fault case end to end (real QEMU guests
# writing ordered blocks, two hosts, real TLS), the slow ones included, one case at a time,
# then a table of case, result and seconds.
#
#   crates/vmrepl/tests/faults.rs         kills of either daemon at each moment of a cycle,
#                                          both at once, a flipped byte, a link cut in a
#                                          network namespace, a clock jump (libfaketime)
#   crates/vmrepl/tests/replication.rs    QEMU killed (manual and automatic resync), a delta
#                                          cut mid-transfer, the replica's storage full
#   crates/vmrepl/tests/offline_edit.rs   offline disk edits (raw, restore, convert, while the
#                                          daemon was down, under a running VM, before reverse)
#   crates/vmrepl/tests/resync.rs         a resynchronization cut by a lost link, and by a kill of
#                                          the primary's daemon, continues where it stopped
#
# The quick cases of faults.rs also run in `scripts/test.sh` (plain tests); the slow ones are
# `#[ignore]`d there and run here with `--include-ignored`. Needs root (namespaces, tmpfs).
#
# `scripts/faults.sh [FILTER]` runs only the cases whose name contains FILTER.
set -uo pipefail
cd "$(dirname "$0")/.."
# The pinned Rust toolchain (rust-toolchain.toml) before any cargo command: scripts/toolchain.sh.
. scripts/toolchain.sh || exit 1
./scripts/setup.sh || exit 1
mkdir -p .cache
export VMREPL_CACHE="${VMREPL_CACHE:-$PWD/.cache/guest}"
filter="${1:-}"

# Each entry: test-file case-name.
cases=()
add_file() { # every test of a file, slow ones included
    local file=$1
    [ -f "crates/vmrepl/tests/$file.rs" ] || return 0
    while read -r name; do
        cases+=("$file $name")
    done < <(cargo test -q -p vmrepl --test "$file" -- --list --include-ignored 2>/dev/null |
        sed -n 's/^\(.*\): test$/\1/p')
}
add_file faults
for name in \
    after_qemu_is_killed_replication_requires_a_resync_and_resynchronizing_makes_the_replica_equal_again \
    after_qemu_is_killed_the_default_policy_resynchronizes_by_itself_and_the_replica_is_equal_again \
    a_delta_cut_mid_transfer_is_resumed_by_the_next_cycle_and_nothing_is_lost \
    a_full_replica_disk_refuses_the_delta_and_replication_recovers_by_itself_once_there_is_room; do
    cases+=("replication $name")
done
add_file offline_edit
add_file resync

echo "== building the tests"
cargo test -q -p vmrepl --no-run --test faults --test replication || exit 1
cargo test -q -p vmrepl --no-run --test offline_edit --test resync || exit 1

results=()
failed=0
for c in "${cases[@]}"; do
    file=${c%% *}
    name=${c#* }
    [ -n "$filter" ] && [[ "$name" != *"$filter"* ]] && continue
    echo "== $file: $name"
    start=$(date +%s)
    if cargo test -q -p vmrepl --test "$file" -- --exact "$name" --include-ignored --nocapture; then
        result=pass
    else
        result=FAIL
        failed=$((failed + 1))
    fi
    results+=("$result|$(($(date +%s) - start))|$file: $name")
done

echo
echo "== fault matrix"
printf '%-6s %8s  %s\n' result seconds case
passed=0
for r in "${results[@]}"; do
    IFS='|' read -r result secs name <<<"$r"
    printf '%-6s %8s  %s\n' "$result" "$secs" "$name"
    [ "$result" = pass ] && passed=$((passed + 1))
done
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
