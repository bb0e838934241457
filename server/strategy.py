"""Aggregation strategies and the checks every update passes before it may touch the global model.

Flower's message strategies do the aggregation (FedAvg, FedProx, FedMedian, FedTrimmedAvg, and the
server optimisers of :mod:`server.optimisers`);
FedSense adds what a federation of hospitals needs in front of them: an update with the wrong
keys, shapes or dtypes or a non-finite value is rejected, and so (when ``norm-outlier-factor`` > 0;
off by default) is an update whose norm is far from the others'; the reason is recorded per site
and round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy

from common.protocol import (
    DP_BUDGET_EXHAUSTED,
    DP_EPSILON,
    DP_WEIGHT,
    NUM_EXAMPLES,
    PRECISION,
    SITE,
    SITE_NAME,
    SUPERVISION,
)
from common.registry import STRATEGIES, check_implemented
from common.runconfig import RunConfig
from server.optimisers import SERVER_OPTIMISERS, build_server_optimiser
from server.scaffold import Scaffold

logger = logging.getLogger(__name__)


def build_strategy(run: RunConfig) -> FedAvg:
    """The Flower strategy named by ``strategy`` in the run config, weighted by ``num-examples``."""
    common = dict(
        fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_evaluate,
        min_train_nodes=run.min_train_nodes,
        min_evaluate_nodes=run.min_evaluate_nodes,
        min_available_nodes=run.min_available_nodes,
        # Client-level DP averages the clipped updates uniformly (each site sends dp-weight = 1).
        weighted_by_key=DP_WEIGHT if run.dp_client_level != "off" else NUM_EXAMPLES,
    )
    return _BUILDERS[run.strategy](run, common)


#: How each registered strategy is built from the run config and the arguments every strategy takes.
_BUILDERS: dict[str, Callable[[RunConfig, dict[str, Any]], FedAvg]] = {
    "fedavg": lambda run, common: FedAvg(**common),
    "fedprox": lambda run, common: FedProx(proximal_mu=run.proximal_term_mu, **common),
    "fedmedian": lambda run, common: FedMedian(**common),
    "fedtrimmedavg": lambda run, common: FedTrimmedAvg(beta=run.trim_beta, **common),
    "scaffold": lambda run, common: Scaffold(**common),
    **{name: build_server_optimiser for name in SERVER_OPTIMISERS},
}
check_implemented("strategy", STRATEGIES, _BUILDERS)


def site_of(msg: Message) -> str:
    """The site name a reply carries (falls back to the node id for a reply without one)."""
    content = msg.content
    if SITE in content.config_records:
        name = content.config_records[SITE].get(SITE_NAME)
        if isinstance(name, str) and name:
            return name
    return f"node-{msg.metadata.src_node_id}"


def supervision_of(msg: Message) -> dict[str, str]:
    """``{"supervision": "self"}`` for a self-supervised site's reply (recorded with its metrics), else ``{}``."""
    content = msg.content
    if SITE in content.config_records and content.config_records[SITE].get(SUPERVISION) == "self":
        return {SUPERVISION: "self"}
    return {}


def precision_of(msg: Message) -> dict[str, str]:
    """``{"precision": "bf16"}`` (or fp32): what the site's network trained at, recorded with its metrics."""
    content = msg.content
    value = content.config_records[SITE].get(PRECISION) if SITE in content.config_records else None
    return {PRECISION: value} if value in ("fp32", "bf16") else {}


@dataclass
class Rejection:
    """Why one site's update was kept out of a round's aggregate."""

    site: str
    reason: str
    message_id: str = ""  # the rejected reply's, when there was one (server.receipts records it)


def _arrays_of(msg: Message) -> ArrayRecord | None:
    records = list(msg.content.array_records.values())
    return records[0] if len(records) == 1 else None


def validate_updates(
    replies: list[Message], global_arrays: ArrayRecord, norm_outlier_factor: float = 0.0
) -> tuple[list[Message], list[Rejection]]:
    """Split train replies into those safe to aggregate and those rejected, with reasons.

    Checks: an error reply; exactly one ArrayRecord with the global model's keys, shapes and
    dtypes; the ``num-examples`` metric present and positive; every value finite; and, when
    ``norm_outlier_factor`` > 0, the update's distance from the global model no larger than
    that factor times the median distance of the round (needs three or more updates).
    """
    reference = {k: v.numpy() for k, v in global_arrays.items()}
    accepted: list[tuple[Message, float]] = []
    rejected: list[Rejection] = []
    for msg in replies:
        if msg.has_error():
            rejected.append(
                Rejection(
                    f"node-{msg.metadata.src_node_id}", f"error reply: {msg.error.reason}", msg.metadata.message_id
                )
            )
            continue
        site = site_of(msg)
        reason, distance = _check_update(msg, reference)
        if reason:
            rejected.append(Rejection(site, reason, msg.metadata.message_id))
        else:
            accepted.append((msg, distance))
    if norm_outlier_factor > 0 and len(accepted) >= 3:
        median = float(np.median([d for _, d in accepted]))
        kept = []
        for msg, distance in accepted:
            if median > 0 and distance > norm_outlier_factor * median:
                rejected.append(
                    Rejection(
                        site_of(msg),
                        f"update norm {distance:.4g} > {norm_outlier_factor} x median {median:.4g}",
                        msg.metadata.message_id,
                    )
                )
            else:
                kept.append((msg, distance))
        accepted = kept
    for r in rejected:
        logger.warning("rejected update from %s: %s", r.site, r.reason)
    return [m for m, _ in accepted], rejected


def _check_update(msg: Message, reference: dict[str, np.ndarray]) -> tuple[str, float]:
    metric_records = list(msg.content.metric_records.values())
    if len(metric_records) != 1:
        return "expected exactly one MetricRecord", 0.0
    if metric_records[0].get(DP_BUDGET_EXHAUSTED):
        return f"privacy budget exhausted (ε={metric_records[0].get(DP_EPSILON)}); the site no longer trains", 0.0
    n = metric_records[0].get(NUM_EXAMPLES)
    if not isinstance(n, (int, float)) or not np.isfinite(n) or n <= 0:
        return f"num-examples must be a positive number, got {n!r}", 0.0
    arrays = _arrays_of(msg)
    if arrays is None:
        return "expected exactly one ArrayRecord", 0.0
    keys = set(arrays.keys())
    if keys != set(reference):
        missing, extra = sorted(set(reference) - keys), sorted(keys - set(reference))
        return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})", 0.0
    sq = 0.0
    for key, ref in reference.items():
        value = arrays[key].numpy()
        if value.shape != ref.shape:
            return f"{key}: shape {value.shape} != {ref.shape}", 0.0
        if value.dtype != ref.dtype:
            return f"{key}: dtype {value.dtype} != {ref.dtype}", 0.0
        if value.dtype.kind in "fc":
            if not np.all(np.isfinite(value)):
                return f"{key}: non-finite values", 0.0
            sq += float(np.sum((value.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return "", float(np.sqrt(sq))


__all__ = ["Rejection", "Strategy", "build_strategy", "site_of", "validate_updates"]
