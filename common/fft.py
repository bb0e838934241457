"""Centred, orthonormal 2-D Fourier transforms and complex-image layout helpers.

k-space is stored with the DC component in the centre of the array (index ``N // 2``), as scanners and
fastMRI store it, so every transform here shifts before and after the FFT. ``norm="ortho"`` keeps the
transform unitary: image and k-space have the same energy, which makes the data-consistency weights and
noise levels mean the same thing in both domains.
"""

from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

_AXES = (-2, -1)

ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)


def fft2c(image: Tensor) -> Tensor:
    """Centred orthonormal 2-D FFT over the last two axes of a complex tensor (image -> k-space)."""
    shifted = torch.fft.ifftshift(image, dim=_AXES)
    kspace: Tensor = torch.fft.fftshift(torch.fft.fft2(shifted, dim=_AXES, norm="ortho"), dim=_AXES)
    return kspace


def ifft2c(kspace: Tensor) -> Tensor:
    """Centred orthonormal 2-D inverse FFT over the last two axes of a complex tensor (k-space -> image)."""
    shifted = torch.fft.ifftshift(kspace, dim=_AXES)
    image: Tensor = torch.fft.fftshift(torch.fft.ifft2(shifted, dim=_AXES, norm="ortho"), dim=_AXES)
    return image


def fft2(image: Tensor) -> Tensor:
    """Orthonormal 2-D FFT over the last two axes without shifts: k-space in natural order (DC at index 0)."""
    kspace: Tensor = torch.fft.fft2(image, dim=_AXES, norm="ortho")
    return kspace


def ifft2(kspace: Tensor) -> Tensor:
    """Orthonormal 2-D inverse FFT of natural-order k-space (the inverse of :func:`fft2`)."""
    image: Tensor = torch.fft.ifft2(kspace, dim=_AXES, norm="ortho")
    return image


def to_natural_order(kspace: Tensor) -> Tensor:
    """Centred k-space -> the same data in ``torch.fft.fft2``'s natural order (DC at index 0, no shifts).

    ``fft2c(x) = P(D fft2(x))`` for a fixed permutation P (the shift) and unit-modulus phase ramp D, so
    any point-wise k-space operation (a mask, data consistency) can be carried out on ``fft2(x)`` with
    the mask permuted (:func:`mask_to_natural_order`) and the data mapped by this function, exactly, for
    any matrix size. Iterative networks do it once per batch and save the shifts of every iteration.
    """
    natural: Tensor = fft2(ifft2c(kspace))
    return natural


def mask_to_natural_order(mask: Tensor) -> Tensor:
    """A centred k-space mask permuted to :func:`to_natural_order`'s layout (a mask is real: no phase)."""
    permuted: Tensor = torch.fft.ifftshift(mask, dim=_AXES)
    return permuted


def fft2c_np(image: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`fft2c` for the data readers and simulators, which work in numpy."""
    shifted = np.fft.ifftshift(image, axes=_AXES)
    return np.fft.fftshift(np.fft.fft2(shifted, axes=_AXES, norm="ortho"), axes=_AXES)


def ifft2c_np(kspace: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`ifft2c`."""
    shifted = np.fft.ifftshift(kspace, axes=_AXES)
    return np.fft.fftshift(np.fft.ifft2(shifted, axes=_AXES, norm="ortho"), axes=_AXES)


def centred_idft_matrix(n: int) -> np.ndarray:
    """The (n, n) complex matrix of :func:`ifft2c` along one axis (columns: transformed basis)."""
    eye = np.eye(n, dtype=np.complex128)
    return np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(eye, axes=0), axis=0, norm="ortho"), axes=0)


class RealIfft2c(nn.Module):
    """:func:`ifft2c` at a fixed (H, W) in real arithmetic, for exporters without complex tensors (ONNX).

    The centred orthonormal inverse DFT is two real matrix products per axis: k-space as real (..., H, W, 2)
    pairs in, the image's real and imaginary parts (..., H, W) out.
    """

    rows_re: Tensor  # buffers, registered by name in __init__
    rows_im: Tensor
    cols_re: Tensor
    cols_im: Tensor

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        rows, cols = centred_idft_matrix(height), centred_idft_matrix(width).T
        for name, matrix in (("rows", rows), ("cols", cols)):
            self.register_buffer(f"{name}_re", torch.from_numpy(matrix.real.astype(np.float32)))
            self.register_buffer(f"{name}_im", torch.from_numpy(matrix.imag.astype(np.float32)))

    def forward(self, kspace: Tensor) -> tuple[Tensor, Tensor]:
        """Real (..., H, W, 2) k-space -> (real, imaginary) parts of its centred inverse DFT, each (..., H, W)."""
        kr, ki = kspace[..., 0], kspace[..., 1]
        # Rows: A_H @ K, then columns: (.) @ A_W^T, each a complex product in real arithmetic.
        tr = torch.matmul(self.rows_re, kr) - torch.matmul(self.rows_im, ki)
        ti = torch.matmul(self.rows_re, ki) + torch.matmul(self.rows_im, kr)
        ir = torch.matmul(tr, self.cols_re) - torch.matmul(ti, self.cols_im)
        ii = torch.matmul(tr, self.cols_im) + torch.matmul(ti, self.cols_re)
        return ir, ii

    def rss(self, kspace: Tensor) -> Tensor:
        """Real (B, C, H, W, 2) coil k-space -> the root-sum-of-squares zero-filled image (B, H, W)."""
        ir, ii = self(kspace)
        image: Tensor = torch.sqrt((ir * ir + ii * ii).sum(dim=1))
        return image


def complex_to_channels(x: Tensor) -> Tensor:
    """Complex (..., H, W) -> real (..., 2, H, W) with real and imaginary parts as channels, for conv nets."""
    return torch.stack((x.real, x.imag), dim=-3)


def channels_to_complex(x: Tensor) -> Tensor:
    """Real (..., 2, H, W) -> complex64 (..., H, W); the inverse of :func:`complex_to_channels`."""
    if x.ndim < 3 or x.shape[-3] != 2:
        raise ValueError(f"expected a (..., 2, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype in (torch.bfloat16, torch.float16):
        # A network run under autocast hands back bf16; complex maths (DC, FFT) stays complex64.
        x = x.float()
    return torch.complex(x[..., 0, :, :], x[..., 1, :, :])


def complex_abs(x: Tensor) -> Tensor:
    """Magnitude of a complex tensor; a real input is refused because it means a layout mix-up upstream."""
    if not torch.is_complex(x):
        raise TypeError(f"complex_abs expects a complex tensor, got {x.dtype}")
    return x.abs()


def center_crop(x: ArrayT, shape: tuple[int, int]) -> ArrayT:
    """Crop the centre ``shape`` of the last two axes (torch or numpy), matching fastMRI's offsets.

    Reconstructions are made at the full k-space size and cropped to the target size afterwards, so the
    offset convention must agree with the one used to crop the targets: ``(size - crop) // 2``.
    """
    height, width = x.shape[-2], x.shape[-1]
    crop_h, crop_w = shape
    if not (0 < crop_h <= height and 0 < crop_w <= width):
        raise ValueError(f"cannot crop {(height, width)} to {(crop_h, crop_w)}")
    top = (height - crop_h) // 2
    left = (width - crop_w) // 2
    return x[..., top : top + crop_h, left : left + crop_w]
