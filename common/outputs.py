"""Where a command may write: never onto, into or around one of its inputs, never over an old output unasked.

Every writing ``fedsense`` command (reconstruct, export, metrics plot, data demo, data partition,
simulate, baseline) checks its outputs here before it reads or computes anything, so a mistaken
``--out`` fails in a second and no input file is ever replaced. Paths are compared resolved (symlinks,
``..``) and by inode, so a hard link or a bind mount of an input is recognised too. The writes themselves
go to a temporary name and are renamed into place (:mod:`common.atomic`).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from common.errors import OutputError


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _existing_chain(path: Path) -> list[Path]:
    """``path`` (when it exists) and each of its existing ancestors, nearest first."""
    return [p for p in (path, *path.parents) if p.exists()]


def check_not_input(out: Path, inputs: Iterable[Path], option: str = "--out") -> None:
    """Refuse an output that is an input, holds an input (an ancestor of one) or lies inside an input folder."""
    out = Path(out)
    out_resolved = out.resolve()
    out_chain = {_inode(p) for p in _existing_chain(out_resolved)} - {None}
    out_id = _inode(out_resolved)
    for given in inputs:
        source = Path(given).resolve()
        source_id = _inode(source)
        if source == out_resolved or (out_id is not None and out_id == source_id):
            raise OutputError(f"{option}: {out} is the input {given}; choose another output")
        source_parents = {_inode(p) for p in source.parents} - {None}
        if out_resolved in source.parents or (out_id is not None and out_id in source_parents):
            raise OutputError(f"{option}: {out} contains the input {given}; choose a folder outside the inputs")
        if source_id is not None and source.is_dir() and (source in out_resolved.parents or source_id in out_chain):
            raise OutputError(f"{option}: {out} is inside the input folder {given}; choose a folder outside it")


def check_new_file(target: Path, overwrite: bool, option: str = "--out") -> None:
    """Refuse an existing ``target`` file unless ``overwrite``; a folder in its place is always refused."""
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{option}: {target} is a folder, where a file would be written; choose another output")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputError(f"{option}: {target} already exists; pass --overwrite to replace it")


def check_new_folder(target: Path, overwrite: bool, option: str = "--out") -> None:
    """Refuse a non-empty existing folder unless ``overwrite``; a file in its place is always refused."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{option}: {target} is an existing file, not a folder; choose a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"{option}: {target} already exists and is not empty; pass --overwrite to replace it")


def check_can_write(out: Path) -> None:
    """Refuse, before any work, an output in a folder this process may not create files in.

    Tried, not inferred from mode bits (root, capabilities, read-only mounts and ACLs all count): a
    temporary file is made and removed in ``out`` or its nearest existing ancestor. Raises
    ``PermissionError`` (or the file system's own error) naming ``out``: exit 4 at the CLI.
    """
    out = Path(out)
    folder = next((p for p in _existing_chain(out.absolute()) if p.is_dir()), None)
    if folder is None:
        return  # nothing of it exists, not even the root: the write itself will say why
    try:
        fd, probe = tempfile.mkstemp(prefix=".fedsense-write-test-", dir=folder)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = "" if folder == out.absolute() else f" (cannot create files in {folder})"
        raise OSError(exc.errno or errno.EACCES, f"{reason}{where}", str(out)) from exc
    os.close(fd)
    os.unlink(probe)


def check_output_folder(out: Path, inputs: Iterable[Path], overwrite: bool, option: str = "--out") -> None:
    """The checks of a command that writes a whole folder: not an input, not inside/around one, new or
    --overwrite, and writable."""
    check_not_input(out, inputs, option)
    check_new_folder(out, overwrite, option)
    check_can_write(out)
