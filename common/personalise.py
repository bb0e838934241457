"""Personalisation: parameters that stay at a site, and fine-tuning the global model at a site.

Sites differ (scanner, coils, contrast, anatomy), so one global model is rarely the best model for
each of them. Two remedies from the federated-MRI literature, both without Flower here:

- *local layers* (FedPer, LG-FedAvg, FedBN; FedMRI's site-specific decoders): parameters whose
  names match ``local-layers`` patterns (fnmatch, e.g. ``unet.up_conv.2.*``) are trained at the
  site and never sent; only the rest is shared and aggregated. :func:`split_state` draws that line.
- *fine-tuning* (:func:`fine_tune`): after federation, each site trains the final model on its own
  training split, validating every few steps and keeping the best model by validation.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from common.data.loaders import make_loader
from common.errors import ConfigError
from common.training import Batch, BatchSource, evaluate, train

if TYPE_CHECKING:
    from common.data.dataset import SiteDataset
    from common.runconfig import RunConfig

logger = logging.getLogger(__name__)

# A site's fine-tuned model: ``<site-state-dir>/<site>/finetuned.pt`` (written by the site, read by anyone
# who judges it, e.g. ``fedsense verdict``).
FINETUNED_FILE = "finetuned.pt"

T = TypeVar("T")

#: Validation metrics where lower is better (all others: higher is better).
LOWER_IS_BETTER = frozenset({"nmse", "loss"})


def is_local(name: str, patterns: Sequence[str]) -> bool:
    """Whether parameter ``name`` matches one of the ``local-layers`` patterns (case-sensitive fnmatch)."""
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def split_state(
    state: Mapping[str, T], patterns: Sequence[str], source: str = "run config: local-layers"
) -> tuple[dict[str, T], dict[str, T]]:
    """``(shared, local)``: the entries of ``state`` that travel, and those that stay at the site.

    A pattern that matches no entry is a ``ConfigError`` (a typo would otherwise silently share
    everything), and so is a set of patterns that leaves nothing to share.
    """
    unmatched = [p for p in patterns if not any(fnmatchcase(name, p) for name in state)]
    if unmatched:
        examples = ", ".join(list(state)[:3])
        raise ConfigError(
            f"{source}: pattern(s) {unmatched} match no parameter of the model (names look like {examples})"
        )
    shared = {k: v for k, v in state.items() if not is_local(k, patterns)}
    local = {k: v for k, v in state.items() if is_local(k, patterns)}
    if patterns and not shared:
        raise ConfigError(
            f"{source}: the patterns {list(patterns)} keep every parameter local; nothing is left to share"
        )
    return shared, local


def personal_layers(model: nn.Module) -> tuple[str, ...]:
    """The ``local-layers`` patterns of the FedPer/FedBN-like lever for ``model``: the parts that map the
    shared features to one site's images, kept per site because that is where sites differ most
    (intensity scale, noise level, coil set-up) while the feature extractors gain from every site's data.

    - unrolled: each cascade's last convolution (its map back to the image) and its DC weight(s);
    - unet: the final 1x1 convolution plus every normalisation layer with parameters (FedBN; this
      U-Net's InstanceNorms carry none).

    Other models raise :class:`ConfigError`: their split has not been chosen.
    """
    from common.models import model_name  # here: common.models does not need personalisation

    name = model_name(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if name == "unrolled":
        last = [n for n in convs if n.startswith("cascades.0.")][-1]
        patterns = [f"cascades.*.{last.removeprefix('cascades.0.')}.*", "cascades.*.dc.*"]
    elif name == "unet":
        norms = [
            n
            for n, m in model.named_modules()
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
            and any(True for _ in m.parameters(recurse=False))
        ]
        patterns = [f"{convs[-1]}.*", *(f"{n}.*" for n in norms)]
    else:
        raise ConfigError(f"local-layers: no personal layers chosen for model {name!r} (unrolled and unet have them)")
    params = [n for n, _ in model.named_parameters()]
    # A model without a learnable DC weight (hard DC) has nothing under dc: drop patterns that match nothing.
    return tuple(p for p in patterns if any(fnmatchcase(n, p) for n in params))


@dataclass
class FineTuneResult:
    """The best model a site's fine-tuning found, by validation."""

    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float]  # validation metrics of the kept model
    start_metrics: dict[str, float]  # validation metrics of the model before fine-tuning
    best_step: int  # 0: fine-tuning never beat the starting model
    steps: int  # optimisation steps actually run (fewer than asked when stopped early)
    num_examples: int  # validation slices
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, selection metric)


