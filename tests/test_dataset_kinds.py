"""Dataset kinds live in one registry (common.data.kinds): a kind registered there is a kind everywhere.

A toy kind (the IXI demo files, T1 only, no hospital split) is registered and then validated by the site
config, found and signature-checked by the preflight, indexed by ``open_reader`` and turned into the
site's datasets, written by ``fedsense data demo`` with its own writer and split by ``fedsense data
partition`` with its own partitioner, with no other module edited; before it is registered and after it
is gone, the config and the command line name the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.config import SiteConfig, load_site_config
from common.data import demo, kinds
from common.data.dataset import build_site_datasets
from common.data.discovery import Discovered, discover_nifti
from common.data.kinds import DatasetKind, Partitioner, fixed_contrasts, has_nifti_magic, register
from common.data.readers import IXIReader, find_ixi_files, open_reader
from common.errors import ConfigError
from common.preflight import check_sites
from server import cli
from tests.conftest import write_small_sites


def discover_toy(root: Path, wanted: object) -> Discovered:
    """The T1 volumes under ``root``, with no natural partition key."""
    return discover_nifti(find_ixi_files(root, ["T1"]), root, lambda _source: ({}, None))


def write_toy(
    site_dir: Path, site: SiteConfig, size: int, count: int, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """IXI's demo files, T1 only."""
    files, subjects = demo.write_ixi(site_dir, site, size, count, rng)
    for name in files:
        if not name.endswith("-T1.nii.gz"):
            (site_dir / name).unlink()
    return [name for name in files if name.endswith("-T1.nii.gz")], subjects


TOY = DatasetKind(
    name="toy",
    description="IXI's T1 volumes, one hospital-less site",
    files="toy NIfTI",
    find=lambda config: find_ixi_files(config.data_path, ["T1"]),
    is_file=has_nifti_magic,
    reader=lambda _config, min_foreground: (IXIReader, {"min_foreground": min_foreground}),
    raw_kspace=False,
    contrasts=fixed_contrasts("toy", ("T1",), str.upper),
    partition=Partitioner(
        keys=(),
        discover=discover_toy,
        examples="IXI002-Guys-0828-T1.nii.gz",
        count=lambda root: len(find_ixi_files(root, ["T1"])),
    ),
    demo=write_toy,
)


@pytest.fixture(scope="module")
def ixi_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo IXI site (T1, T2, PD volumes) at 32²."""
    (path,) = write_small_sites(tmp_path_factory.mktemp("kinds"), names=("site-c",), size=32, slices=2)
    return path


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the registry for one test: what it registers is gone afterwards."""
    monkeypatch.setattr(kinds, "KINDS", dict(kinds.KINDS))


def toy_site(ixi_site: Path, tmp_path: Path, **replace: str) -> Path:
    text = ixi_site.read_text(encoding="utf-8").replace('dataset = "ixi"', 'dataset = "toy"')
    text = text.replace('hospital = "Guys"\n', "").replace('contrasts = ["T1", "T2", "PD"]', 'contrasts = ["t1"]')
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "toy.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_an_unknown_kind_is_refused_naming_the_field_and_the_known_kinds(
    registry: None, ixi_site: Path, tmp_path: Path
) -> None:
    path = toy_site(ixi_site, tmp_path)
    with pytest.raises(
        ConfigError,
        match=rf"{path.name}: dataset: unknown dataset kind 'toy'; "
        r"known kinds: brats, fastmri, ixi",
    ):
        load_site_config(path)


def test_a_registered_kind_is_usable_end_to_end(registry: None, ixi_site: Path, tmp_path: Path) -> None:
    register(TOY)
    path = toy_site(ixi_site, tmp_path)
    (config,) = check_sites([path])  # config validation plus the preflight's look at the folder
    assert config.dataset == "toy" and config.contrasts == ["T1"]
    reader = open_reader(config, cache_dir=None)
    assert type(reader) is IXIReader and reader.examples
    assert {e.contrast for e in reader.examples} == {"T1"}  # the kind's own file selection
    every = open_reader(load_site_config(ixi_site), cache_dir=None)
    assert {e.contrast for e in every.examples} == {"T1", "T2", "PD"}
    datasets = build_site_datasets(config)
    assert sum(len(d) for d in datasets.values()) == len(reader.examples)
    with pytest.raises(ValueError, match="already registered"):
        register(TOY)


def test_a_registered_kind_validates_its_own_fields(registry: None, ixi_site: Path, tmp_path: Path) -> None:
    register(TOY)
    with pytest.raises(ConfigError, match=r"toy\.toml: contrasts: unknown toy contrast\(s\) \['PD'\]; use T1"):
        load_site_config(toy_site(ixi_site, tmp_path, **{'contrasts = ["t1"]': 'contrasts = ["T1", "PD"]'}))
    with pytest.raises(ConfigError, match=r"toy\.toml: hospital: toy data is not split by hospital"):
        load_site_config(toy_site(ixi_site, tmp_path, **{"seed = 33": 'seed = 33\nhospital = "Guys"'}))


def fedsense(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_and_partition_use_the_kinds_own_writer_and_partitioner(
    monkeypatch: pytest.MonkeyPatch, ixi_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    partition = ["data", "partition", "--dataset", "toy", "--root", tmp_path / "demo" / "site-c"]
    code, _, err = fedsense(capsys, *partition, "--by", "random", "--sites", "2", "--out", tmp_path / "parts")
    assert code == 2 and "invalid choice: 'toy' (choose from 'fastmri', 'brats', 'ixi')" in err

    monkeypatch.setattr(kinds, "KINDS", dict(kinds.KINDS))
    register(TOY)
    site = toy_site(ixi_site, tmp_path)
    code, _, err = fedsense(
        capsys, "data", "demo", "--out", tmp_path / "demo", "--size", "32", "--subjects", "4", "--site-config", site
    )
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "demo" / "site-c").glob("*.nii.gz"))
    assert len(written) == 4 and all(name.endswith("-T1.nii.gz") for name in written)  # the toy's writer

    code, _, err = fedsense(capsys, *partition, "--by", "hospital", "--out", tmp_path / "parts")
    assert code == 2 and "toy can be partitioned by random, dirichlet" in err  # the toy has no natural key
    code, _, err = fedsense(capsys, *partition, "--by", "random", "--sites", "2", "--out", tmp_path / "parts")
    assert code == 0, err
    summary = json.loads((tmp_path / "parts" / "partition.json").read_text(encoding="utf-8"))
    assert [s["subjects"] for s in summary["sites"]] == [2, 2]
    for name in ("toy-random-0", "toy-random-1"):
        config = load_site_config(tmp_path / "parts" / f"{name}.toml")
        assert config.dataset == "toy" and config.contrasts == ["T1"] and config.hospital is None
        assert len(open_reader(config, cache_dir=None).subjects) == 2

    monkeypatch.undo()  # unregistered: nothing knows the toy any more
    assert "toy" not in kinds.KINDS
    code, _, err = fedsense(capsys, *partition, "--by", "random", "--sites", "2", "--out", tmp_path / "again")
    assert code == 2 and "invalid choice: 'toy'" in err
