"""SCAFFOLD's control variates (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging").

Each site i corrects every local gradient by ``c − c_i`` (the server's control variate minus its own), so
sites with different data stop drifting towards their own optimum. After K local steps the site's new
variate is option II of the paper, ``c_i⁺ = c_i − c + (x − y)/(K·η)``; with plain SGD that is exactly the
mean of the K uncorrected minibatch gradients, which is how it is computed here, so it stays right
under Adam (whose steps are not ``η·g``). The site sends ``Δc_i = c_i⁺ − c_i``; the server adds
``|S|/N`` times the mean of the sites' ``Δc_i`` to ``c`` and aggregates the weights as FedAvg does
(global step size 1). Variates are keyed by parameter name, and a missing name counts as zero, so
site-local layers (``local-layers``) and buffers simply carry none. No Flower here: the ServerApp and
the ClientApp move these dicts in their own records (``common.protocol``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

Variates = dict[str, torch.Tensor]


class ControlledSteps:
    """A training step hook (``common.training.train``'s ``step_hook``): corrects the gradients and
    accumulates the uncorrected ones, from which :meth:`new_local` gives ``c_i⁺``."""

    def __init__(
        self,
        model: nn.Module,
        global_c: Mapping[str, torch.Tensor],
        local_c: Mapping[str, torch.Tensor],
        names: Iterable[str] | None = None,
    ) -> None:
        """Controls the trainable parameters of ``model`` named in ``names`` (default: all of them)."""
        wanted = None if names is None else set(names)
        self.params = {
            name: p for name, p in model.named_parameters() if p.requires_grad and (wanted is None or name in wanted)
        }
        self.offset = {
            name: _or_zero(global_c, name, p) - _or_zero(local_c, name, p) for name, p in self.params.items()
        }
        self.sums = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in self.params.items()}
        self.steps = 0

    def __call__(self, model: nn.Module) -> None:
        """After ``backward()``, before the optimiser's step: record ``g``, then make it ``g + c − c_i``."""
        for name, p in self.params.items():
            if p.grad is None:
                continue
            self.sums[name] += p.grad.detach().to(torch.float64)
            p.grad.add_(self.offset[name].to(p.grad.dtype))
        self.steps += 1

    def new_local(self) -> Variates:
        """``c_i⁺``: the mean uncorrected gradient of the local steps (option II under SGD)."""
        if self.steps == 0:
            raise ValueError("SCAFFOLD: no local step was taken, so there is no new control variate")
        return {name: (s / self.steps).to(self.params[name].dtype).cpu() for name, s in self.sums.items()}


def _or_zero(variates: Mapping[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    value = variates.get(name)
    return torch.zeros_like(like).detach() if value is None else value.to(like.device, like.dtype)


def local_delta(new_local: Mapping[str, torch.Tensor], old_local: Mapping[str, torch.Tensor]) -> Variates:
    """``Δc_i = c_i⁺ − c_i`` (an absent old variate is zero: a site's first round)."""
    return {name: value - _or_zero(old_local, name, value) for name, value in new_local.items()}


def server_update(
    global_c: Mapping[str, np.ndarray], deltas: Iterable[Mapping[str, np.ndarray]], total_sites: int
) -> dict[str, np.ndarray]:
    """``c + |S|/N · mean(Δc_i)`` over the sites S whose updates were aggregated, N the sites in all.

    Every value is an ndarray of its parameter's shape and dtype, 0-d ones included.
    """
    deltas = list(deltas)
    if not deltas:
        return dict(global_c)
    if total_sites < len(deltas):
        raise ValueError(f"SCAFFOLD: {len(deltas)} deltas but only {total_sites} sites")
    names = set(global_c).union(*deltas)
    out = {}
    for name in sorted(names):
        like = next(d[name] for d in [global_c, *deltas] if name in d)
        mean = sum((np.asarray(d[name], np.float64) if name in d else 0.0) for d in deltas) / len(deltas)
        base = np.asarray(global_c[name], np.float64) if name in global_c else 0.0
        # np.asarray: with 0-d parameters (a scalar DC weight) the sum is a numpy scalar, which is no
        # ndarray, and Flower's Array refuses it when the server sends c at round 2.
        out[name] = np.asarray(base + len(deltas) / total_sites * mean, dtype=np.asarray(like).dtype)
    return out
