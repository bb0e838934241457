"""What a tracker is told, and the worker thread that keeps a slow or dead tracker off the round loop.

Every tracker (MLflow, TensorBoard, the Prometheus exporter) is an :class:`Observer` of the run
directory's writes: the same records, best rounds and statuses that go to ``metrics.jsonl``,
``best.json`` and ``config.json`` (:class:`server.tracking.tracked.TrackedRunDir` feeds them).
A remote tracker runs behind :class:`Background`: its calls happen in a thread of their own, are
retried with backoff a bounded number of times, and a failure is logged and dropped, so the
federation never waits on, or fails because of, the tracker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

#: Attempts per call while the tracker answers, and the backoff before each retry (seconds).
ATTEMPTS = 3
BACKOFF = (1.0, 2.0)
#: How long the end of a run waits for the tracker's queue to drain.
DRAIN_SECONDS = 120.0


class Observer:
    """Hooks called after each write to the run directory; the defaults do nothing."""

    name = "observer"

    def start(self, config: Mapping[str, Any], resume: bool) -> None:
        """The run directory was (re)initialised with ``config`` (the flat run config)."""

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Validated metrics records of one phase were appended (site records, then ``__global__``)."""

    def checkpoint(self, rnd: int) -> None:
        """Round ``rnd``'s global model was checkpointed: the round is finished."""

    def best(self, best: Mapping[str, Any]) -> None:
        """``best.json`` now names ``best["round"]``."""

    def finish(self, status: str, detail: Mapping[str, Any]) -> None:
        """The run ended with ``status`` (``finished`` or ``failed``)."""

    def close(self) -> None:
        """Release files and connections; called once, after :meth:`finish`."""


class Background(Observer):
    """Runs ``tracker``'s hooks in order in a worker thread; errors are logged, retried, then dropped.

    While the tracker answers, each call gets :data:`ATTEMPTS` tries; once a call has failed them all
    the tracker counts as down and later calls get one try each until one succeeds, so a dead tracking
    server costs a run one timeout per call, in this thread, never in the round loop.
    """

    def __init__(self, tracker: Observer) -> None:
        self.tracker = tracker
        self.name = tracker.name
        self.failed = 0  # calls dropped after their last attempt
        self._down = False
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"fedsense-{tracker.name}", daemon=True)
        self._thread.start()

    def start(self, config: Mapping[str, Any], resume: bool) -> None:
        self._queue.put(("start", (dict(config), resume)))

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> None:
        self._queue.put(("metrics", ([dict(r) for r in records],)))

    def checkpoint(self, rnd: int) -> None:
        self._queue.put(("checkpoint", (rnd,)))

    def best(self, best: Mapping[str, Any]) -> None:
        self._queue.put(("best", (dict(best),)))

    def finish(self, status: str, detail: Mapping[str, Any]) -> None:
        self._queue.put(("finish", (status, dict(detail))))

    def close(self, timeout: float = DRAIN_SECONDS) -> None:
        """Wait (at most ``timeout`` s) for the queued calls, then close the tracker in the worker."""
        self._queue.put(("close", ()))
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(
                "%s: still busy after %.0f s; %d queued update(s) are dropped", self.name, timeout, self._queue.qsize()
            )

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            self._call(*item)

    def _call(self, hook: str, args: tuple[Any, ...]) -> None:
        attempts = 1 if self._down else ATTEMPTS
        for attempt in range(attempts):
            try:
                getattr(self.tracker, hook)(*args)
            except Exception as exc:  # any tracker error: the federation goes on without it
                logger.warning("%s: %s failed (attempt %d of %d): %s", self.name, hook, attempt + 1, attempts, exc)
                if attempt + 1 < attempts:
                    time.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
                continue
            self._down = False
            return
        self._down = True
        self.failed += 1
        logger.error("%s: gave up on %s; the run continues without it", self.name, hook)
