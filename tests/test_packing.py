"""Packed messages: every array of a message as one buffer on the wire, unpacked exactly as it was."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import transport as site
from common import protocol
from common.errors import FedSenseError
from common.models import build_model
from common.packing import Manifest, pack, unpack
from server import transport as hub


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "transposed": rng.standard_normal((3, 5)).astype(np.float32).T,  # not C-contiguous
        "dc.weight": np.array(0.5, dtype=np.float32),  # 0-d, as the unrolled networks' DC weights are
        "bn.num_batches_tracked": np.array([7], dtype=np.int64),
        "empty": np.zeros((0, 2), dtype=np.float64),
        "half": np.arange(5, dtype=np.float16),
    }


def test_pack_round_trip_keeps_names_order_dtypes_shapes_and_values() -> None:
    arrays = _arrays()
    buffer, manifest = pack(arrays)
    assert buffer.dtype == np.uint8 and buffer.ndim == 1
    assert buffer.size == sum(a.nbytes for a in arrays.values())
    back = unpack(buffer, Manifest.from_config(manifest.to_config("arrays"), "arrays"))
    assert list(back) == list(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape
        np.testing.assert_array_equal(back[name], array)
    assert not np.shares_memory(back["conv.weight"], buffer)


def test_a_manifest_that_does_not_fit_the_buffer_is_refused() -> None:
    buffer, manifest = pack(_arrays())
    with pytest.raises(FedSenseError, match="runs past the end"):
        unpack(buffer[:-3], manifest)
    with pytest.raises(FedSenseError, match="bytes left over"):
        unpack(np.concatenate([buffer, np.zeros(4, np.uint8)]), manifest)
    with pytest.raises(FedSenseError, match="no valid manifest for 'arrays'"):
        Manifest.from_config({"arrays.names": ["a"]}, "arrays")


def _content(state: dict[str, torch.Tensor]) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": 2})})


def test_server_packing_is_what_the_site_unpacks_and_back() -> None:
    state = build_model("unrolled").state_dict()  # 0-d DC weights included
    packed = protocol.pack_content(_content(state), hub.RECORDS)
    assert len(packed["arrays"]) == 1 and packed["config"]["server-round"] == 2
    at_site = protocol.unpack_content(packed, site.RECORDS)["arrays"].to_torch_state_dict()
    assert list(at_site) == list(state) and all(torch.equal(at_site[k], state[k]) for k in state)
    reply = protocol.pack_content(
        RecordDict({"arrays": ArrayRecord(at_site), "metrics": MetricRecord({"loss": 1.0})}), site.RECORDS
    )
    back = protocol.unpack_content(reply, hub.RECORDS)
    assert back["metrics"]["loss"] == 1.0 and protocol.MANIFEST not in back
    assert all(torch.equal(back["arrays"].to_torch_state_dict()[k], state[k]) for k in state)
    # Content that was never packed passes through untouched.
    plain = RecordDict({"metrics": MetricRecord({"psnr": 30.0})})
    assert (
        protocol.unpack_content(plain, hub.RECORDS) is plain and protocol.unpack_content(plain, site.RECORDS) is plain
    )


class RecordingGrid:
    """Stands in for Flower's grid: stamps ids on what it is pushed, answers with scripted replies."""

    def __init__(self, replies: list[Message]) -> None:
        self.pushed: list[Message] = []
        self.replies = replies

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.pushed.append(msg)
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return self.replies


def test_the_packed_grid_packs_shared_content_once_and_unpacks_replies() -> None:
    state = build_model("unet", chans=4, num_pool_layers=2).state_dict()
    content = _content(state)
    messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2)]
    ask = Message(RecordDict(), dst_node_id=3, message_type=MessageType.TRAIN)
    reply = Message(protocol.pack_content(_content(state), site.RECORDS), reply_to=ask)
    failed = Message(Error(code=0, reason="site down"), reply_to=ask)
    inner = RecordingGrid([reply, failed])
    grid = hub.PackedGrid(inner)  # type: ignore[arg-type]
    assert list(grid.push_messages(messages)) == ["m0", "m1"]
    assert [m.metadata.message_id for m in messages] == ["m0", "m1"]  # stamped on the caller's objects
    assert messages[0].content is messages[1].content and len(messages[0].content["arrays"]) == 1
    got = list(grid.pull_messages(["m0", "m1"]))
    assert got[1].has_error()
    pulled = got[0].content["arrays"].to_torch_state_dict()
    assert list(pulled) == list(state) and all(torch.equal(pulled[k], state[k]) for k in state)


def test_the_site_mod_unpacks_for_the_clientapp_and_packs_its_reply() -> None:
    state = build_model("unet", chans=4, num_pool_layers=2).state_dict()
    msg = Message(protocol.pack_content(_content(state), hub.RECORDS), dst_node_id=1, message_type=MessageType.TRAIN)
    seen: dict[str, torch.Tensor] = {}

    def clientapp(message: Message, context: Context) -> Message:
        seen.update(message.content["arrays"].to_torch_state_dict())
        return Message(RecordDict({"arrays": ArrayRecord(seen)}), reply_to=message)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = site.packed_transport_mod(msg, context, clientapp)
    assert list(seen) == list(state)
    assert len(reply.content["arrays"]) == 1 and protocol.MANIFEST in reply.content
    assert all(
        torch.equal(protocol.unpack_content(reply.content, hub.RECORDS)["arrays"].to_torch_state_dict()[k], state[k])
        for k in state
    )


