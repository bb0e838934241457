"""Operator certificates (``fedsense pki --operator``) and the bridge ``fedsense operator`` runs flwr through."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError
from server.operator import Bridge, client_context
from server.pki import generate_pki, issue_operator


def test_operator_certificate_is_a_client_certificate_of_the_ca_and_kept(tmp_path: Path) -> None:
    pki = generate_pki(tmp_path, ["frontdoor"], [])
    cert_path, key_path = issue_operator(tmp_path, "alice")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()))
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "operators"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert key_path.stat().st_mode & 0o777 == 0o600
    before = cert_path.read_bytes(), key_path.read_bytes()
    assert issue_operator(tmp_path, "alice") == (cert_path, key_path)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before
    with pytest.raises(ConfigError):
        issue_operator(tmp_path, "../evil")


def _mtls_echo_server(pki_dir: Path, require_client: bool, connections: int = 1) -> tuple[socket.socket, list[str]]:
    """A TLS server with the federation's certificate that echoes one line per connection and records each
    client's CN."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki_dir / "ca.crt"))
    context.load_cert_chain(str(pki_dir / "server.crt"), str(pki_dir / "server.key"))
    context.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_OPTIONAL
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[str] = []

    def serve() -> None:
        for _ in range(connections):
            raw, _ = listener.accept()
            with context.wrap_socket(raw, server_side=True) as conn:
                peer = conn.getpeercert() or {}
                seen.extend(v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName")
                conn.sendall(conn.recv(1024))

    threading.Thread(target=serve, daemon=True).start()
    return listener, seen


def test_the_bridge_carries_plain_bytes_to_tls_with_the_operator_certificate(tmp_path: Path) -> None:
    generate_pki(tmp_path, ["localhost", "127.0.0.1"], [])
    cert, key = issue_operator(tmp_path, "alice")
    bundle = tmp_path / "alice.pem"
    bundle.write_bytes(cert.read_bytes() + key.read_bytes())  # what `compose run pki operator` prints
    # Many connections: the thread-per-direction bridge stalled about one TLS 1.3 connection in five.
    listener, seen = _mtls_echo_server(tmp_path, require_client=True, connections=20)
    bridge = Bridge(f"127.0.0.1:{listener.getsockname()[1]}", client_context(tmp_path / "ca.crt", bundle, None))
    try:
        host, port = bridge.address.split(":")
        for i in range(20):
            with socket.create_connection((host, int(port)), timeout=10) as plain:
                plain.sendall(f"hello {i}\n".encode())
                assert plain.recv(1024) == f"hello {i}\n".encode()
        assert seen == ["alice"] * 20
    finally:
        bridge.close()
        listener.close()


def test_missing_or_mismatched_operator_files_are_config_errors(tmp_path: Path) -> None:
    generate_pki(tmp_path, ["localhost"], [])
    cert, _ = issue_operator(tmp_path, "alice")
    with pytest.raises(ConfigError, match="--cert: no such file"):
        client_context(tmp_path / "ca.crt", tmp_path / "nope.pem", None)
    with pytest.raises(ConfigError, match="not a matching certificate and key"):
        client_context(tmp_path / "ca.crt", cert, tmp_path / "server.key")
    # A key where a certificate belongs (and the reverse): the file and option named, not ssl's "no certificate".
    with pytest.raises(ConfigError, match=f"{tmp_path / 'ca.key'}: --root-cert: not a PEM certificate"):
        client_context(tmp_path / "ca.key", cert, None)
    with pytest.raises(ConfigError, match=f"{cert}: --key: not an unencrypted PEM private key"):
        client_context(tmp_path / "ca.crt", cert, cert)


def test_the_bridge_tries_the_front_door_again_before_giving_up(caplog: pytest.LogCaptureFixture) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed_port = probe.getsockname()[1]  # nothing listens here once the probe is closed
    bridge = Bridge(f"127.0.0.1:{closed_port}", ssl.create_default_context())
    try:
        with caplog.at_level("ERROR", logger="server.operator"):
            attempt = asyncio.run_coroutine_threadsafe(bridge._connect(waits=(0.01, 0.01)), bridge.loop)
            assert attempt.result(timeout=30) is None
    finally:
        bridge.close()
    assert [r.getMessage().split("(attempt ")[1][0] for r in caplog.records] == ["1", "2", "3"]
