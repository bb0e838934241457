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

import numpy as np

from common.errors import FedSenseError
from common.packing import Manifest, pack, unpack

#: Bumped whenever a message's layout changes; both sides must speak the same one.
PROTOCOL_VERSION = 3  # 2: the train config may carry LOCAL_STEPS; 3: fp16 transport (ENCODING)

# Record keys of a message's content.
ARRAYS = "arrays"  #: the model's weights (ArrayRecord)
CONFIG = "config"  #: the server's instructions (ConfigRecord)
METRICS = "metrics"  #: the site's scalars (MetricRecord)
SITE = "site"  #: facts about the replying site (ConfigRecord)
#: The ConfigRecord of a packed message: the protocol version and the manifest of each packed ArrayRecord.
MANIFEST = "fedsense.packing"
PACKED = "packed"  #: the one array of a packed ArrayRecord
VERSION_KEY = "protocol-version"  #: in the manifest record
#: In the manifest, per ArrayRecord: how its float32 arrays named under ``<key>.fp16`` travel (absent: as they are).
ENCODING = "encoding"
FP16 = "fp16"  #: rounded to float16 (the server's weights, on their way to the sites)
#: float16 differences from the weights the site received (a site's reply to fp16 weights): half the bytes, and
#: the rounding error is that of the round's change, not of the weights.
FP16_DELTA = "fp16-delta"
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

# Keys of the SITE record: who replied.
SITE_NAME = "name"  #: the site's name; the server keys caps, records and receipts by it
SUPERVISION = "supervision"  #: "full", or "self" for a self-supervised (SSDU) site; absent means "full"
PRECISION = "precision"  #: what the site's network trained at ("fp32" / "bf16"; precision = auto resolves per site)

# Metric keys of a site's reply that the server reads (the others it records as they come).
NUM_EXAMPLES = "num-examples"  #: the examples the site claims; FedAvg weighs by it (``server.claims`` caps it)
DP_WEIGHT = "dp-weight"  #: client-level DP: every site weighs 1 (the server aggregates by this key then)
COMPUTE_SECONDS = "compute-seconds"  #: the site's own compute, told apart from federation overhead
STEPS = "steps"  #: local steps taken (adaptive-local-steps measures a site's seconds per step)
DP_EPSILON = "dp-epsilon"  #: DP-SGD: the ε the site has spent
DP_BUDGET_EXHAUSTED = "dp-budget-exhausted"  #: DP-SGD: 1 when another round would pass the target ε (no weights)

# SecAgg+ travels in Flower's legacy FitIns / FitRes, whose config and metrics are flat dicts of scalars.
SECAGG_KEYS = "fedsense-keys"  #: in the FitIns config: the array names, as a JSON list
SECAGG_SITE = "fedsense-site"  #: in the FitRes metrics: the SITE record's SITE_NAME
SECAGG_SUPERVISION = "fedsense-supervision"  #: in the FitRes metrics: the SITE record's SUPERVISION
SECAGG_CLIPPED = "secagg-clipped-fraction"  #: metric: the share of update entries secagg-clipping-range clipped
DP_CLIPPED = "dp-client-clipped"  #: metric (client-level DP under SecAgg+): 1 when the update was above dp-client-clip

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


def pack_content(
    content: Any, types: RecordTypes, fp16: bool = False, base: Mapping[str, np.ndarray] | None = None
) -> Any:
    """``content`` with each ArrayRecord replaced by one packed array, plus the versioned manifest record.

    ``fp16`` (``transport-dtype = "fp16"``): the float32 arrays of the :data:`ARRAYS` record travel as
    float16. With ``base``, the weights this side received that way, they travel as their float16
    differences from ``base`` (:data:`FP16_DELTA`), when every one of them has its counterpart there.
    """
    out, manifest = types.record_dict(), dict[str, Any]({VERSION_KEY: PROTOCOL_VERSION})
    for key, record in content.items():
        if isinstance(record, types.array_record):
            arrays = {name: array.numpy() for name, array in record.items()}
            if key == ARRAYS and (fp16 or base is not None):
                arrays, encoding, names = _to_fp16(arrays, base)
                manifest.update({f"{key}.{ENCODING}": encoding, f"{key}.{FP16}": names})
            buffer, packed = pack(arrays)
            out[key] = types.array_record({PACKED: types.array(buffer)})
            manifest.update(packed.to_config(key))
        else:
            out[key] = record
    out[MANIFEST] = types.config_record(manifest)
    return out


def _to_fp16(
    arrays: dict[str, np.ndarray], base: Mapping[str, np.ndarray] | None
) -> tuple[dict[str, np.ndarray], str, list[str]]:
    """The float32 ``arrays`` as float16: themselves, or their differences from ``base`` where it has them all."""
    names = [n for n, a in arrays.items() if a.dtype == np.float32]
    delta = base is not None and all(n in base and base[n].shape == arrays[n].shape for n in names)
    out = dict(arrays)
    for name in names:
        value = arrays[name] - base[name] if delta and base is not None else arrays[name]
        out[name] = np.asarray(value, dtype=np.float16)
    return out, FP16_DELTA if delta else FP16, names


def received_weights(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a site receives of ``arrays`` sent with ``fp16``: its float32 arrays rounded to float16 and back."""
    return {n: a.astype(np.float16).astype(np.float32) if a.dtype == np.float32 else a for n, a in arrays.items()}


def is_fp16(content: Any) -> bool:
    """Whether packed ``content`` carries its :data:`ARRAYS` as float16 weights (the site then replies in kind)."""
    if MANIFEST not in content.config_records:
        return False
    encoding: object = content.config_records[MANIFEST].get(f"{ARRAYS}.{ENCODING}")
    return encoding == FP16


def unpack_content(content: Any, types: RecordTypes, base: Mapping[str, np.ndarray] | None = None) -> Any:
    """What :func:`pack_content` packed, as it was; content without a manifest is returned unchanged.

    float16 arrays come back as float32: rounded weights as they are, differences added to ``base`` (the
    weights the other side received, :func:`received_weights`). Raises :class:`ProtocolMismatch` when the
    manifest is another protocol version's, ``FedSenseError`` for differences without their ``base``.
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
            encoding = manifest.get(f"{key}.{ENCODING}")
            if encoding is not None:
                arrays = _from_fp16(arrays, str(encoding), [str(n) for n in manifest[f"{key}.{FP16}"]], base)
            out[key] = types.array_record({name: types.array(a) for name, a in arrays.items()})
        else:
            out[key] = record
    return out


def _from_fp16(
    arrays: dict[str, np.ndarray], encoding: str, names: list[str], base: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    if encoding not in (FP16, FP16_DELTA):
        raise FedSenseError(f"packed arrays: unknown encoding {encoding!r}")
    if encoding == FP16_DELTA and (base is None or any(n not in base for n in names)):
        raise FedSenseError("packed arrays: float16 differences arrived without the weights they are relative to")
    out = dict(arrays)
    for name in names:
        if name not in arrays or arrays[name].dtype != np.float16:
            raise FedSenseError(f"packed arrays: {name!r} is listed as float16 but is not")
        value = arrays[name].astype(np.float32)
        # np.asarray: a 0-d sum is a numpy scalar, and the arrays stay 0-d (a DC weight)
        out[name] = np.asarray(base[name] + value) if encoding == FP16_DELTA and base is not None else value
    return out
