"""Local optimisation and evaluation of a reconstruction model on one site's data.

This is the part of federated training that has nothing to do with Flower: the ClientApp, the
local-only / centralized baselines and the benchmarks all call the same two functions, so the
comparison between them is fair by construction (same loss, same optimiser, same step count).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from common.coils import rss
from common.device import autocast, batch_to
from common.fft import center_crop, ifft2c
from common.metrics import SSIMLoss, nmse, psnr, ssim
from common.nufft import SenseNufft, is_non_cartesian
from common.precision import choose_precision
from common.registry import LOSSES

logger = logging.getLogger(__name__)

Batch = dict[str, object]


class BatchSource(Protocol):
    """A re-iterable source of batches with a length (a DataLoader, or several sites' in turn)."""

    @property
    def dataset(self) -> Any: ...  # a sized torch Dataset (torch's Dataset declares no __len__)

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...


@dataclass
class TrainResult:
    """What one round of local training produced (all scalars: safe to send to the server)."""

    loss: float
    steps: int
    num_examples: int
    precision: str = "fp32"  # what the network ran at ("auto" resolved)


@dataclass
class EvalResult:
    """Volume-level metrics (fastMRI style: per volume, then the mean over volumes)."""

    metrics: dict[str, float]
    num_examples: int
    num_volumes: int
    samples: list[dict[str, np.ndarray | float | str]] = field(default_factory=list)
    precision: str = "fp32"  # what the network ran at ("auto" resolved)


def zero_filled(batch: Batch) -> torch.Tensor:
    """RSS of the inverse FFT of the masked k-space, cropped to the target: the no-learning baseline."""
    kspace = batch["masked_kspace"]
    assert isinstance(kspace, torch.Tensor)
    if is_non_cartesian(kspace):  # radial / spiral site: density-compensated adjoint (common.nufft)
        image = rss(SenseNufft.from_batch(batch["mask"], batch["sens_maps"]).coil_gridded(kspace), dim=1)  # type: ignore[arg-type]
    else:
        image = rss(ifft2c(kspace), dim=1)
    target = batch["target"]
    assert isinstance(target, torch.Tensor)
    return center_crop(image, (target.shape[-2], target.shape[-1]))


def predict(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Run the model on a batch and crop its output to the target's size."""
    out: torch.Tensor = model(batch["masked_kspace"], batch["mask"], batch["sens_maps"])
    target = batch["target"]
    assert isinstance(target, torch.Tensor)
    return center_crop(out, (target.shape[-2], target.shape[-1]))


class ReconLoss(nn.Module):
    """L1, SSIM or L1+SSIM between reconstruction and target, SSIM at the target volume's range."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"loss: unknown loss {kind!r}")
        self.kind = kind
        self.ssim = SSIMLoss()

    def forward(self, pred: torch.Tensor, target: torch.Tensor, max_value: torch.Tensor) -> torch.Tensor:
        terms = []
        if "l1" in self.kind:
            terms.append(nn.functional.l1_loss(pred, target))
        if "ssim" in self.kind:
            terms.append(self.ssim(pred.unsqueeze(1), target.unsqueeze(1), data_range=max_value.to(pred.dtype)))
        return sum(terms)  # type: ignore[return-value]


def proximal_term(model: nn.Module, global_params: list[torch.Tensor]) -> torch.Tensor:
    """FedProx's ||w − w_global||² — the squared L2 norm over all trainable parameters."""
    total = torch.zeros((), dtype=torch.float32, device=global_params[0].device if global_params else None)
    for p, g in zip((p for p in model.parameters() if p.requires_grad), global_params):
        total = total + torch.sum((p - g) ** 2)
    return total


def _cycle(loader: BatchSource, steps: int) -> Iterator[Batch]:
    """Yield exactly ``steps`` batches, restarting the loader as often as needed."""
    done = 0
    while done < steps:
        empty = True
        for batch in loader:
            empty = False
            yield batch
            done += 1
            if done >= steps:
                return
        if empty:
            raise ValueError("training loader yielded no batch (empty training split)")


def train(
    model: nn.Module,
    loader: BatchSource,
    *,
    epochs: int = 1,
    steps: int = 0,
    lr: float = 1e-3,
    loss: str = "l1",
    proximal_mu: float = 0.0,
    global_params: list[torch.Tensor] | None = None,
    batch_loss: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
    optimiser: torch.optim.Optimizer | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    compile: bool = False,
    on_step: Callable[[], None] | None = None,
    step_hook: Callable[[nn.Module], None] | None = None,
) -> TrainResult:
    """Adam on the site's training split for ``steps`` batches (or ``epochs`` passes when steps = 0).

    ``batch_loss(model, batch)`` replaces the image loss against ``target`` (a self-supervised site's
    batches have none; see :mod:`common.ssdu`); the optimiser, steps and proximal term stay the same.

    With ``proximal_mu`` > 0 the FedProx term (mu/2)·||w − w_global||² is added, against
    ``global_params`` — a copy of the global weights taken before the first step (taken here when
    not given). ``proximal_mu == 0`` runs the exact FedAvg computation (the term is not even built).
    ``optimiser`` continues an existing optimiser over ``model``'s parameters (a site's Adam state kept
    across rounds, or fine-tuning in chunks); by default each call starts a fresh Adam.
    The model is moved to ``device`` (it stays there); with ``precision="bf16"`` only its forward pass
    is autocast, the loss and the proximal term are computed in float32. ``precision="auto"`` picks fp32
    or bf16 on the first batch (:func:`common.precision.choose_precision`); the result says which ran.
    ``compile`` runs the steps through ``torch.compile`` (the weights stay ``model``'s own): it pays only
    where its compile time (about a minute per process on a CPU) is won back (docs/BENCHMARKS.md).
    ``on_step()`` is called after each optimiser step (a site's step-time metric, :mod:`client.monitoring`).
    ``step_hook(model)`` runs after each backward pass, before the step: a strategy's gradient
    correction (SCAFFOLD's control variates, :class:`common.scaffold.ControlledSteps`).
    """
    device = torch.device(device)
    model.to(device)
    if global_params is not None:
        global_params = [g.to(device) for g in global_params]
    if global_params is None and proximal_mu > 0:
        global_params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    total_steps = steps if steps > 0 else epochs * len(loader)
    criterion = ReconLoss(loss)
    if optimiser is None:
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    stepper: nn.Module = torch.compile(model) if compile else model  # type: ignore[assignment]
    running, count = 0.0, 0
    for batch in _cycle(loader, total_steps):
        batch = batch_to(batch, device)
        if precision == "auto":
            precision = choose_precision(precision, model, batch, device, "train")
        optimiser.zero_grad(set_to_none=True)
        with autocast(device, precision):  # the network's forward pass only; losses in float32
            if batch_loss is not None:
                value = batch_loss(stepper, batch).float()
            else:
                pred = predict(stepper, batch)
        if batch_loss is None:
            value = criterion(pred.float(), batch["target"], batch["max_value"])
        objective = value
        if proximal_mu > 0 and global_params is not None:
            objective = value + 0.5 * proximal_mu * proximal_term(model, global_params)
        if not torch.isfinite(objective):
            raise FloatingPointError(f"non-finite training loss at step {count + 1}")
        objective.backward()  # type: ignore[no-untyped-call]  # torch: Tensor.backward is unannotated
        if step_hook is not None:
            step_hook(model)
        optimiser.step()
        running += float(value.detach())
        count += 1
        if on_step is not None:
            on_step()
    return TrainResult(loss=running / max(count, 1), steps=count, num_examples=len(loader.dataset), precision=precision)


def _unscale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x / scale.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


@torch.no_grad()
def evaluate(
    model: nn.Module | None,
    loader: Iterable[Batch],
    *,
    loss: str = "l1",
    max_slices: int = 0,
    num_samples: int = 0,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> EvalResult:
    """PSNR / SSIM / NMSE per volume (fastMRI definitions), averaged over volumes.

    ``model=None`` evaluates the zero-filled reconstruction. Slices are un-scaled back to the
    data's own units before metrics, so a volume's ``maxval`` is the true max of its target.
    The model runs on ``device`` (bf16-autocast with ``precision="bf16"``, measured on the first batch
    with ``"auto"``); metrics are float32 on the CPU.
    """
    device = torch.device(device)
    if model is not None:
        model.to(device)
        model.eval()
    criterion = ReconLoss(loss)
    preds: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    targets: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    samples: list[dict[str, np.ndarray | float | str]] = []
    loss_sum, n_slices = 0.0, 0
    for batch in loader:
        batch = batch_to(batch, device)
        target = batch["target"]
        assert isinstance(target, torch.Tensor)
        if precision == "auto":
            precision = "fp32" if model is None else choose_precision(precision, model, batch, device, "infer")
        with autocast(device, precision):
            pred = zero_filled(batch) if model is None else predict(model, batch)
        pred = pred.float()
        loss_sum += float(criterion(pred, target, batch["max_value"])) * target.shape[0]
        scale = batch["scale"]
        assert isinstance(scale, torch.Tensor)
        pred_u, target_u = _unscale(pred, scale).cpu().numpy(), _unscale(target, scale).cpu().numpy()
        zf = _unscale(zero_filled(batch), scale).cpu().numpy() if len(samples) < num_samples else None
        for i in range(target.shape[0]):
            key = f"{batch['site'][i]}/{batch['fname'][i]}"  # type: ignore[index]
            slice_idx = int(batch["slice_idx"][i])  # type: ignore[index]
            preds[key][slice_idx] = pred_u[i]
            targets[key][slice_idx] = target_u[i]
            if zf is not None and len(samples) < num_samples:
                samples.append(
                    {
                        "fname": key,
                        "slice_idx": slice_idx,
                        "zero_filled": zf[i].astype(np.float32),
                        "recon": pred_u[i].astype(np.float32),
                        "target": target_u[i].astype(np.float32),
                        "psnr": float(psnr(target_u[i][None], pred_u[i][None])),
                        "ssim": float(ssim(target_u[i][None], pred_u[i][None])),
                    }
                )
        n_slices += target.shape[0]
        if max_slices and n_slices >= max_slices:
            break
    if n_slices == 0:
        from common.data.loaders import empty_split_error  # the data layer, loaded only for this error

        raise empty_split_error(loader)
    per_volume: dict[str, list[float]] = defaultdict(list)
    for key in preds:
        order = sorted(preds[key])
        gt = np.stack([targets[key][s] for s in order])
        pr = np.stack([preds[key][s] for s in order])
        per_volume["nmse"].append(float(nmse(gt, pr)))
        per_volume["psnr"].append(float(psnr(gt, pr)))
        per_volume["ssim"].append(float(ssim(gt, pr)))
    metrics = {k: float(np.mean(v)) for k, v in per_volume.items()}
    metrics["loss"] = loss_sum / n_slices
    for k, v in metrics.items():
        if not math.isfinite(v):
            logger.warning("evaluation metric %s is not finite (%s)", k, v)
    return EvalResult(
        metrics=metrics, num_examples=n_slices, num_volumes=len(preds), samples=samples, precision=precision
    )
