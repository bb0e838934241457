"""server.pki: the deployment's CA, SuperLink certificate and SuperNode keys, as Flower 1.41 needs them."""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from common.errors import ConfigError
from server.pki import generate_pki, main, rotate_site_key

NAMES = ["superlink", "localhost", "127.0.0.1", "fl.hospital.example"]
SITES = ["site-a", "site-b"]


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture()
def pki(tmp_path: Path):
    return generate_pki(tmp_path / "pki", NAMES, SITES)


def test_ca_signs_server_certificate_with_all_names(pki) -> None:
    ca, server = _cert(pki.ca_cert), _cert(pki.server_cert)
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink", "localhost", "fl.hospital.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    assert key.public_key() == server.public_key()


def test_private_files_are_0600(pki) -> None:
    private = [pki.ca_key, pki.server_key, pki.superexec_secret] + [s.private_key for s in pki.sites.values()]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_second_run_leaves_every_byte_unchanged(pki) -> None:
    before = _snapshot(pki.root)
    generate_pki(pki.root, NAMES, SITES)
    assert _snapshot(pki.root) == before


def test_new_site_added_without_touching_existing_material(pki) -> None:
    before = _snapshot(pki.root)
    again = generate_pki(pki.root, NAMES, [*SITES, "site-c"])
    after = _snapshot(pki.root)
    # site-keys.json is an index of the keys (key fingerprint -> site): it gains site-c, nothing else changes.
    index = "site-keys.json"
    assert {k: v for k, v in after.items() if k in before and k != index} == {
        k: v for k, v in before.items() if k != index
    }
    assert again.sites["site-c"].private_key.exists() and again.sites["site-c"].public_key.exists()
    assert sorted(json.loads((pki.root / index).read_text()).values()) == [*sorted(SITES), "site-c"]


def test_new_server_name_reissues_certificate_for_the_same_key(pki) -> None:
    old_cert, old_key = pki.server_cert.read_bytes(), pki.server_key.read_bytes()
    ca_before = pki.ca_cert.read_bytes()
    generate_pki(pki.root, [*NAMES, "10.0.0.5"], SITES)
    cert = _cert(pki.server_cert)
    assert pki.server_cert.read_bytes() != old_cert
    assert pki.server_key.read_bytes() == old_key and pki.ca_cert.read_bytes() == ca_before
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.5") in san.get_values_for_type(x509.IPAddress)
    cert.verify_directly_issued_by(_cert(pki.ca_cert))


def test_site_keys_are_p384_and_pairs_match(pki) -> None:
    for keys in pki.sites.values():
        private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)
        public = serialization.load_ssh_public_key(keys.public_key.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
        assert private.curve.name == "secp384r1"
        assert private.public_key() == public
    a, b = (pki.sites[s].public_key.read_bytes() for s in SITES)
    assert a != b


def test_flower_accepts_the_site_keys(pki) -> None:
    """The loaders `flwr supernode register` and `flower-supernode` use."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    keys = pki.sites["site-a"]
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)
    assert try_load_public_key(keys.public_key) == public_key_to_bytes(private.public_key())


def test_rotation_retires_the_old_pair(pki) -> None:
    old_pub = pki.sites["site-a"].public_key.read_bytes()
    untouched = pki.sites["site-b"].private_key.read_bytes()
    new = rotate_site_key(pki.root, "site-a")
    assert new.public_key.read_bytes() != old_pub
    retired = list((pki.root / "sites" / "retired").glob("site-a-*.pub"))
    assert [p.read_bytes() for p in retired] == [old_pub]
    assert pki.sites["site-b"].private_key.read_bytes() == untouched
    assert stat.S_IMODE(new.private_key.stat().st_mode) == 0o600


@pytest.mark.parametrize("site", ["../evil", "", "a b", "-x"])
def test_site_names_that_could_escape_are_refused(tmp_path: Path, site: str) -> None:
    with pytest.raises(ConfigError, match="--site"):
        generate_pki(tmp_path, NAMES, [site])


def test_cli_main(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path), "--site", "site-a", "--server-name", "superlink"]) == 0
    assert (tmp_path / "sites" / "site-a.pub").exists()
    assert main(["--out", str(tmp_path), "--site", "../x"]) == 2


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> None:
    """One TLS handshake over a socketpair; the client side's error (if any) propagates."""
    left, right = socket.socketpair()
    with left, right:

        def serve() -> None:
            try:
                with server_ctx.wrap_socket(right, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with client_ctx.wrap_socket(left, server_hostname=server_hostname):
                pass
        finally:
            right.close()
            thread.join(timeout=5)


@pytest.mark.parametrize("name", ["superlink", "127.0.0.1", "fl.hospital.example"])
def test_tls_handshake_verifies_against_the_ca(pki, tmp_path: Path, name: str) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    _handshake(server_ctx, ssl.create_default_context(cafile=str(pki.ca_cert)), name)

    rogue = generate_pki(tmp_path / "rogue", NAMES, [])
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, ssl.create_default_context(cafile=str(rogue.ca_cert)), name)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, ssl.create_default_context(cafile=str(pki.ca_cert)), "not-the-superlink")
