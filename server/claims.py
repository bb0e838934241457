"""Bounded claims: a site's self-reported ``num-examples`` never weighs more than the operator allows.

FedAvg / FedProx weight each update by the ``num-examples`` its site reports, so one site that
claims ten times its data dominates the aggregate. The operator registers each site's cap in the
run config (``site-caps``, a JSON object ``{"site-a": 120, ...}``; empty = no caps). Before
aggregation each train reply is checked against it: a claim above the cap is clipped to the cap
(the update still counts, with the weight the operator allowed) and the clipping is recorded; a
site without a cap, when caps are set, is rejected.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from flwr.app import Message

from common.protocol import NUM_EXAMPLES
from server.strategy import Rejection, site_of

logger = logging.getLogger(__name__)

WEIGHT_KEY = NUM_EXAMPLES


@dataclass(frozen=True)
class Clipped:
    """A claim that was cut down to its site's cap."""

    site: str
    claimed: float
    cap: int

    @property
    def reason(self) -> str:
        return f"num-examples {self.claimed:g} > cap {self.cap}: clipped to {self.cap}"


def apply_caps(
    replies: list[Message], caps: Mapping[str, int], key: str = WEIGHT_KEY
) -> tuple[list[Message], list[Rejection], list[Clipped]]:
    """Clip each reply's ``key`` (``num-examples``) to its site's cap (in place); reject uncapped sites.

    Evaluation replies are capped the same way (their ``num-examples`` weigh the global validation
    metrics); ``key`` names the claim, e.g. ``eval/num-examples`` for an evaluation carried by a
    training reply (a reply without that key claims nothing and passes). Returns the replies that may
    be counted, the rejected ones and the clipped claims. With no caps configured every reply passes unchanged.
    """
    if not caps:
        return replies, [], []
    kept: list[Message] = []
    rejected: list[Rejection] = []
    clipped: list[Clipped] = []
    for msg in replies:
        site = site_of(msg)
        cap = caps.get(site)
        if cap is None:
            rejected.append(
                Rejection(site, "no num-examples cap registered for this site (site-caps)", msg.metadata.message_id)
            )
            continue
        record = next(iter(msg.content.metric_records.values()))
        if key not in record:
            kept.append(msg)
            continue
        claimed = float(cast(float, record[key]))
        if claimed > cap:
            record[key] = int(cap)
            clipped.append(Clipped(site, claimed, int(cap)))
            logger.warning("site %s: %s", site, clipped[-1].reason)
        kept.append(msg)
    for r in rejected:
        logger.warning("rejected update from %s: %s", r.site, r.reason)
    return kept, rejected, clipped
