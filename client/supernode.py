"""The one command a hospital runs: ``fedsense client`` starts a ``flower-supernode`` that joins the federation.

The SuperNode opens a single outbound HTTPS connection to the SuperLink's Fleet API, verifies it
with the deployment CA (``--root-certificates``), signs its requests with the site's registered
key (``--auth-supernode-private-key``), and runs the ClientApp in a subprocess next to the data
(``--node-config site-config=...``). Plaintext is available only through an explicit ``insecure``.
The SuperNode is Flower's own, run through :mod:`client.supernode_poll` so that an idle site pulls
again within ``--poll-interval`` (default 1 s) instead of Flower's fixed 3 s.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from client.monitoring import serve_site_metrics
from client.supernode_poll import parse_poll_interval, superexec_env
from common.command import CommandParser, port_number
from common.errors import ConfigError, FedSenseError
from common.keyfiles import load_certificates, load_ec_private_key

logger = logging.getLogger(__name__)


DEFAULT_RUNTIME_PORT = 9094  # Flower's default for the SuperNode's local ClientApp Runtime API


def _executable(name: str) -> str:
    """``name`` from this interpreter's environment, so an unactivated venv still works."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def _existing_file(path: str | os.PathLike[str], flag: str) -> Path:
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise ConfigError(f"{path}: {flag}: no such file")
    return resolved


def _check_address(superlink: str) -> str:
    host, sep, port = superlink.rpartition(":")
    if "://" in superlink or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{superlink}: --superlink: expected HOST:PORT (no scheme), e.g. superlink.example.org:9092")
    return superlink


