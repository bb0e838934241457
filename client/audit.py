"""Egress audit: a record of everything this site sends, for the hospital's data-protection officer.

A Flower client mod sees every reply the ClientApp produces before it leaves the site. When the
node config names an ``audit-log`` file (or ``FEDSENSE_AUDIT_LOG`` is set), one JSON line per
message is appended to it: its type, each ArrayRecord's array names, shapes and dtypes, each
MetricRecord's values and each ConfigRecord's values. The arrays themselves are not copied.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

logger = logging.getLogger(__name__)


def describe(msg: Message) -> dict[str, Any]:
    """What a message carries, structurally (names, shapes, dtypes, scalar values)."""
    entry: dict[str, Any] = {"time": time.time(), "type": msg.metadata.message_type}
    if msg.has_error():
        entry["error"] = msg.error.reason
        return entry
    content = msg.content
    entry["arrays"] = {
        name: {k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in record.items()}
        for name, record in content.array_records.items()
    }
    entry["metrics"] = {name: dict(record) for name, record in content.metric_records.items()}
    entry["configs"] = {
        name: {k: _brief(v) for k, v in record.items()} for name, record in content.config_records.items()
    }
    return entry


def _brief(value: Any) -> Any:
    """A config value as logged: bytes (SecAgg+'s masked vectors, keys, shares) as their size, not their content."""
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return {"bytes": [len(v) for v in value]}
    return value


def audit_log_path(context: Context) -> Path | None:
    """The audit log this node writes, if any (node config wins over the environment)."""
    value = context.node_config.get("audit-log") or os.environ.get("FEDSENSE_AUDIT_LOG")
    return Path(str(value)) if value else None


def egress_audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the ClientApp, then log what its reply carries before Flower sends it.

    A ClientApp exception becomes an error reply that names only the exception's type: left to
    Flower, the exception's text and traceback (site file paths included) would go to the server,
    unaudited. The details stay in this site's log.
    """
    try:
        reply = call_next(msg, context)
    except Exception as exc:
        logger.exception("the ClientApp failed; the server is told only: %s", type(exc).__name__)
        reason = f"{type(exc).__name__} at the site (details in the site's log)"
        reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
    path = audit_log_path(context)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(describe(reply), default=str) + "\n")
    return reply
