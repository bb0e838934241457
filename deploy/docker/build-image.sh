#!/usr/bin/env bash
# Build the FedSense image from an explicit file list (never the whole tree:
# .venv, runs/ and data stay out of the build context).
#
# Env: IMAGE (default fedsense:latest), BASE_IMAGE (default fedsense/base:bookworm).
# Expects deploy/wheelhouse/ filled by deploy/wheelhouse.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
IMAGE="${IMAGE:-fedsense:latest}"
BASE_IMAGE="${BASE_IMAGE:-fedsense/base:bookworm}"

log() { echo "[build-image] $*" >&2; }

cd "$ROOT"
[[ -f deploy/wheelhouse/.stamp ]] || { log "deploy/wheelhouse is empty: run deploy/wheelhouse.sh"; exit 1; }
CONTEXT=(pyproject.toml README.md common server client deploy/Dockerfile deploy/docker deploy/sites deploy/wheelhouse)

log "building $IMAGE from $BASE_IMAGE"
tar -c --exclude='__pycache__' --exclude='*.pyc' "${CONTEXT[@]}" \
    | docker build -f deploy/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" - >&2
log "done: $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)"
