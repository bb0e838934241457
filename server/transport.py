"""Packed messages at the ServerApp: every array of a message travels as one buffer (``common.packing``).

Flower sends each array of a message as objects of their own, one request per object on every hop;
:class:`PackedGrid` packs the arrays of what the ServerApp sends and unpacks the sites' replies, so
the federation, the strategies and the checkpoints see ordinary named arrays. The ClientApp's
``client.transport`` mod does the same at the site; both use :mod:`common.protocol`, which owns the
layout and the protocol version.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common import protocol

#: Flower's record classes, for :mod:`common.protocol`'s walk over a message's records.
RECORDS = protocol.RecordTypes(RecordDict, ArrayRecord, Array, ConfigRecord)


class PackedGrid(Grid):
    """``grid`` with the arrays of every pushed message packed and those of every pulled reply unpacked.

    With ``fp16`` (``transport-dtype = "fp16"``) the weights go out as float16 and the sites answer with
    float16 differences from what they received; the grid keeps, per message, those received weights
    until its reply is pulled, to add the differences back.
    """

    def __init__(self, grid: Grid, fp16: bool = False) -> None:
        self.grid = grid
        self.fp16 = fp16
        self.received: dict[str, Mapping[str, np.ndarray]] = {}

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
        messages, received = self._packed(messages)
        ids = list(self.grid.push_messages(messages))
        self._remember(messages, received)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._unpacked(self.grid.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages, received = self._packed(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self._remember(messages, received)  # the grid stamped the ids while sending
        return self._unpacked(replies)

    def _packed(self, messages: Iterable[Message]) -> tuple[list[Message], dict[int, Mapping[str, np.ndarray]]]:
        """``messages`` packed in place (the grid stamps its ids on these same objects, as callers expect),
        and with ``fp16``, by position, the weights each site will receive.

        A strategy gives every site the same content object: it is packed (and rounded) once.
        """
        messages = list(messages)
        done: dict[int, tuple[RecordDict, RecordDict, Mapping[str, np.ndarray] | None]] = {}  # the original kept alive
        received: dict[int, Mapping[str, np.ndarray]] = {}
        for i, msg in enumerate(messages):
            if msg.content.array_records:
                original = msg.content
                if id(original) not in done:
                    sent: Mapping[str, np.ndarray] | None = None
                    if self.fp16 and protocol.ARRAYS in original.array_records:
                        weights = {n: a.numpy() for n, a in original.array_records[protocol.ARRAYS].items()}
                        sent = protocol.received_weights(weights)
                    done[id(original)] = (original, protocol.pack_content(original, RECORDS, fp16=self.fp16), sent)
                msg.content = done[id(original)][1]
                if (weights_sent := done[id(original)][2]) is not None:
                    received[i] = weights_sent
        return messages, received

    def _remember(self, messages: list[Message], received: Mapping[int, Mapping[str, np.ndarray]]) -> None:
        for i, weights in received.items():
            if messages[i].metadata.message_id:
                self.received[messages[i].metadata.message_id] = weights

    def _unpacked(self, replies: Iterable[Message]) -> list[Message]:
        """``replies`` with their arrays unpacked in place (an error reply has no content)."""
        replies = list(replies)
        for reply in replies:
            base = self.received.pop(reply.metadata.reply_to_message_id, None)
            if not reply.has_error():
                reply.content = protocol.unpack_content(reply.content, RECORDS, base=base)
        return replies
