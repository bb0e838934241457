"""Who may read a published dashboard: one bearer token, generated at first start and shown once.

On 127.0.0.1 (the default) the dashboard needs no token: only this machine's users reach it. Published
on other interfaces it must have one. The token lives in a 0600 file; the first start creates it and
prints it once (with the URL that sets it in the browser); later starts reuse it without printing it.
A browser presents it as ``?token=`` once (answered with an HttpOnly cookie) and then by cookie; other
clients send ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from http.cookies import CookieError, SimpleCookie
from pathlib import Path

from common.atomic import atomic_write
from common.errors import ConfigError

COOKIE = "fedsense_dashboard"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: interfaces only this machine reaches."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_or_create_token(path: Path) -> tuple[str, bool]:
    """The token in ``path`` (created, 0600, when missing); ``created`` says whether it is new."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        token = ""
    except OSError as exc:
        raise ConfigError(f"{path}: --token-file: cannot read: {exc}") from exc
    if token:
        return token, False
    token = secrets.token_urlsafe(24)

    def write(stream) -> None:  # stream: a binary file object
        os.fchmod(stream.fileno(), 0o600)
        stream.write(token.encode() + b"\n")

    try:
        atomic_write(path, write)
    except OSError as exc:
        raise ConfigError(f"{path}: --token-file: cannot write: {exc}") from exc
    return token, True


def presented(headers, query: dict[str, list[str]]) -> tuple[str | None, bool]:  # headers: the request's http headers
    """The token a request carries and whether it came in the query (then a cookie is set)."""
    if query.get("token"):
        return query["token"][0], True
    auth = headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[len("Bearer ") :].strip(), False
    try:
        cookie = SimpleCookie(headers.get("Cookie", ""))
    except CookieError:
        return None, False
    return (cookie[COOKIE].value if COOKIE in cookie else None), False


def matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison (the token is a secret)."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())
