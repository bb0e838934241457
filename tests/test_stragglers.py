"""Stragglers: the round deadline in reply collection, late replies, adaptive local steps and slowed sites.

Fast unit tests with fake grids (no Flower processes); tests/test_stragglers_federation.py runs the real thing.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.rehearsal import slowed
from common.config import parse_site_config
from common.errors import ConfigError
from common.protocol import LOCAL_STEPS
from common.runconfig import RunConfig
from server.collect import send_and_collect
from server.federation import Federation
from server.pace import SAFETY, Pace
from server.store import RunDir, global_record, site_record
from server.strategy import build_strategy
from server.viewer.table import show
from test_collect import Clock, DelayedGrid, asks


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


# --- collection with a deadline (virtual time) ---------------------------------------------------


def test_deadline_ends_the_phase_once_enough_replied() -> None:
    clock = Clock()
    grid = DelayedGrid(clock, {1: 0.2, 2: 0.4, 3: 30.0})
    replies = send_and_collect(
        grid, asks([1, 2, 3]), timeout=600.0, round_deadline=2.0, enough=2, clock=clock, sleep=clock.sleep
    )
    assert sorted(r.message.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert clock.now == pytest.approx(2.0)  # woke exactly at the deadline, not a back-off step later


def test_before_the_deadline_only_all_replies_end_the_phase() -> None:
    clock = Clock()
    grid = DelayedGrid(clock, {1: 0.2, 2: 0.9})
    assert (
        len(
            send_and_collect(
                grid, asks([1, 2]), timeout=600.0, round_deadline=5.0, enough=1, clock=clock, sleep=clock.sleep
            )
        )
        == 2
    )
    assert clock.now < 1.2


def test_past_the_deadline_the_phase_waits_for_enough_replies() -> None:
    clock = Clock()
    grid = DelayedGrid(clock, {1: 0.5, 2: 7.0, 3: 40.0})
    replies = send_and_collect(
        grid, asks([1, 2, 3]), timeout=600.0, round_deadline=2.0, enough=2, clock=clock, sleep=clock.sleep
    )
    assert len(replies) == 2 and 7.0 <= clock.now <= 7.3


class FailingGrid(DelayedGrid):
    """A DelayedGrid whose replies from ``failing`` nodes are error replies."""

    def __init__(self, clock: Clock, delays: dict[int, float | None], failing: set[int]) -> None:
        super().__init__(clock, delays)
        self.failing = failing

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        ids = super().push_messages(messages)
        for msg in messages:
            if msg.metadata.dst_node_id in self.failing:
                ready = self.ready[msg.metadata.message_id][0]
                self.ready[msg.metadata.message_id] = (ready, Message(Error(code=0, reason="DataError"), reply_to=msg))
        return ids


def test_an_error_reply_does_not_count_towards_enough() -> None:
    """A fast failing site must not end the phase at the deadline: it would leave too few updates."""
    clock = Clock()
    grid = FailingGrid(clock, {1: 0.2, 2: 0.3, 3: 6.0}, failing={2})
    replies = send_and_collect(
        grid, asks([1, 2, 3]), timeout=600.0, round_deadline=2.0, enough=2, clock=clock, sleep=clock.sleep
    )
    assert len(replies) == 3 and [r.message.has_error() for r in replies] == [False, True, False]
    assert 6.0 <= clock.now <= 6.3  # waited past the deadline for the slow site that has an update


def test_without_a_deadline_the_slowest_site_sets_the_pace() -> None:
    clock = Clock()
    grid = DelayedGrid(clock, {1: 0.2, 2: 30.0})
    assert len(send_and_collect(grid, asks([1, 2]), timeout=600.0, enough=1, clock=clock, sleep=clock.sleep)) == 2
    assert clock.now >= 30.0


def test_late_replies_are_pulled_with_a_later_phase_but_never_waited_for() -> None:
    clock = Clock()
    grid = DelayedGrid(clock, {1: 0.1, 2: 5.0})
    first = send_and_collect(
        grid, asks([1, 2]), timeout=600.0, round_deadline=1.0, enough=1, clock=clock, sleep=clock.sleep
    )
    assert [r.message.metadata.reply_to_message_id for r in first] == ["m0"]
    clock.now = 6.0  # the straggler's reply is in the SuperLink now, under the first phase's message m1
    grid.ready["m1"] = (0.0, grid.ready.pop("m1")[1])
    grid.delays = {3: 0.1}
    grid.ready["old-m1"] = grid.ready.pop("m1")
    later = send_and_collect(
        grid, asks([3]), timeout=600.0, also_pull=["old-m1", "never-answered"], clock=clock, sleep=clock.sleep
    )
    assert len(later) == 2 and clock.now <= 6.2  # the never-answered message did not hold the phase


# --- adaptive local steps -------------------------------------------------------------------------


def _run(tmp_path: Path, **overrides: object) -> RunConfig:
    flat = {
        "round-deadline": 2.0,
        "round-timeout": 60.0,
        "adaptive-local-steps": True,
        "local-steps": 20,
        "min-train-nodes": 1,
        "min-available-nodes": 2,
        "strategy": "fedavg",
        "run-dir": str(tmp_path / "run"),
        "resume": False,
        **overrides,
    }
    return RunConfig.from_flat(flat)


def _train_reply(node: int, answers: str, steps: int, compute: float, site: str) -> Message:
    ask = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    ask.metadata.__dict__["_message_id"] = answers
    reply = Message(
        RecordDict(
            {
                "metrics": MetricRecord({"num-examples": 4, "steps": steps, "compute-seconds": compute}),
                "site": ConfigRecord({"name": site}),
            }
        ),
        reply_to=ask,
    )
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def test_a_measured_slow_site_gets_the_steps_that_fit_the_deadline(tmp_path: Path) -> None:
    pace = Pace(_run(tmp_path))
    # First replies: the sites' start-up (3 s) is in them, and is not a round's overhead.
    pace.observe(
        [_train_reply(1, "a0", 20, 0.2, "fast"), _train_reply(2, "b0", 20, 10.0, "slow")], {"a0": 3.2, "b0": 13}
    )
    assert pace.steps_for(1) is None  # all 20 steps fit: no override
    assert pace.steps_for(2) == int(SAFETY * 2.0 / 0.5) == 3
    # Later replies: node 1 at 0.01 s/step; node 2 at 0.5 s/step with 0.2 s of set-up and transport.
    pace.observe([_train_reply(1, "a", 20, 0.2, "fast"), _train_reply(2, "b", 20, 10.0, "slow")], {"a": 0.3, "b": 10.2})
    assert pace.steps_for(1) is None
    assert pace.steps_for(2) == int((SAFETY * 2.0 - 0.2) / 0.5) == 2


def test_the_overhead_is_learnt_from_the_first_reply_in_time_after_a_late_first_reply(tmp_path: Path) -> None:
    # bench.stragglers, round deadline 0.8 s: site-c's start-up made its first reply late; its next reply was
    # in time (3 steps at 0.15 s/step, arriving at 0.78 s: 0.33 s of set-up and transport). Planned without
    # that overhead it got 4 steps (0.6 s of 0.64 s) and missed the deadline again.
    pace = Pace(_run(tmp_path, **{"round-deadline": 0.8, "local-steps": 8}))
    pace.observe([_train_reply(2, "late", 8, 1.2, "slow")], {})  # late: its reply is no phase's own
    assert pace.steps_for(2) == int(SAFETY * 0.8 / 0.15) == 4
    pace.observe([_train_reply(2, "b", 3, 0.45, "slow")], {"b": 0.78})
    assert pace.steps_for(2) == int((SAFETY * 0.8 - 0.33) / 0.15) == 2


def test_until_its_overhead_is_measured_a_node_is_planned_with_the_other_nodes_median(tmp_path: Path) -> None:
    pace = Pace(_run(tmp_path, **{"round-deadline": 0.8, "local-steps": 8}))
    for answers, arrived in (("a0", 5.0), ("a1", 0.3), ("b0", 5.0), ("b1", 0.4), ("d0", 5.0), ("d1", 0.5)):
        node = {"a": 1, "b": 3, "d": 4}[answers[0]]
        pace.observe([_train_reply(node, answers, 8, 0.16, "fast")], {answers: arrived})
    # Overheads 0.14, 0.24, 0.34 s: site-c, whose only reply was late, is planned with 0.24 s.
    pace.observe([_train_reply(2, "late", 8, 1.2, "slow")], {})
    assert pace.steps_for(2) == int((SAFETY * 0.8 - 0.24) / 0.15) == 2


def test_a_straggler_not_yet_measured_is_halved_then_recovers(tmp_path: Path) -> None:
    pace = Pace(_run(tmp_path))
    pace.missed([2])
    assert pace.steps_for(2) == 10
    pace.missed([2])
    assert pace.steps_for(2) == 5
    pace.observe([_train_reply(2, "c", 5, 0.05, "slow")], {"c": 0.1})  # in time, and fast after all
    assert pace.steps_for(2) == 10


def test_pace_is_off_without_adaptive_local_steps(tmp_path: Path) -> None:
    pace = Pace(_run(tmp_path, **{"adaptive-local-steps": False}))
    pace.observe([_train_reply(2, "b", 20, 100.0, "slow")], {"b": 100.0})
    pace.missed([2])
    assert pace.steps_for(2) is None


# --- the federation's train phase with a deadline (real time, fractions of a second) --------------


class TimedGrid:
    """A grid whose node ``n`` replies to a training message ``delays[n]`` real seconds after the push."""

    def __init__(self, delays: dict[int, float]) -> None:
        self.delays, self.ready, self.count = delays, {}, 0
        self.received: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.delays)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            self.count += 1
            mid = f"m{self.count}"
            msg.metadata.__dict__["_message_id"] = mid
            self.received.append(msg)
            node = msg.metadata.dst_node_id
            steps = int(msg.content["config"].get(LOCAL_STEPS, 20)) if "config" in msg.content else 20
            self.ready[mid] = (
                time.monotonic() + self.delays[node],
                _train_reply(node, mid, steps, self.delays[node], f"site-{node}"),
            )
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        now = time.monotonic()
        return [self.ready.pop(m)[1] for m in list(message_ids) if m in self.ready and self.ready[m][0] <= now]


def _federation(tmp_path: Path, grid: TimedGrid, **overrides: object) -> Federation:
    run = _run(tmp_path, **overrides)
    return Federation(grid, run, build_strategy(run), RunDir(run.run_dir), torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def _asks(nodes: Iterable[int]) -> list[Message]:
    return [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes
    ]


def test_the_train_phase_names_stragglers_and_discards_their_late_reply(tmp_path: Path) -> None:
    grid = TimedGrid({1: 0.01, 2: 0.02})
    fed = _federation(tmp_path, grid, **{"round-deadline": 0.3})
    ok, rejected = fed._send(_asks([1, 2]), deadline=True)  # everyone in time: the sites get their names
    assert len(ok) == 2 and not rejected and fed.stragglers == []
    grid.delays[2] = 0.6
    fed._round = 2
    started = time.monotonic()
    ok, rejected = fed._send(_asks([1, 2]), deadline=True)
    assert time.monotonic() - started < 0.55  # did not wait for site-2
    assert [m.metadata.src_node_id for m in ok] == [1] and fed.stragglers == ["site-2"]
    assert [r.site for r in rejected] == ["site-2"] and rejected[0].reason.startswith("straggler")
    time.sleep(0.4)
    ok, rejected = fed._send(_asks([1]))  # the next phase pulls the late reply and rejects it
    assert len(ok) == 1
    assert [(r.site, r.reason) for r in rejected] == [("site-2", "late: a straggler's reply to round 2, discarded")]
    assert not fed.outstanding
    # Its step time (0.6 s / 20 steps) arrived with it: site-2 gets the steps that fit 0.3 s.
    assert fed.pace.steps_for(2) == int((SAFETY * 0.3 - 0.0) / (0.6 / 20))


def test_paced_sites_get_their_own_local_steps_in_the_train_config(tmp_path: Path) -> None:
    grid = TimedGrid({1: 0.01, 2: 0.01})
    fed = _federation(tmp_path, grid)
    fed.node_sites = {1: "site-1", 2: "site-2"}
    fed.pace.missed([2])
    arrays = ArrayRecord(torch.nn.Linear(2, 2).state_dict())
    messages = fed._train_messages(3, arrays)
    steps = {m.metadata.dst_node_id: m.content["config"].get(LOCAL_STEPS) for m in messages}
    assert steps == {1: None, 2: 10} and fed.paced == {"site-2": 10}
    assert all(m.content["arrays"] is messages[0].content["arrays"] for m in messages)  # not copied per site


# --- configuration and the rehearsal slowdown ------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"round-deadline": 60.0, "round-timeout": 30.0}, "round-deadline (60 s) must be shorter than round-timeout"),
        ({"round-deadline": 0.0, "adaptive-local-steps": True}, "adaptive-local-steps needs round-deadline > 0"),
        ({"round-deadline": -1.0}, "round-deadline"),
        ({"round-deadline": 5.0, "strategy": "scaffold"}, "round-deadline does not apply to strategy = scaffold"),
    ],
)
def test_run_config_checks_the_deadline(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_flat(overrides)


def _site(rehearsal: dict[str, object]) -> dict[str, object]:
    return {
        "name": "site-a",
        "dataset": "ixi",
        "data_path": "/data",
        "rehearsal": rehearsal,
        "scanner": {
            "field_strength_t": 3.0,
            "coils": 4,
            "matrix": [64, 64],
            "mask": "poisson",
            "acceleration": 4.0,
            "center_fraction": 0.08,
        },
    }


def test_site_rehearsal_slowdown_is_validated() -> None:
    assert parse_site_config(_site({"slowdown": 4.0}), "site-a.toml").rehearsal.slowdown == 4.0
    assert parse_site_config(_site({}), "site-a.toml").rehearsal.slowdown == 1.0
    with pytest.raises(ConfigError, match=r"site-a.toml.*rehearsal.slowdown"):
        parse_site_config(_site({"slowdown": 0.5}), "site-a.toml")
    with pytest.raises(ConfigError, match=r"site-a.toml.*rehearsal.delay"):
        parse_site_config(_site({"delay": 1.0}), "site-a.toml")


def test_slowed_steps_take_slowdown_times_as_long() -> None:
    clock = Clock()
    timed: list[float] = []
    step = slowed(lambda: timed.append(clock.now), 4.0, clock=clock, sleep=clock.sleep)
    assert step is not None
    for _ in range(3):
        clock.now += 0.1  # the step's own work
        step()
    assert timed == pytest.approx([0.4, 0.8, 1.2])  # the step timer sees the slowed steps
    assert slowed(None, 1.0) is None


# --- the metrics table ------------------------------------------------------------------------------


def test_metrics_show_lists_the_stragglers_of_each_round(tmp_path: Path) -> None:
    store = RunDir(tmp_path / "run")
    store.init({"name": "slow", "strategy": "fedavg", "num_rounds": 2}, resume=False)
    for rnd, stragglers, steps in ((1, ["node-7"], {}), (2, ["site-c"], {"site-c": 3})):
        site = site_record("slow", rnd, "train", "site-a", 4, {"loss": 0.1})
        summary = global_record("slow", rnd, "train", [site], stragglers=stragglers)
        summary["metrics"]["stragglers"] = 1.0
        if steps:
            summary["local_steps"] = steps
        store.append_metrics([site, summary])
    out = io.StringIO()
    show(store.path, out=out)
    text = out.getvalue()
    assert "train · stragglers (round-deadline)" in text
    rows = [line for line in text.splitlines() if "node-7" in line or "site-c" in line]
    assert len(rows) == 2 and "site-c: 3" in rows[1]
    assert "stragglers" not in _shown(tmp_path / "plain")  # a run without a deadline has no such table


def _shown(path: Path) -> str:
    store = RunDir(path)
    store.init({"name": "plain", "strategy": "fedavg", "num_rounds": 1}, resume=False)
    site = site_record("plain", 1, "train", "site-a", 4, {"loss": 0.1})
    store.append_metrics([site, global_record("plain", 1, "train", [site])])
    out = io.StringIO()
    show(store.path, out=out)
    return out.getvalue()


def test_a_site_still_training_is_not_sent_the_next_round_and_counts_as_a_straggler(tmp_path: Path) -> None:
    grid = TimedGrid({1: 0.01, 2: 0.01, 3: 0.01})
    fed = _federation(tmp_path, grid, **{"round-deadline": 0.2})
    fed._send(_asks([1, 2, 3]), deadline=True)
    grid.delays[3] = 0.5
    fed._round = 2
    fed._send(_asks([1, 2, 3]), deadline=True)
    assert fed.stragglers == ["site-3"]
    fed._round = 3
    fed.paced = {"site-1": 5, "site-3": 10}  # as _train_messages would have planned them
    ok, rejected = fed._send(_asks([1, 2, 3]), deadline=True)  # site-3 is still on round 2: not asked
    assert fed.paced == {"site-1": 5}  # the round's record does not claim steps site-3 was never sent
    assert [m.metadata.src_node_id for m in ok] == [1, 2] and fed.stragglers == ["site-3"]
    assert [(r.site, r.reason) for r in rejected] == [
        ("site-3", "straggler: still training round 2; not sent this phase")
    ]
    assert [m.metadata.dst_node_id for m in grid.received[-2:]] == [1, 2]
    time.sleep(0.4)  # site-3 has finished round 2 now
    fed._round = 4
    grid.delays[3] = 0.01
    ok, rejected = fed._send(_asks([1, 2, 3]), deadline=True)  # its late reply is pulled first, so it is asked
    assert [m.metadata.src_node_id for m in ok] == [1, 2, 3] and fed.stragglers == []
    assert [(r.site, r.reason) for r in rejected] == [("site-3", "late: a straggler's reply to round 2, discarded")]
    assert not fed.outstanding


def test_fine_tuning_waits_for_a_straggler_still_training_so_every_site_takes_part(tmp_path: Path) -> None:
    grid = TimedGrid({1: 0.01, 2: 0.01})
    fed = _federation(tmp_path, grid, **{"round-deadline": 0.2})
    fed._send(_asks([1, 2]), deadline=True)
    grid.delays[2] = 0.8
    fed._round = 2
    fed._send(_asks([1, 2]), deadline=True)
    assert fed.stragglers == ["site-2"]
    grid.delays[2] = 0.01
    started = time.monotonic()
    ok, rejected = fed._send(_asks([1, 2]), settle=True)  # the fine-tuning phase
    assert time.monotonic() - started >= 0.4  # waited for site-2's round 2 ...
    assert [m.metadata.src_node_id for m in ok] == [1, 2]  # ... then asked it too
    assert [r.reason for r in rejected] == ["late: a straggler's reply to round 2, discarded"]
