"""What the coil-map calibration costs at site-a (fastMRI-style raw k-space, ACS-estimated maps).

For each (matrix size, centre fraction) it reconstructs site-a's validation slices with the L1-wavelet
SENSE baseline (``common.cs``) twice: with the maps the product estimates from the calibration lines
(``SiteDataset``'s ACS estimate) and with the coil maps the demo data was simulated with (the "true"
maps, ``common.data.acquisition.site_coil_maps``). The gap is what calibration costs every method; the
quality benchmark runs where it is small. Run::

    python -m bench.calibration [--sizes 64 128 --center-fractions 0.08 0.16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.harness import machine_line, markdown_table, score_slices, set_threads, write_sites
from bench.quality import cs_recon
from common.data.acquisition import site_coil_maps
from common.data.loaders import load_site, make_loader


def with_true_maps(batch: dict[str, object]) -> dict[str, object]:
    """The batch with its ACS-estimated maps replaced by the maps the data was simulated with."""
    kspace = batch["masked_kspace"]
    assert isinstance(kspace, torch.Tensor)
    coils, height, width = kspace.shape[-3:]
    maps = torch.from_numpy(np.ascontiguousarray(site_coil_maps(coils, (height, width))))
    return {**batch, "sens_maps": maps.expand_as(kspace).to(kspace.dtype)}


def main(argv: list[str] | None = None) -> None:
    """Print CS validation PSNR at site-a with ACS and true maps per size and centre fraction."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-calibration"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--center-fractions", type=float, nargs="+", default=[0.08, 0.16])
    parser.add_argument("--acceleration", type=float, default=4.0)
    parser.add_argument("--slices", type=int, default=6, help="validation slices scored")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    print(f"# bench.calibration — {machine_line(args.threads)}\n")
    rows = []
    for size in args.sizes:
        for fraction in args.center_fractions:
            [path] = write_sites(
                args.out / f"{size}-{fraction:g}",
                size=size,
                subjects=4,
                slices=args.slices,
                acceleration=args.acceleration,
                names=("site-a",),
                center_fraction=fraction,
            )
            _, data = load_site(str(path))
            subset = torch.utils.data.Subset(data["val"], range(min(args.slices, len(data["val"]))))
            recon = cs_recon("haar", 0.01, args.iterations)
            acs = score_slices(recon, make_loader(subset, 2, shuffle=False, seed=0))
            true = score_slices(lambda b: recon(with_true_maps(b)), make_loader(subset, 2, shuffle=False, seed=0))  # noqa: B023
            lines = round(fraction * size)
            a, t = np.mean([s.psnr for s in acs]), np.mean([s.psnr for s in true])
            rows.append((f"{size}²", f"{fraction:g} ({lines} lines)", f"{a:.2f}", f"{t:.2f}", f"{t - a:.2f}"))
    print(
        markdown_table(
            ("matrix", "centre fraction", "CS PSNR, ACS maps (dB)", "CS PSNR, true maps (dB)", "calibration cost (dB)"),
            rows,
        )
    )


if __name__ == "__main__":
    main()
