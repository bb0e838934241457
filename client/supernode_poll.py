"""A site's SuperNode that pulls again soon after an idle pull: Flower's ``flower-supernode``, shorter waits.

Flower 1.41's SuperNode loop (``flwr.supernode.start_client_internal``) pulls the SuperLink for a
message and, when there is none, sleeps a fixed 3 s before the next pull; after handing a message
to its ClientApp it waits for the reply, and for each of the reply's objects, in fixed 0.5 s steps.
A message that reaches the SuperLink just after a pull so waits up to 3 s before the site sees it,
and each reply up to 0.5 s more before it leaves: seconds of every train and evaluate phase.

``python -m client.supernode_poll [--poll-interval S] FLOWER-SUPERNODE-ARGS...`` runs Flower's own
``flower-supernode`` main in this process (same flags, same code) after two changes to that
module's globals (no installed file is edited):

* its pull step keeps pulling until a message arrives, waiting ``FIRST_POLL`` s, doubling up to
  the poll interval (``--poll-interval`` or ``FEDSENSE_POLL_INTERVAL``, default 1 s), and starts
  short again after every message;
* its fixed 0.5 s steps waiting for the local ClientApp's reply become ``REPLY_STEP`` s.

Both are checked against the installed Flower first (version and the code they replace); where it
does not match, the SuperNode runs unchanged and a warning says so. ``--poll-interval flower``
keeps Flower's own waits on purpose (the before/after benchmark uses it).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import inspect
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

from common.errors import ConfigError, FedSenseError

logger = logging.getLogger(__name__)

FLOWER_MODULE = "flwr.supernode.start_client_internal"
#: The Flower release line whose SuperNode loop this patch was written against and tested with.
TESTED_FLOWER = "1.41."
#: What the patch replaces, as it reads in that loop and in its reply push.
FLOWER_IDLE_WAIT = "time.sleep(3)"
FLOWER_REPLY_STEP_SECONDS = 0.5
FLOWER_REPLY_STEP = "time.sleep(0.5)"

FIRST_POLL = 0.1  # s: the first wait after an empty pull
DEFAULT_POLL_INTERVAL = 1.0  # s: the longest wait between two pulls of an idle site
REPLY_STEP = 0.05  # s: how often the SuperNode looks for its local ClientApp's reply
#: The warm SuperExec's poll of the SuperNode's loopback Runtime API for new tasks (Flower's default: 1 s).
SUPEREXEC_TASK_POLL = 0.2
POLL_INTERVAL_ENV = "FEDSENSE_POLL_INTERVAL"
FLOWER_WAITS = "flower"  # the --poll-interval value that keeps Flower's own waits
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own setting (run_superexec.py)
_MIN_INTERVAL, _MAX_INTERVAL = 0.01, 60.0
_PATCHED = "__fedsense_poll__"
#: Where Flower's ``pull_objects`` is looked up: by the ClientApp's pull of its message (through
#: ``pull_and_inflate_object_from_tree``) and by the SuperNode's pull from the SuperLink.
OBJECT_PULL_MODULES = ("flwr.supercore.inflatable.inflatable_utils", FLOWER_MODULE)
OBJECT_PULL_FIRST = 0.05  # s: the first retry of an object that is not there yet (Flower: 1 s)
OBJECT_PULL_LONGEST = 1.0  # s: the longest (Flower: 10 s)
_BACKOFF_PARAMETERS = ("initial_backoff", "backoff_cap", "max_tries_per_object")


def parse_poll_interval(value: str | float | None, source: str) -> float | None:
    """The longest idle wait in seconds, or None for Flower's own waits; ConfigError naming ``source``.

    ``value`` None or empty means the default.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return DEFAULT_POLL_INTERVAL
    if isinstance(value, str) and value.strip().lower() == FLOWER_WAITS:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or not _MIN_INTERVAL <= seconds <= _MAX_INTERVAL:
        raise ConfigError(
            f"{source}: expected seconds between {_MIN_INTERVAL} and {_MAX_INTERVAL:.0f}, "
            f"or '{FLOWER_WAITS}' for Flower's fixed 3 s; got {value!r}"
        )
    return seconds


