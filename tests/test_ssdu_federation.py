"""A real Flower run of a mixed federation: one self-supervised site, two supervised.

Every reader call of every Flower process is recorded by a spy installed through ``sitecustomize``
(the ClientApps run in processes this test does not own), so the test sees whether the
self-supervised site's training ever read a reference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.runconfig import RunConfig
from server.simulate import simulate
from server.store import GLOBAL_SITE, RunDir
from server.viewer.run_view import load_run
from tests.conftest import write_small_sites

pytestmark = pytest.mark.slow

# Installed as sitecustomize in every Python process of the run: once common.data.readers is
# imported, wrap each reader's read_slice (may read the reference) and read_acquisition (never
# does), and log each call with whether it happened inside the ClientApp's train().
SPY = """
import importlib.abc, importlib.machinery, json, os, sys

LOG = os.environ["FEDSENSE_TEST_READER_SPY"]


def _in_train():
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "train" and frame.f_code.co_filename.endswith(os.path.join("client", "app.py")):
            return True
        frame = frame.f_back
    return False


def _wrap(cls, name):
    original = getattr(cls, name)

    def spy(self, index, *args, **kwargs):
        with open(LOG, "a") as f:
            f.write(json.dumps({"method": name, "root": str(self.root), "train": _in_train()}) + "\\n")
        return original(self, index, *args, **kwargs)

    setattr(cls, name, spy)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "common.data.readers":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = spec.loader
        exec_module = loader.exec_module

        def patched(module):
            exec_module(module)
            for cls in (module.FastMRIReader, module.NiftiReader):
                _wrap(cls, "read_slice")
                _wrap(cls, "read_acquisition")

        loader.exec_module = patched
        return spec


sys.meta_path.insert(0, _Finder())
"""


def test_mixed_federation_with_a_self_supervised_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sites = write_small_sites(tmp_path / "sites")
    # site-a (fastMRI h5 with stored reconstructions) has no fully sampled data to train on.
    sites[0].write_text('supervision = "self"\n' + sites[0].read_text(encoding="utf-8"), encoding="utf-8")
    spy_dir, spy_log = tmp_path / "spy", tmp_path / "reads.jsonl"
    spy_dir.mkdir()
    (spy_dir / "sitecustomize.py").write_text(SPY, encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(spy_dir), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FEDSENSE_TEST_READER_SPY", str(spy_log))
    run = RunConfig.from_flat(
        {
            "name": "ssdu-it",
            "num-server-rounds": 2,
            "strategy": "fedavg",
            "model": "unrolled",
            "model-args": '{"num_cascades": 2, "chans": 8, "num_layers": 3}',
            "local-steps": 3,
            "batch-size": 2,
            "learning-rate": 1e-3,
            "min-train-nodes": 3,
            "min-evaluate-nodes": 3,
            "min-available-nodes": 3,
            "sites": ",".join(map(str, sites)),
            "run-dir": str(tmp_path / "run"),
            "ssdu-masks": 2,
        }
    )
    store: RunDir = simulate(run, timeout=900)

    records = store.read_metrics(dedupe=True)
    site_a = [r for r in records if r["site"] == "site-a"]
    assert len(site_a) == 5 and all(r.get("supervision") == "self" for r in site_a)
    assert not any(r.get("supervision") for r in records if r["site"] in ("site-b", "site-c"))
    for r in records:
        if r["site"] == "site-a" and r["phase"] == "evaluate":
            # the held-out k-space loss, and (a simulation: stored reconstructions) the reference metrics
            assert {"ssdu-loss", "psnr", "ssim", "nmse"} <= set(r["metrics"])
        elif r["site"] in ("site-b", "site-c"):
            assert "ssdu-loss" not in r["metrics"]
    evals = {r["round"]: r["metrics"]["ssdu-loss"] for r in site_a if r["phase"] == "evaluate"}
    assert evals[2] < evals[0]
    glob = [r for r in records if r["site"] == GLOBAL_SITE and r["phase"] == "train"]
    assert [sorted(r["sites"]) for r in glob] == [["site-a", "site-b", "site-c"]] * 2
    assert load_run(store.path).self_supervised_sites() == {"site-a"}

    reads = [json.loads(line) for line in spy_log.read_text().splitlines()]
    root_a = str((tmp_path / "sites" / "data" / "site-a").resolve())
    train_a = [r["method"] for r in reads if r["root"] == root_a and r["train"]]
    assert train_a and set(train_a) == {"read_acquisition"}
    # The spy does catch reference reads: site-a's evaluation makes them, and the supervised sites' training.
    assert any(r["method"] == "read_slice" for r in reads if r["root"] == root_a and not r["train"])
    assert any(r["method"] == "read_slice" for r in reads if r["root"] != root_a and r["train"])
