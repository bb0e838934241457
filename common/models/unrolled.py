"""Unrolled CNN + data-consistency network (the seed paper's model, after Schlemper et al.'s DC-CNN).

Each cascade refines the coil-combined complex image with a small residual CNN and then applies the
closed-form DC layer (eq. 4) through the SENSE maps, so every cascade's output agrees with the
measured k-space as far as ``lam`` says it should.

Non-Cartesian batches (samples (B, C, K) and a trajectory tensor (B, K, 3) in place of the mask; see
:mod:`common.nufft`) run the same CNNs with the same ``lam`` through a NUFFT DC (CG-SENSE or a gradient
step, :mod:`common.noncartesian_dc`), so Cartesian and radial/spiral sites train one shared model.
"""

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor, nn

from common.coils import sense_reduce
from common.dc import DataConsistency
from common.fft import channels_to_complex, complex_to_channels, fft2, ifft2c, mask_to_natural_order
from common.noncartesian_dc import NonCartesianCascade, cg_sense_dc, gradient_dc, run_cascades
from common.nufft import SenseNufft, is_non_cartesian

NC_DC_KINDS = ("cg", "gradient")


class CNNBlock(nn.Module):
    """Residual ``num_layers``-layer 3x3 conv net on the real/imaginary channels of a complex image."""

    def __init__(self, chans: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 2 or chans < 1:
            raise ValueError(f"need num_layers >= 2 and chans >= 1, got {num_layers} and {chans}")
        layers: list[nn.Module] = [nn.Conv2d(2, chans, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(num_layers - 2):
            layers += [nn.Conv2d(chans, chans, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(chans, 2, kernel_size=3, padding=1))
        self.net = nn.Sequential(*layers)
        # NHWC activations: oneDNN's 3x3 convolutions train faster on them on this CPU, fp32 and bf16 alike
        # (docs/BENCHMARKS.md, issue #24); same values. Off for Opacus (common.dp.prepared_for_opacus).
        self.channels_last = True

    def forward(self, image: Tensor) -> Tensor:
        """Complex (B, H, W) -> complex (B, H, W): the input plus a learned correction."""
        channels = complex_to_channels(image)
        if self.channels_last:
            channels = channels.contiguous(memory_format=torch.channels_last)
        return image + channels_to_complex(self.net(channels))


class Cascade(nn.Module):
    """One unrolled iteration: CNN refinement followed by closed-form DC."""

    def __init__(
        self, chans: int, num_layers: int, lam: float | None, learnable_lam: bool, nc_dc: str, cg_iterations: int
    ) -> None:
        super().__init__()
        self.cnn = CNNBlock(chans, num_layers)
        self.dc = DataConsistency(lam, learnable_lam, kspace_order="natural")
        self.nc_dc, self.cg_iterations = nc_dc, cg_iterations

    def forward(self, image: Tensor, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
        """Complex image (B, H, W) -> complex image (B, H, W); k-space (B, C, H, W) and mask in natural order."""
        out: Tensor = self.dc(self.cnn(image), masked_kspace, mask, sens_maps)
        return out

    def forward_non_cartesian(self, image: Tensor, data_adjoint: Tensor, operator: SenseNufft) -> Tensor:
        """The same CNN, then DC against non-Cartesian samples (given as A^H D y) with this cascade's ``lam``."""
        lam = self.dc.lam
        if lam is None:
            raise ValueError("non-Cartesian data needs a finite DC weight: set model lam (hard DC is Cartesian only)")
        refined = self.cnn(image)
        if self.nc_dc == "gradient":
            return gradient_dc(refined, data_adjoint, operator, lam)
        return cg_sense_dc(refined, data_adjoint, operator, lam, self.cg_iterations)


class UnrolledNet(nn.Module):
    """Cascades of CNN + DC on the SENSE-combined image; starts from the zero-filled SENSE image.

    ``lam=None`` gives hard DC (noise-free data); a finite ``lam`` is the initial DC weight, learned
    per cascade when ``learnable_lam`` (noisy data). The given ``sens_maps`` are used for combining and
    for DC and should be normalised to sum_c |S_c|^2 = 1 (single-coil data: C = 1, S = 1).
    ``nc_dc`` picks the DC of non-Cartesian batches ("cg": CG-SENSE with ``cg_iterations`` steps, or
    "gradient"); they start from the density-compensated adjoint.
    """

    def __init__(
        self,
        num_cascades: int = 5,
        chans: int = 32,
        num_layers: int = 5,
        lam: float | None = 10.0,
        learnable_lam: bool = True,
        nc_dc: str = "cg",
        cg_iterations: int = 5,
    ) -> None:
        super().__init__()
        if num_cascades < 1:
            raise ValueError(f"num_cascades must be >= 1, got {num_cascades}")
        if nc_dc not in NC_DC_KINDS:
            raise ValueError(f"nc_dc must be one of {', '.join(NC_DC_KINDS)}, got {nc_dc!r}")
        if cg_iterations < 1:
            raise ValueError(f"cg_iterations must be >= 1, got {cg_iterations}")
        self.cascades = nn.ModuleList(
            Cascade(chans, num_layers, lam, learnable_lam, nc_dc, cg_iterations) for _ in range(num_cascades)
        )

    def reconstruct(self, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
        """The coil-combined complex reconstruction (B, H, W), before taking the magnitude."""
        if is_non_cartesian(masked_kspace):
            return run_cascades(cast(Iterable[NonCartesianCascade], self.cascades), masked_kspace, mask, sens_maps)
        # The zero-filled coil images give the start image and the data in natural order
        # (common.fft.to_natural_order), once per batch: the cascades' DC then needs no shifts.
        coil_images = ifft2c(masked_kspace)
        image = sense_reduce(coil_images, sens_maps)
        natural_kspace = fft2(coil_images)
        natural_mask = mask_to_natural_order(mask)
        for cascade in self.cascades:
            image = cascade(image, natural_kspace, natural_mask, sens_maps)
        return image

    def forward(self, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
        """k-space (B,C,H,W) complex, mask (B,1,H,W), maps (B,C,H,W) complex -> magnitude (B,H,W).

        Non-Cartesian: samples (B,C,K) complex and trajectory (B,K,3) (ky, kx, dcf) in place of the mask.
        """
        return self.reconstruct(masked_kspace, mask, sens_maps).abs()
