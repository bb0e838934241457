"""SCAFFOLD at the server: FedAvg's aggregate, with the server's control variate as round state.

The weights are aggregated as FedAvg does (global step size 1); the control variate ``c`` goes to the
sites as an extra record (``common.protocol.SCAFFOLD_GLOBAL``), each site's ``Δc_i`` comes back as one
(``SCAFFOLD_DELTA``) and is taken out of the reply before the update is validated; the deltas of the
accepted updates move ``c`` (:func:`common.scaffold.server_update`). ``c`` is checkpointed with the
weights and restored when the run resumes; each site keeps its own ``c_i`` (``client.site_state``), so a
resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg

from common.protocol import SCAFFOLD_DELTA, SCAFFOLD_GLOBAL
from common.scaffold import server_update
from server.round_state import RoundState


class ScaffoldState(RoundState):
    """The server's control variate ``c`` (parameter name -> array; a missing name is zero)."""

    def __init__(self) -> None:
        self.c: dict[str, np.ndarray] = {}
        self.deltas: dict[int, dict[str, np.ndarray]] = {}  # id() of a reply of this round -> its Δc_i

    def train_records(self, rnd: int) -> dict[str, ArrayRecord]:
        if not self.c:  # round 1: every variate is zero, and zero is what a site assumes without one
            return {}
        return {SCAFFOLD_GLOBAL: ArrayRecord({name: Array(value) for name, value in self.c.items()})}

    def take(self, replies: list[Message], arrays: ArrayRecord) -> list[tuple[Message, str]]:
        shapes = {name: a.numpy().shape for name, a in arrays.items()}
        self.deltas, bad = {}, []
        for msg in replies:
            if SCAFFOLD_DELTA not in msg.content.array_records:
                bad.append((msg, f"no {SCAFFOLD_DELTA} record (a SCAFFOLD site sends its control-variate change)"))
                continue
            delta = {name: a.numpy() for name, a in msg.content.array_records[SCAFFOLD_DELTA].items()}
            del msg.content[SCAFFOLD_DELTA]
            reason = _check(delta, shapes)
            if reason:
                bad.append((msg, f"{SCAFFOLD_DELTA}: {reason}"))
            else:
                self.deltas[id(msg)] = delta
        return bad

    def absorb(self, rnd: int, accepted: list[Message], total_sites: int) -> None:
        deltas = [self.deltas[id(m)] for m in accepted if id(m) in self.deltas]
        self.c = server_update(self.c, deltas, max(total_sites, len(deltas)))
        self.deltas = {}

    def state_dict(self) -> dict[str, Any]:
        """``{"c": name -> tensor}`` (tensors, so the checkpoint loads with ``weights_only``)."""
        return {"c": {name: torch.from_numpy(np.array(value)) for name, value in self.c.items()}} if self.c else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.c = {name: value.numpy() for name, value in state.get("c", {}).items()}


def _check(delta: dict[str, np.ndarray], shapes: dict[str, Any]) -> str:
    for name, value in delta.items():
        if name not in shapes:
            return f"{name!r} is no array of the global model"
        if value.shape != shapes[name]:
            return f"{name}: shape {value.shape} != {shapes[name]}"
        if not np.all(np.isfinite(value)):
            return f"{name}: non-finite values"
    return ""


class Scaffold(FedAvg):
    """FedAvg whose :attr:`round_state` carries SCAFFOLD's server control variate."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.round_state = ScaffoldState()
