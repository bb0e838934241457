"""Client-level DP under secure aggregation: each site clips its own update and adds its share of the noise.

Under SecAgg+ the server sees only the sum of the updates, so it can neither clip each update nor be
the one that adds noise before anything is released, as Flower's fixed-clipping wrappers do. Instead
every site clips its update to L2 norm ≤ C and adds Gaussian noise N(0, σ²C² / m) to every entry, m =
the fewest sites whose sum the server may unmask (``min-train-nodes``). Independent Gaussians add: the
sum of any m or more sites' updates then carries noise of variance ≥ σ²C², exactly what the
server-side mechanism adds to the sum (σ·C / n on the mean of n), and one site changes the clipped sum
by at most C. So every unmasked sum is the Gaussian mechanism at noise multiplier σ, and Flower's RDP
accountant over the rounds gives ε per *site*.

Trust: each site must rely on the others adding their share; k sites that collude (and know their own
noise) leave the others' sum with variance (n − k)/m · σ²C².
No Flower here: the ClientApp calls these functions and the tests check them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def clip_update(update: Sequence[np.ndarray], clip: float) -> tuple[list[np.ndarray], float]:
    """``update`` scaled to L2 norm (over all arrays) ≤ ``clip``; and its norm before clipping."""
    norm = float(np.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update)))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return [np.asarray(u, dtype=np.float64) * factor for u in update], norm


def noise_share_std(noise_multiplier: float, clip: float, min_sites: int) -> float:
    """The std of one site's noise share: σ·C / √m, so m shares sum to N(0, σ²C²)."""
    if min_sites < 1:
        raise ValueError(f"min_sites must be >= 1, got {min_sites}")
    return noise_multiplier * clip / float(np.sqrt(min_sites))


def clip_and_add_noise_share(
    update: Sequence[np.ndarray], *, clip: float, noise_multiplier: float, min_sites: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], bool]:
    """The site's update clipped to ``clip`` plus its noise share; and whether clipping changed it."""
    clipped, norm = clip_update(update, clip)
    std = noise_share_std(noise_multiplier, clip, min_sites)
    noised = [u + rng.normal(0.0, std, u.shape) if std > 0 else u for u in clipped]
    return noised, norm > clip
