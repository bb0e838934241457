"""A poisonous HDF5 file costs seconds, not a round: each file is first read in a child process with a time limit.

libhdf5 can loop forever on a crafted file (e.g. a string attribute whose global-heap object has size 0)
or crash the process; no Python-level guard can interrupt C code that never returns. So before a site
indexes its fastMRI files, one child process opens each file and touches what indexing and reading will
touch: every object and every attribute, and the first and last slice of every dataset. The parent gives
each file ``timeout`` seconds; a file that takes longer (or kills the child) gets a verdict naming it, the
child is killed and a fresh one goes on with the next file. Python exceptions in the child are not
verdicts: the in-process reader raises them again, with its precise message.

Verdicts are cached by (path, size, mtime), in this process and on disk (``$FEDSENSE_CACHE_DIR`` or
``~/.cache/fedsense``), so each version of a file is checked once, not once per round or process. A
"did not finish" verdict is kept in this process only: an overloaded machine must not condemn a good
file for good.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
TIMED_OUT = "reading it did not finish within"
CACHE_FILE = "h5-verdicts.json"
# Started by the parent with the files on stdin (one JSON list); one JSON line per file on stdout.
_CHILD = "common.data.h5check"

_memory: dict[str, str | None] = {}


def _key(path: Path) -> str | None:
    try:
        info = path.stat()
    except OSError:
        return None  # the reader reports the missing file itself
    return f"{path.resolve()}|{info.st_size}|{info.st_mtime_ns}"


def _cache_path() -> Path:
    base = os.environ.get("FEDSENSE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fedsense")
    return Path(base) / CACHE_FILE


def _load_disk_cache() -> dict[str, str | None]:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): (v if isinstance(v, str) else None) for k, v in data.items()} if isinstance(data, dict) else {}


def _save_disk_cache(new: dict[str, str | None]) -> None:
    # Entries of files that are gone are dropped, so the cache does not grow with every temporary folder.
    merged = {k: v for k, v in {**_load_disk_cache(), **new}.items() if os.path.exists(k.rsplit("|", 2)[0])}
    try:
        atomic_write_bytes(_cache_path(), json.dumps(merged, sort_keys=True).encode())
    except OSError as exc:  # a read-only home only costs re-checking in the next process
        log.debug("cannot write the HDF5 verdict cache %s: %s", _cache_path(), exc)


def check_files(paths: Sequence[Path], timeout: float = DEFAULT_TIMEOUT) -> dict[Path, str | None]:
    """Per file: None when a child process read it within ``timeout`` s, else why not (hang or crash)."""
    keys = {path: _key(path) for path in paths}
    if any(k is not None and k not in _memory for k in keys.values()):
        _memory.update({k: v for k, v in _load_disk_cache().items() if k in keys.values()})
    todo = [p for p, k in keys.items() if k is not None and k not in _memory]
    if todo:
        found = _run_children(todo, timeout)
        fresh = {key: found[p] for p in todo if (key := keys[p]) is not None}
        _memory.update(fresh)
        _save_disk_cache({k: v for k, v in fresh.items() if v is None or not v.startswith(TIMED_OUT)})
    return {p: (_memory.get(k) if k is not None else None) for p, k in keys.items()}


def _child_env() -> dict[str, str]:
    """The child imports this package the way the parent did, and h5py finds no user plugins."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _run_children(paths: list[Path], timeout: float) -> dict[Path, str | None]:
    verdicts: dict[Path, str | None] = {}
    pending = list(paths)
    while pending:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=_child_env(),
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps([str(p) for p in pending]).encode())
        proc.stdin.close()
        # The first file's clock starts when the child announces it (after importing h5py); the
        # start-up itself gets a generous allowance.
        current, deadline, buffer = -1, started + timeout + 30.0, b""
        try:
            while True:
                wait = deadline - time.monotonic()
                ready = select.select([proc.stdout], [], [], max(wait, 0.0))[0] if wait > 0 else []
                if not ready:
                    break  # the file being read has had its time
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break  # the child exited (done, or crashed on the current file)
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    message = json.loads(line)
                    if "done" in message:
                        verdicts[pending[message["done"]]] = None
                    current = message.get("next", current)
                    deadline = time.monotonic() + timeout
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if current < 0 and not verdicts.keys() & set(pending):
            raise OSError(f"the HDF5 check process failed to start (exit {proc.returncode})")
        if current >= len(pending) or current < 0:
            break
        bad = pending[current]
        if bad not in verdicts:
            if proc.returncode is not None and proc.returncode < 0 and time.monotonic() < deadline:
                verdicts[bad] = f"reading it crashed libhdf5 (signal {-proc.returncode})"
            else:
                verdicts[bad] = f"{TIMED_OUT} {timeout:g} s (a damaged file makes libhdf5 loop)"
            log.warning("%s: %s", bad, verdicts[bad])
        pending = [p for p in pending[current + 1 :] if p not in verdicts]
    return verdicts


def _touch(path: str) -> None:
    """What indexing and slice reads touch: every object, every attribute, first and last slices."""
    import h5py

    def visit(_name: str, obj: object) -> None:
        attrs = getattr(obj, "attrs", None)
        if attrs is not None:
            dict(attrs)
        if isinstance(obj, h5py.Dataset):
            if obj.ndim == 0:
                obj[()]
            elif obj.shape[0] > 0:
                obj[0]
                obj[obj.shape[0] - 1]

    with h5py.File(path, "r") as f:
        dict(f.attrs)
        f.visititems(visit)


def _child_main() -> None:
    """Read the file list from stdin; announce each file before touching it and report when done."""
    import h5py  # noqa: F401  (imported before "ready" so the first file's clock is not spent importing)

    paths = json.loads(sys.stdin.read())
    out = sys.stdout
    for index, path in enumerate(paths):
        out.write(json.dumps({"next": index}) + "\n")
        out.flush()
        try:
            _touch(path)
        except Exception:  # the reader in the parent reports it with its own message
            pass
        out.write(json.dumps({"done": index}) + "\n")
        out.flush()
    out.write(json.dumps({"next": len(paths)}) + "\n")
    out.flush()


if __name__ == "__main__":
    _child_main()
