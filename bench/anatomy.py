"""How far the demo subjects differ from each other: inter-subject NMSE after affine alignment, head and
ventricle volumes, lesion load; and a montage of subjects for the docs.

A "held-out test subject" only tests generalisation if subjects differ like patients. This benchmark draws
subjects with the patient-like model (:data:`common.data.phantom.PATIENTS`) and with the older template-warp
model (:data:`common.data.phantom.WARPS`) side by side from the same seeds and prints, per model:

- inter-subject NMSE after affine alignment: for every pair of subjects, each axial slice of one is mapped
  onto the same slice of the other by the affine transform that matches their intensity-weighted centroid and
  second moments, its gain fitted by least squares; NMSE = ||a - T(b)||² / ||a||². What remains after an
  affine map is the anatomy (ventricles, sulci, lesions, bias), not head size or pose;
- brain and ventricle/CSF volume (mL) and the coefficient of variation of brain volume;
- lesion load: white-matter hyperintensities and tumour (mL) per subject.

Run::

    python -m bench.anatomy                       # 12 subjects per model, montage to docs/anatomy-montage.png
    python -m bench.anatomy --subjects 4 --montage /tmp/m.png   # quicker
"""

from __future__ import annotations

import argparse
import itertools
import logging
from pathlib import Path

import numpy as np
from scipy import ndimage

from bench.harness import markdown_table, start_bench
from common.data.phantom import PATIENTS, WARPS, Subject, Variation, make_subject

logger = logging.getLogger("bench.anatomy")

VARIATIONS: dict[str, Variation] = {"template warps (before)": WARPS, "patients (now)": PATIENTS}
ROOT = Path(__file__).resolve().parent.parent


def subjects(variation: Variation, count: int, size: int, seed: int) -> list[Subject]:
    """``count`` subjects as the BraTS-like demo site draws them (16 axial 6 mm slices), every third with a
    tumour; the same seed gives the same draws whatever the variation."""
    rng = np.random.default_rng(seed)
    return [
        make_subject(
            rng,
            size,
            16,
            slice_thickness_mm=6.0,
            z_start_mm=float(rng.uniform(-5.0, 5.0)),
            lesion=i % 3 == 0,
            variation=variation,
        )
        for i in range(count)
    ]


