"""An in-process grid: the real ServerApp's messages handed to the real ClientApp of each site.

Benchmarks and tests that run ``server.app.main`` without a SuperLink use it: one Flower ``Context``
per site (node ids 100, 101, ...), kept across messages as a SuperNode keeps it; messages are
deep-copied both ways, so neither side can touch the other's objects, as on a wire. The caller's
message is stamped with its id while pushed, as Flower's grids do. Subclasses change what a site
answers by overriding :meth:`LoopbackGrid.deliver` (count bytes, tamper, crash, lose a reply).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

import client.app

#: The first site's node id; site i is ``FIRST_NODE + i``.
FIRST_NODE = 100


class LoopbackGrid(Grid):
    """Delivers each pushed message to the ClientApp of its destination site, in this process."""

    def __init__(self, sites: list[Path], run_config: dict[str, Any], run_id: int) -> None:
        self.contexts = {
            FIRST_NODE + i: Context(run_id, FIRST_NODE + i, {"site-config": str(path)}, RecordDict(), run_config)
            for i, path in enumerate(sites)
        }
        self._replies: dict[str, Message] = {}
        self._sent = 0
        self._run = Run.create_empty(run_id)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{self._sent}"
            self._sent += 1
            request = copy.deepcopy(message)
            reply = self.deliver(request)
            if reply is not None:  # a lost reply is never pulled: the server waits out its round-timeout
                self._replies[request.metadata.message_id] = reply
            ids.append(request.metadata.message_id)
        return ids

    def deliver(self, request: Message) -> Message | None:
        """The site's reply to ``request``, as it leaves the site (``None``: it never arrives)."""
        return copy.deepcopy(client.app.app(request, self.contexts[request.metadata.dst_node_id]))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise AssertionError("the ServerApp collects replies itself (server.collect), never via send_and_receive")
