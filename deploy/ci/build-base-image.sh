#!/usr/bin/env bash
# Build the local base image (Debian bookworm + python3) with debootstrap.
#
# Why: the build hosts reach Debian's and PyPI's package archives but no image
# registry, so `FROM python:3.11-slim` cannot be pulled. bookworm's python3 is
# 3.11, the ABI of the wheels in deploy/wheelhouse. Skips if the image exists.
#
# Env: BASE_IMAGE (default fedsense/base:bookworm), DEBIAN_MIRROR (default: the
# first Debian mirror in the host's apt sources), FORCE=1 to rebuild.
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-fedsense/base:bookworm}"
SUITE=bookworm

log() { echo "[build-base-image] $*" >&2; }

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "$BASE_IMAGE exists; skipping (FORCE=1 rebuilds)"
    exit 0
fi

host_mirror() {
    # deb822 "URIs:" lines and one-line "deb URI suite" entries; first plain Debian archive wins.
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] && cat "$f"
    done | sed -nE 's/^URIs:[[:space:]]+([^[:space:]]+).*/\1/p; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' \
        | grep -E '/debian/?$' | head -n1 || true
}
MIRROR="${DEBIAN_MIRROR:-$(host_mirror)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
MIRROR="${MIRROR%/}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-${MIRROR%/debian}/debian-security}"

command -v debootstrap >/dev/null || { log "debootstrap missing (apt-get install -y debootstrap)"; exit 1; }
[[ $EUID -eq 0 ]] || { log "debootstrap needs root"; exit 1; }

ROOTFS="$(mktemp -d /tmp/fedsense-rootfs.XXXXXX)"
cleanup() {
    for m in proc sys dev/pts dev; do umount "$ROOTFS/$m" 2>/dev/null || true; done
    rm -rf --one-file-system "$ROOTFS"
}
trap cleanup EXIT

log "debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >&2

cat >"$ROOTFS/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
SOURCES

mount -t proc proc "$ROOTFS/proc"
log "installing python3 into the rootfs"
chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -q && apt-get install -y -q --no-install-recommends \
              python3 python3-venv python3-pip ca-certificates passwd \
           && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin' >&2
umount "$ROOTFS/proc"

log "importing as $BASE_IMAGE"
tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$BASE_IMAGE" >&2
log "done: $(docker image inspect -f '{{.Size}}' "$BASE_IMAGE") bytes"
