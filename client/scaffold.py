"""SCAFFOLD at the site: local training corrected by the control variates, and the site's variate kept.

The server's ``c`` arrives as an extra record (``common.protocol.SCAFFOLD_GLOBAL``); the site's own
``c_i`` lives in the ClientApp's ``Context.state`` for the run (a new run, a resumed one included,
starts it from zero, as the server does its ``c``). Training runs with
:class:`common.scaffold.ControlledSteps` as its step hook; the reply carries ``Δc_i``
(``SCAFFOLD_DELTA``) beside the weights. Only the shared parameters (those the server sent) are
controlled: site-local layers never leave the site, so they carry no variate.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message
from torch import nn

from common.protocol import ARRAYS, SCAFFOLD_DELTA, SCAFFOLD_GLOBAL
from common.scaffold import ControlledSteps, local_delta

#: Context.state ArrayRecord: this site's control variate c_i.
LOCAL_KEY = "fedsense.scaffold.c-local"


class ScaffoldRound:
    """One training round's SCAFFOLD at a site: the step hook, then the record for the reply."""

    def __init__(self, msg: Message, context: Context, model: nn.Module) -> None:
        records = msg.content.array_records
        global_c = records[SCAFFOLD_GLOBAL].to_torch_state_dict() if SCAFFOLD_GLOBAL in records else {}
        state = context.state.array_records
        self.local = state[LOCAL_KEY].to_torch_state_dict() if LOCAL_KEY in state else {}
        self.step_hook = ControlledSteps(model, global_c, self.local, names=records[ARRAYS].keys())

    def finish(self, context: Context) -> dict[str, ArrayRecord]:
        """Keep ``c_i⁺`` at the site; the reply's record of ``Δc_i``."""
        new = self.step_hook.new_local()
        context.state[LOCAL_KEY] = ArrayRecord(new)
        return {SCAFFOLD_DELTA: ArrayRecord(local_delta(new, self.local))}
