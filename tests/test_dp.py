"""Sample-level DP-SGD (Opacus) and client-level clipping: bounds and accounting against independent computations."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, rdp
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.task_identity import TaskIdentity
from opacus import GradSampleModule
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader

from client.privacy import client_dp_mod, train_with_budget
from common.dp import PrivacyLedger, check_model, prepared_for_opacus, train_private
from common.errors import ConfigError
from common.fft import fft2c
from common.models import build_model
from common.runconfig import RunConfig
from common.training import ReconLoss, predict
from server.privacy import client_dp_metrics, wrap_client_dp
from server.store import GLOBAL_SITE, RunDir
from server.strategy import build_strategy
from server.viewer.run_view import COLUMNS
from server.viewer.table import show
from tests.test_training import synthetic_samples

SMALL = {
    "unet": {"chans": 4, "num_pool_layers": 2},
    "unrolled": {"num_cascades": 2, "chans": 4, "num_layers": 3},
    "varnet": {"num_cascades": 1, "chans": 4, "num_pool_layers": 1, "sens_chans": 2, "sens_pool_layers": 1},
}


def small_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, **SMALL[name])


def two_coil(samples: list[dict[str, object]]) -> list[dict[str, object]]:
    """The same slices seen by two coils with smooth, normalised sensitivity maps."""
    out = []
    for s in samples:
        size = s["target"].shape[-1]
        ramp = torch.linspace(0, 1, size)
        maps = torch.stack([torch.exp(1j * ramp).expand(size, size) * (1 + ramp), (2 - ramp).expand(size, size) + 0j])
        maps = (maps / maps.abs().pow(2).sum(0).sqrt()).to(torch.complex64)
        image = s["target"].to(torch.complex64)
        out.append({**s, "sens_maps": maps, "masked_kspace": fft2c(maps * image) * s["mask"]})
    return out


def batch_of(samples: list[dict[str, object]]) -> dict[str, object]:
    return next(iter(DataLoader(samples, batch_size=len(samples), shuffle=False)))


@pytest.mark.parametrize("name", ["unet", "unrolled"])
def test_clipped_per_sample_gradients_are_bounded_and_match_per_slice_backward(name: str) -> None:
    """Opacus' per-slice gradients equal one backward pass per slice; clipped, each has norm <= C."""
    samples = two_coil(synthetic_samples(n=3))
    model = prepared_for_opacus(small_model(name))
    check_model(name, model)
    criterion = ReconLoss("l1")
    params = [p for p in model.parameters() if p.requires_grad]
    expected = []
    for s in samples:  # independent: one slice at a time through the plain model
        model.zero_grad()
        b = batch_of([s])
        criterion(predict(model, b), b["target"], b["max_value"]).backward()
        expected.append(torch.cat([p.grad.flatten() for p in params]).clone())
    bound = 0.5 * min(float(g.norm()) for g in expected)  # every slice is clipped
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=bound,
        expected_batch_size=len(samples),
        loss_reduction="mean",
    )
    b = batch_of(samples)
    criterion(predict(gsm, b), b["target"], b["max_value"]).backward()
    per_sample = torch.cat([p.grad_sample.reshape(len(samples), -1) for p in params], dim=1)
    np.testing.assert_allclose(per_sample.detach().numpy(), torch.stack(expected).numpy(), rtol=1e-3, atol=1e-5)
    assert opt.pre_step()
    summed = torch.cat([p.summed_grad.flatten() for p in params])
    clipped = [g * min(1.0, bound / float(g.norm())) for g in expected]
    assert all(float(c.norm()) <= bound * (1 + 1e-5) for c in clipped)
    np.testing.assert_allclose(summed.numpy(), torch.stack(clipped).sum(0).numpy(), rtol=1e-3, atol=1e-6)
    # the averaged step the optimiser takes is the clipped mean: its norm is bounded by C as well
    assert float(torch.cat([p.grad.flatten() for p in params]).norm()) <= bound * (1 + 1e-5)
    gsm._close()


def test_varnet_is_refused_because_its_sensitivity_net_batches_coils() -> None:
    with pytest.raises(ConfigError, match=r"'varnet'.*per coil"):
        check_model("varnet", small_model("varnet"))


def test_batchnorm_is_refused_with_the_model_named() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3), torch.nn.BatchNorm2d(2))
    with pytest.raises(ConfigError, match=r"'bn-net'.*BatchNorm"):
        check_model("bn-net", model)


def independent_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus' RDP analysis called directly (not through its accountant class)."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in history)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def dp_run(**extra: object) -> RunConfig:
    return RunConfig.from_flat(
        {
            "model": "unet",
            "model-args": '{"chans": 4, "num_pool_layers": 2}',
            "local-steps": 1,
            "batch-size": 2,
            "dp-noise-multiplier": 1.0,
            "dp-unit": "sample",
            "dp-max-grad-norm": 1.0,
            "dp-delta": 1e-5,
            **extra,
        }
    )


