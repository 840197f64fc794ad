"""The wire between API processes and the engine process (`tagserve serve --api-server-count`).

A Unix stream socket carries frames: a little-endian u32 payload length, then the payload,
whose first byte says what it is. Nothing is pickled: token ids and result rows travel as
numpy arrays' raw bytes, and the few structured fields (pooling parameters, error messages) as
JSON. One frame carries many encode calls (or many results), so that under load the socket
costs little per request.

    CALLS    API -> engine   encode calls: token ids of each prompt, and the PoolingParams
    CANCEL   API -> engine   ids of calls whose client has gone
    RESULTS  engine -> API   float32 rows of finished calls, and the engine's queue depth
    ERRORS   engine -> API   failed calls: exception type (from a fixed set) and message

Layouts (every array starts 8-byte aligned; `calls` and `seqs` are numpy structured arrays):

    CALLS    header | calls [id u64, prompts u32, params u32] | lengths u32 (padded to 8)
             | token ids i64 | params table (JSON list of PoolingParams fields)
    CANCEL   header | ids u64
    RESULTS  header | calls [id u64, prompts u32, -] | seqs [ndim, rows, cols, -] u32
             | rows float32
    ERRORS   kind byte | JSON list of {"id", "type", "message", "param"}
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from tagserve.engine.async_engine import EngineDeadError, ModelExecutionError
from tagserve.errors import QueueFullError, ValidationError
from tagserve.params import PoolingParams

CALLS, CANCEL, RESULTS, ERRORS = 1, 2, 3, 4

_LENGTH = struct.Struct("<I")
_HEADER = struct.Struct("<B3xIII")  # kind, then three counts (meaning depends on the kind)
_CALL = np.dtype([("id", "<u8"), ("prompts", "<u4"), ("params", "<u4")])
_SEQ = np.dtype([("ndim", "<u4"), ("rows", "<u4"), ("cols", "<u4"), ("pad", "<u4")])
_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(PoolingParams))

Payload = bytes | bytearray | memoryview


# The exceptions an engine call may raise that cross the wire with their type (anything else
# arrives as ModelExecutionError); the server maps each type to its HTTP status.
_ERROR_TYPES: dict[str, type[Exception]] = {
    "ValidationError": ValidationError, "QueueFullError": QueueFullError,
    "EngineDeadError": EngineDeadError, "ModelExecutionError": ModelExecutionError,
}


@dataclasses.dataclass
class Call:
    """One `encode` call as the engine process receives it."""

    id: int
    token_ids: list[np.ndarray]  # int64, one array per prompt
    params: PoolingParams


def _pad8(n: int) -> int:
    return -n % 8


def frame(payload: Sequence[Payload]) -> list[Payload]:
    """The pieces of one frame (length prefix first), for `transport.writelines`."""
    return [_LENGTH.pack(sum(memoryview(p).nbytes for p in payload)), *payload]


# ------------------------------------------------------------------------------ calls


CallSpec = tuple[int, Sequence[Sequence[int]], PoolingParams]  # id, token ids per prompt, params


def encode_calls(calls: Sequence[CallSpec]) -> list[Payload]:
    """A CALLS payload: (call id, token ids of each prompt, params) per call."""
    table: dict[str, int] = {}
    meta = np.empty(len(calls), dtype=_CALL)
    lengths: list[int] = []
    for i, (call_id, prompts, params) in enumerate(calls):
        key = json.dumps([getattr(params, name) for name in _PARAM_FIELDS])
        meta[i] = (call_id, len(prompts), table.setdefault(key, len(table)))
        lengths += map(len, prompts)
    lens = np.asarray(lengths, dtype="<u4")
    prompts_ids = itertools.chain.from_iterable(p for _, prompts, _ in calls for p in prompts)
    ids = np.fromiter(prompts_ids, np.int64, sum(lengths))
    params_json = ("[" + ",".join(table) + "]").encode()
    header = _HEADER.pack(CALLS, len(calls), len(lengths), len(params_json))
    return [header, meta.tobytes(), lens.tobytes(), bytes(_pad8(lens.nbytes)),
            ids.astype("<i8", copy=False).tobytes(), params_json]


def decode_calls(payload: Payload) -> list[Call]:
    _, num_calls, num_seqs, params_size = _HEADER.unpack_from(payload)
    offset = _HEADER.size
    meta = np.frombuffer(payload, _CALL, num_calls, offset)
    offset += meta.nbytes
    lens = np.frombuffer(payload, "<u4", num_seqs, offset).astype(np.int64)
    offset += lens.size * 4 + _pad8(lens.size * 4)
    ids = np.frombuffer(payload, "<i8", int(lens.sum()), offset)
    offset += ids.nbytes
    table = [_params(fields) for fields in json.loads(bytes(payload[offset:offset + params_size]))]
    bounds = np.concatenate([[0], np.cumsum(lens)]).tolist()
    calls, seq = [], 0
    for call_id, prompts, params in meta.tolist():
        prompt_ids = [ids[bounds[s]:bounds[s + 1]] for s in range(seq, seq + prompts)]
        calls.append(Call(call_id, prompt_ids, table[params]))
        seq += prompts
    return calls


def _params(values: list[Any]) -> PoolingParams:
    if not isinstance(values, list) or len(values) != len(_PARAM_FIELDS):
        raise ValueError("malformed pooling parameters on the engine socket")
    return PoolingParams(**dict(zip(_PARAM_FIELDS, values, strict=True)))


def encode_cancel(call_ids: Sequence[int]) -> list[Payload]:
    return [_HEADER.pack(CANCEL, len(call_ids), 0, 0), np.asarray(call_ids, "<u8").tobytes()]


def decode_cancel(payload: Payload) -> list[int]:
    count = _HEADER.unpack_from(payload)[1]
    return np.frombuffer(payload, "<u8", count, _HEADER.size).tolist()


# ---------------------------------------------------------------------------- results


def encode_results(results: Sequence[tuple[int, Sequence[torch.Tensor]]],
                   num_waiting: int) -> list[Payload]:
    """A RESULTS payload: (call id, one float32 tensor of 1 or 2 dimensions per prompt) per
    finished call, and the number of sequences waiting in the engine."""
    meta = np.zeros(len(results), dtype=_CALL)
    shapes: list[tuple[int, int, int, int]] = []
    flat: list[torch.Tensor] = []
    for i, (call_id, tensors) in enumerate(results):
        meta[i] = (call_id, len(tensors), 0)
        for tensor in tensors:
            shape = tensor.shape
            if len(shape) not in (1, 2):
                raise ValueError(f"cannot send a result of {len(shape)} dimensions")
            shapes.append((len(shape), shape[0], shape[1] if len(shape) == 2 else 1, 0))
        flat += tensors
    if len({(ndim, cols) for ndim, _, cols, _ in shapes}) > 1:  # mixed: concatenate flat
        flat = [tensor.reshape(-1) for tensor in flat]
    rows = torch.cat(flat).to("cpu", torch.float32).numpy() if flat else np.empty(0, np.float32)
    seqs = np.array(shapes, dtype="<u4").reshape(-1, 4)
    header = _HEADER.pack(RESULTS, len(results), len(shapes), num_waiting)
    return [header, meta.tobytes(), seqs.tobytes(), memoryview(rows.view(np.uint8))]


def decode_results(payload: bytearray) -> tuple[list[tuple[int, list[torch.Tensor]]], int]:
    """The results and the queue depth. The tensors share `payload`'s memory (keep it)."""
    _, num_calls, num_seqs, num_waiting = _HEADER.unpack_from(payload)
    offset = _HEADER.size
    meta = np.frombuffer(payload, _CALL, num_calls, offset)
    offset += meta.nbytes
    seqs = np.frombuffer(payload, "<u4", num_seqs * 4, offset).reshape(-1, 4).tolist()
    offset += num_seqs * 16
    data = torch.frombuffer(payload, dtype=torch.float32, offset=offset) \
        if len(payload) > offset else torch.empty(0)
    results, seq, start = [], 0, 0
    for call_id, prompts, _ in meta.tolist():
        shapes = seqs[seq:seq + prompts]
        seq += prompts
        size = sum(rows * cols for _, rows, cols, _ in shapes)
        flat, start = data[start:start + size], start + size
        if shapes and all(ndim == 2 and cols == shapes[0][2] for ndim, _, cols, _ in shapes):
            # The usual case, rows of one width: one split makes all the views.
            tensors = list(flat.view(-1, shapes[0][2]).split([rows for _, rows, _, _ in shapes]))
        else:
            tensors, at = [], 0
            for ndim, rows, cols, _ in shapes:
                part, at = flat[at:at + rows * cols], at + rows * cols
                tensors.append(part.view(rows, cols) if ndim == 2 else part)
        results.append((call_id, tensors))
    return results, num_waiting


