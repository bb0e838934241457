"""SCAFFOLD's control variates against the paper's update rule on quadratics, through the real training loop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.scaffold import ControlledSteps, local_delta, server_update
from common.training import train

DIM, SITES, STEPS, LR = 4, 3, 5, 0.05


def _problem(seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Site i's loss ½ (w − b_i)ᵀ A_i (w − b_i): SPD curvatures and optima far apart (heterogeneous sites)."""
    rng = np.random.default_rng(seed)
    curvatures = []
    for _ in range(SITES):
        q = rng.standard_normal((DIM, DIM))
        curvatures.append(q @ q.T / DIM + np.diag(rng.uniform(0.5, 3.0, DIM)))
    return curvatures, [rng.normal(0.0, 3.0, DIM) for _ in range(SITES)]


def _reference(
    curvatures: list[np.ndarray], optima: list[np.ndarray], rounds: int, scaffold: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1 of Karimireddy et al. 2020 (option II, all sites sampled, global step 1), in numpy."""
    x, c = np.zeros(DIM), np.zeros(DIM)
    local = [np.zeros(DIM) for _ in range(SITES)]
    for _ in range(rounds):
        ys, deltas = [], []
        for i in range(SITES):
            y = x.copy()
            for _ in range(STEPS):
                y -= LR * (curvatures[i] @ (y - optima[i]) + (c - local[i] if scaffold else 0.0))
            new = local[i] - c + (x - y) / (STEPS * LR)
            deltas.append(new - local[i])
            local[i] = new
            ys.append(y)
        x, c = np.mean(ys, axis=0), c + np.mean(deltas, axis=0)
    return x, c


class _Weights(nn.Module):
    def __init__(self, start: np.ndarray) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(start, dtype=torch.float64))


class _Batches:
    """STEPS batches carrying nothing: the quadratic's gradient is exact (no data)."""

    dataset = range(1)

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[dict[str, object]]:
        yield {}


def _federated(
    curvatures: list[np.ndarray], optima: list[np.ndarray], rounds: int, scaffold: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The same run with FedSense's pieces: common.training.train's loop with SGD and the step hook."""
    x, c = np.zeros(DIM), {}
    local: list[dict[str, torch.Tensor]] = [{} for _ in range(SITES)]
    for _ in range(rounds):
        ys, deltas = [], []
        for i in range(SITES):
            model = _Weights(x)
            a, b = torch.tensor(curvatures[i]), torch.tensor(optima[i])

            def quadratic(m: nn.Module, _batch: object) -> torch.Tensor:
                d = m.w - b  # noqa: B023 - used within this iteration
                return 0.5 * d @ a @ d  # noqa: B023

            hook = ControlledSteps(model, {"w": torch.tensor(c.get("w", np.zeros(DIM)))}, local[i])
            train(
                model,
                _Batches(),
                steps=STEPS,
                batch_loss=quadratic,
                optimiser=torch.optim.SGD(model.parameters(), lr=LR),
                step_hook=hook if scaffold else None,
            )
            if scaffold:
                new = hook.new_local()
                deltas.append({k: v.numpy() for k, v in local_delta(new, local[i]).items()})
                local[i] = new
            ys.append(model.w.detach().numpy())
        x, c = np.mean(ys, axis=0), server_update(c, deltas, SITES)
    return x, c.get("w", np.zeros(DIM))


def test_scaffold_through_the_training_loop_matches_the_papers_update() -> None:
    curvatures, optima = _problem()
    x, c = _federated(curvatures, optima, rounds=4)
    x_ref, c_ref = _reference(curvatures, optima, rounds=4)
    np.testing.assert_allclose(x, x_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c, c_ref, rtol=1e-10, atol=1e-12)
    assert np.linalg.norm(c) > 0.1  # the variates did something


def test_scaffold_reaches_the_global_optimum_where_fedavg_drifts() -> None:
    curvatures, optima = _problem(1)
    optimum = np.linalg.solve(sum(curvatures), sum(a @ b for a, b in zip(curvatures, optima)))
    scaffold, _ = _federated(curvatures, optima, rounds=60)
    fedavg, _ = _federated(curvatures, optima, rounds=60, scaffold=False)
    assert np.linalg.norm(scaffold - optimum) < 1e-6
    assert np.linalg.norm(fedavg - optimum) > 1e-2  # client drift: FedAvg's fixed point is elsewhere


def test_server_update_scales_by_the_sampled_fraction_and_keeps_dtypes() -> None:
    c = {"w": np.ones(2, np.float32)}
    deltas = [{"w": np.array([2.0, 0.0], np.float32)}, {"w": np.array([0.0, 2.0], np.float32), "v": np.ones(1)}]
    out = server_update(c, deltas, total_sites=4)
    np.testing.assert_allclose(out["w"], [1.5, 1.5])
    np.testing.assert_allclose(out["v"], [0.25])
    assert out["w"].dtype == np.float32
    with pytest.raises(ValueError, match="3 deltas but only 2 sites"):
        server_update(c, deltas + deltas[:1], total_sites=2)
    assert server_update(c, [], 3) == c


def test_the_server_takes_each_sites_delta_out_of_its_reply_and_refuses_a_bad_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from common.protocol import SCAFFOLD_DELTA, SCAFFOLD_GLOBAL
    from server.scaffold import ScaffoldState

    for name in ("_run_id", "_task_id", "_node_id"):  # Flower's messages need a task to belong to
        monkeypatch.setattr(TaskIdentity, name, 1)
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})

    def reply(delta: np.ndarray | None) -> Message:
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})
        if delta is not None:
            content[SCAFFOLD_DELTA] = ArrayRecord({"w": Array(delta)})
        return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)

    state = ScaffoldState()
    assert state.train_records(1) == {}  # round 1: c = 0, nothing to send
    good = [reply(np.array([1.0, 2.0], np.float32)), reply(np.array([3.0, 0.0], np.float32))]
    bad = [reply(None), reply(np.ones(3, np.float32)), reply(np.array([np.nan, 0.0], np.float32))]
    refused = state.take(good + bad, arrays)
    assert [m for m, _ in refused] == bad
    assert ["no scaffold.delta-c record" in r for _, r in refused] == [True, False, False]
    assert "shape (3,) != (2,)" in refused[1][1] and "non-finite" in refused[2][1]
    assert all(SCAFFOLD_DELTA not in m.content for m in good)  # update validation sees one ArrayRecord
    state.absorb(1, good, total_sites=4)
    np.testing.assert_allclose(state.c["w"], [1.0, 0.5])  # 2/4 of the mean delta
    assert list(state.train_records(2)[SCAFFOLD_GLOBAL]["w"].numpy()) == [1.0, 0.5]


def test_the_servers_control_variate_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    from server.scaffold import ScaffoldState

    state = ScaffoldState()
    assert state.state_dict() == {}  # nothing to checkpoint before the first aggregate
    state.c = {"w": np.array([1.0, 0.5], np.float32), "b": np.ones((2, 2))}
    torch.save({"round_state": state.state_dict()}, tmp_path / "ckpt.pt")
    resumed = ScaffoldState()
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["round_state"])
    assert set(resumed.c) == {"w", "b"}
    for name, value in state.c.items():
        assert resumed.c[name].dtype == value.dtype and np.array_equal(resumed.c[name], value)


def test_a_sites_control_variate_is_kept_in_its_round_files_for_a_resumed_run(tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    from client.site_state import SiteMemory
    from common.runconfig import RunConfig

    run = RunConfig.from_flat({"strategy": "scaffold", "site-state-dir": str(tmp_path)})
    model = nn.Linear(2, 1)

    def memory() -> SiteMemory:  # a new Flower run: an empty Context
        return SiteMemory(
            Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
            run,
            "site-a",
            strategy_state=True,
        )

    c_i = {"weight": torch.tensor([[0.25, -1.0]])}
    memory().remember(3, model, None, c_i)
    saved = memory().restore(upto_round=3)
    assert saved is not None and saved.round == 3
    assert torch.equal(saved.strategy["weight"], c_i["weight"])
    assert memory().restore(upto_round=2) is None  # round 3's state is not what round 3's training starts from


def test_scalar_parameters_get_0d_array_variates_the_server_can_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0-d parameter (the unrolled model's DC weight) made round 2 crash: ``c`` became a numpy scalar."""
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from common.protocol import SCAFFOLD_DELTA, SCAFFOLD_GLOBAL
    from server.scaffold import ScaffoldState

    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    model = nn.Linear(1, 1)
    model.scale = nn.Parameter(torch.tensor(0.5))  # 0-d, like a DC weight
    steps = ControlledSteps(model, {}, {}, names=["scale"])
    model.scale.grad = torch.tensor(2.0)
    steps(model)
    delta = local_delta(steps.new_local(), {})
    assert delta["scale"].shape == ()
    arrays = ArrayRecord({"scale": Array(np.array(0.5, np.float32))})
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord({"num-examples": 1}),
            SCAFFOLD_DELTA: ArrayRecord({"scale": Array(delta["scale"].numpy())}),
        }
    )
    state = ScaffoldState()
    reply = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    assert state.take([reply], arrays) == []
    state.absorb(1, [reply], total_sites=2)
    assert isinstance(state.c["scale"], np.ndarray) and state.c["scale"].shape == ()
    assert state.c["scale"].dtype == np.float32
    sent = state.train_records(2)[SCAFFOLD_GLOBAL]["scale"].numpy()  # raised TypeError before the fix
    np.testing.assert_allclose(sent, 1.0)  # 1/2 of Δc = 2
    out = server_update({"s": np.array(1.0, np.float64)}, [{"s": np.array(2.0, np.float64)}], total_sites=1)
    assert isinstance(out["s"], np.ndarray) and float(out["s"]) == 3.0
