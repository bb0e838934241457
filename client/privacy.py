"""The site side of FedSense's privacy options: DP-SGD's budget ledger and client-side update clipping.

The ledger (Opacus' RDP accountant history) never leaves the site: it lives in the ClientApp's
Context state for the run and in a site-local file, so a resumed run — or a restarted SuperNode —
continues the budget instead of starting from ε = 0. Only the resulting ε is reported.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.dp import PrivacyLedger, check_model, train_private
from common.patient_dp import subject_groups, train_patient_private
from common.protocol import DP_BUDGET_EXHAUSTED, DP_EPSILON
from common.runconfig import RunConfig
from common.training import BatchSource, TrainResult

logger = logging.getLogger(__name__)

_STATE_KEY = "dp-ledger"


def ledger_path(context: Context, run: RunConfig, site_config: Path, site: str) -> Path:
    """Node config ``dp-ledger`` if set, else ``.dp-ledger/<run name>--<site>.json`` next to the site config."""
    if "dp-ledger" in context.node_config:
        return Path(str(context.node_config["dp-ledger"]))
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{run.name}--{site}")
    return site_config.parent / ".dp-ledger" / f"{safe}.json"


def load_ledger(context: Context, path: Path) -> PrivacyLedger:
    """The run's ledger: from the Context state when this process has one, else from the site's file."""
    if _STATE_KEY in context.state.config_records:
        return PrivacyLedger.from_json(str(context.state.config_records[_STATE_KEY]["json"]), "context state")
    return PrivacyLedger.load(path)


def store_ledger(context: Context, path: Path, ledger: PrivacyLedger) -> None:
    """Keep the ledger in the Context state (this process) and in the site's file (restarts)."""
    context.state.config_records[_STATE_KEY] = ConfigRecord({"json": ledger.to_json()})
    ledger.save(path)


def train_with_budget(
    run: RunConfig, model: torch.nn.Module, loader: BatchSource, mu: float, ledger: PrivacyLedger
) -> tuple[TrainResult | None, PrivacyLedger, dict[str, float]]:
    """One round of DP-SGD, unless it would take the site past ``dp-target-epsilon``.

    ``dp-unit = subject``: patient-level DP-SGD (:mod:`common.patient_dp`), ``batch-size`` patients
    expected per step, ε per patient; ``sample``: Opacus' per-slice DP-SGD, ε per slice.
    Returns the training result (``None`` when the budget forbids training: the model is left as
    the global one), the updated ledger and the privacy metrics to report.
    """
    check_model(run.model, model)
    batch_size = getattr(loader, "batch_size", None) or run.batch_size
    if run.dp_unit == "subject":
        units = len(subject_groups(loader.dataset))
        steps = run.local_steps if run.local_steps > 0 else run.local_epochs * math.ceil(units / batch_size)
    else:
        units = len(loader.dataset)
        steps = run.local_steps if run.local_steps > 0 else run.local_epochs * len(loader)
    unit = {"dp-subject-level": float(run.dp_unit == "subject")}
    planned = ledger.with_round(run.dp_noise_multiplier, min(1.0, batch_size / units), steps)
    if run.dp_target_epsilon > 0 and planned.epsilon(run.dp_delta) > run.dp_target_epsilon:
        spent = ledger.epsilon(run.dp_delta)
        logger.warning(
            "privacy budget: another round would exceed ε=%g (spent %.3f); not training", run.dp_target_epsilon, spent
        )
        return None, ledger, {DP_EPSILON: spent, "dp-delta": run.dp_delta, DP_BUDGET_EXHAUSTED: 1, **unit}
    if run.dp_unit == "subject":
        result, sample_rate = train_patient_private(
            model,
            loader.dataset,
            noise_multiplier=run.dp_noise_multiplier,
            max_grad_norm=run.dp_max_grad_norm,
            subjects_per_step=batch_size,
            steps=steps,
            lr=run.learning_rate,
            loss=run.loss,
            proximal_mu=mu,
            chunk=batch_size,
            seed=int(torch.randint(0, 2**31 - 1, (1,))),  # the round's seeded generator
        )
    else:
        result, sample_rate = train_private(
            model,
            loader,
            noise_multiplier=run.dp_noise_multiplier,
            max_grad_norm=run.dp_max_grad_norm,
            epochs=run.local_epochs,
            steps=run.local_steps,
            lr=run.learning_rate,
            loss=run.loss,
            proximal_mu=mu,
        )
    ledger = ledger.with_round(run.dp_noise_multiplier, sample_rate, result.steps)
    return result, ledger, {DP_EPSILON: ledger.epsilon(run.dp_delta), "dp-delta": run.dp_delta, **unit}


def client_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` for train messages whose config carries a clipping norm.

    The server's ``DifferentialPrivacyClientSideFixedClipping`` sends the norm; without it (client-level
    DP off, or evaluate messages) the reply passes through untouched.
    """
    if msg.metadata.message_type == MessageType.TRAIN:
        configs = list(msg.content.config_records.values())
        if len(configs) == 1 and KEY_CLIPPING_NORM in configs[0]:
            return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
