"""Sample-level differential privacy (DP-SGD with Opacus) for a site's local training.

A site that trains with DP-SGD clips every slice's gradient to ``max_grad_norm`` and adds Gaussian
noise of ``noise_multiplier · max_grad_norm`` to each step's summed gradient, so the weights it sends
are (ε, δ)-DP with respect to any single training slice. The site's ledger of DP steps — noise,
sampling rate and count per round — is the state of Opacus' RDP accountant; it is kept at the site
(never sent) and turned into ε at the run's δ after every round.

Accounting assumption (as Opacus' ``poisson_sampling=False``): the sampling rate is
``batch_size / training slices``; FedSense's loader shuffles and takes fixed-size batches, which the
RDP analysis of Poisson sampling approximates.

No Flower here: the ClientApp and the benchmarks call the same functions.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.grad_sample import register_grad_sampler
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from common.atomic import atomic_write_bytes
from common.dc import DataConsistency, GradientDC
from common.errors import ConfigError
from common.registry import MODEL_ENTRIES
from common.training import BatchSource, ReconLoss, TrainResult, _cycle, predict

#: Opacus' per-sample gradient function of a layer: (layer, its inputs, the gradient of its output) ->
#: each parameter's per-sample gradients.
GradSampler = Callable[[nn.Module, list[torch.Tensor], torch.Tensor], dict[nn.Parameter, torch.Tensor]]
#: Opacus' ``register_grad_sampler`` with its type (opacus ships none): registers the decorated function for
#: the given layer classes and returns it unchanged.
_register_grad_sampler: Callable[[Sequence[type[nn.Module]]], Callable[[GradSampler], GradSampler]] = (
    register_grad_sampler
)


@_register_grad_sampler([DataConsistency, GradientDC])
def _multi_input_grad_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-slice gradients of the DC layers' scalar weights (lam, eta) by ``torch.func``.

    Opacus' generic functorch path passes a layer only its first input; a DC layer also needs the
    measured k-space, mask and coil maps. The output is complex: the real loss's gradient pairs
    with it as Re(conj(backprop) · output), which reduces to output · backprop for real tensors.
    """
    params = {name: p for name, p in layer.named_parameters() if p.requires_grad}
    # A shallow copy without Opacus' hooks: calling the hooked layer again would re-enter them.
    bare = copy.copy(layer)
    bare._parameters = dict(layer._parameters)
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
        setattr(bare, hooks, OrderedDict())

    def surrogate(
        values: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor
    ) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(bare, values, tuple(x.unsqueeze(0) for x in inputs))
        grad_out = grad_out.unsqueeze(0)
        if out.is_complex():
            return (out.real * grad_out.real + out.imag * grad_out.imag).sum()
        return (out * grad_out).sum()

    detached = {k: v.detach() for k, v in params.items()}
    per_sample = torch.func.vmap(torch.func.grad(surrogate), in_dims=(None, 0, 0))(
        detached, tuple(activations), backprops
    )
    return {p: per_sample[name] for name, p in params.items()}


def check_model(name: str, model: nn.Module, source: str = "run config") -> None:
    """Refuse a model DP-SGD cannot train: one Opacus does not support or that mixes slices in a batch.

    BatchNorm mixes the slices of a batch, so one slice's gradient depends on the others and
    per-sample clipping no longer bounds its influence; ModuleValidator names such layers.
    """
    if name in MODEL_ENTRIES and not MODEL_ENTRIES[name].supports_dp:
        raise ConfigError(f"{source}: model: {name!r} cannot be trained with DP-SGD: {MODEL_ENTRIES[name].dp_refusal}")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"{source}: model: {name!r} cannot be trained with DP-SGD: {errors[0]}")


def prepared_for_opacus(model: nn.Module) -> nn.Module:
    """The same model (same values) in the form Opacus' per-sample gradients need.

    Opacus' hooks forbid in-place edits of a layer's output, so ``inplace`` activations are turned off; its
    convolution per-sample gradients come out wrong on channels_last activations (tests/test_dp.py caught
    it), so layers that switch to channels_last for speed (``channels_last`` attribute) keep NCHW.
    """
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False  # type: ignore[assignment]
        if getattr(module, "channels_last", False) is True:
            module.channels_last = False  # type: ignore[assignment]
    return model


