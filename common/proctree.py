"""Stop every process a command started, however it detached, when the command ends or is interrupted.

Process groups are not enough: Flower's SuperLink starts the simulation in a session of its own, and
Ray's raylet, GCS, agents and actors form further groups under it. When ``fedsense simulate`` was
interrupted, its SuperLink's group was killed but the simulation and the Ray processes lived on (the
ClientApp actors kept training, re-parented to init). :class:`ProcessTree` makes the command a child
subreaper (Linux ``PR_SET_CHILD_SUBREAPER``), so every orphaned descendant re-parents to it instead of to
init and stays findable by walking ``/proc``; on exit it sends SIGTERM to all descendants, waits a grace
period, sends SIGKILL to the survivors, and reaps them. SIGTERM to the command itself raises
``KeyboardInterrupt``, so Ctrl-C and ``kill`` take the same clean path.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType

logger = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _parents() -> dict[int, int]:
    """pid -> ppid of every live (non-zombie) process visible in /proc."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int | None = None) -> list[int]:
    """Live descendants of ``pid`` (default: this process), parents before children."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, frontier = [], [root]
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, ())]
        found.extend(frontier)
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _reap(pids: set[int]) -> None:
    """Collect the exit status of those of ``pids`` that are our children (orphans re-parented to us)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def stop_descendants(grace: float = 5.0, keep: frozenset[int] = frozenset()) -> list[int]:
    """SIGTERM every descendant except ``keep``, SIGKILL what is left after ``grace`` seconds; returns the pids."""
    first = [p for p in descendants() if p not in keep]
    if not first:
        return []
    _signal_all(first, signal.SIGTERM)
    seen = set(first)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(seen)
        alive = [p for p in descendants() if p not in keep]
        seen.update(alive)
        if not alive:
            return sorted(seen)
        _signal_all(alive, signal.SIGTERM)  # processes started while the first ones were stopping
        time.sleep(0.1)
    # Until nothing is left: a dying Ray worker may still fork, and each round must reach the new ones.
    for _ in range(50):
        alive = [p for p in descendants() if p not in keep]
        if not alive:
            break
        seen.update(alive)
        logger.warning("killing %d process(es) that did not stop within %.0f s: %s", len(alive), grace, alive)
        _signal_all(alive, signal.SIGKILL)
        time.sleep(0.1)
        _reap(seen)
    _reap(seen)
    return sorted(seen)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


class ProcessTree:
    """Within the block: orphaned descendants stay ours and SIGTERM raises KeyboardInterrupt; on exit none survive.

    ``keep``: pids that must not be stopped (e.g. a caller's own long-lived helpers started before).
    Outside Linux only the SIGTERM handling applies.
    """

    def __init__(self, grace: float = 5.0) -> None:
        self.grace = grace
        self._keep: frozenset[int] = frozenset()
        self._previous_reaper = 0
        self._previous_handler: object = None

    def __enter__(self) -> ProcessTree:
        if _LIBC is not None:
            self._keep = frozenset(descendants())  # what the caller ran before is not ours to stop
            value = ctypes.c_int(0)
            _LIBC.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(value))
            self._previous_reaper = value.value
            _LIBC.prctl(_PR_SET_CHILD_SUBREAPER, 1)
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        main = threading.current_thread() is threading.main_thread()
        # A second Ctrl-C while stopping must not abandon the processes half-stopped.
        previous_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            if _LIBC is not None:
                stopped = stop_descendants(self.grace, keep=self._keep)
                if stopped:
                    logger.debug("stopped %d process(es) left by the command: %s", len(stopped), stopped)
        finally:
            if _LIBC is not None:
                _LIBC.prctl(_PR_SET_CHILD_SUBREAPER, self._previous_reaper)
            if previous_sigint is not None:
                signal.signal(signal.SIGINT, previous_sigint)
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)  # type: ignore[arg-type]
