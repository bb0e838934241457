"""bench.anatomy: the affine-aligned NMSE removes an affine map and keeps anatomy differences."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from bench.anatomy import affine_nmse


def _blob_image() -> np.ndarray:
    """An asymmetric 'head': an ellipse with an off-centre dark hole (a ventricle) and a bright spot."""
    y, x = np.mgrid[0:96, 0:96].astype(float)
    image = (((x - 48) / 30) ** 2 + ((y - 48) / 22) ** 2 < 1).astype(float)
    image[((x - 40) / 6) ** 2 + ((y - 50) / 9) ** 2 < 1] = 0.2
    image[((x - 60) / 4) ** 2 + ((y - 40) / 4) ** 2 < 1] = 1.8
    return ndimage.gaussian_filter(image, 1.0)


def test_an_affine_copy_is_close_and_a_different_anatomy_is_not() -> None:
    a = _blob_image()
    # The same image scaled 1.15 x 0.9, sheared and shifted, with another gain: an affine copy.
    matrix = np.array([[1 / 1.15, 0.05], [0.0, 1 / 0.9]])
    centre = np.array([48.0, 48.0])
    moved = 1.7 * ndimage.affine_transform(a, matrix, offset=centre - matrix @ centre + [3.0, -4.0], order=1)
    assert affine_nmse(a, moved) < 0.03
    assert affine_nmse(a, a) < 1e-6
    different = _blob_image()
    y, x = np.mgrid[0:96, 0:96].astype(float)
    different[((x - 56) / 10) ** 2 + ((y - 50) / 12) ** 2 < 1] = 0.2  # a far larger ventricle elsewhere
    unaligned = float(((a - moved / 1.7) ** 2).sum() / (a**2).sum())
    assert affine_nmse(a, different) > 5 * affine_nmse(a, moved)
    assert unaligned > 5 * affine_nmse(a, moved)  # the alignment did the work


def test_patient_like_subjects_spread_wider_than_template_warps() -> None:
    """The claim of docs/BENCHMARKS.md ("Demo anatomy"), at a small size: more inter-subject NMSE, more CSF
    spread, and white-matter lesions only in the patient-like model."""
    from bench.anatomy import spread, subjects
    from common.data.phantom import PATIENTS, WARPS

    warps, patients = (spread(subjects(v, 5, 48, seed=0)) for v in (WARPS, PATIENTS))
    assert np.median(patients["nmse"]) > 1.15 * np.median(warps["nmse"])
    assert np.ptp(patients["csf"]) > np.ptp(warps["csf"])
    assert warps["wmh"].max() == 0 and patients["wmh"].max() > 0