def build_supernode_command(
    superlink: str,
    root_cert: str | os.PathLike[str] | None,
    auth_key: str | os.PathLike[str] | None,
    site_config: str | os.PathLike[str],
    insecure: bool = False,
    *,
    runtime_port: int | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    warm: bool = False,
    poll_interval: str | None = None,
) -> list[str]:
    """``flower-supernode`` argv for one site; raises ConfigError for missing files or unsafe combinations.

    ``runtime_port`` moves the SuperNode's local (127.0.0.1) ClientApp Runtime API off Flower's
    default 9094, for hosts that run more than one SuperNode. ``warm``: process isolation, the
    ClientApps then come from :func:`build_superexec_command`'s process instead of Flower's own.
    ``poll_interval``: the longest wait between two pulls of an idle site (seconds, or ``flower``
    for Flower's fixed 3 s); without it ``FEDSENSE_POLL_INTERVAL`` or the default applies.
    """
    cmd = [sys.executable, "-m", "client.supernode_poll", "--superlink", _check_address(superlink)]
    if insecure:
        if root_cert or auth_key:
            # Flower refuses both combinations too; say why before it does.
            raise ConfigError(
                "--insecure: cannot be combined with --root-cert/--auth-key (SuperNode authentication needs TLS)"
            )
        logger.warning(
            "--insecure: the connection to %s is NOT encrypted and the SuperNode is NOT authenticated; "
            "model weights and metrics travel in plaintext. Use only on a trusted test network.",
            superlink,
        )
        cmd.append("--insecure")
    else:
        if not root_cert:
            raise ConfigError("--root-cert: required (the deployment CA that signed the SuperLink certificate)")
        if not auth_key:
            raise ConfigError("--auth-key: required (this site's registered SuperNode private key)")
        root, key = _existing_file(root_cert, "--root-cert"), _existing_file(auth_key, "--auth-key")
        # Checked here, naming the option and the file: Flower's SuperNode reports a wrong one only by exit code.
        load_certificates(root, "--root-cert")
        load_ec_private_key(key, "--auth-key", ssh_format=True)  # Flower loads it with load_ssh_private_key
        cmd += ["--root-certificates", str(root)]
        cmd += ["--auth-supernode-private-key", str(key)]
    site_path = _existing_file(site_config, "--site-config")
    if "'" in str(site_path):
        raise ConfigError(f"{site_path}: --site-config: the path must not contain a single quote")
    # A TOML literal string: Flower parses --node-config values as TOML, and literal strings need no escaping.
    cmd += ["--node-config", f"site-config='{site_path}'"]
    if warm:
        cmd += ["--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime_port or DEFAULT_RUNTIME_PORT)]
    elif runtime_port is not None:
        cmd += ["--port", str(runtime_port)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    if poll_interval is not None:
        parse_poll_interval(poll_interval, "--poll-interval")
        cmd += ["--poll-interval", poll_interval]
    return cmd


def build_superexec_command(runtime_port: int | None, supernode_pid: int) -> list[str]:
    """``fedsense-superexec`` argv serving the SuperNode's loopback Runtime API, ending with the SuperNode."""
    return [
        _executable("fedsense-superexec"),
        "--runtime-api-address",
        f"127.0.0.1:{runtime_port or DEFAULT_RUNTIME_PORT}",
        "--insecure",
        "--parent-pid",
        str(supernode_pid),
    ]


def build_parser() -> CommandParser:
    """Arguments of ``fedsense client`` / ``python -m client.supernode``."""
    parser = CommandParser(
        prog="fedsense client", description="Join the federation as this site's SuperNode (outbound HTTPS only)."
    )
    parser.add_argument("--superlink", required=True, help="SuperLink Fleet API address, HOST:PORT")
    parser.add_argument("--root-cert", help="CA certificate (PEM) that signed the SuperLink's certificate")
    parser.add_argument("--auth-key", help="this site's SuperNode private key (OpenSSH format, registered centrally)")
    parser.add_argument("--site-config", required=True, help="this site's TOML (data path, scanner)")
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext, unauthenticated connection: trusted test networks only"
    )
    parser.add_argument("--runtime-port", type=int, help="local ClientApp Runtime API port (default: Flower's 9094)")
    parser.add_argument(
        "--cold-clientapps",
        action="store_true",
        help="start every ClientApp as a fresh flwr-clientapp process (Flower's default) instead of "
        "forking it from a process with PyTorch and Flower already loaded (fedsense-superexec)",
    )
    parser.add_argument(
        "--poll-interval",
        metavar="SECONDS",
        help="longest wait between two pulls of the SuperLink while idle (default 1; the first wait "
        "is 0.1 s, doubling, and short again after each message; 'flower' keeps Flower's "
        "fixed 3 s). Environment: FEDSENSE_POLL_INTERVAL",
    )
    parser.add_argument(
        "--metrics-port",
        type=port_number,
        default=0,
        help="serve this site's Prometheus /metrics (train step time, steps, data read errors, last "
        "round trained; counts and times only) on this port (default 0: off)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="interface of --metrics-port (default 127.0.0.1; 0.0.0.0 inside a container)",
    )
    return parser


def run(args: argparse.Namespace) -> NoReturn:
    """Run the SuperNode (and, unless ``--cold-clientapps``, the warm SuperExec beside it) until it exits.

    With ``--metrics-port`` this process stays as the supervisor and serves the site's ``/metrics``
    (:mod:`client.monitoring`), the ClientApps below it recording into its directory.
    """
    warm = not args.cold_clientapps
    cmd = build_supernode_command(
        args.superlink,
        args.root_cert,
        args.auth_key,
        args.site_config,
        args.insecure,
        runtime_port=args.runtime_port,
        warm=warm,
        poll_interval=args.poll_interval,
    )
    environ = superexec_env(args.poll_interval, os.environ)  # refused before anything starts
    logger.info("starting %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    if not warm and not args.metrics_port:  # Flower's own SuperExec, started by the SuperNode, inherits the poll
        os.execvpe(cmd[0], cmd, environ)
    metrics = serve_site_metrics(args.metrics_port, args.metrics_host) if args.metrics_port else None
    try:
        code = _supervise(cmd, args.runtime_port, {**environ, **(metrics.env if metrics else {})}, warm)
    finally:
        if metrics is not None:
            metrics.close()
    raise SystemExit(code)


def _supervise(supernode_cmd: list[str], runtime_port: int | None, environ: dict[str, str], warm: bool) -> int:
    """SuperNode (plus the warm SuperExec) as children; signals go to all; exits with the SuperNode's code."""
    supernode = subprocess.Popen(supernode_cmd, env=environ)
    children = [supernode]
    if warm:
        children.append(subprocess.Popen(build_superexec_command(runtime_port, supernode.pid), env=environ))
        logger.info("SuperNode pid %d, warm SuperExec pid %d", supernode.pid, children[1].pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = supernode.wait()
    for superexec in children[1:]:
        if superexec.poll() is None:
            superexec.terminate()
            try:
                superexec.wait(timeout=15)
            except subprocess.TimeoutExpired:
                superexec.kill()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m client.supernode --superlink HOST:9092 --root-cert ca.crt --auth-key site.key --site-config site.toml``"""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(build_parser().parse_args(argv))
    except FedSenseError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
