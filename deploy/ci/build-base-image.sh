#!/usr/bin/env bash
# Build the local base image (Debian bookworm + python3 + nginx) with debootstrap.
#
# Why: the build hosts reach Debian's and PyPI's package archives but no image
# registry, so `FROM python:3.11-slim` cannot be pulled. bookworm's python3 is
# 3.11, the ABI of the wheels in deploy/wheelhouse. nginx is the federation's front
# door (deploy/docker/nginx.conf.template). Skips if the image exists and its
# label fedsense.base.packages lists the packages below (an older base image
# without nginx is rebuilt).
#
# Env: BASE_IMAGE (default fedsense/base:bookworm), DEBIAN_MIRROR (default: the
# first Debian mirror in the host's apt sources), FORCE=1 to rebuild,
# BASE_PACKAGES (default: the list below) for another image of Debian packages,
# e.g. the monitoring profile's Prometheus (deploy/images.mk, monitoring-image).
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-fedsense/base:bookworm}"
SUITE=bookworm
PACKAGES="${BASE_PACKAGES:-python3 python3-venv python3-pip ca-certificates passwd nginx}"

log() { echo "[build-base-image] $*" >&2; }

if [[ "${FORCE:-0}" != 1 ]] \
    && [[ "$(docker image inspect -f '{{index .Config.Labels "fedsense.base.packages"}}' "$BASE_IMAGE" 2>/dev/null)" == "$PACKAGES" ]]; then
    log "$BASE_IMAGE exists with $PACKAGES; skipping (FORCE=1 rebuilds)"
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
log "installing $PACKAGES into the rootfs"
# policy-rc.d: packages (nginx) must not try to start services inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
chmod 0755 "$ROOTFS/usr/sbin/policy-rc.d"
chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c "apt-get update -q && apt-get install -y -q --no-install-recommends $PACKAGES \
           && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin" >&2
rm -f "$ROOTFS/usr/sbin/policy-rc.d"
umount "$ROOTFS/proc"

log "importing as $BASE_IMAGE"
tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --change "LABEL fedsense.base.packages=\"$PACKAGES\"" \
    - "$BASE_IMAGE" >&2
log "done: $(docker image inspect -f '{{.Size}}' "$BASE_IMAGE") bytes"
