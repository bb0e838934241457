"""fastMRI-style U-Net, its complex-image wrapper, and the end-to-end U-Net reconstruction baseline."""

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.coils import rss
from common.fft import RealIfft2c, channels_to_complex, complex_to_channels, ifft2c
from common.nufft import SenseNufft, is_non_cartesian

# fastMRI's U-Net baseline clamps the normalised input so a few bright outliers cannot dominate.
_INPUT_CLAMP = 6.0


def _normalise(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample, per-channel zero-mean / unit-std normalisation of (N, C, H, W); returns (x, mean, std).

    Scanners and sites scale images differently; normalising each input makes the network see one
    scale. ``eps`` sits inside the square root so the gradient stays finite for a constant (e.g. empty)
    image.
    """
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = torch.sqrt(((x - mean) ** 2).mean(dim=(-2, -1), keepdim=True) + eps)
    return (x - mean) / std, mean, std


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by instance norm, LeakyReLU(0.2) and channel dropout."""

    def __init__(self, in_chans: int, out_chans: int, drop_prob: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Dropout2d(drop_prob),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Dropout2d(drop_prob),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_chans, H, W) -> (N, out_chans, H, W)."""
        out: Tensor = self.layers(x)
        return out


class TransposeConvBlock(nn.Module):
    """2x upsampling by a stride-2 transpose convolution, instance norm and LeakyReLU(0.2)."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(in_chans, out_chans, kernel_size=2, stride=2, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_chans, H, W) -> (N, out_chans, 2H, 2W)."""
        out: Tensor = self.layers(x)
        return out


class Unet(nn.Module):
    """The fastMRI U-Net (Ronneberger et al.): ``num_pool_layers`` average-pool levels, channels doubling.

    Odd sizes work: pooling floors the size, so an upsampled map can be one pixel short of its skip
    connection, and it is reflect-padded on the bottom/right to match (as fastMRI does).
    """

    def __init__(
        self, in_chans: int, out_chans: int, chans: int = 32, num_pool_layers: int = 4, drop_prob: float = 0.0
    ) -> None:
        super().__init__()
        if min(in_chans, out_chans, chans, num_pool_layers) < 1:
            raise ValueError("in_chans, out_chans, chans and num_pool_layers must all be >= 1")
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.num_pool_layers = num_pool_layers

        self.down_layers = nn.ModuleList([ConvBlock(in_chans, chans, drop_prob)])
        ch = chans
        for _ in range(num_pool_layers - 1):
            self.down_layers.append(ConvBlock(ch, ch * 2, drop_prob))
            ch *= 2
        self.bottleneck = ConvBlock(ch, ch * 2, drop_prob)

        self.up_transpose = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for _ in range(num_pool_layers - 1):
            self.up_transpose.append(TransposeConvBlock(ch * 2, ch))
            self.up_conv.append(ConvBlock(ch * 2, ch, drop_prob))
            ch //= 2
        self.up_transpose.append(TransposeConvBlock(ch * 2, ch))
        self.up_conv.append(nn.Sequential(ConvBlock(ch * 2, ch, drop_prob), nn.Conv2d(ch, out_chans, kernel_size=1)))

    @property
    def min_size(self) -> int:
        """Smallest H and W accepted: instance norm needs more than one pixel at the coarsest level."""
        size: int = 2 ** (self.num_pool_layers + 1)  # int ** int is typed Any (a negative power is a float)
        return size

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_chans, H, W) -> (N, out_chans, H, W)."""
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} is too small for {self.num_pool_layers} pooling layers; "
                f"need at least {self.min_size} pixels per side"
            )
        skips = []
        out: Tensor = x
        for layer in self.down_layers:
            out = layer(out)
            skips.append(out)
            out = F.avg_pool2d(out, kernel_size=2, stride=2)
        out = self.bottleneck(out)
        for transpose, conv in zip(self.up_transpose, self.up_conv):
            skip = skips.pop()
            out = transpose(out)
            pad_w = skip.shape[-1] - out.shape[-1]
            pad_h = skip.shape[-2] - out.shape[-2]
            if pad_w or pad_h:
                out = F.pad(out, [0, pad_w, 0, pad_h], mode="reflect")
            out = conv(torch.cat([out, skip], dim=1))
        return out


class NormUnet(nn.Module):
    """U-Net on a complex image (N, H, W): real/imaginary channels, normalised in, de-normalised out.

    Used inside VarNet (cascades and sensitivity refinement), where inputs have arbitrary scale.
    """

    def __init__(self, chans: int, num_pool_layers: int, drop_prob: float = 0.0, eps: float = 1e-12) -> None:
        super().__init__()
        self.unet = Unet(2, 2, chans, num_pool_layers, drop_prob)
        self.eps = eps

    def forward(self, image: Tensor) -> Tensor:
        """Complex (N, H, W) -> complex (N, H, W)."""
        x, mean, std = _normalise(complex_to_channels(image), self.eps)
        return channels_to_complex(self.unet(x) * std + mean)


class UnetRecon(nn.Module):
    """End-to-end U-Net baseline (fastMRI): zero-filled RSS magnitude -> U-Net -> magnitude.

    The input is normalised per slice by its mean and std and clamped to +-6, the output de-normalised
    with the same statistics, so the network only learns the artefact structure, not the site's scale.
    With ``residual`` (the default) the network predicts a correction to the zero-filled image: an
    untrained model then starts at the zero-filled baseline instead of below it, which matters when a
    federated round gives each site only a few local steps.
    The output is not clipped at zero, so the loss sees the network's raw magnitude estimate.
    ``mask`` and ``sens_maps`` are ignored: the k-space is already masked, and the zero-filled image is
    coil-combined by RSS, as in fastMRI. Non-Cartesian samples (B,C,K) start from their density-compensated
    adjoint instead (their ``mask`` is the trajectory tensor), so one U-Net serves both kinds of site.
    """

    def __init__(
        self,
        chans: int = 16,
        num_pool_layers: int = 3,
        drop_prob: float = 0.0,
        eps: float = 1e-11,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.unet = Unet(1, 1, chans, num_pool_layers, drop_prob)
        self.eps = eps
        self.residual = residual
        if residual:
            # Zero the last 1x1 conv: the untrained model is then exactly the zero-filled image.
            head = cast(nn.Sequential, self.unet.up_conv[-1])[-1]
            assert isinstance(head, nn.Conv2d) and head.bias is not None
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
        """k-space (B,C,H,W) complex, mask (B,1,H,W), maps (B,C,H,W) (both unused) -> magnitude (B,H,W)."""
        if is_non_cartesian(masked_kspace):  # radial / spiral site: density-compensated NUFFT adjoint
            coil_images = SenseNufft.from_batch(mask, sens_maps).coil_gridded(masked_kspace)
        else:
            coil_images = ifft2c(masked_kspace)
        return self.refine(rss(coil_images, dim=1).unsqueeze(1))

    def refine(self, zero_filled: Tensor) -> Tensor:
        """Zero-filled magnitude (B,1,H,W) -> reconstruction (B,H,W): the network's part, which the ONNX
        form (:meth:`onnx_module`) reuses after its real-valued inverse FFT."""
        x, mean, std = _normalise(zero_filled, self.eps)
        x = x.clamp(-_INPUT_CLAMP, _INPUT_CLAMP)
        out: Tensor = x + self.unet(x) if self.residual else self.unet(x)
        return (out * std + mean).squeeze(1)

    def onnx_module(self, height: int, width: int) -> nn.Module:
        """This model at a fixed (H, W) on real k-space pairs, for :mod:`common.onnx_export`: ONNX has no
        complex tensors, and the zero-filled image ``RSS(IFFT(k))`` is the one complex step of a U-Net."""
        return RealKspaceUnetRecon(self, height, width)


class RealKspaceUnetRecon(nn.Module):
    """:class:`UnetRecon` on real-valued k-space (B, C, H, W, 2), with the IFFT as real matrix products."""

    def __init__(self, model: UnetRecon, height: int, width: int) -> None:
        super().__init__()
        self.model = model
        self.ifft = RealIfft2c(height, width)

    def forward(self, kspace: Tensor) -> Tensor:
        """Real (B, C, H, W, 2) masked k-space -> magnitude (B, H, W), equal to ``UnetRecon``'s output."""
        return self.model.refine(self.ifft.rss(kspace).unsqueeze(1))
