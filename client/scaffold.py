"""SCAFFOLD at the site: local training corrected by the control variates, and the site's variate kept.

The server's ``c`` arrives as an extra record (``common.protocol.SCAFFOLD_GLOBAL``); the site's own
``c_i`` is the strategy state :class:`client.site_state.SiteMemory` keeps (in the run's Context and,
with ``site-state-dir``, in the site's files, so a resumed run continues it as the server does ``c``).
Training runs with :class:`common.scaffold.ControlledSteps` as its step hook; the reply carries
``Δc_i`` (``SCAFFOLD_DELTA``) beside the weights. Only the shared parameters (those the server sent)
are controlled: site-local layers never leave the site, so they carry no variate.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, Message
from torch import nn

from common.protocol import ARRAYS, SCAFFOLD_DELTA, SCAFFOLD_GLOBAL
from common.scaffold import ControlledSteps, Variates, local_delta


class ScaffoldRound:
    """One training round's SCAFFOLD at a site: the step hook, then the record for the reply."""

    def __init__(self, msg: Message, kept: Mapping[str, torch.Tensor], model: nn.Module) -> None:
        """``kept``: the site's ``c_i`` as of its previous round (empty before its first: zero)."""
        records = msg.content.array_records
        global_c = records[SCAFFOLD_GLOBAL].to_torch_state_dict() if SCAFFOLD_GLOBAL in records else {}
        self.local = dict(kept)
        self.step_hook = ControlledSteps(model, global_c, self.local, names=records[ARRAYS].keys())

    def finish(self) -> tuple[Variates, dict[str, ArrayRecord]]:
        """``c_i⁺``, for the site to keep, and the reply's record of ``Δc_i``."""
        new = self.step_hook.new_local()
        return new, {SCAFFOLD_DELTA: ArrayRecord(local_delta(new, self.local))}
