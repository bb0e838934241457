"""SecAgg+ rounds for real: the ServerApp against the real ClientApp, through Flower's SecAgg+ workflow and mod.

``RecordingGrid`` (``bench.loopback``) hands every message to the real ``client.app`` (one ``Context`` per site, kept across
messages as a SuperNode keeps it) and records everything the ServerApp receives. The same one-round
run is made with and without ``secagg``: the sites train identically (same seeds), so the plain run
gives each site's true update and FedAvg's aggregate, against which the secure run is checked.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

import server.app
from bench.loopback import FIRST_NODE, LoopbackGrid
from client.transport import RECORDS
from common.config import load_site_config
from common.errors import ConfigError
from common.protocol import unpack_content
from common.runconfig import RunConfig
from server.store import RunDir

pytestmark = pytest.mark.slow

MODEL_ARGS = {"chans": 4, "num_pool_layers": 2}
RUN_ID, SERVER_NODE = 9, 1
CLIP, LEVELS, MAX_WEIGHT = 0.5, 2**22, 100.0


class RecordingGrid(LoopbackGrid):
    """The loopback grid, recording the replies: ``drop`` names a ``(node, SecAgg+ stage)`` at which that
    site crashes (an error reply instead of its answer). ``received`` is everything the ServerApp pulled,
    unpacked.
    """

    def __init__(self, sites: list[Path], run_config: dict[str, Any], drop: tuple[int, str] | None = None) -> None:
        super().__init__(sites, run_config, RUN_ID)
        self.drop = drop
        self.received: list[Message] = []

    def deliver(self, request: Message) -> Message | None:
        if self.drop is not None and (request.metadata.dst_node_id, stage_of(request)) == self.drop:
            return Message(Error(code=0, reason="site crashed"), reply_to=request)
        return super().deliver(request)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        pulled = list(super().pull_messages(message_ids))
        for reply in pulled:
            if reply.has_content():
                seen = copy.deepcopy(reply)
                seen.content = unpack_content(seen.content, RECORDS)
                self.received.append(seen)
        return pulled


def stage_of(msg: Message) -> str:
    """The SecAgg+ stage a server message asks for ('' for a plain message)."""
    content = unpack_content(msg.content, RECORDS)
    if RECORD_KEY_CONFIGS not in content.config_records:
        return ""
    return str(content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, ""))


@pytest.fixture(scope="module", autouse=True)
def _task_identity() -> Iterator[None]:
    """Messages are stamped with the sending task's identity; here that is the ServerApp's."""
    mp = pytest.MonkeyPatch()
    mp.setattr(TaskIdentity, "_run_id", RUN_ID)
    mp.setattr(TaskIdentity, "_task_id", 1)
    mp.setattr(TaskIdentity, "_node_id", SERVER_NODE)
    yield
    mp.undo()


def one_round(
    sites: list[Path], run_dir: Path, secagg: bool, drop: tuple[int, str] | None = None, **extra: object
) -> tuple[RecordingGrid, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One training round of the real ServerApp; the grid, the initial and the round-1 global weights."""
    run = RunConfig.from_flat(
        {
            "name": "secagg",
            "num-server-rounds": 1,
            "strategy": "fedavg",
            "model-args": json.dumps(MODEL_ARGS),
            "local-steps": 2,
            "batch-size": 1,
            "learning-rate": 1e-2,
            "fraction-evaluate": 0.0,
            "min-train-nodes": 2,
            "min-available-nodes": len(sites),
            "round-timeout": 60.0,
            "node-wait-timeout": 5.0,
            "run-dir": str(run_dir),
            "resume": False,
            "secagg": secagg,
            "secagg-clipping-range": CLIP,
            "secagg-quantization-range": LEVELS,
            "secagg-max-weight": MAX_WEIGHT,
            **extra,
        }
    )
    grid = RecordingGrid(sites, run.to_flat(), drop)
    server.app.main(grid, Context(RUN_ID, SERVER_NODE, {}, RecordDict(), run.to_flat()))
    store = RunDir(run_dir)
    start = _initial(run)
    after = {k: v.numpy() for k, v in store.load_checkpoint(1)["state_dict"].items()}
    return grid, start, after


