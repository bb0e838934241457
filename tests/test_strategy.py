"""Update validation and example-weighted aggregation, on hand-built Flower reply messages."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.runconfig import RunConfig
from server.federation import Federation
from server.strategy import build_strategy, site_of, validate_updates


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Messages need a run/task identity; outside a Flower process there is none (restored afterwards).
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


GLOBAL = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


def reply(node: int, site: str, arrays: dict[str, np.ndarray], n: int = 10) -> Message:
    ask = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": n, "loss": 1.0}),
            "site": ConfigRecord({"name": site}),
        }
    )
    return Message(content=content, reply_to=ask)


def shifted(delta: float) -> dict[str, np.ndarray]:
    return {k: v + np.float32(delta) for k, v in GLOBAL.items()}


def global_record() -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})


def test_valid_updates_pass_and_site_names_are_read() -> None:
    replies = [reply(1, "a", shifted(0.1)), reply(2, "b", shifted(-0.1))]
    ok, rejected = validate_updates(replies, global_record())
    assert [site_of(m) for m in ok] == ["a", "b"] and rejected == []


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"w": np.full((3, 2), np.nan, np.float32), "b": np.zeros(2, np.float32)}, "non-finite"),
        ({"w": np.zeros((3, 2), np.float32)}, "wrong keys"),
        ({"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}, "shape"),
        ({"w": np.zeros((3, 2), np.float64), "b": np.zeros(2, np.float32)}, "dtype"),
        ({"w": np.full((3, 2), np.inf, np.float32), "b": np.zeros(2, np.float32)}, "non-finite"),
    ],
)
def test_bad_updates_are_rejected_with_reason(bad: dict[str, np.ndarray], reason: str) -> None:
    replies = [reply(1, "good", shifted(0.1)), reply(2, "evil", bad)]
    ok, rejected = validate_updates(replies, global_record())
    assert [site_of(m) for m in ok] == ["good"]
    assert len(rejected) == 1 and rejected[0].site == "evil" and reason in rejected[0].reason


def test_error_replies_and_bad_num_examples_are_rejected() -> None:
    ask = Message(content=RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    failed = Message(Error(code=1, reason="site crashed"), reply_to=ask)
    zero = reply(3, "empty", shifted(0.0), n=0)
    ok, rejected = validate_updates([failed, zero, reply(1, "a", shifted(0.1))], global_record())
    assert len(ok) == 1
    reasons = {r.site: r.reason for r in rejected}
    assert "site crashed" in reasons["node-5"] and "num-examples" in reasons["empty"]


def test_norm_outliers_are_rejected_only_when_enabled() -> None:
    replies = [reply(i, f"s{i}", shifted(0.1 * (1 + 0.1 * i))) for i in range(1, 4)]
    replies.append(reply(9, "outlier", shifted(50.0)))
    ok, rejected = validate_updates(replies, global_record(), norm_outlier_factor=3.0)
    assert {site_of(m) for m in ok} == {"s1", "s2", "s3"}
    assert rejected[0].site == "outlier" and "median" in rejected[0].reason
    ok_all, none = validate_updates(replies, global_record(), norm_outlier_factor=0.0)
    assert len(ok_all) == 4 and none == []


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_aggregation_is_weighted_by_num_examples(strategy: str) -> None:
    run = RunConfig(strategy=strategy, proximal_mu=0.1, min_train_nodes=1, min_available_nodes=1)
    replies = [reply(1, "small", shifted(1.0), n=1), reply(2, "big", shifted(4.0), n=3)]
    arrays, metrics = build_strategy(run).aggregate_train(1, replies)
    expected = (1 * 1.0 + 3 * 4.0) / 4  # independent: hand-computed weighted mean
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((3, 2), expected), rtol=1e-6)
    assert metrics["loss"] == pytest.approx(1.0)


def test_robust_strategies_resist_one_extreme_update() -> None:
    for name in ("fedmedian", "fedtrimmedavg"):
        # Fresh replies each time: Flower's FedMedian consumes the arrays of the replies it reads.
        replies = [reply(i, f"s{i}", shifted(1.0), n=5) for i in range(1, 4)] + [reply(9, "x", shifted(1000.0), n=5)]
        run = RunConfig(strategy=name, trim_beta=0.25, min_train_nodes=1, min_available_nodes=1)
        arrays, _ = build_strategy(run).aggregate_train(1, replies)
        assert np.allclose(arrays["w"].numpy(), 1.0), name


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("fedprox", 0.05),
        ("fedavg", 0.0),
        ("fedmedian", 0.0),
        ("fedtrimmedavg", 0.0),
        ("fedadam", 0.0),
        ("fedavgm", 0.0),
    ],
)
def test_only_fedprox_sends_a_proximal_term(strategy: str, expected: float) -> None:
    """The rule has one owner (RunConfig.proximal_term_mu); what the sites receive is what it says."""
    run = RunConfig(strategy=strategy, proximal_mu=0.05, min_train_nodes=1, min_available_nodes=1)
    assert run.proximal_term_mu == expected
    config = Federation(None, run, build_strategy(run), None, None)._train_config(1)  # type: ignore[arg-type]
    msgs = build_strategy(run).configure_train(1, global_record(), config, _OneNodeGrid())
    assert [float(m.content["config"]["proximal-mu"]) for m in msgs] == [expected]


class _OneNodeGrid:
    """Just enough of a Grid for a strategy to configure one training message."""

    def get_node_ids(self) -> list[int]:
        return [7]
