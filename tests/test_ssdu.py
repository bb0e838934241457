"""SSDU: the Λ/Θ split, its loss against independent numpy, and the reference-free data path."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import load_site_config
from common.data.dataset import SiteDataset
from common.data.demo import generate_demo
from common.data.readers import open_reader
from common.data.selfsup import AcquiredDataset, ReferencedDataset, build_selfsup_datasets
from common.errors import ConfigError
from common.masks import make_mask
from common.models import build_model
from common.runconfig import RunConfig
from common.ssdu import (
    SSDUTrainLoss,
    calibration_region,
    check_model,
    heldout_loss,
    predict_kspace,
    split_omega,
    ssdu_loss,
)
from common.training import train
from server.baseline import Baseline

ROOT = Path(__file__).resolve().parent.parent

MASKS = [("equispaced", 4.0, 0.08), ("random", 4.0, 0.08), ("gaussian2d", 4.0, 0.08), ("poisson", 6.0, 0.08)]


def _np_fft2c(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def _np_ssdu_loss(pred: np.ndarray, y: np.ndarray, theta: np.ndarray) -> float:
    """SSDU's ||yΘ−ŷΘ||₂/||yΘ||₂ + ||yΘ−ŷΘ||₁/||yΘ||₁ on real and imaginary parts, one slice."""
    sel = np.broadcast_to(theta.astype(bool), y.shape)
    d = np.concatenate([(y - pred)[sel].real, (y - pred)[sel].imag]).astype(np.float64)
    r = np.concatenate([y[sel].real, y[sel].imag]).astype(np.float64)
    return float(np.sqrt((d**2).sum()) / np.sqrt((r**2).sum()) + np.abs(d).sum() / np.abs(r).sum())


@pytest.mark.parametrize(("pattern", "accel", "cf"), MASKS)
@pytest.mark.parametrize("rho", [0.2, 0.4])
def test_split_partitions_omega_and_keeps_the_calibration_region(
    pattern: str, accel: float, cf: float, rho: float
) -> None:
    omega = make_mask(pattern, (64, 80), accel, cf, seed=3).mask > 0
    for seed in range(5):
        split = split_omega(omega, rho, np.random.default_rng(seed))
        assert not np.any(split.lam & split.theta)
        assert np.array_equal(split.lam | split.theta, omega)
        assert np.all(split.lam[calibration_region(omega)])
        assert abs(split.theta.sum() / omega.sum() - rho) <= 1.0 / omega.sum()


