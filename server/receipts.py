"""Exactly-once accounting of replies: every reply the server receives, what became of it, and why.

Over a real network a reply can come twice (a retried upload), late (an answer to an earlier round's
message, after that round gave up on it) or be replayed. Flower links each reply to the message it
answers (``reply_to_message_id``), so a phase accepts only first replies to its own messages and only
message ids this run has not accepted before; everything else is rejected with its reason. Each
phase's verdicts are appended to ``received.jsonl`` in the run directory, one line per reply
received plus one per message that got none, so a run's record shows each accepted update exactly
once and no round mixing two rounds' updates.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message

from server.strategy import Rejection, site_of

logger = logging.getLogger(__name__)

RECEIVED_FILE = "received.jsonl"


class Receipts:
    """The run's ledger of replies (``received.jsonl``); remembers accepted message ids across phases."""

    def __init__(self, run_dir: str | Path, resume: bool = False) -> None:
        self.path = Path(run_dir) / RECEIVED_FILE
        #: Ids of the replies accepted so far in this run (a resumed run: also before it stopped).
        self.accepted: set[str] = (
            {r["message_id"] for r in read_receipts(self.path) if r["accepted"] and r["message_id"]}
            if resume
            else set()
        )

    def screen(self, sent: Mapping[str, int], replies: list[Message]) -> tuple[list[Message], list[Rejection]]:
        """Keep the first reply to each of this phase's messages (``sent``: message id -> node); reject the rest.

        Rejected: a reply to a message this phase did not send (a late reply to an earlier phase or
        round), a second reply to one message, and a message id this run has already accepted (a replay).
        """
        kept, rejected, answered = [], [], set()
        for msg in replies:
            answers, own = msg.metadata.reply_to_message_id, msg.metadata.message_id
            if answers not in sent:
                reason = f"late or stray: answers message {answers[:12]}, which this phase did not send"
            elif own and own in self.accepted:
                reason = f"replayed: message {own[:12]} was already accepted in this run"
            elif answers in answered:
                reason = f"duplicate: a second reply to message {answers[:12]}"
            else:
                answered.add(answers)
                kept.append(msg)
                continue
            rejected.append(Rejection(_name(msg), reason, own))
            logger.warning("rejected reply from %s: %s", _name(msg), reason)
        return kept, rejected

    def record(
        self,
        rnd: int,
        phase: str,
        sent: Mapping[str, int],
        received: list[Message],
        accepted: list[Message],
        rejected: list[Rejection],
    ) -> None:
        """Append one phase's verdicts: each reply received (accepted, or the reason it was not) and each silence."""
        reasons = {r.message_id: r.reason for r in rejected if r.message_id}
        taken = {m.metadata.message_id for m in accepted}
        unclaimed = set(taken)  # a duplicate carries its original's id: only the first one received is the accepted one
        lines: list[dict[str, Any]] = []
        for msg in received:
            own = msg.metadata.message_id
            ok = own in unclaimed
            unclaimed.discard(own)
            lines.append(
                {
                    "round": rnd,
                    "phase": phase,
                    "message_id": own,
                    "reply_to": msg.metadata.reply_to_message_id,
                    "node": msg.metadata.src_node_id,
                    "site": _name(msg),
                    "accepted": ok,
                    "reason": "" if ok else reasons.get(own, "not aggregated"),
                }
            )
        answered = {m.metadata.reply_to_message_id for m in received}
        for message_id, node in sent.items():
            if message_id not in answered:
                lines.append(
                    {
                        "round": rnd,
                        "phase": phase,
                        "message_id": "",
                        "reply_to": message_id,
                        "node": node,
                        "site": f"node-{node}",
                        "accepted": False,
                        "reason": "no reply",
                    }
                )
        self.accepted |= taken
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.writelines(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
            stream.flush()
            os.fsync(stream.fileno())


def _name(msg: Message) -> str:
    """The site a reply names; an error reply has no content, so its node stands in."""
    return site_of(msg) if msg.has_content() else f"node-{msg.metadata.src_node_id}"


def read_receipts(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a ``received.jsonl`` (none if there is none; a torn last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            logger.warning("%s: skipped a torn line", path)
    return lines
