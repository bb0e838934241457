"""What an honest-but-curious server could reconstruct from one site's update, with and without SecAgg+.

The attack is the analytic inversion of a dense layer's gradient (Phong et al. 2017; the first step of
"Robbing the Fed" and of every later dense-layer attack): for a first layer y = W x + b on one slice,
∂L/∂W[j] = δ_j · x and ∂L/∂b[j] = δ_j, so every hidden unit j with δ_j ≠ 0 hands the server the input x
exactly, as ∂L/∂W[j] / ∂L/∂b[j]. The input is the slice's zero-filled image: the patient's anatomy.
The model is deliberately tiny and attack-friendly (zero-filled RSS → dense → ReLU → dense, residual),
one plain gradient on a batch of one slice: an upper bound on what leaks, not FedSense's U-Net
(a gradient-matching inversion of the U-Net's update at this CPU budget recovered nothing, see
docs/BENCHMARKS.md). Three things the server may hold:

- **no SecAgg**: the site's update itself;
- **SecAgg+, one site's message**: the update quantised as ``secaggplus_mod`` does it (the run config's
  default clipping and quantisation ranges) plus a uniform mask modulo 2³², which is all the ServerApp
  receives from a site; the attacker reads it back as if it were the quantised update;
- **SecAgg+, the unmasked sum**: what the server learns at the end of the round, the sum of the
  updates of ``--sites`` sites (one slice each).

Every hidden unit gives one candidate image; each view is scored by its best candidate against every
site's true zero-filled image (PSNR / SSIM), so the numbers bound what any choice of unit leaks. The
best candidates are saved side by side as a PNG.

Run::

    python -m bench.gradient_inversion --out docs/img/gradient_inversion.png
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from torch import nn
from torch.utils.data import default_collate

from bench.harness import markdown_table, start_bench, write_sites
from common.data.loaders import load_site
from common.fft import center_crop, ifft2c
from common.metrics import psnr, ssim
from common.runconfig import RunConfig
from server.secagg import MODULUS

logger = logging.getLogger("bench.gradient_inversion")

Batch = dict[str, torch.Tensor]
#: A candidate this close to a site's slice is that slice (float rounding aside).
EXACT_DB = 40.0


class DenseRecon(nn.Module):
    """Zero-filled RSS image → dense → ReLU → dense, added to the input: a reconstruction model whose
    first layer is dense, the layer type whose gradient gives its input away."""

    def __init__(self, size: int, hidden: int) -> None:
        super().__init__()
        self.first = nn.Linear(size * size, hidden)
        self.second = nn.Linear(hidden, size * size)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = zero_filled(batch).flatten(1)
        return (x + self.second(torch.relu(self.first(x)))).view_as(batch["target"])


def zero_filled(batch: Batch) -> torch.Tensor:
    """The coil-combined (RSS) zero-filled image, cropped to the target: the model's input."""
    image = torch.sqrt((ifft2c(batch["masked_kspace"]).abs() ** 2).sum(1))
    return center_crop(image, tuple(batch["target"].shape[-2:]))


def update_of(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """The gradient of the L1 training loss on ``batch``: one SGD step's update, up to −lr."""
    model.zero_grad()
    nn.functional.l1_loss(model(batch), batch["target"]).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}  # type: ignore[union-attr]


def candidates(update: dict[str, torch.Tensor], shape: tuple[int, int]) -> np.ndarray:
    """One input estimate per hidden unit with a non-negligible bias gradient: ∂L/∂W[j] / ∂L/∂b[j]."""
    weight, bias = update["first.weight"].double(), update["first.bias"].double()
    rows = bias.abs() > 1e-6 * float(bias.abs().max())
    return (weight[rows] / bias[rows, None]).view(-1, *shape).numpy()


def secagg_message(update: dict[str, torch.Tensor], run: RunConfig, seed: int) -> dict[str, torch.Tensor]:
    """One site's SecAgg+ message as the server reads it: quantised update + uniform mask mod 2³², dequantised."""
    rng = np.random.default_rng(seed)
    names = list(update)
    quantised = quantize(
        [update[n].numpy().astype(np.float64) for n in names], run.secagg_clipping_range, run.secagg_quantization_range
    )
    masked = [(q + rng.integers(0, MODULUS, q.shape, dtype=np.int64)) % MODULUS for q in quantised]
    # Read as if unmasked: the attacker's best guess without the other sites' mask shares.
    read = dequantize(
        [m % run.secagg_quantization_range for m in masked], run.secagg_clipping_range, run.secagg_quantization_range
    )
    return {n: torch.from_numpy(r) for n, r in zip(names, read)}


def best_candidate(images: np.ndarray, truths: list[np.ndarray]) -> tuple[np.ndarray, int, float, float]:
    """The candidate closest (PSNR) to any site's true input; that site's index, the PSNR and SSIM."""
    best = (images[0], 0, -np.inf, 0.0)
    for image in images:
        for site, truth in enumerate(truths):
            value = psnr(truth, image, float(truth.max()))
            if value > best[2]:
                best = (image, site, value, 0.0)
    image, site, value, _ = best
    return image, site, value, ssim(truths[site], image, float(truths[site].max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--sites", type=int, default=3, help="sites in the SecAgg+ sum")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write (must not exist without --overwrite)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.out.exists() and not args.overwrite:
        parser.error(f"--out: {args.out} exists; pass --overwrite to replace it")
    start_bench("gradient_inversion", args.threads)
    torch.manual_seed(args.seed)
    model = DenseRecon(args.size, args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_sites(Path(tmp), size=args.size, subjects=args.sites + 2, slices=1, names=("site-c",))[0]
        _, datasets = load_site(str(path))
        slices = [default_collate([datasets["train"][i]]) for i in range(args.sites)]
    shape = tuple(slices[0]["target"].shape[-2:])
    truths = [zero_filled(batch)[0].numpy() for batch in slices]
    updates = [update_of(model, batch) for batch in slices]
    views = {
        "no SecAgg: the site's update": updates[0],
        "SecAgg+: the site's masked message": secagg_message(updates[0], RunConfig(), args.seed),
        f"SecAgg+: the sum of {args.sites} sites": {n: sum(u[n] for u in updates) for n in updates[0]},
    }
    rows, images = [], {"site 1's zero-filled slice": truths[0]}
    for label, observed in views.items():
        found = candidates(observed, shape)
        image, site, value, similarity = best_candidate(found, truths)
        images[label] = image
        exposed = [
            k + 1 for k, truth in enumerate(truths) if any(psnr(truth, c, float(truth.max())) > EXACT_DB for c in found)
        ]
        rows.append(
            [
                label,
                len(found),
                f"{value:.2f}",
                f"{similarity:.3f}",
                f"site {site + 1}",
                ", ".join(f"site {k}" for k in exposed) or "none",
            ]
        )
    print(
        markdown_table(
            [
                "what the server inverts",
                "candidates",
                "best PSNR (dB)",
                "its SSIM",
                "closest to",
                f"slices recovered (a candidate > {EXACT_DB:g} dB)",
            ],
            rows,
        )
    )
    figure, axes = plt.subplots(1, len(images), figsize=(3 * len(images), 3.4))
    for axis, (label, image) in zip(axes, images.items()):
        axis.imshow(image, cmap="gray", vmin=0, vmax=float(truths[0].max()))
        axis.set_title(label, fontsize=8)
        axis.axis("off")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
