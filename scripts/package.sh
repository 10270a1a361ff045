#!/usr/bin/env bash
# Builds the vmrepl .deb (docs/install.md): the release binary, its manual pages and shell
# completions generated from the CLI itself, then `cargo deb --no-build`, which strips the
# binary and splits its debug info off into vmrepl-dbgsym (a .ddeb beside the .deb, files in
# /usr/lib/debug/.build-id/). The release profile builds with debug info; the packaging
# settings are [package.metadata.deb] in crates/vmrepl/Cargo.toml.
#
# Prints the .deb's path on the last line of stdout (everything else goes to stderr).
# Installs cargo-deb from crates.io (`cargo install cargo-deb --locked`) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "package: $*" >&2; }

CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version >/dev/null 2>&1; then
    log "installing cargo-deb $CARGO_DEB_VERSION (cargo install --locked)"
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" >&2
fi

# The target folder cargo really uses (CARGO_TARGET_DIR, a config, or ./target).
TARGET=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$TARGET" ] || { echo "package: cannot tell cargo's target folder" >&2; exit 1; }

log "cargo build --release -p vmrepl"
cargo build --release --locked -p vmrepl >&2
BIN="$TARGET/release/vmrepl"

# Manual pages and completions from the binary just built; cargo-deb finds them through its
# target/release/ prefix (crates/vmrepl/Cargo.toml's assets).
ASSETS="$TARGET/release/package-assets"
rm -rf "$ASSETS"
mkdir -p "$ASSETS/man" "$ASSETS/completions"
"$BIN" man "$ASSETS/man" >/dev/null
gzip -9n "$ASSETS"/man/*.1
"$BIN" completions bash >"$ASSETS/completions/vmrepl.bash"
"$BIN" completions zsh >"$ASSETS/completions/_vmrepl"
"$BIN" completions fish >"$ASSETS/completions/vmrepl.fish"
log "$(find "$ASSETS/man" -name '*.1.gz' | wc -l) manual pages, completions for bash, zsh and fish"

log "cargo deb --no-build"
rm -f "$TARGET"/debian/vmrepl_*.deb "$TARGET"/debian/vmrepl-dbgsym_*.ddeb
cargo deb -p vmrepl --no-build --locked >&2
DEB=$(ls -t "$TARGET"/debian/vmrepl_*.deb | head -n1)
DBGSYM=$(ls -t "$TARGET"/debian/vmrepl-dbgsym_*.ddeb | head -n1)

size() { numfmt --to=iec-i --suffix=B "$1"; }
installed_bin=$(dpkg-deb --contents "$DEB" | awk '$6 == "./usr/bin/vmrepl" { print $3 }')
debug=$(dpkg-deb --contents "$DBGSYM" | awk '$6 ~ /\.debug$/ { s += $3 } END { print s + 0 }')
log "package:          $DEB ($(size "$(stat -c %s "$DEB")"))"
log "installed binary: $(size "$installed_bin") (stripped; as built: $(size "$(stat -c %s "$BIN")"))"
log "debug info:       $DBGSYM ($(size "$(stat -c %s "$DBGSYM")"), $(size "$debug") in /usr/lib/debug/.build-id/)"
echo "$DEB"
