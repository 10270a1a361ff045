#!/usr/bin/env bash
# Runs the coverage-guided fuzz targets (cargo-fuzz, libFuzzer; needs the nightly toolchain)
# one after another, each for SECONDS (default 600), and prints a table of what each run did.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      targets: log_reader peer_frame qmp_reply nbd_reply
#
# Each target starts from its committed seeds (fuzz/corpus/TARGET) and keeps what it finds in
# fuzz/corpus-run/TARGET (not committed). Crashing inputs land in fuzz/artifacts/TARGET; copy
# them to fuzz/regressions/TARGET so that `cargo test` replays them (docs/fuzzing.md).
# Exits nonzero when any target crashed. Logs: fuzz/logs/TARGET.log.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
# cargo-fuzz itself is installed and run by the pinned toolchain (rust-toolchain.toml applies
# here too), the targets by nightly.
. ../scripts/toolchain.sh

SECONDS_EACH="${1:-600}"
shift || true
TARGETS=("$@")
if [ "${#TARGETS[@]}" -eq 0 ]; then
    TARGETS=(log_reader peer_frame qmp_reply nbd_reply)
fi

# Largest input per target: logs need room for a few records; the others are small messages.
max_len() {
    case "$1" in
        log_reader) echo 1048576 ;;
        peer_frame | nbd_reply) echo 65536 ;;
        *) echo 16384 ;;
    esac
}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
echo "== building the fuzz targets (nightly, address sanitizer, debug assertions)"
cargo +nightly fuzz build

mkdir -p logs
rows=()
failed=0
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus-run/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | wc -l)
    echo "== fuzzing $t for $SECONDS_EACH s (log: fuzz/logs/$t.log)"
    start=$(date +%s)
    set +e
    cargo +nightly fuzz run "$t" "corpus-run/$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -max_len="$(max_len "$t")" \
        -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=20 \
        -print_final_stats=1 >"logs/$t.log" 2>&1
    rc=$?
    set -e
    took=$(($(date +%s) - start))
    crashes=$(($(find "artifacts/$t" -type f | wc -l) - before))
    if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes="?"  # failed without leaving an artifact (build error, …): see the log
    fi
    if [ "$rc" -ne 0 ]; then
        failed=1
    fi
    execs=$(awk '/^stat::number_of_executed_units:/ { print $2 }' "logs/$t.log" | tail -1)
    rate=$(awk '/^stat::average_exec_per_sec:/ { print $2 }' "logs/$t.log" | tail -1)
    last=$(grep -E '(DONE|pulse|NEW|REDUCE) +cov:' "logs/$t.log" | tail -1 || true)
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
    corp=$(sed -nE 's/.* corp: ([0-9]+\/[0-9]+[a-zA-Z]+).*/\1/p' <<<"$last")
    rows+=("$(printf '%-11s %8s %12s %8s %6s %7s %12s %7s' "$t" "$took" "${execs:--}" \
        "${rate:--}" "${cov:--}" "${ft:--}" "${corp:--}" "$crashes")")
done

echo
printf '%-11s %8s %12s %8s %6s %7s %12s %7s\n' target seconds executions exec/s cov ft corpus crashes
for r in "${rows[@]}"; do
    echo "$r"
done
if [ "$failed" -ne 0 ]; then
    echo "some target crashed or failed: see fuzz/logs/ and fuzz/artifacts/" >&2
    exit 1
fi