def stopped_by_patience(steps: int, best_step: int, patience: int, eval_every: int) -> bool:
    """Whether a fine-tuning that ran ``steps`` steps and kept ``best_step`` ended on its patience (converged)
    rather than on its step budget (then the model may still have been improving)."""
    return patience > 0 and steps - best_step >= patience * eval_every


def fine_tune_site(model: nn.Module, datasets: Mapping[str, SiteDataset], run: RunConfig) -> FineTuneResult:
    """:func:`fine_tune` on a site's ``train`` / ``val`` splits with the run config's fine-tuning keys: what a
    site runs after the last round (and what a benchmark re-runs with other keys, ``run.model_copy(update=...)``)."""
    # A seed past every round's loader seed: fine-tuning draws its own shuffles and augmentations.
    train_loader = make_loader(
        datasets["train"], run.batch_size, shuffle=True, seed=run.seed + run.num_server_rounds + 1, augment=run.augment
    )
    val_loader = make_loader(datasets["val"], run.batch_size, shuffle=False, seed=run.seed)
    return fine_tune(
        model,
        train_loader,
        val_loader,
        steps=run.fine_tune_steps,
        eval_every=run.fine_tune_eval_every,
        patience=run.fine_tune_patience,
        warmup=run.fine_tune_warmup,
        lr=run.learning_rate,
        loss=run.loss,
        max_eval_slices=run.max_eval_slices,
    )


def _better(metric: str, value: float, best: float) -> bool:
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def fine_tune(
    model: nn.Module,
    train_loader: BatchSource,
    val_loader: Iterable[Batch],
    *,
    steps: int,
    eval_every: int,
    patience: int = 0,
    lr: float = 1e-3,
    loss: str = "l1",
    metric: str = "psnr",
    max_eval_slices: int = 0,
    warmup: int = 0,
) -> FineTuneResult:
    """Adam on the training split for up to ``steps`` steps, validating every ``eval_every`` steps.

    The model before any step is the first candidate, so the result is never worse on validation
    than the model it started from. ``patience`` > 0 stops after that many validations in a row
    without improvement. ``warmup`` > 0 ramps the learning rate linearly from ``lr / warmup`` to ``lr``
    over the first ``warmup`` steps: a fresh Adam's first steps are full-size whatever the gradient, and
    on a converged model they cost validation PSNR that takes longer to win back than a short patience
    waits (measured in docs/BENCHMARKS.md). ``model`` ends holding the kept (best) weights.
    """
    if steps < 1 or eval_every < 1 or warmup < 0:
        raise ValueError("fine_tune needs steps >= 1, eval_every >= 1 and warmup >= 0")
    if metric not in {"psnr", "ssim", "nmse", "loss"}:
        raise ValueError(f"fine_tune: unknown selection metric {metric!r}")
    start = evaluate(model, val_loader, loss=loss, max_slices=max_eval_slices)
    best_value, best_step = start.metrics[metric], 0
    best_state, best_metrics = copy.deepcopy(model.state_dict()), dict(start.metrics)
    history = [(0, best_value)]
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    ramp = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    # LambdaLR sets the first step's rate now; ``ramp.step`` after each optimiser step sets the next one's.
    done, stale = 0, 0
    while done < steps:
        chunk = min(eval_every, steps - done)
        train(model, train_loader, steps=chunk, lr=lr, loss=loss, optimiser=optimiser, on_step=ramp.step)
        done += chunk
        result = evaluate(model, val_loader, loss=loss, max_slices=max_eval_slices)
        value = result.metrics[metric]
        history.append((done, value))
        if _better(metric, value, best_value):
            best_value, best_step, stale = value, done, 0
            best_state, best_metrics = copy.deepcopy(model.state_dict()), dict(result.metrics)
        else:
            stale += 1
            if patience and stale >= patience:
                logger.info("fine-tuning stopped after %d steps: no better %s in %d validations", done, metric, stale)
                break
    model.load_state_dict(best_state)
    return FineTuneResult(
        state_dict=best_state,
        metrics=best_metrics,
        start_metrics=dict(start.metrics),
        best_step=best_step,
        steps=done,
        num_examples=start.num_examples,
        history=history,
    )
