"""Unrolled CNN + data-consistency network (the seed paper's model, after Schlemper et al.'s DC-CNN).

Each cascade refines the coil-combined complex image with a small residual CNN and then applies the
closed-form DC layer (eq. 4) through the SENSE maps, so every cascade's output agrees with the
measured k-space as far as ``lam`` says it should.
"""

from torch import Tensor, nn

from common.coils import sense_adjoint
from common.dc import DataConsistency
from common.fft import channels_to_complex, complex_to_channels


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

    def forward(self, image: Tensor) -> Tensor:
        """Complex (B, H, W) -> complex (B, H, W): the input plus a learned correction."""
        return image + channels_to_complex(self.net(complex_to_channels(image)))


class Cascade(nn.Module):
    """One unrolled iteration: CNN refinement followed by closed-form DC."""

    def __init__(self, chans: int, num_layers: int, lam: float | None, learnable_lam: bool) -> None:
        super().__init__()
        self.cnn = CNNBlock(chans, num_layers)
        self.dc = DataConsistency(lam, learnable_lam)

    def forward(self, image: Tensor, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
        """Complex image (B, H, W) -> complex image (B, H, W)."""
        return self.dc(self.cnn(image), masked_kspace, mask, sens_maps)


class UnrolledNet(nn.Module):
    """Cascades of CNN + DC on the SENSE-combined image; starts from the zero-filled SENSE image.

    ``lam=None`` gives hard DC (noise-free data); a finite ``lam`` is the initial DC weight, learned
    per cascade when ``learnable_lam`` (noisy data). The given ``sens_maps`` are used for combining and
    for DC and should be normalised to sum_c |S_c|^2 = 1 (single-coil data: C = 1, S = 1).
    """

    def __init__(
        self,
        num_cascades: int = 5,
        chans: int = 32,
        num_layers: int = 5,
        lam: float | None = 10.0,
        learnable_lam: bool = True,
    ) -> None:
        super().__init__()
        if num_cascades < 1:
            raise ValueError(f"num_cascades must be >= 1, got {num_cascades}")
        self.cascades = nn.ModuleList(
            Cascade(chans, num_layers, lam, learnable_lam) for _ in range(num_cascades)
        )

    def reconstruct(self, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
        """The coil-combined complex reconstruction (B, H, W), before taking the magnitude."""
        image = sense_adjoint(masked_kspace, sens_maps)
        for cascade in self.cascades:
            image = cascade(image, masked_kspace, mask, sens_maps)
        return image

    def forward(self, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
        """k-space (B,C,H,W) complex, mask (B,1,H,W), maps (B,C,H,W) complex -> magnitude (B,H,W)."""
        return self.reconstruct(masked_kspace, mask, sens_maps).abs()
