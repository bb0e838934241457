"""A published dashboard: refused without its token, read-only, token created and printed once."""

from __future__ import annotations

import json
import stat
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from common.errors import FedSenseError
from server.viewer import access
from server.viewer.dashboard import DashboardServer, serve


def fetch(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_token_is_required_by_query_header_or_cookie(tmp_path: Path) -> None:
    token, created = access.load_or_create_token(tmp_path / "token")
    assert created and stat.S_IMODE((tmp_path / "token").stat().st_mode) == 0o600
    assert access.load_or_create_token(tmp_path / "token") == (token, False)
    server = DashboardServer(tmp_path / "run", "127.0.0.1", 0, token=token).start_background()
    try:
        base = server.url
        code, _, body = fetch(base + "api/config")
        assert code == 401 and "token" in json.loads(body)["error"]
        assert fetch(base + "api/config", Authorization="Bearer wrong")[0] == 401
        assert fetch(base + "api/config", Authorization=f"Bearer {token}")[0] == 200
        code, headers, _ = fetch(f"{base}?token={token}")
        assert code == 200 and headers["Set-Cookie"].startswith(f"{access.COOKIE}={token}; HttpOnly")
        assert fetch(base + "api/metrics", Cookie=f"{access.COOKIE}={token}")[0] == 200
        # Read-only: nothing but GET is served.
        post = urllib.request.Request(
            base + "api/config", data=b"{}", method="POST", headers={"Authorization": f"Bearer {token}"}
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(post, timeout=10)
        assert info.value.code == 501
    finally:
        server.stop()


def test_publishing_beyond_loopback_without_a_token_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FedSenseError, match="--token-file"):
        serve(tmp_path, host="0.0.0.0", port=0)
    assert access.is_loopback("127.0.0.1") and access.is_loopback("::1") and not access.is_loopback("0.0.0.0")
