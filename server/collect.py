"""Collecting a phase's replies as they arrive, with a short backing-off poll.

Flower's deployed grid (``HttpGrid.send_and_receive``) sleeps a fixed 3 s between pulls, so every
train or evaluate phase costs up to 3 s of pure waiting after the last site has replied. FedSense
pushes the messages itself and pulls with an interval that starts short, doubles while nothing
arrives and drops back to short after each reply, bounded by ``round-timeout``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_INTERVAL = 0.05
MAX_INTERVAL = 0.25  # s: a phase ends at most this long after its last reply reached the SuperLink


def send_and_collect(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    *,
    first_interval: float = FIRST_INTERVAL,
    max_interval: float = MAX_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Message]:
    """Push ``messages``, then pull until every one is answered or ``timeout`` seconds have passed.

    The grid stamps each message with its id while pushing it (callers rely on that to name the
    nodes that stayed silent). Returns the replies in arrival order.
    """
    pending = set(grid.push_messages(messages))
    deadline = clock() + timeout
    interval = first_interval
    replies: list[Message] = []
    while pending:
        arrived = list(grid.pull_messages(sorted(pending)))
        for reply in arrived:
            pending.discard(reply.metadata.reply_to_message_id)
        replies.extend(arrived)
        remaining = deadline - clock()
        if not pending or remaining <= 0:
            break
        # Replies tend to come in bursts (sites of similar speed): poll fast again after one.
        interval = first_interval if arrived else min(2 * interval, max_interval)
        sleep(min(interval, remaining))
    return replies
