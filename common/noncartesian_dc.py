"""Data consistency for non-Cartesian (radial, spiral) measurements, with the same ``lam`` as Cartesian DC.

The Cartesian closed-form DC of :class:`common.dc.DataConsistency` is the minimiser of
``||x - z||^2 + lam ||M F S x - y||^2`` (F orthonormal), i.e. ``z - lam/(1+lam) * A^H (A z - y)`` on the
sampled locations. Off the grid there is no closed form, so two generalisations are offered, both
weighted by the density compensation D (which makes A^H D A close to identity, so ``lam`` means the same
trust in the measurement as at a Cartesian site and one shared model serves both kinds of site):

- :func:`gradient_dc`: the same step, ``z - lam/(1+lam) * A^H D (A z - y)`` (VarNet's gradient DC);
- :func:`cg_sense_dc`: the exact minimiser, solving ``(I + lam A^H D A) x = z + lam A^H D y`` by conjugate
  gradients on the Toeplitz normal operator (CG-SENSE, Pruessmann et al. 2001; MoDL's DC, Aggarwal et
  al. 2019). CG is unrolled for a fixed number of iterations, so gradients flow through it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import Tensor

from common.nufft import SenseNufft


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-slice inner product <a, b> = sum conj(a) b over (H, W): (B,)."""
    return torch.sum(a.conj() * b, dim=(-2, -1))


def gradient_dc(image: Tensor, data_adjoint: Tensor, operator: SenseNufft, lam: Tensor) -> Tensor:
    """One density-weighted gradient step towards the measurement: (B, H, W) -> (B, H, W).

    ``data_adjoint`` is A^H D y (``operator.gridded(samples)``), computed once per batch by the caller:
    every cascade needs it and it costs a NUFFT, while the rest runs on the Toeplitz kernel.
    """
    step = lam / (1.0 + lam)
    return image - step * (operator.normal(image) - data_adjoint)


def cg_sense_dc(
    image: Tensor, data_adjoint: Tensor, operator: SenseNufft, lam: Tensor, iterations: int = 5, tol: float = 1e-6
) -> Tensor:
    """argmin_x ||x - z||^2 + lam ||D^(1/2) (A x - y)||^2 by ``iterations`` CG steps from x = z.

    ``data_adjoint`` is A^H D y, as for :func:`gradient_dc`.
    Stops early (per batch, differentiably: the update is masked, not skipped) once the residual is
    ``tol`` relative to the right-hand side, so an already consistent estimate is left as it is.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")

    def system(x: Tensor) -> Tensor:
        return x + lam * operator.normal(x)

    rhs = image + lam * data_adjoint
    x = image
    residual = rhs - system(x)
    direction = residual
    rs_old = _dot(residual, residual).real
    threshold = (tol**2) * _dot(rhs, rhs).real
    for _ in range(iterations):
        active = (rs_old > threshold).to(image.real.dtype)
        q = system(direction)
        alpha = active * rs_old / _dot(direction, q).real.clamp_min(1e-30)
        x = x + alpha[:, None, None] * direction
        residual = residual - alpha[:, None, None] * q
        rs_new = _dot(residual, residual).real
        beta = active * rs_new / rs_old.clamp_min(1e-30)
        direction = residual + beta[:, None, None] * direction
        rs_old = rs_new
    return x


__all__ = ["cg_sense_dc", "gradient_dc"]


class NonCartesianCascade(Protocol):
    """A cascade that can refine an image against a NUFFT operator (the unrolled and VarNet cascades)."""

    def forward_non_cartesian(self, image: Tensor, data_adjoint: Tensor, operator: SenseNufft) -> Tensor: ...


def run_cascades(
    cascades: Iterable[NonCartesianCascade], samples: Tensor, trajectory: Tensor, sens_maps: Tensor
) -> Tensor:
    """The complex image after every cascade, started from the density-compensated adjoint of ``samples``."""
    operator = SenseNufft.from_batch(trajectory, sens_maps)
    data_adjoint = operator.gridded(samples)
    image = data_adjoint
    for cascade in cascades:
        image = cascade.forward_non_cartesian(image, data_adjoint, operator)
    return image
