"""Reply collection: returns as soon as every reply is in, polls with a bounded back-off, honours the timeout."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable

import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server import collect
from server.collect import MAX_INTERVAL, send_and_collect


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class Clock:
    """Virtual time: ``sleep`` advances it, so a test of a 60 s timeout takes no time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


class DelayedGrid:
    """A grid whose reply to node ``n`` becomes available ``delays[n]`` virtual seconds after the push."""

    def __init__(self, clock: Clock, delays: dict[int, float | None]) -> None:
        self.clock, self.delays = clock, delays
        self.ready: dict[str, tuple[float, Message]] = {}
        self.pulls = 0

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            delay = self.delays[msg.metadata.dst_node_id]
            if delay is not None:
                self.ready[f"m{i}"] = (self.clock.now + delay, Message(RecordDict(), reply_to=msg))
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        out = []
        for mid in list(message_ids):
            if mid in self.ready and self.ready[mid][0] <= self.clock.now:
                out.append(self.ready.pop(mid)[1])
        return out


def asks(nodes: Iterable[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]


def test_returns_within_one_short_poll_of_the_last_reply() -> None:
    clock = Clock()
    grid = DelayedGrid(clock, {1: 0.3, 2: 7.0, 3: 7.2})
    replies = send_and_collect(grid, asks([1, 2, 3]), timeout=3600.0, clock=clock, sleep=clock.sleep)
    assert len(replies) == 3
    # Each reply is stamped with the poll that found it: no later than one back-off step after it arrived.
    for arrival, ready in zip(sorted(replies, key=lambda a: a.seconds), (0.3, 7.0, 7.2)):
        assert ready <= arrival.seconds <= ready + MAX_INTERVAL
    # Flower's grid would finish on its 3 s grid (9 s); the back-off is capped at MAX_INTERVAL (0.25 s).
    assert 7.2 <= clock.now <= 7.2 + MAX_INTERVAL <= 7.2 + 0.25
    assert max(clock.sleeps) <= MAX_INTERVAL and min(clock.sleeps) == pytest.approx(0.05)


def test_a_silent_node_costs_exactly_the_timeout() -> None:
    clock = Clock()
    grid = DelayedGrid(clock, {1: 0.1, 2: None})
    replies = send_and_collect(grid, asks([1, 2]), timeout=60.0, clock=clock, sleep=clock.sleep)
    assert [r.message.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert clock.now == pytest.approx(60.0)
    # Bounded polling: at most one pull per MAX_INTERVAL once back-off has saturated, not a busy loop.
    assert grid.pulls <= 60.0 / MAX_INTERVAL + 10


def test_all_replies_already_there_means_no_sleep() -> None:
    clock = Clock()
    grid = DelayedGrid(clock, {1: 0.0, 2: 0.0})
    assert len(send_and_collect(grid, asks([1, 2]), timeout=10.0, clock=clock, sleep=clock.sleep)) == 2
    assert clock.sleeps == []


def test_reply_objects_are_retried_quickly_and_patiently(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    grid_module = importlib.import_module(collect.REPLY_OBJECTS_MODULE)
    # Flower's own (a ServerApp run earlier in this process has wrapped it already); restored afterwards.
    flower_pull = getattr(grid_module.pull_objects, "func", grid_module.pull_objects)
    monkeypatch.setattr(grid_module, "pull_objects", flower_pull)
    assert collect.quick_reply_object_pulls() and collect.quick_reply_object_pulls()  # idempotent
    patched = grid_module.pull_objects
    assert patched.func is flower_pull  # wrapped once
    assert patched.keywords == {
        "initial_backoff": collect.FIRST_INTERVAL,
        "backoff_cap": collect.REPLY_OBJECT_LONGEST,
        "max_tries_per_object": None,
    }
    monkeypatch.setattr(grid_module, "pull_objects", lambda object_ids, pull_object_fn: {})
    with caplog.at_level(logging.WARNING, logger="server.collect"):
        assert not collect.quick_reply_object_pulls()
    assert "does not take backoff_cap" in caplog.text
