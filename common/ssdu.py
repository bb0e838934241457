"""Self-supervision via data undersampling (SSDU, Yaman et al. 2020) for sites without fully sampled data.

A self-supervised site only has its acquired k-space Ω. Each training step splits Ω of every slice into two
disjoint sets, Ω = Λ ∪ Θ: the network sees only Λ (its data-consistency layers enforce Λ, not Ω) and the
loss compares its k-space prediction with the held-back measurements Θ. Θ is a fraction ``rho`` of Ω drawn
with a Gaussian variable density around the k-space centre (SSDU's "Gaussian selection"), never from the
calibration region, which stays in Λ so that coil maps estimated from the network's input stay good. At
inference the model sees all of Ω.

Only models that predict k-space can be trained this way: the unrolled network (its complex image, expanded
through the coil maps and Fourier transformed) and VarNet (its multi-coil k-space). The end-to-end U-Net is
refused: it outputs a magnitude image (the phase is discarded) and ignores the coil maps, so it has no
prediction of the complex multi-coil measurements Θ to compare; a k-space loss on |x| would penalise the
image phase it cannot represent.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from common.coils import sense_forward
from common.errors import ConfigError
from common.registry import MODEL_ENTRIES
from common.training import Batch, EvalResult, ReconLoss, evaluate, predict

logger = logging.getLogger(__name__)

#: SSDU's Gaussian selection: std of the selection density as a fraction of each k-space axis (std_scale 4).
GAUSSIAN_STD_FRACTION = 0.25
#: Random streams, so the training and the validation splits of a slice never coincide.
_TRAIN_STREAM, _VALIDATION_STREAM = 0, 1
#: Keeps the normalised loss finite for a slice whose Θ measurements are all zero.
_EPS = 1e-12


@dataclass(frozen=True)
class Split:
    """One partition of the acquired locations Ω (H, W) bool: Λ (network input) and Θ (loss)."""

    lam: np.ndarray
    theta: np.ndarray


_NO_KSPACE = (
    "the end-to-end U-Net outputs a magnitude image and ignores the coil maps, so it has no prediction "
    "of the held-back k-space to compare; use one of "
    + ", ".join(name for name, entry in MODEL_ENTRIES.items() if entry.supports_ssdu)
)


def check_model(model: str, source: str = "run config") -> None:
    """Refuse a model that cannot be trained self-supervised, before any data is touched."""
    if model not in MODEL_ENTRIES or not MODEL_ENTRIES[model].supports_ssdu:
        raise ConfigError(
            f'{source}: model: {model!r} cannot train at a self-supervised site (supervision = "self"): ' + _NO_KSPACE
        )


def _central_run(profile: np.ndarray) -> slice:
    """The contiguous sampled run through the centre index of a 1-D profile (empty if the centre is not sampled)."""
    centre = profile.size // 2
    if not profile[centre]:
        return slice(centre, centre)
    left, right = centre, centre + 1
    while left > 0 and profile[left - 1]:
        left -= 1
    while right < profile.size and profile[right]:
        right += 1
    return slice(left, right)


def calibration_region(omega: np.ndarray) -> np.ndarray:
    """The fully sampled centre of Ω: the rectangle of the sampled runs through the centre row and column.

    This is the region :func:`common.coils.estimate_maps_from_acs` estimates coil maps from (all rows ×
    the ACS columns of a Cartesian mask, the calibration box of a 2-D one).
    """
    omega = np.asarray(omega, dtype=bool)
    height, width = omega.shape
    region = np.zeros_like(omega)
    region[_central_run(omega[:, width // 2]), _central_run(omega[height // 2])] = True
    calibration: np.ndarray = region & omega
    return calibration


def gaussian_weights(shape: tuple[int, int]) -> np.ndarray:
    """Selection density of Θ: a 2-D Gaussian around the k-space centre with std ``H/4`` and ``W/4``."""
    height, width = shape
    ky = (np.arange(height) - height // 2) / (GAUSSIAN_STD_FRACTION * height)
    kx = (np.arange(width) - width // 2) / (GAUSSIAN_STD_FRACTION * width)
    return np.exp(-0.5 * (ky[:, None] ** 2 + kx[None, :] ** 2))


def split_omega(omega: np.ndarray, rho: float, rng: np.random.Generator) -> Split:
    """Draw Θ: ``round(rho·|Ω|)`` locations of Ω outside the calibration region, Gaussian-weighted; Λ = Ω \\ Θ.

    Raises ``ConfigError`` when Ω outside the calibration region is too small to hold that many.
    """
    if not 0.0 < rho < 1.0:
        raise ConfigError(f"run config: ssdu-rho: must lie in (0, 1), got {rho}")
    omega = np.asarray(omega, dtype=bool)
    count = round(rho * int(omega.sum()))
    candidates = np.flatnonzero(omega & ~calibration_region(omega))
    if count > candidates.size:
        raise ConfigError(
            f"run config: ssdu-rho: {rho:g} asks for {count} of {int(omega.sum())} acquired k-space samples, but only "
            f"{candidates.size} lie outside the calibration region; lower ssdu-rho or the centre fraction"
        )
    weights = gaussian_weights(omega.shape).ravel()[candidates]
    chosen = rng.choice(candidates, size=count, replace=False, p=weights / weights.sum())
    theta = np.zeros_like(omega)
    theta.flat[chosen] = True
    return Split(lam=omega & ~theta, theta=theta)


def slice_key(fname: str, slice_idx: int) -> int:
    """A slice's identity as an int that is stable across processes (unlike ``hash()``)."""
    return zlib.crc32(f"{fname}:{int(slice_idx)}".encode())


