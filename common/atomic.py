"""Atomic file replacement: readers and crashes see the old file or the new one, never a part.

Used for everything FedSense rewrites in place (run config, checkpoints, sample images), by the
server and by the sites alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write via ``.NAME.tmp`` in the same directory, fsync, then ``os.replace`` onto ``path``.

    The temp file lives next to the target so the rename stays on one filesystem (atomic); its
    leading dot keeps it out of ``round-NNNN`` globs, so a crash leaves a harmless leftover.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    atomic_write(Path(path), lambda stream: stream.write(data))


def fsync_dir(directory: Path) -> None:
    """Persist a rename: on POSIX the directory entry is only durable once the directory is synced."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
