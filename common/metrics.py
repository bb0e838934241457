"""Reconstruction metrics with fastMRI's ``evaluate.py`` definitions, plus a torch SSIM loss.

Scores are only comparable with published fastMRI numbers if they are computed the same way:
PSNR and NMSE over the whole volume, SSIM as the mean of per-slice SSIMs, and the data range
taken from the ground-truth *volume* maximum unless given. SSIM is implemented here (rather than
calling scikit-image) so the tests can check it against scikit-image as an independent reference;
all numpy metrics compute in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

SSIM_WIN_SIZE = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_volumes(name: str, gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (gt, pred) pair and return float64 (S, H, W) volumes; a 2-D pair is one slice."""
    gt_arr, pred_arr = np.asarray(gt), np.asarray(pred)
    if gt_arr.shape != pred_arr.shape:
        raise ValueError(f"{name}: shape mismatch: gt {gt_arr.shape} vs pred {pred_arr.shape}")
    if gt_arr.ndim not in (2, 3):
        raise ValueError(
            f"{name}: expected a volume (S, H, W) or a single slice (H, W), got a {gt_arr.ndim}-D "
            f"array of shape {gt_arr.shape}"
        )
    if gt_arr.size == 0:
        raise ValueError(f"{name}: empty input of shape {gt_arr.shape}")
    if np.iscomplexobj(gt_arr) or np.iscomplexobj(pred_arr):
        raise ValueError(f"{name}: expected real (magnitude) images, got complex input")
    if gt_arr.ndim == 2:
        gt_arr, pred_arr = gt_arr[None], pred_arr[None]
    return gt_arr.astype(np.float64), pred_arr.astype(np.float64)


def _data_range(name: str, gt: np.ndarray, maxval: float | None) -> float:
    value = float(gt.max()) if maxval is None else float(maxval)
    if not value > 0:
        raise ValueError(f"{name}: maxval (data range) must be > 0, got {value} (an all-zero target?)")
    return value


def mse(gt: np.ndarray, pred: np.ndarray) -> float:
    """Mean squared error over every voxel."""
    gt_v, pred_v = _as_volumes("mse", gt, pred)
    return float(np.mean((gt_v - pred_v) ** 2))


def nmse(gt: np.ndarray, pred: np.ndarray) -> float:
    """Normalised MSE, ||gt - pred||^2 / ||gt||^2 over the whole volume."""
    gt_v, pred_v = _as_volumes("nmse", gt, pred)
    energy = float(np.sum(gt_v**2))
    if energy == 0:
        raise ValueError("nmse: undefined for an all-zero ground truth")
    return float(np.sum((gt_v - pred_v) ** 2) / energy)


def psnr(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """PSNR in dB over the whole volume, 10 log10(maxval^2 / mse), maxval = gt.max() by default.

    Identical inputs give ``math.inf`` (returned directly, without a divide-by-zero warning),
    matching scikit-image's value; callers averaging PSNRs should decide how to treat it.
    """
    gt_v, pred_v = _as_volumes("psnr", gt, pred)
    data_range = _data_range("psnr", gt_v, maxval)
    err = float(np.mean((gt_v - pred_v) ** 2))
    if err == 0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / err)


def _box_mean(x: np.ndarray, win: int) -> np.ndarray:
    """Mean over every full win x win window of the last two axes.

    Only 'valid' positions are produced: they are exactly the pixels skimage keeps after
    cropping the (win - 1) / 2 border, so no padding mode can leak in.
    """
    rows = sliding_window_view(x, win, axis=-1).mean(axis=-1)
    means: np.ndarray = sliding_window_view(rows, win, axis=-2).mean(axis=-1)
    return means


