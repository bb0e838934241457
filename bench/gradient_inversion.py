"""What an honest-but-curious server could reconstruct from one site's update, with and without SecAgg+.

Gradient inversion in the style of "Inverting Gradients" (Geiping et al. 2020): the server optimises a
dummy slice until the gradient the model would take on it matches the update it received (relative
L2 distance, plus total variation on the image). The attacker is made strong on purpose: it knows the
model, the loss, the site's sampling mask and coil maps (so the dummy's k-space follows from the dummy
image), and the update is one plain SGD step on a batch of one slice (the easiest case: real rounds
are many Adam steps over many slices). Three things the server may hold:

- **no SecAgg**: the site's update itself;
- **SecAgg+, one site's message**: the update quantised as ``secaggplus_mod`` does it (clipping range,
  quantisation range of the run config's defaults) plus a uniform mask modulo 2³², which is all the
  ServerApp receives from a site; the attacker reads it back as if it were a quantised update;
- **SecAgg+, the unmasked sum**: what the server learns at the end of the round, the sum of the
  updates of ``--sites`` sites (one slice each).

Each reconstruction is scored against the true slice (for the sum: against the best-matching site's
slice) by PSNR / SSIM, and all are saved side by side as a PNG.

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
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.common.secure_aggregation.quantization import dequantize, quantize  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from bench.harness import markdown_table, start_bench, write_sites  # noqa: E402
from common.data.loaders import load_site  # noqa: E402
from common.fft import center_crop, complex_abs, fft2c  # noqa: E402
from common.metrics import psnr, ssim  # noqa: E402
from common.models import build_model  # noqa: E402
from common.runconfig import RunConfig  # noqa: E402
from common.training import predict  # noqa: E402
from server.secagg import MODULUS  # noqa: E402

logger = logging.getLogger("bench.gradient_inversion")

Batch = dict[str, object]


def loss_gradient(model: torch.nn.Module, batch: Batch, create_graph: bool = False) -> list[torch.Tensor]:
    """The gradient of the L1 training loss on ``batch`` with respect to the model's parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = torch.nn.functional.l1_loss(predict(model, batch), batch["target"])  # type: ignore[arg-type]
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def dummy_batch(image: torch.Tensor, like: Batch) -> Batch:
    """A batch whose k-space is the site's acquisition of the complex ``image`` (2, H, W) with its mask and coil maps."""
    z = torch.complex(image[0], image[1])
    sens = like["sens_maps"]  # type: ignore[assignment]
    kspace = fft2c(sens * z) * like["mask"]  # type: ignore[operator]
    target = center_crop(complex_abs(z), tuple(like["target"].shape[-2:]))  # type: ignore[union-attr]
    return {**like, "masked_kspace": kspace, "target": target}


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert(model: torch.nn.Module, observed: list[torch.Tensor], like: Batch, *, iterations: int, tv: float,
           seed: int) -> np.ndarray:
    """The magnitude image whose gradient best matches ``observed`` (relative L2 distance + TV), from a random start.

    L2 rather than cosine: the attacker knows the update is the gradient itself (one SGD step at a known
    learning rate), and its size pins the image's scale.
    """
    shape = like["sens_maps"].shape[-2:]  # type: ignore[union-attr]
    generator = torch.Generator().manual_seed(seed)
    image = (0.1 * torch.randn((2, 1, *shape), generator=generator)).requires_grad_(True)
    optimiser = torch.optim.Adam([image], lr=0.05)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, [iterations // 2, 3 * iterations // 4], 0.1)
    norm = torch.sqrt(sum(torch.sum(o**2) for o in observed))
    for _ in range(iterations):
        optimiser.zero_grad()
        batch = dummy_batch(image, like)
        grads = loss_gradient(model, batch, create_graph=True)
        distance = sum(torch.sum((g - o) ** 2) for g, o in zip(grads, observed)) / norm**2
        objective = distance + tv * total_variation(batch["target"])  # type: ignore[arg-type]
        objective.backward()
        optimiser.step()
        schedule.step()
    with torch.no_grad():
        return dummy_batch(image, like)["target"][0].numpy()  # type: ignore[index]


def secagg_message(update: list[torch.Tensor], run: RunConfig, seed: int) -> list[torch.Tensor]:
    """One site's SecAgg+ message as the server reads it: quantised update + uniform mask mod 2³², dequantised."""
    rng = np.random.default_rng(seed)
    arrays = [u.detach().numpy().astype(np.float64) for u in update]
    quantised = quantize(arrays, run.secagg_clipping_range, run.secagg_quantization_range)
    masked = [(q + rng.integers(0, MODULUS, q.shape, dtype=np.int64)) % MODULUS for q in quantised]
    # Read as if unmasked: the attacker's best guess without the other sites' mask shares.
    read = dequantize([m % run.secagg_quantization_range for m in masked], run.secagg_clipping_range,
                      run.secagg_quantization_range)
    return [torch.from_numpy(r).float() for r in read]


def scores(image: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """PSNR and SSIM of a reconstruction against the true slice, at the true slice's range."""
    maxval = float(truth.max())
    return psnr(truth, image, maxval), ssim(truth, image, maxval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--chans", type=int, default=8)
    parser.add_argument("--sites", type=int, default=3, help="sites in the SecAgg+ sum")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--tv", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write (must not exist without --overwrite)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.out.exists() and not args.overwrite:
        parser.error(f"--out: {args.out} exists; pass --overwrite to replace it")
    start_bench("gradient_inversion", args.threads)
    torch.manual_seed(args.seed)
    model = build_model("unet", chans=args.chans, num_pool_layers=2)
    run = RunConfig()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_sites(Path(tmp), size=args.size, subjects=args.sites + 2, slices=1, names=("site-c",))[0]
        _, datasets = load_site(str(path))
        slices = [default_collate([datasets["train"][i]]) for i in range(args.sites)]
    updates = [loss_gradient(model, batch) for batch in slices]
    truths = [batch["target"][0].numpy() for batch in slices]  # type: ignore[index]
    summed = [sum(parts) for parts in zip(*updates)]
    views = {
        "no SecAgg: the site's update": updates[0],
        "SecAgg+: the site's masked message": secagg_message(updates[0], run, args.seed),
        f"SecAgg+: the sum of {args.sites} sites": summed,
    }
    rows, images = [], {"true slice (site 1)": truths[0]}
    for label, observed in views.items():
        image = invert(model, observed, slices[0], iterations=args.iterations, tv=args.tv, seed=args.seed)
        matched = [scores(image, truth) for truth in truths] if "sum" in label else [scores(image, truths[0])]
        best = max(range(len(matched)), key=lambda i: matched[i][0])
        images[label] = image
        rows.append([label, f"{matched[best][0]:.2f}", f"{matched[best][1]:.3f}", f"site {best + 1}"])
        logger.info("%s: PSNR %.2f SSIM %.3f", label, *matched[best])
    print(markdown_table(["what the server inverts", "PSNR (dB)", "SSIM", "scored against"], rows))
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
