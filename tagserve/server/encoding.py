"""Pooling results -> response bodies: float JSON, base64, or raw bytes with a `metadata` header.

Float JSON is written by a vectorized formatter instead of `json.dumps(tensor.tolist())`
(about 30x faster): every value is printed with 9 significant digits in exponent form, e.g.
` 7.21124411e-01` or `-2.50000000e+00`, which parses back to exactly the same float32
(the values are float32, so 9 digits are always enough). Positive values get a leading space
so that every value has the same width; JSON allows whitespace between values.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from fastapi.responses import Response

# embed_dtype -> (dtype sent, same-width dtype numpy can view: numpy has no bf16 or fp8)
EMBED_DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "float32": (torch.float32, torch.float32),
    "float16": (torch.float16, torch.float16),
    "bfloat16": (torch.bfloat16, torch.float16),
    "fp8_e4m3": (torch.float8_e4m3fn, torch.uint8),
    "fp8_e5m2": (torch.float8_e5m2, torch.uint8),
}


@dataclass(frozen=True)
class ResponseInfo:
    """The envelope of a pooling response."""

    id: str
    created: int
    model: str
    prompt_tokens: int

    def usage(self) -> dict[str, int | None]:
        return {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens,
                "completion_tokens": 0, "prompt_tokens_details": None,
                "completion_tokens_details": None}


def tensor_bytes(tensor: torch.Tensor, embed_dtype: str, endianness: str) -> bytes:
    """The flattened tensor's raw bytes in `embed_dtype` and the requested byte order."""
    dtype, view = EMBED_DTYPES[embed_dtype]
    array = tensor.to(dtype).flatten().contiguous().view(view).numpy()
    if endianness not in ("native", sys.byteorder):
        array = array.byteswap()
    return array.tobytes()


# ------------------------------------------------------------------------- float JSON
# Each value is 16 bytes, built from three lookups: sign + first digits (4 bytes), four digits
# (4 bytes), and three digits + "e" + exponent + "," (8 bytes).


def _table(strings: list[str], dtype: str) -> np.ndarray:
    return np.frombuffer("".join(strings).encode(), dtype=dtype).copy()


_EXP_MIN = -50  # float32 exponents lie in [-45, 38]
_EXP_COUNT = 101
_HEAD = _table([f"{s}{d // 10}.{d % 10}" for s in " -" for d in range(100)], "<u4")
_MID = _table([f"{i:04d}" for i in range(10_000)], "<u4")
_TAIL = _table([f"{i:03d}e{'-' if e < 0 else '+'}{abs(e):02d},"  # [digits * 101 + exponent]
                for i in range(1000) for e in range(_EXP_MIN, _EXP_MIN + _EXP_COUNT)], "<u8")
_POW10 = 10.0 ** np.arange(-70, 71)  # _POW10[70 + k] = 10**k


def _format_rows(values: np.ndarray) -> bytes:
    """`[v,...],` for every row of a finite float32 matrix: `cols * 16 + 2` bytes per row."""
    rows, cols = values.shape
    flat = values.astype(np.float64).ravel()
    magnitude = np.abs(flat)
    zero = magnitude == 0
    magnitude[zero] = 1.0
    # mantissa: 9 digits in [1e8, 1e9); log10 can be off by one at powers of ten.
    exponent = np.floor(np.log10(magnitude)).astype(np.int64)
    mantissa = np.rint(magnitude * _POW10[78 - exponent]).astype(np.int64)
    fix = (mantissa >= 1_000_000_000).astype(np.int64) - (mantissa < 100_000_000)
    if fix.any():
        exponent += fix
        mantissa = np.rint(magnitude * _POW10[78 - exponent]).astype(np.int64)
    mantissa[zero] = 0
    exponent[zero] = 0
    digits = mantissa.astype(np.int32)  # int32 division is faster, and 1e9 fits
    thousands = digits // 1000
    head = thousands // 10_000
    words = np.empty((flat.size, 4), dtype="<u4")
    words[:, 0] = _HEAD.take(head + np.signbit(flat) * np.int32(100))
    words[:, 1] = _MID.take(thousands - head * np.int32(10_000))
    tail = (digits - thousands * np.int32(1000)) * np.int32(_EXP_COUNT) + \
        (exponent.astype(np.int32) - np.int32(_EXP_MIN))
    words[:, 2:].view("<u8")[:, 0] = _TAIL.take(tail)
    framed = np.empty((rows, cols * 16 + 2), dtype=np.uint8)
    framed[:, 0] = ord("[")
    framed[:, 1:-1] = words.view(np.uint8).reshape(rows, cols * 16)
    framed[:, -2] = ord("]")  # replaces the last value's ","
    framed[:, -1] = ord(",")
    return framed.tobytes()


