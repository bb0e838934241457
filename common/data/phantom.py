"""Subject-like brain anatomy built from the MNI ICBM152 2009a template that ships inside nilearn.

The demo data must look like real heads (so reconstructions and metrics behave as on real data) yet be
made offline and deterministically. The template's grey- and white-matter probability maps, plus CSF as
the rest of the brain mask, give tissue fractions (partial volume); each contrast is a weighted sum of them
with literature-like relative intensities (T1: WM > GM > CSF, T2: CSF > GM > WM, ...). Constant intensities
per tissue would be a cartoon (piecewise-constant, which favours sparsity priors and teaches a network no
texture), so the real template T1 intensities modulate each tissue: the ratio of the template T1 to what
the tissue fractions alone predict is its texture, and a per-contrast intensity curve (a power of that
ratio, inverted for T2-like contrasts) carries it into every contrast. Subjects differ by a
smooth random deformation, head size and pose, slice coverage, tissue-intensity jitter and a bias field;
optional scalp (non-skull-stripped data) and a ring-enhancing tumour (BraTS-like data) make sites differ.

Volumes are (X, Y, Z) in RAS voxel order: X towards the patient's right, Y anterior, Z superior.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from common.errors import DataError

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# nilearn's own brain mask is the T1 template above 0.2 of its range; the same rule is used here.
_BRAIN_THRESHOLD = 0.2
# The template brain's centre along Y (mm); the field of view is centred on it.
_BRAIN_CENTRE_Y_MM = -18.0

TISSUES = ("wm", "gm", "csf", "scalp", "necrosis", "enhancing", "oedema")
# Relative signal per tissue (bone and air give none). Ordering follows textbook contrast behaviour; the
# tumour classes follow BraTS: oedema bright on T2/FLAIR, enhancing rim bright on T1ce, necrosis dark on T1.
# fmt: off
_WEIGHT_TABLE = {  # wm    gm    csf  scalp necrosis enhancing oedema  (relative intensities)
    "T1":    (1.00, 0.70, 0.25, 0.95, 0.30, 0.65, 0.50),
    "T1CE":  (1.00, 0.70, 0.25, 0.95, 0.30, 1.30, 0.50),
    "T2":    (0.50, 0.70, 1.00, 0.55, 1.00, 0.75, 0.90),
    "PD":    (0.75, 0.90, 1.00, 0.85, 1.00, 0.90, 0.95),
    "FLAIR": (0.60, 0.80, 0.08, 0.55, 0.35, 0.80, 1.00),
}
# fmt: on
CONTRAST_WEIGHTS: dict[str, dict[str, float]] = {
    contrast: dict(zip(TISSUES, row, strict=True)) for contrast, row in _WEIGHT_TABLE.items()
}
CONTRASTS = tuple(CONTRAST_WEIGHTS)
# Exponent of the template-texture ratio per contrast: T1-weighted contrasts keep the template's texture
# (amplified: the template is an average of 152 brains, smoother than one); T2-like contrasts invert it,
# as long-T1 tissue is also long-T2; PD shows it weakly.
TEXTURE_EXPONENT = {"T1": 1.5, "T1CE": 1.5, "T2": -1.2, "PD": -0.5, "FLAIR": -0.8}
# Tissues whose intensity the template's texture modulates (scalp and tumour are not in the template).
_TEXTURED = ("wm", "gm", "csf")


@dataclass(frozen=True)
class Template:
    """Tissue fractions (float32 in [0, 1]) on the template grid and its voxel-to-mm affine."""

    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    texture: np.ndarray  # template T1 / the T1 its tissue fractions predict (1 outside the brain)


def template_dir() -> Path:
    """Where nilearn keeps its bundled data, found without importing nilearn (whose import is slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise DataError("nilearn: not installed; the MNI template for the demo data ships with it")
    return Path(spec.origin).parent / "datasets" / "data"


@lru_cache(maxsize=1)
def load_template() -> Template:
    """Load the bundled 1 mm MNI ICBM152 2009a maps once per process."""
    arrays = {}
    affine = None
    for key, name in TEMPLATE_FILES.items():
        path = template_dir() / name
        try:
            img = nib.load(path)
            arrays[key] = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        except (OSError, nib.filebasedimages.ImageFileError) as exc:
            raise DataError(f"{path}: cannot read the MNI template: {exc}") from exc
        affine = img.affine
    brain = (arrays["t1"] > _BRAIN_THRESHOLD).astype(np.float32)
    return Template(gm=arrays["gm"], wm=arrays["wm"], brain=brain, affine=np.asarray(affine),
                    texture=_texture(arrays["t1"], arrays["gm"], arrays["wm"], brain))


def _texture(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The template T1's variation *within* tissue classes: T1 / (sum of fractions x class mean T1).

    Class means are fraction-weighted over the brain, so partial volume (already in the fractions) is
    not counted twice; what remains is the real anatomy's texture (myelination gradients, deep grey
    nuclei, sulcal detail), clipped to a plausible range.
    """
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    fractions = (gm, wm, csf)
    means = [float((t1 * f).sum() / max(float(f.sum()), 1e-6)) for f in fractions]
    predicted = sum(f * m for f, m in zip(fractions, means))
    ratio = np.where(predicted > 0.05, t1 / np.maximum(predicted, 1e-6), 1.0)
    return np.clip(ratio, 0.5, 1.6).astype(np.float32)


@dataclass(frozen=True)
class Subject:
    """One synthetic subject: tissue fractions on its own voxel grid, a bias field and intensity jitter."""

    tissues: dict[str, np.ndarray]  # name -> (X, Y, Z) float32 fraction
    bias: np.ndarray  # (X, Y, Z) multiplicative receive/transmit inhomogeneity
    texture: np.ndarray  # (X, Y, Z) template texture ratio (see load_template), 1 where there is none
    jitter: dict[str, float]  # per-tissue relative intensity factor of this subject
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]  # world position of voxel (0, 0, 0)

    @property
    def affine(self) -> np.ndarray:
        """RAS voxel-to-mm affine of the subject grid (what a NIfTI writer stores)."""
        affine = np.diag([*self.spacing_mm, 1.0])
        affine[:3, 3] = self.origin_mm
        return affine

    def image(self, contrast: str) -> np.ndarray:
        """Magnitude volume (X, Y, Z) float32 of one contrast (see :data:`CONTRASTS`)."""
        try:
            weights = CONTRAST_WEIGHTS[contrast.upper()]
        except KeyError as exc:
            raise ValueError(f"unknown contrast {contrast!r}; expected one of {CONTRASTS}") from exc
        modulation = self.texture ** TEXTURE_EXPONENT[contrast.upper()]
        volume = np.zeros_like(self.bias)
        for tissue, fraction in self.tissues.items():
            value = fraction * (weights[tissue] * self.jitter[tissue])
            volume += value * modulation if tissue in _TEXTURED else value
        return (volume * self.bias).astype(np.float32)


def make_subject(
    rng: np.random.Generator,
    size: int,
    num_slices: int,
    *,
    slice_thickness_mm: float,
    z_start_mm: float,
    fov_mm: float = 240.0,
    scalp: bool = False,
    lesion: bool = False,
) -> Subject:
    """Sample one subject on a ``size`` x ``size`` x ``num_slices`` axial grid starting at ``z_start_mm``.

    ``scalp`` adds CSF rim, skull (no signal) and scalp around the brain, as in non-skull-stripped data;
    ``lesion`` adds a glioma-like necrotic core, enhancing rim and oedema inside the brain.
    """
    template = load_template()
    spacing = (fov_mm / size, fov_mm / size, float(slice_thickness_mm))
    origin = (
        -(size - 1) / 2 * spacing[0],
        _BRAIN_CENTRE_Y_MM - (size - 1) / 2 * spacing[1],
        float(z_start_mm),
    )
    grid = np.stack(
        np.meshgrid(
            origin[0] + spacing[0] * np.arange(size),
            origin[1] + spacing[1] * np.arange(size),
            origin[2] + spacing[2] * np.arange(num_slices),
            indexing="ij",
        ),
        axis=-1,
    )
    shape = grid.shape[:3]

    # World (subject) -> template mm: a head-size scale, a small pose change, a shift and a smooth warp.
    centre = np.array([0.0, _BRAIN_CENTRE_Y_MM, 10.0])
    scale = rng.uniform(0.92, 1.08, size=3)
    yaw, pitch = np.deg2rad(rng.uniform(-6.0, 6.0)), np.deg2rad(rng.uniform(-4.0, 4.0))
    rot_z = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    linear = rot_z @ rot_x @ np.diag(1.0 / scale)
    warp = np.stack([_smooth_field(rng, shape) for _ in range(3)], axis=-1) * 2.5
    points = (grid - centre) @ linear.T + centre + rng.normal(0.0, 3.0, size=3) + warp
    voxels = (points - template.affine[:3, 3]) @ np.linalg.inv(template.affine[:3, :3]).T
    coords = np.moveaxis(voxels, -1, 0)

    def sample(volume: np.ndarray, outside: float = 0.0) -> np.ndarray:
        return ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=outside).astype(np.float32)

    gm, wm, brain = sample(template.gm), sample(template.wm), sample(template.brain)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    tissues = {name: np.zeros(shape, np.float32) for name in TISSUES}
    tissues.update(wm=wm, gm=gm, csf=csf)
    if scalp:
        _add_scalp(tissues, spacing)
    if lesion:
        _add_lesion(tissues, grid, rng)

    jitter = {name: float(rng.normal(1.0, 0.04)) for name in TISSUES}
    return Subject(
        tissues=tissues,
        bias=_bias_field(rng, shape),
        texture=sample(template.texture, outside=1.0),
        jitter=jitter,
        spacing_mm=spacing,
        origin_mm=origin,
    )


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int = 4) -> np.ndarray:
    """Random field varying over a few centimetres: coarse unit noise, cubic-spline interpolated.

    Interpolation is separable (one small matrix per axis), which is far cheaper than evaluating a 3-D
    spline at every voxel.
    """
    noise = rng.standard_normal((coarse,) * len(shape))
    identity = np.eye(coarse)
    for axis, n in enumerate(shape):
        weights = CubicSpline(np.arange(coarse), identity)(np.linspace(0, coarse - 1, n))  # (n, coarse)
        noise = np.moveaxis(np.tensordot(weights, noise, axes=([1], [axis])), 0, axis)
    return noise


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth multiplicative field (about +-15 %) like coil/B1 inhomogeneity left after acquisition."""
    return np.exp(0.08 * _smooth_field(rng, shape, coarse=3)).astype(np.float32)


def _band(distance: np.ndarray, inner: float, outer: float, soft: float = 1.0) -> np.ndarray:
    """Soft indicator of ``inner <= distance < outer`` with ramps ``soft`` wide (avoids jagged edges)."""
    rise = np.clip((distance - inner) / soft + 0.5, 0.0, 1.0)
    fall = np.clip((outer - distance) / soft + 0.5, 0.0, 1.0)
    return (rise * fall).astype(np.float32)


def _add_scalp(tissues: dict[str, np.ndarray], spacing: tuple[float, float, float]) -> None:
    """Extra-cerebral CSF (0-2 mm), skull (2-6 mm, no signal) and scalp (6-11 mm) around the brain."""
    brain = (tissues["wm"] + tissues["gm"] + tissues["csf"]) > 0.5
    distance = ndimage.distance_transform_edt(~brain, sampling=spacing)
    tissues["csf"] = np.maximum(tissues["csf"], _band(distance, 0.0, 2.0))
    tissues["scalp"] = _band(distance, 6.0, 11.0)


def _add_lesion(tissues: dict[str, np.ndarray], grid: np.ndarray, rng: np.random.Generator) -> None:
    """A ring-enhancing glioma in white matter, with oedema spreading preferentially along white matter."""
    wm = tissues["wm"]
    middle = slice(wm.shape[2] // 3, max(wm.shape[2] // 3 + 1, 2 * wm.shape[2] // 3))
    candidates = np.argwhere(wm[:, :, middle] > 0.6)
    if candidates.size == 0:
        return
    i, j, k = candidates[rng.integers(len(candidates))]
    centre = grid[i, j, k + middle.start]
    radius = rng.uniform(14.0, 22.0)
    irregular = 1.0 + 0.15 * _smooth_field(rng, wm.shape)
    rho = np.linalg.norm(grid - centre, axis=-1) / (radius * irregular)
    brain = np.clip(tissues["wm"] + tissues["gm"] + tissues["csf"], 0.0, 1.0)
    core = np.clip((0.4 - rho) / 0.08 + 0.5, 0.0, 1.0)
    rim = np.clip((0.6 - rho) / 0.08 + 0.5, 0.0, 1.0)
    outer = np.clip((1.0 - rho) / 0.08 + 0.5, 0.0, 1.0)
    lesion = {
        "necrosis": core * brain,
        "enhancing": (rim - core) * brain,
        "oedema": (outer - rim) * np.clip(tissues["wm"] + 0.3 * tissues["gm"], 0.0, 1.0),
    }
    taken = lesion["necrosis"] + lesion["enhancing"] + lesion["oedema"]
    for name in ("wm", "gm", "csf"):
        tissues[name] = tissues[name] * (1.0 - taken)
    for name, fraction in lesion.items():
        tissues[name] = fraction.astype(np.float32)
