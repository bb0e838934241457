"""TensorBoard event files under the run directory (``tensorboard/``), written by the server.

Scalars use the MLflow names (``<site>/<phase>/<metric>``, step = round), so both trackers show
the same curves; the run config is logged as text and each evaluated round's sample
reconstructions (where the server can read them) as images. ``tensorboard --logdir RUN/tensorboard``
shows one run; ``--logdir runs`` compares every run under ``runs/``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from server.store import GLOBAL_SITE, RunDir
from server.tracking.base import Observer
from server.tracking.images import sample_panel
from server.tracking.records import record_values

logger = logging.getLogger(__name__)

LOG_DIR = "tensorboard"


class TensorBoardTracker(Observer):
    """One ``SummaryWriter`` per run directory; every hook ends with a flush, so a live TensorBoard sees it."""

    name = "tensorboard"

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (fedsense[tracking])

        self.store = RunDir(run_dir)
        self.writer = SummaryWriter(log_dir=str(run_dir / LOG_DIR))

    def start(self, config: Mapping[str, Any], resume: bool) -> None:
        rows = "\n".join(f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(config.items()))
        self.writer.add_text("run-config", f"| key | value |\n|---|---|\n{rows}", global_step=0)
        self.writer.flush()

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> None:
        for record in records:
            for key, value in record_values(record).items():
                self.writer.add_scalar(key, value, global_step=int(record["round"]), walltime=float(record["time"]))
            if record["phase"] == "evaluate" and record["site"] == GLOBAL_SITE:
                self._samples(int(record["round"]))
        self.writer.flush()

    def _samples(self, rnd: int) -> None:
        samples = self.store.latest_samples()
        if samples is None or samples.round != rnd:
            return
        for site, arrays in samples.sites.items():
            self.writer.add_image(f"samples/{site}", sample_panel(arrays), global_step=rnd, dataformats="HW")

    def best(self, best: Mapping[str, Any]) -> None:
        self.writer.add_scalar("best/round", float(best["round"]), global_step=int(best["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
