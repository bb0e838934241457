"""Non-Cartesian sites' data: trajectories, config validation, acquisition physics, raw HDF5 files."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from client.check import check_site
from common.config import parse_site_config
from common.data.dataset import build_site_datasets
from common.data.demo import generate_demo
from common.data.noncartesian import scanner_trajectory, simulate_noncartesian
from common.errors import ConfigError, DataError
from common.metrics import psnr
from common.training import zero_filled
from common.trajectories import golden_angle_radial, radial_acceleration, variable_density_spiral


def _site(name: str, dataset: str, data_path: Path, **scanner: object) -> object:
    base = {
        "field_strength_t": 3.0,
        "coils": 4,
        "matrix": [32, 32],
        "noise_std": 0.01,
        "trajectory": "radial-ga",
        "acceleration": 2,
    }
    return parse_site_config(
        {
            "name": name,
            "dataset": dataset,
            "data_path": str(data_path),
            "seed": 3,
            "contrasts": ["AXT2"] if dataset == "fastmri" else ["T1"],
            "max_slices_per_volume": 3,
            "split": {"seed": 0, "val_fraction": 0.34, "test_fraction": 0.0},
            "scanner": {**base, **scanner},
        },
        f"{name}.toml",
    )


def test_golden_angle_spokes_and_spiral_geometry():
    coords = golden_angle_radial(spokes=3, readout_samples=8, matrix=8, oversampling=1.0).numpy()
    spokes = coords.reshape(3, 8, 2)
    angles = np.degrees(np.arctan2(spokes[:, -1, 0], spokes[:, -1, 1]))
    assert np.allclose(np.diff(angles) % 180.0, 111.246, atol=1e-3)  # golden angle between spokes
    assert np.allclose(spokes[:, 4], 0.0)  # every spoke samples the centre
    assert radial_acceleration(64, 25) == pytest.approx(64 * math.pi / 2 / 25)
    spiral = variable_density_spiral(interleaves=4, readout_samples=50, matrix=32, oversampling=2.0).numpy()
    radius = np.hypot(spiral[:, 0], spiral[:, 1]).reshape(4, 50)
    assert np.allclose(radius[:, 0], 0.0) and np.allclose(radius[:, -1], 0.5)
    assert np.all(np.diff(radius, axis=1) > 0)


@pytest.mark.parametrize(
    ("scanner", "message"),
    [
        ({"trajectory": "radial-ga", "acceleration": 4, "spokes": 10}, "spokes = 10 gives R = "),
        ({"trajectory": "radial-ga", "acceleration": 4, "mask": "random"}, "mask applies to Cartesian sites only"),
        ({"trajectory": "spiral", "acceleration": 4, "spokes": 10}, "spokes applies to radial-ga"),
        (
            {"trajectory": "cartesian", "mask": "random", "center_fraction": 0.1, "acceleration": 4, "spokes": 3},
            "spokes applies to non-Cartesian",
        ),
        ({"trajectory": "cartesian", "acceleration": 4}, "mask is required for a Cartesian site"),
        ({"trajectory": "radial-ga", "acceleration": 4, "readout_samples": 4000}, "beyond the matrix edge"),
    ],
)
def test_bad_trajectory_settings_name_the_field(tmp_path: Path, scanner: dict, message: str):
    with pytest.raises(ConfigError, match=f"^r.toml: scanner: .*{message}"):
        _site("r", "ixi", tmp_path, **{"noise_std": 0.0, **scanner})


def test_acquisition_noise_is_on_the_samples_and_maps_are_normalised(tmp_path: Path):
    config = _site("r", "ixi", tmp_path)
    image = np.zeros((40, 40), dtype=np.float32)
    image[10:30, 12:28] = 1.0
    clean = simulate_noncartesian(image, config.scanner.model_copy(update={"noise_std": 0.0}), seed=7)
    noisy = simulate_noncartesian(image, config.scanner.model_copy(update={"noise_std": 0.05}), seed=7)
    trajectory = scanner_trajectory(config.scanner)
    assert clean["samples"].shape == (4, trajectory.shape[0])
    noise = noisy["samples"] - clean["samples"]
    assert np.sqrt(np.mean(np.abs(noise) ** 2)) == pytest.approx(0.05, rel=0.1)
    maps = noisy["sens_maps"]
    assert maps.shape == (4, 32, 32)
    energy = np.sum(np.abs(maps) ** 2, axis=0)
    assert np.allclose(energy[clean["target"] > 0.5], 1.0, atol=1e-4)


def test_raw_radial_h5_site_trains_from_its_own_files(tmp_path: Path):
    config = _site("raw", "fastmri", tmp_path / "raw")
    generate_demo(tmp_path, size=32, subjects=3, seed=0, sites=[config])
    files = sorted((tmp_path / "raw").glob("*.h5"))
    with h5py.File(files[0], "r") as f:
        assert f["kspace"].ndim == 3 and f["trajectory"].shape[-1] == 2 and "reconstruction_rss" in f
        assert b"goldenangle" in f["ismrmrd_header"][()]
    datasets = build_site_datasets(config)
    batch = next(iter(DataLoader(datasets["train"], batch_size=2)))
    assert batch["masked_kspace"].ndim == 3 and batch["mask"].shape[-1] == 3
    baseline = zero_filled(batch)
    assert baseline.shape == batch["target"].shape
    score = psnr(batch["target"][0].numpy(), baseline[0].numpy(), float(batch["max_value"][0]))
    assert score > 18.0

    toml = tmp_path / "raw.toml"
    toml.write_text(
        f'name = "raw"\ndataset = "fastmri"\ndata_path = "{(tmp_path / "raw").as_posix()}"\ncontrasts = ["AXT2"]\n'
        "max_slices_per_volume = 3\n[split]\nval_fraction = 0.34\ntest_fraction = 0.0\n[scanner]\n"
        'field_strength_t = 3.0\ncoils = 4\nmatrix = [32, 32]\ntrajectory = "radial-ga"\nacceleration = 2\n',
        encoding="utf-8",
    )
    report = check_site(toml, tmp_path / "manifest.json")
    assert report.ready, report.problems
    assert report.trajectory is not None and report.trajectory.startswith("radial-ga: 25 spokes x 64 samples")
    assert set(report.samples_per_coil) == {25 * 64} and set(report.coils) == {4}

    with h5py.File(files[0], "a") as f:
        del f["trajectory"]
        f.create_dataset("trajectory", data=np.zeros((1, 5, 2), dtype=np.float32))
    with pytest.raises(DataError, match=f"^{files[0]}: 'trajectory' is"):
        build_site_datasets(config.model_copy(update={"data_path": tmp_path / "raw"}))
    assert torch.isfinite(batch["masked_kspace"]).all()


def test_simulated_radial_site_from_magnitude_images(tmp_path: Path):
    """An IXI (magnitude) site with a radial scanner: samples measured by the NUFFT, then reconstructable."""
    config = _site("img", "ixi", tmp_path / "img", acceleration=4)
    generate_demo(tmp_path, size=32, subjects=3, seed=0, sites=[config])
    sample = build_site_datasets(config)["train"][0]
    spokes = 13  # round(32 pi / 2 / 4)
    assert sample["masked_kspace"].shape == (4, spokes * 64) and sample["mask"].shape == (spokes * 64, 3)
    batch = {k: (v[None] if isinstance(v, torch.Tensor) else v) for k, v in sample.items()}
    baseline = zero_filled(batch)
    assert psnr(sample["target"].numpy(), baseline[0].numpy(), sample["max_value"]) > 15.0


def test_self_supervision_is_refused_on_a_radial_site(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^r.toml: <root>: .*SSDU"):
        parse_site_config(
            {
                "name": "r",
                "dataset": "ixi",
                "data_path": str(tmp_path),
                "supervision": "self",
                "scanner": {"field_strength_t": 3.0, "coils": 4, "trajectory": "radial-ga", "acceleration": 4},
            },
            "r.toml",
        )
