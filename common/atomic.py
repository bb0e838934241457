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

from common.errors import FedSenseError


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
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        named = os_error_at(exc, tmp, path)
        if named is not None:
            raise named from exc
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
    try:
        tmp.mkdir(parents=True)
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
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        named = os_error_at(exc, tmp, target)
        if named is not None:
            raise named from exc
        raise
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


def os_error_at(exc: BaseException, tmp: Path, target: Path) -> OSError | None:
    """``exc`` naming the user's ``target`` instead of no file or the temporary ``tmp`` it was written as;
    None: leave ``exc`` as it is (not the file system's, or it names other files already).

    ``write()`` on a full disk names no file, and h5py's errors pack theirs into a multi-line dump: the user
    would read only "File too large", or a hidden ``.NAME.tmp`` they never asked for. The new error names
    ``target`` (or the file under it whose temporary twin failed) with the system's short reason, and keeps
    the errno, so it is the same OSError subclass.
    """
    cause: BaseException | None = exc
    for _ in range(8):  # h5py raises a RuntimeError while closing, during the OSError of the write itself
        if not isinstance(cause, Exception) or isinstance(cause, (OSError, FedSenseError)):
            break
        cause = cause.__cause__ or cause.__context__
    if not isinstance(cause, OSError):
        return None

    def at_target(name: object) -> str | None:
        if not isinstance(name, (str, bytes)):
            return None
        try:
            return str(target / Path(os.fsdecode(name)).relative_to(tmp))
        except ValueError:
            return None

    names = [cause.filename, cause.filename2]
    moved = [at_target(name) for name in names]
    if any(name is not None for name in names) and not any(moved):
        return None
    first = moved[0] or (str(cause.filename) if cause.filename is not None else str(target))
    second = moved[1] or cause.filename2
    reason = os.strerror(cause.errno) if cause.errno else (cause.strerror or str(cause)).splitlines()[0]
    return OSError(cause.errno, reason, first, None, second)


def fsync_dir(directory: Path) -> None:
    """Persist a rename: on POSIX the directory entry is only durable once the directory is synced."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