def backoff(first: float, longest: float) -> Iterator[float]:
    """Waits ``first``, ``2 first``, ``4 first``, ... each at most ``longest``."""
    wait = min(first, longest)
    while True:
        yield wait
        wait = min(2 * wait, longest)


def flower_version() -> str:
    """The installed ``flwr`` version."""
    return importlib.metadata.version("flwr")


def why_not_patchable(module: ModuleType | Any) -> str | None:
    """None when ``module`` is the SuperNode loop this patch was written against, else the reason it is not."""
    version = flower_version()
    if not version.startswith(TESTED_FLOWER):
        return f"flwr {version} is installed, the patch is for {TESTED_FLOWER}x"
    for name in ("start_client_internal", "_pull_and_store_message", "_push_messages"):
        if not callable(getattr(module, name, None)):
            return f"{FLOWER_MODULE}.{name} does not exist"
    if getattr(module, "time", None) is not time:
        return f"{FLOWER_MODULE} does not wait through the time module"
    try:
        loop, push = inspect.getsource(module.start_client_internal), inspect.getsource(module._push_messages)
    except (OSError, TypeError):
        return f"the source of {FLOWER_MODULE} is not readable"
    if "_pull_and_store_message(" not in loop or FLOWER_IDLE_WAIT not in loop:
        return f"{FLOWER_MODULE}.start_client_internal no longer pulls and then waits with {FLOWER_IDLE_WAIT}"
    if FLOWER_REPLY_STEP not in push:
        return f"{FLOWER_MODULE}._push_messages no longer waits for replies with {FLOWER_REPLY_STEP}"
    return None


