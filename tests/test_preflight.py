"""``fedsense simulate`` checks every site config and data folder before it starts Flower.

Each problem is one ``path: field: reason`` line (the messages ``fedsense baseline`` prints), all of them
in one error, and the command fails in well under two seconds instead of after a Ray start-up.
"""

from __future__ import annotations

import gzip
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.preflight import check_sites
from test_readers import ras_volume, write_h5, write_nifti

ROOT = Path(__file__).resolve().parent.parent
FEDSENSE = Path(sys.executable).parent / "fedsense"


def site_toml(tmp_path: Path, name: str, dataset: str = "fastmri", data: str = "data", extra: str = "") -> Path:
    """A site config in ``tmp_path`` (data folder relative to it)."""
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\ndataset = "{dataset}"\ndata_path = "{data}"\n{extra}\n'
        '[scanner]\nfield_strength_t = 3.0\ncoils = 2\nmatrix = [16, 16]\nmask = "random"\n'
        "acceleration = 2\ncenter_fraction = 0.2\n",
        encoding="utf-8",
    )
    return path


def h5(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_h5(path, slices=2, coils=2, shape=(16, 16), recon=(8, 8))


def problems(paths: list[Path]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        check_sites(paths)
    return str(info.value).splitlines()


def test_good_sites_pass_and_come_back_loaded(tmp_path: Path) -> None:
    h5(tmp_path / "data" / "a.h5")
    write_nifti(tmp_path / "ixi" / "IXI001-Guys-0001-T1.nii.gz", ras_volume())
    configs = check_sites([site_toml(tmp_path, "a"), site_toml(tmp_path, "c", "ixi", "ixi")])
    assert [c.name for c in configs] == ["a", "c"]


def test_every_problem_of_every_site_is_named_with_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "fake.h5").write_bytes(b"not hdf5 at all" * 100)
    (tmp_path / "empty").mkdir()
    typo = site_toml(tmp_path, "typo", extra="skip_bad_file = true")
    missing = tmp_path / "nowhere.toml"
    no_dir = site_toml(tmp_path, "b", data="no-such-dir")
    empty = site_toml(tmp_path, "e", "brats", "empty")
    fake = site_toml(tmp_path, "f")
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copytree(tmp_path / "data", twin / "data")
    duplicate = site_toml(twin, "f")
    lines = problems([typo, missing, no_dir, empty, fake, duplicate])
    expected = [
        (typo, "skip_bad_file", "unknown field"),
        (missing, "<file>", "no such file"),
        (no_dir, "data_path", "no-such-dir: directory does not exist"),
        (empty, "data_path", "no BraTS NIfTI files found"),
        (fake, "data_path", "fake.h5: not a fastMRI HDF5"),
        (duplicate, "name", "is also the name of"),
    ]
    for path, field, reason in expected:
        assert any(line.startswith(f"{path}: {field}: ") and reason in line for line in lines), (path, field, lines)


def test_a_gzip_that_is_not_nifti_and_an_unreadable_file_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "ixi" / "IXI001-Guys-0001-T1.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(gzip.compress(b"\0" * 400))
    truncated = tmp_path / "ixi" / "IXI002-Guys-0002-T1.nii.gz"
    truncated.write_bytes(gzip.compress(b"\0" * 400)[:12])
    [line] = problems([site_toml(tmp_path, "c", "ixi", "ixi")])
    assert re.search(r"data_path: .*none of the 2 IXI NIfTI file\(s\) is readable", line), line
    assert "IXI001-Guys-0001-T1.nii.gz: not a IXI NIfTI file" in line and "IXI002" in line


def test_simulate_with_a_bad_site_toml_fails_in_under_two_seconds(tmp_path: Path) -> None:
    """The whole command, as a user runs it: exit status 2, the file and field on stderr, fast."""
    h5(tmp_path / "data" / "a.h5")
    good = site_toml(tmp_path, "a")
    bad = tmp_path / "b.toml"
    bad.write_text(
        good.read_text(encoding="utf-8").replace('name = "a"', 'name = "b"').replace("coils = 2\n", ""),
        encoding="utf-8",
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.run(
        [str(FEDSENSE), "simulate", "--sites", str(good), str(bad), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 2, proc.stderr
    assert f"{bad}: scanner.coils: required field is missing" in proc.stderr
    assert not (tmp_path / "run").exists(), "nothing may be started or written for a bad config"
    # CPU seconds, so that a machine shared with other jobs does not decide the test (wall time on an idle
    # machine is about the same); the wall-clock bound is far below Flower's ~30 s start-up.
    assert cpu < 2.0, f"simulate used {cpu:.2f} s of CPU to refuse a bad site config"
    assert elapsed < 10.0, f"simulate took {elapsed:.2f} s to refuse a bad site config"
