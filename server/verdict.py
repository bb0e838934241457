"""``fedsense verdict RUN --local LOCAL_RUN``: should each site join? Its best federated model against its own.

A hospital's data-governance board asks one question of a finished federation: on *our* test patients,
is the model we get by joining better than the one we trained alone, by more than chance? For each site
this scores, on the site's own test split:

- the federated side: the site's personalised model (``<site-state-dir>/<site>/finetuned.pt``, written by
  the site's fine-tuning after the last round) when there is one, else the run's best global checkpoint
  (``best.json``); a pooled ``centralized`` baseline run is accepted in place of a federated one;
- the local side: the site's own model from a ``local`` baseline run, at that site's best validation round;

and reports the paired PSNR gain with a hierarchical bootstrap 95 % CI (test subjects, then slices within a
subject: :func:`common.stats.hierarchical_bootstrap`) and the verdict of :func:`common.stats.join_verdict`.
Nothing is written; the run directories are only read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.data.loaders import load_site, make_loader
from common.errors import FedSenseError
from common.metrics import psnr
from common.models import build_model
from common.personalise import FINETUNED_FILE
from common.stats import PairedDifference, hierarchical_bootstrap, join_verdict
from common.training import predict
from server.best import best_round
from server.store import RunDir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteVerdict:
    """One site's answer: which models were compared, the gain and the verdict."""

    site: str
    federated: str  # which federated model: "personalised" or "global (round N)"
    local_round: int
    federated_psnr: float
    local_psnr: float
    gain: PairedDifference
    verdict: str


def _model(config: dict[str, Any], state: dict[str, torch.Tensor], where: Path) -> torch.nn.Module:
    args = config.get("model-args") or {}
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    try:
        net = build_model(config["model"], **args)
        net.load_state_dict(state)
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise FedSenseError(f"{where}: cannot rebuild the run's model from it: {exc}") from exc
    return net.eval()


def _run(path: Path, role: str) -> tuple[RunDir, dict[str, Any]]:
    if not path.is_dir():
        raise FedSenseError(f"{path}: {role} run directory not found")
    store = RunDir(path)
    return store, store.read_config()


def _local_models(store: RunDir, config: dict[str, Any], site: str) -> tuple[int, torch.nn.Module]:
    """The local run's model of ``site`` at that site's best validation PSNR round."""
    val = {
        r["round"]: r["metrics"]["psnr"]
        for r in store.read_metrics(dedupe=True)
        if r["phase"] == "evaluate" and r["site"] == site and r["round"] >= 1 and r["metrics"].get("psnr") is not None
    }
    rnd = best_round(val, "psnr")
    if rnd is None:
        raise FedSenseError(f"{store.path}: local run has no validation record of site {site!r}")
    state = {
        k.split("/", 1)[1]: v for k, v in store.load_checkpoint(rnd)["state_dict"].items() if k.startswith(f"{site}/")
    }
    if not state:
        raise FedSenseError(f"{store.checkpoint_path(rnd)}: no weights of site {site!r}")
    return rnd, _model(config, state, store.checkpoint_path(rnd))


@torch.no_grad()
def _scores(model: torch.nn.Module, loader: Any) -> tuple[list[float], list[str]]:
    """Per-slice PSNR (at the slice's volume maximum, fastMRI's convention) and each slice's subject."""
    values, subjects = [], []
    for batch in loader:
        pred = predict(model, batch).float().numpy()
        target = batch["target"].numpy()
        for i in range(target.shape[0]):
            values.append(psnr(target[i], pred[i], float(batch["max_value"][i])))
            subjects.append(str(batch["subject"][i]))
    return values, subjects


def verdicts(
    run_dir: Path,
    local_dir: Path,
    sites: Sequence[str] = (),
    split: str = "test",
    seed: int = 0,
    site_state_dir: Path | None = None,
) -> list[SiteVerdict]:
    """One :class:`SiteVerdict` per site of the federated run (or per name in ``sites``).

    ``site_state_dir`` is where the sites' fine-tuned models are (a deployed site keeps them on its own
    disk); by default the run's own ``site-state-dir``.
    """
    fed, fed_config = _run(run_dir, "federated")
    if fed_config.get("baseline") not in (None, "centralized", "centralized-balanced"):
        raise FedSenseError(f"{run_dir}: is a {fed_config['baseline']!r} baseline run, not a federated (or pooled) one")
    local, local_config = _run(local_dir, "local")
    if local_config.get("baseline") != "local":
        raise FedSenseError(
            f"{local_dir}: not a local baseline run (its baseline is {local_config.get('baseline')!r}); "
            "make one with `fedsense baseline local`"
        )
    selected = fed.best()
    if selected is None:
        raise FedSenseError(f"{run_dir}: no best.json (the run has not finished a validated round)")
    global_model = _model(
        fed_config, fed.load_checkpoint(selected["round"])["state_dict"], fed.checkpoint_path(selected["round"])
    )
    state_dir = site_state_dir or Path(fed_config.get("site-state-dir") or fed.path / "site-state")
    if site_state_dir is not None and not site_state_dir.is_dir():
        raise FedSenseError(f"{site_state_dir}: --site-state-dir not found")
    paths = [p for p in str(fed_config.get("sites", "")).split(",") if p]
    if not paths:
        raise FedSenseError(f"{run_dir}: its config names no sites")
    loaded = {cfg.name: data for cfg, data in (load_site(p) for p in paths)}
    unknown = sorted(set(sites) - set(loaded))
    if unknown:
        raise FedSenseError(f"--site: {unknown} not among the run's sites {sorted(loaded)}")
    out = []
    for site in sites or list(loaded):
        personal = state_dir / site / FINETUNED_FILE
        if personal.is_file():
            saved = torch.load(personal, map_location="cpu", weights_only=True)
            model, which = _model(fed_config, saved["state_dict"], personal), "personalised (fine-tuned)"
        else:
            model, which = global_model, f"global (round {selected['round']})"
        local_round, local_model = _local_models(local, local_config, site)
        loader = make_loader(loaded[site][split], 4, shuffle=False, seed=0)
        fed_scores, subjects = _scores(model, loader)
        local_scores, _ = _scores(local_model, loader)
        if not fed_scores:
            raise FedSenseError(f"{paths[list(loaded).index(site)]}: site {site!r} has no {split} slices")
        gain = hierarchical_bootstrap(fed_scores, local_scores, subjects, seed=seed)
        out.append(
            SiteVerdict(
                site,
                which,
                local_round,
                float(np.mean(fed_scores)),
                float(np.mean(local_scores)),
                gain,
                join_verdict(gain),
            )
        )
    return out


def table(rows: Sequence[SiteVerdict], split: str) -> str:
    """The verdicts as a markdown table."""
    lines = [
        f"| site | federated model | local best round | {split} PSNR federated | {split} PSNR local | "
        f"gain (dB) [95 % CI] | {split} subjects | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.site} | {r.federated} | {r.local_round} | {r.federated_psnr:.2f} | {r.local_psnr:.2f} | "
        f"{r.gain} | {r.gain.subjects} | {r.verdict} |"
        for r in rows
    ]
    return "\n".join(lines)
