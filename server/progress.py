"""Round-by-round progress of a run, read from its run directory while it runs.

A federated simulation and a baseline write the same metrics.jsonl, so the same follower reports
both: one line per finished round with the global validation metrics, as they land.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from common.errors import FedSenseError
from server.store import GLOBAL_SITE, RunDir


def round_line(record: dict, num_rounds: int) -> str:
    """``round 2/5: PSNR 24.10 dB, SSIM 0.6012, NMSE 0.0310 (site-a, site-b)`` for a global evaluate record."""
    m = record["metrics"]
    sites = record.get("sites", [])
    return (
        f"round {record['round']}/{num_rounds}: PSNR {m.get('psnr', float('nan')):.2f} dB, "
        f"SSIM {m.get('ssim', float('nan')):.4f}, NMSE {m.get('nmse', float('nan')):.4f}"
        + (f" ({', '.join(sites)})" if sites else "")
    )


def _follow(
    store: RunDir, num_rounds: int, stop: threading.Event, report: Callable[[str], None], interval: float
) -> None:
    seen: set[int] = set()
    while True:
        stopping = stop.wait(interval)
        try:
            records = store.read_metrics(dedupe=True)
        except FedSenseError:
            records = []
        for r in records:
            if r["site"] == GLOBAL_SITE and r["phase"] == "evaluate" and r["round"] not in seen:
                seen.add(r["round"])
                report(round_line(r, num_rounds))
        if stopping:
            return


@contextmanager
def reporting_rounds(
    store: RunDir, num_rounds: int, report: Callable[[str], None], interval: float = 1.0
) -> Iterator[None]:
    """Report each finished round of ``store`` while the ``with`` body runs (and any left at its end)."""
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(store, num_rounds, stop, report, interval), daemon=True)
    follower.start()
    try:
        yield
    finally:
        stop.set()
        follower.join(timeout=10)
