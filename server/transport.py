"""Packed messages at the ServerApp: every array of a message travels as one buffer (``common.packing``).

Flower sends each array of a message as objects of their own, one request per object on every hop;
:class:`PackedGrid` packs the arrays of what the ServerApp sends and unpacks the sites' replies, so
the federation, the strategies and the checkpoints see ordinary named arrays. The ClientApp's
``client.transport`` mod does the same at the site; both use :mod:`common.protocol`, which owns the
layout and the protocol version.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common import protocol

#: Flower's record classes, for :mod:`common.protocol`'s walk over a message's records.
RECORDS = protocol.RecordTypes(RecordDict, ArrayRecord, Array, ConfigRecord)


class PackedGrid(Grid):
    """``grid`` with the arrays of every pushed message packed and those of every pulled reply unpacked."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    @property
    def run(self) -> Run:
        return self.grid.run

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(_packed(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return _unpacked(self.grid.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return _unpacked(self.grid.send_and_receive(_packed(messages), timeout=timeout))


def _packed(messages: Iterable[Message]) -> list[Message]:
    """``messages`` packed in place (the grid stamps its ids on these same objects, as callers expect).

    A strategy gives every site the same content object: it is packed once.
    """
    messages = list(messages)
    done: dict[int, tuple[RecordDict, RecordDict]] = {}  # id -> (original, packed); the original kept alive
    for msg in messages:
        if msg.content.array_records:
            original = msg.content
            if id(original) not in done:
                done[id(original)] = (original, protocol.pack_content(original, RECORDS))
            msg.content = done[id(original)][1]
    return messages


def _unpacked(replies: Iterable[Message]) -> list[Message]:
    """``replies`` with their arrays unpacked in place (an error reply has no content)."""
    replies = list(replies)
    for reply in replies:
        if not reply.has_error():
            reply.content = protocol.unpack_content(reply.content, RECORDS)
    return replies
