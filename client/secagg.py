"""SecAgg+ at the site: the training reply leaves only as a masked, quantised update.

Flower's ``secaggplus_mod`` runs the four SecAgg+ stages (keys, key shares, masked vector,
unmasking shares). For the masked-vector stage it calls the app and reads the reply in the legacy
``fitins.*`` / ``fitres.*`` record layout; :func:`secagg_mod` translates between that layout and
FedSense's (``arrays`` + ``config`` in, ``arrays`` + ``metrics`` + ``site`` out), so the training
handler is the same with and without secure aggregation.

What the site masks is its *update* (its trained weights minus the global weights it received),
not its weights: updates are small, so a small ``secagg-clipping-range`` quantises them finely.
The weight of the update is ``min(num-examples, secagg-max-weight)``; ``secaggplus_mod`` multiplies
the update by weight / max-weight before masking and the server divides the unmasked sum by the
summed weights, which gives FedAvg's example-weighted mean (see README "Privacy").
With ``dp-client-level = client-fixed`` the site clips its update to ``dp-client-clip`` and adds its
share of the Gaussian noise (:mod:`common.distributed_dp`) before masking, and all sites weigh alike.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Scalar, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.site_context import site_context
from common.distributed_dp import clip_and_add_noise_share
from common.protocol import (
    ARRAYS,
    CONFIG,
    DP_CLIPPED,
    METRICS,
    NUM_EXAMPLES,
    SECAGG_CLIPPED,
    SECAGG_KEYS,
    SECAGG_SITE,
    SECAGG_SUPERVISION,
    SITE,
    SITE_NAME,
    SUPERVISION,
)

logger = logging.getLogger(__name__)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Route the server's SecAgg+ messages through Flower's ``secaggplus_mod``; others pass through."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda m, c: _legacy_train(m, c, call_next))


def _legacy_train(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the training handler on a legacy FitIns and answer with the update as a legacy FitRes."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config: dict[str, Any] = dict(fitins.config)
    keys = [str(k) for k in json.loads(str(config.pop(SECAGG_KEYS)))]
    received = dict(zip(keys, parameters_to_ndarrays(fitins.parameters), strict=True))
    msg.content = RecordDict(
        {
            ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in received.items()}),
            CONFIG: ConfigRecord(config),
        }
    )
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    run = site_context(context).run  # built once per run by the train handler that just answered
    metrics: dict[str, Any] = dict(reply.content[METRICS])
    site = reply.content[SITE]
    trained = reply.content.array_records.get(ARRAYS)
    client_dp = run.dp_client_level == "client-fixed"
    if trained is None:
        # No weights (a DP budget exhausted): take part with a zero update of weight 0, so the round's
        # masks still cancel and the sum is the other sites'.
        update = [np.zeros_like(received[k], dtype=np.float64) for k in keys]
        weight = 0
    else:
        update = [trained[k].numpy().astype(np.float64) - received[k].astype(np.float64) for k in keys]
        weight = int(min(float(metrics[NUM_EXAMPLES]), run.secagg_max_weight))
        if weight < metrics[NUM_EXAMPLES] and not client_dp:
            logger.warning(
                "num-examples %s above secagg-max-weight: the update weighs %d", metrics[NUM_EXAMPLES], weight
            )
    if client_dp:
        # Client-level DP: uniform weights (the accountant's mean), the update clipped and noised here.
        # A site without weights still adds its noise share, so every unmasked sum carries the full noise.
        # The noise comes from OS entropy: a seed the server could know would let it subtract the noise.
        update, clipped_update = clip_and_add_noise_share(
            update,
            clip=run.dp_client_clip,
            noise_multiplier=run.dp_client_noise,
            min_sites=run.min_train_nodes,
            rng=np.random.default_rng(),
        )
        weight = int(run.secagg_max_weight)
    scale = weight / run.secagg_max_weight
    total = sum(u.size for u in update)
    clipped = sum(int(np.count_nonzero(np.abs(u * scale) > run.secagg_clipping_range)) for u in update)
    if clipped:
        logger.warning(
            "%d of %d update entries exceed secagg-clipping-range %g and are clipped",
            clipped,
            total,
            run.secagg_clipping_range,
        )
    legacy_metrics: dict[str, Scalar] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if client_dp:
        legacy_metrics[DP_CLIPPED] = float(clipped_update)
    legacy_metrics.update(
        {
            SECAGG_SITE: str(site.get(SITE_NAME, "")),
            SECAGG_SUPERVISION: str(site.get(SUPERVISION, "full")),
            SECAGG_CLIPPED: clipped / max(total, 1),
        }
    )
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), weight, legacy_metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