def validation_split(omega: np.ndarray, rho: float, seed: int, fname: str, slice_idx: int) -> Split:
    """The fixed validation split of a slice: the same every round, so the held-out loss is comparable."""
    rng = np.random.default_rng([seed, _VALIDATION_STREAM, slice_key(fname, slice_idx)])
    return split_omega(omega, rho, rng)


def ssdu_loss(pred_kspace: Tensor, kspace: Tensor, theta: Tensor) -> Tensor:
    """SSDU's normalised ℓ1-ℓ2 loss on Θ, per slice, averaged over the batch.

    ``||y_Θ − ŷ_Θ||₂ / ||y_Θ||₂ + ||y_Θ − ŷ_Θ||₁ / ||y_Θ||₁`` over all coils, with real and imaginary parts as
    separate entries (as SSDU's implementation does). ``pred_kspace`` and ``kspace`` are (B,C,H,W) complex,
    ``theta`` (B,1,H,W) in {0, 1}.
    """
    diff = torch.view_as_real((pred_kspace - kspace) * theta).flatten(1)
    ref = torch.view_as_real(kspace * theta).flatten(1)
    l2: Tensor = torch.linalg.vector_norm(diff, dim=1) / torch.linalg.vector_norm(ref, dim=1).clamp_min(_EPS)
    l1 = diff.abs().sum(dim=1) / ref.abs().sum(dim=1).clamp_min(_EPS)
    return (l2 + l1).mean()


