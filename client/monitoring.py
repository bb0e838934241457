"""A site's own Prometheus ``/metrics``: what its ClientApps did, for the hospital's IT monitoring.

Train step time (histogram), train steps, data read errors and the last round trained; counts and
times only, never data. Flower runs every message a site receives in a process of its own (a fresh
``flwr-clientapp``, or a fork of ``fedsense-superexec``) that ends with the message: too short-lived
to answer scrapes, and its counters would start from zero at every message. So ClientApps only
*record*, into prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``), and the one
long-lived process of a site, ``fedsense client --metrics-port``, *serves* their sum
(:class:`SiteMetricsServer`). One server per site process, whatever runs below it: no ClientApp
ever binds a port, so Flower simulation (several ClientApps in one Ray worker) cannot start a server
twice or clash on a port; there nothing is served and :func:`site_monitor` records nothing.
Each ClientApp process leaves three small files (a scrape reads one page of each) until the site
process exits: a 500-round study leaves about 3,000.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from common.errors import DataError

logger = logging.getLogger(__name__)

#: prometheus-client's switch to multiprocess mode; set for the site's processes by :class:`SiteMetricsServer`.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Name of a serving process's directory, followed by its pid (so that a later start can sweep it).
DIR_PREFIX = "fedsense-site-metrics-"
#: One step of a small CPU model on a 64² demo slice up to a full-size cascade step on a slow site.
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _Metrics:
    """The site's metric families (unregistered: in multiprocess mode the values live in the files)."""

    def __init__(self) -> None:
        self.step_seconds = Histogram(
            "fedsense_site_train_step_seconds",
            "Wall time of one local training step (batch read included)",
            buckets=STEP_BUCKETS,
            registry=None,
        )
        self.steps = Counter("fedsense_site_train_steps", "Local training steps taken", registry=None)
        self.read_errors = Counter(
            "fedsense_site_data_read_errors",
            "Data reads that failed: 'skipped' (bad file left out, skip-bad-files) or 'fatal' (the task failed on it)",
            ["outcome"],
            registry=None,
        )
        self.last_round = Gauge(
            "fedsense_site_last_round_trained",
            "Server round of the last finished training task",
            multiprocess_mode="mostrecent",
            registry=None,
        )
        self.last_trained = Gauge(
            "fedsense_site_last_trained_timestamp_seconds",
            "When the last training task finished (Unix time)",
            multiprocess_mode="mostrecent",
            registry=None,
        )


class SiteMonitor:
    """What one ClientApp task records; every method does nothing when no site process serves metrics."""

    def __init__(self, metrics: _Metrics | None) -> None:
        self._metrics = metrics
        self._skipped = 0
        self._last_step = time.perf_counter()

    def watch(self, datasets: Mapping[str, Any]) -> None:
        """Remember how many bad files ``datasets`` (a site's :class:`SiteDataset` s) left out so far."""
        self._skipped = _skipped(datasets)

    def step_timer(self) -> Callable[[], None] | None:
        """A callback for :func:`common.training.train`'s ``on_step``; ``None`` when not recording."""
        if self._metrics is None:
            return None
        self._last_step = time.perf_counter()
        return self._step

    def _step(self) -> None:
        now = time.perf_counter()
        assert self._metrics is not None
        self._metrics.step_seconds.observe(now - self._last_step)
        self._metrics.steps.inc()
        self._last_step = now

    def trained(self, server_round: int, steps: int | None = None) -> None:
        """A training task finished; ``steps`` counts the steps when they were not timed one by one (DP-SGD)."""
        if self._metrics is None:
            return
        if steps:
            self._metrics.steps.inc(steps)
        self._metrics.last_round.set(server_round)
        self._metrics.last_trained.set(time.time())

    def finished(self, datasets: Mapping[str, Any]) -> None:
        """A task ended: count the bad files its reads left out (``skip-bad-files``)."""
        if self._metrics is None:
            return
        skipped = _skipped(datasets)
        if skipped > self._skipped:
            self._metrics.read_errors.labels("skipped").inc(skipped - self._skipped)
        self._skipped = skipped

    def failed_read(self) -> None:
        """A data read error ended the task."""
        if self._metrics is not None:
            self._metrics.read_errors.labels("fatal").inc()


def _skipped(datasets: Mapping[str, Any]) -> int:
    return sum(len(dataset.skipped) for dataset in datasets.values())


_METRICS: _Metrics | None = None


def site_monitor() -> SiteMonitor:
    """A recorder for this task: live when a site process serves metrics (:data:`MULTIPROC_ENV` set)."""
    global _METRICS
    if not os.environ.get(MULTIPROC_ENV):
        return SiteMonitor(None)
    if _METRICS is None:  # once per process: metric families cannot be declared twice
        _METRICS = _Metrics()
    return SiteMonitor(_METRICS)


class SiteMetricsServer:
    """Serves the sum of every ClientApp's records on ``host:port`` from the site's long-lived process.

    :attr:`env` is what the processes below it (SuperNode, SuperExec, ClientApps) must inherit; the
    files live in a private temporary directory removed by :meth:`close`, so a restarted site starts
    its counters afresh (Prometheus reads that as a counter reset).
    """

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        _sweep_stale_directories()
        self.directory = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self.port = self._server.server_port
        logger.info("site /metrics on %s:%d", host, self.port)

    @property
    def env(self) -> dict[str, str]:
        return {MULTIPROC_ENV: self.directory}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _sweep_stale_directories() -> None:
    """Remove the directories of site processes that ended without :meth:`SiteMetricsServer.close` (SIGKILL)."""
    for path in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*-*"):
        pid = path.name[len(DIR_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # its process is gone: nothing will read or write there again
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            continue


def serve_site_metrics(port: int, host: str) -> SiteMetricsServer | None:
    """:class:`SiteMetricsServer` on ``port``, or ``None`` (logged) when the port is taken: monitoring
    never keeps a site out of the federation."""
    try:
        return SiteMetricsServer(port, host)
    except OSError as exc:
        logger.error("--metrics-port %d: cannot serve on %s (%s); this site runs without /metrics", port, host, exc)
        return None


def counting_read_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a ClientApp handler so that a :class:`~common.errors.DataError` ending it is counted (then re-raised)."""

    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except DataError:
            site_monitor().failed_read()
            raise

    return wrapper
