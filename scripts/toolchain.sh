#!/usr/bin/env bash
# Makes the Rust toolchain that rust-toolchain.toml names usable, without a download when it can.
# Run it (or source it) before any cargo command; scripts/setup.sh, test.sh, demo.sh, bench.sh,
# faults.sh and fuzz.sh do. No root needed: it works on the calling user's rustup.
#
# Why: rust-toolchain.toml pins the toolchain that builds and lints vmrepl (channel "1.95.0", so
# that every machine runs the same clippy). rustup does not download a missing pinned toolchain by
# itself ("toolchain '1.95.0-...' is not installed"), and a machine without the network cannot
# download it at all, while its `stable` often IS that version. So, in order:
#   1. the pinned toolchain is installed and reports its version: nothing to do;
#   2. an installed toolchain (stable first) reports exactly the pinned version: it is linked under
#      the pinned name (a symlink in RUSTUP_HOME/toolchains: `rustup toolchain link` refuses names
#      of official releases). A link that reports another version (its target was updated since)
#      is removed first, so the pinned name never runs another version;
#   3. `rustup toolchain install` (needs the network);
#   4. otherwise the newest installed toolchain that is at least the workspace's rust-version, with
#      a warning: when this file is sourced it exports RUSTUP_TOOLCHAIN (which wins over
#      rust-toolchain.toml) for the script's later cargo commands; run directly, it prints the
#      `export` to use. Lints may then differ from the pinned clippy's.
# Without rustup (a distribution's cargo), rust-toolchain.toml does not apply: the version is
# only checked against rust-version.
#
# Env: VMREPL_TOOLCHAIN_NO_INSTALL=1 skips step 3 (no download attempt).

vmrepl_tc_log() { echo "toolchain: $*" >&2; }

# "1.95.0" -> 1095000, for comparisons (a missing part counts as 0)
vmrepl_tc_num() {
    local IFS=.
    # shellcheck disable=SC2206
    local p=($1)
    echo $(((${p[0]:-0} * 1000 + ${p[1]:-0}) * 1000 + ${p[2]:-0}))
}

# the version an installed toolchain's rustc reports ("1.95.0"; "" when it does not run, and a
# pre-release such as "1.96.0-nightly" as it is)
vmrepl_tc_version_of() {
    { "$1/bin/rustc" --version 2>/dev/null || true; } | awk '{print $2}'
}

vmrepl_toolchain() {
    local repo channel want_min home host dir ver best best_ver t
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$repo/rust-toolchain.toml" | head -n1)
    want_min=$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
    [ -n "$channel" ] || { vmrepl_tc_log "no channel in $repo/rust-toolchain.toml"; return 1; }

    if [ -n "${RUSTUP_TOOLCHAIN:-}" ]; then # the caller's choice wins over rust-toolchain.toml
        vmrepl_tc_log "RUSTUP_TOOLCHAIN=$RUSTUP_TOOLCHAIN is set: using it instead of $channel"
        return 0
    fi
    if ! command -v rustup >/dev/null 2>&1; then
        if ! command -v rustc >/dev/null 2>&1; then
            vmrepl_tc_log "no Rust toolchain found: install rustup (https://rustup.rs) and run this script again"
            return 1
        fi
        ver=$(rustc --version | awk '{print $2}')
        if [ "$(vmrepl_tc_num "${ver%%-*}")" -lt "$(vmrepl_tc_num "$want_min")" ]; then
            vmrepl_tc_log "rustc $ver is older than vmrepl's rust-version $want_min: install a newer Rust (rustup)"
            return 1
        fi
        vmrepl_tc_log "rustc $ver without rustup: rust-toolchain.toml ($channel) does not apply; lints may differ"
        return 0
    fi

    home=$(rustup show home 2>/dev/null || echo "${RUSTUP_HOME:-$HOME/.rustup}")
    # (`rustup show` fails while the pinned toolchain is missing, after printing the host)
    host=$(rustup show 2>/dev/null | sed -n 's/^Default host: //p' || true)
    [ -n "$host" ] || host=$(uname -m)-unknown-linux-gnu
    local pinned="$home/toolchains/$channel-$host"

    # 1. installed (a directory or a link) and really that version
    if [ -e "$pinned" ]; then
        ver=$(vmrepl_tc_version_of "$pinned")
        if [ "$ver" = "$channel" ]; then
            return 0
        fi
        if [ -L "$pinned" ]; then
            vmrepl_tc_log "$channel-$host links to $(readlink "$pinned"), which is now rustc ${ver:-?}: link removed"
            rm -f "$pinned"
        else
            vmrepl_tc_log "$pinned reports rustc ${ver:-?}, not $channel: repair it with 'rustup toolchain install $channel --force'"
            return 1
        fi
    fi

    # 2. an installed toolchain of exactly that version, stable first
    for dir in "$home/toolchains/stable-$host" "$home"/toolchains/*; do
        [ -d "$dir" ] || continue
        [ "$dir" != "$pinned" ] || continue
        if [ "$(vmrepl_tc_version_of "$dir")" = "$channel" ]; then
            ln -s "$(basename "$dir")" "$pinned"
            vmrepl_tc_log "linked $(basename "$dir") (rustc $channel) as $channel-$host"
            return 0
        fi
    done

    # 3. download it
    if [ "${VMREPL_TOOLCHAIN_NO_INSTALL:-0}" != 1 ]; then
        vmrepl_tc_log "installing Rust $channel (rustup toolchain install)"
        if timeout 600 rustup toolchain install "$channel" --profile minimal -c rustfmt -c clippy >&2; then
            return 0
        fi
        vmrepl_tc_log "could not install Rust $channel (no network?)"
    fi

    # 4. the newest installed toolchain that is recent enough, named explicitly
    best=""
    best_ver=0
    for dir in "$home"/toolchains/*; do
        [ -d "$dir" ] || continue
        ver=$(vmrepl_tc_version_of "$dir")
        [ -n "$ver" ] || continue
        case "$ver" in *-*) continue ;; esac # pre-releases (nightly, beta) are no substitute
        t=$(vmrepl_tc_num "$ver")
        if [ "$t" -ge "$(vmrepl_tc_num "$want_min")" ] && [ "$t" -gt "$best_ver" ]; then
            best=$(basename "$dir")
            best_ver=$t
        fi
    done
    if [ -z "$best" ]; then
        vmrepl_tc_log "no installed toolchain is Rust $want_min or newer, and $channel cannot be installed: run 'rustup toolchain install $channel' where the network is reachable"
        return 1
    fi
    vmrepl_tc_log "warning: Rust $channel is not installed; using $best ($(vmrepl_tc_version_of "$home/toolchains/$best")) instead, whose lints may differ"
    if [ "${BASH_SOURCE[0]}" != "$0" ]; then
        export RUSTUP_TOOLCHAIN="$best"
    else
        vmrepl_tc_log "to build with it: export RUSTUP_TOOLCHAIN=$best"
    fi
    return 0
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    vmrepl_toolchain
else
    vmrepl_toolchain || return 1
fi
