"""How every ``fedsense`` command line runs: one error boundary, so a user sees one line, never a traceback.

Exit codes (README "Exit codes"): 0 done; 1 ``data check``: the site cannot train; 2 bad command line,
configuration or data (:class:`FedSenseError`, a pydantic validation error); 3 an output refused (it is or
holds an input, or exists and ``--overwrite`` was not given); 4 the file system said no (missing or
unreadable file, permission, disk full); 5 a run finished without some site (it failed during the run and the
federation went on without it); 70 an internal error (a bug: ``--debug`` shows its traceback);
130 interrupted; 141 the reader of the output went away (``fedsense metrics show RUN | head``).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from typing import NoReturn, TypeVar

from rich.console import Console

from common.errors import FedSenseError, OutputError

logger = logging.getLogger("fedsense")

EXIT_USAGE = 2
EXIT_OUTPUT = 3
EXIT_OS = 4
EXIT_SITE_FAILED = 5
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class OutputConsole(Console):
    """A rich console for a command's output: a reader that went away is a broken pipe for the error boundary.

    rich's own handling exits with status 1 (``SystemExit``), so ``fedsense metrics show RUN | head`` would
    look like a failure instead of the documented 141.
    """

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the reader of the output went away")


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one line, like every other error (README "Exit codes").

    argparse prints the whole usage block above the message; here the message names the command and
    points at its ``--help``. Subcommand parsers inherit the class (``add_subparsers`` uses the parent's).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _StoreOnce(argparse._StoreAction):
    """A single-valued option given twice is a mistake (``--out a --out b``): argparse would keep the last."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        given: set[str] = namespace.__dict__.setdefault("_given_options", set())
        if self.dest in given:
            parser.error(f"{'/'.join(self.option_strings)} given twice; give it once")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` names each option's default, except the uninformative ones (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default in (argparse.SUPPRESS, []):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        return f"{text} (default: %(default)s)".strip()


def _version() -> str:
    try:
        return metadata.version("fedsense")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def prepare_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--debug`` and ``--version``, and make every (sub)command's ``--help`` show the defaults.

    ``--debug`` is accepted before or after the subcommand (an error's message says "rerun with --debug", and
    users add it at the end); a subcommand's copy has no default, so it never resets one given before.
    """
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    stack = [parser]
    while stack:
        current = stack.pop()
        current.formatter_class = DefaultsHelpFormatter
        if current is not parser and "--debug" not in current._option_string_actions:
            current.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
            )
        for action in current._actions:
            if type(action) is argparse._StoreAction and action.option_strings:
                action.__class__ = _StoreOnce
            if (
                action.help is None
                and action.option_strings
                and not (action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS))
            ):
                action.help = "(default: %(default)s)"
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    return parser


def add_delegated(
    sub: argparse._SubParsersAction[CommandParser],
    name: str,
    parser: CommandParser,
    run: Callable[[argparse.Namespace], object],
    help: str,
) -> None:
    """Subcommand ``name`` whose options are another module's ``parser`` and whose action is its ``run``.

    The module (``client.supernode``, ``server.pki``, ``server.operator``) owns its options, its ``--help``
    and its behaviour; the ``fedsense`` command only lists it.
    """
    command = sub.add_parser(name, parents=[parser], add_help=False, help=help)
    command.set_defaults(func=run)


_Number = TypeVar("_Number", int, float)


def _number(kind: type[_Number], minimum: float, inclusive: bool = True) -> Callable[[str], _Number]:
    def parse(text: str) -> _Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if value < minimum or (not inclusive and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum:g}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {'>=' if inclusive else '>'} {minimum:g}"
    return parse


positive_int = _number(int, 1)
nonnegative_int = _number(int, 0)
positive_float = _number(float, 0, inclusive=False)
nonnegative_float = _number(float, 0)


def port_number(text: str) -> int:
    """A TCP port, 1 to 65535 (0 would be a random one, which nobody could find)."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be <= 65535, got {text}")
    return value


def _os_message(exc: OSError) -> str:
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        reason += " (free space or choose another output folder)"
    return f"{where}: {reason}" if where else reason


def _os_cause(exc: BaseException) -> OSError | None:
    """The file-system error a library wrapped in another exception, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _quiet_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush stays silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


@contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, Ctrl-C (SIGINT) raises ``KeyboardInterrupt``, whatever the disposition we inherited.

    Started from a background shell job (``fedsense simulate ... &``, a CI step, a test runner), a command
    inherits SIGINT as *ignored*, and Python then leaves it ignored: Ctrl-C or ``kill -INT`` did nothing and
    the run went on to its end. The caller's handler is put back after (``main()`` called in-process).
    Only the main thread may install handlers; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is not None:  # None: installed outside Python, nothing to put back
            signal.signal(signal.SIGINT, previous)


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand's ``func`` inside the error boundary; returns the exit code."""
    args = prepare_parser(parser).parse_args(argv)
    args.__dict__.pop("_given_options", None)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    debug = bool(getattr(args, "debug", False))

    def fail(code: int, message: str) -> int:
        if debug:
            logger.exception("%s", message)
        else:
            print(f"fedsense: error: {message}", file=sys.stderr, flush=True)
        return code

    try:
        with interruptible():
            code = int(args.func(args))
        sys.stdout.flush()  # inside the boundary: a reader that went away is a broken pipe here, not at exit
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("fedsense: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except OutputError as exc:
        return fail(EXIT_OUTPUT, str(exc))
    except FedSenseError as exc:
        return fail(EXIT_USAGE, str(exc))
    except OSError as exc:
        return fail(EXIT_OS, _os_message(exc))
    except Exception as exc:  # the boundary: pydantic validation errors, and bugs, as one line
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            return fail(EXIT_USAGE, str(exc).replace("\n", "; "))
        cause = _os_cause(exc)
        if cause is not None:  # e.g. h5py writing through a Python file: a full disk surfaces as SystemError
            return fail(EXIT_OS, _os_message(cause))
        return fail(
            EXIT_INTERNAL,
            f"internal error {type(exc).__name__}: {exc} (rerun with --debug for the traceback, and report it)",
        )
