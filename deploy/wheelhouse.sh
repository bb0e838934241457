#!/usr/bin/env bash
# Fill deploy/wheelhouse/ with every runtime wheel the image needs, so that
# `docker build` installs offline (`pip install --no-index`): containers reach
# the package index only through a TLS proxy, the host reaches it directly.
#
#   requirements.txt        [project].dependencies, with flwr's `simulation`
#                           extra dropped: the deployment runtime never starts
#                           Ray (saves ~300 MB per image)
#   constraints.txt         `pip freeze` of the tested venv: the image gets the
#                           exact versions the test-suite ran with
#   build-requirements.txt  setuptools, to build the fedsense wheel in the image
#
# Skips the download when those three files are unchanged since the last run.
# Env: PYTHON (default .venv/bin/python, must be CPython 3.11 like the image),
#      WHEELHOUSE (default deploy/wheelhouse), FORCE=1 to re-download.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${WHEELHOUSE:-$ROOT/deploy/wheelhouse}"

log() { echo "[wheelhouse] $*" >&2; }

"$PYTHON" - <<'PY' || { log "$PYTHON is not CPython 3.11 (the image's python; wheels are cp311)"; exit 1; }
import sys
sys.exit(0 if sys.version_info[:2] == (3, 11) and sys.implementation.name == "cpython" else 1)
PY

mkdir -p "$OUT"
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT

"$PYTHON" - "$ROOT/pyproject.toml" >"$STAGE/requirements.txt" <<'PY'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as fh:
    deps = tomllib.load(fh)["project"]["dependencies"]
for dep in deps:
    # "flwr[simulation]==1.41.*" -> "flwr==1.41.*"; other extras are kept.
    print(re.sub(r"^(flwr)\[[^\]]*\]", r"\1", dep))
PY
"$PYTHON" -m pip freeze --all --exclude-editable 2>/dev/null \
    | grep -viE '^(fedsense|pip|-e )' | grep -v ' @ ' >"$STAGE/constraints.txt"
grep -iE '^setuptools==' "$STAGE/constraints.txt" >"$STAGE/build-requirements.txt" \
    || echo 'setuptools>=77' >"$STAGE/build-requirements.txt"

STAMP="$(cat "$STAGE"/*.txt | sha256sum | cut -d' ' -f1)"
if [[ "${FORCE:-0}" != 1 && -f "$OUT/.stamp" && "$(cat "$OUT/.stamp")" == "$STAMP" ]]; then
    log "up to date ($OUT)"
    exit 0
fi

log "downloading wheels into $OUT"
# pip does not widen an explicit --platform to older manylinux tags: list them
# (bookworm's glibc is 2.36).
PLATFORMS=()
for tag in manylinux_2_{36,35,34,33,32,31,30,29,28,27,26,25,24,17,12,5} manylinux{2014,2010,1}; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
# Only binary wheels for the image's platform (works from any host OS); the
# host's pip config may add find-links (e.g. a local CPU-only torch wheel).
"$PYTHON" -m pip download --disable-pip-version-check --progress-bar off \
    --only-binary=:all: "${PLATFORMS[@]}" --python-version 3.11 \
    --implementation cp --abi cp311 \
    --dest "$OUT" -c "$STAGE/constraints.txt" \
    -r "$STAGE/requirements.txt" -r "$STAGE/build-requirements.txt" >&2
cp "$STAGE"/*.txt "$OUT/"
echo "$STAMP" >"$OUT/.stamp"
log "done: $(find "$OUT" -name '*.whl' | wc -l) wheels, $(du -sh "$OUT" | cut -f1)"
