"""Patient-level DP-SGD: the privacy unit is a subject (every slice and contrast of one patient).

Sample-level DP-SGD (:mod:`common.dp`) bounds what one *slice* can change; a patient contributes
many slices, so the ε a data-protection officer needs is per patient. Here each step:

1. samples subjects by Poisson sampling, each independently with rate q = ``subjects_per_step`` /
   subjects (the sampling the RDP analysis assumes; the batch size varies);
2. computes every slice's gradient of the sampled subjects (Opacus' per-sample gradients) and sums
   them per subject;
3. clips each subject's summed gradient to L2 norm ≤ C (``max_grad_norm``), so adding or removing one
   patient changes the step's gradient sum by at most C;
4. adds Gaussian noise N(0, σ²C²) to the sum and divides by the expected number of subjects q·N.

ε per patient is Opacus' RDP accountant over (σ, q, steps), kept in the same :class:`PrivacyLedger`.
No Flower here: the ClientApp and the benchmarks call the same functions.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import default_collate

from common.dp import prepared_for_opacus
from common.training import ReconLoss, TrainResult, predict

if TYPE_CHECKING:  # common.data imports the readers (h5py, nibabel); only its type is needed here
    from common.data.dataset import Sample


def subject_groups(dataset: torch.utils.data.Dataset[Any]) -> list[list[int]]:
    """The dataset's indices grouped by subject (a ``SiteDataset``: its reader's subject of each slice)."""
    reader, indices = getattr(dataset, "reader", None), getattr(dataset, "indices", None)
    if reader is None or indices is None:
        raise ValueError("patient-level DP needs a site dataset that knows each slice's subject")
    groups: dict[str, list[int]] = {}
    for i, example_index in enumerate(indices):
        groups.setdefault(str(reader.examples[example_index].subject), []).append(i)
    return list(groups.values())


def subject_gradients(
    model: GradSampleModule,
    dataset: torch.utils.data.Dataset[Sample],
    groups: Sequence[Sequence[int]],
    criterion: ReconLoss,
    chunk: int,
) -> tuple[list[list[torch.Tensor]], float]:
    """Each subject's gradient: the sum of its slices' loss gradients (unclipped); and the mean slice loss.

    Slices run through the model ``chunk`` at a time, whatever subject they belong to.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [[torch.zeros_like(p) for p in params] for _ in groups]
    owners = [(g, i) for g, members in enumerate(groups) for i in members]
    total, count = 0.0, 0
    for start in range(0, len(owners), chunk):
        part = owners[start : start + chunk]
        batch = default_collate([dataset[i] for _, i in part])
        model.zero_grad(set_to_none=True)
        pred = predict(model, batch)
        # The criterion is a mean over the chunk; times its size, each slice's gradient is that of its own loss.
        value = criterion(pred, batch["target"], batch["max_value"]) * len(part)
        if not torch.isfinite(value):
            raise FloatingPointError("non-finite training loss")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            value.backward()
        owner = torch.tensor([g for g, _ in part])
        for k, p in enumerate(params):
            per_slice = p.grad_sample
            for g in owner.unique().tolist():  # type: ignore[no-untyped-call]  # torch: Tensor.unique is unannotated
                sums[g][k] += per_slice[owner == g].sum(dim=0)
        total += float(value.detach())
        count += len(part)
    model.zero_grad(set_to_none=True)
    return sums, total / max(count, 1)


def clip_subjects(grads: list[list[torch.Tensor]], max_norm: float) -> tuple[list[torch.Tensor] | None, list[float]]:
    """The sum over subjects of each subject's gradient clipped to L2 norm ≤ ``max_norm``; and their norms."""
    norms = [
        float(torch.sqrt(sum((torch.sum(g.double() ** 2) for g in subject), torch.zeros((), dtype=torch.float64))))
        for subject in grads
    ]
    if not grads:
        return None, norms
    summed = [torch.zeros_like(g) for g in grads[0]]
    for subject, norm in zip(grads, norms):
        factor = min(1.0, max_norm / (norm + 1e-12))
        for acc, g in zip(summed, subject):
            acc += factor * g
    return summed, norms


def train_patient_private(
    model: nn.Module,
    dataset: torch.utils.data.Dataset[Sample],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    subjects_per_step: float,
    steps: int,
    lr: float = 1e-3,
    loss: str = "l1",
    proximal_mu: float = 0.0,
    chunk: int = 4,
    seed: int = 0,
) -> tuple[TrainResult, float]:
    """``steps`` patient-level DP-SGD steps (Adam on the noised, per-subject clipped sum); returns the sampling rate.

    FedProx's term depends only on the weights, so its gradient is added after clipping and noise.
    The model's own parameters are updated in place.
    """
    groups = subject_groups(dataset)
    if not groups:
        raise ValueError("patient-level DP-SGD needs a non-empty training split")
    rate = min(1.0, subjects_per_step / len(groups))
    expected = rate * len(groups)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    gsm = GradSampleModule(prepared_for_opacus(model), batch_first=True, loss_reduction="sum")
    optimiser = torch.optim.Adam(params, lr=lr)
    criterion = ReconLoss(loss)
    gsm.train()
    losses = []
    try:
        for _ in range(steps):
            chosen = (torch.rand(len(groups), generator=generator) < rate).nonzero().flatten().tolist()
            grads, mean_loss = subject_gradients(gsm, dataset, [groups[s] for s in chosen], criterion, chunk)
            summed, _ = clip_subjects(grads, max_grad_norm)
            for k, p in enumerate(params):
                noise = torch.normal(0.0, noise_multiplier * max_grad_norm, p.shape, generator=generator).to(p.device)
                total = noise if summed is None else summed[k] + noise
                p.grad = total / expected
                if proximal_mu > 0:
                    p.grad += proximal_mu * (p.detach() - anchor[k])
            optimiser.step()
            if chosen:
                losses.append(mean_loss)
    finally:
        gsm._close()  # removes Opacus' hooks: the model goes back to the caller unwrapped
    num_slices = sum(len(g) for g in groups)
    return TrainResult(loss=sum(losses) / max(len(losses), 1), steps=steps, num_examples=num_slices), rate
