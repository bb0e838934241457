"""Bad updates for real: the ServerApp against the real ClientApp, with one site's reply tampered with in transit.

``TamperingGrid`` (over ``bench.loopback``) is a Flower ``Grid`` that hands every message to the real
``client.app`` (one ``Context`` per site, as a SuperNode builds it), so the sites really train on their demo data;
it then lets a test corrupt one site's reply before the ServerApp sees it. The ServerApp's own
``main`` runs the round, so validation, aggregation, the metrics store and the checkpoint are the
product's. The check: the bad update is rejected with its reason recorded per site and round, and
the checkpointed global model is exactly the aggregate of the honest sites.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

import server.app
from bench.loopback import LoopbackGrid
from client.transport import RECORDS
from common.protocol import pack_content, unpack_content
from common.runconfig import RunConfig
from server.federation import RoundFailed
from server.receipts import RECEIVED_FILE, read_receipts
from server.store import GLOBAL_SITE, RunDir

MODEL_ARGS = {"chans": 4, "num_pool_layers": 2}
RUN_ID = 7
SERVER_NODE = 1

# (request, honest reply) -> the reply the server receives instead (None: the reply is lost)
Tamper = Callable[[Message, Message], Message | None]


def arrays_of(reply: Message) -> dict[str, np.ndarray]:
    """A reply's model weights as a fresh numpy dict."""
    return {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}


def forged(request: Message, reply: Message, arrays: dict[str, np.ndarray]) -> Message:
    """``reply`` with its weights replaced by ``arrays`` (metrics and site name kept)."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord(dict(reply.content["metrics"])),
            "site": ConfigRecord(dict(reply.content["site"])),
        }
    )
    return Message(content, reply_to=request)


def nan_weights(request: Message, reply: Message) -> Message:
    arrays = arrays_of(reply)
    first = next(iter(arrays))
    arrays[first].flat[0] = np.nan
    return forged(request, reply, arrays)


def missing_key(request: Message, reply: Message) -> Message:
    arrays = arrays_of(reply)
    arrays.pop(max(arrays))
    return forged(request, reply, arrays)


def extra_key(request: Message, reply: Message) -> Message:
    return forged(request, reply, {**arrays_of(reply), "backdoor.weight": np.ones(3, np.float32)})


def wrong_shape(request: Message, reply: Message) -> Message:
    arrays = arrays_of(reply)
    key = next(k for k, v in arrays.items() if v.ndim == 4)
    arrays[key] = arrays[key][:1].copy()
    return forged(request, reply, arrays)


def wrong_dtype(request: Message, reply: Message) -> Message:
    arrays = arrays_of(reply)
    key = next(iter(arrays))
    arrays[key] = arrays[key].astype(np.float64)
    return forged(request, reply, arrays)


def boosted(request: Message, reply: Message) -> Message:
    """A model-replacement attack: the site's update scaled up 1000x, every value still finite."""
    start = {k: v.numpy() for k, v in request.content["arrays"].items()}
    arrays = {k: start[k] + 1000.0 * (v - start[k]) for k, v in arrays_of(reply).items()}
    return forged(request, reply, arrays)


def crashed(request: Message, reply: Message) -> Message:
    """The site's ClientApp failed: Flower sends an error reply instead of the update."""
    return Message(Error(code=0, reason="ClientApp raised: out of memory"), reply_to=request)


def lost(request: Message, reply: Message) -> None:
    """The reply never arrives (a site that hangs, or a network that drops it)."""


