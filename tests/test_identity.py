"""Identity bound to the key: a reply counts for the site its node's key was registered for, not the name it reports.

The ServerApp runs for real against the real ClientApps (``LoopbackGrid``); the grid also answers
``get_nodes()`` with each node's public key as the SuperLink stores it (PEM), from key pairs made by
``fedsense pki``, whose ``site-keys.json`` the run config names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

import server.app
from common.errors import ConfigError
from common.runconfig import RunConfig
from server.identity import SiteIdentity, load_site_keys
from server.pki import SITE_KEYS_FILE, generate_pki, key_fingerprint, rotate_site_key
from server.receipts import read_receipts
from server.store import GLOBAL_SITE, RunDir
from test_reliability_updates import TamperingGrid, _task_identity, train_summary  # noqa: F401 (fixture)

MODEL_ARGS = {"chans": 4, "num_pool_layers": 2}


def pem_of(pub_file: Path) -> bytes:
    """The key as the SuperLink stores a node's key (PEM SubjectPublicKeyInfo), from its OpenSSH ``.pub``."""
    key = serialization.load_ssh_public_key(pub_file.read_bytes())
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_one_key_has_one_fingerprint_in_openssh_and_pem(tmp_path: Path) -> None:
    pki = generate_pki(tmp_path, sites=["site-a", "site-b"])
    a, b = pki.sites["site-a"].public_key, pki.sites["site-b"].public_key
    assert key_fingerprint(a.read_bytes()) == key_fingerprint(pem_of(a)) != key_fingerprint(pem_of(b))
    assert load_site_keys(tmp_path / SITE_KEYS_FILE) == {
        key_fingerprint(a.read_bytes()): "site-a",
        key_fingerprint(b.read_bytes()): "site-b",
    }
    old = key_fingerprint(a.read_bytes())
    rotate_site_key(tmp_path, "site-a")  # the retired key no longer speaks for site-a
    keys = load_site_keys(tmp_path / SITE_KEYS_FILE)
    assert old not in keys and keys[key_fingerprint(pki.sites["site-a"].public_key.read_bytes())] == "site-a"


def test_a_bad_site_keys_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"site-keys: .*missing\.json"):
        load_site_keys(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"site-a": "abc"}))
    with pytest.raises(ConfigError, match=r"bad\.json: expected an object of 'sha256:"):
        load_site_keys(bad)
    with pytest.raises(ValueError, match="not a PEM or OpenSSH public key"):
        key_fingerprint(b"hello")


def reply(node: int, site: str) -> Message:
    msg = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 4}), "site": ConfigRecord({"name": site})}),
        dst_node_id=node,
        message_type="train",
    )
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def test_without_keys_two_nodes_may_not_report_one_site() -> None:
    identity = SiteIdentity({})
    kept, rejected = identity.check([reply(1, "site-a"), reply(2, "site-a"), reply(3, "site-b")])
    assert [m.metadata.src_node_id for m in kept] == [3]
    assert [(r.site, r.reason) for r in rejected] == [
        ("site-a", "site name reported by 2 nodes ([1, 2]) in one phase")
    ] * 2


class KeyedGrid(TamperingGrid):
    """A TamperingGrid whose nodes authenticated with keys (``keys``: node id -> PEM), as ``get_nodes`` reports."""

    def __init__(self, *args: Any, keys: dict[int, bytes], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keys = keys

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=self.keys.get(n, b"")) for n in self.contexts]


def claims(name: str):  # returns a Tamper
    """The site's honest update, sent under another site's name."""

    def tamper(request: Message, honest: Message) -> Message:
        content = RecordDict(
            {
                "arrays": ArrayRecord(dict(honest.content["arrays"])),
                "metrics": MetricRecord(dict(honest.content["metrics"])),
                "site": ConfigRecord({**dict(honest.content["site"]), "name": name}),
            }
        )
        return Message(content, reply_to=request)

    return tamper


