"""Best-round tracking and early stopping on the global validation metric.

Training curves of small federated MRI runs are noisy and often peak before the last round, so the
model a site should deploy is the one of the round with the best *validation* metric, not the last.
The ServerApp and the baselines feed every evaluated round's global metric to a :class:`BestTracker`,
which keeps ``best.json`` in the run directory pointing at that round's checkpoint and says when
``patience`` rounds have passed without improvement (early stop). With ``stop-rule = every-site`` a run
stops only when neither the mean nor any site's own metric has improved for ``patience`` rounds, the rule
the local baseline's sites are stopped by. The mean of noisy site curves stalls on a dip while sites still
improve (bench.quality, R = 8: pooled centralized stopped on the mean while a site's own best round was its
last; a local site's own curve gained 0.1-2.2 dB after its first 6-round stall).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from common.errors import FedSenseError
from server.store import GLOBAL_SITE, RunDir

logger = logging.getLogger(__name__)

SELECT_METRICS = ("psnr", "ssim", "nmse")
# Metrics where a smaller value is better; the others are maximised.
LOWER_IS_BETTER = frozenset({"nmse", "loss"})


def is_better(metric: str, value: float, than: float | None) -> bool:
    """Whether ``value`` strictly improves on ``than`` (``None``: nothing yet) for ``metric``."""
    if not math.isfinite(value):
        return False
    if than is None:
        return True
    return value < than if metric in LOWER_IS_BETTER else value > than


def best_round(values: Mapping[int, float], metric: str) -> int | None:
    """The round with the best value of ``metric``; the earliest one wins a tie. ``None`` if empty."""
    best: int | None = None
    for rnd in sorted(values):
        if is_better(metric, values[rnd], None if best is None else values[best]):
            best = rnd
    return best


@dataclass
class Patience:
    """Rounds without improvement of one series of ``metric`` values (a local site's own validation metric).

    The local baseline gives each site one and stops when every site's has run out, not when the mean over
    all sites stops improving (which can stop while one site is still improving).
    """

    metric: str
    patience: int
    best_round: int | None = None
    best_value: float | None = None
    stale: int = 0

    def update(self, rnd: int, value: float | None) -> bool:
        """Record round ``rnd``'s value (None: not measured, counts as no improvement); True if best."""
        if value is not None and is_better(self.metric, value, self.best_value):
            self.best_round, self.best_value, self.stale = rnd, float(value), 0
            return True
        self.stale += 1
        return False

    @property
    def exhausted(self) -> bool:
        """True once ``patience`` (> 0) rounds in a row have not improved the best."""
        return self.patience > 0 and self.stale >= self.patience


class BestTracker:
    """Keeps ``best.json`` of one run up to date and counts rounds without improvement (a :class:`Patience`
    on the global validation metric).

    ``patience`` 0 never stops early. On a resumed run the tracker starts from the existing
    ``best.json`` (and the rounds evaluated since), so patience carries over a restart. ``every_site``: each
    site's own metric of the shared model has a :class:`Patience` too, and the run stops only when all of
    them and the global one have run out.
    """

    def __init__(self, store: RunDir, metric: str, patience: int, every_site: bool = False) -> None:
        if metric not in SELECT_METRICS:
            raise FedSenseError(f"select-metric must be one of {SELECT_METRICS}, got {metric!r}")
        if patience < 0:
            raise FedSenseError(f"patience must be >= 0, got {patience}")
        self.store, self.metric, self.patience, self.every_site = store, metric, patience, every_site
        self.best: dict[str, Any] | None = None
        self.counter = Patience(metric, patience)
        #: With ``every_site``: one counter per site that has been evaluated, on its own metric.
        self.sites: dict[str, Patience] = {}

    @property
    def stale(self) -> int:
        """Evaluated rounds in a row that have not improved the best."""
        return self.counter.stale

    @property
    def exhausted(self) -> bool:
        """True once ``patience`` (> 0) evaluated rounds in a row have not improved the best (and, with
        ``every_site``, not any site's own best)."""
        return self.counter.exhausted and all(c.exhausted for c in self.sites.values())

    @property
    def sites_exhausted(self) -> bool:
        """True once every site's own counter (``every_site``; at least one site seen) has run out: the local
        baseline's rule, where each site trains its own model and the mean is not a model's metric."""
        return bool(self.sites) and all(c.exhausted for c in self.sites.values())

    def resume(self, last_round: int) -> None:
        """Continue after ``last_round``: adopt ``best.json`` if it is this metric's, else start over."""
        best = self.store.best()
        if best is not None and best["metric"] == self.metric and best["round"] <= last_round:
            self.best = best
            stale = last_round - best["round"]
            self.counter = Patience(self.metric, self.patience, best["round"], float(best["value"]), stale)
        if self.every_site:
            self._replay_sites(last_round)

    def _replay_sites(self, last_round: int) -> None:
        """Rebuild the site counters from the recorded evaluations of rounds 1..``last_round``."""
        by_round: dict[int, dict[str, Mapping[str, float | None]]] = {}
        for record in self.store.read_metrics(dedupe=True):
            rnd, site = record["round"], record["site"]
            if record["phase"] == "evaluate" and site != GLOBAL_SITE and 1 <= rnd <= last_round:
                by_round.setdefault(rnd, {})[site] = record["metrics"]
        self.sites = {}
        for rnd in sorted(by_round):
            self._update_sites(rnd, by_round[rnd])

    def _update_sites(self, rnd: int, sites: Mapping[str, Mapping[str, float | None]]) -> None:
        """Each site's counter takes its metric of round ``rnd``; a site not evaluated counts as not improving."""
        for site in sites:
            if site not in self.sites:  # first seen: counters keep the order sites appear in
                self.sites[site] = Patience(self.metric, self.patience)
        for site, counter in self.sites.items():
            counter.update(rnd, sites.get(site, {}).get(self.metric))

    def update(
        self,
        rnd: int,
        metrics: Mapping[str, float | None],
        sites: Mapping[str, Mapping[str, float | None]] | None = None,
    ) -> bool:
        """Record round ``rnd``'s global validation ``metrics`` (its checkpoint must exist); True if best.

        A round without the selected metric counts as not improving. ``sites``: each site's metrics of the
        round, counted with ``every_site`` (ignored otherwise).
        """
        if self.every_site:
            self._update_sites(rnd, sites or {})
        if not self.counter.update(rnd, metrics.get(self.metric)):
            return False
        value = cast(float, self.counter.best_value)  # set by the improving update
        self.best = self.store.write_best(rnd, self.metric, value)
        logger.info("round %d is the best so far: %s %.4g", rnd, self.metric, value)
        return True

    def stop_detail(self) -> dict[str, Any]:
        """What ``status_detail`` records when a run stops early."""
        best = f"best round {self.best['round']}" if self.best is not None else f"no finite {self.metric} at all"
        if self.every_site:
            own = ", ".join(f"{site} best round {c.best_round}" for site, c in sorted(self.sites.items()))
            return {
                "early_stop": f"no {self.metric} improvement of the mean or of any site's own for {self.patience} "
                f"round(s) (patience {self.patience}); {best}; {own}"
            }
        return {
            "early_stop": f"no {self.metric} improvement for {self.stale} round(s) (patience {self.patience}); {best}"
        }


def read_best(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``best.json`` (:meth:`RunDir.best`); None when the run has none (yet)."""
    return RunDir(run_dir).best()


def export_command(run_dir: str | Path, best: dict[str, Any] | None) -> str:
    """The ``fedsense export`` line for the best round (the last one when there is no best.json).

    Its ``--out`` is a folder that does not exist yet in the current directory (``model/``, else ``model-2/``, ...):
    export refuses an existing one, and ``--overwrite`` would replace a model exported earlier, perhaps of another
    run or round, that the user may still want; a new folder works as written and loses nothing.
    """
    which = "best" if best is not None else "last"
    out = next(name for name in _model_folders() if not os.path.lexists(name))
    return f"fedsense export {shlex.quote(str(run_dir))} --round {which} --out {out}/"


def _model_folders() -> Iterator[str]:
    """``model``, ``model-2``, ``model-3``, ...: the names :func:`export_command` suggests, in order."""
    yield "model"
    for number in itertools.count(2):
        yield f"model-{number}"


def best_summary(best: dict[str, Any] | None) -> str | None:
    """``best round 3 (psnr 31.20)`` for display; None without a best.json."""
    if best is None:
        return None
    return f"best round {best['round']} ({best['metric']} {best['value']:.4g})"
