"""The wire protocol between the ServerApp and the ClientApp, written once for both sides.

Message kinds, record keys, the train-config keys, the protocol version and the packing of a message's
arrays (``common.packing``) live here. ``common`` knows no Flower, so the functions that walk a message's
records take Flower's record classes as a :class:`RecordTypes` value; ``client.transport`` and
``server.transport`` pass theirs, and neither side spells out the walk or the keys again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import FedSenseError
from common.packing import Manifest, pack, unpack

#: Bumped whenever a message's layout changes; both sides must speak the same one.
PROTOCOL_VERSION = 2  # 2: the train config may carry LOCAL_STEPS (adaptive-local-steps)

# Record keys of a message's content.
ARRAYS = "arrays"  #: the model's weights (ArrayRecord)
CONFIG = "config"  #: the server's instructions (ConfigRecord)
METRICS = "metrics"  #: the site's scalars (MetricRecord)
SITE = "site"  #: facts about the replying site (ConfigRecord)
#: The ConfigRecord of a packed message: the protocol version and the manifest of each packed ArrayRecord.
MANIFEST = "fedsense.packing"
PACKED = "packed"  #: the one array of a packed ArrayRecord
VERSION_KEY = "protocol-version"  #: in the manifest record
SCAFFOLD_GLOBAL = "scaffold.c"  #: SCAFFOLD: the server's control variate, sent with the weights (ArrayRecord)
SCAFFOLD_DELTA = "scaffold.delta-c"  #: SCAFFOLD: a site's control-variate change, in its reply (ArrayRecord)

# Keys of the train config the server sends.
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
EVALUATE_FIRST = "evaluate-first"  #: evaluate-with-train: evaluate the received model before training
#: adaptive-local-steps: this site's local steps for this round, instead of the run config's ``local-steps``.
LOCAL_STEPS = "local-steps"
#: Fine-tuning: the round whose site-kept state (local layers) belongs with the arrays sent, the run's best
#: round; without it a site uses its state of ``server-round``.
STATE_ROUND = "state-round"

#: The ClientApp's fine-tuning action: message type ``train.finetune``.
FINETUNE_ACTION = "finetune"
#: Prefix of the metrics a training reply carries for the evaluation it did first (``evaluate-first``).
CARRIED = "eval/"


class ProtocolMismatch(FedSenseError):
    """The other side packed its message for another protocol version."""


@dataclass(frozen=True)
class RecordTypes:
    """Flower's record classes, handed in by the side that knows Flower (``common`` imports none)."""

    record_dict: Any
    array_record: Any
    array: Any
    config_record: Any


def check_version(manifest: Mapping[str, Any]) -> None:
    """Raise :class:`ProtocolMismatch`, naming both versions, unless ``manifest`` is this protocol's."""
    version = manifest.get(VERSION_KEY)
    if version != PROTOCOL_VERSION:
        spoken = f"protocol version {version}" if version is not None else "no protocol version (an older FedSense)"
        raise ProtocolMismatch(
            f"message packed with {spoken}, this side speaks protocol version {PROTOCOL_VERSION}: "
            "run the same FedSense release on the server and at the sites"
        )


def pack_content(content: Any, types: RecordTypes) -> Any:
    """``content`` with each ArrayRecord replaced by one packed array, plus the versioned manifest record."""
    out, manifest = types.record_dict(), dict[str, Any]({VERSION_KEY: PROTOCOL_VERSION})
    for key, record in content.items():
        if isinstance(record, types.array_record):
            buffer, packed = pack({name: array.numpy() for name, array in record.items()})
            out[key] = types.array_record({PACKED: types.array(buffer)})
            manifest.update(packed.to_config(key))
        else:
            out[key] = record
    out[MANIFEST] = types.config_record(manifest)
    return out


def unpack_content(content: Any, types: RecordTypes) -> Any:
    """What :func:`pack_content` packed, as it was; content without a manifest is returned unchanged.

    Raises :class:`ProtocolMismatch` when the manifest is another protocol version's.
    """
    if MANIFEST not in content.config_records:
        return content
    manifest = content.config_records[MANIFEST]
    check_version(manifest)
    out = types.record_dict()
    for key, record in content.items():
        if key == MANIFEST:
            continue
        if isinstance(record, types.array_record):
            arrays = unpack(record[PACKED].numpy(), Manifest.from_config(manifest, key))
            out[key] = types.array_record({name: types.array(a) for name, a in arrays.items()})
        else:
            out[key] = record
    return out
