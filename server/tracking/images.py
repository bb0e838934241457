"""Sample reconstructions as one picture per site, for trackers that show images."""

from __future__ import annotations

import numpy as np

from server.store import SiteSamples


def sample_panel(samples: SiteSamples) -> np.ndarray:
    """uint8 (rows = samples, columns = zero-filled | reconstruction | target), each row at its target's range.

    Scaling every row by its own target's maximum shows the three images of a slice on one grey scale,
    so a reconstruction brighter or darker than its target looks it.
    """
    rows = []
    for zero_filled, recon, target in zip(samples.zero_filled, samples.recon, samples.target):
        scale = float(np.max(target)) or 1.0
        rows.append(np.concatenate([zero_filled, recon, target], axis=1) / scale)
    panel = np.clip(np.concatenate(rows, axis=0), 0.0, 1.0)
    return np.round(panel * 255.0).astype(np.uint8)
