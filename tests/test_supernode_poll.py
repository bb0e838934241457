"""The site's SuperNode poll: Flower's own SuperNode loop, run with the patch, waits short and backs off.

The loop under test is the installed ``flwr.supernode.start_client_internal`` itself; only its
network connection, its pull's answers and the clock are stand-ins, so a Flower loop that still
slept its fixed 3 s (patch not applied, or not reaching the loop) fails here.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import threading
import time
import types
from collections.abc import Iterator

import pytest

from client import supernode_poll
from client.supernode import build_parser, build_supernode_command
from client.supernode_poll import superexec_env
from common.errors import ConfigError

flower = importlib.import_module(supernode_poll.FLOWER_MODULE)
objects = importlib.import_module(supernode_poll.OBJECT_PULL_MODULES[0])


class _Done(Exception):
    """Ends Flower's endless SuperNode loop in a test."""


@pytest.fixture()
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every ``time.sleep`` made from here on, recorded instead of slept; Flower's module restored afterwards."""
    recorded: list[float] = []
    monkeypatch.setattr(time, "sleep", recorded.append)
    for name in (
        "time",
        "_pull_and_store_message",
        "_push_messages",
        "_init_connection",
        "register_signal_handlers",
        "pull_objects",
    ):
        monkeypatch.setattr(flower, name, getattr(flower, name))  # undone at teardown, whatever install() did
    monkeypatch.delattr(flower, "__fedsense_poll__", raising=False)
    return recorded


def _run_flower_loop(monkeypatch: pytest.MonkeyPatch, pulls: list[int | None], patch: bool) -> list[int]:
    """Run Flower's real ``start_client_internal`` against scripted pulls; returns the run ids it pushed for."""
    script = iter(pulls)
    pushed: list[int] = []

    def scripted_pull(**_: object) -> int | None:
        try:
            return next(script)
        except StopIteration:
            raise _Done from None

    @contextlib.contextmanager
    def connection(**_: object) -> Iterator[tuple]:
        yield (42, *([None] * 7))

    monkeypatch.setattr(flower, "_pull_and_store_message", scripted_pull)
    if patch:  # before the stand-ins below, which the patch's own check would refuse
        assert supernode_poll.install(1.0)
    monkeypatch.setattr(flower, "_push_messages", lambda **_: pushed.append(len(pushed)))
    monkeypatch.setattr(flower, "_init_connection", connection)
    monkeypatch.setattr(flower, "register_signal_handlers", lambda **_: None)
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate import NodeStateFactory

    with pytest.raises(_Done):
        flower.start_client_internal(
            state_factory=NodeStateFactory(ObjectStoreFactory()),
            server_address="x:1",
            node_config={},
            insecure=True,
            isolation="process",
        )
    return pushed


def _expected_waits(first: float, longest: float, empty_pulls: int) -> list[float]:
    """Independent of ``backoff``: first, doubled each time, never above longest."""
    return [min(first * 2**k, longest) for k in range(empty_pulls)]


def test_the_patched_flower_loop_backs_off_and_starts_short_after_each_message(
    sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    pushed = _run_flower_loop(monkeypatch, [None] * 6 + [7] + [None] * 2 + [7] + [7], patch=True)
    assert len(pushed) == 3
    assert sleeps == _expected_waits(0.1, 1.0, 6) + _expected_waits(0.1, 1.0, 2)
    assert sleeps == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 0.1, 0.2]


