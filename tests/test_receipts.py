"""Exactly-once accounting: late, duplicate and replayed replies are rejected with a reason and recorded.

The federation's own ``_send`` runs against a grid that answers each pushed message once, and in
addition delivers what a faulty network would: a reply to a message of an earlier round, the same
reply twice, and an old reply replayed under its old id.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.runconfig import RunConfig
from server.federation import Federation
from server.receipts import RECEIVED_FILE, Receipts, read_receipts
from server.strategy import build_strategy


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are stamped with the sending task's identity; here that is the ServerApp's."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


def request(node: int, message_id: str) -> Message:
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node, message_type="train")
    msg.metadata.__dict__["_message_id"] = message_id
    return msg


def answer(req: Message, site: str, message_id: str) -> Message:
    reply = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 3}), "site": ConfigRecord({"name": site})}), reply_to=req
    )
    reply.metadata.__dict__["_message_id"] = message_id
    reply.metadata.__dict__["_src_node_id"] = req.metadata.dst_node_id
    return reply


class FaultyGrid:
    """Answers each pushed message once (site by node); ``network`` may change what the first pull delivers."""

    def __init__(self, sites: dict[int, str]) -> None:
        self.sites = sites
        self.replies: list[Message] = []
        self.pushed = 0
        self.network: Callable[[list[Message]], list[Message]] = lambda replies: replies

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            self.pushed += 1
            msg.metadata.__dict__["_message_id"] = f"req-{self.pushed}"
            self.replies.append(answer(msg, self.sites[msg.metadata.dst_node_id], f"rep-{self.pushed}"))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        out, self.replies = self.network(self.replies), []
        self.network = lambda replies: replies
        return out


def federation(tmp_path: Path, grid: FaultyGrid) -> Federation:
    run = RunConfig.from_flat({"name": "receipts", "run-dir": str(tmp_path), "round-timeout": 1.0})
    return Federation(grid, run, build_strategy(run), None, None)  # type: ignore[arg-type]


def test_late_duplicate_and_replayed_replies_are_rejected_with_reasons(tmp_path: Path) -> None:
    grid = FaultyGrid({1: "site-a", 2: "site-b", 3: "site-c"})
    fed = federation(tmp_path, grid)
    ok, rejected = fed._send([request(n, "") for n in (1, 2, 3)])
    fed._record(1, "train", ok, rejected)
    assert [m.metadata.message_id for m in ok] == ["rep-1", "rep-2", "rep-3"] and rejected == []
    late = ok[0]

    def faulty(replies: list[Message]) -> list[Message]:
        a, b, c = replies  # this round's honest replies, for nodes 1, 2, 3
        c.metadata.__dict__["_message_id"] = "rep-3"  # reuses an id accepted in round 1: a replay
        return [late, a, b, b, c]  # round 1's site-a reply turns up late; site-b's comes twice

    grid.network = faulty
    ok, rejected = fed._send([request(n, "") for n in (1, 2, 3)])
    fed._record(2, "train", ok, rejected)
    assert [m.metadata.message_id for m in ok] == ["rep-4", "rep-5"]
    reasons = sorted((r.site, r.reason) for r in rejected)
    assert reasons == [
        ("node-3", "no reply within round-timeout (1 s)"),  # its only reply was the replay
        ("site-a", "late or stray: answers message req-1, which this phase did not send"),
        ("site-b", "duplicate: a second reply to message req-5"),
        ("site-c", "replayed: message rep-3 was already accepted in this run"),
    ]
    lines = read_receipts(tmp_path / RECEIVED_FILE)
    accepted = [(line["round"], line["site"], line["message_id"]) for line in lines if line["accepted"]]
    assert accepted == [
        (1, "site-a", "rep-1"),
        (1, "site-b", "rep-2"),
        (1, "site-c", "rep-3"),
        (2, "site-a", "rep-4"),
        (2, "site-b", "rep-5"),
    ]
    round2 = [line for line in lines if line["round"] == 2 and not line["accepted"]]
    # One line per reply received: node 3 did answer (with the replay), so it has no "no reply" line.
    assert sorted(line["reason"].split(":")[0] for line in round2) == ["duplicate", "late or stray", "replayed"]


def test_a_resumed_run_remembers_what_it_accepted(tmp_path: Path) -> None:
    req = request(1, "req-1")
    Receipts(tmp_path).record(
        1, "train", {"req-1": 1}, [answer(req, "site-a", "rep-1")], [answer(req, "site-a", "rep-1")], []
    )
    again = [answer(request(1, "req-9"), "site-a", "rep-1")]
    assert Receipts(tmp_path, resume=True).screen({"req-9": 1}, again)[1][0].reason.startswith("replayed")
    assert Receipts(tmp_path).screen({"req-9": 1}, again)[1] == []  # a fresh run starts a fresh ledger
    assert json.loads((tmp_path / RECEIVED_FILE).read_text().splitlines()[0])["reply_to"] == "req-1"
