"""A real Flower simulation of a mixed federation (a Cartesian fastMRI site and a raw radial site), then
its model exported and applied to the radial site's own h5 files with ``fedsense reconstruct``."""

from __future__ import annotations

import math
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from client.reconstruct import Reconstructor, reconstruct_files
from common.artifact import load_artifact
from common.config import load_site_config
from common.data.demo import generate_demo
from common.metrics import psnr
from common.runconfig import RunConfig
from server import cli
from server.simulate import simulate
from server.store import GLOBAL_SITE
from tests.conftest import ROOT, write_small_sites

pytestmark = pytest.mark.slow

SIZE = 32


def radial_site(directory: Path) -> Path:
    """bench/sites/site-r.toml at SIZE^2 with few slices, its demo data written under ``directory``."""
    text = (ROOT / "bench" / "sites" / "site-r.toml").read_text(encoding="utf-8")
    text = re.sub(r"(?m)^data_path = .*$", f'data_path = "{(directory / "data" / "site-r").as_posix()}"', text)
    text = re.sub(r"(?m)^matrix = .*$", f"matrix = [{SIZE}, {SIZE}]", text)
    text = re.sub(r"(?m)^max_slices_per_volume = .*$", "max_slices_per_volume = 4", text)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "site-r.toml"
    path.write_text(text, encoding="utf-8")
    generate_demo(directory / "data", size=SIZE, subjects=3, seed=0, sites=[load_site_config(path)])
    return path


def test_cartesian_and_radial_sites_train_one_model(tmp_path: Path) -> None:
    sites = [
        *write_small_sites(tmp_path / "cartesian", names=("site-a",), size=SIZE, slices=4),
        radial_site(tmp_path / "radial"),
    ]
    run_dir = tmp_path / "run"
    store = simulate(
        RunConfig.from_flat(
            {
                "name": "mixed",
                "num-server-rounds": 1,
                "strategy": "fedavg",
                "model": "unrolled",
                "model-args": '{"num_cascades": 2, "chans": 4, "num_layers": 3, "lam": 1.0}',
                "local-steps": 2,
                "batch-size": 2,
                "learning-rate": 1e-3,
                "min-train-nodes": 2,
                "min-evaluate-nodes": 2,
                "min-available-nodes": 2,
                "sites": ",".join(map(str, sites)),
                "run-dir": str(run_dir),
                "max-eval-slices": 2,
                "num-samples": 0,
            }
        ),
        timeout=900,
    )
    assert store.read_config()["status"] == "finished"
    records = store.read_metrics()
    for phase in ("train", "evaluate"):
        assert {r["site"] for r in records if r["round"] == 1 and r["phase"] == phase} == {
            "site-a",
            "site-r",
            GLOBAL_SITE,
        }
    radial = [r for r in records if r["site"] == "site-r" and r["phase"] == "evaluate"]
    assert radial and all(math.isfinite(r["metrics"]["psnr"]) and r["metrics"]["psnr"] > 10 for r in radial)
    # One shared model: the round's checkpoint holds the same lam parameters both kinds of site trained.
    payload = torch.load(store.checkpoint_path(1), weights_only=True)
    assert any(key.endswith("dc.log_lam") for key in payload["state_dict"])

    model = tmp_path / "model"
    assert cli.main(["export", str(run_dir), "--round", "last", "--out", str(model)]) == 0
    source = sorted((tmp_path / "radial" / "data" / "site-r").glob("*.h5"))[0]
    assert (
        cli.main(
            ["reconstruct", "--model", str(model), str(source), "--out", str(tmp_path / "recon"), "--device", "cpu"]
        )
        == 0
    )
    gridding = Reconstructor(load_artifact(model), device=torch.device("cpu"), zero_filled_only=True)
    reconstruct_files(gridding, [source], tmp_path / "zf", "h5")
    with h5py.File(source, "r") as f:
        target = f["reconstruction_rss"][()]
    with h5py.File(tmp_path / "recon" / source.name, "r") as f, h5py.File(tmp_path / "zf" / source.name, "r") as g:
        recon, zero = f["reconstruction"][()], g["reconstruction"][()]
    assert recon.shape == target.shape and np.all(np.isfinite(recon))
    # One round of two steps: the model need not beat the gridding yet, but must be an image of the scan.
    assert psnr(target, recon) > 15.0 and psnr(target, zero) > 15.0