def _moments(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intensity-weighted centroid (2,) and second-moment matrix (2, 2) of a non-negative image."""
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in image.shape), indexing="ij"), axis=-1)
    weight = image / image.sum()
    mean = (grid * weight[..., None]).sum(axis=(0, 1))
    centred = grid - mean
    cov = np.einsum("ij,ija,ijb->ab", weight, centred, centred)
    return mean, cov


def _sqrtm(matrix: np.ndarray, inverse: bool = False) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    power = -0.5 if inverse else 0.5
    return vectors @ np.diag(np.maximum(values, 1e-9) ** power) @ vectors.T


def affine_nmse(a: np.ndarray, b: np.ndarray) -> float:
    """NMSE of ``a`` against ``b`` mapped onto it by a moment-matching affine transform and a fitted gain.

    The map x_b = mu_b + C_b^½ C_a^-½ (x_a - mu_a) sends ``a``'s centroid and second moments onto ``b``'s,
    so head size, shape (per-axis scale, shear), position and the slice's in-plane extent are removed.
    """
    mu_a, cov_a = _moments(a)
    mu_b, cov_b = _moments(b)
    matrix = _sqrtm(cov_b) @ _sqrtm(cov_a, inverse=True)
    warped = ndimage.affine_transform(b, matrix, offset=mu_b - matrix @ mu_a, order=1, mode="constant")
    gain = float((a * warped).sum() / max(float((warped**2).sum()), 1e-12))
    return float(((a - gain * warped) ** 2).sum() / (a**2).sum())


def spread(group: list[Subject], contrast: str = "T1") -> dict[str, np.ndarray]:
    """Per-pair NMSE and per-subject volumes of one group (see the module docstring)."""
    volumes = [s.image(contrast) for s in group]
    pairs = []
    for i, j in itertools.combinations(range(len(group)), 2):
        for k in range(3, 9):  # the slices through the brain at every slice position drawn
            a, b = volumes[i][:, :, k], volumes[j][:, :, k]
            if a.sum() > 0 and b.sum() > 0:
                pairs.append(affine_nmse(a, b))
    return {
        "nmse": np.array(pairs),
        "brain": np.array([s.volume_ml("wm", "gm", "csf", "wmh", "necrosis", "enhancing", "oedema") for s in group]),
        "csf": np.array([s.volume_ml("csf") for s in group]),
        "wmh": np.array([s.volume_ml("wmh") for s in group]),
        "tumour": np.array([s.volume_ml("necrosis", "enhancing", "oedema") for s in group]),
    }


def montage(group: list[Subject], path: Path, columns: int = 8) -> None:
    """T1, T2 and FLAIR of the first ``columns`` subjects, plus their tumour labels.

    Each column shows slice 4 (basal ganglia to lateral ventricles), or a tumour's largest slice.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = group[:columns]
    fig, axes = plt.subplots(4, len(shown), figsize=(2 * len(shown), 8.4))
    for col, subject in enumerate(shown):
        tumour = (subject.labels() > 0).sum(axis=(0, 1))
        k = int(tumour.argmax()) if tumour.any() else 4
        for row, contrast in enumerate(("T1", "T2", "FLAIR")):
            image = np.flip(subject.image(contrast)[:, :, k].T, axis=0)  # radiological view, anterior up
            axes[row, col].imshow(image, cmap="gray")
        labels = np.flip(subject.labels()[:, :, k].T, axis=0)
        axes[3, col].imshow(np.flip(subject.image("FLAIR")[:, :, k].T, axis=0), cmap="gray")
        axes[3, col].imshow(np.ma.masked_equal(labels, 0), cmap="autumn", alpha=0.6, vmin=1, vmax=4)
        axes[0, col].set_title(f"atrophy {subject.atrophy:.2f}\nWMH {subject.volume_ml('wmh'):.1f} mL", fontsize=8)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    for row, name in enumerate(("T1", "T2", "FLAIR", "FLAIR + BraTS labels")):
        axes[row, 0].set_ylabel(name)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def _range(values: np.ndarray, digits: int = 1) -> str:
    return f"{values.mean():.{digits}f} ({values.min():.{digits}f} – {values.max():.{digits}f})"


def main(argv: list[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Print the spread table of both variation models; write the montage of the patient-like one."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=12, help="subjects per variation model")
    parser.add_argument("--size", type=int, default=96, help="in-plane matrix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--montage",
        type=Path,
        default=ROOT / "docs" / "anatomy-montage.png",
        help="where the montage PNG goes (an existing file is replaced)",
    )
    args = parser.parse_args(argv)
    if args.subjects < 2:
        parser.error("--subjects: at least 2 (the NMSE compares pairs)")
    start_bench("anatomy", 1)
    results, groups = {}, {}
    for name, variation in VARIATIONS.items():
        groups[name] = subjects(variation, args.subjects, args.size, args.seed)
        results[name] = spread(groups[name])
    print(
        f"\n### Inter-subject spread: {args.subjects} subjects per model, {args.size}², T1, seed {args.seed} "
        "(mean (min – max) over subjects; NMSE: median [IQR] over subject pairs x 6 slices)\n"
    )
    rows = []
    for name, r in results.items():
        q1, med, q3 = np.percentile(r["nmse"], [25, 50, 75])
        rows.append(
            (
                name,
                f"{med:.3f} [{q1:.3f}, {q3:.3f}]",
                _range(r["brain"], 0),
                f"{100 * r['brain'].std() / r['brain'].mean():.1f} %",
                _range(r["csf"], 0),
                _range(r["wmh"]),
                _range(r["tumour"]),
            )
        )
    print(
        markdown_table(
            (
                "subjects",
                "NMSE after affine alignment",
                "brain in FOV (mL)",
                "brain CV",
                "CSF (mL)",
                "WMH load (mL)",
                "tumour (mL; every 3rd subject has one)",
            ),
            rows,
        )
    )
    before, after = (np.median(r["nmse"]) for r in results.values())
    print(f"\nmedian inter-subject NMSE, patients / template warps: {after / before:.2f}x")
    montage(groups["patients (now)"], args.montage)
    print(f"montage: {args.montage}")
    return results


if __name__ == "__main__":
    main()
