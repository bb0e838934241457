"""``fedsense dashboard``: a local web page that follows a run live, without reloads.

Stdlib ``http.server`` only: the page (``static/dashboard.html``, inline JS/CSS, no CDN because
hospital networks are closed) polls a few JSON endpoints and draws its own SVG curves. The
server only ever reads the run directory, and serves a fixed set of routes (GET only), never
files by path, so there is nothing to traverse. Published beyond 127.0.0.1 it demands a token
(:mod:`server.viewer.access`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from common.errors import FedSenseError
from server.best import best_summary, export_command, read_best
from server.store import RunDir
from server.viewer import access
from server.viewer.plots import figure_png, samples_figure
from server.viewer.run_view import COLUMNS, load_run

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050


class DashboardServer(ThreadingHTTPServer):
    """The HTTP server of one run directory; renders sample PNGs once per samples file."""

    daemon_threads = True  # a browser holding a connection open must not block shutdown

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        token: str | None = None,
    ) -> None:
        super().__init__((host, port), _Handler)
        self.run_dir = Path(run_dir)
        self.token = token
        self.page = resources.files("server.viewer").joinpath("static/dashboard.html").read_bytes()
        self._png_cache: dict[tuple[str, int, str, str], bytes] = {}
        self._png_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where a browser reaches the page (the bound port, also when 0 was asked for)."""
        host, port = self.server_address[:2]
        assert isinstance(host, str)  # an AF_INET or AF_INET6 address
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{shown}:{port}/"

    def start_background(self) -> DashboardServer:
        """Serve from a daemon thread (for tests and embedding); returns ``self``; see :meth:`stop`."""
        # A short poll interval makes stop() quick; the cost is a few idle wake-ups per second.
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="fedsense-dashboard", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop a background server and release its socket."""
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def samples_png(self, site: str | None) -> bytes | None:
        """The latest samples as PNG (one site, or all); ``None`` if there are none (yet)."""
        samples = RunDir(self.run_dir).latest_samples()
        if samples is None or (site is not None and site not in samples.sites):
            return None
        try:
            stamp = samples.path.stat().st_mtime_ns
        except FileNotFoundError:  # the run directory was removed under us; render, don't cache
            return figure_png(samples_figure(samples, [site] if site else None))
        # The site list is in the key too: a file replaced between load and stat (a site added)
        # then gets a key that no later read of the new file reproduces, so nothing stale sticks.
        key = (str(samples.path), stamp, ",".join(samples.sites), site or "")
        with self._png_lock:
            if key not in self._png_cache:
                # Only the newest samples file is ever asked for again: drop the older renders.
                self._png_cache = {k: v for k, v in self._png_cache.items() if k[:3] == key[:3]}
                self._png_cache[key] = figure_png(samples_figure(samples, [site] if site else None))
            return self._png_cache[key]


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "FedSenseDashboard"

    def do_GET(self) -> None:  # http.server's naming
        url = urlsplit(self.path)
        self._cookie = ""
        if self.server.token is not None:
            given, in_query = access.presented(self.headers, parse_qs(url.query))
            if not access.matches(self.server.token, given):
                self._send_json(
                    {"error": "this dashboard needs its token (?token=... once, or Authorization: Bearer ...)"},
                    HTTPStatus.UNAUTHORIZED,
                )
                return
            if in_query:
                self._cookie = f"{access.COOKIE}={given}; HttpOnly; SameSite=Strict; Path=/"
        routes = {
            "/": self._page,
            "/index.html": self._page,
            "/api/metrics": self._metrics,
            "/api/config": self._config,
            "/api/samples": self._samples,
            "/api/samples/latest.png": self._samples_png,
            "/metrics": self._prometheus,
        }
        handler = routes.get(url.path)
        if handler is None:
            self._send_json({"error": "not found"}, HTTPStatus.NOT_FOUND)
            return
        try:
            handler(parse_qs(url.query))
        except FedSenseError as exc:  # e.g. a corrupt metrics line: show it on the page
            logger.warning("dashboard: %s", exc)
            self._send_json({"error": str(exc)}, HTTPStatus.INTERNAL_SERVER_ERROR)
        except Exception:
            logger.exception("dashboard: failed to serve %s", self.path)
            self._send_json({"error": "internal error, see the dashboard log"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _page(self, query: dict[str, list[str]]) -> None:
        self._send(self.server.page, "text/html; charset=utf-8")

    def _metrics(self, query: dict[str, list[str]]) -> None:
        view = load_run(self.server.run_dir, must_exist=False)
        self._send_json(
            {
                "columns": COLUMNS,
                "rows": view.rows(),
                "best": view.best,
                "self_supervised": sorted(view.self_supervised_sites()),
            }
        )

    def _prometheus(self, query: dict[str, list[str]]) -> None:
        from server.viewer.run_metrics import run_metrics_text  # only when Prometheus scrapes

        self._send(run_metrics_text(self.server.run_dir), "text/plain; version=0.0.4; charset=utf-8")

    def _config(self, query: dict[str, list[str]]) -> None:
        view = load_run(self.server.run_dir, must_exist=False, metrics=False)
        best = read_best(view.path) if view.path.is_dir() else None
        self._send_json(
            {
                "path": str(view.path),
                "label": view.label,
                "status": view.status if view.path.is_dir() else "waiting",
                "num_rounds": view.num_rounds,
                "config": view.config,
                "best": best,
                "best_summary": best_summary(best),
                "export_command": export_command(view.path, best),
            }
        )

    def _samples(self, query: dict[str, list[str]]) -> None:
        samples = RunDir(self.server.run_dir).latest_samples()
        if samples is None:
            self._send_json({"round": None, "sites": []})
        else:
            self._send_json({"round": samples.round, "sites": list(samples.sites)})

    def _samples_png(self, query: dict[str, list[str]]) -> None:
        site = query.get("site", [None])[0]
        png = self.server.samples_png(site)
        if png is None:
            self._send_json({"error": "no such samples"}, HTTPStatus.NOT_FOUND)
        else:
            self._send(png, "image/png")

    def _send_json(self, payload: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(json.dumps(payload, allow_nan=False).encode(), "application/json", status)

    def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # the page polls; stale data would lie
        self.send_header("X-Content-Type-Options", "nosniff")
        if getattr(self, "_cookie", ""):
            self.send_header("Set-Cookie", self._cookie)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # http.server's signature
        logger.debug("dashboard %s: " + format, self.address_string(), *args)


def serve(
    run_dir: str | os.PathLike[str],
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token_file: Path | None = None,
    wait: bool = False,
    metrics_port: int = 0,
    metrics_host: str = DEFAULT_HOST,
) -> None:
    """Serve the dashboard of ``run_dir`` until interrupted (blocking; Ctrl-C stops it).

    A missing directory is an error (a typo would otherwise wait for ever), unless ``wait``: then the
    page says "waiting" until the run starts (a dashboard started beside a run, as in compose). Beyond
    127.0.0.1 a ``token_file`` is required; its token is created and printed on first start only.
    ``metrics_port`` (0: none) adds a tokenless listener of the run's Prometheus gauges alone, for a
    Prometheus that should not hold the token (:mod:`server.viewer.run_metrics`).
    """
    if not wait and not Path(run_dir).is_dir():
        raise FedSenseError(
            f"{run_dir}: no such run directory (pass --wait to wait for a run that has not started yet)"
        )
    token = None
    if token_file is None and not access.is_loopback(host):
        raise FedSenseError(
            f"dashboard: --host {host}: published beyond this machine, the dashboard needs "
            "--token-file (a token is generated there at first start)"
        )
    if token_file is not None:
        token, created = access.load_or_create_token(Path(token_file))
        if created:
            # Printed once, to whoever started it (container logs: `docker compose logs dashboard`).
            print(
                f"dashboard token (shown once; kept in {token_file}): {token}\n"
                f"open http://HOST:PORT/?token={token} once; the browser keeps it as a cookie",
                flush=True,
            )
        else:
            logger.info("dashboard token: the one in %s", token_file)
    try:
        server = DashboardServer(run_dir, host, port, token=token)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise FedSenseError(
                f"dashboard: --port {port}: already in use on {host}; stop what uses it or choose another --port"
            ) from exc
        raise
    metrics = None
    if metrics_port:
        from server.viewer.run_metrics import serve_run_metrics

        try:
            metrics = serve_run_metrics(run_dir, metrics_port, metrics_host)
        except OSError as exc:
            server.server_close()
            raise FedSenseError(
                f"dashboard: --metrics-port {metrics_port}: cannot listen on {metrics_host}: {exc.strerror}"
            ) from exc
    with server:
        logger.info("dashboard of %s at %s", server.run_dir, server.url)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            logger.info("dashboard stopped")
        finally:
            if metrics is not None:
                metrics.shutdown()
                metrics.server_close()


def start(run_dir: str | os.PathLike[str], host: str = DEFAULT_HOST, port: int = 0) -> DashboardServer:
    """Start the dashboard in a background thread (port 0: a free one); ``.url``, ``.stop()``."""
    return DashboardServer(run_dir, host, port).start_background()