def test_calibration_region_of_a_cartesian_mask_is_every_row_of_the_acs_columns() -> None:
    result = make_mask("random", (48, 64), 4.0, 0.125, seed=1)
    region = calibration_region(result.mask > 0)
    nlf = result.num_low_frequencies  # 8 ACS columns around W // 2, as fastMRI places them
    expected = np.zeros((48, 64), dtype=bool)
    expected[:, (64 - nlf + 1) // 2 : (64 - nlf + 1) // 2 + nlf] = True
    # A random line right next to the ACS would make the run wider; this seed has none there.
    assert np.array_equal(region, expected)


def test_theta_is_drawn_with_a_density_that_falls_off_from_the_centre() -> None:
    omega = make_mask("gaussian2d", (64, 64), 2.0, 0.08, seed=0).mask > 0
    centre, edge = np.zeros_like(omega), np.zeros_like(omega)
    radius = np.hypot(*np.meshgrid(np.arange(64) - 32, np.arange(64) - 32, indexing="ij"))
    centre[(radius > 6) & (radius < 14)] = True
    edge[radius > 26] = True
    hits = np.zeros(omega.shape)
    for seed in range(40):
        hits += split_omega(omega, 0.4, np.random.default_rng(seed)).theta
    rate = lambda region: hits[region & omega].mean() / 40  # noqa: E731
    assert rate(centre) > 2 * rate(edge)


def test_too_large_rho_is_refused_with_the_reason() -> None:
    omega = make_mask("equispaced", (32, 32), 2.0, 0.4, seed=0).mask > 0
    with pytest.raises(ConfigError, match=r"run config: ssdu-rho: .*calibration region"):
        split_omega(omega, 0.9, np.random.default_rng(0))


def test_loss_equals_an_independent_numpy_computation() -> None:
    rng = np.random.default_rng(0)
    shape = (3, 4, 16, 12)
    y = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    pred = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    theta = (rng.random((3, 1, 16, 12)) < 0.3).astype(np.float32)
    got = float(ssdu_loss(torch.from_numpy(pred), torch.from_numpy(y), torch.from_numpy(theta)))
    expected = np.mean([_np_ssdu_loss(pred[i], y[i], theta[i]) for i in range(3)])
    assert got == pytest.approx(expected, rel=1e-5)


def _batch(coils: int = 4, size: int = 32, n: int = 2) -> dict[str, object]:
    rng = np.random.default_rng(1)
    omega = np.stack([make_mask("equispaced", (size, size), 4.0, 0.08, seed=i).mask for i in range(n)])[:, None]
    maps = rng.standard_normal((n, coils, size, size)) + 1j * rng.standard_normal((n, coils, size, size))
    maps /= np.sqrt((np.abs(maps) ** 2).sum(axis=1, keepdims=True))
    image = rng.standard_normal((n, size, size)) + 1j * rng.standard_normal((n, size, size))
    kspace = _np_fft2c(maps * image[:, None]) * omega
    return {
        "masked_kspace": torch.from_numpy(kspace.astype(np.complex64)),
        "mask": torch.from_numpy(omega.astype(np.float32)),
        "sens_maps": torch.from_numpy(maps.astype(np.complex64)),
        "fname": [f"f{i}.h5" for i in range(n)],
        "slice_idx": torch.arange(n),
    }


@pytest.mark.parametrize("num_masks", [1, 3])
def test_training_loss_goes_through_the_coil_maps_on_theta(num_masks: int) -> None:
    torch.manual_seed(0)
    model = build_model("unrolled", num_cascades=1, chans=4, num_layers=2)
    batch = _batch()
    loss = SSDUTrainLoss(0.4, num_masks, seed=7, epoch=2)
    splits = loss.splits(batch)  # what the call below draws: same seed, same draw number
    with torch.no_grad():
        got = float(loss(model, batch))
    y = batch["masked_kspace"].numpy()  # type: ignore[union-attr]
    maps = batch["sens_maps"].numpy()  # type: ignore[union-attr]
    values = []
    for j, split in enumerate(splits):
        i = j // num_masks
        lam = torch.from_numpy(split.lam[None, None].astype(np.float32))
        with torch.no_grad():  # the network itself is torch; the forward model to Θ is numpy
            image = model.reconstruct(torch.from_numpy(y[i : i + 1]) * lam, lam, torch.from_numpy(maps[i : i + 1]))[
                0
            ].numpy()
        values.append(_np_ssdu_loss(_np_fft2c(maps[i] * image), y[i], split.theta[None]))
    assert got == pytest.approx(np.mean(values), rel=1e-4)
    assert loss.draws == 1


def test_splits_are_seeded_and_redrawn_every_step_and_epoch() -> None:
    batch = _batch()
    first = SSDUTrainLoss(0.4, seed=1, epoch=1)
    a = first.splits(batch)
    first.draws += 1
    b = first.splits(batch)
    again = SSDUTrainLoss(0.4, seed=1, epoch=1).splits(batch)
    other_epoch = SSDUTrainLoss(0.4, seed=1, epoch=2).splits(batch)
    assert all(np.array_equal(x.theta, y.theta) for x, y in zip(a, again))
    assert not np.array_equal(a[0].theta, b[0].theta)
    assert not np.array_equal(a[0].theta, other_epoch[0].theta)
    assert not np.array_equal(a[0].theta, a[1].theta)  # per slice


def test_varnet_is_trained_on_its_own_kspace_estimate() -> None:
    torch.manual_seed(0)
    model = build_model("varnet", num_cascades=1, chans=4, num_pool_layers=1, sens_chans=2, sens_pool_layers=1)
    batch = _batch()
    kspace = predict_kspace(model, batch["masked_kspace"], batch["mask"], batch["sens_maps"])  # type: ignore[arg-type]
    assert torch.allclose(
        model(batch["masked_kspace"], batch["mask"], batch["sens_maps"]),
        torch.linalg.vector_norm(
            torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(kspace, dim=(-2, -1)), norm="ortho"), dim=(-2, -1)),
            dim=1,
        ),
        atol=1e-5,
    )


def test_the_end_to_end_unet_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="run config: model: 'unet' cannot train at a self-supervised site"):
        check_model("unet")
    check_model("unrolled")
    check_model("varnet")
    batch = _batch()
    with pytest.raises(ConfigError, match="magnitude image"):
        predict_kspace(
            build_model("unet", chans=4, num_pool_layers=1),
            batch["masked_kspace"],  # type: ignore[arg-type]
            batch["mask"],
            batch["sens_maps"],
        )  # type: ignore[arg-type]


