"""Who a reply is from: the site whose key the SuperNode authenticated with, not the name it reports.

A reply carries its site's name (``content["site"]["name"]``), and per-site caps and records are keyed
by that name; on its own it is only a claim, so one site could take another's name and its cap. With
SuperNode authentication (``--enable-supernode-auth``) the SuperLink knows each node's public key
(``Grid.get_nodes()`` -> ``NodeInfo.public_key``); ``fedsense pki`` writes ``site-keys.json`` (key
fingerprint -> site) next to the key pairs it provisions. Given that file (run config ``site-keys``),
a reply whose reported name differs from the site its node's key was registered for, or from a node
whose key is not in the file, is rejected with the reason. Without it (insecure local runs, the
simulation) the only check is that no two nodes report the same site in one phase.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from flwr.app import Message
from flwr.serverapp import Grid

from common.errors import ConfigError
from server.pki import key_fingerprint
from server.strategy import Rejection, site_of

logger = logging.getLogger(__name__)


def load_site_keys(path: str | Path) -> dict[str, str]:
    """Read a ``site-keys.json``; errors name the file and what is wrong in it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"site-keys: {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"site-keys: {path}: not JSON: {exc}") from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and k.startswith("sha256:") and isinstance(v, str) and v for k, v in data.items()
    ):
        raise ConfigError(f"site-keys: {path}: expected an object of 'sha256:...' key fingerprints -> site names")
    return dict(data)


class SiteIdentity:
    """Checks each reply's reported site against the site its node's key was registered for."""

    def __init__(self, site_keys: Mapping[str, str]) -> None:
        self.site_keys = dict(site_keys)
        #: Node id -> the site its key is registered for (None: a key not in ``site-keys``).
        self.nodes: dict[int, str | None] = {}

    @classmethod
    def from_file(cls, path: str) -> SiteIdentity:
        """From the run config's ``site-keys`` (empty: names are not bound to keys)."""
        return cls(load_site_keys(path) if path else {})

    @property
    def bound(self) -> bool:
        return bool(self.site_keys)

    def refresh(self, grid: Grid) -> None:
        """Learn the keys of the nodes connected now (a restarted site comes back as a new node)."""
        if not self.bound:
            return
        for node in grid.get_nodes():
            try:
                fingerprint = key_fingerprint(bytes(node.public_key))
            except ValueError:
                fingerprint = ""
            self.nodes[int(node.node_id)] = self.site_keys.get(fingerprint)

    def check(self, replies: list[Message]) -> tuple[list[Message], list[Rejection]]:
        """Split replies into those from the site they name and those rejected (logged with the reason)."""
        kept, rejected = [], []
        for msg in replies:
            reason = self._mismatch(msg)
            if reason:
                rejected.append(Rejection(site_of(msg), reason, msg.metadata.message_id))
            else:
                kept.append(msg)
        # Unbound (or two nodes with one key, which the SuperLink does not allow): one name per phase.
        twice = {name for name, n in Counter(site_of(m) for m in kept).items() if n > 1}
        for msg in [m for m in kept if site_of(m) in twice]:
            kept.remove(msg)
            nodes = sorted(m.metadata.src_node_id for m in replies if site_of(m) == site_of(msg))
            rejected.append(
                Rejection(
                    site_of(msg),
                    f"site name reported by {len(nodes)} nodes ({nodes}) in one phase",
                    msg.metadata.message_id,
                )
            )
        for r in rejected:
            logger.warning("rejected reply from %s: %s", r.site, r.reason)
        return kept, rejected

    def _mismatch(self, msg: Message) -> str:
        if not self.bound:
            return ""
        node = msg.metadata.src_node_id
        if node not in self.nodes:
            return f"node {node} is not connected with a known key"
        registered = self.nodes[node]
        if registered is None:
            return f"node {node}'s key is not registered to any site (site-keys)"
        if site_of(msg) != registered:
            return f"reports site {site_of(msg)!r} but node {node}'s key is registered to {registered!r}"
        return ""