def _ssim_slices(gt: np.ndarray, pred: np.ndarray, data_range: float) -> np.ndarray:
    """Per-slice mean SSIM of (S, H, W) float64 volumes, scikit-image's uniform-window SSIM."""
    win = SSIM_WIN_SIZE
    num = win * win
    cov_norm = num / (num - 1)  # sample covariance, as use_sample_covariance=True
    ux, uy = _box_mean(gt, win), _box_mean(pred, win)
    vx = cov_norm * (_box_mean(gt * gt, win) - ux * ux)
    vy = cov_norm * (_box_mean(pred * pred, win) - uy * uy)
    vxy = cov_norm * (_box_mean(gt * pred, win) - ux * uy)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    per_slice: np.ndarray = s_map.mean(axis=(-2, -1))
    return per_slice


def ssim(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """Mean over slices of the 7x7 uniform-window SSIM, data range = gt volume max by default."""
    gt_v, pred_v = _as_volumes("ssim", gt, pred)
    if min(gt_v.shape[-2:]) < SSIM_WIN_SIZE:
        raise ValueError(
            f"ssim: slices of shape {gt_v.shape[-2:]} are smaller than the {SSIM_WIN_SIZE}x{SSIM_WIN_SIZE} window"
        )
    data_range = _data_range("ssim", gt_v, maxval)
    return float(_ssim_slices(gt_v, pred_v, data_range).mean())


METRIC_FUNCS: dict[str, Callable[..., float]] = {
    "mse": mse,
    "nmse": nmse,
    "psnr": psnr,
    "ssim": ssim,
}


class SSIMLoss(nn.Module):
    """1 - mean SSIM, differentiable; fastMRI's formulation so training optimises the reported SSIM.

    Valid convolution with a uniform window (no padding) averages over exactly the positions the
    numpy ``ssim`` keeps, so ``1 - loss`` on one slice equals ``ssim`` on it.
    """

    def __init__(self, win_size: int = SSIM_WIN_SIZE, k1: float = SSIM_K1, k2: float = SSIM_K2) -> None:
        super().__init__()
        if win_size < 2:
            raise ValueError(f"SSIMLoss: win_size must be >= 2, got {win_size}")
        self.win_size = win_size
        self.k1, self.k2 = k1, k2
        num = win_size**2
        self.cov_norm = num / (num - 1)

    def forward(self, X: torch.Tensor, Y: torch.Tensor, data_range: torch.Tensor | float) -> torch.Tensor:
        """X, Y: (B, 1, H, W) or (B, H, W); data_range: (B,) per-image range (e.g. target max)."""
        if X.shape != Y.shape:
            raise ValueError(f"SSIMLoss: shape mismatch: X {tuple(X.shape)} vs Y {tuple(Y.shape)}")
        if X.dim() == 3:
            X, Y = X.unsqueeze(1), Y.unsqueeze(1)
        if X.dim() != 4 or X.shape[1] != 1:
            raise ValueError(f"SSIMLoss: expected (B, 1, H, W) or (B, H, W), got {tuple(X.shape)}")
        if min(X.shape[-2:]) < self.win_size:
            raise ValueError(f"SSIMLoss: images {tuple(X.shape[-2:])} are smaller than the {self.win_size}-window")
        batch = X.shape[0]
        data_range = torch.as_tensor(data_range, dtype=X.dtype, device=X.device)
        if data_range.dim() == 0:
            data_range = data_range.expand(batch)
        if data_range.shape != (batch,):
            raise ValueError(f"SSIMLoss: data_range must have shape ({batch},), got {tuple(data_range.shape)}")
        data_range = data_range[:, None, None, None]
        # built in the input dtype: a float32 1/49 cast up would cost float64 inputs ~1e-7 accuracy
        kernel = (1, 1, self.win_size, self.win_size)
        w = torch.full(kernel, 1.0 / self.win_size**2, dtype=X.dtype, device=X.device)
        c1 = (self.k1 * data_range) ** 2
        c2 = (self.k2 * data_range) ** 2
        ux, uy = F.conv2d(X, w), F.conv2d(Y, w)
        vx = self.cov_norm * (F.conv2d(X * X, w) - ux * ux)
        vy = self.cov_norm * (F.conv2d(Y * Y, w) - uy * uy)
        vxy = self.cov_norm * (F.conv2d(X * Y, w) - ux * uy)
        s_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        return 1 - s_map.mean()
