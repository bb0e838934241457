"""What the SuperLink refuses: unregistered SuperNode keys, plaintext clients, certificates from another CA.

The slow tests run the venv's real ``flower-superlink`` / ``flower-supernode`` on 127.0.0.1 (no Docker):
one SuperLink with TLS and ``--enable-supernode-auth``, site-a's key registered through the Control API
(``flwr supernode register``), and SuperNodes started with ``client.supernode.build_supernode_command``.
A registered site that does get in is the control that makes the refusals meaningful.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.supernode import build_supernode_command
from common.errors import ConfigError
from server.pki import Pki, generate_pki

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SITE_CONFIG = ROOT / "deploy" / "sites" / "site-a.toml"
REFUSAL_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Own process group, so stopping it also stops the SuperExec/ClientApp children Flower spawns."""
    with log.open("wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class SuperLink:
    """A running TLS SuperLink and the flwr CLI environment (a SuperLink connection in $FLWR_HOME)."""

    port: int
    pki: Pki
    env: dict[str, str]
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def flwr(self, *args: str) -> dict:
        out = subprocess.run(
            [str(BIN / "flwr"), *args, "fedsense", "--format", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return json.loads(out.stdout)


def _start_superlink(pki: Pki, tmp: Path, stack: list[subprocess.Popen[bytes]]) -> SuperLink:
    port = _free_port()
    home = tmp / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedsense"\n\n[superlink.fedsense]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{pki.ca_cert}"\n',
        encoding="utf-8",
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile",
        str(pki.ca_cert),
        "--ssl-certfile",
        str(pki.server_cert),
        "--ssl-keyfile",
        str(pki.server_key),
        "--enable-supernode-auth",
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    link = SuperLink(port, pki, env, tmp / "superlink.log")
    stack.append(_start(cmd, link.log, env))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if stack[-1].poll() is not None:
            pytest.fail(f"SuperLink exited: {link.log.read_text(errors='replace')[-2000:]}")
        try:
            if link.flwr("supernode", "list").get("success"):
                return link
        except json.JSONDecodeError:
            pass
        time.sleep(0.5)
    pytest.fail(f"SuperLink did not come up: {link.log.read_text(errors='replace')[-2000:]}")


@pytest.fixture(scope="module")
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every process the module starts; all stopped at the end, also on failure."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in reversed(started):
        _stop(proc)


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory, processes: list[subprocess.Popen[bytes]]) -> SuperLink:
    tmp = tmp_path_factory.mktemp("transport")
    pki = generate_pki(tmp / "pki", ["localhost", "127.0.0.1"], ["site-a", "site-b"])
    link = _start_superlink(pki, tmp, processes)
    registered = link.flwr("supernode", "register", str(pki.sites["site-a"].public_key), "--name", "site-a")
    assert registered.get("success"), registered
    return link


def _run_supernode(cmd: list[str], log: Path, env: dict[str, str], processes: list) -> int | None:
    """Exit code of a SuperNode that gives up, or None if it is still running after the timeout."""
    proc = _start(cmd, log, env)
    processes.append(proc)
    try:
        return proc.wait(timeout=REFUSAL_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None
    finally:
        _stop(proc)


def _supernode_cmd(link: SuperLink, site: str, **kwargs) -> list[str]:
    keys = link.pki.sites[site]
    options = {"root_cert": link.pki.ca_cert, "auth_key": keys.private_key, **kwargs}
    return build_supernode_command(
        link.address, site_config=SITE_CONFIG, runtime_port=_free_port(), max_retries=1, max_wait_time=10, **options
    )


@pytest.mark.slow
def test_registered_site_is_admitted(superlink: SuperLink, processes: list, tmp_path: Path) -> None:
    proc = _start(_supernode_cmd(superlink, "site-a"), tmp_path / "site-a.log", superlink.env)
    processes.append(proc)
    try:
        deadline = time.monotonic() + REFUSAL_TIMEOUT
        statuses: list[str] = []
        while time.monotonic() < deadline and proc.poll() is None:
            statuses = [n["status"] for n in superlink.flwr("supernode", "list").get("nodes", [])]
            if "online" in statuses:
                break
            time.sleep(0.5)
        assert "online" in statuses, (tmp_path / "site-a.log").read_text(errors="replace")[-2000:]
    finally:
        _stop(proc)


@pytest.mark.slow
def test_unregistered_key_is_refused(superlink: SuperLink, processes: list, tmp_path: Path) -> None:
    log = tmp_path / "site-b.log"
    code = _run_supernode(_supernode_cmd(superlink, "site-b"), log, superlink.env, processes)
    output = log.read_text(errors="replace")
    assert code not in (None, 0), output[-2000:]
    assert "Failed to activate SuperNode" in output
    assert "No SuperNode found with the given public key" in superlink.log.read_text(errors="replace")


@pytest.mark.slow
def test_plaintext_client_is_refused(
    superlink: SuperLink, processes: list, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="client.supernode"):
        cmd = _supernode_cmd(superlink, "site-a", root_cert=None, auth_key=None, insecure=True)
    assert "NOT encrypted" in caplog.text
    log = tmp_path / "plaintext.log"
    code = _run_supernode(cmd, log, superlink.env, processes)
    output = log.read_text(errors="replace")
    assert code not in (None, 0), output[-2000:]
    assert "could not establish a connection" in output

    # The same at the HTTP level: a plaintext request never gets an HTTP answer from the TLS port.
    with socket.create_connection(("127.0.0.1", superlink.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/fleet/activate-node HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        try:
            answer = sock.recv(4096)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/"), answer


@pytest.mark.slow
def test_certificate_from_another_ca_is_refused(superlink: SuperLink, processes: list, tmp_path: Path) -> None:
    """An impostor SuperLink whose certificate another CA signed: the site, trusting only its CA, refuses it."""
    rogue = generate_pki(tmp_path / "rogue-pki", ["localhost", "127.0.0.1"], [])
    impostor = _start_superlink(rogue, tmp_path / "impostor", processes)
    cmd = build_supernode_command(
        impostor.address,
        superlink.pki.ca_cert,
        superlink.pki.sites["site-a"].private_key,
        SITE_CONFIG,
        runtime_port=_free_port(),
        max_retries=1,
        max_wait_time=10,
    )
    log = tmp_path / "wrong-ca.log"
    code = _run_supernode(cmd, log, superlink.env, processes)
    output = log.read_text(errors="replace")
    assert code not in (None, 0), output[-2000:]
    assert "CERTIFICATE_VERIFY_FAILED" in output


def _key_material(tmp_path: Path) -> tuple[Path, Path]:
    """A real CA certificate and site key (both are read before the SuperNode starts)."""
    pki = generate_pki(tmp_path / "pki", sites=["site-a"])
    return pki.ca_cert, pki.sites["site-a"].private_key


def test_command_for_a_site(tmp_path: Path) -> None:
    ca, key = _key_material(tmp_path)
    cmd = build_supernode_command("fl.example.org:9092", ca, key, SITE_CONFIG)
    assert cmd[:3] == [sys.executable, "-m", "client.supernode_poll"]  # Flower's flower-supernode, short poll
    assert cmd[3:] == [
        "--superlink",
        "fl.example.org:9092",
        "--root-certificates",
        str(ca),
        "--auth-supernode-private-key",
        str(key),
        "--node-config",
        f"site-config='{SITE_CONFIG}'",
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"superlink": "https://fl.example.org:9092"}, "--superlink"),
        ({"superlink": "fl.example.org"}, "--superlink"),
        ({"root_cert": None}, "--root-cert"),
        ({"auth_key": None}, "--auth-key"),
        ({"auth_key": "/nonexistent/site.key"}, "no such file"),
        ({"insecure": True}, "--insecure"),
        ({"root_cert": "KEY"}, "--root-cert: not a PEM certificate"),  # the two files swapped
        ({"auth_key": "CA"}, "--auth-key: not an OpenSSH private key"),
        ({"auth_key": "CA_KEY"}, "--auth-key: not an OpenSSH private key"),  # PEM, Flower wants OpenSSH
    ],
)
def test_unsafe_or_broken_commands_are_refused(tmp_path: Path, kwargs: dict, match: str) -> None:
    ca, key = _key_material(tmp_path)
    swap = {"KEY": key, "CA": ca, "CA_KEY": ca.with_name("ca.key")}
    kwargs = {k: swap.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    args = {"superlink": "fl.example.org:9092", "root_cert": ca, "auth_key": key, "site_config": SITE_CONFIG, **kwargs}
    with pytest.raises(ConfigError, match=match):
        build_supernode_command(**args)
