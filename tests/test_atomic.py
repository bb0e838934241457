"""Folders written whole (exported models, DICOM series) appear complete or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.atomic import atomic_dir


def test_a_filled_folder_appears_under_its_name_with_its_files(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()  # an empty folder is replaced
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "b.json").write_text("{}", encoding="utf-8")
        assert not any(target.iterdir())
    assert sorted(p.name for p in target.iterdir()) == ["a.bin", "b.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failure_while_filling_leaves_neither_the_folder_nor_its_temp(tmp_path: Path) -> None:
    target = tmp_path / "series"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(target) as tmp:
            (tmp / "IM0001.dcm").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_a_leftover_temp_from_a_crash_is_discarded(tmp_path: Path) -> None:
    (tmp_path / ".model.tmp").mkdir()
    (tmp_path / ".model.tmp" / "stale.bin").write_bytes(b"old")
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "new.bin").write_bytes(b"new")
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["new.bin"]


def test_a_write_error_names_the_target_not_the_temp_or_nothing(tmp_path: Path) -> None:
    """``write()`` on a full disk names no file, an error in the temp folder names ``.NAME.tmp``: the user reads
    the path they asked for, with the same errno (the same OSError subclass)."""
    import errno

    from common.atomic import atomic_write

    def disk_full(stream: object) -> None:
        raise OSError(errno.EFBIG, "a library's long account of it\nover two lines")

    with pytest.raises(OSError, match="File too large") as caught:
        atomic_write(tmp_path / "figure.png", disk_full)
    assert (caught.value.errno, caught.value.filename) == (errno.EFBIG, str(tmp_path / "figure.png"))
    with pytest.raises(PermissionError) as denied:
        with atomic_dir(tmp_path / "model") as tmp:
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp / "weights" / "w.bin"))
    assert denied.value.filename == str(tmp_path / "model" / "weights" / "w.bin")
    assert list(tmp_path.iterdir()) == []
