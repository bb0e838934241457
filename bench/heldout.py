"""A trained FedSense model on real MR images it never saw (``common.data.heldout``), against zero-filled.

Loads the run directory's best checkpoint (``best.json``; the last checkpoint when there is none),
acquires every held-out image with the given scanner at R = ``--acceleration`` and prints per-image and
mean PSNR with the paired 95 % bootstrap CI of the gain. Run::

    python -m bench.heldout --run-dir runs/fedsense-run [--size 128 --coils 8 --mask random]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bench.harness import markdown_table, set_threads
from common.config import ScannerConfig
from common.data.heldout import score_heldout
from common.errors import FedSenseError
from common.models import build_model
from common.stats import paired_bootstrap
from server.store import RunDir


def load_best_model(run_dir: Path) -> tuple[torch.nn.Module, str]:
    """The run's model at its best validation round (else its last checkpoint), and which file that was."""
    store = RunDir(run_dir)
    best = store.best()
    if best is not None:
        path = store.path / best["checkpoint"]
        payload = torch.load(path, map_location="cpu", weights_only=True)
    else:
        latest = store.latest_checkpoint()
        if latest is None:
            raise FedSenseError(f"{store.checkpoint_dir}: no checkpoint to evaluate")
        path, payload = store.checkpoint_path(latest[0]), latest[1]
    config = payload["config"]
    model = build_model(config["model"], **json.loads(config.get("model-args") or "{}"))
    model.load_state_dict(payload["state_dict"])
    return model, str(path)


def main(argv: list[str] | None = None) -> None:
    """Score the run's best model on every held-out image and print the table and the mean gain."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--size", type=int, default=128, help="acquisition matrix (pixels per side)")
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--noise", type=float, default=0.02, help="k-space noise std relative to the image max")
    parser.add_argument("--mask", default="random")
    parser.add_argument("--acceleration", type=float, default=4.0)
    parser.add_argument("--center-fraction", type=float, default=0.08)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    model, path = load_best_model(args.run_dir)
    scanner = ScannerConfig(
        field_strength_t=1.5,
        coils=args.coils,
        matrix=(args.size, args.size),
        noise_std=args.noise,
        mask=args.mask,
        acceleration=args.acceleration,
        center_fraction=args.center_fraction,
    )
    scores = score_heldout(model, scanner, seed=args.seed)
    print(f"# bench.heldout — {path}; {args.size}², {args.coils} coils, {args.mask} mask, R={args.acceleration:g}\n")
    print(
        markdown_table(
            ("image", "zero-filled PSNR (dB)", "model PSNR (dB)", "gain (dB)"),
            ((s.name, f"{s.zero_filled_psnr:.2f}", f"{s.model_psnr:.2f}", f"{s.gain:+.2f}") for s in scores),
        )
    )
    zf, rec = np.array([s.zero_filled_psnr for s in scores]), np.array([s.model_psnr for s in scores])
    print(
        f"\nmean over {len(scores)} images: zero-filled {zf.mean():.2f} dB, model {rec.mean():.2f} dB, "
        f"gain {paired_bootstrap(rec, zf)} dB (mean [95 % bootstrap CI])"
    )


if __name__ == "__main__":
    main()
