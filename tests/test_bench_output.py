"""Benchmarks rebuild their output folder; one that holds anything is replaced only with --overwrite."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bench import budget, cost, privacy, quality, ssdu
from bench.harness import check_output, fresh_output


def _user_folder(path: Path) -> Path:
    (path / "scans").mkdir(parents=True)
    (path / "scans" / "raw.h5").write_bytes(b"a user's scan")
    return path


def test_fresh_output_refuses_a_folder_with_files_and_leaves_it_alone(tmp_path: Path) -> None:
    folder = _user_folder(tmp_path / "out")
    with pytest.raises(SystemExit, match=r"--out .*out: exists and is not empty; pass --overwrite"):
        fresh_output(folder, overwrite=False)
    assert (folder / "scans" / "raw.h5").read_bytes() == b"a user's scan"


def test_fresh_output_takes_a_missing_or_empty_folder_and_empties_one_with_overwrite(tmp_path: Path) -> None:
    assert fresh_output(tmp_path / "new" / "out", overwrite=False).is_dir()
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", overwrite=False)
    (tmp_path / "link").symlink_to(tmp_path / "empty")  # a user's link to an empty folder is used, not replaced
    assert fresh_output(tmp_path / "link", overwrite=False).is_symlink()
    folder = _user_folder(tmp_path / "old")
    assert list(fresh_output(folder, overwrite=True).iterdir()) == []
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(SystemExit, match="a-file: exists"):
        check_output(file, overwrite=False)
    assert fresh_output(file, overwrite=True).is_dir()


@pytest.mark.parametrize(
    ("main", "argv", "folder"),
    [
        (quality.main, ["--accelerations", "4", "8"], "R8"),
        (budget.main, [], ""),
        (privacy.main, [], ""),
        (ssdu.main, [], ""),
        (cost.main, ["overhead", "scale"], "scale"),
    ],
    ids=["quality", "budget", "privacy", "ssdu", "cost"],
)
def test_a_benchmark_refuses_an_existing_output_before_any_work(
    tmp_path: Path, main: Callable[[list[str]], object], argv: list[str], folder: str
) -> None:
    out = tmp_path / "out"
    taken = _user_folder(out / folder)
    with pytest.raises(SystemExit, match="exists and is not empty; pass --overwrite"):
        main([*argv, "--out", str(out)])
    assert (taken / "scans" / "raw.h5").read_bytes() == b"a user's scan"
    assert [p.name for p in out.iterdir()] == [folder or "scans"]  # no other section or acceleration started
