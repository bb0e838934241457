"""Site rehearsal: make a site artificially slow, so straggler handling can be tested and benchmarked.

A site TOML's ``[rehearsal] slowdown = 4`` makes each training step take four times as long: after
each step the site sleeps ``slowdown - 1`` times the step's own duration. Only the schedule of the
site changes (its weights and metrics are those of the same steps at full speed), so a run with one
slowed site measures what a slower machine costs the federation, and nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def slowed(
    on_step: Callable[[], None] | None,
    slowdown: float,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> Callable[[], None] | None:
    """An ``on_step`` callback for :func:`common.training.train` that stretches each step ``slowdown`` times.

    ``on_step`` (the site monitor's step timer, or None) still runs after each step, after the sleep, so
    the site's step-time metric shows the slowed steps. With ``slowdown`` 1 it is returned unchanged.
    """
    if slowdown == 1.0:
        return on_step
    last = clock()

    def step() -> None:
        nonlocal last
        sleep((slowdown - 1.0) * (clock() - last))
        if on_step is not None:
            on_step()
        last = clock()

    return step