def test_a_message_of_another_protocol_version_is_refused_naming_both_versions() -> None:
    packed = protocol.pack_content(_content({"w": torch.ones(2)}), hub.RECORDS)
    assert packed[protocol.MANIFEST][protocol.VERSION_KEY] == protocol.PROTOCOL_VERSION
    packed[protocol.MANIFEST][protocol.VERSION_KEY] = protocol.PROTOCOL_VERSION + 1
    with pytest.raises(
        protocol.ProtocolMismatch,
        match=f"protocol version {protocol.PROTOCOL_VERSION + 1}, "
        f"this side speaks protocol version {protocol.PROTOCOL_VERSION}",
    ):
        protocol.unpack_content(packed, site.RECORDS)
    del packed[protocol.MANIFEST][protocol.VERSION_KEY]  # as a FedSense from before the protocol was versioned
    with pytest.raises(protocol.ProtocolMismatch, match="no protocol version"):
        protocol.unpack_content(packed, hub.RECORDS)


def test_the_site_mod_refuses_a_server_of_another_protocol_version() -> None:
    packed = protocol.pack_content(_content({"w": torch.ones(2)}), hub.RECORDS)
    packed[protocol.MANIFEST][protocol.VERSION_KEY] = 0
    msg = Message(packed, dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(protocol.ProtocolMismatch, match="protocol version 0"):
        site.packed_transport_mod(msg, context, lambda m, c: pytest.fail("the ClientApp ran"))  # type: ignore[arg-type]


def test_the_server_refuses_a_reply_of_another_protocol_version() -> None:
    ask = Message(RecordDict(), dst_node_id=3, message_type=MessageType.TRAIN)
    packed = protocol.pack_content(_content({"w": torch.ones(2)}), site.RECORDS)
    packed[protocol.MANIFEST][protocol.VERSION_KEY] = protocol.PROTOCOL_VERSION + 1
    grid = hub.PackedGrid(RecordingGrid([Message(packed, reply_to=ask)]))  # type: ignore[arg-type]
    with pytest.raises(protocol.ProtocolMismatch, match="this side speaks protocol version"):
        grid.pull_messages(["m0"])


# --- fp16 transport (transport-dtype = "fp16") ------------------------------------------------------


def test_fp16_transport_rounds_the_weights_sent_and_adds_the_sites_fp16_change_to_what_it_received() -> None:
    """Server → site: float16 weights; site → server: float16 differences from them. Checked against the
    same arithmetic done by hand in numpy: what the server gets back differs from the site's weights only by
    the float16 rounding of the round's change (relative 2^-11 of it), not of the weights."""
    model = build_model("unrolled", num_cascades=2, chans=4, num_layers=3)  # 0-d DC weights included
    state = model.state_dict()
    grid = hub.PackedGrid(RecordingGrid([]), fp16=True)  # type: ignore[arg-type]
    messages = [Message(_content(state), dst_node_id=1, message_type=MessageType.TRAIN)]
    grid.push_messages(messages)
    pushed = grid.grid.pushed[0]  # type: ignore[attr-defined]
    assert protocol.is_fp16(pushed.content)
    assert pushed.content["arrays"][protocol.PACKED].numpy().nbytes == sum(v.numel() * 2 for v in state.values())
    change = {k: torch.randn_like(v) * 1e-3 for k, v in state.items()}
    seen: dict[str, np.ndarray] = {}

    def clientapp(message: Message, context: Context) -> Message:
        received = message.content["arrays"].to_torch_state_dict()
        seen.update({k: v.numpy().copy() for k, v in received.items()})
        return Message(
            RecordDict({"arrays": ArrayRecord({k: received[k] + change[k] for k in received})}), reply_to=message
        )

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = site.packed_transport_mod(pushed, context, clientapp)
    for k, v in state.items():  # the site trained from the float16-rounded weights
        np.testing.assert_array_equal(seen[k], v.numpy().astype(np.float16).astype(np.float32))
    assert reply.content[protocol.MANIFEST][f"arrays.{protocol.ENCODING}"] == protocol.FP16_DELTA
    grid.grid.replies = [reply]  # type: ignore[attr-defined]
    got = next(iter(grid.pull_messages([messages[0].metadata.message_id]))).content["arrays"].to_torch_state_dict()
    for k in state:
        local = seen[k] + change[k].numpy()
        expected = seen[k] + (local - seen[k]).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got[k].numpy(), expected)
        assert np.abs(got[k].numpy() - local).max() <= 2**-11 * np.abs(local - seen[k]).max() + 1e-12
    assert not grid.received  # the weights kept for the reply are let go


def test_fp16_differences_without_the_weights_they_belong_to_are_refused() -> None:
    state = {"w": torch.ones(3)}
    packed = protocol.pack_content(_content(state), site.RECORDS, base={"w": np.ones(3, np.float32)})
    with pytest.raises(FedSenseError, match="without the weights they are relative to"):
        protocol.unpack_content(packed, hub.RECORDS)


def test_without_fp16_nothing_is_rounded_and_non_float32_arrays_never_are() -> None:
    state = {"w": torch.full((3,), 1 / 3), "steps": torch.tensor([7], dtype=torch.int64)}
    plain = protocol.unpack_content(protocol.pack_content(_content(state), site.RECORDS), hub.RECORDS)
    assert torch.equal(plain["arrays"].to_torch_state_dict()["w"], state["w"])
    half = protocol.unpack_content(protocol.pack_content(_content(state), site.RECORDS, fp16=True), hub.RECORDS)
    got = half["arrays"].to_torch_state_dict()
    assert got["w"].dtype == torch.float32 and not torch.equal(got["w"], state["w"])
    assert got["steps"].dtype == torch.int64 and torch.equal(got["steps"], state["steps"])
