"""Data-consistency (DC) layers that pull a network's estimate back towards the measured k-space.

:class:`DataConsistency` is the closed-form DC step of the seed paper (eq. 4, after Schlemper et al.):
at sampled k-space locations the estimate becomes ``(x_f + lam * y) / (1 + lam)``, elsewhere it is left
as ``x_f``. ``lam`` weighs trust in the (noisy) measurement against the network; ``lam -> inf`` replaces
the sampled values by the measurement (noise-free case). :class:`GradientDC` is the gradient step on
``||M(x - y)||^2`` used by VarNet cascades.
"""

import math

import torch
from torch import Tensor, nn

from common.coils import sense_expand, sense_reduce
from common.fft import fft2, fft2c, ifft2, ifft2c

KSPACE_ORDERS = ("centred", "natural")


class DataConsistency(nn.Module):
    """Closed-form DC on an image estimate: single-coil (no maps) or multi-coil through SENSE maps.

    ``lam=None`` is hard replacement (lam = inf). A finite ``lam`` is stored as ``log(lam)`` so that it
    stays positive while being learned (``learnable=True``) or kept fixed as a buffer (``learnable=False``,
    still saved in the state dict so checkpoints record it).

    The multi-coil path expands the image with the maps, applies DC to every coil's k-space and reduces
    with conj(S). It equals the single-coil layer when C = 1 and S = 1, and needs maps normalised to
    sum_c |S_c|^2 = 1 so that reducing an expanded image gives the image back.

    ``kspace_order="natural"``: the measured k-space and mask are given in ``torch.fft.fft2``'s order
    (:func:`common.fft.to_natural_order`, :func:`common.fft.mask_to_natural_order`) and the layer uses
    unshifted FFTs. The result is the same; an unrolled network converts once per batch instead of
    shifting four times per layer (the shifts were 18 % of an fp32 and 30 % of a bf16 training step).
    """

    def __init__(self, lam: float | None = None, learnable: bool = False, kspace_order: str = "centred") -> None:
        super().__init__()
        if kspace_order not in KSPACE_ORDERS:
            raise ValueError(f"kspace_order must be one of {', '.join(KSPACE_ORDERS)}, got {kspace_order!r}")
        self.natural = kspace_order == "natural"
        if lam is None:
            if learnable:
                raise ValueError("a learnable DC weight needs an initial finite lam > 0")
            self.log_lam: Tensor | None = None
        elif not lam > 0 or math.isinf(lam):
            raise ValueError(f"lam must be a finite number > 0 or None (hard DC), got {lam}")
        elif learnable:
            self.log_lam = nn.Parameter(torch.tensor(math.log(lam)))
        else:
            self.register_buffer("log_lam", torch.tensor(math.log(lam)))

    @property
    def hard(self) -> bool:
        """Whether this layer replaces sampled k-space by the measurement (lam = inf)."""
        return self.log_lam is None

    @property
    def lam(self) -> Tensor | None:
        """The current DC weight lam (``None`` for hard DC)."""
        return None if self.log_lam is None else self.log_lam.exp()

    def kspace_dc(self, kspace: Tensor, masked_kspace: Tensor, mask: Tensor) -> Tensor:
        """Apply eq. 4 in k-space; ``mask`` broadcasts against ``kspace`` (e.g. (B,1,H,W) over coils)."""
        sampled = mask > 0
        if self.log_lam is None:
            return torch.where(sampled, masked_kspace, kspace)
        # (k + lam y) / (1 + lam) = k + w (y - k) with w = lam / (1 + lam) = sigmoid(log lam): one scalar.
        weight = torch.sigmoid(self.log_lam)
        return torch.where(sampled, kspace + weight * (masked_kspace - kspace), kspace)

    def forward(self, image: Tensor, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor | None = None) -> Tensor:
        """DC on a combined complex image (B,H,W) given k-space (B,C,H,W), mask (B,1,H,W), maps (B,C,H,W).

        Without ``sens_maps`` the data must be single-coil (C = 1) and the image is its own coil image.
        """
        forward, inverse = (fft2, ifft2) if self.natural else (fft2c, ifft2c)
        if sens_maps is None:
            if masked_kspace.shape[-3] != 1:
                raise ValueError(
                    f"single-coil DC needs C = 1, got k-space of shape {tuple(masked_kspace.shape)}; pass sens_maps"
                )
            return inverse(self.kspace_dc(forward(image), masked_kspace[..., 0, :, :], mask[..., 0, :, :]))
        # SENSE forward and adjoint (common.coils.sense_forward / sense_adjoint with this layer's transforms).
        coil_kspace = forward(sense_expand(image, sens_maps))
        return sense_reduce(inverse(self.kspace_dc(coil_kspace, masked_kspace, mask)), sens_maps)

    def extra_repr(self) -> str:
        """Show the DC weight in ``print(model)`` so a checkpoint's setting is visible."""
        order = ", kspace_order=natural" if self.natural else ""
        if self.log_lam is None:
            return "lam=inf" + order
        return f"lam={self.log_lam.exp().item():.4g}, learnable={isinstance(self.log_lam, nn.Parameter)}" + order


class GradientDC(nn.Module):
    """Soft DC as one gradient step in k-space: ``k - eta * M * (k - y)`` with a step size ``eta``.

    This is the DC term of fastMRI's VarNet cascade; ``eta = 1`` replaces the sampled values, smaller
    values trust the measurement less. ``eta`` is learned by default, as in VarNet.
    """

    def __init__(self, eta: float = 1.0, learnable: bool = True) -> None:
        super().__init__()
        if learnable:
            self.eta = nn.Parameter(torch.tensor(float(eta)))
        else:
            self.register_buffer("eta", torch.tensor(float(eta)))

    def forward(self, kspace: Tensor, masked_kspace: Tensor, mask: Tensor) -> Tensor:
        """One step on multi-coil k-space (B,C,H,W) with the measurement (B,C,H,W) and mask (B,1,H,W)."""
        return kspace - self.eta * mask * (kspace - masked_kspace)
