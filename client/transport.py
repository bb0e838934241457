"""Packed messages at the site: every array of a message travels as one buffer (``common.protocol``).

The ServerApp packs what it sends (``server.transport``); this mod unpacks it before the ClientApp
sees it and packs the ClientApp's reply, so the handlers, the other mods and the egress audit see
ordinary named arrays. A message of another protocol version is refused with an error reply that
names both versions.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from common import protocol

#: Flower's record classes, for :mod:`common.protocol`'s walk over a message's records.
RECORDS = protocol.RecordTypes(RecordDict, ArrayRecord, Array, ConfigRecord)


def packed_transport_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Unpack the server's message, run the ClientApp, pack its reply (an error reply has no content).

    Weights that came as float16 (``transport-dtype = "fp16"``) are answered in kind: the reply's weights
    travel as float16 differences from the weights received.
    """
    fp16 = protocol.is_fp16(msg.content)
    msg.content = protocol.unpack_content(msg.content, RECORDS)
    received = None
    if fp16 and protocol.ARRAYS in msg.content.array_records:
        received = {name: a.numpy() for name, a in msg.content.array_records[protocol.ARRAYS].items()}
    reply = call_next(msg, context)
    if not reply.has_error() and reply.content.array_records:
        reply.content = protocol.pack_content(reply.content, RECORDS, fp16=fp16, base=received)
    return reply
