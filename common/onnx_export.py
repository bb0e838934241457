"""ONNX export of the reconstruction network, for runtimes other than PyTorch.

ONNX has no complex tensors, and torch 2.13's exporter cannot convert the complex coil and
data-consistency operations of the unrolled network and VarNet (complex ``unsqueeze``,
``linalg_vector_norm``, ``prod`` over complex values fail to dispatch; measured while building this).
The end-to-end U-Net needs only one complex step, the zero-filled image ``RSS(IFFT(k))``, and that is
written here in real arithmetic: the centred orthonormal inverse DFT is two real matrix products per
axis for a fixed matrix size. So ``unet`` models export, at a fixed (B, C, H, W), taking k-space as
real (..., 2) pairs; the other models are refused with the reason. Every export is run in ONNX Runtime
and compared with the PyTorch model on the same input; a difference above the tolerance fails it.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from common.artifact import Acquisition, OnnxInfo
from common.errors import ConfigError
from common.models import UnetRecon, model_name
from common.registry import MODEL_ENTRIES

logger = logging.getLogger(__name__)

OPSET = 18
# Absolute tolerance on the output magnitude (inputs scaled so the zero-filled image peaks near 1).
TOLERANCE = 1e-3
DEFAULT_SHAPE = (1, 1, 320, 320)


def centred_idft_matrix(n: int) -> np.ndarray:
    """The (n, n) complex matrix of :func:`common.fft.ifft2c` along one axis (columns: transformed basis)."""
    eye = np.eye(n, dtype=np.complex128)
    return np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(eye, axes=0), axis=0, norm="ortho"), axes=0)


class RealUnetRecon(nn.Module):
    """:class:`UnetRecon` on real-valued k-space (B, C, H, W, 2), with the IFFT as real matrix products."""

    rows_re: Tensor  # buffers, registered by name in __init__
    rows_im: Tensor
    cols_re: Tensor
    cols_im: Tensor

    def __init__(self, model: UnetRecon, height: int, width: int) -> None:
        super().__init__()
        self.model = model
        rows, cols = centred_idft_matrix(height), centred_idft_matrix(width).T
        for name, matrix in (("rows", rows), ("cols", cols)):
            self.register_buffer(f"{name}_re", torch.from_numpy(matrix.real.astype(np.float32)))
            self.register_buffer(f"{name}_im", torch.from_numpy(matrix.imag.astype(np.float32)))

    def forward(self, kspace: Tensor) -> Tensor:
        """Real (B, C, H, W, 2) masked k-space -> magnitude (B, H, W), equal to ``UnetRecon``'s output."""
        kr, ki = kspace[..., 0], kspace[..., 1]
        # Rows: A_H @ K, then columns: (.) @ A_W^T, each a complex product in real arithmetic.
        tr = torch.matmul(self.rows_re, kr) - torch.matmul(self.rows_im, ki)
        ti = torch.matmul(self.rows_re, ki) + torch.matmul(self.rows_im, kr)
        ir = torch.matmul(tr, self.cols_re) - torch.matmul(ti, self.cols_im)
        ii = torch.matmul(tr, self.cols_im) + torch.matmul(ti, self.cols_re)
        return self.model.refine(torch.sqrt((ir * ir + ii * ii).sum(dim=1)).unsqueeze(1))


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
    if not MODEL_ENTRIES[name].onnx_exportable or not isinstance(model, UnetRecon):
        exportable = ", ".join(n for n, entry in MODEL_ENTRIES.items() if entry.onnx_exportable)
        raise ConfigError(
            f"--onnx: model {name} cannot be exported: its complex coil and data-consistency "
            f"operations have no ONNX conversion in torch {torch.__version__}; exportable models: {exportable}"
        )
    import onnxruntime as ort

    batch, coils, height, width = shape or export_shape(acquisitions)
    wrapper = RealUnetRecon(model, height, width).eval()
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
