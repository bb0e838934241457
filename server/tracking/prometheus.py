"""Prometheus ``/metrics`` of the ServerApp: the live state of a federation, for IT monitoring and alerts.

Fed from the same two places as every tracker: the run directory's writes (:class:`ServerMetrics`
is an observer of :class:`server.tracking.tracked.TrackedRunDir`) and the grid the round loop sends
through (:class:`MonitoredGrid` sees each phase start, the connected sites and the bytes moved).
Served with ``prometheus-client`` on run-config ``metrics-port`` (0: off), on every interface
(``FEDSENSE_METRICS_ADDR`` to change); the values hold no data, only counts, times and global metrics.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

from flwr.app import Message
from flwr.serverapp import Grid
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, start_http_server

from common.protocol import FINETUNE_ACTION, SERVER_ROUND
from common.runconfig import RunConfig
from server.store import GLOBAL_SITE
from server.tracking.base import Observer
from server.transport import PackedGrid

logger = logging.getLogger(__name__)

PHASE_STATES = ("starting", "train", "evaluate", "finetune", "finished", "failed")
#: Round and phase durations of a CPU demo (seconds) up to a long GPU round on real data.
BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
#: Global metrics whose last value is a gauge, by metric name.
GLOBAL_GAUGES = {"psnr": "fedsense_global_psnr_db", "ssim": "fedsense_global_ssim", "nmse": "fedsense_global_nmse"}


class ServerMetrics(Observer):
    """The federation's gauges, counters and histograms, in a registry of their own."""

    name = "prometheus"

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.round = Gauge("fedsense_round", "The round the federation is in (0: the initial evaluation)", registry=r)
        self.rounds_finished = Counter("fedsense_rounds_finished", "Rounds aggregated and checkpointed", registry=r)
        self.phase = Enum("fedsense_phase", "What the federation is doing", states=list(PHASE_STATES), registry=r)
        self.connected = Gauge("fedsense_sites_connected", "SuperNodes connected at the last look", registry=r)
        self.replied = Gauge(
            "fedsense_sites_replied", "Sites whose reply was used in the last phase", ["phase"], registry=r
        )
        self.failed = Gauge(
            "fedsense_sites_failed", "Sites rejected or silent in the last phase", ["phase"], registry=r
        )
        self.round_seconds = Histogram(
            "fedsense_round_duration_seconds", "Wall time of a round", buckets=BUCKETS, registry=r
        )
        self.phase_seconds = Histogram(
            "fedsense_phase_duration_seconds", "Wall time of a phase", ["phase"], buckets=BUCKETS, registry=r
        )
        self.bytes = Counter(
            "fedsense_message_bytes", "Array bytes sent to and received from sites", ["direction"], registry=r
        )
        self.round_bytes = Gauge(
            "fedsense_round_bytes", "Array bytes of the last finished round", ["direction"], registry=r
        )
        self.globals = {
            name: Gauge(metric, f"Global validation {name} of the last evaluated round", registry=r)
            for name, metric in GLOBAL_GAUGES.items()
        }
        self.epsilon = Gauge(
            "fedsense_dp_epsilon", "Largest DP epsilon spent so far (site DP-SGD or client-level)", registry=r
        )
        self.last_round_finished = Gauge(
            "fedsense_last_round_finished_timestamp_seconds",
            "When the last round was checkpointed, or the run started (Unix time)",
            registry=r,
        )
        self._round_started = time.time()
        self._this_round = {"sent": 0, "received": 0}
        self._server: Any = None
        self._epsilon = 0.0

    # grid events (MonitoredGrid) -----------------------------------------------------------------

    def pushed(self, messages: Sequence[Message]) -> None:
        """A phase starts: its kind and round from the messages, and the bytes they carry."""
        for msg in messages:
            kind = msg.metadata.message_type
            self.phase.state(
                "finetune" if kind.endswith(FINETUNE_ACTION) else kind if kind in PHASE_STATES else "train"
            )
            for config in msg.content.config_records.values():
                if SERVER_ROUND in config:
                    self.round.set(int(cast(int, config[SERVER_ROUND])))
            break
        self._count("sent", messages)

    def pulled(self, replies: Sequence[Message]) -> None:
        self._count("received", replies)

    def _count(self, direction: str, messages: Sequence[Message]) -> None:
        size = sum(
            len(array.data)
            for msg in messages
            if not msg.has_error()
            for record in msg.content.array_records.values()
            for array in record.values()
        )
        self.bytes.labels(direction).inc(size)
        self._this_round[direction] += size

    # run-directory events (TrackedRunDir) --------------------------------------------------------

    def start(self, config: Mapping[str, Any], resume: bool) -> None:
        self.phase.state("starting")
        self._round_started = time.time()
        self.last_round_finished.set(self._round_started)  # "no round for N minutes" counts from the start

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> None:
        epsilons = [
            v
            for r in records
            for k, v in r["metrics"].items()
            if k.startswith("dp-") and "epsilon" in k and v is not None
        ]
        if epsilons:
            self._epsilon = max(self._epsilon, *epsilons)
            self.epsilon.set(self._epsilon)
        for record in records:
            if record["site"] != GLOBAL_SITE:
                continue
            phase = record["phase"]
            self.replied.labels(phase).set(len(record.get("sites", [])))
            self.failed.labels(phase).set(len(record.get("rejected", [])))
            if isinstance(record.get("seconds"), (int, float)) and "carried_by" not in record:
                self.phase_seconds.labels(phase).observe(float(record["seconds"]))
            if phase == "evaluate":
                for name, gauge in self.globals.items():
                    if record["metrics"].get(name) is not None:
                        gauge.set(record["metrics"][name])

    def checkpoint(self, rnd: int) -> None:
        now = time.time()
        self.rounds_finished.inc()
        self.round_seconds.observe(now - self._round_started)
        self.last_round_finished.set(now)
        for direction, size in self._this_round.items():
            self.round_bytes.labels(direction).set(size)
        self._round_started, self._this_round = now, {"sent": 0, "received": 0}

    def finish(self, status: str, detail: Mapping[str, Any]) -> None:
        self.phase.state(status)

    # the HTTP endpoint -----------------------------------------------------------------------------

    def serve(self, port: int, addr: str | None = None) -> None:
        """Serve ``/metrics`` on ``port`` in a thread of its own until :meth:`close`."""
        addr = addr or os.environ.get("FEDSENSE_METRICS_ADDR", "0.0.0.0")
        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        logger.info("prometheus: /metrics on %s:%d", addr, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class MonitoredGrid(PackedGrid):
    """The ServerApp's packed grid, telling :class:`ServerMetrics` what it sends, receives and sees connected."""

    def __init__(self, grid: Grid, metrics: ServerMetrics, fp16: bool = False) -> None:
        super().__init__(grid, fp16)
        self.metrics = metrics

    def get_node_ids(self) -> Iterable[int]:
        nodes = list(super().get_node_ids())
        self.metrics.connected.set(len(nodes))
        return nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = super().push_messages(messages)  # packs in place: what is counted is what travels
        self.metrics.pushed(messages)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        self.metrics.pulled(replies)
        return replies


def server_metrics(run: RunConfig) -> ServerMetrics | None:
    """The ServerApp's metrics, serving on ``metrics-port``; ``None`` when it is 0 or the port is taken."""
    if run.metrics_port == 0:
        return None
    metrics = ServerMetrics()
    try:
        metrics.serve(run.metrics_port)
    except OSError as exc:  # monitoring must not stop a federation
        logger.error("prometheus: cannot serve on port %d, /metrics is off for this run: %s", run.metrics_port, exc)
        return None
    return metrics
