"""The dashboard's ``/metrics``: a run directory's state in Prometheus' text format.

The ServerApp's own ``/metrics`` (:mod:`server.tracking.prometheus`) lives only as long as its process;
the dashboard reads the run directory, so it also answers before a run starts and after it ended
(status finished or failed, the rounds completed, the last global validation metrics), which is what
an alert on a stalled or failed run needs. Computed afresh at each scrape, from the files alone.

Served on the dashboard's own port behind its token, and, with ``--metrics-port``, by
:func:`serve_run_metrics` on a listener of its own that answers nothing but these gauges and asks
for no token: a Prometheus then needs no copy of the dashboard's token, which would also open the
sample reconstructions (patient images); the gauges are counts, times and global scores only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.store import GLOBAL_SITE, STATUSES
from server.viewer.run_view import load_run

logger = logging.getLogger(__name__)

#: Global validation metrics exported as gauges, by metric name.
GLOBAL_GAUGES = {
    "psnr": "fedsense_run_global_psnr_db",
    "ssim": "fedsense_run_global_ssim",
    "nmse": "fedsense_run_global_nmse",
}


class RunCollector(Collector):
    """Collects the gauges of one run directory at every scrape."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = run_dir

    def collect(self) -> Iterator[GaugeMetricFamily]:
        view = load_run(self.run_dir, must_exist=False)
        run = str(view.config.get("name", os.path.basename(os.fspath(self.run_dir))))
        status = GaugeMetricFamily(
            "fedsense_run_status", "1 for the run's status in config.json", labels=["run", "status"]
        )
        for name in STATUSES:
            status.add_metric([run, name], 1.0 if view.config.get("status") == name else 0.0)
        yield status
        evaluated = [r for r in view.records if r["site"] == GLOBAL_SITE and r["phase"] == "evaluate"]
        rounds = GaugeMetricFamily(
            "fedsense_run_rounds_completed", "Highest round with a global evaluation", labels=["run"]
        )
        rounds.add_metric([run], float(max((r["round"] for r in evaluated), default=0)))
        yield rounds
        if evaluated:
            last = max(evaluated, key=lambda r: r["round"])
            for name, metric in GLOBAL_GAUGES.items():
                if last["metrics"].get(name) is not None:
                    gauge = GaugeMetricFamily(
                        metric, f"Global validation {name} of the last evaluated round", labels=["run"]
                    )
                    gauge.add_metric([run], last["metrics"][name])
                    yield gauge
        if view.records:
            stamp = GaugeMetricFamily(
                "fedsense_run_last_record_timestamp_seconds",
                "When the newest metrics record was written (Unix time)",
                labels=["run"],
            )
            stamp.add_metric([run], max(r["time"] for r in view.records))
            yield stamp
        if view.best is not None:
            best = GaugeMetricFamily("fedsense_run_best_round", "The round best.json names", labels=["run"])
            best.add_metric([run], float(view.best["round"]))
            yield best


def _registry(run_dir: str | os.PathLike[str]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(run_dir))
    return registry


def run_metrics_text(run_dir: str | os.PathLike[str]) -> bytes:
    """The exposition of :class:`RunCollector` for ``run_dir``."""
    return generate_latest(_registry(run_dir))


def serve_run_metrics(run_dir: str | os.PathLike[str], port: int, host: str) -> WSGIServer:
    """Serve :class:`RunCollector`'s gauges alone, without a token, from a thread; ``.shutdown()`` stops it."""
    server, _ = start_http_server(port, addr=host, registry=_registry(run_dir))
    logger.info("dashboard: run metrics (no token, nothing else) on %s:%d", host, server.server_port)
    return server