class TamperingGrid(LoopbackGrid):
    """The loopback grid, with some sites' training replies replaced.

    ``tamper`` maps ``(round, site)`` to what replaces that site's training reply; the honest training
    replies the server received are kept in ``received`` per round. A lost reply is never pulled, so the
    server's own collection waits out the real ``round-timeout``.
    """

    def __init__(self, sites: list[Path], run_config: dict[str, Any], tamper: dict[tuple[int, str], Tamper]) -> None:
        super().__init__(sites, run_config, RUN_ID)
        self.tamper = tamper
        self.received: dict[int, dict[str, Message]] = {}

    def deliver(self, request: Message) -> Message | None:
        reply: Message | None = super().deliver(request)
        assert reply is not None
        if reply.has_content():  # packed at the site (client.transport): tampered and kept unpacked
            reply.content = unpack_content(reply.content, RECORDS)
        rnd = int(request.content["config"]["server-round"])
        site = str(reply.content["site"]["name"]) if reply.has_content() else ""
        if request.metadata.message_type == MessageType.TRAIN:
            if (rnd, site) in self.tamper:
                reply = self.tamper[(rnd, site)](request, reply)
            else:
                self.received.setdefault(rnd, {})[site] = copy.deepcopy(reply)
        if reply is not None:
            if reply.has_content() and reply.content.array_records:
                reply.content = pack_content(reply.content, RECORDS)  # on the wire, as the site sends it
            # As the SuperNode stamps its reply (an error reply, which has no content to hash, by its request).
            reply_id = reply.object_id if reply.has_content() else f"error-{request.metadata.message_id}"
            reply.metadata.__dict__["_message_id"] = reply_id
        return reply


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are stamped with the sending task's identity; here that is the ServerApp's."""
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SERVER_NODE)


def run_serverapp(
    sites: list[Path], run_dir: Path, tamper: dict[tuple[int, str], Tamper], rounds: int = 1, **extra: object
) -> tuple[TamperingGrid, RunDir]:
    """The real ServerApp ``main`` for ``rounds`` training rounds (no federated evaluation)."""
    run = RunConfig.from_flat(
        {
            "name": "bad-updates",
            "num-server-rounds": rounds,
            "strategy": "fedavg",
            "model-args": json.dumps(MODEL_ARGS),
            "local-steps": 1,
            "batch-size": 1,
            "learning-rate": 1e-2,
            "fraction-evaluate": 0.0,
            "min-train-nodes": 2,
            "min-available-nodes": len(sites),
            "round-timeout": 60.0,
            "node-wait-timeout": 5.0,
            "run-dir": str(run_dir),
            "resume": False,
            **extra,
        }
    )
    grid = TamperingGrid(sites, run.to_flat(), tamper)
    server.app.main(grid, Context(RUN_ID, SERVER_NODE, {}, RecordDict(), run.to_flat()))
    return grid, RunDir(run_dir)


def train_summary(store: RunDir, rnd: int) -> dict[str, Any]:
    return next(
        r for r in store.read_metrics() if r["round"] == rnd and r["phase"] == "train" and r["site"] == GLOBAL_SITE
    )


def weighted_mean(replies: Iterable[Message]) -> dict[str, np.ndarray]:
    """FedAvg computed independently: the num-examples-weighted mean, in float64."""
    replies = list(replies)
    weights = np.array([float(r.content["metrics"]["num-examples"]) for r in replies])
    stacks = [arrays_of(r) for r in replies]
    return {k: sum(w * s[k].astype(np.float64) for w, s in zip(weights, stacks)) / weights.sum() for k in stacks[0]}


def checkpoint(store: RunDir, rnd: int) -> dict[str, np.ndarray]:
    payload = torch.load(store.checkpoint_path(rnd), map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in payload["state_dict"].items()}


@pytest.mark.parametrize(
    ("tamper", "reason", "extra"),
    [
        (nan_weights, "non-finite values", {}),
        (missing_key, "wrong keys (missing", {}),
        (extra_key, "unexpected ['backdoor.weight']", {}),
        (wrong_shape, "shape (1,", {}),
        (wrong_dtype, "dtype float64 != float32", {}),
        (boosted, "x median", {"norm-outlier-factor": 5.0}),
    ],
)
def test_a_bad_update_is_rejected_and_leaves_the_global_model_to_the_honest_sites(
    small_sites: list[Path], tmp_path: Path, tamper: Tamper, reason: str, extra: dict[str, object]
) -> None:
    grid, store = run_serverapp(small_sites, tmp_path / "run", {(1, "site-c"): tamper}, **extra)
    honest = grid.received[1]
    assert sorted(honest) == ["site-a", "site-b"]
    summary = train_summary(store, 1)
    assert summary["sites"] == ["site-a", "site-b"]
    assert len(summary["rejected"]) == 1 and summary["rejected"][0]["site"] == "site-c"
    assert reason in summary["rejected"][0]["reason"]
    assert {r["site"] for r in store.read_metrics() if r["round"] == 1} == {"site-a", "site-b", GLOBAL_SITE}
    expected, got = weighted_mean(honest.values()), checkpoint(store, 1)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert store.read_config()["status"] == "finished"


def test_the_boosted_update_would_have_moved_the_model_without_the_norm_check(
    small_sites: list[Path], tmp_path: Path
) -> None:
    """The control for the norm test: with the check off the same attack is aggregated and dominates."""
    grid, store = run_serverapp(small_sites, tmp_path / "run", {(1, "site-c"): boosted})
    assert train_summary(store, 1)["rejected"] == []
    expected, got = weighted_mean(grid.received[1].values()), checkpoint(store, 1)
    assert max(float(np.abs(got[k] - expected[k]).max()) for k in expected) > 1e-2


def test_rejections_are_recorded_per_site_and_round(small_sites: list[Path], tmp_path: Path) -> None:
    tamper = {(1, "site-c"): nan_weights, (2, "site-a"): wrong_shape, (3, "site-b"): crashed, (4, "site-c"): lost}
    grid, store = run_serverapp(small_sites, tmp_path / "run", tamper, rounds=4, **{"round-timeout": 2.0})
    node = {Path(str(c.node_config["site-config"])).stem: n for n, c in grid.contexts.items()}
    rejected = {rnd: train_summary(store, rnd)["rejected"] for rnd in (1, 2, 3, 4)}
    assert [r["site"] for r in rejected[1]] == ["site-c"] and "non-finite" in rejected[1][0]["reason"]
    assert [r["site"] for r in rejected[2]] == ["site-a"] and "shape" in rejected[2][0]["reason"]
    # A crashed or silent site sends no name: the record names its node, and what happened.
    assert rejected[3] == [{"site": f"node-{node['site-b']}", "reason": "error reply: ClientApp raised: out of memory"}]
    assert rejected[4] == [{"site": f"node-{node['site-c']}", "reason": "no reply within round-timeout (2 s)"}]
    # The ledger of replies (server.receipts) names the same: the error reply received, the silence.
    refused = {
        (r["round"], r["site"], r["reason"])
        for r in read_receipts(store.path / RECEIVED_FILE)
        if r["round"] in (3, 4) and not r["accepted"]
    }
    assert refused == {
        (3, f"node-{node['site-b']}", "error reply: ClientApp raised: out of memory"),
        (4, f"node-{node['site-c']}", "no reply"),
    }
    # The server waited out round-timeout for the lost reply before closing the round.
    assert train_summary(store, 4)["seconds"] >= 2.0
    assert [train_summary(store, rnd)["sites"] for rnd in (1, 2, 3, 4)] == [
        ["site-a", "site-b"],
        ["site-b", "site-c"],
        ["site-a", "site-c"],
        ["site-a", "site-b"],
    ]
    assert store.latest_checkpoint()[0] == 4


def test_too_many_bad_updates_fail_the_round_with_the_reasons(small_sites: list[Path], tmp_path: Path) -> None:
    tamper = {(1, "site-b"): nan_weights, (1, "site-c"): wrong_dtype}
    with pytest.raises(RoundFailed, match=r"round 1: 1 valid updates, 2 needed"):
        run_serverapp(small_sites, tmp_path / "run", tamper)
    config = RunDir(tmp_path / "run").read_config()
    assert config["status"] == "failed"
    error = config["status_detail"]["error"]
    assert "site-b: " in error and "non-finite" in error and "site-c: " in error and "dtype" in error
    assert not RunDir(tmp_path / "run").checkpoint_path(1).exists()


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg"])
def test_robust_aggregation_keeps_a_finite_outlier_inside_the_honest_range(
    small_sites: list[Path], tmp_path: Path, strategy: str
) -> None:
    """Validation passes the boosted update (norm check off); the robust aggregate still ignores it."""
    grid, store = run_serverapp(
        small_sites, tmp_path / "run", {(1, "site-c"): boosted}, strategy=strategy, **{"trim-beta": 0.34}
    )
    assert train_summary(store, 1)["sites"] == ["site-a", "site-b", "site-c"]
    honest = [arrays_of(m) for m in grid.received[1].values()]
    got = checkpoint(store, 1)
    for key in got:
        low = np.minimum(honest[0][key], honest[1][key])
        high = np.maximum(honest[0][key], honest[1][key])
        assert np.all(got[key] >= low - 1e-6) and np.all(got[key] <= high + 1e-6), key


def test_a_site_whose_clientapp_fails_tells_the_server_only_the_error_type(
    small_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The privacy boundary holds for failures too: no site path or traceback travels, and it is audited."""
    broken = tmp_path / "site-x.toml"
    broken.write_text(
        small_sites[0]
        .read_text(encoding="utf-8")
        .replace('name = "site-a"', 'name = "site-x"')
        .replace(str(small_sites[0].parent / "data" / "site-a"), str(tmp_path / "gone"))
    )
    audit = tmp_path / "egress.jsonl"
    monkeypatch.setenv("FEDSENSE_AUDIT_LOG", str(audit))
    grid, store = run_serverapp([*small_sites, broken], tmp_path / "run", {})
    node = next(n for n, c in grid.contexts.items() if c.node_config["site-config"] == str(broken))
    assert train_summary(store, 1)["rejected"] == [
        {"site": f"node-{node}", "reason": "error reply: DataError at the site (details in the site's log)"}
    ]
    assert str(tmp_path) not in store.metrics_path.read_text()
    errors = [json.loads(line) for line in audit.read_text().splitlines() if "error" in json.loads(line)]
    assert errors == [
        {"time": errors[0]["time"], "type": "train", "error": "DataError at the site (details in the site's log)"}
    ]
