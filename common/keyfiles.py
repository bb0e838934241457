"""Reading the key material a user points a command at: a certificate or private key file, or an error naming it.

TLS libraries and Flower report a wrong file as "no certificate or crl found" or an exit code, without the
file or the option: the user cannot tell which of three paths is wrong. Checked here first, every such
mistake is one line naming the option and the file (README "Exit codes": 2).
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from common.errors import ConfigError


def _label(path: Path, option: str) -> str:
    return f"{path}: {option}" if option else str(path)


def load_certificates(path: Path, option: str = "") -> list[x509.Certificate]:
    """Every certificate of the PEM file ``path`` (a CA file may hold several); at least one."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{_label(path, option)}: no such file") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{_label(path, option)}: not a PEM certificate ({exc})") from None
    return certificates


def load_certificate(path: Path, option: str = "") -> x509.Certificate:
    """The (first) certificate of the PEM file ``path``."""
    return load_certificates(path, option)[0]


def load_private_key(path: Path, option: str = "", ssh_format: bool | None = None) -> PrivateKeyTypes:
    """An unencrypted private key: PEM (PKCS#8 / traditional) or OpenSSH; ``ssh_format`` None accepts both."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{_label(path, option)}: no such file") from None
    is_ssh = data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    want_ssh = is_ssh if ssh_format is None else ssh_format
    kind = "an OpenSSH" if want_ssh else "an unencrypted PEM"
    try:
        if want_ssh:
            return serialization.load_ssh_private_key(data, None)
        return serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{_label(path, option)}: not {kind} private key ({exc})") from None


def load_ec_private_key(path: Path, option: str = "", ssh_format: bool | None = None) -> ec.EllipticCurvePrivateKey:
    """A private key on an elliptic curve (what Flower's SuperNode authentication and our CA use)."""
    key = load_private_key(path, option, ssh_format)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{_label(path, option)}: not an elliptic-curve private key ({type(key).__name__})")
    return key
