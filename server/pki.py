"""Key material for a FedSense deployment: TLS for the SuperLink, auth keys for the SuperNodes.

Flower 1.41 serves its Fleet, Control and Runtime APIs on one HTTPS port (``flower-superlink
--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``); SuperNodes verify it with ``--root-certificates``
and prove their identity by signing requests with ``--auth-supernode-private-key`` (an EC key on a
NIST curve in OpenSSH format). The SuperLink only admits keys registered through the Control API
(``flwr supernode register site.pub``) when started with ``--enable-supernode-auth``.

Layout of ``out_dir`` (private keys 0600, everything idempotent: existing keys are never replaced)::

    ca.crt ca.key                 the deployment's CA (P-384)
    server.crt server.key         the SuperLink's TLS certificate, SANs = the server names
    superexec.secret              shared secret of SuperLink and the ServerApp runtime (process isolation)
    sites/<site>.key <site>.pub   SuperNode auth key pair (P-384; OpenSSH private / public key)
    sites/retired/                key pairs replaced by ``rotate_site_key``
    site-keys.json                fingerprint of each current site key -> site (run config ``site-keys``)
    operators/<name>.crt .key     an operator's TLS client certificate (clientAuth): the front door
                                  (nginx) admits the Control API only to these (``--operator NAME``)
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.command import CommandParser
from common.errors import ConfigError, FedSenseError, OutputError
from common.keyfiles import load_certificate, load_ec_private_key

logger = logging.getLogger(__name__)

DEFAULT_SERVER_NAMES = ("superlink", "localhost", "127.0.0.1", "::1")
CURVE = ec.SECP384R1()  # Flower's docs and `flwr supernode register` name P-384
CA_DAYS = 3650
SERVER_DAYS = 825
RENEW_BEFORE_DAYS = 30
SITE_KEYS_FILE = "site-keys.json"  # key fingerprint -> site, for the ServerApp (write_site_keys)
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # same rule as SiteConfig.name


@dataclass(frozen=True)
class SiteKeys:
    """One SuperNode's auth key pair."""

    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class Pki:
    """Paths of everything ``generate_pki`` manages."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    superexec_secret: Path
    sites: dict[str, SiteKeys] = field(default_factory=dict)


def _paths(out_dir: Path, sites: Sequence[str]) -> Pki:
    return Pki(
        root=out_dir,
        ca_cert=out_dir / "ca.crt",
        ca_key=out_dir / "ca.key",
        server_cert=out_dir / "server.crt",
        server_key=out_dir / "server.key",
        superexec_secret=out_dir / "superexec.secret",
        sites={s: SiteKeys(out_dir / "sites" / f"{s}.key", out_dir / "sites" / f"{s}.pub") for s in sites},
    )


def _write(path: Path, data: bytes, private: bool) -> None:
    """Atomic write (temp file + rename) so a crash never leaves half a key; private files 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_pki_folder(out: Path, paths: Pki) -> None:
    """Refuse to scatter keys into a folder of other files (a data folder, a home directory) by mistake.

    ``fedsense pki`` completes its own folder idempotently, so an existing FedSense PKI (``ca.key`` or
    ``ca.crt``) is the one case where a non-empty ``--out`` is right.
    """
    if not out.is_dir() or paths.ca_key.exists() or paths.ca_cert.exists():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name != "lost+found")
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise OutputError(
            f"--out {out}: holds other files ({shown}) and no FedSense PKI; choose an empty or new folder"
        )


def _load_or_create_key(path: Path, ssh_format: bool = False) -> ec.EllipticCurvePrivateKey:
    """Existing keys are kept (certificates and registrations depend on them)."""
    if path.exists():
        key = load_ec_private_key(path, ssh_format=ssh_format)
        os.chmod(path, 0o600)
        return key
    key = ec.generate_private_key(CURVE)
    fmt = serialization.PrivateFormat.OpenSSH if ssh_format else serialization.PrivateFormat.PKCS8
    _write(path, key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()), private=True)
    logger.info("created %s", path)
    return key


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _ca_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedSense"),
            x509.NameAttribute(NameOID.COMMON_NAME, "FedSense deployment CA"),
        ]
    )
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_cert(
    key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: Sequence[str]
) -> x509.Certificate:
    subject = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedSense"),
        x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
    ]
    return _leaf_cert(
        key,
        ca,
        ca_key,
        subject,
        ExtendedKeyUsageOID.SERVER_AUTH,
        _san(names),
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
    )


