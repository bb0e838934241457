"""End-to-end variational network (after fastMRI's E2E-VarNet, Sriram et al. 2020).

The model works in multi-coil k-space. Each cascade takes a gradient DC step and subtracts a
refinement computed by a small U-Net on the coil-combined image and expanded back with the maps.
The maps are estimated by the model itself from the fully sampled k-space centre and refined by a
U-Net, so it does not depend on how a site computed (or simulated) its maps.

Non-Cartesian (radial, spiral) batches have no grid to hold multi-coil k-space, so each cascade runs its
image-domain twin, ``x - eta (A^H D A x - A^H D y) - U(x)`` with the NUFFT SENSE operator of
:mod:`common.nufft` (the Cartesian cascade projected onto the coil-combined image: with S^H S = 1 they are
equal, and tests/test_noncartesian_dc.py checks that on a full grid). The cascades' ``eta`` and U-Nets are
the same parameters, so one VarNet serves a mixed federation; at such a site the maps are the site's
own (estimated from its k-space centre), and the sensitivity network, which reads a Cartesian ACS, is
left as received.
"""

from collections.abc import Iterable
from typing import cast

from torch import Tensor, nn

from common.coils import estimate_maps_from_acs, rss, sense_adjoint, sense_forward
from common.dc import GradientDC
from common.fft import ifft2c
from common.models.unet import NormUnet
from common.noncartesian_dc import NonCartesianCascade, run_cascades
from common.nufft import SenseNufft, is_non_cartesian


class SensitivityModel(nn.Module):
    """ACS map estimate refined by a U-Net applied to each coil map, then renormalised by the RSS.

    The refinement is residual, so an untrained model starts from the plain ACS estimate. Dividing by
    ``sqrt(sum_c |S_c|^2 + eps)`` keeps sum_c |S_c|^2 = 1 where there is signal, with a finite gradient.
    """

    def __init__(self, chans: int, num_pool_layers: int, drop_prob: float = 0.0, eps: float = 1e-12) -> None:
        super().__init__()
        self.norm_unet = NormUnet(chans, num_pool_layers, drop_prob)
        self.eps = eps

    def forward(self, masked_kspace: Tensor, mask: Tensor) -> Tensor:
        """k-space (B,C,H,W) and mask (B,1,H,W) -> maps (B,C,H,W) complex."""
        acs_maps = estimate_maps_from_acs(masked_kspace, mask=mask)
        batch, coils, height, width = acs_maps.shape
        flat = acs_maps.reshape(batch * coils, height, width)
        refined: Tensor = (flat + self.norm_unet(flat)).reshape(batch, coils, height, width)
        energy = (refined.real**2 + refined.imag**2).sum(dim=1, keepdim=True)
        return refined / (energy + self.eps).sqrt()


class VarNetBlock(nn.Module):
    """One cascade: ``k - eta * M (k - y) - F S U(sum_c conj(S_c) F^-1 k_c)``."""

    def __init__(self, chans: int, num_pool_layers: int, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.dc = GradientDC()
        self.refine = NormUnet(chans, num_pool_layers, drop_prob)

    def forward(self, kspace: Tensor, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
        """Multi-coil k-space (B,C,H,W) -> updated multi-coil k-space (B,C,H,W)."""
        refinement = sense_forward(self.refine(sense_adjoint(kspace, sens_maps)), sens_maps)
        corrected: Tensor = self.dc(kspace, masked_kspace, mask)
        return corrected - refinement

    def forward_non_cartesian(self, image: Tensor, data_adjoint: Tensor, operator: SenseNufft) -> Tensor:
        """Coil-combined image (B,H,W) -> updated image: ``x - eta (A^H D A x - A^H D y) - U(x)``.

        ``data_adjoint`` is A^H D y, computed once per batch; A^H D A runs on the Toeplitz kernel.
        """
        updated: Tensor = image - self.dc.eta * (operator.normal(image) - data_adjoint) - self.refine(image)
        return updated


class VarNet(nn.Module):
    """Cascades of :class:`VarNetBlock` on k-space; the output is the RSS of the final coil images.

    With ``estimate_maps=True`` (default) the ``sens_maps`` argument of ``forward`` is ignored and the
    maps come from :class:`SensitivityModel`; with ``estimate_maps=False`` the given maps are used and the
    model has no sensitivity network.
    """

    def __init__(
        self,
        num_cascades: int = 4,
        chans: int = 8,
        num_pool_layers: int = 2,
        sens_chans: int = 4,
        sens_pool_layers: int = 2,
        drop_prob: float = 0.0,
        estimate_maps: bool = True,
    ) -> None:
        super().__init__()
        if num_cascades < 1:
            raise ValueError(f"num_cascades must be >= 1, got {num_cascades}")
        self.sens_net = SensitivityModel(sens_chans, sens_pool_layers, drop_prob) if estimate_maps else None
        self.cascades = nn.ModuleList(VarNetBlock(chans, num_pool_layers, drop_prob) for _ in range(num_cascades))

    def sensitivity_maps(self, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
        """The maps the cascades use: estimated by the model, or the given ones."""
        if self.sens_net is None:
            return sens_maps
        maps: Tensor = self.sens_net(masked_kspace, mask)
        return maps

    def reconstruct_kspace(self, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
        """The final multi-coil k-space estimate (B,C,H,W): what a k-space loss (SSDU) compares."""
        if is_non_cartesian(masked_kspace):
            raise ValueError(
                "non-Cartesian samples have no multi-coil k-space grid to return (a k-space loss, "
                "SSDU, is Cartesian only); forward() reconstructs them"
            )
        maps = self.sensitivity_maps(masked_kspace, mask, sens_maps)
        kspace = masked_kspace
        for cascade in self.cascades:
            kspace = cascade(kspace, masked_kspace, mask, maps)
        return kspace

    def forward(self, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
        """k-space (B,C,H,W) complex, mask (B,1,H,W), maps (B,C,H,W) complex -> magnitude (B,H,W).

        Non-Cartesian: samples (B,C,K) and trajectory (B,K,3) (ky, kx, dcf) in place of the mask; the
        given maps are used (normalised to sum_c |S_c|^2 = 1, so |x| is the RSS of the coil images S x).
        """
        if is_non_cartesian(masked_kspace):
            return run_cascades(
                cast(Iterable[NonCartesianCascade], self.cascades), masked_kspace, mask, sens_maps
            ).abs()
        return rss(ifft2c(self.reconstruct_kspace(masked_kspace, mask, sens_maps)), dim=1)
