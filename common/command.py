"""How every ``fedsense`` command line runs: logging set up once, user errors as one line and exit 2."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from common.errors import FedSenseError

logger = logging.getLogger("fedsense")


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the chosen subcommand's ``func``; a ``FedSenseError`` is logged, not a traceback."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except FedSenseError as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