def test_epsilon_grows_per_round_and_matches_opacus_rdp_and_the_budget_stops_training() -> None:
    samples = synthetic_samples(n=6)
    loader = DataLoader(samples, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    run = dp_run()
    model, ledger, eps = small_model("unet"), PrivacyLedger(), []
    for _ in range(3):
        result, ledger, metrics = train_with_budget(run, model, loader, 0.0, ledger)
        assert result is not None and result.steps == 1
        eps.append(metrics["dp-epsilon"])
    assert eps[0] < eps[1] < eps[2]
    assert ledger.history == [(1.0, 2 / 6, 1)] * 3
    for k in range(3):
        assert eps[k] == pytest.approx(independent_epsilon([(1.0, 2 / 6, 1)] * (k + 1), 1e-5), rel=1e-6)
    assert PrivacyLedger.from_json(ledger.to_json()).epsilon(1e-5) == pytest.approx(eps[2])
    # a target between round 2's and round 3's ε: two rounds train, the third is refused, weights untouched
    limited = dp_run(**{"dp-target-epsilon": (eps[1] + eps[2]) / 2})
    model, ledger = small_model("unet"), PrivacyLedger()
    for _ in range(2):
        result, ledger, _ = train_with_budget(limited, model, loader, 0.0, ledger)
        assert result is not None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result, after, metrics = train_with_budget(limited, model, loader, 0.0, ledger)
    assert result is None and after is ledger and metrics["dp-budget-exhausted"] == 1
    assert metrics["dp-epsilon"] == pytest.approx(eps[1]) and metrics["dp-epsilon"] <= limited.dp_target_epsilon
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dp_sgd_adds_calibrated_noise() -> None:
    """With a zero loss gradient the step's gradient is pure noise of std sigma·C / batch size."""
    model = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=2.0,
        max_grad_norm=0.5,
        expected_batch_size=8,
        loss_reduction="mean",
    )
    draws = []
    for _ in range(300):
        opt.zero_grad()
        gsm(torch.zeros(8, 4)).sum().backward()
        opt.pre_step()
        draws.append(model.weight.grad.flatten().clone())
    assert float(torch.cat(draws).std()) == pytest.approx(2.0 * 0.5 / 8, rel=0.1)
    gsm._close()


def test_fedprox_under_dp_pulls_toward_the_global_weights() -> None:
    samples = synthetic_samples(n=4)
    loader = DataLoader(samples, batch_size=2, shuffle=False)
    start = small_model("unet")
    dist = {}
    for mu in (0.0, 50.0):
        model = small_model("unet")
        torch.manual_seed(1)
        train_private(model, loader, noise_multiplier=0.5, max_grad_norm=1.0, steps=2, lr=0.01, proximal_mu=mu)
        dist[mu] = sum(
            float(((p.detach() - q.detach()) ** 2).sum()) for p, q in zip(model.parameters(), start.parameters())
        )
    assert dist[50.0] < dist[0.0]


