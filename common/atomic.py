"""Atomic file replacement: readers and crashes see the old file or the new one, never a part.

Used for everything FedSense rewrites in place (run config, checkpoints, sample images) and for the
folders it writes whole (exported models, DICOM series), by the server and by the sites alike.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


@contextmanager
def atomic_dir(target: Path, replace: bool = False) -> Iterator[Path]:
    """Fill a folder built as ``.NAME.tmp`` next to ``target``; on success it is renamed onto ``target``.

    Its files are fsynced before the rename and an exception removes it, so readers see no folder or
    the whole one, never a part. ``target`` must be absent or an empty folder (the caller checks), unless
    ``replace``: then an existing ``target`` (the caller has checked it holds only its own earlier output)
    is moved aside, the new folder renamed in, and the old one removed only after that.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as stream:
                    os.fsync(stream.fileno())
        old = target.with_name(f".{target.name}.old")
        if target.exists() and replace:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        elif target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


def fsync_dir(directory: Path) -> None:
    """Persist a rename: on POSIX the directory entry is only durable once the directory is synced."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
