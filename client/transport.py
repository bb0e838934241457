"""Packed messages at the site: every array of a message travels as one buffer (``common.packing``).

The ServerApp packs what it sends (``server.transport``); this mod unpacks it before the ClientApp
sees it and packs the ClientApp's reply, so the handlers, the other mods and the egress audit see
ordinary named arrays.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from common.packing import Manifest, pack, unpack

#: The ConfigRecord of a packed message: the manifest of each of its packed ArrayRecords.
MANIFEST = "fedsense.packing"
PACKED = "packed"  # the one array of a packed ArrayRecord


def pack_content(content: RecordDict) -> RecordDict:
    """``content`` with each ArrayRecord replaced by one packed array, plus the manifest record."""
    out, manifests = RecordDict(), {}
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            buffer, manifest = pack({name: array.numpy() for name, array in record.items()})
            out[key], manifests = ArrayRecord({PACKED: Array(buffer)}), {**manifests, **manifest.to_config(key)}
        else:
            out[key] = record
    out[MANIFEST] = ConfigRecord(manifests)
    return out


def unpack_content(content: RecordDict) -> RecordDict:
    """What :func:`pack_content` packed, as it was; content without a manifest is returned unchanged."""
    if MANIFEST not in content.config_records:
        return content
    manifests = content.config_records[MANIFEST]
    out = RecordDict()
    for key, record in content.items():
        if key == MANIFEST:
            continue
        if isinstance(record, ArrayRecord):
            arrays = unpack(record[PACKED].numpy(), Manifest.from_config(manifests, key))
            out[key] = ArrayRecord({name: Array(a) for name, a in arrays.items()})
        else:
            out[key] = record
    return out


def packed_transport_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Unpack the server's message, run the ClientApp, pack its reply (an error reply has no content)."""
    msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    if not reply.has_error() and reply.content.array_records:
        reply.content = pack_content(reply.content)
    return reply
