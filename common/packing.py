"""Many named arrays as one byte buffer and a manifest, and back.

Flower moves every array of a message as objects of their own, one request per object and hop
(ServerApp → SuperLink → SuperNode → ClientApp and back). A U-Net's 19 arrays are some forty
requests per hop, so a model of 2 MB took seconds per message; packed, it is a handful.
No Flower here: the ClientApp's mod and the ServerApp's grid wrap these in Flower records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.errors import FedSenseError


@dataclass(frozen=True)
class Manifest:
    """What was packed, in order: each array's name, dtype (numpy ``dtype.str``) and shape."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]

    def to_config(self, prefix: str) -> dict[str, list[str]]:
        """As string lists under ``prefix.names`` / ``.dtypes`` / ``.shapes`` (a shape as "2,3"; "" for 0-d)."""
        return {
            f"{prefix}.names": list(self.names),
            f"{prefix}.dtypes": list(self.dtypes),
            f"{prefix}.shapes": [",".join(str(n) for n in shape) for shape in self.shapes],
        }

    @classmethod
    def from_config(cls, values: Mapping[str, object], prefix: str) -> Manifest:
        """The manifest :meth:`to_config` wrote under ``prefix``; ``FedSenseError`` if it is not there."""
        try:
            names, dtypes, shapes = (list(values[f"{prefix}.{part}"]) for part in ("names", "dtypes", "shapes"))  # type: ignore[call-overload]
            return cls(
                [str(n) for n in names],
                [str(d) for d in dtypes],
                [[int(n) for n in str(shape).split(",")] if shape else [] for shape in shapes],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FedSenseError(f"packed arrays: no valid manifest for {prefix!r} ({exc})") from None


def pack(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Manifest]:
    """All ``arrays`` as one uint8 buffer (C order, each array's bytes in turn) and its manifest."""
    # Not np.ascontiguousarray: it turns a 0-d array (a DC weight) into shape (1,).
    parts = [np.array(a, order="C", copy=None) for a in arrays.values()]
    manifest = Manifest(list(arrays), [a.dtype.str for a in parts], [list(a.shape) for a in parts])
    buffer = np.concatenate([a.reshape(-1).view(np.uint8) for a in parts]) if parts else np.zeros(0, np.uint8)
    return buffer, manifest


def unpack(buffer: np.ndarray, manifest: Manifest) -> dict[str, np.ndarray]:
    """The arrays :func:`pack` packed, as fresh arrays (never views of ``buffer``).

    Raises ``FedSenseError`` when the manifest does not describe the buffer.
    """
    if not len(manifest.names) == len(manifest.dtypes) == len(manifest.shapes):
        raise FedSenseError("packed arrays: the manifest's names, dtypes and shapes differ in length")
    data = np.asarray(buffer).reshape(-1).view(np.uint8)
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, dtype_str, shape in zip(manifest.names, manifest.dtypes, manifest.shapes):
        dtype = np.dtype(dtype_str)
        size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if offset + size > data.size:
            raise FedSenseError(f"packed arrays: {name!r} runs past the end of the buffer")
        out[name] = data[offset : offset + size].view(dtype).reshape(shape).copy()
        offset += size
    if offset != data.size:
        raise FedSenseError(f"packed arrays: {data.size - offset} bytes left over after the last array")
    return out
