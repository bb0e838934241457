"""The site's data index, built once and kept on the site's own disk.

Indexing opens every file (HDF5 attributes and ISMRMRD header; a streaming pass over each NIfTI
volume): seconds for a demo site, minutes for thousands of fastMRI volumes. Every Flower message
starts a fresh ClientApp process at the site, so without a cache that cost is paid for every train
and evaluate message. The cache is keyed by everything the index depends on: the site config's
data settings, the reader's parameters, and each file's relative name, size and mtime. A file
added, changed or removed, or a changed config, gives a new key; a damaged or foreign cache file is
ignored and rebuilt. It is JSON (never pickle): a cache file is data, and loading it runs no code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from common.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "fedsense-index/1"
ENV_DIR = "FEDSENSE_INDEX_CACHE"

T = TypeVar("T")


def default_cache_dir() -> Path | None:
    """``$FEDSENSE_INDEX_CACHE`` (``off`` disables caching), else ``$XDG_CACHE_HOME/fedsense/index``."""
    value = os.environ.get(ENV_DIR)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedsense" / "index"


def index_key(root: Path, files: Sequence[Path], params: dict[str, Any]) -> str:
    """SHA-256 over the index format, the reader's parameters and every file's name, size and mtime."""
    entries = []
    for path in files:
        stat = path.stat()
        entries.append([os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns])
    payload = json.dumps(
        {"format": FORMAT, "root": str(root), "params": params, "files": entries}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_path(directory: Path, key: str) -> Path:
    return directory / f"{key}.json"


def load(directory: Path, key: str) -> dict[str, Any] | None:
    """The cached index state for ``key``, or None when absent, unreadable or not ours."""
    path = cache_path(directory, key)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s: damaged index cache ignored (%s); rebuilding", path, exc)
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("key") != key:
        log.warning("%s: index cache of another format or key ignored; rebuilding", path)
        return None
    return state


def save(directory: Path, key: str, state: dict[str, Any]) -> None:
    """Write the index state atomically; a cache that cannot be written only costs the next start."""
    try:
        atomic_write_bytes(cache_path(directory, key), json.dumps({**state, "format": FORMAT, "key": key}).encode())
    except OSError as exc:
        log.warning("%s: cannot write the index cache (%s); the next start indexes again", directory, exc)


def dataclass_from_json(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a frozen dataclass written with ``dataclasses.asdict`` (JSON lists back to tuples)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if set(data) != names:
        raise ValueError(f"{cls.__name__}: fields {sorted(data)} != {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def cached(
    directory: Path | None,
    key_of: Callable[[], str],
    build: Callable[[], T],
    restore: Callable[[dict[str, Any]], T],
    state_of: Callable[[T], dict[str, Any]],
    keep: Callable[[T], bool] = lambda _: True,
) -> T:
    """``restore`` the index from the cache when its key matches, else ``build`` it and cache its
    state (unless ``keep`` says this index should be rebuilt next time)."""
    if directory is None:
        return build()
    key = key_of()
    state = load(directory, key)
    if state is not None:
        try:
            return restore(state)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("%s: index cache does not fit this FedSense (%s); rebuilding", cache_path(directory, key), exc)
    value = build()
    if keep(value):
        save(directory, key, state_of(value))
    return value
