"""Load: sixteen sites in one simulated federation, two of them with bad data, and nothing lost.

The sixteen site configs cycle over the three small demo sites' data (each its own name and
seed). Two failures are injected: site-14 holds a corrupt extra file and ``skip_bad_files =
true``, so it must still contribute; site-15's only file is corrupt, so its ClientApp fails on
every message and the federation must go on without it and say so. The run also uses the robust
``fedmedian`` aggregator, which exercises it end to end through the run config.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from common.config import load_site_config
from common.data.dataset import SiteDataset
from common.runconfig import RunConfig
from server.simulate import simulate
from server.store import GLOBAL_SITE

pytestmark = pytest.mark.slow

NUM_SITES = 16
ROUNDS = 2


def with_data_path(toml: str, path: Path) -> str:
    """``toml`` with its ``data_path`` pointing at ``path``."""
    return re.sub(r"(?m)^data_path = .*$", lambda _: f"data_path = {json.dumps(str(path))}", toml)


def write_sites(directory: Path, demo_sites: list[Path]) -> list[Path]:
    """``NUM_SITES`` site TOMLs over the demo sites' data; the last two get the injected failures."""
    directory.mkdir(parents=True)
    texts = [p.read_text(encoding="utf-8") for p in demo_sites]
    ixi = next(t for t in texts if 'dataset = "ixi"' in t)
    ixi_data = Path(re.search(r'(?m)^data_path = "(.*)"$', ixi).group(1))
    # site-14: the IXI data plus one corrupt volume, skipped by configuration.
    shutil.copytree(ixi_data, directory / "site-14-data")
    (directory / "site-14-data" / "IXI999-Guys-0001-T1.nii.gz").write_bytes(b"\x1f\x8b" + bytes(500))
    # site-15: nothing but a truncated volume. Its NIfTI header is intact, so `simulate`'s preflight
    # (which refuses a site with no file of its kind at all) lets it through and it fails at run time.
    (directory / "site-15-data").mkdir()
    volume = gzip.decompress(next(ixi_data.rglob("*.nii.gz")).read_bytes())
    (directory / "site-15-data" / "IXI998-Guys-0001-T1.nii.gz").write_bytes(gzip.compress(volume[:400]))
    injected = {
        14: "skip_bad_files = true\n" + with_data_path(ixi, directory / "site-14-data"),
        15: with_data_path(ixi, directory / "site-15-data"),
    }
    paths = []
    for i in range(NUM_SITES):
        text = injected.get(i, texts[i % len(texts)])
        text = re.sub(r"(?m)^name = .*$", f'name = "site-{i:02d}"', text)
        text = re.sub(r"(?m)^seed = .*$", f"seed = {100 + i}", text, count=1)
        paths.append(directory / f"site-{i:02d}.toml")
        paths[-1].write_text(text, encoding="utf-8")
    return paths


def test_sixteen_sites_two_with_bad_data_nothing_lost(small_sites: list[Path], tmp_path: Path) -> None:
    sites = write_sites(tmp_path / "sites", small_sites)
    skipped = SiteDataset(load_site_config(sites[14]), "train").skipped
    assert [p.name for p, _ in skipped] == ["IXI999-Guys-0001-T1.nii.gz"]  # site-14's bad file is real
    run = RunConfig.from_flat(
        {
            "name": "load",
            "num-server-rounds": ROUNDS,
            "strategy": "fedmedian",
            "model-args": '{"chans": 4, "num_pool_layers": 2}',
            "local-steps": 1,
            "batch-size": 1,
            "max-eval-slices": 1,
            "min-train-nodes": NUM_SITES - 1,
            "min-evaluate-nodes": NUM_SITES - 1,
            "min-available-nodes": NUM_SITES,
            "round-timeout": 600.0,
            "sites": ",".join(map(str, sites)),
            "run-dir": str(tmp_path / "run"),
            "resume": False,
        }
    )
    started = time.monotonic()
    store = simulate(run, timeout=900)
    seconds = time.monotonic() - started

    assert store.read_config()["status"] == "finished" and store.read_config()["strategy"] == "fedmedian"
    healthy = {f"site-{i:02d}" for i in range(NUM_SITES - 1)}
    records = store.read_metrics()
    phases = [(0, "evaluate")] + [(rnd, phase) for rnd in range(1, ROUNDS + 1) for phase in ("train", "evaluate")]
    for rnd, phase in phases:
        rows = [r for r in records if (r["round"], r["phase"]) == (rnd, phase)]
        assert sorted(r["site"] for r in rows) == sorted(healthy | {GLOBAL_SITE}), (rnd, phase)
        summary = next(r for r in rows if r["site"] == GLOBAL_SITE)
        # Every one of the sixteen sites is accounted for: a record, or a rejection with its reason.
        assert set(summary["sites"]) == healthy and len(summary["rejected"]) == 1, (rnd, phase)
        # The server learns that site-15 failed and how, but not its paths or code (they stay in its log).
        assert summary["rejected"][0]["reason"] == "error reply: DataError at the site (details in the site's log)"
    assert store.latest_checkpoint()[0] == ROUNDS
    print(
        f"\nload: {NUM_SITES} sites x {ROUNDS} rounds (fedmedian), failures injected 2 (one bad file, one "
        f"unreadable site), survived: {len(healthy)} sites every round, 1 rejected every phase; {seconds:.0f} s"
    )
