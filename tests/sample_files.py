"""Sample files written as the ClientApp writes them (``common.samples``), for the viewers' tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.samples import save_samples
from server.store import RunDir


def write_samples(
    run: RunDir, rnd: int, site: str, zero_filled: Any, recon: Any, target: Any, psnr: Any, ssim: Any
) -> Path:
    """``site``'s samples of round ``rnd`` in the run's sample directory; images (k, h, w) or (h, w),
    ``psnr`` / ``ssim`` one value per image or one for all."""
    images = [np.asarray(a, np.float32).reshape(-1, *np.shape(a)[-2:]) for a in (zero_filled, recon, target)]
    k = images[2].shape[0]
    scores = [np.broadcast_to(np.asarray(v, np.float64).reshape(-1), (k,)) for v in (psnr, ssim)]
    per_image = [
        {
            "zero_filled": images[0][i],
            "recon": images[1][i],
            "target": images[2][i],
            "psnr": float(scores[0][i]),
            "ssim": float(scores[1][i]),
        }
        for i in range(k)
    ]
    return save_samples(run.sample_source(), rnd, site, per_image)