def test_zero_filled_input_scores_two_on_the_heldout_loss() -> None:
    """It predicts zero on Θ: both normalised terms are exactly 1."""
    value, slices, volumes = heldout_loss(None, [{**_batch(), "site": ["s", "s"]}], rho=0.4, seed=0)
    assert value == pytest.approx(2.0) and slices == 2 and volumes == 2


# --------------------------------------------------------------------------- data path


@pytest.fixture(scope="module")
def selfsup_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fastMRI-style demo site at 32², declared self-supervised."""
    directory = tmp_path_factory.mktemp("ssdu-site")
    text = (ROOT / "deploy" / "sites" / "site-a.toml").read_text(encoding="utf-8")
    text = re.sub(r"(?m)^data_path = .*$", f'data_path = "{(directory / "data").as_posix()}"', text)
    text = re.sub(r"(?m)^matrix = .*$", "matrix = [32, 32]", text)
    text = re.sub(r"(?m)^max_slices_per_volume = .*$", "max_slices_per_volume = 3", text)
    path = directory / "site.toml"
    path.write_text('supervision = "self"\n' + text, encoding="utf-8")
    generate_demo(directory / "data", size=32, subjects=3, seed=0, sites=[load_site_config(path)])
    return path


class ReaderSpy:
    """Counts every reader call, with what it was asked to read."""

    def __init__(self, reader: object) -> None:
        self.calls: list[str] = []
        for name in ("read_slice", "read_acquisition"):
            original = getattr(reader, name)

            def spy(index: int, _name: str = name, _original: object = original) -> object:
                self.calls.append(_name)
                return _original(index)  # type: ignore[operator]

            setattr(reader, name, spy)


def test_training_a_self_supervised_site_never_reads_the_reference(selfsup_site: Path) -> None:
    config = load_site_config(selfsup_site)
    assert config.supervision == "self"
    reader = open_reader(config)
    spy = ReaderSpy(reader)
    dataset = AcquiredDataset(config, "train", reader)
    assert "target" not in dataset[0] and "max_value" not in dataset[0]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True)
    model = build_model("unrolled", num_cascades=1, chans=4, num_layers=2)
    result = train(model, loader, steps=3, lr=1e-3, batch_loss=SSDUTrainLoss(0.4, 2))
    assert result.steps == 3 and np.isfinite(result.loss)
    assert spy.calls and set(spy.calls) == {"read_acquisition"}
    # The spy does see reference reads: the validation split of the same site makes them.
    ReferencedDataset(config, "val", reader)[0]
    assert spy.calls[-1] == "read_slice"


def test_the_acquisition_matches_the_supervised_sample_and_the_reference_is_only_in_val(selfsup_site: Path) -> None:
    config = load_site_config(selfsup_site)
    datasets = build_selfsup_datasets(config)
    assert isinstance(datasets["train"], AcquiredDataset) and not isinstance(datasets["train"], ReferencedDataset)
    val = datasets["val"]
    assert isinstance(val, ReferencedDataset) and val.has_reference
    supervised = SiteDataset(config.model_copy(update={"supervision": "full"}), "val")[0]
    sample = val[0]
    for key in ("masked_kspace", "mask", "sens_maps", "target"):
        assert torch.allclose(sample[key], supervised[key]), key
    assert sample["scale"] == pytest.approx(supervised["scale"])
    assert sample["max_value"] == pytest.approx(supervised["max_value"])
    with pytest.raises(ValueError, match="never carries a reference"):
        ReferencedDataset(config, "train")


def test_supervision_is_validated_with_the_field_named(tmp_path: Path) -> None:
    text = (ROOT / "deploy" / "sites" / "site-a.toml").read_text(encoding="utf-8")
    path = tmp_path / "bad.toml"
    path.write_text('supervision = "none"\n' + text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.toml: supervision: must be 'full' or 'self'"):
        load_site_config(path)
    assert load_site_config(ROOT / "deploy" / "sites" / "site-a.toml").supervision == "full"


def test_a_baseline_refuses_the_unet_at_a_self_supervised_site_naming_it(selfsup_site: Path) -> None:
    run = RunConfig.from_flat({"model": "unet", "sites": str(selfsup_site), "local-steps": 1})
    with pytest.raises(ConfigError, match=rf"baseline \(site {re.escape(str(selfsup_site))}\): model: 'unet'"):
        Baseline("local", run)
    Baseline("zero-filled", run)  # no training: any model name is fine
