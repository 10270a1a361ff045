#!/bin/bash
# Build the vmrepl test guest (kernel + initramfs + blockio + qemu-ga) into $VMREPL_CACHE
# (default <repo>/.cache/guest). Cached: does nothing when the outputs exist and the
# hash of the inputs (this script, guest/init, guest/blockio.c, guest/fsfreeze-hook) matches
# the stamp.
# Set VMREPL_GUEST_REBUILD=1 to force a rebuild. See docs/test-guest.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${VMREPL_CACHE:-$REPO/.cache/guest}
KPKG_META=${VMREPL_KERNEL_META:-linux-image-cloud-amd64}
# The guest agent: /usr/sbin/qemu-ga of this package, run with the host's shared libraries
# (the runtime packages it depends on are installed by scripts/setup.sh).
QGA_PKG=qemu-guest-agent

# Modules wanted in the guest (dependencies are added automatically, in load order).
# Missing ones are skipped with a note (e.g. if a future kernel builds them in).
WANT_MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
button evdev virtio_console virtio_net vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport"

log() { echo "guest: $*"; }
# apt-get download PKG into dl/ (as root apt warns that it cannot sandbox; that is expected).
download() {
    (cd "$CACHE/dl" && apt-get download -q "$1" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
}

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

HASH=$(cat "$HERE/build.sh" "$HERE/init" "$HERE/blockio.c" "$HERE/fsfreeze-hook" | sha256sum | cut -d' ' -f1)
OUTPUTS="vmlinuz initrd.img blockio"
if [ "${VMREPL_GUEST_REBUILD:-0}" != 1 ] && [ -f "$CACHE/stamp" ] && [ "$(cat "$CACHE/stamp")" = "$HASH" ]; then
    ok=1
    for f in $OUTPUTS; do [ -s "$CACHE/$f" ] || ok=0; done
    if [ $ok = 1 ]; then
        log "up to date in $CACHE (kernel $(cat "$CACHE/kernel-version" 2>/dev/null || echo '?'))"
        exit 0
    fi
fi

for tool in apt-get apt-cache dpkg dpkg-deb ldd readelf gcc cpio gzip; do
    command -v "$tool" >/dev/null || { echo "guest: missing $tool (run scripts/setup.sh)" >&2; exit 1; }
done
BUSYBOX=/bin/busybox # from busybox-static: must be a static binary
if [ ! -x "$BUSYBOX" ] || ldd "$BUSYBOX" >/dev/null 2>&1; then
    echo "guest: $BUSYBOX missing or not static: install busybox-static (scripts/setup.sh)" >&2
    exit 1
fi

WORK=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- kernel: resolve the metapackage to the real image package and download it ---
KPKG=$(apt-cache depends "$KPKG_META" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}' || true)
mkdir -p "$CACHE/dl"
DEB=""
if [ -n "$KPKG" ]; then
    DEB=$(ls "$CACHE/dl/${KPKG}"_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$DEB" ]; then
        log "downloading $KPKG"
        rm -f "$CACHE"/dl/linux-image-*.deb "$CACHE"/dl/linux-modules-*.deb
        download "$KPKG"
        DEB=$(ls "$CACHE/dl/${KPKG}"_*.deb 2>/dev/null | head -n1 || true)
    fi
fi
if [ -z "$DEB" ]; then
    # offline: fall back to whatever kernel package was downloaded before
    DEB=$(ls "$CACHE"/dl/linux-image-*.deb 2>/dev/null | head -n1 || true)
    [ -n "$DEB" ] || { echo "guest: cannot resolve/download $KPKG_META (apt-get update?)" >&2; exit 1; }
    log "using cached $(basename "$DEB")"
fi
dpkg -x "$DEB" "$WORK/kpkg"
VMLINUZ=$(ls "$WORK"/kpkg/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
[ -n "$VMLINUZ" ] || { echo "guest: no vmlinuz in $DEB" >&2; exit 1; }
KVER=${VMLINUZ##*/vmlinuz-}
# The modules and the config: in the image package under lib/modules (Debian 12) or
# usr/lib/modules (Debian 13, after the move to /usr); Ubuntu's image package holds only the
# kernel, its modules and config are in linux-modules-KVER (downloaded beside it).
moddir() { for d in "$WORK/kpkg/lib/modules/$KVER" "$WORK/kpkg/usr/lib/modules/$KVER"; do [ -d "$d" ] && echo "$d" && return; done; }
if [ -z "$(moddir)" ]; then
    MPKG="linux-modules-$KVER"
    MDEB=$(ls "$CACHE/dl/${MPKG}"_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$MDEB" ]; then
        log "downloading $MPKG"
        download "$MPKG"
        MDEB=$(ls "$CACHE/dl/${MPKG}"_*.deb 2>/dev/null | head -n1 || true)
    fi
    [ -n "$MDEB" ] || { echo "guest: $DEB has no modules and $MPKG cannot be downloaded" >&2; exit 1; }
    dpkg -x "$MDEB" "$WORK/kpkg"
fi
MODDIR=$(moddir)
[ -n "$MODDIR" ] || { echo "guest: no modules folder for $KVER in the kernel packages" >&2; exit 1; }
KCONFIG="$WORK/kpkg/boot/config-$KVER"
log "kernel $KVER"

# --- guest agent: qemu-ga from its .deb (downloaded once into dl/), libraries from the host ---
QGA_DEB=$(ls "$CACHE/dl/${QGA_PKG}"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$QGA_DEB" ]; then
    log "downloading $QGA_PKG"
    download "$QGA_PKG"
    QGA_DEB=$(ls "$CACHE/dl/${QGA_PKG}"_*.deb 2>/dev/null | head -n1 || true)
    [ -n "$QGA_DEB" ] || {
        echo "guest: cannot download $QGA_PKG (no network or stale apt lists? run scripts/setup.sh)" >&2
        exit 1
    }
fi
QGA_VER=$(dpkg-deb -f "$QGA_DEB" Version 2>/dev/null) && dpkg -x "$QGA_DEB" "$WORK/qga" || {
    rm -f "$QGA_DEB"
    echo "guest: $(basename "$QGA_DEB") is damaged (removed; rerun to download it again)" >&2
    exit 1
}
QGA_BIN="$WORK/qga/usr/sbin/qemu-ga"
[ -x "$QGA_BIN" ] || { echo "guest: no usr/sbin/qemu-ga in $(basename "$QGA_DEB")" >&2; exit 1; }
# ldd resolves against this host's libraries: "=> /path (addr)" lines, plus the loader
QGA_LDD=$(ldd "$QGA_BIN" 2>&1) || { echo "guest: ldd qemu-ga failed: $QGA_LDD" >&2; exit 1; }
if echo "$QGA_LDD" | grep -q 'not found'; then
    echo "guest: qemu-ga needs libraries this host lacks:" >&2
    echo "$QGA_LDD" | grep 'not found' >&2
    echo "guest: $QGA_PKG depends on: $(dpkg-deb -f "$QGA_DEB" Depends)" >&2
    echo "guest: install them (scripts/setup.sh does)" >&2
    exit 1
fi
QGA_LIBS=$(echo "$QGA_LDD" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
QGA_LOADER=$(readelf -l "$QGA_BIN" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
[ -n "$QGA_LOADER" ] || QGA_LOADER=/lib64/ld-linux-x86-64.so.2
for f in $QGA_LIBS "$QGA_LOADER"; do
    [ -f "$f" ] || { echo "guest: qemu-ga library $f missing on this host" >&2; exit 1; }
done
log "qemu-ga $QGA_VER with $(echo $QGA_LIBS | wc -w) libraries from the host"

# --- blockio: the same program for the guest and the host ---
log "compiling blockio"
gcc -static -O2 -Wall -o "$WORK/blockio" "$HERE/blockio.c"

# --- initramfs tree ---
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,etc/vmrepl,lib/modules/"$KVER"}
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list-full); do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$ROOT/$(dirname "$applet")"
    ln -sf /bin/busybox "$ROOT/$applet"
done
install -m 0755 "$HERE/init" "$ROOT/init"
install -m 0755 "$WORK/blockio" "$ROOT/bin/blockio"
install -m 0755 "$HERE/fsfreeze-hook" "$ROOT/bin/vmrepl-fsfreeze-hook"
# qemu-ga and its libraries: the libraries go into the directory of libc (a default search
# directory of the loader, which has no ld.so.cache in the guest), the loader to its own path
install -m 0755 "$QGA_BIN" "$ROOT/usr/sbin/qemu-ga"
LIBDIR=$(dirname "$(echo "$QGA_LIBS" | grep '/libc\.so\.' | head -n1)")
[ "$LIBDIR" != . ] || { echo "guest: ldd qemu-ga shows no libc" >&2; exit 1; }
mkdir -p "$ROOT$LIBDIR" "$ROOT$(dirname "$QGA_LOADER")" "$ROOT/var"
for f in $QGA_LIBS; do
    [ "$f" = "$QGA_LOADER" ] || cp -L "$f" "$ROOT$LIBDIR/$(basename "$f")"
done
cp -L "$QGA_LOADER" "$ROOT$QGA_LOADER"
ln -s ../run "$ROOT/var/run"
echo "$QGA_VER" >"$ROOT/etc/vmrepl/qga-version"
if [ "$(id -u)" = 0 ]; then
    # prove it runs with only what is in the initramfs (no ld.so.cache, no host paths)
    out=$(chroot "$ROOT" /usr/sbin/qemu-ga --version 2>&1) || {
        echo "guest: qemu-ga does not run inside the initramfs tree:" >&2
        echo "$out" >&2
        exit 1
    }
else
    log "not root: skipping the qemu-ga run check"
fi
if [ "$(id -u)" = 0 ]; then
    mknod -m 600 "$ROOT/dev/console" c 5 1
    mknod -m 666 "$ROOT/dev/null" c 1 3
fi

# find a module file (plain, .xz, .zst, .gz) by module name (dash/underscore-insensitive)
find_module() {
    local name=$1 alt
    alt=$(echo "$name" | tr '_' '-')
    find "$MODDIR" \( -name "$name.ko*" -o -name "$alt.ko*" \) -print -quit
}

ORDER=()
declare -A SEEN=()
add_module() { # depth-first: dependencies first
    local name=$1 file deps d
    [ -n "${SEEN[$name]:-}" ] && return 0
    SEEN[$name]=1
    file=$(find_module "$name")
    if [ -z "$file" ]; then
        if grep -q "/$name.ko" "$MODDIR/modules.builtin" 2>/dev/null; then
            log "module $name is built in"
        else
            log "module $name not found (skipped)"
        fi
        return 0
    fi
    local out="$ROOT/lib/modules/$KVER/$name.ko"
    case "$file" in
        *.ko) cp "$file" "$out" ;;
        *.ko.xz) xz -dc "$file" >"$out" ;;
        *.ko.zst) zstd -qdc "$file" >"$out" ;;
        *.ko.gz) gzip -dc "$file" >"$out" ;;
        *) echo "guest: unknown module format $file" >&2; exit 1 ;;
    esac
    deps=$(tr '\0' '\n' <"$out" | grep -a '^depends=' | head -n1 | cut -d= -f2 | tr ',' ' ')
    for d in $deps; do add_module "$d"; done
    ORDER+=("$name")
}
for m in $WANT_MODULES; do add_module "$m"; done
printf '%s\n' "${ORDER[@]}" >"$ROOT/etc/vmrepl/modules"
log "modules: ${ORDER[*]}"

log "packing initramfs"
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -9n) >"$WORK/initrd.img"

# --- install outputs atomically-ish (each file renamed into place) ---
cp "$VMLINUZ" "$WORK/vmlinuz"
if [ -f "$KCONFIG" ]; then cp "$KCONFIG" "$CACHE/kernel-config"; else rm -f "$CACHE/kernel-config"; fi
for f in $OUTPUTS; do mv -f "$WORK/$f" "$CACHE/$f"; done
echo "$KVER" >"$CACHE/kernel-version"
echo "$QGA_VER" >"$CACHE/qga-version"
printf '%s\n' "${ORDER[@]}" >"$CACHE/modules"
echo "$HASH" >"$CACHE/stamp"
log "built $CACHE/{vmlinuz,initrd.img,blockio} ($(du -h "$CACHE/initrd.img" | cut -f1) initrd)"
