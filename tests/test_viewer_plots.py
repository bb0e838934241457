"""``fedsense metrics plot``: real, non-blank PNGs for one run and for a comparison of runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from common.errors import FedSenseError
from server.store import RunDir
from server.viewer.plots import plot
from tests.sample_files import write_samples

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(path: Path, name: str, strategy: str, gain: float, samples: bool = True) -> RunDir:
    """Four rounds of a two-site run whose PSNR rises by ``gain`` per round."""
    run = RunDir(path)
    run.init({"name": name, "strategy": strategy, "num_rounds": 4}, resume=False)
    for round in range(1, 5):
        run.append_metrics(
            [
                {
                    "run": name,
                    "round": round,
                    "phase": phase,
                    "site": site,
                    "time": 1.7e9 + round,
                    "num_examples": 8,
                    "metrics": (
                        {"loss": 1 / (round + i)}
                        if phase == "train"
                        else {
                            "loss": 0.5 / round,
                            "psnr": 25 + gain * round + i,
                            "ssim": 0.6 + 0.05 * round,
                            "nmse": 0.1 / round,
                        }
                    ),
                }
                for phase in ("train", "evaluate")
                for i, site in enumerate(("site-a", "site-b", "__global__"))
            ]
        )
    if samples:
        yy, xx = np.mgrid[:48, :48]
        target = np.exp(-((yy - 24.0) ** 2 + (xx - 20.0) ** 2) / 150)[None].repeat(2, axis=0)
        noise = np.random.default_rng(0).normal(0, 0.05, target.shape)
        for site in ("site-a", "site-b"):
            write_samples(run, 4, site, target * 0.6 + noise, target + noise / 3, target, psnr=[31.5, 30.2], ssim=0.93)
    return run


def assert_real_png(path: Path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert float(image[..., :3].std()) > 0.02, f"{path} is (nearly) a single colour"


def test_single_run_curves_and_samples(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", "demo", "fedprox", gain=1.0)
    written = plot([run.path], tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == sorted(
        [
            "evaluate_psnr.png",
            "evaluate_ssim.png",
            "evaluate_nmse.png",
            "evaluate_loss.png",
            "train_loss.png",
            "samples_site-a.png",
            "samples_site-b.png",
        ]
    )
    for path in written:
        assert path.parent == tmp_path / "out"
        assert_real_png(path)


def test_several_runs_compare_global_curves(tmp_path: Path) -> None:
    runs = [
        make_run(tmp_path / "a", "fedavg-demo", "fedavg", gain=0.5, samples=False),
        make_run(tmp_path / "b", "fedprox-demo", "fedprox", gain=1.0, samples=False),
        make_run(tmp_path / "c", "local", "local-only", gain=0.2, samples=False),
    ]
    written = plot([r.path for r in runs], tmp_path / "out")
    assert sorted(p.name for p in written) == sorted(
        f"compare_{name}.png"
        for name in ("evaluate_psnr", "evaluate_ssim", "evaluate_nmse", "evaluate_loss", "train_loss")
    )
    for path in written:
        assert_real_png(path)


def test_run_without_metrics_is_an_error(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.init({"name": "empty"}, resume=False)
    with pytest.raises(FedSenseError, match="no metrics yet"):
        plot([run.path], tmp_path / "out")