@pytest.fixture()
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Messages need a run/task identity; outside a Flower process there is none (restored afterwards).
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class ThreeNodeGrid:
    """Just enough of a Flower grid for a strategy's configure_train: three connected nodes."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def test_server_side_clipping_bounds_each_update_and_averages_uniformly(task_identity: None) -> None:
    run = RunConfig.from_flat(
        {
            "strategy": "fedavg",
            "min-train-nodes": 3,
            "min-available-nodes": 3,
            "min-evaluate-nodes": 3,
            "dp-client-level": "server-fixed",
            "dp-client-clip": 1.5,
        }
    )
    strategy = wrap_client_dp(build_strategy(run), run)
    global_w = {"w": np.ones((4, 5), np.float32), "b": np.zeros(5, np.float32)}
    asks = list(
        strategy.configure_train(
            1, ArrayRecord({k: Array(v) for k, v in global_w.items()}), ConfigRecord(), ThreeNodeGrid()
        )
    )
    rng = np.random.default_rng(0)
    updates = [
        {k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in global_w.items()}
        for scale in (0.01, 2.0, 10.0)
    ]  # one small (unclipped), two large
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(global_w[k] + u[k]) for k in u}),
                    "metrics": MetricRecord({"num-examples": 10 * (i + 1), "dp-weight": 1.0}),
                }
            ),
            reply_to=ask,
        )
        for i, (ask, u) in enumerate(zip(asks, updates))
    ]
    aggregate, _ = strategy.aggregate_train(1, replies)
    expected = {k: np.zeros_like(v) for k, v in global_w.items()}
    for u in updates:  # independent: clip each update to norm 1.5, then the plain (unweighted) mean
        norm = np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in u.values()))
        for k in u:
            expected[k] += u[k] * min(1.0, 1.5 / norm) / 3
    for k, v in aggregate.items():
        np.testing.assert_allclose(v.numpy() - global_w[k], expected[k], rtol=1e-4, atol=1e-6)
    for reply in replies:  # what reached the inner strategy: every update within the bound
        arrays = next(iter(reply.content.array_records.values()))
        norm = np.sqrt(sum(float(((arrays[k].numpy() - global_w[k]) ** 2).sum()) for k in global_w))
        assert norm <= 1.5 * (1 + 1e-5)


def test_client_side_clipping_bounds_the_update_norm(task_identity: None) -> None:
    """``client_dp_mod`` (Flower's fixedclipping_mod) clips the train reply's update to the server's norm."""
    torch.manual_seed(0)
    global_w = {"w": torch.zeros(50), "b": torch.zeros(3)}
    local_w = {"w": torch.randn(50) * 3, "b": torch.randn(3)}
    clip = 0.7

    def train_app(msg: Message, context: Context) -> Message:
        return Message(
            RecordDict({"arrays": ArrayRecord(local_w), "metrics": MetricRecord({"num-examples": 4})}), reply_to=msg
        )

    def send(config: dict[str, float]) -> dict[str, np.ndarray]:
        msg = Message(
            RecordDict({"arrays": ArrayRecord(global_w), "config": ConfigRecord(config)}),
            dst_node_id=1,
            message_type=MessageType.TRAIN,
        )
        context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        reply = client_dp_mod(msg, context, train_app)
        return {k: v.numpy() for k, v in reply.content["arrays"].items()}

    clipped = send({KEY_CLIPPING_NORM: clip})
    norm = np.sqrt(sum(float((v**2).sum()) for v in clipped.values()))
    assert norm == pytest.approx(clip, rel=1e-5)
    raw = np.concatenate([local_w["w"].numpy(), local_w["b"].numpy()])
    np.testing.assert_allclose(
        np.concatenate([clipped["w"], clipped["b"]]), raw * clip / np.linalg.norm(raw), rtol=1e-5
    )
    untouched = send({"proximal-mu": 0.0})  # client-level DP off: the reply is not changed
    np.testing.assert_array_equal(untouched["w"], local_w["w"].numpy())


def test_privacy_combinations_are_refused_at_config_time() -> None:
    with pytest.raises(ConfigError, match="sees only their sum"):
        RunConfig.from_flat({"secagg": True, "strategy": "fedmedian"})
    with pytest.raises(ConfigError, match="fedavg or fedprox"):
        RunConfig.from_flat({"dp-client-level": "server-fixed", "strategy": "fedmedian"})
    with pytest.raises(ConfigError, match="dp-noise-multiplier"):
        RunConfig.from_flat({"dp-target-epsilon": 3.0})
    with pytest.raises(ConfigError, match="'varnet' cannot be trained with DP-SGD"):
        RunConfig.from_flat({"model": "varnet", "dp-noise-multiplier": 1.0})


def test_metrics_show_has_epsilon_columns_only_for_dp_runs(tmp_path: Path) -> None:
    def record(site: str, metrics: dict[str, float]) -> dict[str, object]:
        return {
            "run": "r",
            "round": 1,
            "phase": "train",
            "site": site,
            "time": 1.0,
            "num_examples": 4,
            "metrics": metrics,
        }

    plain, private = RunDir(tmp_path / "plain"), RunDir(tmp_path / "dp")
    for store in (plain, private):
        store.init({"name": store.path.name}, resume=False)
    plain.append_metrics([record("site-a", {"loss": 0.5})])
    private.append_metrics(
        [
            record("site-a", {"loss": 0.5, "dp-epsilon": 1.234567}),
            record(GLOBAL_SITE, {"loss": 0.5, "dp-client-epsilon": 7.5}),
        ]
    )
    out = io.StringIO()
    show(plain.path, fmt="csv", out=out)
    assert out.getvalue().splitlines()[0] == ",".join(COLUMNS)
    out = io.StringIO()
    show(private.path, fmt="csv", out=out)
    assert out.getvalue().splitlines()[0] == ",".join((*COLUMNS, "dp-epsilon", "dp-client-epsilon"))
    out = io.StringIO()
    show(private.path, out=out)
    assert "site ε (DP-SGD)" in out.getvalue() and "1.235" in out.getvalue() and "7.500" in out.getvalue()


def test_a_resumed_run_continues_the_client_level_budget() -> None:
    run = RunConfig.from_flat(
        {
            "strategy": "fedavg",
            "min-train-nodes": 3,
            "min-available-nodes": 3,
            "dp-client-level": "client-fixed",
            "dp-client-noise": 0.8,
            "dp-delta": 1e-5,
        }
    )
    assert client_dp_metrics(wrap_client_dp(build_strategy(run), run)) == {
        "dp-client-epsilon": 0.0,
        "dp-client-delta": 1e-5,
    }
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(0.8), 2)
    resumed = client_dp_metrics(wrap_client_dp(build_strategy(run), run, rounds_done=2))
    assert resumed["dp-client-epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    off = RunConfig.from_flat({"strategy": "fedavg"})
    assert client_dp_metrics(wrap_client_dp(build_strategy(off), off)) == {}
