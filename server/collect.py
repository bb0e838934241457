"""Collecting a phase's replies as they arrive, with a short backing-off poll.

Flower's deployed grid (``HttpGrid.send_and_receive``) sleeps a fixed 3 s between pulls, so every
train or evaluate phase costs up to 3 s of pure waiting after the last site has replied. FedSense
pushes the messages itself and pulls with an interval that starts short, doubles while nothing
arrives and drops back to short after each reply, bounded by ``round-timeout``.

With a ``round-deadline`` a phase stops waiting for the slowest sites: once the deadline has passed
and ``enough`` replies are in, the phase ends and the silent sites are its stragglers. Their late
replies are not left in the SuperLink: the next phase pulls them too (``also_pull``), so that they are
recorded and rejected as late (:mod:`server.receipts`) instead of being lost or mixed into a round.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from flwr.app import Message
from flwr.serverapp import Grid

logger = logging.getLogger(__name__)

FIRST_INTERVAL = 0.05
MAX_INTERVAL = 0.25  # s: a phase ends at most this long after its last reply reached the SuperLink
#: The deployed ServerApp's grid, which pulls each reply's objects (its arrays) with Flower's ``pull_objects``.
REPLY_OBJECTS_MODULE = "flwr.superlink.grid.http_grid"
REPLY_OBJECT_LONGEST = 1.0  # s: the longest wait for a reply object that is not there yet (Flower: 10 s)


class Arrival(NamedTuple):
    """A reply and when it was pulled, in seconds after the phase's messages were pushed."""

    message: Message
    seconds: float


def send_and_collect(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    *,
    first_interval: float = FIRST_INTERVAL,
    max_interval: float = MAX_INTERVAL,
    round_deadline: float = 0.0,
    enough: int = 0,
    also_pull: Iterable[str] = (),
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Arrival]:
    """Push ``messages``, then pull until every one is answered or ``timeout`` seconds have passed.

    With ``round_deadline`` > 0, pulling also stops once that many seconds have passed and at least
    ``enough`` of ``messages`` are answered without an error (before the deadline only all of them end
    the phase).
    ``also_pull`` names earlier phases' unanswered messages: replies to them that arrive while this
    phase polls are returned too (the caller rejects them as late), but the phase never waits for them.

    The grid stamps each message with its id while pushing it (callers rely on that to name the
    nodes that stayed silent). Returns the replies in arrival order, each with its arrival time.
    """
    pushed = clock()
    pending = set(grid.push_messages(messages))
    late = set(also_pull) - pending
    stop = pushed + timeout
    cutoff = pushed + round_deadline if round_deadline > 0 else stop
    interval = first_interval
    replies: list[Arrival] = []
    answered = 0
    while pending:
        arrived = list(grid.pull_messages(sorted(pending | late)))
        now = clock()
        for reply in arrived:
            answers = reply.metadata.reply_to_message_id
            if answers in pending:
                pending.discard(answers)
                answered += not reply.has_error()  # an error reply is no update: it does not make the round
            late.discard(answers)
        replies.extend(Arrival(reply, now - pushed) for reply in arrived)
        if not pending or now >= stop:
            break
        if now >= cutoff and answered >= enough:
            logger.info(
                "round-deadline (%g s) passed with %d replies: %d straggler(s) not waited for",
                round_deadline,
                answered,
                len(pending),
            )
            break
        # Replies tend to come in bursts (sites of similar speed): poll fast again after one.
        interval = first_interval if arrived else min(2 * interval, max_interval)
        wake = cutoff if now < cutoff else stop
        sleep(max(min(interval, wake - now, stop - now), 1e-3))
    return replies


def quick_reply_object_pulls() -> bool:
    """Retry a reply's missing objects after ``FIRST_INTERVAL`` s, doubling up to ``REPLY_OBJECT_LONGEST``.

    A site sends its reply's message before its objects, so a pull that sees the reply early finds
    the weights still uploading; Flower's grid then waits 1 s, then 2 s more. Flower's 500-try limit
    is lifted (at short waits it would run out in minutes); its 2 h time limit stays. False, with a
    warning, when the installed Flower's grid does not pull that way.
    """
    module: Any = importlib.import_module(REPLY_OBJECTS_MODULE)  # patched below
    current = getattr(module, "pull_objects", None)
    if isinstance(current, functools.partial):
        return True
    wanted = {"initial_backoff", "backoff_cap", "max_tries_per_object"}
    if not callable(current) or not wanted <= set(inspect.signature(current).parameters):
        logger.warning(
            "reply objects are pulled with Flower's own back-off: %s.pull_objects does not take %s",
            REPLY_OBJECTS_MODULE,
            ", ".join(sorted(wanted)),
        )
        return False
    module.pull_objects = functools.partial(
        current, initial_backoff=FIRST_INTERVAL, backoff_cap=REPLY_OBJECT_LONGEST, max_tries_per_object=None
    )
    return True
