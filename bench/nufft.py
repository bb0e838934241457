"""What non-Cartesian sites cost and how exact their operator is (issue #28).

Sections (run one, or ``all``)::

    python -m bench.nufft accuracy   # NUFFT vs an exact NDFT (float64) and vs torchkbnufft, adjointness
    python -m bench.nufft density    # zero-filled PSNR of radial / spiral demo slices: capped density weights
                                     # vs uncapped Voronoi vs torchkbnufft's Pipe-Menon (best intensity scale)
    python -m bench.nufft cost       # per slice: forward / adjoint / normal operator, NUFFT vs Cartesian FFT;
                                     # per training step of the unrolled model: radial batch vs Cartesian batch

Quality (zero-filled, CS, local, federated) is ``bench.noncartesian_quality``.
Everything is measured side by side in one process, so ratios compare like with like on the same load.
Times are medians over ``--repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.harness import markdown_table, write_sites
from common.coils import birdcage_maps, rss, sense_adjoint, sense_forward
from common.data.acquisition import site_coil_maps
from common.metrics import psnr
from common.models import build_model
from common.nufft import SenseNufft, density_compensation, nufft, nufft_adjoint
from common.trajectories import golden_angle_radial, make_trajectory, radial_spokes_for, spiral_interleaves_for

logger = logging.getLogger(__name__)


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: plans, caches, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ndft(image: np.ndarray, coords: np.ndarray) -> np.ndarray:
    height, width = image.shape
    rows, cols = np.arange(height) - height // 2, np.arange(width) - width // 2
    phase_y = np.exp(-2j * np.pi * np.outer(coords[:, 0], rows))
    phase_x = np.exp(-2j * np.pi * np.outer(coords[:, 1], cols))
    return np.einsum("kh,hw,kw->k", phase_y, image, phase_x) / math.sqrt(height * width)


def _relative(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def accuracy(sizes: list[int]) -> None:
    """Relative errors of our NUFFT (FINUFFT, eps 1e-6, complex64) on golden-angle radial trajectories."""
    import torchkbnufft as tkbn

    rows = []
    generator = torch.Generator().manual_seed(0)
    for size in sizes:
        coords = golden_angle_radial(radial_spokes_for(size, 4.0), 2 * size, size, 2.0)
        image = torch.randn(size, size, dtype=torch.complex64, generator=generator)
        samples = torch.randn(coords.shape[0], dtype=torch.complex64, generator=generator)
        ours = nufft(image, coords)
        exact = _ndft(image.numpy().astype(np.complex128), coords.numpy().astype(np.float64))
        omega = (2.0 * math.pi * coords).T.contiguous()
        kb_forward = tkbn.KbNufft(im_size=(size, size))(image[None, None], omega)[0, 0] / size
        kb_adjoint = tkbn.KbNufftAdjoint(im_size=(size, size))(samples[None, None], omega)[0, 0] / size
        adjoint = nufft_adjoint(samples, coords, (size, size))
        lhs = complex(torch.sum(ours * samples.conj()))
        rhs = complex(torch.sum(image * adjoint.conj()))
        rows.append(
            [
                f"{size}²",
                f"{coords.shape[0]}",
                f"{_relative(ours.numpy(), exact):.1e}",
                f"{_relative(ours, kb_forward):.1e}",
                f"{_relative(adjoint, kb_adjoint):.1e}",
                f"{abs(lhs - rhs) / abs(lhs):.1e}",
            ]
        )
    print("\n#### NUFFT accuracy: golden-angle radial at R = 4 (2x readout oversampling), complex64\n")
    print(
        markdown_table(
            [
                "matrix",
                "samples",
                "forward vs exact NDFT",
                "forward vs torchkbnufft",
                "adjoint vs torchkbnufft",
                "adjointness gap (relative)",
            ],
            rows,
        )
    )


DENSITY_CASES = (("radial-ga", 1.0), ("radial-ga", 4.0), ("radial-ga", 8.0), ("spiral", 4.0), ("spiral", 8.0))


def density(size: int, coils: int) -> None:
    """Zero-filled (density-compensated adjoint, RSS) PSNR of noise-free demo brain slices, per weighting.

    The slices are the radial demo site's references (``bench.harness.write_sites``), measured along each
    trajectory with the NUFFT; torchkbnufft's Pipe-Menon weights get their least-squares intensity scale
    per slice (a reference that knows the answer's scale), ours do not.
    """
    import h5py
    import torchkbnufft as tkbn

    with tempfile.TemporaryDirectory(prefix="bench-density-") as tmp:
        write_sites(Path(tmp), size=size, subjects=4, slices=4, names=("site-r",))
        volumes = []
        for path in sorted(Path(tmp, "data", "site-r").glob("*.h5")):
            with h5py.File(path, "r") as f:
                volumes.append(np.asarray(f["reconstruction_rss"], dtype=np.float32))
    maps = site_coil_maps(coils, (size, size)).astype(np.complex64)
    rows = []
    for kind, acceleration in DENSITY_CASES:
        readout = 2 * size if kind == "radial-ga" else 4 * size
        count = (
            radial_spokes_for(size, acceleration)
            if kind == "radial-ga"
            else spiral_interleaves_for(size, acceleration, readout, 2.0)
        )
        coords = make_trajectory(kind, count, readout, size, 2.0)
        omega = (2.0 * math.pi * coords).T.contiguous()
        weights = {
            "capped (ours)": density_compensation(coords, (size, size)),
            "uncapped Voronoi": density_compensation(coords, (size, size), capped=False),
            "Pipe-Menon (torchkbnufft)": tkbn.calc_density_compensation_function(ktraj=omega, im_size=(size, size))[
                0, 0
            ].real,
        }
        scores: dict[str, list[float]] = {name: [] for name in weights}
        for volume in volumes:
            for image in volume:
                coil_images = torch.from_numpy(maps * image)
                target = rss(coil_images, dim=0).numpy()
                samples = nufft(coil_images, coords)
                for name, dcf in weights.items():
                    recon = rss(nufft_adjoint(samples * dcf, coords, (size, size)), dim=0).numpy()
                    if name.startswith("Pipe-Menon"):
                        recon = recon * float(np.sum(recon * target) / np.sum(recon**2))
                    scores[name].append(psnr(target, recon, float(volume.max())))
        rows.append([kind, f"{acceleration:g}", coords.shape[0], *(f"{np.mean(scores[name]):.2f}" for name in weights)])
    print(
        f"\n#### Zero-filled PSNR (dB) by density weighting: {len(volumes)} demo volumes x 4 slices, {size}², "
        f"{coils} coils, noise-free, readout oversampling 2\n"
    )
    print(markdown_table(["trajectory", "R", "samples", *weights], rows))


def cost(size: int, coils: int, batch: int, repeats: int, model_args: dict[str, object]) -> None:
    """Operator times per slice and training-step times per batch, radial vs Cartesian at one matrix."""
    torch.manual_seed(0)
    shape = (size, size)
    maps = torch.from_numpy(birdcage_maps(coils, shape))
    coords = golden_angle_radial(radial_spokes_for(size, 4.0), 2 * size, size, 2.0)
    dcf = density_compensation(coords, shape)
    image = torch.randn(1, size, size, dtype=torch.complex64)
    mask = (torch.rand(1, 1, size, size) < 0.25).float()
    operator = SenseNufft(maps[None], coords[None], dcf[None])
    samples = operator.forward(image)
    kspace = sense_forward(image, maps[None]) * mask

    ops = {
        "forward A x": (lambda: sense_forward(image, maps[None]) * mask, lambda: operator.forward(image)),
        "adjoint A^H y": (lambda: sense_adjoint(kspace * mask, maps[None]), lambda: operator.adjoint(samples)),
        "normal A^H A x": (
            lambda: sense_adjoint(sense_forward(image, maps[None]) * mask, maps[None]),
            lambda: operator.normal(image),
        ),
        "normal via NUFFT pair": (None, lambda: operator.adjoint(dcf * operator.forward(image))),
    }
    rows = []
    for name, (cartesian, radial) in ops.items():
        t_radial = _median_seconds(radial, repeats)
        if cartesian is None:
            rows.append([name, "-", f"{t_radial * 1e3:.2f}", "-"])
            continue
        t_cart = _median_seconds(cartesian, repeats)
        rows.append([name, f"{t_cart * 1e3:.2f}", f"{t_radial * 1e3:.2f}", f"{t_radial / t_cart:.1f}x"])
    print(
        f"\n#### Operator time per slice: {size}², {coils} coils, radial {coords.shape[0]} samples "
        f"(R = 4) vs Cartesian FFT + mask; ms, median of {repeats}\n"
    )
    print(markdown_table(["operator", "Cartesian (ms)", "radial NUFFT (ms)", "ratio"], rows))

    def step(
        inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        model: torch.nn.Module,
        optimiser: torch.optim.Optimizer,
    ) -> None:
        optimiser.zero_grad()
        loss = model(*inputs).mean()
        loss.backward()
        optimiser.step()

    batch_maps = maps[None].expand(batch, -1, -1, -1).contiguous()
    images = torch.randn(batch, size, size, dtype=torch.complex64)
    cart_mask = mask.expand(batch, -1, -1, -1).contiguous()
    cart_inputs = (sense_forward(images, batch_maps) * cart_mask, cart_mask, batch_maps)
    batch_operator = SenseNufft(batch_maps, coords[None].expand(batch, -1, -1), dcf[None].expand(batch, -1))
    trajectory = torch.cat((coords, dcf[:, None]), dim=-1)[None].expand(batch, -1, -1).contiguous()
    radial_inputs = (batch_operator.forward(images), trajectory, batch_maps)
    rows = []
    for dc in ("cg", "gradient"):
        model = build_model("unrolled", **{**model_args, "nc_dc": dc})
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
        t_cart = _median_seconds(lambda: step(cart_inputs, model, optimiser), repeats)  # noqa: B023
        t_radial = _median_seconds(lambda: step(radial_inputs, model, optimiser), repeats)  # noqa: B023
        rows.append([f"unrolled, radial DC = {dc}", f"{t_cart:.3f}", f"{t_radial:.3f}", f"{t_radial / t_cart:.1f}x"])
    print(
        f"\n#### Training step (forward + backward + Adam), unrolled {model_args}, batch {batch}, {size}², "
        f"{coils} coils; s, median of {repeats}\n"
    )
    print(markdown_table(["model", "Cartesian (s)", "radial (s)", "ratio"], rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.nufft", description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=("accuracy", "density", "cost", "all"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="accuracy: matrices")
    parser.add_argument("--size", type=int, default=128, help="cost: matrix")
    parser.add_argument("--density-size", type=int, default=64, help="density: matrix")
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cascades", type=int, default=5)
    parser.add_argument("--chans", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.section in ("accuracy", "all"):
        accuracy(args.sizes)
    if args.section in ("density", "all"):
        density(args.density_size, args.coils)
    if args.section in ("cost", "all"):
        cost(
            args.size,
            args.coils,
            args.batch,
            args.repeats,
            {"num_cascades": args.cascades, "chans": args.chans, "lam": 1.0},
        )


if __name__ == "__main__":
    main()