def test_without_the_patch_flower_waits_3_s_per_empty_pull(
    sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stand-ins reproduce the cost the patch removes (so the test above can tell the two apart)."""
    _run_flower_loop(monkeypatch, [None, None, 7], patch=False)
    assert sleeps == [3, 3]


def test_reply_steps_are_short(sleeps: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's real ``_push_messages`` looks for the ClientApp's reply every REPLY_STEP s, not every 0.5 s."""
    looks = iter([[], [], []])

    class State:
        def get_messages_legacy(self, **_: object) -> list:
            try:
                return next(looks)
            except StopIteration:
                raise _Done from None

    assert supernode_poll.install(1.0, reply_step=0.05)
    with pytest.raises(_Done):
        flower._push_messages(state=State(), object_store=None, send=None, push_object=None)
    assert sleeps == [0.05, 0.05, 0.05]
    flower.time.sleep(3)  # any other length is the time module's own
    assert sleeps[-1] == 3 and flower.time.monotonic is time.monotonic


def test_install_is_idempotent(sleeps: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    assert supernode_poll.install(1.0)
    pull = flower._pull_and_store_message
    assert supernode_poll.install(0.5) and flower._pull_and_store_message is pull


def test_missing_target_falls_back_to_flowers_waits(caplog: pytest.LogCaptureFixture) -> None:
    module = types.SimpleNamespace(
        time=time, start_client_internal=flower.start_client_internal, _push_messages=flower._push_messages
    )  # no _pull_and_store_message
    with caplog.at_level(logging.WARNING, logger="client.supernode_poll"):
        assert not supernode_poll.install(1.0, module=module)
    assert "_pull_and_store_message does not exist" in caplog.text
    assert module.time is time and not hasattr(module, "_pull_and_store_message")


def test_changed_flower_loop_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    def start_client_internal() -> None:
        """A loop that pulls but waits differently."""
        _pull_and_store_message()  # noqa: F821 - never called

    module = types.SimpleNamespace(
        time=time,
        start_client_internal=start_client_internal,
        _pull_and_store_message=flower._pull_and_store_message,
        _push_messages=flower._push_messages,
    )
    with caplog.at_level(logging.WARNING, logger="client.supernode_poll"):
        assert not supernode_poll.install(1.0, module=module)
    assert "time.sleep(3)" in caplog.text and module._pull_and_store_message is flower._pull_and_store_message


def test_other_flower_version_falls_back(
    sleeps: list[float], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(supernode_poll, "flower_version", lambda: "1.42.0")
    pull = flower._pull_and_store_message
    with caplog.at_level(logging.WARNING, logger="client.supernode_poll"):
        assert not supernode_poll.install(1.0)
    assert "flwr 1.42.0" in caplog.text
    assert flower._pull_and_store_message is pull and flower.time is time


@pytest.mark.parametrize(
    ("value", "expected"), [(None, 1.0), ("", 1.0), ("0.5", 0.5), (2, 2.0), ("flower", None), (" Flower ", None)]
)
def test_poll_interval_values(value: object, expected: float | None) -> None:
    assert supernode_poll.parse_poll_interval(value, "--poll-interval") == expected


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "61", "soon"])
def test_bad_poll_interval_is_refused_by_name(value: str) -> None:
    with pytest.raises(ConfigError, match="FEDSENSE_POLL_INTERVAL"):
        supernode_poll.parse_poll_interval(value, "FEDSENSE_POLL_INTERVAL")


def test_the_site_runs_the_short_poll_supernode(tmp_path) -> None:
    site = tmp_path / "site.toml"
    site.write_text("", encoding="utf-8")
    cmd = build_supernode_command("link:9092", None, None, site, insecure=True, poll_interval="0.5")
    assert cmd[1:3] == ["-m", "client.supernode_poll"]
    assert cmd[-2:] == ["--poll-interval", "0.5"]
    assert "--poll-interval" not in build_supernode_command("link:9092", None, None, site, insecure=True)
    with pytest.raises(ConfigError, match="--poll-interval"):
        build_supernode_command("link:9092", None, None, site, insecure=True, poll_interval="never")
    args = build_parser().parse_args(["--superlink", "a:1", "--site-config", "s", "--poll-interval", "0.3"])
    assert args.poll_interval == "0.3"


def test_the_warm_superexec_polls_its_supernode_often_unless_told() -> None:
    assert superexec_env(None, {})[supernode_poll.SUPEREXEC_POLL_ENV] == "0.2"
    assert superexec_env("0.1", {})[supernode_poll.SUPEREXEC_POLL_ENV] == "0.1"
    assert supernode_poll.SUPEREXEC_POLL_ENV not in superexec_env("flower", {})
    assert superexec_env(None, {supernode_poll.SUPEREXEC_POLL_ENV: "2"})[supernode_poll.SUPEREXEC_POLL_ENV] == "2"
    assert superexec_env(None, {"FEDSENSE_POLL_INTERVAL": "flower"}).get(supernode_poll.SUPEREXEC_POLL_ENV) is None
    # Told through the environment, the SuperExec's forked ClientApps keep Flower's object-pull waits too.
    assert superexec_env("flower", {})["FEDSENSE_POLL_INTERVAL"] == "flower"


@pytest.fixture()
def object_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every back-off wait of Flower's real ``pull_objects``, recorded instead of waited; patches undone afterwards."""
    waits: list[float] = []

    class Event(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(float(timeout or 0.0))
            return False

    monkeypatch.setattr(objects, "threading", types.SimpleNamespace(Lock=threading.Lock, Event=Event))
    for module in (objects, flower):
        monkeypatch.setattr(module, "pull_objects", module.pull_objects)
    return waits


def _pull_missing_three_times(module: types.ModuleType) -> dict[str, bytes]:
    """One object that is not there for three tries, pulled as Flower's ClientApp pulls its message
    (``pull_and_inflate_object_from_tree`` passes Flower's back-off explicitly)."""
    tries = iter([None, None, None, b"weights"])

    def pull_object(object_id: str) -> bytes:
        if (content := next(tries)) is None:
            raise objects.ObjectUnavailableError(object_id)
        return content

    return module.pull_objects(["a"], pull_object, initial_backoff=1, backoff_cap=10, max_tries_per_object=500)


def test_object_pulls_retry_after_tenths_of_a_second_with_the_patch(object_waits: list[float]) -> None:
    assert "pull_objects(" in inspect.getsource(objects.pull_and_inflate_object_from_tree)  # looked up at call time
    assert supernode_poll.install_object_pulls()
    assert _pull_missing_three_times(objects) == {"a": b"weights"}
    assert object_waits == pytest.approx([0.05, 0.1, 0.2], rel=0.21)  # Flower adds ±20 % jitter
    assert flower.pull_objects is not objects.pull_objects and flower.pull_objects.__fedsense_poll__
    assert supernode_poll.install_object_pulls()  # idempotent: not wrapped twice
    assert flower.pull_objects.__wrapped__.__name__ == "pull_objects" and not hasattr(
        flower.pull_objects.__wrapped__, "__fedsense_poll__"
    )


def test_without_the_patch_object_pulls_wait_seconds(object_waits: list[float]) -> None:
    assert _pull_missing_three_times(objects) == {"a": b"weights"}
    assert object_waits == pytest.approx([1, 2, 4], rel=0.21)


def test_object_pulls_fall_back_on_another_flower(
    object_waits: list[float], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(supernode_poll, "flower_version", lambda: "1.42.0")
    with caplog.at_level(logging.WARNING, logger="client.supernode_poll"):
        assert not supernode_poll.install_object_pulls()
    assert "flwr 1.42.0" in caplog.text
    monkeypatch.undo()
    module = types.SimpleNamespace(__name__="changed", pull_objects=lambda object_ids, pull_object_fn: {})
    with caplog.at_level(logging.WARNING, logger="client.supernode_poll"):
        assert not supernode_poll.install_object_pulls(modules=[module])
    assert "changed.pull_objects does not take initial_backoff" in caplog.text
