"""Compressed updates (protocol v1, optional): the device sends its model DELTA, encoded.

An uncompressed update carries the device's new weights. A compressed one carries
``delta = new - global`` (the round's global model, which the device downloaded), because a
delta is small and centred on zero: int8 and top-k lose little on it, and a lot on weights.
The update message then has ``encoding`` set, and each entry of ``tensors`` is one of:

- ``float32`` / ``float16``: the delta as an RFC 8746 tensor of that dtype (the model's shape);
- ``int8``: ``{"q": int8 tensor (the model's shape), "scale": float}`` with
  ``delta ~= scale * q``, ``scale = max|delta| / 127`` computed in float32 (one per tensor);
- ``topk``: ``{"idx": uint32 1-D tensor, "val": float32 1-D tensor}``: the ``k`` entries of
  largest magnitude, ``idx`` their strictly increasing flat (C-order) positions,
  ``k = ceil(topk_fraction * size)``. The device keeps what it did not send (error feedback,
  Stich et al. 2018; Karimireddy et al. 2019) and adds it to its next delta.

The session chooses the encoding; the round plan and the task carry it as
``compression: {"encoding": ..., "topk_fraction": ...}``. Only numpy and cbor2 are needed
here: the device agent imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from edgefl.protocol.tensors import CodecError, tensor_from_cbor, tensor_to_cbor

__all__ = [
    "ENCODINGS",
    "Dense",
    "Encoded",
    "ErrorFeedback",
    "Sparse",
    "decode_delta",
    "encode_delta",
    "squared_norm",
    "tensor_bytes",
    "topk_count",
]

ENCODINGS = ("float32", "float16", "int8", "topk")
"""Delta encodings a device may send (the session's ``compression``, minus ``none``)."""

_INT8_MAX = 127
_BLOCK = 1 << 15


@dataclass
class ErrorFeedback:
    """The top-k residual of one device: what it has not sent yet, per tensor.

    Belongs to one agent (not thread-safe; the agent runs one task at a time) and to one
    session: a task of another session starts from zero, since an old session's residual
    is a gradient of another model.
    """

    session: str | None = None
    residual: dict[str, np.ndarray] = field(default_factory=dict)

    def for_session(self, session: str) -> dict[str, np.ndarray]:
        if session != self.session:
            self.session, self.residual = session, {}
        return self.residual


def topk_count(size: int, fraction: float) -> int:
    """How many entries top-k keeps of a tensor of ``size``: at least one, at most all."""
    return min(size, max(1, math.ceil(fraction * size))) if size else 0


def encode_delta(
    delta: Mapping[str, np.ndarray],
    encoding: str,
    *,
    topk_fraction: float = 0.1,
    residual: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """The CBOR-ready ``tensors`` map of a compressed update (see the module docstring).

    ``residual`` (top-k only) is read and updated in place: error feedback. Raises
    ``CodecError`` for an unknown encoding or a delta that does not fit float16.
    """
    if encoding not in ENCODINGS:
        raise CodecError(f"unknown update encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    out: dict[str, Any] = {}
    for name, d in delta.items():
        arr = np.asarray(d)
        if encoding in ("float32", "float16"):
            enc = arr.astype(encoding)
            if not np.isfinite(enc).all():
                raise CodecError(f"{name}: the delta does not fit {encoding}")
            out[name] = tensor_to_cbor(enc)
        elif encoding == "int8":
            top = float(np.max(np.abs(arr))) if arr.size else 0.0
            scale = np.float32(top / _INT8_MAX)
            if scale > 0:
                q = np.clip(np.rint(arr / np.float64(scale)), -_INT8_MAX, _INT8_MAX)
            else:
                q = np.zeros(arr.shape)
            out[name] = {"q": tensor_to_cbor(q.astype(np.int8)), "scale": float(scale)}
        else:
            out[name] = _encode_topk(name, arr, topk_fraction, residual)
    return out


def _encode_topk(
    name: str, arr: np.ndarray, fraction: float, residual: dict[str, np.ndarray] | None
) -> dict[str, Any]:
    flat = np.asarray(arr, dtype=np.float64).reshape(-1).copy()
    if residual is not None and name in residual and residual[name].size == flat.size:
        flat += residual[name]
    k = topk_count(flat.size, fraction)
    top = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :] if k else flat[:0]
    idx = np.sort(top).astype(np.uint32)
    val = flat[idx].astype(np.float32)
    if residual is not None:
        flat[idx] -= val  # what was sent leaves the residual (float32 rounding stays in it)
        residual[name] = flat
    return {"idx": tensor_to_cbor(idx), "val": tensor_to_cbor(val)}


@dataclass(frozen=True)
class Dense:
    """A decoded dense delta: ``scale * data`` (``data`` float32, float16 or int8)."""

    data: np.ndarray
    scale: float = 1.0


@dataclass(frozen=True)
class Sparse:
    """A decoded top-k delta: ``values`` at the flat positions ``index``."""

    index: np.ndarray
    values: np.ndarray


Encoded = Union[Dense, Sparse]  # not `|`: devices run Python 3.9


def decode_delta(
    value: object, encoding: object, spec: Mapping[str, tuple[str, tuple[int, ...]]]
) -> dict[str, Encoded]:
    """Decode and validate a compressed update's ``tensors`` against the model's spec.

    Views on the received bytes, no dense copy. Raises ``CodecError`` naming the first
    problem: unknown encoding, names that differ from the model, wrong dtype or shape,
    non-finite values or scale, top-k positions out of range or not strictly increasing.
    """
    if encoding not in ENCODINGS:
        raise CodecError(f"unknown update encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    if not isinstance(value, Mapping):
        raise CodecError("tensors must be a CBOR map from name to encoded delta")
    missing = sorted(set(spec) - set(value))
    extra = sorted(str(k) for k in set(value) - set(spec))
    if missing or extra:
        raise CodecError(
            f"tensor names differ from the model: missing {missing}, unexpected {extra}"
        )
    out: dict[str, Encoded] = {}
    for name, (_, shape) in spec.items():
        entry = value[name]
        if encoding in ("float32", "float16"):
            arr = _tensor(entry, name, encoding, shape)
            _finite(arr, name)
            out[name] = Dense(arr)
        elif encoding == "int8":
            if not isinstance(entry, Mapping) or set(entry) != {"q", "scale"}:
                raise CodecError(f"{name}: an int8 delta is a map with 'q' and 'scale'")
            scale = entry["scale"]
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise CodecError(f"{name}: scale must be a number")
            if not math.isfinite(scale) or scale < 0:
                raise CodecError(f"{name}: scale must be finite and >= 0, got {scale}")
            out[name] = Dense(_tensor(entry["q"], name, "int8", shape), float(scale))
        else:
            if not isinstance(entry, Mapping) or set(entry) != {"idx", "val"}:
                raise CodecError(f"{name}: a top-k delta is a map with 'idx' and 'val'")
            size = math.prod(shape)
            idx = tensor_from_cbor(entry["idx"], f"{name}.idx")
            val = tensor_from_cbor(entry["val"], f"{name}.val")
            if idx.dtype != np.uint32 or idx.ndim != 1:
                raise CodecError(f"{name}: idx must be a 1-D uint32 tensor")
            if val.dtype.kind != "f" or val.shape != idx.shape:
                raise CodecError(f"{name}: val must be a float tensor as long as idx")
            if idx.size and (int(idx[-1]) >= size or not _increasing(idx)):
                raise CodecError(f"{name}: idx must be strictly increasing positions below {size}")
            _finite(val, name)
            out[name] = Sparse(idx, val)
    return out


def _tensor(entry: object, name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = tensor_from_cbor(entry, name)
    if arr.dtype.name != dtype:
        raise CodecError(f"{name}: dtype {arr.dtype.name}, the encoding needs {dtype}")
    if tuple(arr.shape) != tuple(shape):
        raise CodecError(f"{name}: shape {tuple(arr.shape)}, expected {tuple(shape)}")
    return arr


def _increasing(idx: np.ndarray) -> bool:
    return idx.size < 2 or bool((idx[1:] > idx[:-1]).all())


def _finite(arr: np.ndarray, name: str) -> None:
    if not np.isfinite(arr).all():
        raise CodecError(f"tensor {name!r} holds NaN or infinite values")


def tensor_bytes(tensors: Mapping[str, Encoded | np.ndarray]) -> int:
    """The bytes of tensor data in an update (plain or decoded delta), without the CBOR
    around it: what compression acts on, reported beside the whole payload's bytes."""
    total = 0
    for t in tensors.values():
        if isinstance(t, Sparse):
            total += t.index.nbytes + t.values.nbytes
        elif isinstance(t, Dense):
            total += t.data.nbytes
        else:
            total += int(np.asarray(t).nbytes)
    return total


def squared_norm(delta: Mapping[str, Encoded]) -> float:
    """The squared L2 norm of a decoded delta, summed blockwise in float64 (no dense copy)."""
    total = 0.0
    for enc in delta.values():
        if isinstance(enc, Sparse):
            v = enc.values.astype(np.float64)
            total += float(v @ v)
            continue
        flat = enc.data.reshape(-1)
        part = 0.0
        for s in range(0, flat.size, _BLOCK):
            b = flat[s : s + _BLOCK].astype(np.float64)
            part += float(b @ b)
        total += part * enc.scale * enc.scale
    return total
