"""What privacy costs in image quality: test PSNR at R = 4 against ε, for sample- and client-level DP.

FedAvg is emulated in-process as ``bench.harness.emulate_fedavg`` does (the ClientApp's training, the
server's average), with the privacy mechanisms FedSense runs:

- sample-level: each site trains with DP-SGD (``common.dp.train_private``) at noise multiplier σ and
  per-slice clipping norm C; ε is Opacus' RDP accountant over the site's rounds (the largest over sites,
  at δ = 1e-5);
- client-level: each site's update is clipped to norm C_c and the uniform mean gets Gaussian noise of
  std σ_c·C_c / sites, as Flower's ``DifferentialPrivacyServerSideFixedClipping``; ε from Flower's RDP
  accountant without sampling amplification (every site in every round).

Run::

    python -m bench.privacy
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from bench.harness import fresh_output, markdown_table, model_recon, score_slices, start_bench, write_sites
from bench.quality import MODELS as QUALITY_MODELS
from common.data.dataset import SiteDataset
from common.data.loaders import load_site, make_loader
from common.dp import PrivacyLedger, train_private
from common.models import build_model
from common.training import train

logger = logging.getLogger("bench.privacy")

MODEL = QUALITY_MODELS["U-Net"]  # the quality benchmark's U-Net; --chans overrides the width
DELTA = 1e-5


def federate(
    args: argparse.Namespace,
    data: dict[str, dict[str, SiteDataset]],
    *,
    sigma: float = 0.0,
    client_sigma: float | None = None,
) -> tuple[dict[str, torch.Tensor], float, float]:
    """``args.rounds`` rounds of FedAvg; returns the global weights, ε and the median update norm seen."""
    name, kwargs = MODEL[0], {**MODEL[1], "chans": args.chans}
    torch.manual_seed(args.seed)
    state = {k: v.detach().clone() for k, v in build_model(name, **kwargs).state_dict().items()}
    ledgers = {site: PrivacyLedger() for site in data}
    noise = torch.Generator().manual_seed(args.seed + 1)
    norms: list[float] = []
    for rnd in range(1, args.rounds + 1):
        updates, weights = [], []
        for site, splits in data.items():
            torch.manual_seed(args.seed + rnd)
            model = build_model(name, **kwargs)
            model.load_state_dict(state)
            loader = make_loader(splits["train"], args.batch, shuffle=True, seed=args.seed + rnd)
            if sigma > 0:
                result, q = train_private(
                    model, loader, noise_multiplier=sigma, max_grad_norm=args.clip, steps=args.local_steps, lr=args.lr
                )
                ledgers[site] = ledgers[site].with_round(sigma, q, result.steps)
            else:
                result = train(model, loader, steps=args.local_steps, lr=args.lr)
            update = {k: v.detach() - state[k] for k, v in model.state_dict().items()}
            norm = float(torch.sqrt(sum((u.double() ** 2).sum() for u in update.values())))
            norms.append(norm)
            if client_sigma is not None:
                update = {k: u * min(1.0, args.client_clip / norm) for k, u in update.items()}
            updates.append(update)
            weights.append(1.0 if client_sigma is not None else float(result.num_examples))
        total = sum(weights)
        mean = {k: sum(u[k] * (w / total) for u, w in zip(updates, weights)) for k in state}
        if client_sigma:
            std = client_sigma * args.client_clip / len(data)
            mean = {k: v + torch.randn(v.shape, generator=noise) * std for k, v in mean.items()}
        state = {k: state[k] + mean[k] for k in state}
    if sigma > 0:
        eps = max(ledger.epsilon(DELTA) for ledger in ledgers.values())
    elif client_sigma:
        sites = len(data)
        acc = RdpAccountant(
            PrivacyConfig(DELTA, sites, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION)
        )
        acc.compose(GaussianPrivacyEvent(client_sigma, sites, sites), count=args.rounds)
        eps = acc.get_epsilon(DELTA)
    else:
        eps = float("inf")
    return state, eps, float(np.median(norms))


def pooled_psnr(
    args: argparse.Namespace, data: dict[str, dict[str, SiteDataset]], state: dict[str, torch.Tensor]
) -> float:
    """Mean test PSNR over the slices of all sites."""
    name, kwargs = MODEL[0], {**MODEL[1], "chans": args.chans}
    net = build_model(name, **kwargs)
    net.load_state_dict(state)
    scores = [
        s.psnr
        for splits in data.values()
        for s in score_slices(model_recon(net), make_loader(splits["test"], 4, shuffle=False, seed=0))
    ]
    return float(np.mean(scores))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults take a few minutes on two shared cores."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-privacy"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--chans", type=int, default=MODEL[1]["chans"], help="U-Net width")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip", type=float, default=1.0, help="DP-SGD per-slice clipping norm C")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="DP-SGD noise multipliers")
    parser.add_argument(
        "--client-clip",
        type=float,
        default=0.0,
        help="client-level update clipping norm (0: the median update norm of the run without DP)",
    )
    parser.add_argument("--client-sigmas", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train every variant on the same R = 4 sites, print PSNR against ε."""
    args = parse_args(argv)
    started = start_bench("privacy", args.threads)
    print(
        f"R = 4, {args.size}², {args.subjects} subjects/site, U-Net {{'chans': {args.chans}, 'num_pool_layers': 2}}, "
        f"{args.rounds} rounds x {args.local_steps} local steps x batch {args.batch}, Adam lr {args.lr}, "
        f"δ = {DELTA:g}"
    )
    out = args.out.resolve()
    fresh_output(out, args.overwrite)
    sites = write_sites(out / "sites", size=args.size, subjects=args.subjects, slices=args.slices, acceleration=4.0)
    data = {cfg.name: ds for cfg, ds in (load_site(str(p)) for p in sites)}
    rows = []
    state, _, median_norm = federate(args, data)
    rows.append(("none (FedAvg)", "–", "∞", f"{pooled_psnr(args, data, state):.2f}"))
    logger.info("no DP done; median update norm %.3f", median_norm)
    if args.client_clip <= 0:
        args.client_clip = float(f"{median_norm:.2g}")
    for sigma in args.sigmas:
        state, eps, _ = federate(args, data, sigma=sigma)
        rows.append(
            (
                "sample-level DP-SGD",
                f"σ = {sigma:g}, C = {args.clip:g}",
                f"{eps:.2f}",
                f"{pooled_psnr(args, data, state):.2f}",
            )
        )
        logger.info("DP-SGD sigma %g done", sigma)
    for sigma in args.client_sigmas:
        state, eps, _ = federate(args, data, client_sigma=sigma)
        rows.append(
            (
                "client-level, server clipping",
                f"σ_c = {sigma:g}, C_c = {args.client_clip:g}",
                f"{eps:.2f}",
                f"{pooled_psnr(args, data, state):.2f}",
            )
        )
        logger.info("client-level sigma %g done", sigma)
    print(f"\nmedian L2 norm of a site's update without DP: {median_norm:.3f}\n")
    print(markdown_table(("privacy", "setting", f"ε after {args.rounds} rounds", "test PSNR (dB, all sites)"), rows))
    print(f"\ntotal: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
