"""``fedsense operator``: run a ``flwr`` command through the front door with an operator's client certificate.

The front door (nginx, deploy/docker/nginx.conf.template) admits the Control API (``/v1/control/``)
only to TLS clients holding a certificate issued by the federation CA (``fedsense pki --operator NAME``).
Flower's ``flwr`` CLI cannot present a client certificate, so this command opens a private bridge: a
listener on 127.0.0.1 (a random port, this machine only) whose every connection is carried to the front
door over TLS with the operator's certificate and the CA verified. ``flwr`` runs with a private
``FLWR_HOME`` whose default connection is that bridge, e.g.::

    fedsense operator --front-door fl.example.org:443 --root-cert ca.crt \\
        --cert alice.crt --key alice.key -- supernode register site-d.pub --name site-d
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from common.command import CommandParser
from common.errors import ConfigError
from common.keyfiles import load_certificate, load_certificates, load_private_key

logger = logging.getLogger(__name__)

CONNECTION = "fedsense-operator"


def client_context(root_cert: Path, cert: Path, key: Path | None) -> ssl.SSLContext:
    """TLS to the front door: its certificate verified against the CA, ours presented.

    ``key`` may be None when ``cert`` holds the certificate and its key (one PEM bundle).
    """
    for flag, path in (("--root-cert", root_cert), ("--cert", cert), ("--key", key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path}: {flag}: no such file")
    # Checked first, naming the option and the file (ssl names neither: "no certificate or crl found").
    load_certificates(root_cert, "--root-cert")
    load_certificate(cert, "--cert")
    load_private_key(key if key is not None else cert, "--key" if key is not None else "--cert (its key)")
    context = ssl.create_default_context(cafile=str(root_cert))
    try:
        context.load_cert_chain(str(cert), str(key) if key is not None else None)
    except ssl.SSLError as exc:
        raise ConfigError(f"{cert}: --cert/--key: not a matching certificate and key: {exc}") from exc
    return context


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until it ends, then close the other side's writer (the connection is over)."""
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()


class Bridge:
    """127.0.0.1:port -> TLS (client certificate) -> ``front_door``; serves until closed.

    One asyncio loop in a thread of its own carries every connection. TLS runs on asyncio's memory BIOs, in
    that one thread: the earlier thread-per-direction bridge read and wrote one ``ssl.SSLSocket`` from two
    threads at once, which OpenSSL does not support, and about one TLS 1.3 connection in five stalled (the
    session tickets a TLS 1.3 server sends after the handshake are read while the request is written).
    """

    def __init__(self, front_door: str, context: ssl.SSLContext) -> None:
        host, sep, port = front_door.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"--front-door: expected HOST:PORT, got {front_door!r}")
        self.host, self.port = host.strip("[]"), int(port)
        self.context = context
        self.loop = asyncio.new_event_loop()
        self._server = self.loop.run_until_complete(asyncio.start_server(self._carry, "127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        self._thread = threading.Thread(target=self.loop.run_forever, name="operator-bridge", daemon=True)
        self._thread.start()

    async def _carry(self, local_reader: asyncio.StreamReader, local_writer: asyncio.StreamWriter) -> None:
        try:
            remote = await self._connect()
            if remote is None:
                local_writer.close()
                return
            remote_reader, remote_writer = remote
            await asyncio.gather(_pump(local_reader, remote_writer), _pump(remote_reader, local_writer))
        except asyncio.CancelledError:
            # close() ends this connection. Not re-raised: on Python 3.11 the server's done-callback would log the
            # cancellation of its own connection task as an error.
            local_writer.close()

    async def _connect(
        self, waits: tuple[float, ...] = (0.5, 1.0)
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A TLS connection to the front door; a failed connect or handshake is tried again after each of
        ``waits`` (nothing has been read from flwr yet, so a retry is safe). None after the last failure."""
        for attempt, wait in enumerate((*waits, None)):
            try:
                return await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, ssl=self.context, server_hostname=self.host), 30
                )
            except (TimeoutError, OSError, ssl.SSLError) as exc:
                logger.error("front door %s:%d (attempt %d): %s", self.host, self.port, attempt + 1, exc)
                if wait is None:
                    return None
                await asyncio.sleep(wait)
        return None

    def close(self) -> None:
        """Stop listening, end the connections still open, stop the loop."""

        async def shutdown() -> None:
            self._server.close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=5)
            except TimeoutError:
                logger.warning("operator bridge: connections did not end within 5 s; stopping anyway")
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


def run_flwr(front_door: str, context: ssl.SSLContext, flwr_args: Sequence[str]) -> int:
    """``flwr FLWR_ARGS`` with the bridge as its default connection; returns flwr's exit status."""
    bridge = Bridge(front_door, context)
    home = Path(tempfile.mkdtemp(prefix="fedsense-operator-"))
    try:
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{bridge.address}"\ninsecure = true\n',
            encoding="utf-8",
        )
        from server.simulate import _bin, flower_env

        return subprocess.run([_bin("flwr"), *flwr_args], env=flower_env(home), check=False).returncode
    finally:
        bridge.close()
        shutil.rmtree(home, ignore_errors=True)


def build_parser() -> CommandParser:
    parser = CommandParser(prog="fedsense operator", description=__doc__.splitlines()[0])
    parser.add_argument("--front-door", required=True, help="HOST:PORT of the federation's front door")
    parser.add_argument("--root-cert", required=True, type=Path, help="the federation CA certificate (ca.crt)")
    parser.add_argument(
        "--cert",
        required=True,
        type=Path,
        help="operator certificate (fedsense pki --operator), or certificate and key in one PEM",
    )
    parser.add_argument("--key", type=Path, help="operator private key (if not in --cert)")
    parser.add_argument(
        "flwr_args", nargs=argparse.REMAINDER, help="-- then the flwr command, without a connection name"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    flwr_args = list(args.flwr_args)
    if flwr_args[:1] == ["--"]:
        flwr_args = flwr_args[1:]
    if not flwr_args:
        raise ConfigError("operator: give the flwr command after --, e.g. -- supernode list")
    return run_flwr(args.front_door, client_context(args.root_cert, args.cert, args.key), flwr_args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(run(build_parser().parse_args()))
