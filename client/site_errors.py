"""A site's errors name the site: the site config's path in front of a FedSense error that lacks it.

In a simulation every site logs into one flower.log, under a Ray worker's pid, not a site. An error that
names a data file is traced to its site by the file's folder (``server/site_errors.py``), but one about
the site's settings ("mask: acceleration: ... not reachable on (32, 32)") names no file; with the config
path in front, the simulate screen can say which site said it. Only the site's own log sees the text:
the server is told the exception's type (``client/audit.py``).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from client.node_site import resolve_site_config_path
from common.errors import FedSenseError
from common.runconfig import RunConfig


def _site_config(context: Context) -> str | None:
    """The path of the site config this node serves; None when that is itself what is wrong."""
    try:
        return str(resolve_site_config_path(context.node_config, RunConfig.from_flat(dict(context.run_config))))
    except (FedSenseError, ValueError):
        return None


def site_named_errors_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the handler; a :class:`FedSenseError` that does not name the site config is raised again with it."""
    try:
        return call_next(msg, context)
    except FedSenseError as exc:
        site = _site_config(context)
        if site is None or site in str(exc):
            raise
        # The original frames, one error line: a chained cause would log the unnamed text as well.
        raise type(exc)(f"{site}: {exc}").with_traceback(exc.__traceback__) from None