def _leaf_cert(
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: list[x509.NameAttribute],
    usage: x509.ObjectIdentifier,
    *extensions: x509.ExtensionType,
) -> x509.Certificate:
    """A certificate signed by the federation CA for one server or client use (``usage``), P-384 / SHA-384."""
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=SERVER_DAYS), ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
    )
    return builder.sign(ca_key, hashes.SHA384())


def _server_cert_current(
    path: Path, key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, names: Sequence[str]
) -> bool:
    """An existing certificate is kept while it still fits: same key, same CA, same SANs, not expiring."""
    if not path.exists():
        return False
    cert = load_certificate(path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    expiring = cert.not_valid_after_utc - _now() < dt.timedelta(days=RENEW_BEFORE_DAYS)
    return cert.public_key() == key.public_key() and sans == _san(names) and not expiring


def _operator_cert(
    key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: str
) -> x509.Certificate:
    subject = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedSense"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "operators"),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ]
    return _leaf_cert(key, ca, ca_key, subject, ExtendedKeyUsageOID.CLIENT_AUTH)


def issue_operator(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """An operator's client certificate and key (``operators/NAME.crt``, ``.key``), kept while valid.

    Whoever holds them may use the Control API through the front door (register SuperNode keys,
    submit and stop runs); sites never get one.
    """
    out = Path(out_dir)
    check_site_name(name)
    ca_key = load_ec_private_key(out / "ca.key", ssh_format=False)
    ca = load_certificate(out / "ca.crt")
    cert_path, key_path = out / "operators" / f"{name}.crt", out / "operators" / f"{name}.key"
    key = _load_or_create_key(key_path)
    current = False
    if cert_path.exists():
        cert = load_certificate(cert_path)
        try:
            cert.verify_directly_issued_by(ca)
            current = cert.public_key() == key.public_key() and cert.not_valid_after_utc - _now() >= dt.timedelta(
                days=RENEW_BEFORE_DAYS
            )
        except (ValueError, TypeError, InvalidSignature):
            current = False
    if not current:
        _write(cert_path, _operator_cert(key, ca, ca_key, name).public_bytes(serialization.Encoding.PEM), private=False)
        logger.info("issued operator certificate %s", cert_path)
    return cert_path, key_path


def key_fingerprint(public_key: bytes) -> str:
    """``sha256:<hex>`` of the key's DER SubjectPublicKeyInfo, whatever text form it came in.

    The SuperLink stores a node's key as PEM (Flower's ``public_key_to_bytes``); ``fedsense pki``
    writes OpenSSH ``.pub`` files. Both forms of one key give one fingerprint.
    """
    text = public_key.strip()
    try:
        key = (
            serialization.load_ssh_public_key(text)
            if text.startswith(b"ecdsa-") or text.startswith(b"ssh-")
            else serialization.load_pem_public_key(text)
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM or OpenSSH public key: {exc}") from exc
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def site_keys_of(pub_files: Iterable[Path]) -> dict[str, str]:
    """Fingerprint -> site for the ``<site>.pub`` files given (the file stem is the site)."""
    mapping: dict[str, str] = {}
    for path in sorted(pub_files):
        try:
            mapping[key_fingerprint(path.read_bytes())] = path.stem
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    return mapping


def write_site_keys(out_dir: str | Path) -> Path:
    """``site-keys.json``: the fingerprint of every current ``sites/<site>.pub`` -> its site.

    The ServerApp (run config ``site-keys``) takes a reply's site from its node's authenticated key
    through this file, not from the name the reply reports (server/identity.py). Retired keys are
    left out, so a rotated-away key no longer speaks for its site.
    """
    out = Path(out_dir)
    path = out / SITE_KEYS_FILE
    _write(
        path,
        (json.dumps(site_keys_of((out / "sites").glob("*.pub")), indent=1, sort_keys=True) + "\n").encode(),
        private=False,
    )
    return path


def check_site_name(site: str) -> str:
    """Site names become file names: reject anything that could escape ``sites/``."""
    if not _SITE_NAME.match(site):
        raise ConfigError(f"--site: {site!r}: use letters, digits, '.', '_' or '-' (it names the key files)")
    return site


def _site_keys(paths: SiteKeys) -> None:
    key = _load_or_create_key(paths.private_key, ssh_format=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if not paths.public_key.exists() or paths.public_key.read_bytes().split()[:2] != public.split()[:2]:
        _write(paths.public_key, public + b"\n", private=False)
        logger.info("wrote %s", paths.public_key)


def generate_pki(
    out_dir: str | Path, server_names: Sequence[str] = DEFAULT_SERVER_NAMES, sites: Sequence[str] = ()
) -> Pki:
    """Create whatever is missing under ``out_dir``; existing keys (and still-valid certificates) stay byte-identical.

    ``server_names`` are the names and IPs the SuperLink is reached under (they become the
    certificate's SANs; the first is its CN). Changing them reissues the server certificate for
    the same key, so SuperNodes keep trusting it through the unchanged CA.
    """
    if not server_names:
        raise ConfigError("--server-name: at least one name is needed for the SuperLink certificate")
    names = list(dict.fromkeys(server_names))
    out = Path(out_dir)
    paths = _paths(out, [check_site_name(s) for s in sites])
    _check_pki_folder(out, paths)
    out.mkdir(parents=True, exist_ok=True)

    ca_key = _load_or_create_key(paths.ca_key)
    ca = load_certificate(paths.ca_cert) if paths.ca_cert.exists() else None
    if ca is None or ca.public_key() != ca_key.public_key():
        ca = _ca_cert(ca_key)
        _write(paths.ca_cert, ca.public_bytes(serialization.Encoding.PEM), private=False)
        logger.info("created %s", paths.ca_cert)

    server_key = _load_or_create_key(paths.server_key)
    if not _server_cert_current(paths.server_cert, server_key, ca, names):
        cert = _server_cert(server_key, ca, ca_key, names)
        _write(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
        logger.info("issued %s for %s", paths.server_cert, ", ".join(names))

    if not paths.superexec_secret.exists():
        _write(paths.superexec_secret, secrets.token_hex(32).encode(), private=True)
        logger.info("created %s", paths.superexec_secret)
    os.chmod(paths.superexec_secret, 0o600)

    for site_paths in paths.sites.values():
        _site_keys(site_paths)
    write_site_keys(out)
    return paths


def rotate_site_key(out_dir: str | Path, site: str) -> SiteKeys:
    """Replace a site's auth key pair; the old pair moves to ``sites/retired/`` (still needed to unregister).

    Afterwards: register the new ``.pub`` (``flwr supernode register``), restart the site's SuperNode
    with the new key, then ``flwr supernode unregister`` the old node id (deploy/README.md).
    """
    keys = _paths(Path(out_dir), [check_site_name(site)]).sites[site]
    if keys.private_key.exists():
        stamp = _now().strftime("%Y%m%dT%H%M%SZ")
        retired = keys.private_key.parent / "retired"
        retired.mkdir(parents=True, exist_ok=True)
        for path in (keys.private_key, keys.public_key):
            if path.exists():
                path.rename(retired / f"{path.stem}-{stamp}{path.suffix}")
        logger.info("retired the old %s key pair to %s", site, retired)
    _site_keys(keys)
    write_site_keys(out_dir)
    return keys


def build_parser() -> CommandParser:
    """Arguments of ``fedsense pki`` / ``python -m server.pki``."""
    parser = CommandParser(
        prog="fedsense pki", description="Create (idempotently) the CA, SuperLink TLS certificate and site auth keys."
    )
    parser.add_argument("--out", required=True, type=Path, help="directory for the key material")
    parser.add_argument(
        "--server-name",
        action="append",
        dest="server_names",
        metavar="NAME",
        help=f"DNS name or IP of the SuperLink (repeat; default: {', '.join(DEFAULT_SERVER_NAMES)})",
    )
    parser.add_argument(
        "--site",
        action="append",
        dest="sites",
        default=[],
        metavar="SITE",
        help="site that gets a SuperNode auth key pair (repeat)",
    )
    parser.add_argument(
        "--rotate",
        action="append",
        default=[],
        metavar="SITE",
        help="replace this site's key pair (old one kept under sites/retired/)",
    )
    parser.add_argument(
        "--operator",
        action="append",
        dest="operators",
        default=[],
        metavar="NAME",
        help="issue an operator client certificate (operators/NAME.crt/.key): Control API access "
        "through the front door (repeat)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Execute parsed ``build_parser`` arguments."""
    pki = generate_pki(args.out, args.server_names or DEFAULT_SERVER_NAMES, args.sites)
    for site in args.rotate:
        rotate_site_key(args.out, site)
    for name in args.operators:
        issue_operator(args.out, name)
    logger.info(
        "PKI ready in %s (sites: %s)", pki.root, ", ".join(sorted(set(args.sites) | set(args.rotate))) or "none"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.pki --out DIR --site site-a ...``"""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(build_parser().parse_args(argv))
    except FedSenseError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
