"""Adaptive local steps: slow sites get fewer steps, so they reply by the round's deadline.

With ``round-deadline`` the server aggregates without the sites still training; a site that is always
slower than the deadline would never contribute. With ``adaptive-local-steps`` the server measures each
site's seconds per local step (its reply's ``compute-seconds`` / ``steps``, late replies included) and
what the rest of the round costs it (the reply's arrival time minus ``compute-seconds``: set-up and
transport; a node's first reply, in time or late, also holds its start-up, so overhead is learnt from
its next reply in time, and until then taken to be the other nodes' median), and gives it, for the next
round, the steps that fit in :data:`SAFETY` of the deadline, never more than ``local-steps`` nor fewer
than one. A site that misses the deadline before any measurement of it arrives has its steps halved;
every reply in time lets them double again, up to what its measurement allows.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable, Mapping

from flwr.app import Message

from common.protocol import COMPUTE_SECONDS, STEPS
from common.runconfig import RunConfig

logger = logging.getLogger(__name__)

#: Share of the deadline a site's round is planned to take: the rest absorbs the step time's jitter.
SAFETY = 0.8


class Pace:
    """Per-node step times and the local steps each node gets next round (by Flower node id)."""

    def __init__(self, run: RunConfig) -> None:
        self.enabled = run.adaptive_local_steps
        self.deadline, self.base = run.round_deadline, run.local_steps
        self.step_seconds: dict[int, float] = {}
        self.overhead: dict[int, float] = {}
        #: Steps a node may get at most, lowered by each missed deadline before a measurement arrives.
        self.cap: dict[int, int] = {}
        #: Nodes whose first reply has been seen (its overhead was start-up, not a round's cost).
        self.started: set[int] = set()

    def observe(self, replies: Iterable[Message], reply_seconds: Mapping[str, float]) -> None:
        """Learn from training replies; ``reply_seconds`` holds the arrival times of this phase's own replies."""
        for msg in replies:
            if msg.has_error() or not msg.content.metric_records:
                continue
            metrics = next(iter(msg.content.metric_records.values()))
            steps, compute = metrics.get(STEPS), metrics.get(COMPUTE_SECONDS)
            if not isinstance(steps, (int, float)) or not isinstance(compute, (int, float)) or steps <= 0:
                continue
            node = msg.metadata.src_node_id
            self.step_seconds[node] = float(compute) / float(steps)
            arrived = reply_seconds.get(msg.metadata.reply_to_message_id)
            first = node not in self.started  # late or not, the node's first reply holds its start-up
            self.started.add(node)
            if arrived is not None:  # in time: its overhead is this round's, and it may take more steps again
                if not first:
                    self.overhead[node] = max(arrived - float(compute), 0.0)
                if node in self.cap:
                    self.cap[node] = min(2 * self.cap[node], self.base)

    def missed(self, nodes: Iterable[int]) -> None:
        """These nodes missed the deadline: halve the steps of each (until its late reply measures it)."""
        for node in nodes:
            self.cap[node] = max(1, (self.steps_for(node) or self.base) // 2)

    def steps_for(self, node: int, default: int | None = None) -> int | None:
        """The local steps ``node`` gets next round; ``default`` when it needs no override (off, or fast enough)."""
        if not self.enabled:
            return default
        steps = self.cap.get(node, self.base)
        if node in self.step_seconds:
            budget = SAFETY * self.deadline - self._overhead(node)
            fits = math.floor(budget / self.step_seconds[node]) if self.step_seconds[node] > 0 else self.base
            steps = min(steps, fits)
        steps = max(1, min(steps, self.base))
        return default if steps == self.base else steps

    def _overhead(self, node: int) -> float:
        """``node``'s measured overhead; before its first measurement, the median of the other nodes'.

        Set-up and transport cost every site about the same; planning with none let a straggler's first
        round after its start-up miss the deadline again (``bench.stragglers``, round-deadline 0.8 s).
        """
        if node in self.overhead:
            return self.overhead[node]
        return statistics.median(self.overhead.values()) if self.overhead else 0.0
