"""Dataset kinds live in one registry (common.data.kinds): a kind registered there is a kind everywhere.

A toy kind (the IXI demo files, T1 only, no hospital split) is registered and then validated by the site
config, found and signature-checked by the preflight, indexed by ``open_reader`` and turned into the
site's datasets, with no other module edited; before it is registered, the config names the field.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_site_config
from common.data import kinds
from common.data.dataset import build_site_datasets
from common.data.kinds import DatasetKind, fixed_contrasts, has_nifti_magic, register
from common.data.readers import IXIReader, find_ixi_files, open_reader
from common.errors import ConfigError
from common.preflight import check_sites
from tests.conftest import write_small_sites

TOY = DatasetKind(
    name="toy",
    description="IXI's T1 volumes, one hospital-less site",
    files="toy NIfTI",
    find=lambda config: find_ixi_files(config.data_path, ["T1"]),
    is_file=has_nifti_magic,
    reader=lambda _config, min_foreground: (IXIReader, {"min_foreground": min_foreground}),
    raw_kspace=False,
    contrasts=fixed_contrasts("toy", ("T1",), str.upper),
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
