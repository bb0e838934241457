"""Which privacy settings combine, checked when the run config is read (not rounds later).

The reasons are the ones README "Privacy" gives; every refusal names the keys involved.
"""

from __future__ import annotations

from typing import Any

from common.registry import MODEL_ENTRIES

#: Strategies that need each site's own update, which secure aggregation hides from the server.
SECAGG_REFUSED_STRATEGIES: dict[str, str] = {
    "fedmedian": "the coordinate-wise median needs every site's update",
    "fedtrimmedavg": "trimming the extremes needs every site's update",
    "scaffold": "each site's control-variate change would travel unmasked beside its masked update",
}

CLIENT_DP_STRATEGIES = ("fedavg", "fedprox")

#: Under SecAgg+ with client-level DP, ±secagg-clipping-range must hold the noise share to this many stds.
SECAGG_NOISE_TAILS = 6.0


def check_privacy(run: Any) -> None:
    """Raise ``ValueError`` (turned into a ConfigError naming the key) for an unsupported combination."""
    if run.secagg:
        check_secagg(run)
    if run.dp_noise_multiplier > 0 and not MODEL_ENTRIES[run.model].supports_dp:
        raise ValueError(
            f"dp-noise-multiplier > 0: model {run.model!r} cannot be trained with DP-SGD: "
            f"{MODEL_ENTRIES[run.model].dp_refusal}"
        )
    if run.dp_noise_multiplier > 0 and run.strategy == "scaffold":
        raise ValueError(
            "dp-noise-multiplier > 0 cannot run with strategy scaffold: its control variate is the site's mean "
            "unclipped, unnoised gradient, which would leave the site outside DP-SGD's guarantee"
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


def check_secagg(run: Any) -> None:
    """SecAgg+ gives the server only the sum of the sites' updates: refuse what needs them one by one."""
    if run.strategy in SECAGG_REFUSED_STRATEGIES:
        raise ValueError(
            f"secagg = true cannot run with strategy {run.strategy}: {SECAGG_REFUSED_STRATEGIES[run.strategy]}, "
            "and the server sees only their sum (use fedavg, fedprox or a server optimiser)"
        )
    if run.norm_outlier_factor > 0:
        raise ValueError(
            "secagg = true cannot run with norm-outlier-factor > 0: the norm check compares each site's "
            "update with the others', and the server sees only their sum"
        )
    if run.caps:
        raise ValueError(
            "secagg = true cannot run with site-caps: each site weights its own masked update, so the server "
            "cannot clip a claim; bound every site's weight with secagg-max-weight instead"
        )
    if run.dp_client_level == "server-fixed":
        raise ValueError(
            "secagg = true with dp-client-level=server-fixed: the server would clip each site's update, which "
            "secure aggregation hides; use dp-client-level=client-fixed (each site clips its update and adds "
            "its share of the noise)"
        )
    if run.dp_client_level == "client-fixed":
        # Each masked entry is clipped to ±secagg-clipping-range: it must not cut the noise share's tails.
        share = run.dp_client_noise * run.dp_client_clip / max(run.min_train_nodes, 1) ** 0.5
        needed = run.dp_client_clip + SECAGG_NOISE_TAILS * share
        if run.secagg_clipping_range < needed:
            raise ValueError(
                f"secagg-clipping-range {run.secagg_clipping_range:g} < dp-client-clip + {SECAGG_NOISE_TAILS:g} "
                f"x the sites' noise share std ({needed:g}): SecAgg+'s clipping would cut the DP noise"
            )
    if run.secagg_reconstruction_threshold >= run.secagg_num_shares:
        raise ValueError(
            f"secagg-reconstruction-threshold ({run.secagg_reconstruction_threshold}) must be less than "
            f"secagg-num-shares ({run.secagg_num_shares}), so that a site may drop out and be unmasked"
        )
    if run.min_train_nodes < run.secagg_reconstruction_threshold:
        raise ValueError(
            f"secagg = true needs min-train-nodes >= secagg-reconstruction-threshold "
            f"({run.min_train_nodes} < {run.secagg_reconstruction_threshold}): fewer sites cannot unmask a sum"
        )
