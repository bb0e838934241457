"""A strategy's part in the round loop beyond aggregating weights: what it adds to each round.

:class:`server.federation.Federation` asks the strategy's ``round_state`` (this no-op one when it has
none) for extra train-config entries and extra records to send, hands it the replies before their
updates are validated (so it takes its own records out of them) and the accepted ones after the
aggregate. A strategy that needs per-round state of its own (SCAFFOLD's control variates,
:mod:`server.scaffold`; FedDyn's would fit the same way) implements these and the round loop stays as it is.
Its :meth:`RoundState.state_dict` goes into every checkpoint (key ``"round_state"``) and is handed back
to :meth:`RoundState.load_state_dict` when the run resumes, so a resumed run continues the same state.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, Message


class RoundState:
    """The hooks, as no-ops: what a strategy without state of its own contributes."""

    def train_config(self, rnd: int) -> dict[str, Any]:
        """Entries added to round ``rnd``'s train config."""
        return {}

    def train_records(self, rnd: int) -> dict[str, ArrayRecord]:
        """Records sent to every site with round ``rnd``'s weights."""
        return {}

    def take(self, replies: list[Message], arrays: ArrayRecord) -> list[tuple[Message, str]]:
        """Take this strategy's records out of ``replies`` (before update validation); the replies whose
        records are missing or unusable, each with the reason."""
        return []

    def absorb(self, rnd: int, accepted: list[Message], total_sites: int) -> None:
        """Update the state from the replies that went into round ``rnd``'s aggregate."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this state (torch-loadable with ``weights_only``);
        empty when there is nothing to keep."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state_dict`."""


NO_STATE = RoundState()


def round_state_of(strategy: object) -> RoundState:
    """The strategy's :class:`RoundState` (``strategy.round_state``), else the no-op one."""
    state = getattr(strategy, "round_state", None)
    return state if isinstance(state, RoundState) else NO_STATE
