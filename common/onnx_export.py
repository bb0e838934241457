"""ONNX export of the reconstruction network, for runtimes other than PyTorch.

ONNX has no complex tensors, and torch 2.13's exporter cannot convert the complex coil and
data-consistency operations of the unrolled network and VarNet (complex ``unsqueeze``,
``linalg_vector_norm``, ``prod`` over complex values fail to dispatch; measured while building this).
A model whose registry entry declares ``onnx_exportable`` provides its own real-valued form through the
:class:`OnnxExportable` hook: a module at a fixed (B, C, H, W) taking k-space as real (..., 2) pairs (the
U-Net writes its one complex step, the zero-filled image ``RSS(IFFT(k))``, as real matrix products:
:class:`common.fft.RealIfft2c`). Other models are refused with the reason. Every export is run in ONNX
Runtime and compared with the PyTorch model on the same input; a difference above the tolerance fails it.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from common.artifact import Acquisition, OnnxInfo
from common.errors import ConfigError
from common.models import model_name
from common.registry import MODEL_ENTRIES

logger = logging.getLogger(__name__)

OPSET = 18
# Absolute tolerance on the output magnitude (inputs scaled so the zero-filled image peaks near 1).
TOLERANCE = 1e-3
DEFAULT_SHAPE = (1, 1, 320, 320)


@runtime_checkable
class OnnxExportable(Protocol):
    """The hook of a model whose entry declares ``onnx_exportable``."""

    def onnx_module(self, height: int, width: int) -> nn.Module:
        """The model at (H, W) as a module from real (B, C, H, W, 2) masked k-space to magnitude (B, H, W),
        equal to the model's output with an all-ones mask and coil maps, using only ONNX-convertible ops."""
        ...


def export_shape(acquisitions: Sequence[Acquisition]) -> tuple[int, int, int, int]:
    """(1, C, H, W) of the first simulated training site, else fastMRI's 320 x 320 single-coil layout."""
    for acquisition in acquisitions:
        if acquisition.matrix is not None:
            return (1, acquisition.coils, *acquisition.matrix)
    return DEFAULT_SHAPE


def export_onnx(
    model: nn.Module,
    acquisitions: Sequence[Acquisition] = (),
    shape: tuple[int, int, int, int] | None = None,
    tolerance: float = TOLERANCE,
) -> tuple[bytes, OnnxInfo]:
    """ONNX bytes of ``model`` at ``shape`` (default :func:`export_shape`) and its card entry, checked in ONNX Runtime."""
    name = model_name(model)
    if not MODEL_ENTRIES[name].onnx_exportable or not isinstance(model, OnnxExportable):
        exportable = ", ".join(n for n, entry in MODEL_ENTRIES.items() if entry.onnx_exportable)
        raise ConfigError(
            f"--onnx: model {name} cannot be exported: its complex coil and data-consistency "
            f"operations have no ONNX conversion in torch {torch.__version__}; exportable models: {exportable}"
        )
    import onnxruntime as ort

    batch, coils, height, width = shape or export_shape(acquisitions)
    wrapper = model.onnx_module(height, width).eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(batch, coils, height, width, 2, generator=generator)  # image pixels of order 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            verbose=False,
            input_names=["kspace"],
            output_names=["image"],
        )
    assert program is not None
    buffer = io.BytesIO()
    program.save(buffer)  # type: ignore[arg-type]
    blob = buffer.getvalue()
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"kspace": example.numpy()})[0]
    with torch.no_grad():
        reference = model(
            torch.view_as_complex(example.contiguous()),
            torch.ones(batch, 1, height, width),
            torch.ones(batch, coils, height, width, dtype=torch.complex64),
        ).numpy()
    error = float(np.max(np.abs(onnx_out - reference)))
    if not error <= tolerance:
        raise ConfigError(f"--onnx: ONNX output differs from PyTorch by {error:.3g} (> {tolerance:g}); not exported")
    import hashlib

    info = OnnxInfo(
        sha256=hashlib.sha256(blob).hexdigest(),
        opset=OPSET,
        input_shape=(batch, coils, height, width, 2),
        inputs=["kspace: masked k-space as (real, imag) pairs, scaled as in training"],
        max_abs_error=error,
        tolerance=tolerance,
    )
    logger.info("ONNX export at %s: max |ONNX - PyTorch| = %.2e", info.input_shape, error)
    return blob, info
