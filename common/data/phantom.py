"""Subject-like brain anatomy built from the MNI ICBM152 2009a template that ships inside nilearn.

The demo data must look like real heads (so reconstructions and metrics behave as on real data) yet be
made offline and deterministically. The template's grey- and white-matter probability maps, plus CSF as
the rest of the brain mask, give tissue fractions (partial volume); each contrast is a weighted sum of them
with literature-like relative intensities (T1: WM > GM > CSF, T2: CSF > GM > WM, ...). Constant intensities
per tissue would be a cartoon (piecewise-constant, which favours sparsity priors and teaches a network no
texture), so the real template T1 intensities modulate each tissue: the ratio of the template T1 to what
the tissue fractions alone predict is its texture, and a per-contrast intensity curve (a power of that
ratio, inverted for T2-like contrasts) carries it into every contrast.

Subjects must differ like patients, not like small warps of one brain, or "unseen test subjects" measure
little. Each subject therefore draws (:class:`Variation` holds the ranges): head size and shape (per-axis
scale), pose (yaw, and the slice angle as pitch/roll), an age-like atrophy that enlarges the ventricles and
widens the sulci, white-matter hyperintensities whose number grows with it, a bias field of its own
strength, tissue-intensity jitter and a smooth deformation. Optional scalp (non-skull-stripped data) and a
ring-enhancing tumour with its BraTS label map (BraTS-like data) make sites differ.

Volumes are (X, Y, Z) in RAS voxel order: X towards the patient's right, Y anterior, Z superior.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import cast

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

TISSUES = ("wm", "gm", "csf", "scalp", "necrosis", "enhancing", "oedema", "wmh")
# Relative signal per tissue (bone and air give none). Ordering follows textbook contrast behaviour; the
# tumour classes follow BraTS: oedema bright on T2/FLAIR, enhancing rim bright on T1ce, necrosis dark on T1.
# White-matter hyperintensities (wmh, small-vessel disease / demyelination): slightly dark on T1, bright on
# T2 and brightest on FLAIR, where CSF is suppressed.
# fmt: off
_WEIGHT_TABLE = {  # wm    gm    csf  scalp necrosis enhancing oedema wmh  (relative intensities)
    "T1":    (1.00, 0.70, 0.25, 0.95, 0.30, 0.65, 0.50, 0.65),
    "T1CE":  (1.00, 0.70, 0.25, 0.95, 0.30, 1.30, 0.50, 0.65),
    "T2":    (0.50, 0.70, 1.00, 0.55, 1.00, 0.75, 0.90, 0.90),
    "PD":    (0.75, 0.90, 1.00, 0.85, 1.00, 0.90, 0.95, 0.95),
    "FLAIR": (0.60, 0.80, 0.08, 0.55, 0.35, 0.80, 1.00, 1.10),
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
            img = cast(nib.Nifti1Image, nib.load(path))
            arrays[key] = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        except (OSError, nib.filebasedimages.ImageFileError) as exc:
            raise DataError(f"{path}: cannot read the MNI template: {exc}") from exc
        affine = img.affine
    brain = (arrays["t1"] > _BRAIN_THRESHOLD).astype(np.float32)
    return Template(
        gm=arrays["gm"],
        wm=arrays["wm"],
        brain=brain,
        affine=np.asarray(affine),
        texture=_texture(arrays["t1"], arrays["gm"], arrays["wm"], brain),
    )


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


# BraTS label values (2017-2021 releases): necrotic / non-enhancing core, peritumoural oedema, enhancing.
BRATS_LABELS = {"necrosis": 1, "oedema": 2, "enhancing": 4}
LESION_TISSUES = ("necrosis", "enhancing", "oedema", "wmh")
# Where the lateral ventricles sit in the template (mm): the centre of the atrophy's enlargement.
_VENTRICLE_CENTRE_MM = np.array([0.0, -10.0, 16.0])


@dataclass(frozen=True)
class Variation:
    """How far subjects differ: the ranges each subject's anatomy is drawn from.

    :data:`PATIENTS` (the default) spans adult heads from young to elderly; :data:`WARPS` is the older,
    narrower model (small warps of the template, no atrophy, no white-matter lesions) kept so the spread
    benchmark can show what the wider one adds.
    """

    scale: tuple[float, float]  # head size per axis (uniform, independently per axis: size and shape)
    yaw_deg: float  # in-plane rotation, +-
    pitch_deg: float  # slice angle about the left-right axis, +-
    roll_deg: float  # slice angle about the anterior-posterior axis, +-
    shift_mm: float  # std of the head's position in the field of view
    warp_mm: float  # amplitude of the smooth deformation
    atrophy: tuple[float, float]  # age-like factor in [0, 1]: ventricle enlargement and sulcal widening
    wmh_per_atrophy: float  # expected white-matter lesions at atrophy 1 (Poisson, plus 0.5 at any age)
    bias: tuple[float, float]  # log-amplitude of the bias field
    jitter: float  # std of the per-tissue relative intensity


PATIENTS = Variation(
    scale=(0.86, 1.14),
    yaw_deg=12.0,
    pitch_deg=12.0,
    roll_deg=5.0,
    shift_mm=4.0,
    warp_mm=3.0,
    atrophy=(0.0, 1.0),
    wmh_per_atrophy=14.0,
    bias=(0.03, 0.20),
    jitter=0.06,
)
WARPS = Variation(
    scale=(0.92, 1.08),
    yaw_deg=6.0,
    pitch_deg=4.0,
    roll_deg=0.0,
    shift_mm=3.0,
    warp_mm=2.5,
    atrophy=(0.0, 0.0),
    wmh_per_atrophy=0.0,
    bias=(0.08, 0.08),
    jitter=0.04,
)


@dataclass(frozen=True)
class Subject:
    """One synthetic subject: tissue fractions on its own voxel grid, a bias field and intensity jitter."""

    tissues: dict[str, np.ndarray]  # name -> (X, Y, Z) float32 fraction
    bias: np.ndarray  # (X, Y, Z) multiplicative receive/transmit inhomogeneity
    texture: np.ndarray  # (X, Y, Z) template texture ratio (see load_template), 1 where there is none
    jitter: dict[str, float]  # per-tissue relative intensity factor of this subject
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]  # world position of voxel (0, 0, 0)
    atrophy: float = 0.0  # the age-like factor this subject was drawn with (see Variation)

    @property
    def affine(self) -> np.ndarray:
        """RAS voxel-to-mm affine of the subject grid (what a NIfTI writer stores)."""
        affine = np.diag([*self.spacing_mm, 1.0])
        affine[:3, 3] = self.origin_mm
        return affine

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    def volume_ml(self, *tissues: str) -> float:
        """Partial-volume-weighted volume of ``tissues`` together, in millilitres."""
        return float(sum(self.tissues[t].sum(dtype=np.float64) for t in tissues)) * self.voxel_ml

    def labels(self) -> np.ndarray:
        """BraTS-style label map (X, Y, Z) uint8: 1 necrosis, 2 oedema, 4 enhancing, 0 elsewhere.

        A voxel is labelled with its largest tumour class where the tumour classes together fill half of it.
        """
        names = list(BRATS_LABELS)
        stack = np.stack([self.tissues[n] for n in names])
        labels = np.array([BRATS_LABELS[n] for n in names], dtype=np.uint8)[stack.argmax(axis=0)]
        return np.where(stack.sum(axis=0) >= 0.5, labels, 0).astype(np.uint8)

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
        image: np.ndarray = (volume * self.bias).astype(np.float32)
        return image


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation about Z (yaw), then X (pitch: the axial slice tilted nose-up/down), then Y (roll)."""
    cz, sz, cx, sx, cy, sy = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rotation: np.ndarray = rot_z @ rot_x @ rot_y
    return rotation


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
    variation: Variation = PATIENTS,
) -> Subject:
    """Sample one subject on a ``size`` x ``size`` x ``num_slices`` axial grid starting at ``z_start_mm``.

    ``scalp`` adds CSF rim, skull (no signal) and scalp around the brain, as in non-skull-stripped data;
    ``lesion`` adds a glioma-like necrotic core, enhancing rim and oedema inside the brain; ``variation``
    sets how far this subject's anatomy strays from the template (see :class:`Variation`).
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

    # World (subject) -> template mm: head size and shape, pose and slice angle, a shift, a smooth warp,
    # and the atrophy's enlargement of the ventricles (points near them sample closer to their centre).
    v = variation
    centre = np.array([0.0, _BRAIN_CENTRE_Y_MM, 10.0])
    scale = rng.uniform(*v.scale, size=3)
    angles = np.deg2rad(
        [
            rng.uniform(-v.yaw_deg, v.yaw_deg),
            rng.uniform(-v.pitch_deg, v.pitch_deg),
            rng.uniform(-v.roll_deg, v.roll_deg),
        ]
    )
    linear = _rotation(*angles) @ np.diag(1.0 / scale)
    warp = np.stack([_smooth_field(rng, shape) for _ in range(3)], axis=-1) * v.warp_mm
    points = (grid - centre) @ linear.T + centre + rng.normal(0.0, v.shift_mm, size=3) + warp
    atrophy = float(rng.uniform(*v.atrophy))
    if atrophy > 0:
        offset = points - _VENTRICLE_CENTRE_MM
        pull = 0.6 * atrophy * np.exp(-(offset**2).sum(axis=-1, keepdims=True) / (2 * 18.0**2))
        points = _VENTRICLE_CENTRE_MM + offset * (1.0 - pull)
    voxels = (points - template.affine[:3, 3]) @ np.linalg.inv(template.affine[:3, :3]).T
    coords = np.moveaxis(voxels, -1, 0)

    def sample(volume: np.ndarray, outside: float = 0.0) -> np.ndarray:
        return ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=outside).astype(np.float32)

    gm, wm, brain = sample(template.gm), sample(template.wm), sample(template.brain)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    tissues = {name: np.zeros(shape, np.float32) for name in TISSUES}
    tissues.update(wm=wm, gm=gm, csf=csf)
    if atrophy > 0:
        _widen_sulci(tissues, atrophy, spacing)
    if scalp:
        _add_scalp(tissues, spacing)
    if lesion:
        _add_lesion(tissues, grid, rng)
    wmh = int(rng.poisson(v.wmh_per_atrophy * atrophy + (0.5 if v.wmh_per_atrophy > 0 else 0.0)))
    _add_wmh(tissues, grid, rng, wmh)

    jitter = {name: float(rng.normal(1.0, v.jitter)) for name in TISSUES}
    return Subject(
        tissues=tissues,
        bias=_bias_field(rng, shape, float(rng.uniform(*v.bias))),
        texture=sample(template.texture, outside=1.0),
        jitter=jitter,
        spacing_mm=spacing,
        origin_mm=origin,
        atrophy=atrophy,
    )


def _widen_sulci(tissues: dict[str, np.ndarray], atrophy: float, spacing: tuple[float, float, float]) -> None:
    """Cortical atrophy: grey matter next to CSF turns into CSF, up to half of it at atrophy 1."""
    near_csf = ndimage.gaussian_filter(tissues["csf"], sigma=[2.0 / s for s in spacing])
    closeness = np.clip(2.0 * near_csf / max(float(near_csf.max()), 1e-6), 0.0, 1.0)
    lost = tissues["gm"] * (0.5 * atrophy) * closeness
    tissues["gm"] = (tissues["gm"] - lost).astype(np.float32)
    tissues["csf"] = (tissues["csf"] + lost).astype(np.float32)


def _add_wmh(tissues: dict[str, np.ndarray], grid: np.ndarray, rng: np.random.Generator, count: int) -> None:
    """``count`` white-matter hyperintensities: soft ellipsoids of 2-7 mm placed in deep white matter."""
    candidates = np.argwhere(tissues["wm"] > 0.7)
    if count == 0 or candidates.size == 0:
        return
    total = np.zeros(grid.shape[:3], np.float32)
    for i, j, k in candidates[rng.integers(len(candidates), size=count)]:
        radii = rng.uniform(2.0, 7.0, size=3)
        rho = np.sqrt((((grid - grid[i, j, k]) / radii) ** 2).sum(axis=-1))
        total = np.maximum(total, np.clip((1.0 - rho) / 0.3 + 0.5, 0.0, 1.0).astype(np.float32))
    wmh = total * tissues["wm"]
    tissues["wm"] = (tissues["wm"] - wmh).astype(np.float32)
    tissues["wmh"] = wmh.astype(np.float32)


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


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """Smooth multiplicative field (``exp(amplitude x unit field)``): coil/B1 inhomogeneity left after acquisition."""
    return np.exp(amplitude * _smooth_field(rng, shape, coarse=3)).astype(np.float32)


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
    radius = rng.uniform(10.0, 28.0)
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
