"""Which privacy settings combine, checked when the run config is read (not rounds later).

The reasons are the ones README "Privacy" gives; every refusal names the keys involved.
"""

from __future__ import annotations

from typing import Any

# Flower 1.41's SecAgg+ is a legacy-API workflow; see README "Privacy" for the source lines.
SECAGG_REFUSAL = (
    "secagg: not supported: Flower 1.41's SecAggPlusWorkflow requires a LegacyContext and a legacy "
    "flwr.server.strategy (flwr/server/workflow/secure_aggregation/secaggplus_workflow.py:185, :286, :665) "
    "and secaggplus_mod reads the legacy 'fitres.*' reply layout (flwr/client/mod/secure_aggregation/"
    "secaggplus_mod.py:169), while FedSense's ServerApp drives Message-API strategies itself and "
    "validates each update; see README 'Privacy'"
)

CLIENT_DP_STRATEGIES = ("fedavg", "fedprox")

# Models DP-SGD cannot train, with the reason (tests/test_dp.py checks the others' per-slice gradients
# against one backward pass per slice).
DP_SGD_REFUSED_MODELS: dict[str, str] = {
    "varnet": (
        "its coil-sensitivity network runs on every coil image as a separate batch element (B·C), so "
        "Opacus' per-sample gradients would be per coil, not per slice, and clipping would not bound "
        "a slice's influence; use unet or unrolled"
    ),
}


def check_privacy(run: Any) -> None:
    """Raise ``ValueError`` (turned into a ConfigError naming the key) for an unsupported combination."""
    if run.secagg:
        raise ValueError(SECAGG_REFUSAL)
    if run.dp_noise_multiplier > 0 and run.model in DP_SGD_REFUSED_MODELS:
        raise ValueError(
            f"dp-noise-multiplier > 0: model {run.model!r} cannot be trained with DP-SGD: "
            f"{DP_SGD_REFUSED_MODELS[run.model]}"
        )
    if run.dp_target_epsilon > 0 and run.dp_noise_multiplier == 0:
        raise ValueError("dp-target-epsilon needs dp-noise-multiplier > 0 (without noise ε is unbounded)")
    if run.dp_client_level == "off":
        return
    if run.strategy not in CLIENT_DP_STRATEGIES:
        raise ValueError(
            f"dp-client-level={run.dp_client_level} needs strategy fedavg or fedprox, not {run.strategy}: "
            "Flower's accountant assumes the uniform mean of clipped updates"
        )
    if run.fraction_train != 1.0 or run.min_train_nodes != run.min_available_nodes:
        raise ValueError(
            f"dp-client-level={run.dp_client_level} needs fraction-train = 1 and min-train-nodes = "
            "min-available-nodes: Flower's fixed-clipping wrapper expects exactly that many sites every round"
        )