def encode_errors(errors: Sequence[tuple[int, BaseException]]) -> list[Payload]:
    items = []
    for call_id, exc in errors:
        name = type(exc).__name__
        if _ERROR_TYPES.get(name) is not type(exc):
            exc, name = ModelExecutionError(f"The model failed on this request ({name})"), \
                "ModelExecutionError"
        value = getattr(exc, "value", None)
        items.append({"id": call_id, "type": name, "message": getattr(exc, "message", str(exc)),
                      "param": getattr(exc, "parameter", None),
                      "value": value if isinstance(value, (int, float, str)) else None})
    return [bytes([ERRORS]), json.dumps(items).encode()]


def decode_errors(payload: Payload) -> list[tuple[int, Exception]]:
    out: list[tuple[int, Exception]] = []
    for item in json.loads(bytes(payload[1:])):
        error_type = _ERROR_TYPES.get(item["type"], ModelExecutionError)
        if error_type is ValidationError:
            exc: Exception = ValidationError(item["message"], parameter=item["param"],
                                             value=item["value"])
        else:
            exc = error_type(item["message"])
        out.append((int(item["id"]), exc))
    return out


def kind(payload: Payload) -> int:
    return payload[0]


# ----------------------------------------------------------------------------- framing


class FrameProtocol(asyncio.BufferedProtocol):
    """Reads frames straight into one `bytearray` each (no re-assembly copies) and hands them
    to `on_frame`; `on_lost(exc)` when the connection closes."""

    def __init__(self, on_frame: Callable[[bytearray], None],
                 on_lost: Callable[[BaseException | None], None]) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.transport: Any = None  # asyncio's or uvloop's transport
        self._length = bytearray(_LENGTH.size)
        self._target = self._length  # the length prefix, then the payload it announces
        self._filled = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._target)[self._filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled < len(self._target):
            return
        self._filled = 0
        if self._target is self._length:  # a payload of this many bytes follows
            self._target = bytearray(_LENGTH.unpack(self._length)[0])
        else:
            payload, self._target = self._target, self._length
            self.on_frame(payload)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.on_lost(exc)

    def send(self, payload: Sequence[Payload]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(frame(payload))


class Outbox:
    """Items for one peer, gathered over a turn of the event loop and sent at its end as one
    frame per kind (`encoders[k]` makes kind k's frame of its items, in the order given), so
    that many calls or answers share a frame under load."""

    def __init__(self, send: Callable[[Sequence[Payload]], None],
                 *encoders: Callable[[list[Any]], Sequence[Payload]]) -> None:
        self._send = send
        self._encoders = encoders
        self._items: list[list[Any]] = [[] for _ in encoders]
        self._scheduled = False

    def put(self, kind: int, item: Any) -> None:
        self._items[kind].append(item)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        for k, encode in enumerate(self._encoders):
            items, self._items[k] = self._items[k], []
            if items:
                self._send(encode(items))
