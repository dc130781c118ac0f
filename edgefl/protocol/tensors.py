"""Named-tensor codec: RFC 8746 typed arrays inside CBOR, never pickle.

A tensor is ``Tag(40, [shape, Tag(T, raw_little_endian_bytes)])`` where 40 is the RFC 8746
row-major multi-dimensional array tag and ``T`` is the typed-array tag for its dtype. A tensor
set is a CBOR map from name to tensor. Any CBOR library can decode this without edgefl code,
which is the point: C and MicroPython clients speak it with a table lookup.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import cbor2
import numpy as np

from edgefl.protocol.cborview import loads_view

MULTIDIM_TAG = 40

# RFC 8746 typed-array tags, little-endian variants.
DTYPE_TO_TAG: dict[str, int] = {
    "uint8": 64,
    "uint16": 69,
    "uint32": 70,
    "uint64": 71,
    "int8": 72,
    "int16": 77,
    "int32": 78,
    "int64": 79,
    "float16": 84,
    "float32": 85,
    "float64": 86,
}
TAG_TO_DTYPE: dict[int, np.dtype] = {
    tag: np.dtype(name).newbyteorder("<") for name, tag in DTYPE_TO_TAG.items()
}

MAX_NDIM = 8


class CodecError(ValueError):
    """A payload that is not a valid edgefl tensor encoding."""


def tensor_to_cbor(array: np.ndarray) -> cbor2.CBORTag:
    """Wrap one array as an RFC 8746 tagged value (little-endian, C order).

    Raises ``CodecError`` for a dtype without an RFC 8746 tag (object, bool, complex...) or
    more than ``MAX_NDIM`` dimensions, so the sender fails rather than the receiver.
    """
    arr = np.asarray(array)
    name = arr.dtype.name
    if name not in DTYPE_TO_TAG:
        raise CodecError(f"dtype {arr.dtype} is not supported; use one of {sorted(DTYPE_TO_TAG)}")
    if arr.ndim > MAX_NDIM:
        raise CodecError(f"tensor has {arr.ndim} dimensions; at most {MAX_NDIM} are allowed")
    le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    data = np.ascontiguousarray(le).tobytes()
    return cbor2.CBORTag(MULTIDIM_TAG, [list(arr.shape), cbor2.CBORTag(DTYPE_TO_TAG[name], data)])


def tensor_from_cbor(value: object, name: str = "tensor") -> np.ndarray:
    """Decode one tagged tensor, checking that the byte count matches the shape.

    Zero-copy: the result is a read-only view on the CBOR byte string, so copy it before
    modifying in place. ``name`` only labels the ``CodecError`` raised for bad input.
    """
    if not isinstance(value, cbor2.CBORTag) or value.tag != MULTIDIM_TAG:
        raise CodecError(f"{name}: expected CBOR tag {MULTIDIM_TAG} (multi-dimensional array)")
    body = value.value
    if not isinstance(body, (list, tuple)) or len(body) != 2:
        raise CodecError(f"{name}: tag {MULTIDIM_TAG} must hold [shape, typed array]")
    shape, typed = body
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise CodecError(f"{name}: shape must be a list of at most {MAX_NDIM} sizes")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CodecError(f"{name}: shape entries must be non-negative integers, got {shape!r}")
    if not isinstance(typed, cbor2.CBORTag) or typed.tag not in TAG_TO_DTYPE:
        raise CodecError(f"{name}: expected an RFC 8746 little-endian typed array tag")
    raw = typed.value
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise CodecError(f"{name}: typed array content must be a byte string")
    nbytes = raw.nbytes if isinstance(raw, memoryview) else len(raw)
    dtype = TAG_TO_DTYPE[typed.tag]
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != nbytes:
        raise CodecError(
            f"{name}: shape {tuple(shape)} of {dtype.name} needs {count * dtype.itemsize} bytes,"
            f" got {nbytes}"
        )
    try:
        arr = np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))
    except (ValueError, OverflowError) as exc:  # e.g. a zero-size shape numpy cannot represent
        raise CodecError(f"{name}: shape {tuple(shape)} cannot be represented: {exc}") from exc
    # Native byte order for arithmetic; a no-op view on little-endian hosts.
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    arr.flags.writeable = False  # a view on received bytes (perhaps a reusable buffer)
    return arr


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, cbor2.CBORTag]:
    """Turn a name->array mapping into the CBOR-ready map (for embedding in a message)."""
    out: dict[str, cbor2.CBORTag] = {}
    for name, arr in tensors.items():
        if not isinstance(name, str) or not name:
            raise CodecError(f"tensor names must be non-empty strings, got {name!r}")
        out[name] = tensor_to_cbor(arr)
    return out


def decode_tensors(value: object) -> dict[str, np.ndarray]:
    """Decode a CBOR map of tensors (e.g. a message field); raise ``CodecError`` if invalid."""
    if not isinstance(value, Mapping):
        raise CodecError("tensors must be a CBOR map from name to tensor")
    out: dict[str, np.ndarray] = {}
    for name, tagged in value.items():
        if not isinstance(name, str) or not name:
            raise CodecError(f"tensor names must be non-empty strings, got {name!r}")
        out[name] = tensor_from_cbor(tagged, name)
    return out


def lazy_tensors(
    tensors: Mapping[str, np.ndarray],
) -> tuple[dict[str, cbor2.CBORTag], dict[bytes, memoryview]]:
    """``encode_tensors`` without copying the data: each typed array holds a random 16-byte
    placeholder, and the second result maps each placeholder to the array's bytes.

    ``chunking.Payload.splice`` turns the CBOR of a message built from these into the real
    payload as a list of segments: the tensors' own memory, never copied until a chunk is cut.
    """
    tags: dict[str, cbor2.CBORTag] = {}
    blobs: dict[bytes, memoryview] = {}
    for name, array in tensors.items():
        if not isinstance(name, str) or not name:
            raise CodecError(f"tensor names must be non-empty strings, got {name!r}")
        arr = np.asarray(array)
        if arr.dtype.name not in DTYPE_TO_TAG:
            raise CodecError(
                f"dtype {arr.dtype} is not supported; use one of {sorted(DTYPE_TO_TAG)}"
            )
        if arr.ndim > MAX_NDIM:
            raise CodecError(f"tensor has {arr.ndim} dimensions; at most {MAX_NDIM} are allowed")
        le = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
        marker = os.urandom(16)
        blobs[marker] = memoryview(le.reshape(-1).view(np.uint8).data)
        tags[name] = cbor2.CBORTag(
            MULTIDIM_TAG, [list(arr.shape), cbor2.CBORTag(DTYPE_TO_TAG[arr.dtype.name], marker)]
        )
    return tags, blobs


def dumps_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Serialize a tensor set to standalone CBOR bytes (the on-disk model format too).

    Byte-for-byte what ``cbor2.dumps(encode_tensors(tensors))`` gives, with one copy of the
    data instead of two (the tensors are joined straight into the result).
    """
    from edgefl.protocol.chunking import Payload

    tags, blobs = lazy_tensors(tensors)
    return Payload.splice(cbor2.dumps(tags), blobs).tobytes()


def loads_tensors(data: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """Inverse of ``dumps_tensors``; raises only ``CodecError``, never executes code.

    The arrays are read-only views on ``data`` (see ``tensor_from_cbor``): no copy.
    """
    try:
        value = loads_view(data)
    except Exception as exc:  # cbor2 raises several types for malformed input
        raise CodecError(f"malformed CBOR: {exc}") from exc
    return decode_tensors(value)
