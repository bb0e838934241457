"""Server-side optimisers: Flower's FedAdam, FedYogi, FedAdagrad and FedAvgM, made resumable.

The server treats the example-weighted mean of the sites' updates as a pseudo-gradient and steps
its own optimiser on it (Reddi et al. 2021, "Adaptive Federated Optimization"; Hsu et al. 2019 for
server momentum). Flower's strategies keep that optimiser's state (moments, momentum) in memory;
FedSense checkpoints it with the global model so that a resumed run continues the same
optimisation instead of restarting it from zero moments. Two adjustments to Flower's classes:

- the aggregate keeps the dtypes of the global model (FedAdam's bias-corrected step size is a
  float64 numpy scalar, which would otherwise promote every float32 array to float64, and the
  next round's updates would then fail update validation);
- :meth:`state_dict` / :meth:`load_state_dict` expose the optimiser state as torch tensors, the
  form ``torch.load(weights_only=True)`` reads back from a checkpoint.

Note Flower's FedAdam step uses Kingma & Ba's bias-corrected step size with ``t = server_round + 1``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, Strategy

from common.runconfig import RunConfig

SERVER_OPTIMISERS = ("fedadam", "fedyogi", "fedadagrad", "fedavgm")

OptimiserState = dict[str, dict[str, torch.Tensor]]


def _to_torch(arrays: Mapping[str, np.ndarray] | None) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in (arrays or {}).items()}


def _to_numpy(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: t.detach().cpu().numpy().copy() for k, t in tensors.items()}


class _ServerOptimiser:
    """Mixin over a Flower strategy: aggregates keep the sent dtypes; the state can be saved and restored."""

    _sent_dtypes: dict[str, np.dtype]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent_dtypes = {k: np.dtype(a.numpy().dtype) for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is None:
            return arrays, metrics
        # np.array(order="C"), not np.ascontiguousarray: the latter turns a 0-d array (a scalar parameter
        # such as a data-consistency weight) into shape (1,), which the next round's updates would not match.
        cast = ArrayRecord(
            {
                k: Array(np.array(a.numpy(), dtype=self._sent_dtypes.get(k, a.numpy().dtype), order="C"))
                for k, a in arrays.items()
            }
        )
        return cast, metrics

    @abstractmethod
    def state_dict(self) -> OptimiserState:
        """The optimiser's state (empty before the first aggregation)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Restore what :meth:`state_dict` returned (from a checkpoint)."""


class _AdaptiveState(_ServerOptimiser):
    """State of FedOpt's family: first moment ``m_t`` and second moment ``v_t`` per array."""

    m_t: dict[str, np.ndarray] | None
    v_t: dict[str, np.ndarray] | None

    def state_dict(self) -> OptimiserState:
        return {"m_t": _to_torch(self.m_t), "v_t": _to_torch(self.v_t)}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.m_t = _to_numpy(state["m_t"]) or None
        self.v_t = _to_numpy(state["v_t"]) or None


class ResumableFedAdam(_AdaptiveState, FedAdam):
    """FedAdam (server Adam on the pseudo-gradient)."""


class ResumableFedYogi(_AdaptiveState, FedYogi):
    """FedYogi (Adam with Yogi's additive second-moment update)."""


class ResumableFedAdagrad(_AdaptiveState, FedAdagrad):
    """FedAdagrad (server Adagrad on the pseudo-gradient)."""


class ResumableFedAvgM(_ServerOptimiser, FedAvgM):
    """FedAvgM (server SGD with momentum on the pseudo-gradient)."""

    momentum_vector: list[np.ndarray] | None
    current_arrays: ArrayRecord | None

    def state_dict(self) -> OptimiserState:
        if self.momentum_vector is None or self.current_arrays is None:
            return {"momentum": {}}
        # Flower keeps the momentum as a list in the model's array order; name each entry.
        keys = list(self.current_arrays.keys())
        return {"momentum": _to_torch(dict(zip(keys, self.momentum_vector, strict=True)))}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        momentum = _to_numpy(state["momentum"])
        # Arrays keep the model's order through a checkpoint, so the list order matches the next aggregate.
        self.momentum_vector = list(momentum.values()) or None


def build_server_optimiser(run: RunConfig, common: Mapping[str, Any]) -> FedAvg:
    """The server-optimiser strategy named by ``run.strategy`` with the run config's hyper-parameters."""
    if run.strategy == "fedadam":
        return ResumableFedAdam(
            eta=run.server_eta,
            eta_l=run.learning_rate,
            beta_1=run.server_beta_1,
            beta_2=run.server_beta_2,
            tau=run.server_tau,
            **common,
        )
    if run.strategy == "fedyogi":
        return ResumableFedYogi(
            eta=run.server_eta,
            eta_l=run.learning_rate,
            beta_1=run.server_beta_1,
            beta_2=run.server_beta_2,
            tau=run.server_tau,
            **common,
        )
    if run.strategy == "fedadagrad":
        return ResumableFedAdagrad(eta=run.server_eta, eta_l=run.learning_rate, tau=run.server_tau, **common)
    if run.strategy == "fedavgm":
        return ResumableFedAvgM(
            server_learning_rate=run.server_learning_rate, server_momentum=run.server_momentum, **common
        )
    raise ValueError(f"{run.strategy!r} is not a server optimiser ({', '.join(SERVER_OPTIMISERS)})")


def optimiser_state(strategy: Strategy) -> OptimiserState | None:
    """The server optimiser's state to checkpoint, or None for strategies without one."""
    return strategy.state_dict() if isinstance(strategy, _ServerOptimiser) else None


def load_optimiser_state(strategy: FedAvg, state: Mapping[str, Mapping[str, torch.Tensor]] | None) -> bool:
    """Restore a checkpointed optimiser state into ``strategy``; False when there is nothing to restore."""
    if state is None or not isinstance(strategy, _ServerOptimiser):
        return False
    strategy.load_state_dict(state)
    return True
