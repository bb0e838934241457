#!/usr/bin/env bash
# `make clean`'s removal of run folders, including files a container wrote as its own user (uid 10001:
# compose runs from before `make compose-up` handed ./runs to the host user). What `rm` may not remove is
# removed by a throwaway container of the local base image (offline, no network), which runs as root.
# Usage: BASE_IMAGE=fedsense/base:bookworm bash deploy/clean-runs.sh DIR...
set -euo pipefail
BASE_IMAGE=${BASE_IMAGE:-fedsense/base:bookworm}

for dir in "$@"; do
    [ -e "$dir" ] || continue
    if rm -rf -- "$dir" 2>/dev/null; then
        continue
    fi
    if ! command -v docker >/dev/null || ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        echo "clean: $dir holds files of another user (a container's uid 10001) and the image $BASE_IMAGE" \
             "is not here to remove them; run: sudo rm -rf $dir" >&2
        exit 1
    fi
    absolute="$(cd -- "$(dirname -- "$dir")" && pwd)/$(basename -- "$dir")"
    echo "clean: removing the files in $dir that a container wrote, through $BASE_IMAGE" >&2
    docker run --rm --network none --user 0:0 -v "$absolute:/clean" "$BASE_IMAGE" \
        find /clean -mindepth 1 -delete
    rm -rf -- "$dir"
done
