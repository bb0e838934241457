"""The site's index cache: warm starts open no file; every change that matters rebuilds it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from common.config import SiteConfig
from common.data import index_cache
from common.data.readers import FastMRIReader, NiftiReader, SliceReader, open_reader
from tests.conftest import write_small_sites


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SiteConfig]:
    from common.config import load_site_config

    paths = write_small_sites(tmp_path_factory.mktemp("cache-sites"), size=32, slices=3)
    return {p.stem: load_site_config(p) for p in paths}


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file a reader opens to index it."""
    opened: list[Path] = []
    for cls in (FastMRIReader, NiftiReader):
        original = cls._index_file

        def recording(self: SliceReader, source, _original=original):  # type: ignore[no-untyped-def]
            opened.append(source.path)
            return _original(self, source)

        monkeypatch.setattr(cls, "_index_file", recording)
    return opened


def copy_site(config: SiteConfig, tmp_path: Path) -> SiteConfig:
    root = tmp_path / "data"
    shutil.copytree(config.data_path, root)
    return config.model_copy(update={"data_path": root})


def same_index(a: SliceReader, b: SliceReader) -> bool:
    return a.examples == b.examples and a.skipped == b.skipped and a._info == b._info


@pytest.mark.parametrize("site", ["site-a", "site-b", "site-c"])
def test_a_warm_start_opens_no_file_and_restores_the_same_index(
    sites: dict[str, SiteConfig], tmp_path: Path, spy: list[Path], site: str
) -> None:
    config = copy_site(sites[site], tmp_path)
    cold = open_reader(config, cache_dir=tmp_path / "cache")
    assert spy and len(list((tmp_path / "cache").glob("*.json"))) == 1
    spy.clear()
    warm = open_reader(config, cache_dir=tmp_path / "cache")
    assert spy == [] and same_index(cold, warm) and type(warm) is type(cold)
    index = len(warm) // 2
    cold_slice, warm_slice = cold.read_slice(index), warm.read_slice(index)
    assert (cold_slice[0] == warm_slice[0]).all() and cold_slice[1].recon_size == warm_slice[1].recon_size


@pytest.mark.parametrize("change", ["added", "changed", "removed", "config", "corrupted", "foreign"])
def test_every_change_that_matters_rebuilds_the_index(
    sites: dict[str, SiteConfig], tmp_path: Path, spy: list[Path], change: str
) -> None:
    config = copy_site(sites["site-b"], tmp_path)
    cache = tmp_path / "cache"
    first = open_reader(config, cache_dir=cache)
    spy.clear()
    victim = first.examples[0].path  # a volume the index holds (not, e.g., a segmentation mask)
    if change == "added":
        subject, contrast = first.examples[0].subject, first.examples[0].contrast
        shutil.copy2(victim, config.data_path / f"{subject}9_{contrast}.nii.gz")
    elif change == "changed":
        stat = victim.stat()
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    elif change == "removed":
        victim.unlink()
    elif change == "config":
        config = config.model_copy(update={"max_slices_per_volume": 1})
    else:
        (file,) = cache.glob("*.json")
        file.write_text("{not json" if change == "corrupted" else '{"format": "other"}', encoding="utf-8")
    rebuilt = open_reader(config, cache_dir=cache)
    assert spy, "the files were indexed again"
    if change in ("corrupted", "foreign"):
        assert same_index(first, rebuilt)
    else:
        assert not same_index(first, rebuilt) or change == "changed"
    spy.clear()
    open_reader(config, cache_dir=cache)
    assert spy == [], "and the rebuilt index is cached again"


def test_no_cache_dir_means_no_cache(
    sites: dict[str, SiteConfig], tmp_path: Path, spy: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(index_cache.ENV_DIR, "off")
    assert index_cache.default_cache_dir() is None
    config = copy_site(sites["site-c"], tmp_path)
    open_reader(config)
    n = len(spy)
    open_reader(config)
    assert len(spy) == 2 * n > 0


def test_an_unwritable_cache_costs_only_the_next_start(sites: dict[str, SiteConfig], tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be", encoding="utf-8")
    config = copy_site(sites["site-c"], tmp_path)
    assert len(open_reader(config, cache_dir=blocker)) > 0
