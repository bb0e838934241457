"""Client-level differential privacy at the server: Flower's fixed-clipping wrappers and their accountant.

``dp-client-level = server-fixed``: the server clips each site's update to ``dp-client-clip`` and adds
Gaussian noise of ``dp-client-noise · clip / sites`` to the mean (the server sees raw updates).
``client-fixed``: each site clips its own update (``client.privacy.client_dp_mod``) and the server
adds the same noise. With noise > 0, Flower's RDP accountant turns every round into (ε, δ) for the
whole contribution of any one site, recorded as ``dp-client-epsilon`` in the round's ``__global__`` row.
Under SecAgg+ only ``client-fixed`` runs, without Flower's wrapper: each site clips its update and adds
its share of the noise before masking (``common.distributed_dp``); the server only accounts.
"""

from __future__ import annotations

from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from common.runconfig import RunConfig


def wrap_client_dp(strategy: Strategy, run: RunConfig, rounds_done: int = 0) -> Strategy:
    """``strategy`` inside Flower's client-level DP wrapper (unchanged when ``dp-client-level`` is off).

    ``rounds_done`` rounds already released (a resumed run) are composed into the accountant first,
    so ε continues from where the run stopped. Accounting is without sampling amplification: every
    site takes part in every round (``fraction-train = 1``, checked in the run config).
    """
    if run.dp_client_level == "off" or run.secagg:
        return strategy  # under SecAgg+ the sites clip and noise (client.secagg); see secure_client_dp_metrics
    sites = run.min_available_nodes
    accountant = _site_accountant(run, rounds_done) if run.dp_client_noise > 0 else None
    wrapper = (
        DifferentialPrivacyServerSideFixedClipping
        if run.dp_client_level == "server-fixed"
        else DifferentialPrivacyClientSideFixedClipping
    )
    return wrapper(strategy, run.dp_client_noise, run.dp_client_clip, sites, accountant=accountant)


def _site_accountant(run: RunConfig, rounds: int) -> RdpAccountant:
    """Client-level accountant over the run's sites (every site every round), with ``rounds`` already spent."""
    sites = run.min_available_nodes
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=run.dp_delta,
            population_size=sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    if rounds > 0:
        accountant.compose(GaussianPrivacyEvent(run.dp_client_noise, sites, sites), count=rounds)
    return accountant


def secure_client_dp_metrics(run: RunConfig, rounds: int) -> dict[str, float]:
    """(ε, δ) per site after ``rounds`` SecAgg+ rounds with client-level DP; empty without it.

    Every unmasked sum carried the sites' noise shares, at least N(0, σ²C²) (``common.distributed_dp``):
    the same Gaussian mechanism per round as the server-side wrapper's, composed in the same accountant.
    A resumed run counts every round from the first.
    """
    if not run.secagg or run.dp_client_level == "off" or run.dp_client_noise <= 0:
        return {}
    spent = _site_accountant(run, rounds).get_privacy_spent()
    return {"dp-client-epsilon": float(spent.epsilon), "dp-client-delta": float(spent.delta)}


def client_dp_metrics(strategy: Strategy) -> dict[str, float]:
    """The (ε, δ) the wrapper's accountant has spent so far; empty without accounting."""
    spent = getattr(strategy, "privacy_spent", lambda: None)()
    if spent is None:
        return {}
    return {"dp-client-epsilon": float(spent.epsilon), "dp-client-delta": float(spent.delta)}
