"""The run directory that also reports to trackers: the round loop's one hook into them.

The ServerApp and the baselines write every record through :class:`server.store.RunDir`; this
subclass passes each write on to the configured observers after the file write succeeded, so the
trackers see exactly what ``metrics.jsonl``, ``best.json`` and ``config.json`` hold, and the round
loop needs no tracking code of its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.registry import TRACKERS, check_implemented
from common.runconfig import RunConfig
from server.store import RunDir, validate_record
from server.tracking.base import Background, Observer

logger = logging.getLogger(__name__)


class TrackedRunDir(RunDir):
    """A :class:`RunDir` whose writes are also handed to ``observers`` (in order, after the write)."""

    def __init__(self, path: str | os.PathLike[str], observers: Sequence[Observer] = ()) -> None:
        super().__init__(path)
        self.observers = list(observers)

    def _tell(self, hook: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:  # an observer's bug must not fail the run that it watches
                logger.exception("%s: %s failed", observer.name, hook)

    def init(self, config: Mapping[str, Any], resume: bool) -> None:
        super().init(config, resume)
        self._tell("start", dict(config), resume)

    def append_metrics(self, records: Sequence[Mapping[str, Any]]) -> None:
        super().append_metrics(records)
        if records:
            self._tell("metrics", [validate_record(r) for r in records])

    def save_checkpoint(
        self,
        round: int,
        state_dict: Mapping[str, Any],
        config: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        path = super().save_checkpoint(round, state_dict, config, extra)
        self._tell("checkpoint", round)
        return path

    def write_best(self, round: int, metric: str, value: float) -> dict[str, Any]:
        best = super().write_best(round, metric, value)
        self._tell("best", best)
        return best

    def set_status(self, status: str, **extra: Any) -> None:
        super().set_status(status, **extra)
        if status != "running":
            self._tell("finish", status, extra)
            self.close()

    def close(self) -> None:
        """Close every observer (a background tracker first drains its queue, bounded)."""
        observers, self.observers = self.observers, []
        for observer in observers:
            try:
                observer.close()
            except Exception:
                logger.exception("%s: close failed", observer.name)


def tracked_store(run: RunConfig, observers: Sequence[Observer] = ()) -> RunDir:
    """The run directory of ``run`` with the trackers its ``tracking`` names (plus ``observers``).

    Without trackers or observers it is a plain :class:`RunDir`. A tracker that cannot be set up
    (its package missing) is logged and left out: tracking never stops a run.
    """
    trackers: list[Observer] = list(observers)
    for name in run.trackers:
        try:
            trackers.append(_build(name, run))
        except Exception as exc:
            logger.error("tracking %s is off for this run: %s", name, exc)
    return TrackedRunDir(run.run_dir, trackers) if trackers else RunDir(run.run_dir)


def _mlflow(run: RunConfig) -> Observer:
    from server.tracking.mlflow import MlflowTracker  # mlflow is imported only by runs that use it

    return Background(MlflowTracker(Path(run.run_dir), run.tracking_uri, run.name))


def _tensorboard(run: RunConfig) -> Observer:
    from server.tracking.tensorboard import TensorBoardTracker  # local files: no worker thread needed

    return TensorBoardTracker(Path(run.run_dir))


_BUILDERS: dict[str, Callable[[RunConfig], Observer]] = {"mlflow": _mlflow, "tensorboard": _tensorboard}
check_implemented("tracker", TRACKERS, _BUILDERS)


def _build(name: str, run: RunConfig) -> Observer:
    return _BUILDERS[name](run)
