"""The wire's names are written once, in ``common.protocol``: the modules a message passes through import them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from common import protocol

ROOT = Path(__file__).resolve().parents[1]

#: Where the ServerApp and the ClientApp build, read or route a message's records.
MESSAGE_PATH = (
    "client/app.py",
    "client/privacy.py",
    "client/scaffold.py",
    "client/secagg.py",
    "client/transport.py",
    "server/claims.py",
    "server/collect.py",
    "server/federation.py",
    "server/pace.py",
    "server/round_state.py",
    "server/scaffold.py",
    "server/secagg.py",
    "server/strategy.py",
    "server/tracking/prometheus.py",
    "server/transport.py",
)

#: Every name of the protocol that cannot be mistaken for a plain word (``num-examples``, ``scaffold.c``, ``eval/``):
#: plain ones (``arrays``, ``site``, ``steps``) also name unrelated things, such as a metrics record's fields.
KEYS = {
    value: name
    for name, value in vars(protocol).items()
    if name.isupper() and isinstance(value, str) and any(c in value for c in "-./")
}


def test_the_protocol_names_keys_that_are_not_plain_words() -> None:
    assert {"num-examples", "server-round", "fedsense-keys", "eval/"} <= set(KEYS)


@pytest.mark.parametrize("path", MESSAGE_PATH)
def test_no_module_on_the_message_path_types_a_protocol_key(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"), path)
    typed = [
        f"{path}:{node.lineno}: {node.value!r} is common.protocol.{KEYS[node.value]}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in KEYS
    ]
    assert not typed, "\n".join(typed)
