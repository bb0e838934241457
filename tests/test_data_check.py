"""``fedsense data check``: the site-side readiness check and its dataset manifest, on partitioned demo data."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from client.check import check_site
from common.data.manifest import load_manifest
from common.data.partition import PartitionSpec, partition_dataset
from common.data.splits import split_subjects
from public_layout import FASTMRI_SCANNERS, write_public_layout
from server.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("public")
    write_public_layout(root, size=32, subjects=3)
    return root


def _sites(public: Path, out: Path, dataset: str, by: str, **kw: object) -> Path:
    """Partitioned with copies, so a test that damages a file never touches the shared originals."""
    return partition_dataset(
        PartitionSpec(dataset=dataset, root=public / dataset, by=by, out=out, link="copy", **kw)
    ).out  # type: ignore[arg-type]


def _edit(toml: Path, pattern: str, replacement: str) -> None:
    text, count = re.subn(pattern, replacement, toml.read_text(), flags=re.MULTILINE)
    assert count == 1, pattern
    toml.write_text(text)


def test_ready_site_counts_every_slice_and_writes_its_manifest(public: Path, tmp_path: Path) -> None:
    out = _sites(public, tmp_path / "s", "fastmri", "scanner")
    toml = out / "fastmri-siemens-skyra.toml"
    report = check_site(toml)
    assert report.ready, report.problems
    files = sorted((out / "fastmri-siemens-skyra").rglob("*.h5"))
    slices, subjects = {}, {}
    for path in files:
        with h5py.File(path) as f:
            slices[path] = f["kspace"].shape[0]
            subjects[path] = f.attrs["patient_id"]
            coils, matrix = f["kspace"].shape[1], f["kspace"].shape[-2:]
    parts = split_subjects(subjects.values(), 0, 0.2, 0.2)
    for split, members in parts.items():
        assert sum(report.slices[split].values()) == sum(n for p, n in slices.items() if subjects[p] in members)
    assert coils == FASTMRI_SCANNERS["skyra"]["coils"]
    assert dict(report.coils) == {coils: sum(slices.values())}
    assert dict(report.kspace_matrices) == {tuple(matrix): sum(slices.values())}
    [mask] = report.masks
    assert mask.ok and abs(mask.effective - 4.0) <= 0.2

    manifest = load_manifest(out / "fastmri-siemens-skyra.manifest.json")
    assert manifest.site == "fastmri-siemens-skyra" and manifest.digest == report.manifest.digest
    for entry, path in zip(manifest.files, files, strict=True):
        assert entry.name == f"multicoil_train/{path.name}"
        assert entry.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert (entry.size, entry.slices) == (path.stat().st_size, slices[path])
    assert "kspace" not in (out / "fastmri-siemens-skyra.manifest.json").read_text()  # names and hashes only

    assert check_site(toml).changes == []  # same data, same digest
    with h5py.File(files[0], "r+") as f:
        f["kspace"][0] = f["kspace"][0] * 2
    assert check_site(toml).changes == [f"changed multicoil_train/{files[0].name} (SHA-256 differs)"]
    assert cli_main(["data", "check", str(toml)]) == 0


def test_corrupted_files_make_the_site_not_ready(
    public: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _sites(public, tmp_path / "s", "ixi", "hospital")
    toml = out / "ixi-hh.toml"
    truncated = sorted((out / "ixi-hh").rglob("*-T2.nii.gz"))[0]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    report = check_site(toml)
    assert not report.ready
    assert [name for name, _ in report.skipped] == [truncated.relative_to(out / "ixi-hh").as_posix()]
    assert "unreadable file(s)" in report.problems[0]
    assert truncated.name not in {f.name.rsplit("/", 1)[-1] for f in report.manifest.files}
    assert cli_main(["data", "check", str(toml)]) == 1
    printed = capsys.readouterr().out
    assert "NOT READY" in printed and truncated.name in printed

    _edit(toml, r"^(hospital = .*)$", r"\1\nskip_bad_files = true")
    report = check_site(toml)
    assert report.ready and "will be skipped" in report.warnings[0]


def test_a_bad_slice_inside_a_readable_file_is_found(public: Path, tmp_path: Path) -> None:
    """Indexing reads headers only; the check reads every slice, so damage deep in a file shows too."""
    out = _sites(public, tmp_path / "s", "fastmri", "field-strength")
    victim = sorted((out / "fastmri-1.5t").rglob("*.h5"))[1]
    with h5py.File(victim, "r+") as f:
        f["kspace"][7, 0, 3, 3] = np.nan
    report = check_site(out / "fastmri-1.5t.toml")
    assert not report.ready
    [(name, reason)] = report.skipped
    assert name.endswith(victim.name) and "slice 7: k-space contains NaN or Inf" in reason


def test_wrong_mask_for_the_matrix_is_caught(public: Path, tmp_path: Path) -> None:
    out = _sites(public, tmp_path / "s", "fastmri", "field-strength")
    toml = out / "fastmri-3t.toml"
    _edit(toml, r"^acceleration = .*$", "acceleration = 8")
    _edit(toml, r"^center_fraction = .*$", "center_fraction = 0.3")  # 10 ACS columns; R=8 on 32 allows 4
    report = check_site(toml)
    assert not report.ready
    assert any(p.startswith("mask equispaced at R=8 on 32x32") and "ACS" in p for p in report.problems)
    assert report.masks[0].effective is None


def test_site_without_validation_subjects_cannot_train(public: Path, tmp_path: Path) -> None:
    out = _sites(public, tmp_path / "s", "brats", "random", sites=3)  # 2 subjects each: no val subject
    report = check_site(out / "brats-random-0.toml")
    assert not report.ready and report.subjects == {"train": 2, "val": 0, "test": 0}
    assert any(p.startswith("no readable val slices") for p in report.problems)


def test_server_cli_does_not_import_client_code() -> None:
    code = (
        "import sys, server.cli; server.cli.build_parser(); "
        "sys.exit(any(m == 'client' or m.startswith('client.') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


def test_site_whose_folder_holds_no_data_of_its_kind(public: Path, tmp_path: Path) -> None:
    out = _sites(public, tmp_path / "s", "ixi", "hospital")
    toml = out / "ixi-guys.toml"
    _edit(toml, r'^dataset = "ixi"$', 'dataset = "brats"')
    _edit(toml, r"^hospital = .*$", "")
    _edit(toml, r"^contrasts = .*$", "")
    report = check_site(toml)
    assert not report.ready and report.manifest is None
    assert report.problems == [
        f"{out / 'ixi-guys'}: no BraTS NIfTI files found "
        "(e.g. BraTS20_Training_001_flair.nii.gz or BraTS-GLI-00000-000-t2f.nii.gz)"
    ]
    assert cli_main(["data", "check", str(toml)]) == 1
