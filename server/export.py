"""``fedsense export``: turn one round of a run into a self-contained, verifiable model artifact.

The checkpoint (``checkpoints/round-NNNN.pt``, the server's own file) is read with
``torch.load(weights_only=True)``; what leaves the server is the :mod:`common.artifact` folder, whose
loading involves no pickle at all. The model card is assembled from the run directory alone: its config,
its metrics records (training example counts, each site's validation metrics at that round), ``best.json``
for ``--round best``, and, where the run lists them and they are readable, the site configs (masks,
accelerations, matrix sizes, coils the model was trained on).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from common.artifact import ONNX_FILE, Acquisition, Architecture, ModelCard, SiteEntry, write_artifact
from common.config import SiteConfig, load_site_config
from common.data.kinds import dataset_kind
from common.errors import ConfigError, DataError, FedSenseError
from common.models import build_model, count_parameters
from common.outputs import check_output_folder
from common.runconfig import RunConfig
from server.best import read_best
from server.store import GLOBAL_SITE, RunDir

logger = logging.getLogger(__name__)


def select_round(run: RunDir, which: str) -> tuple[int, dict[str, Any] | None]:
    """``best`` (from best.json), ``last`` (newest loadable checkpoint) or a round number -> (round, best)."""
    if which == "best":
        best = read_best(run.path)
        if best is None:
            raise FedSenseError(f"{run.path}: run has no best.json; use --round last|N")
        return int(best["round"]), best
    if which == "last":
        latest = run.latest_checkpoint()
        if latest is None:
            raise FedSenseError(f"{run.checkpoint_dir}: no loadable checkpoint; the run has not finished a round")
        return latest[0], None
    try:
        number = int(which)
    except ValueError:
        raise FedSenseError(f"--round: expected best, last or a round number, got {which!r}") from None
    if number < 0:
        raise FedSenseError(f"--round: round must be >= 0, got {number}")
    return number, None


def _acquisition(config: SiteConfig) -> Acquisition:
    scanner = config.scanner
    return Acquisition(
        dataset=config.dataset,
        mask=scanner.mask,
        acceleration=scanner.acceleration,
        center_fraction=scanner.center_fraction,
        trajectory=scanner.trajectory,
        coils=scanner.coils,
        # Raw k-space is used at its stored size; magnitude volumes are re-acquired at scanner.matrix.
        matrix=None if dataset_kind(config.dataset).raw_kspace else tuple(scanner.matrix),
        field_strength_t=scanner.field_strength_t,
        noise_std=scanner.noise_std,
    )


def _site_configs(paths: list[str], extra: list[Path]) -> dict[str, SiteConfig]:
    """Site configs by site name: those the run lists (when readable here) and ``extra`` ones."""
    found: dict[str, SiteConfig] = {}
    for path in paths:
        try:
            config = load_site_config(path)
        except ConfigError as exc:
            logger.warning("site config of the run not readable here, its acquisition is left out: %s", exc)
            continue
        found[config.name] = config
    for extra_path in extra:
        config = load_site_config(extra_path)
        found[config.name] = config
    return found


def build_card_fields(
    run: RunDir,
    round: int,
    selection: str,
    best: dict[str, Any] | None,
    checkpoint_config: dict[str, Any],
    site_configs: list[Path],
) -> dict[str, Any]:
    """Everything the model card says about the run, from the run directory."""
    config = {**run.read_config(), **checkpoint_config} if run.config_path.exists() else dict(checkpoint_config)
    run_config = {k: v for k, v in config.items() if k not in ("status", "status_time", "status_detail", "started_at")}
    if config.get("baseline") == "local":
        raise FedSenseError(
            f"{run.path}: a local-only baseline holds one model per site; there is no single model to export"
        )
    try:
        settings = RunConfig.from_flat(
            {
                k: v
                for k, v in run_config.items()
                if k in RunConfig.model_fields or k.replace("-", "_") in RunConfig.model_fields
            },
            source=str(run.config_path),
        )
    except ConfigError as exc:
        raise FedSenseError(f"{run.config_path}: cannot rebuild the run config: {exc}") from exc
    records = run.read_metrics(dedupe=True)
    train_counts: dict[str, int] = {}
    for record in records:  # the latest training example count of each site up to the round
        if record["phase"] == "train" and record["site"] != GLOBAL_SITE and record["round"] <= max(round, 1):
            train_counts[record["site"]] = int(record["num_examples"])
    validation = {r["site"]: r["metrics"] for r in records if r["phase"] == "evaluate" and r["round"] == round}
    configs = _site_configs(settings.site_list, site_configs)
    names = sorted(set(train_counts) | (set(validation) - {GLOBAL_SITE}) | set(configs))
    sites = [
        SiteEntry(
            name=name,
            num_examples=train_counts.get(name),
            validation=validation.get(name, {}),
            acquisition=_acquisition(configs[name]) if name in configs else None,
        )
        for name in names
    ]
    model = build_model(settings.model, source=str(run.config_path), **settings.model_kwargs)
    completed = {r["round"] for r in records if r["phase"] == "evaluate" and r["site"] == GLOBAL_SITE}
    return {
        "architecture": Architecture(
            name=settings.model, args=settings.model_kwargs, num_parameters=count_parameters(model)
        ),
        "run_name": settings.name,
        "run_config": run_config,
        "round": round,
        "round_selection": selection,
        "selection": best,
        "rounds_completed": max(completed, default=0),
        "rounds_planned": settings.num_server_rounds,
        "sites": sites,
        "global_validation": validation.get(GLOBAL_SITE, {}),
    }


def export_run(
    run_dir: str | Path,
    out: str | Path,
    which: str = "best",
    onnx: bool = False,
    site_configs: list[Path] | None = None,
    overwrite: bool = False,
) -> ModelCard:
    """Export round ``which`` of ``run_dir`` into the artifact folder ``out``; returns its card.

    ``out`` may not be, hold or lie in the run directory or a site config; an earlier artifact there is
    replaced only with ``overwrite``.
    """
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise FedSenseError(f"{run.path}: no such run directory")
    # Before the checkpoint is loaded (or ONNX exported): a refused --out costs a second, not a model export.
    check_output_folder(Path(out), [run.path, *(site_configs or [])], overwrite)
    round, best = select_round(run, which)
    payload = run.load_checkpoint(round)
    fields = build_card_fields(run, round, which, best, dict(payload.get("config") or {}), site_configs or [])
    state = payload["state_dict"]
    architecture: Architecture = fields["architecture"]
    model = build_model(architecture.name, **architecture.args)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(f"{run.checkpoint_path(round)}: weights do not fit {architecture.name}: {exc}") from exc
    extra: dict[str, bytes] = {}
    if onnx:
        from common.onnx_export import export_onnx

        acquisitions = [s.acquisition for s in fields["sites"] if s.acquisition is not None]
        extra[ONNX_FILE], fields["onnx"] = export_onnx(model, acquisitions)
    return write_artifact(Path(out), state, fields, extra_files=extra, overwrite=overwrite)
