"""SecAgg+ rounds: the ServerApp receives only masked updates and learns only their weighted mean.

Flower 1.41's ``SecAggPlusWorkflow`` is written for the legacy API: it samples through a legacy
strategy and client manager (a ``LegacyContext``) and hands the unmasked sum to that strategy's
``aggregate_fit``. :func:`secure_mean_update` gives it exactly that for one round, built from the
sites FedSense's own strategy sampled, and takes the unmasked result back, so FedSense keeps its
round loop, checkpoints, resume, best round and metrics. The sites' side is ``client.secagg``.

The sites mask their *updates* (trained minus received weights), weighted by
``min(num-examples, secagg-max-weight)``; the result is FedAvg's example-weighted mean update.
Each entry of it is exact up to the quantisation error ``n · 2c / Q / Σ wᵢ`` (n sites, c =
``secagg-clipping-range``, Q = ``secagg-quantization-range``, wᵢ = weight / max-weight), as long
as no weighted entry exceeds ±c (the sites report the fraction clipped).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from common.errors import ConfigError
from common.protocol import METRICS, SECAGG_KEYS, SECAGG_SITE, SECAGG_SUPERVISION, SITE, SITE_NAME, SUPERVISION
from common.runconfig import RunConfig
from server.collect import send_and_collect

logger = logging.getLogger(__name__)

#: Flower's default and largest modulus: masked sums wrap around it.
MODULUS = 2**32


@dataclass
class SecureRound:
    """What one SecAgg+ round gave the server: the mean update and each survivor's plain metrics."""

    mean_update: dict[str, np.ndarray] | None
    replies: list[Message]  # one metrics-only message per site in the sum (site, supervision, metrics)
    dropped: list[int]  # nodes sampled but not in the sum
    stage_seconds: list[float] = field(default_factory=list)


class _SampledSites(LegacyStrategy):
    """The legacy strategy the workflow needs: it offers the sites FedSense sampled and keeps the sum."""

    def __init__(self, proxies: list[ClientProxy], fitins: FitIns) -> None:
        self.proxies, self.fitins = proxies, fitins
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.aggregate: list[np.ndarray] | None = None

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: Any
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, self.fitins) for proxy in self.proxies]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: Any
    ) -> tuple[Parameters | None, dict[str, Any]]:
        # The workflow sets every result's parameters to the one unmasked aggregate.
        self.results = results
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, *args: Any) -> list:  # FedSense evaluates in its own loop
        return []

    def aggregate_evaluate(self, *args: Any) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, *args: Any) -> None:
        return None


class _TimedGrid:
    """The workflow's ``send_and_receive`` through FedSense's collection (``round-timeout``), timed per stage."""

    def __init__(self, grid: Grid, timeout: float) -> None:
        self.grid, self.timeout = grid, timeout
        self.stage_seconds: list[float] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        started = time.monotonic()
        arrivals = send_and_collect(self.grid, list(messages), self.timeout)
        self.stage_seconds.append(time.monotonic() - started)
        return [a.message for a in arrivals]


def check_capacity(run: RunConfig, sites: int) -> None:
    """Refuse a round whose masked sum could wrap around the modulus (each site adds up to Q)."""
    if sites * run.secagg_quantization_range >= MODULUS:
        raise ConfigError(
            f"secagg-quantization-range {run.secagg_quantization_range} x {sites} sites >= 2**32: the masked sum "
            "would overflow; lower secagg-quantization-range"
        )


def secure_mean_update(
    grid: Grid, run: RunConfig, rnd: int, arrays: ArrayRecord, node_ids: Sequence[int], config: ConfigRecord
) -> SecureRound:
    """Run round ``rnd``'s training on ``node_ids`` through SecAgg+; the weighted mean update, if unmasked.

    ``config`` is the training config FedSense's strategy would have sent each site.
    """
    check_capacity(run, len(node_ids))
    keys = list(arrays.keys())
    reference = [arrays[k].numpy() for k in keys]
    fitins = FitIns(
        ndarrays_to_parameters(reference), {**cast(dict[str, Scalar], dict(config)), SECAGG_KEYS: json.dumps(keys)}
    )
    proxies: list[ClientProxy] = [GridClientProxy(nid, grid, grid.run.run_id) for nid in node_ids]
    strategy = _SampledSites(proxies, fitins)
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: rnd}), MAIN_PARAMS_RECORD: arrays})
    context = LegacyContext(
        Context(grid.run.run_id, 0, {}, state, {}), strategy=strategy, client_manager=SimpleClientManager()
    )
    workflow = SecAggPlusWorkflow(
        run.secagg_num_shares,
        run.secagg_reconstruction_threshold,
        max_weight=run.secagg_max_weight,
        clipping_range=run.secagg_clipping_range,
        quantization_range=run.secagg_quantization_range,
        modulus_range=MODULUS,
    )
    timed = _TimedGrid(grid, run.round_timeout)
    workflow(timed, context)  # type: ignore[arg-type]  # the workflow only calls send_and_receive
    replies = [_metrics_reply(fitres) for _, fitres in strategy.results]
    summed = {proxy.node_id for proxy, _ in strategy.results}
    dropped = [nid for nid in node_ids if nid not in summed]
    if strategy.aggregate is None:
        return SecureRound(None, replies, dropped, timed.stage_seconds)
    mean = {k: np.asarray(a, dtype=np.float64) for k, a in zip(keys, strategy.aggregate, strict=True)}
    return SecureRound(mean, replies, dropped, timed.stage_seconds)


def apply_update(arrays: ArrayRecord, mean_update: dict[str, np.ndarray]) -> ArrayRecord:
    """The global weights plus the mean update, in each array's own dtype (integers rounded)."""
    out = {}
    for key, array in arrays.items():
        ref = array.numpy()
        value = ref.astype(np.float64) + mean_update[key]
        out[key] = Array(np.ascontiguousarray((np.rint(value) if ref.dtype.kind in "iu" else value).astype(ref.dtype)))
    return ArrayRecord(out)


def _metrics_reply(fitres: FitRes) -> Message:
    """A site's plain training metrics as FedSense's reply layout (``metrics`` + ``site``), without arrays."""
    metrics = dict(fitres.metrics)
    site = ConfigRecord(
        {SITE_NAME: str(metrics.pop(SECAGG_SITE, "")), SUPERVISION: str(metrics.pop(SECAGG_SUPERVISION, "full"))}
    )
    numeric: dict[str, Any] = {
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return Message(
        RecordDict({METRICS: MetricRecord(numeric), SITE: site}), dst_node_id=0, message_type=MessageType.TRAIN
    )
