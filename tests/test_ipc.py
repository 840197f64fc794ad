"""The engine socket's wire format (`tagserve/engine/ipc.py`): every message round-trips, and
frames are reassembled whatever pieces the socket delivers them in."""

from __future__ import annotations

import asyncio

import torch

from tagserve.engine import ipc
from tagserve.engine.async_engine import EngineDeadError, ModelExecutionError
from tagserve.errors import QueueFullError, ValidationError
from tagserve.params import PoolingParams


def _payload(pieces: list) -> bytearray:
    return bytearray(b"".join(bytes(p) for p in pieces))


def test_calls_round_trip_with_their_params():
    plain = PoolingParams(use_activation=True, task="token_classify")
    step = PoolingParams(use_activation=False, step_tag_id=7, returned_token_ids=[1, 2],
                         task="token_classify")
    calls = [(5, [[101, 2, 3, 102], [4]], plain), (2**40, [[9] * 10], step), (6, [[8]], plain)]
    decoded = ipc.decode_calls(_payload(ipc.encode_calls(calls)))
    assert [(c.id, [t.tolist() for t in c.token_ids], c.params) for c in decoded] == \
        [(i, [list(p) for p in prompts], params) for i, prompts, params in calls]
    assert ipc.decode_calls(_payload(ipc.encode_calls([]))) == []


def test_results_round_trip_any_shape():
    results = [(1, [torch.randn(3, 9), torch.randn(1, 9)]),
               (2, [torch.randn(5), torch.empty(0, 4)]),
               (3, [torch.randn(2, 3), torch.randn(0, 3)]), (4, [])]
    decoded, waiting = ipc.decode_results(_payload(ipc.encode_results(results, 17)))
    assert waiting == 17 and [i for i, _ in decoded] == [1, 2, 3, 4]
    for (_, sent), (_, got) in zip(results, decoded, strict=True):
        assert len(sent) == len(got)
        for a, b in zip(sent, got, strict=True):
            assert a.shape == b.shape and b.dtype == torch.float32 and torch.equal(a, b)


def test_cancel_and_errors_round_trip():
    assert ipc.decode_cancel(_payload(ipc.encode_cancel([3, 2**63]))) == [3, 2**63]
    errors = [(1, QueueFullError("full")), (2, KeyError("x")),
              (3, ValidationError("bad", parameter="input", value=3)),
              (4, EngineDeadError("gone")), (5, ModelExecutionError("failed"))]
    decoded = dict(ipc.decode_errors(_payload(ipc.encode_errors(errors))))
    assert type(decoded[1]) is QueueFullError and str(decoded[1]) == "full"
    assert type(decoded[2]) is ModelExecutionError  # anything else: a model failure (500)
    assert "KeyError" in str(decoded[2])
    assert str(decoded[3]) == str(errors[2][1]) and decoded[3].parameter == "input"
    assert type(decoded[4]) is EngineDeadError and type(decoded[5]) is ModelExecutionError


def test_frames_are_reassembled_from_any_pieces():
    got: list[bytes] = []
    protocol = ipc.FrameProtocol(lambda payload: got.append(bytes(payload)), lambda exc: None)
    frames = [b"\x01abc", b"\x02" + bytes(range(256)) * 40, b"\x03"]
    stream = b"".join(b"".join(bytes(p) for p in ipc.frame([f])) for f in frames)
    for step in (1, 3, 7, 4096):
        got.clear()
        at = 0
        while at < len(stream):
            buffer = protocol.get_buffer(-1)
            n = min(step, len(buffer), len(stream) - at)
            buffer[:n] = stream[at:at + n]
            protocol.buffer_updated(n)
            at += n
        assert got == frames


def test_outbox_sends_one_frame_per_kind_at_the_end_of_the_loop_turn():
    sent: list[tuple[str, list]] = []

    async def turn() -> None:
        box = ipc.Outbox(sent.append, lambda items: ("a", items), lambda items: ("b", items))
        box.put(1, "x")
        box.put(0, 1)
        box.put(0, 2)
        assert sent == []  # nothing before the turn ends
        await asyncio.sleep(0)
        assert sent == [("a", [1, 2]), ("b", ["x"])]
        box.put(0, 3)
        await asyncio.sleep(0)

    asyncio.run(turn())
    assert sent[-1] == ("a", [3]) and len(sent) == 3
