"""Stop every process a command started, however it detached, when the command ends or is interrupted.

Process groups are not enough: Flower's SuperLink starts the simulation in a session of its own, and
Ray's raylet, GCS, agents and actors form further groups under it. When ``fedsense simulate`` was
interrupted, its SuperLink's group was killed but the simulation and the Ray processes lived on (the
ClientApp actors kept training, re-parented to init). :class:`ProcessTree` makes the command a child
subreaper (Linux ``PR_SET_CHILD_SUBREAPER``), so every orphaned descendant re-parents to it instead of to
init and stays findable by walking ``/proc``; on exit it sends SIGTERM to all descendants, waits a grace
period, sends SIGKILL to the survivors, and reaps the orphans among them. SIGINT and SIGTERM to the
command itself raise ``KeyboardInterrupt``, so Ctrl-C and ``kill`` take the same clean path; SIGINT is
installed explicitly because a command started from a background shell job inherits it as *ignored*,
and Ctrl-C would then do nothing at all.

Only orphans are reaped, never a child the command started itself: collecting a ``subprocess.Popen``
child's exit status here would make that ``Popen.wait()`` report 0 instead of the real exit code.
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


def _reap(orphans: set[int]) -> None:
    """Collect the exit status of those of ``orphans`` that have re-parented to us and exited.

    Never a child this process started itself (its starter's ``wait()`` needs the status): callers
    pass only pids first seen with another parent, see :class:`_Sightings`.
    """
    for pid in orphans:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


class _Sightings:
    """The descendants seen while stopping, and which of them are orphans (first seen under another parent).

    A process first seen as our direct child is taken to be one we started (a ``Popen`` whose owner
    waits for it); one first seen under another descendant can only become our child by re-parenting
    when that parent dies, and nobody else will ever reap it.
    """

    def __init__(self, keep: frozenset[int]) -> None:
        self.keep, self.seen, self.orphans = keep, set[int](), set[int]()

    def alive(self) -> list[int]:
        """Live descendants not in ``keep``, recorded; parents before children."""
        me, parents = os.getpid(), _parents()
        found = [p for p in descendants() if p not in self.keep]
        for pid in found:
            if pid not in self.seen and parents.get(pid) != me:
                self.orphans.add(pid)
        self.seen.update(found)
        return found


def stop_descendants(grace: float = 5.0, keep: frozenset[int] = frozenset()) -> list[int]:
    """SIGTERM every descendant except ``keep``, SIGKILL what is left after ``grace`` seconds; returns the pids."""
    sightings = _Sightings(keep)
    first = sightings.alive()
    if not first:
        return []
    _signal_all(first, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(sightings.orphans)
        alive = sightings.alive()
        if not alive:
            _reap(sightings.orphans)  # those that exited since the reap above
            return sorted(sightings.seen)
        _signal_all(alive, signal.SIGTERM)  # processes started while the first ones were stopping
        time.sleep(0.1)
    # Until nothing is left: a dying Ray worker may still fork, and each round must reach the new ones.
    for _ in range(50):
        alive = sightings.alive()
        if not alive:
            break
        logger.warning("killing %d process(es) that did not stop within %.0f s: %s", len(alive), grace, alive)
        _signal_all(alive, signal.SIGKILL)
        time.sleep(0.1)
        _reap(sightings.orphans)
    _reap(sightings.orphans)
    return sorted(sightings.seen)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


class ProcessTree:
    """Within the block: orphaned descendants stay ours and SIGINT / SIGTERM raise KeyboardInterrupt; on exit
    none survive.

    ``keep``: pids that must not be stopped (e.g. a caller's own long-lived helpers started before).
    Outside Linux only the signal handling applies.
    """

    def __init__(self, grace: float = 5.0) -> None:
        self.grace = grace
        self._keep: frozenset[int] = frozenset()
        self._previous_reaper = 0
        self._previous_handlers: dict[int, object] = {}

    def __enter__(self) -> ProcessTree:
        if _LIBC is not None:
            self._keep = frozenset(descendants())  # what the caller ran before is not ours to stop
            value = ctypes.c_int(0)
            _LIBC.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(value))
            self._previous_reaper = value.value
            _LIBC.prctl(_PR_SET_CHILD_SUBREAPER, 1)
        if threading.current_thread() is threading.main_thread():
            # SIGINT too, whatever was inherited: a background job starts with it ignored (SIG_IGN).
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[sig] = signal.signal(sig, _raise_interrupt)
        return self

    def stop(self) -> list[int]:
        """Stop every process started within the block now (e.g. on interrupt, before recording the run's
        state, so that no writer is left); returns their pids. A second Ctrl-C or a SIGTERM meanwhile (a
        supervisor's, ``docker stop``'s) is ignored: it must not abandon the processes half-stopped, nor
        skip recording the run's state after them."""
        if _LIBC is None:
            return []
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            stopped = stop_descendants(self.grace, keep=self._keep)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if stopped:
            logger.debug("stopped %d process(es) left by the command: %s", len(stopped), stopped)
        return stopped

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.stop()
        finally:
            if _LIBC is not None:
                _LIBC.prctl(_PR_SET_CHILD_SUBREAPER, self._previous_reaper)
            for sig, handler in self._previous_handlers.items():
                if handler is not None:  # None: installed outside Python, nothing to put back
                    signal.signal(sig, handler)  # type: ignore[arg-type]
            self._previous_handlers.clear()