def run_keyed(sites: list[Path], tmp_path: Path, tamper: dict, keys_for: dict[str, str], **extra: object):
    """The real ServerApp ``main`` with site-keys on; node ``100+i`` holds the key of ``keys_for[site i]``."""
    pki = generate_pki(tmp_path / "pki", sites=sorted(set(keys_for.values())))
    run = RunConfig.from_flat(
        {
            "name": "identity",
            "num-server-rounds": 1,
            "strategy": "fedavg",
            "model-args": json.dumps(MODEL_ARGS),
            "local-steps": 1,
            "batch-size": 1,
            "fraction-evaluate": 0.0,
            "min-train-nodes": 1,
            "min-available-nodes": len(sites),
            "round-timeout": 60.0,
            "node-wait-timeout": 5.0,
            "run-dir": str(tmp_path / "run"),
            "resume": False,
            "site-keys": str(tmp_path / "pki" / SITE_KEYS_FILE),
            **extra,
        }
    )
    keys = {100 + i: pem_of(pki.sites[keys_for[p.stem]].public_key) for i, p in enumerate(sites) if p.stem in keys_for}
    grid = KeyedGrid(sites, run.to_flat(), tamper, keys=keys)
    server.app.main(grid, Context(7, 1, {}, RecordDict(), run.to_flat()))
    return grid, RunDir(tmp_path / "run")


def test_a_site_claiming_another_sites_name_is_refused_and_its_cap_not_taken(
    small_sites: list[Path], tmp_path: Path
) -> None:
    caps = {"site-a": 1000, "site-b": 2, "site-c": 3}
    keys_for = {"site-a": "site-a", "site-b": "site-b"}  # site-c's node has a key that is not registered
    _, store = run_keyed(
        small_sites, tmp_path, {(1, "site-b"): claims("site-a")}, keys_for, **{"site-caps": json.dumps(caps)}
    )
    summary = train_summary(store, 1)
    assert summary["sites"] == ["site-a"]
    rejected = {r["reason"] for r in summary["rejected"]}
    assert rejected == {
        "reports site 'site-a' but node 101's key is registered to 'site-b'",
        "node 102's key is not registered to any site (site-keys)",
    }
    receipts = read_receipts(store.path / "received.jsonl")
    assert sorted((r["site"], r["node"], r["accepted"]) for r in receipts) == [
        ("site-a", 100, True),
        ("site-a", 101, False),
        ("site-c", 102, False),
    ]
    # The impostor's weight never reached the aggregate: site-a alone, at its own claim.
    assert [r["site"] for r in store.read_metrics() if r["site"] != GLOBAL_SITE] == ["site-a"]


def test_evaluation_num_examples_are_capped_like_training(small_sites: list[Path], tmp_path: Path) -> None:
    caps = {"site-a": 1, "site-b": 2, "site-c": 3}
    keys_for = {p.stem: p.stem for p in small_sites}
    _, store = run_keyed(
        small_sites,
        tmp_path,
        {},
        keys_for,
        **{"site-caps": json.dumps(caps), "fraction-evaluate": 1.0, "min-evaluate-nodes": 3},
    )
    evaluated = [r for r in store.read_metrics() if r["phase"] == "evaluate" and r["site"] != GLOBAL_SITE]
    assert {r["round"] for r in evaluated} == {0, 1}
    assert all(r["num_examples"] == caps[r["site"]] for r in evaluated), evaluated
    summaries = [r for r in store.read_metrics() if r["phase"] == "evaluate" and r["site"] == GLOBAL_SITE]
    for summary in summaries:
        assert {c["site"]: c["cap"] for c in summary["clipped"]} == caps
        mine = [r for r in evaluated if r["round"] == summary["round"]]
        psnr = sum(caps[r["site"]] * r["metrics"]["psnr"] for r in mine) / sum(caps.values())
        assert summary["metrics"]["psnr"] == pytest.approx(psnr)
