"""MLflow tracking, written by the server only: sites send metrics in their replies, never to MLflow.

One FedSense run is one MLflow run (in experiment ``fedsense``, or ``$MLFLOW_EXPERIMENT_NAME``):
params are the whole validated run config, flattened; tags name the sites and their scanner
settings (never data); metrics are ``<site>/<phase>/<metric>`` and ``global/<phase>/<metric>`` with
``step = round``; at the end the exported model (``fedsense export``'s safetensors + card) becomes
an artifact and a registered model version. The MLflow run id is kept in the run directory
(``mlflow.json``), so a resumed FedSense run continues the same MLflow run.

Without a tracking URI (``tracking-uri``, else ``$MLFLOW_TRACKING_URI``) the store is SQLite under
the run directory (``mlflow.db``, artifacts in ``mlartifacts/``), so ``mlflow ui`` works offline.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes
from common.config import load_site_config
from common.errors import ConfigError
from server.store import GLOBAL_SITE, RunDir
from server.tracking.base import Observer
from server.tracking.images import sample_panel
from server.tracking.records import record_values

logger = logging.getLogger(__name__)

EXPERIMENT = "fedsense"
STATE_FILE = "mlflow.json"
#: MLflow's own HTTP retries (7, doubling) would hold a dead server's call for minutes; the worker
#: thread retries instead (server.tracking.base). Set only where the user has not.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
#: MLflow's limits per log_batch call.
MAX_PARAMS, MAX_METRICS = 100, 1000


def default_uri(run_dir: Path) -> str:
    """The SQLite store under the run directory."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def site_tags(site_paths: Sequence[str]) -> dict[str, str]:
    """``site.<name>.<setting>`` tags of the site configs readable here: dataset and scanner, no data."""
    tags: dict[str, str] = {}
    for path in site_paths:
        try:
            config = load_site_config(path)
        except ConfigError as exc:
            logger.info("mlflow: site config not readable here, its tags are left out: %s", exc)
            continue
        scanner = config.scanner
        prefix = f"site.{config.name}."
        tags[prefix + "dataset"] = config.dataset
        for field in ("field_strength_t", "coils", "matrix", "noise_std", "mask", "acceleration", "center_fraction"):
            tags[prefix + field] = str(getattr(scanner, field))
    return tags


class MlflowTracker(Observer):
    """Writes one FedSense run to one MLflow run (see the module docstring for what goes where)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, uri: str, run_name: str) -> None:
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        self.store = RunDir(run_dir)
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(run_dir)
        self.local = not (uri or os.environ.get("MLFLOW_TRACKING_URI"))
        self.run_name = run_name
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.run_id: str | None = None
        self.sites: set[str] = set()

    @property
    def state_path(self) -> Path:
        return self.store.path / STATE_FILE

    def _continued(self) -> str | None:
        """The MLflow run this run directory already logs to at this URI, if any."""
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if state.get("tracking_uri") != self.uri or not state.get("run_id"):
            return None
        return str(state["run_id"])

    def start(self, config: Mapping[str, Any], resume: bool) -> None:
        run_id = self._continued() if resume else None
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "fedsense.resumed", "true")
            self.run_id = run_id
            logger.info("mlflow: continuing run %s at %s", run_id, self.uri)
            return
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            # A local store keeps its artifacts beside it, not in the current directory's ./mlruns.
            location = (self.store.path / "mlartifacts").resolve().as_uri() if self.local else None
            experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        sites = [s.strip() for s in str(config.get("sites", "")).split(",") if s.strip()]
        tags = {"fedsense.run_dir": str(self.store.path.resolve()), **site_tags(sites)}
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(str(k), str(v)[:6000]) for k, v in sorted(config.items())]
        for i in range(0, len(params), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS])
        state = {"tracking_uri": self.uri, "run_id": self.run_id, "experiment_id": experiment_id}
        atomic_write_bytes(self.state_path, (json.dumps(state, indent=2) + "\n").encode())
        logger.info("mlflow: run %s in experiment %r at %s", self.run_id, experiment, self.uri)

    def _run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("no MLflow run (its creation failed)")
        return self.run_id

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> None:
        from mlflow.entities import Metric

        run_id = self._run()
        metrics = []
        for record in records:
            rnd, site = int(record["round"]), record["site"]
            stamp = int(record["time"] * 1000)
            if site != GLOBAL_SITE:
                self.sites.add(site)
            metrics += [Metric(key, value, stamp, rnd) for key, value in record_values(record).items()]
        for i in range(0, len(metrics), MAX_METRICS):
            self.client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS])
        self.client.set_tag(run_id, "fedsense.sites", ",".join(sorted(self.sites)))
        evaluated = {int(r["round"]) for r in records if r["phase"] == "evaluate" and r["site"] == GLOBAL_SITE}
        for rnd in evaluated:
            self._log_samples(run_id, rnd)

    def _log_samples(self, run_id: str, rnd: int) -> None:
        """Round ``rnd``'s sample reconstructions, where the server can read them (simulations, baselines)."""
        samples = self.store.latest_samples()
        if samples is None or samples.round != rnd:
            return
        for site, arrays in samples.sites.items():
            self.client.log_image(run_id, sample_panel(arrays), artifact_file=f"samples/round-{rnd:04d}/{site}.png")

    def best(self, best: Mapping[str, Any]) -> None:
        run_id = self._run()
        self.client.log_metric(run_id, "best/round", float(best["round"]), step=int(best["round"]))
        self.client.log_metric(run_id, f"best/{best['metric']}", float(best["value"]), step=int(best["round"]))
        self.client.set_tag(run_id, "fedsense.best_round", str(best["round"]))

    def finish(self, status: str, detail: Mapping[str, Any]) -> None:
        run_id = self._run()
        for key, value in detail.items():
            self.client.set_tag(run_id, f"fedsense.{key}", str(value)[:5000])
        if status == "finished":
            self._log_model(run_id)
        self.client.set_terminated(run_id, "FINISHED" if status == "finished" else "FAILED")

    def _log_model(self, run_id: str) -> None:
        """The exported model of the best round (else the last) as artifact ``model`` and a model version."""
        from server.export import export_run

        which = "best" if self.store.best() is not None else "last"
        if self.store.latest_checkpoint() is None:
            return  # e.g. the zero-filled baseline: nothing was trained
        with tempfile.TemporaryDirectory(prefix="fedsense-mlflow-") as tmp:
            card = export_run(self.store.path, Path(tmp) / "model", which=which)
            self.client.log_artifacts(run_id, str(Path(tmp) / "model"), "model")
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"fedsense-{self.run_name}")
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
        version = self.client.create_model_version(
            name, source, run_id=run_id, tags={"round": str(card.round), "selection": which}
        )
        logger.info("mlflow: model %s version %s (round %d)", name, version.version, card.round)