def _initial(run: RunConfig) -> dict[str, np.ndarray]:
    """The ServerApp's round-0 weights (it seeds torch with the run's seed before building the model)."""
    import torch

    from common.models import build_model

    torch.manual_seed(run.seed)
    return {k: v.numpy() for k, v in build_model(run.model, **run.model_kwargs).state_dict().items()}


def plain_updates(grid: RecordingGrid, start: dict[str, np.ndarray]) -> dict[str, tuple[float, np.ndarray]]:
    """Each site's (num-examples, flat update) from the plain run's replies."""
    out = {}
    for reply in grid.received:
        arrays = reply.content["arrays"]
        update = np.concatenate([(arrays[k].numpy().astype(np.float64) - start[k]).ravel() for k in start])
        out[str(reply.content["site"]["name"])] = (float(reply.content["metrics"]["num-examples"]), update)
    return out


def flat(state: dict[str, np.ndarray], start: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([(state[k].astype(np.float64) - start[k]).ravel() for k in start])


def quantisation_bound(weights: list[float]) -> float:
    """|SecAgg+ mean - exact weighted mean| per entry: one level per site, divided by the summed weights,
    plus float32 rounding of the stored weights (the checkpoint is float32)."""
    ratios = [round(min(w, MAX_WEIGHT) / MAX_WEIGHT * LEVELS) / LEVELS for w in weights]
    return len(weights) * (2 * CLIP / LEVELS) / sum(ratios) + 1e-6


@pytest.fixture(scope="module")
def plain(small_sites: list[Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    grid, start, after = one_round(small_sites, tmp_path_factory.mktemp("plain") / "run", secagg=False)
    return plain_updates(grid, start), start, after


@pytest.fixture(scope="module")
def secure(small_sites: list[Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return one_round(small_sites, tmp_path_factory.mktemp("secure") / "run", secagg=True)


def test_secure_aggregate_equals_fedavg_within_the_quantisation_bound(plain, secure) -> None:  # type: ignore[no-untyped-def]
    updates, start, plain_after = plain
    _, start2, secure_after = secure
    assert all(np.array_equal(start[k], start2[k]) for k in start)
    weights = [n for n, _ in updates.values()]
    exact = sum(n * u for n, u in updates.values()) / sum(weights)
    got = flat(secure_after, start)
    bound = quantisation_bound(weights)
    assert np.max(np.abs(exact)) > 100 * bound  # the round moved the model far more than the bound
    assert np.max(np.abs(got - exact)) <= bound
    # and the plain run's FedAvg (Flower's float32 mean of the weights) agrees with it to the same bound
    assert np.max(np.abs(flat(plain_after, start) - got)) <= bound + 1e-5


def test_the_server_receives_no_individual_update(plain, secure) -> None:  # type: ignore[no-untyped-def]
    updates, _, _ = plain
    grid, _, _ = secure
    masked = []
    for msg in grid.received:
        assert all(len(record) == 0 for record in msg.content.array_records.values()), "arrays reached the server"
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            masked.append(np.concatenate([bytes_to_ndarray(b).ravel() for b in configs[Key.MASKED_PARAMETERS]]))
    assert len(masked) == len(updates) == 3
    for vector in masked:
        values = vector[1:].astype(np.float64)  # entry 0 carries the site's quantised weight, masked too
        # Full-range masks: the received entries are uniform over [0, 2**32) ...
        counts = np.histogram(values, bins=16, range=(0, 2**32))[0]
        expected = len(values) / 16
        chi2 = float(np.sum((counts - expected) ** 2 / expected))
        assert chi2 < 60, f"masked entries are not uniform (chi2 {chi2:.1f}, 15 dof)"
        # ... and carry no trace of any site's update (its quantised form is what the site masked).
        for n, update in updates.values():
            quantised = (np.clip(update * n / MAX_WEIGHT, -CLIP, CLIP) + CLIP) * LEVELS / (2 * CLIP)
            assert abs(np.corrcoef(values, quantised)[0, 1]) < 0.05
            mask = np.mod(values - np.rint(quantised), 2**32)
            assert mask.std() > 0.25 * 2**32  # a uniform mask has std 2**32 / sqrt(12) ≈ 0.29 * 2**32


def test_a_site_dropping_after_sharing_keys_leaves_the_survivors_sum(
    plain, small_sites: list[Path], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    updates, start, _ = plain
    dropped_node = FIRST_NODE + 1  # the second site
    _, _, after = one_round(
        small_sites, tmp_path / "run", secagg=True, drop=(dropped_node, Stage.COLLECT_MASKED_VECTORS)
    )
    gone = load_site_config(small_sites[1]).name
    survivors = {name: nu for name, nu in updates.items() if name != gone}
    assert len(survivors) == 2
    weights = [n for n, _ in survivors.values()]
    exact = sum(n * u for n, u in survivors.values()) / sum(weights)
    assert np.max(np.abs(flat(after, start) - exact)) <= quantisation_bound(weights)
    summary = [r for r in RunDir(tmp_path / "run").read_metrics() if r["phase"] == "train" and r.get("secagg")]
    assert summary[0]["secagg"]["sites_summed"] == 2
    assert [r["site"] for r in summary[0]["rejected"]] == [f"node-{dropped_node}"]


def test_refused_where_the_server_needs_individual_updates() -> None:
    for extra, words in [
        ({"strategy": "fedmedian"}, "fedmedian"),
        ({"norm-outlier-factor": 3.0}, "norm-outlier-factor"),
        ({"site-caps": '{"a": 5}'}, "site-caps"),
        ({"secagg-reconstruction-threshold": 3}, "less than"),
    ]:
        with pytest.raises(ConfigError, match=words):
            RunConfig.from_flat({"secagg": True, **extra})
    assert RunConfig.from_flat({"secagg": True, "strategy": "fedadam"}).secagg


def test_fedsense_simulate_with_secagg_runs_to_completion(small_sites: list[Path], tmp_path: Path) -> None:
    """The real Flower runtime (SuperLink, simulation engine, ``flwr run``): two SecAgg+ rounds with FedProx."""
    from server.simulate import SimResources, simulate

    run = RunConfig.from_flat(
        {
            "name": "secagg-sim",
            "num-server-rounds": 2,
            "strategy": "fedprox",
            "model-args": json.dumps(MODEL_ARGS),
            "local-steps": 2,
            "batch-size": 2,
            "min-train-nodes": 3,
            "min-evaluate-nodes": 3,
            "min-available-nodes": 3,
            "sites": ",".join(map(str, small_sites)),
            "run-dir": str(tmp_path / "run"),
            "secagg": True,
        }
    )
    # One CPU per site: the four SecAgg+ stages per round then reach the three sites together.
    store = simulate(run, timeout=600, resources=SimResources(client_cpus=1))
    assert {1, 2} <= store.completed_rounds()
    trains = [r for r in store.read_metrics() if r["phase"] == "train" and r["site"] == "__global__"]
    assert [r["round"] for r in trains] == [1, 2]
    assert all(r["secagg"]["sites_summed"] == 3 and len(r["secagg"]["stage_seconds"]) == 4 for r in trains)
    assert trains[0]["metrics"]["secagg-clipped-fraction"] == 0.0
    first, last = (store.load_checkpoint(r)["state_dict"] for r in (1, 2))
    assert any(not np.array_equal(first[k].numpy(), last[k].numpy()) for k in first)


def test_the_egress_audit_logs_masked_vectors_by_size() -> None:
    """A site's audit log names what SecAgg+ sends (masked vectors, key shares) by size, not by content."""
    from client.audit import describe

    content = RecordDict(
        {
            RECORD_KEY_CONFIGS: ConfigRecord(
                {Key.MASKED_PARAMETERS: [b"\x01" * 40, b"\x02" * 8], Key.PUBLIC_KEY_1: b"k" * 32, "stage": "setup"}
            )
        }
    )
    entry = describe(Message(content, dst_node_id=1, message_type=MessageType.TRAIN))
    assert entry["configs"][RECORD_KEY_CONFIGS] == {
        Key.MASKED_PARAMETERS: {"bytes": [40, 8]},
        Key.PUBLIC_KEY_1: {"bytes": 32},
        "stage": "setup",
    }


def test_secagg_with_patient_level_dp_at_the_sites(small_sites: list[Path], tmp_path: Path) -> None:
    """The allowed combination: each site trains with patient-level DP-SGD, SecAgg+ hides its update."""
    _, start, after = one_round(
        small_sites,
        tmp_path / "run",
        secagg=True,
        **{"dp-noise-multiplier": 1.0, "dp-max-grad-norm": 1.0, "batch-size": 1},
    )
    assert any(not np.array_equal(start[k], after[k]) for k in start)
    sites = [r for r in RunDir(tmp_path / "run").read_metrics() if r["phase"] == "train" and r["site"] != "__global__"]
    assert len(sites) == 3
    assert all(r["metrics"]["dp-subject-level"] == 1.0 and r["metrics"]["dp-epsilon"] > 0 for r in sites)


def test_secagg_with_client_level_dp_clips_and_noises_at_the_sites(small_sites: list[Path], tmp_path: Path) -> None:
    """SecAgg+ + client-level DP: each site clips to C and adds its noise share, so the unmasked mean
    carries N(0, (σC/n)²) per entry (n = m = 3 sites), and the server records ε per site."""
    from flwr.serverapp import (
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    clip, sigma = 1e-3, 2.0
    dp = {"dp-client-level": "client-fixed", "dp-client-clip": clip, "min-train-nodes": 3, "dp-delta": 1e-5}
    _, start, after = one_round(small_sites, tmp_path / "quiet", secagg=True, **dp, **{"dp-client-noise": 0.0})
    mean = np.concatenate(
        [(after[k].astype(np.float64) - start[k]).ravel() for k in start if start[k].dtype.kind == "f"]
    )
    bound = 3 * 2 * CLIP / LEVELS * np.sqrt(mean.size)  # one quantisation level per site and entry
    assert 0 < np.linalg.norm(mean) <= clip + bound  # three updates, each clipped to C: their mean too
    sites = [
        r for r in RunDir(tmp_path / "quiet").read_metrics() if r["phase"] == "train" and r["site"] != "__global__"
    ]
    assert len(sites) == 3 and all(r["metrics"]["dp-client-clipped"] == 1.0 for r in sites)

    _, start, after = one_round(small_sites, tmp_path / "noisy", secagg=True, **dp, **{"dp-client-noise": sigma})
    mean = np.concatenate(
        [(after[k].astype(np.float64) - start[k]).ravel() for k in start if start[k].dtype.kind == "f"]
    )
    # The clipped mean has norm ≤ C; the noise's norm is ~ σC/3 · √entries, far larger.
    assert np.std(mean) == pytest.approx(sigma * clip / 3, rel=0.1)
    summary = [
        r for r in RunDir(tmp_path / "noisy").read_metrics() if r["phase"] == "train" and r["site"] == "__global__"
    ]
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=1e-5,
            population_size=3,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    accountant.compose(GaussianPrivacyEvent(sigma, 3, 3))
    assert summary[0]["metrics"]["dp-client-epsilon"] == pytest.approx(accountant.get_privacy_spent().epsilon)