@dataclass
class PrivacyLedger:
    """The DP-SGD steps a site has taken: Opacus' RDP accountant history, one entry per round.

    Each entry is ``(noise_multiplier, sample_rate, steps)``; ε follows from the whole history.
    """

    history: list[tuple[float, float, int]] = field(default_factory=list)

    def accountant(self) -> RDPAccountant:
        """An Opacus RDP accountant holding this ledger's steps.

        Rounds with the same noise and sampling rate are merged (RDP is additive in the steps), so ε
        costs one RDP evaluation per distinct setting, not one per round.
        """
        steps: dict[tuple[float, float], int] = {}
        for sigma, q, n in self.history:
            steps[(sigma, q)] = steps.get((sigma, q), 0) + n
        acc = RDPAccountant()
        acc.history = [(sigma, q, n) for (sigma, q), n in steps.items()]
        return acc

    def epsilon(self, delta: float) -> float:
        """ε spent at ``delta`` (0 before the first DP step)."""
        return float(self.accountant().get_epsilon(delta)) if self.history else 0.0

    def with_round(self, noise_multiplier: float, sample_rate: float, steps: int) -> PrivacyLedger:
        """The ledger after one more round of ``steps`` DP steps."""
        return PrivacyLedger(self.history + [(noise_multiplier, sample_rate, steps)])

    def to_json(self) -> str:
        return json.dumps({"history": [list(h) for h in self.history]})

    @classmethod
    def from_json(cls, text: str, source: str = "privacy ledger") -> PrivacyLedger:
        try:
            data = json.loads(text)
            history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{source}: history: not a privacy ledger ({exc})") from exc
        return cls(history)

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        """The ledger in ``path``; an empty one when the file does not exist yet."""
        return cls.from_json(path.read_text(encoding="utf-8"), str(path)) if path.exists() else cls()

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self.to_json().encode("utf-8"))


def train_private(
    model: nn.Module,
    loader: BatchSource,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    epochs: int = 1,
    steps: int = 0,
    lr: float = 1e-3,
    loss: str = "l1",
    proximal_mu: float = 0.0,
) -> tuple[TrainResult, float]:
    """DP-SGD (Adam on clipped, noised per-slice gradients) for ``steps`` batches; returns the sample rate.

    FedProx's term depends only on the weights, not on the data, so its gradient mu·(w − w_global)
    is added after clipping and noise (it costs no privacy and is not clipped).
    The model's own parameters are updated in place.
    """
    batch_size = getattr(loader, "batch_size", None)
    n = len(loader.dataset)
    if not batch_size or n == 0:
        raise ValueError("DP-SGD needs a loader with a batch_size over a non-empty training split")
    sample_rate = min(1.0, batch_size / n)
    total_steps = steps if steps > 0 else epochs * len(loader)
    global_params = [p.detach().clone() for p in model.parameters() if p.requires_grad] if proximal_mu > 0 else []
    gsm = GradSampleModule(prepared_for_opacus(model), batch_first=True, loss_reduction="mean")
    optimiser = DPOptimizer(
        torch.optim.Adam(model.parameters(), lr=lr),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=batch_size,
        loss_reduction="mean",
    )
    criterion = ReconLoss(loss)
    gsm.train()
    running, count = 0.0, 0
    try:
        for batch in _cycle(loader, total_steps):
            optimiser.zero_grad(set_to_none=True)
            pred = predict(gsm, batch)
            value = criterion(pred, batch["target"], batch["max_value"])
            if not torch.isfinite(value):
                raise FloatingPointError(f"non-finite training loss at step {count + 1}")
            with warnings.catch_warnings():
                # Opacus' full backward hooks on the first layer, whose input (the data) needs no grad.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                value.backward()
            if optimiser.pre_step():  # clip each slice's gradient, sum, add noise, average
                if proximal_mu > 0:
                    with torch.no_grad():
                        params = [p for p in model.parameters() if p.requires_grad]
                        for p, g in zip(params, global_params):
                            p.grad.add_(proximal_mu * (p - g))  # type: ignore[union-attr]
                optimiser.original_optimizer.step()
            running += float(value.detach())
            count += 1
    finally:
        gsm._close()  # removes Opacus' hooks: the model goes back to the caller unwrapped
    return TrainResult(loss=running / max(count, 1), steps=count, num_examples=n), sample_rate