def _json_fallback(tensor: torch.Tensor) -> bytes:
    return json.dumps(tensor.tolist(), separators=(",", ":")).encode()


def float_json(tensors: list[torch.Tensor]) -> list[bytes]:
    """Each tensor as a JSON array: nested `[n][m]` for 2-D, flat for 1-D. All outputs are
    formatted in one vectorized pass when they have the same number of columns."""
    shapes = [tuple(t.shape) for t in tensors]
    if any(len(s) not in (1, 2) for s in shapes) or len({s[-1] for s in shapes}) != 1:
        return [_json_fallback(t) for t in tensors]
    stacked = torch.cat([t if t.ndim == 2 else t[None] for t in tensors])
    stacked = stacked.detach().to("cpu", torch.float32).numpy()
    if stacked.size == 0 or not math.isfinite(stacked.sum(dtype=np.float64)):
        return [_json_fallback(t) for t in tensors]
    rows = memoryview(_format_rows(stacked))
    width = stacked.shape[1] * 16 + 2
    out, start = [], 0
    for shape in shapes:
        end = start + (shape[0] if len(shape) == 2 else 1) * width
        text = rows[start:end - 1] if end > start else b""  # drop the trailing ","
        out.append(b"".join((b"[", text, b"]")) if len(shape) == 2 else bytes(text))
        start = end
    return out


# ------------------------------------------------------------------------- responses


def pooling_response(outputs: list[torch.Tensor], info: ResponseInfo, encoding_format: str,
                     embed_dtype: str, endianness: str) -> Response:
    """vLLM's `PoolingResponse` (JSON) or its bytes form."""
    if encoding_format in ("bytes", "bytes_only"):
        return _bytes_response(outputs, info, encoding_format, embed_dtype, endianness)
    if encoding_format == "base64":
        items = [json.dumps(base64.b64encode(tensor_bytes(t, embed_dtype, endianness))
                            .decode()).encode() for t in outputs]
    else:
        items = float_json(outputs)
    head = json.dumps({"id": info.id, "object": "list", "created": info.created,
                       "model": info.model}, separators=(",", ":"))[:-1].encode()
    data = b",".join(b'{"index":%d,"object":"pooling","data":%s}' % (i, item)
                     for i, item in enumerate(items))
    usage = json.dumps(info.usage(), separators=(",", ":")).encode()
    body = b'%s,"data":[%s],"usage":%s}' % (head, data, usage)
    return Response(content=body, media_type="application/json")


def _bytes_response(outputs: list[torch.Tensor], info: ResponseInfo, encoding_format: str,
                    embed_dtype: str, endianness: str) -> Response:
    parts = [tensor_bytes(t, embed_dtype, endianness) for t in outputs]
    headers = None
    if encoding_format == "bytes":
        items, offset = [], 0
        for i, (part, tensor) in enumerate(zip(parts, outputs, strict=True)):
            items.append({"index": i, "embed_dtype": embed_dtype, "endianness": endianness,
                          "start": offset, "end": offset + len(part),
                          "shape": list(tensor.shape)})
            offset += len(part)
        headers = {"metadata": json.dumps({
            "id": info.id, "created": info.created, "model": info.model, "data": items,
            "usage": {"prompt_tokens": info.prompt_tokens,
                      "total_tokens": info.prompt_tokens}})}
    return Response(content=b"".join(parts), media_type="application/octet-stream",
                    headers=headers)