class ReplySteps:
    """Stands in for ``time`` inside Flower's SuperNode module: its 0.5 s reply steps become ``step`` s.

    Every other attribute, and a sleep of any other length, is the time module's.
    """

    def __init__(self, step: float) -> None:
        self.step = step

    def sleep(self, seconds: float) -> None:
        time.sleep(self.step if seconds == FLOWER_REPLY_STEP_SECONDS else seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def pull_until_message(flower_pull: Callable[..., int | None], first: float, longest: float) -> Callable[..., int]:
    """``flower_pull`` (Flower's ``_pull_and_store_message``) retried with back-off until it returns a run id.

    Each call is one message, so the waits start at ``first`` again for the next one; Flower's loop
    then never reaches its own idle sleep.
    """

    @functools.wraps(flower_pull)
    def pull(*args: Any, **kwargs: Any) -> int:
        waits = backoff(first, longest)
        while (run_id := flower_pull(*args, **kwargs)) is None:
            time.sleep(next(waits))
        return run_id

    return pull


def object_pulls_with_backoff(
    flower_pull_objects: Callable[..., Any], first: float, longest: float
) -> Callable[..., Any]:
    """``flower_pull_objects`` (Flower's ``pull_objects``) retrying a missing object after ``first`` s, doubling
    up to ``longest``.

    Flower's SuperNode creates a message's task before it has pulled the message's objects from the
    SuperLink, so the ClientApp's first pull of them usually finds some missing and, at Flower's
    back-off, waits 1 s, then 2 s more: seconds per message. Flower also gives up after 500 tries
    (about 80 minutes at its own waits); at short waits that count would run out in minutes, so only
    Flower's time bound (``max_time``, 2 h) is kept.
    """

    @functools.wraps(flower_pull_objects)
    def pull(*args: Any, **kwargs: Any) -> Any:
        kwargs["initial_backoff"] = min(kwargs.get("initial_backoff", first), first)
        kwargs["backoff_cap"] = min(kwargs.get("backoff_cap", longest), longest)
        kwargs["max_tries_per_object"] = None
        return flower_pull_objects(*args, **kwargs)

    setattr(pull, _PATCHED, True)
    return pull


def install_object_pulls(
    first: float = OBJECT_PULL_FIRST,
    longest: float = OBJECT_PULL_LONGEST,
    modules: Sequence[ModuleType | Any] | None = None,
) -> bool:
    """Shorten Flower's object-pull back-off in this process; False (and a warning) if Flower's code does not fit."""
    version = flower_version()
    if not version.startswith(TESTED_FLOWER):
        logger.warning(
            "object pulls left as Flower has them (1 s, doubling): flwr %s is installed, the change is for %sx",
            version,
            TESTED_FLOWER,
        )
        return False
    targets: list[Any] = (
        list(modules) if modules is not None else [importlib.import_module(m) for m in OBJECT_PULL_MODULES]
    )
    for module in targets:
        current = getattr(module, "pull_objects", None)
        if getattr(current, _PATCHED, False):
            continue
        if not callable(current) or not set(_BACKOFF_PARAMETERS) <= set(inspect.signature(current).parameters):
            logger.warning(
                "object pulls left as Flower has them (1 s, doubling): %s.pull_objects does not take %s",
                getattr(module, "__name__", module),
                ", ".join(_BACKOFF_PARAMETERS),
            )
            return False
        module.pull_objects = object_pulls_with_backoff(current, first, longest)
    return True


def install(longest: float, *, first: float = FIRST_POLL, reply_step: float = REPLY_STEP, module: Any = None) -> bool:
    """Shorten the waits of Flower's SuperNode loop in this process; False (and a warning) if it does not fit."""
    module = module if module is not None else importlib.import_module(FLOWER_MODULE)
    if getattr(module, _PATCHED, False):
        return True
    reason = why_not_patchable(module)
    if reason is not None:
        logger.warning("SuperNode poll left as Flower has it (3 s when idle, 0.5 s reply steps): %s", reason)
        return False
    module._pull_and_store_message = pull_until_message(module._pull_and_store_message, first, longest)
    module.time = ReplySteps(reply_step)
    setattr(module, _PATCHED, True)
    logger.info(
        "SuperNode poll: %.2g s after an empty pull, doubling up to %.2g s; reply steps %.2g s",
        min(first, longest),
        longest,
        reply_step,
    )
    install_object_pulls(modules=[module])
    return True


def resolve_poll_interval(flag: str | None, environ: Mapping[str, str]) -> float | None:
    """The longest idle wait from ``--poll-interval`` or else ``FEDSENSE_POLL_INTERVAL`` (None: Flower's waits)."""
    if flag is not None:
        return parse_poll_interval(flag, "--poll-interval")
    return parse_poll_interval(environ.get(POLL_INTERVAL_ENV), POLL_INTERVAL_ENV)


def superexec_env(poll_interval: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for the site's warm SuperExec: a short task poll, unless set already or Flower's waits are asked for."""
    longest = resolve_poll_interval(poll_interval, environ)
    env = dict(environ)
    if longest is None:
        env[POLL_INTERVAL_ENV] = FLOWER_WAITS  # its forked ClientApps keep Flower's object-pull waits too
    elif not env.get(SUPEREXEC_POLL_ENV, "").strip():
        env[SUPEREXEC_POLL_ENV] = str(min(SUPEREXEC_TASK_POLL, longest))
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m client.supernode_poll [--poll-interval S|flower] FLOWER-SUPERNODE-ARGS...``"""
    # This module's lines only: Flower's own logger prints the SuperNode's (a root handler would repeat them).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--poll-interval")
    ours, flower_args = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    try:
        longest = resolve_poll_interval(ours.poll_interval, os.environ)
    except FedSenseError as exc:
        logger.error("%s", exc)
        return 2
    if longest is None:
        logger.info("SuperNode poll: Flower's own waits (--poll-interval %s)", FLOWER_WAITS)
    else:
        install(longest)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
