"""Shared fixtures: small demo sites (real file formats, MNI anatomy) for integration tests."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import load_site_config
from common.data.demo import generate_demo
from server.store import GLOBAL_SITE, RunDir

ROOT = Path(__file__).resolve().parent.parent


def global_values(store: RunDir, metric: str, phase: str = "evaluate") -> dict[int, float]:
    """``round -> __global__`` value of ``metric`` in a run's metrics (newest record per round): the tests'
    own reading of metrics.jsonl, to check what the product derived from it (best round, early stop)."""
    return {
        r["round"]: r["metrics"][metric]
        for r in store.read_metrics(dedupe=True)
        if r["site"] == GLOBAL_SITE and r["phase"] == phase and r["metrics"].get(metric) is not None
    }


SITE_NAMES = ("site-a", "site-b", "site-c")


def write_small_sites(
    directory: Path, names: tuple[str, ...] = SITE_NAMES, size: int = 64, slices: int = 6
) -> list[Path]:
    """Copies of ``deploy/sites/*.toml`` at ``size``², few slices, with data under ``directory/data``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        text = (ROOT / "deploy" / "sites" / f"{name}.toml").read_text(encoding="utf-8")
        text = re.sub(r"(?m)^data_path = .*$", f'data_path = "{(directory / "data" / name).as_posix()}"', text)
        text = re.sub(r"(?m)^matrix = .*$", f"matrix = [{size}, {size}]", text)
        text = re.sub(r"(?m)^max_slices_per_volume = .*$", f"max_slices_per_volume = {slices}", text)
        path = directory / f"{name}.toml"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    generate_demo(directory / "data", size=size, subjects=3, seed=0, sites=[load_site_config(p) for p in paths])
    return paths


@pytest.fixture(scope="session", autouse=True)
def _private_index_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Site index and precision caches of this test session (and the Flower processes it starts) in private
    directories; ``precision = auto`` pinned to fp32."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDSENSE_INDEX_CACHE", str(tmp_path_factory.mktemp("index-cache")))
    # precision = auto (the default) would time fp32 against bf16 and pick by the machine's load: tests
    # pin it to fp32 so their numbers are exact; tests of the choice itself unset the pin.
    mp.setenv("FEDSENSE_PRECISION_CACHE", str(tmp_path_factory.mktemp("precision-cache")))
    mp.setenv("FEDSENSE_AUTO_PRECISION", "fp32")
    yield
    mp.undo()


@pytest.fixture(scope="session")
def small_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three heterogeneous demo sites (fastMRI h5 16-coil, BraTS 8-coil, IXI 4-coil) at 64²."""
    return write_small_sites(tmp_path_factory.mktemp("sites"))
