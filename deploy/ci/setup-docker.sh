#!/usr/bin/env bash
# Make this machine ready for the Docker tests (tests/test_compose.py), idempotently:
#   1. docker.io, docker-compose and debootstrap installed (Debian packages) if missing
#   2. dockerd running (started in the background if not), waited for
#   3. the local base image built if missing (deploy/ci/build-base-image.sh)
# Needs root for 1-3 unless they are already done. Logs: /var/log/dockerd.log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
log() { echo "[setup-docker] $*" >&2; }

have_compose() { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
have_compose || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    [[ $EUID -eq 0 ]] || { log "need root to install: ${missing[*]}"; exit 1; }
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    [[ $EUID -eq 0 ]] || { log "dockerd is not running and starting it needs root"; exit 1; }
    log "starting dockerd (log: /var/log/dockerd.log)"
    nohup dockerd >>/var/log/dockerd.log 2>&1 &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || { log "dockerd did not come up; tail of its log:"; tail -n 20 /var/log/dockerd.log >&2; exit 1; }
fi
log "engine $(docker version -f '{{.Server.Version}}'), compose: $( (docker compose version 2>/dev/null || docker-compose version --short) | head -n1)"

bash "$ROOT/deploy/ci/build-base-image.sh"
