"""Server optimisers (FedAdam, FedYogi, FedAdagrad, FedAvgM): hand-computed steps, dtypes, resumable state."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.runconfig import RunConfig
from server.optimisers import SERVER_OPTIMISERS, load_optimiser_state, optimiser_state
from server.strategy import build_strategy


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


class TwoNodes:
    """The part of a Flower Grid the strategies' sampling uses."""

    def get_node_ids(self) -> list[int]:
        return [1, 2]


RNG = np.random.default_rng(0)
# "s": a 0-d parameter, like the unrolled network's data-consistency weights.
START = {
    "w": RNG.standard_normal((3, 2)).astype(np.float32),
    "b": RNG.standard_normal(2).astype(np.float32),
    "s": np.array(0.3, dtype=np.float32),
}


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in arrays.items()})


def reply(arrays: dict[str, np.ndarray], n: int) -> Message:
    ask = Message(content=RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": record(arrays), "metrics": MetricRecord({"num-examples": n})})
    return Message(content=content, reply_to=ask)


def site_updates(current: dict[str, np.ndarray], rnd: int) -> list[tuple[dict[str, np.ndarray], int]]:
    """Two sites' locally trained weights (deterministic per round), with their example counts."""
    rng = np.random.default_rng(rnd)
    return [
        ({k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in current.items()}, n) for n in (3, 9)
    ]


def server_round(strategy, rnd: int, current: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    list(strategy.configure_train(rnd, record(current), ConfigRecord(), TwoNodes()))
    replies = [reply(a, n) for a, n in site_updates(current, rnd)]
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return {k: a.numpy() for k, a in arrays.items()}


def weighted_delta(current: dict[str, np.ndarray], rnd: int) -> dict[str, np.ndarray]:
    ups = site_updates(current, rnd)
    total = sum(n for _, n in ups)
    return {k: sum(n * (a[k].astype(np.float64) - current[k]) for a, n in ups) / total for k in current}


def run_config(strategy: str, **extra: object) -> RunConfig:
    return RunConfig.from_flat({"strategy": strategy, "proximal-mu": 0.0, **extra})


def test_fedadam_is_adam_on_the_averaged_pseudo_gradient() -> None:
    eta, b1, b2, tau = 0.05, 0.8, 0.95, 1e-3
    strategy = build_strategy(
        run_config("fedadam", **{"server-eta": eta, "server-beta-1": b1, "server-beta-2": b2, "server-tau": tau})
    )
    x = {k: v.astype(np.float64) for k, v in START.items()}
    current = dict(START)
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.zeros_like(a) for k, a in x.items()}
    for rnd in (1, 2, 3):
        delta = weighted_delta(current, rnd)  # = minus the pseudo-gradient
        got = server_round(strategy, rnd, current)
        t = rnd + 1  # Flower numbers Adam's steps from server_round + 1
        step = eta * np.sqrt(1 - b2**t) / (1 - b1**t)
        for k in x:
            m[k] = b1 * m[k] + (1 - b1) * delta[k]
            v[k] = b2 * v[k] + (1 - b2) * delta[k] ** 2
            x[k] = current[k] + step * m[k] / (np.sqrt(v[k]) + tau)
            assert got[k].dtype == np.float32
            np.testing.assert_allclose(got[k], x[k], rtol=1e-5, atol=1e-6)
        current = got


def test_fedavgm_is_sgd_with_momentum_on_the_averaged_pseudo_gradient() -> None:
    lr, beta = 0.7, 0.5
    strategy = build_strategy(run_config("fedavgm", **{"server-learning-rate": lr, "server-momentum": beta}))
    current, buf = dict(START), None
    for rnd in (1, 2, 3):
        grad = {k: -d for k, d in weighted_delta(current, rnd).items()}
        buf = grad if buf is None else {k: beta * buf[k] + grad[k] for k in grad}
        expected = {k: current[k] - lr * buf[k] for k in grad}
        got = server_round(strategy, rnd, current)
        for k in grad:
            assert got[k].dtype == np.float32 and got[k].shape == START[k].shape
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)
        current = got


@pytest.mark.parametrize("name", SERVER_OPTIMISERS)
def test_a_restored_optimiser_continues_exactly_where_the_run_stopped(name: str) -> None:
    run = run_config(name)
    straight = build_strategy(run)
    after_one = server_round(straight, 1, START)
    uninterrupted = server_round(straight, 2, after_one)

    first = build_strategy(run)
    server_round(first, 1, START)
    buffer = io.BytesIO()
    torch.save({"server_optimizer": optimiser_state(first)}, buffer)  # as in a checkpoint
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)["server_optimizer"]

    resumed, fresh = build_strategy(run), build_strategy(run)
    assert load_optimiser_state(resumed, saved)
    restored = server_round(resumed, 2, after_one)
    restarted = server_round(fresh, 2, after_one)
    for k in START:
        np.testing.assert_array_equal(restored[k], uninterrupted[k])
    # Without the saved state the second step differs, so the comparison above can fail.
    assert any(not np.allclose(restarted[k], uninterrupted[k]) for k in START)


def test_plain_strategies_have_no_optimiser_state() -> None:
    assert optimiser_state(build_strategy(run_config("fedavg"))) is None
    assert not load_optimiser_state(build_strategy(run_config("fedprox")), {"m_t": {}, "v_t": {}})


@pytest.mark.parametrize("name", SERVER_OPTIMISERS)
def test_aggregates_keep_every_array_shape_and_dtype(name: str) -> None:
    """A 0-d parameter must come back 0-d, or the next round's updates fail the shape check."""
    current = dict(START)
    for rnd in (1, 2):
        got = server_round(build_strategy(run_config(name)), rnd, current)
        assert {k: (a.shape, a.dtype) for k, a in got.items()} == {k: (a.shape, a.dtype) for k, a in START.items()}
        current = got