def predict_kspace(model: nn.Module, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
    """The model's multi-coil k-space estimate (B,C,H,W) from input ``masked_kspace`` sampled on ``mask``.

    VarNet estimates k-space itself; the unrolled network's complex image goes through the coil maps and
    the FFT (predicted image → coil images → k-space).
    """
    reconstruct_kspace, reconstruct = getattr(model, "reconstruct_kspace", None), getattr(model, "reconstruct", None)
    if reconstruct_kspace is not None:
        kspace: Tensor = reconstruct_kspace(masked_kspace, mask, sens_maps)
        return kspace
    if reconstruct is not None:
        return sense_forward(reconstruct(masked_kspace, mask, sens_maps), sens_maps)
    raise ConfigError(f"run config: model: {type(model).__name__} cannot train self-supervised: " + _NO_KSPACE)


def _masks(splits: list[Split], like: Tensor) -> tuple[Tensor, Tensor]:
    lam = torch.from_numpy(np.stack([s.lam for s in splits])[:, None].astype(np.float32))
    theta = torch.from_numpy(np.stack([s.theta for s in splits])[:, None].astype(np.float32))
    return lam.to(like.device), theta.to(like.device)


def _tensor(batch: Batch, key: str) -> Tensor:
    value = batch[key]
    assert isinstance(value, Tensor), key
    return value


class SSDUTrainLoss:
    """The training loss of a self-supervised site: a fresh Λ/Θ split per slice at every step.

    Splits are seeded by (run seed, ``epoch`` — the server round —, the step's draw number, the slice and
    the mask number), so they change every step and round yet a run is reproducible. With ``num_masks`` = K
    > 1 (multi-mask SSDU) every slice is split K times within the step and the loss averages over the splits.
    """

    def __init__(self, rho: float, num_masks: int = 1, seed: int = 0, epoch: int = 0) -> None:
        if num_masks < 1:
            raise ValueError(f"ssdu-masks must be >= 1, got {num_masks}")
        self.rho, self.num_masks, self.seed, self.epoch = rho, num_masks, seed, epoch
        self.draws = 0

    def splits(self, batch: Batch) -> list[Split]:
        """This step's K splits of every slice of ``batch``, slice-major (slice 0's K splits first)."""
        omega = _tensor(batch, "mask").numpy()[:, 0] > 0
        fnames, slices = batch["fname"], batch["slice_idx"]
        out = []
        for i in range(omega.shape[0]):
            key = slice_key(fnames[i], int(slices[i]))  # type: ignore[index]
            for k in range(self.num_masks):
                rng = np.random.default_rng([self.seed, _TRAIN_STREAM, self.epoch, self.draws, key, k])
                out.append(split_omega(omega[i], self.rho, rng))
        return out

    def __call__(self, model: nn.Module, batch: Batch) -> Tensor:
        splits = self.splits(batch)
        self.draws += 1
        kspace = _tensor(batch, "masked_kspace").repeat_interleave(self.num_masks, dim=0)
        maps = _tensor(batch, "sens_maps").repeat_interleave(self.num_masks, dim=0)
        lam, theta = _masks(splits, kspace)
        return ssdu_loss(predict_kspace(model, kspace * lam, lam, maps), kspace, theta)


class SiteLoss:
    """One training loss for any batch: SSDU for a self-supervised site's batches, which carry no
    reference (``target``), the supervised image loss otherwise — so a pooled (centralized) loader may mix
    both kinds of site."""

    def __init__(self, loss: str, rho: float, num_masks: int = 1, seed: int = 0, epoch: int = 0) -> None:
        self.supervised = ReconLoss(loss)
        self.self_supervised = SSDUTrainLoss(rho, num_masks, seed, epoch)

    def __call__(self, model: nn.Module, batch: Batch) -> Tensor:
        if "target" not in batch:
            return self.self_supervised(model, batch)
        loss: Tensor = self.supervised(predict(model, batch), _tensor(batch, "target"), _tensor(batch, "max_value"))
        return loss


@torch.no_grad()
def heldout_loss(
    model: nn.Module | None, loader: Iterable[Batch], *, rho: float, seed: int, max_slices: int = 0
) -> tuple[float, int, int]:
    """Mean SSDU loss on each slice's fixed validation Θ, the model seeing only the validation Λ.

    Needs no reference, so a self-supervised site can validate (and the server select rounds) on it.
    ``model=None`` scores the zero-filled input, which predicts nothing on Θ (loss 2).
    Returns (mean over slices, number of slices, number of volumes).
    """
    if model is not None:
        model.eval()
    total, count, volumes = 0.0, 0, set()
    for batch in loader:
        omega = _tensor(batch, "mask").numpy()[:, 0] > 0
        fnames, slices = batch["fname"], batch["slice_idx"]
        splits = [
            validation_split(omega[i], rho, seed, fnames[i], int(slices[i]))  # type: ignore[index]
            for i in range(omega.shape[0])
        ]
        kspace = _tensor(batch, "masked_kspace")
        lam, theta = _masks(splits, kspace)
        if model is None:
            pred = kspace * lam
        else:
            pred = predict_kspace(model, kspace * lam, lam, _tensor(batch, "sens_maps"))
        for i in range(kspace.shape[0]):
            total += float(ssdu_loss(pred[i : i + 1], kspace[i : i + 1], theta[i : i + 1]))
            volumes.add(f"{batch['site'][i]}/{fnames[i]}")  # type: ignore[index]
        count += kspace.shape[0]
        if max_slices and count >= max_slices:
            break
    if count == 0:
        from common.data.loaders import empty_split_error  # the data layer, loaded only for this error

        raise empty_split_error(loader)
    if not math.isfinite(total):
        logger.warning("held-out SSDU loss is not finite (%s)", total)
    return total / count, count, len(volumes)


def evaluate_self_supervised(
    model: nn.Module | None,
    loader: Iterable[Batch],
    *,
    rho: float,
    seed: int,
    reference: bool,
    loss: str = "l1",
    max_slices: int = 0,
    num_samples: int = 0,
) -> EvalResult:
    """A self-supervised site's validation: ``ssdu-loss`` always; PSNR/SSIM/NMSE (model on all of Ω)
    only with ``reference`` — a simulation, whose files hold the image the site does not train on."""
    value, count, volumes = heldout_loss(model, loader, rho=rho, seed=seed, max_slices=max_slices)
    if not reference:
        return EvalResult(metrics={"ssdu-loss": value}, num_examples=count, num_volumes=volumes)
    result = evaluate(model, loader, loss=loss, max_slices=max_slices, num_samples=num_samples)
    return EvalResult({**result.metrics, "ssdu-loss": value}, result.num_examples, result.num_volumes, result.samples)
