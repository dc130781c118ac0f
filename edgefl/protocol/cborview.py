"""Zero-copy CBOR decoding of large payloads (models, updates, partials).

cbor2 copies every byte string it decodes, so a 40 MB update costs a 40 MB copy on top of its
reassembly buffer. ``loads_view`` decodes the subset edgefl's own messages use (definite
lengths; integers, floats, text, byte strings, arrays, maps, booleans, null, and the RFC 8746
tags of the tensor codec) and returns large byte strings as ``memoryview`` slices of the input,
so tensors become numpy views on the received bytes. Anything outside that subset (another
tag, an indefinite length, trailing bytes, malformed input) is handed to cbor2 on a copy, so
what is accepted and what is rejected is exactly cbor2's: only the copies differ.
"""

from __future__ import annotations

import struct
from typing import Any

import cbor2

BIG_BYTES = 4096  # byte strings from this size on come back as memoryviews (no copy)
MAX_DEPTH = 64

_TENSOR_TAGS = frozenset({40, *range(64, 88)})
_HALF = struct.Struct(">e")
_FLOAT = struct.Struct(">f")
_DOUBLE = struct.Struct(">d")


class _Unsupported(Exception):
    """Outside the fast subset: decode with cbor2 instead."""


def loads_view(data: bytes | bytearray | memoryview, big: int = BIG_BYTES) -> Any:
    """Decode one CBOR item; byte strings of ``big`` bytes or more are views of ``data``.

    The views keep ``data`` alive (and read-only where ``data`` is). Raises what
    ``cbor2.loads`` raises for input it rejects.
    """
    mv = memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    try:
        value, end = _item(mv, 0, 0, big, False)
        if end != len(mv):
            raise _Unsupported
        return value
    except (_Unsupported, IndexError, ValueError, struct.error, UnicodeDecodeError, TypeError):
        return cbor2.loads(mv.tobytes())


def _length(mv: memoryview, pos: int, ai: int) -> tuple[int, int]:
    if ai < 24:
        return ai, pos
    if ai == 24:
        return mv[pos], pos + 1
    if ai == 25:
        return int.from_bytes(mv[pos : pos + 2], "big"), pos + 2
    if ai == 26:
        return int.from_bytes(mv[pos : pos + 4], "big"), pos + 4
    if ai == 27:
        return int.from_bytes(mv[pos : pos + 8], "big"), pos + 8
    raise _Unsupported  # 28-30 are reserved, 31 is an indefinite length


def _item(mv: memoryview, pos: int, depth: int, big: int, frozen: bool) -> tuple[Any, int]:
    """One item at ``pos``; ``frozen`` (inside a tag, as cbor2 does) makes arrays tuples."""
    if depth > MAX_DEPTH:
        raise _Unsupported
    initial = mv[pos]
    major, ai = initial >> 5, initial & 0x1F
    pos += 1
    if major == 7:
        if ai == 20:
            return False, pos
        if ai == 21:
            return True, pos
        if ai == 22:
            return None, pos
        if ai == 25:
            return _HALF.unpack(mv[pos : pos + 2])[0], pos + 2
        if ai == 26:
            return _FLOAT.unpack(mv[pos : pos + 4])[0], pos + 4
        if ai == 27:
            return _DOUBLE.unpack(mv[pos : pos + 8])[0], pos + 8
        raise _Unsupported
    n, pos = _length(mv, pos, ai)
    if major == 0:
        return n, pos
    if major == 1:
        return -1 - n, pos
    if major in (2, 3):
        end = pos + n
        if end > len(mv):
            raise _Unsupported
        if major == 3:
            return str(mv[pos:end], "utf-8"), end
        return (mv[pos:end] if n >= big else mv[pos:end].tobytes()), end
    if major == 4:
        out: list[Any] = []
        for _ in range(n):
            value, pos = _item(mv, pos, depth + 1, big, frozen)
            out.append(value)
        return (tuple(out) if frozen else out), pos
    if major == 5:
        if frozen:
            raise _Unsupported  # cbor2 returns a FrozenDict there
        obj: dict[Any, Any] = {}
        for _ in range(n):
            key, pos = _item(mv, pos, depth + 1, big, True)
            if isinstance(key, (tuple, memoryview)):
                raise _Unsupported  # cbor2 makes these hashable its own way
            value, pos = _item(mv, pos, depth + 1, big, False)
            obj[key] = value
        return obj, pos
    # major 6: a tag
    if n not in _TENSOR_TAGS:
        raise _Unsupported
    value, pos = _item(mv, pos, depth + 1, big, True)
    return cbor2.CBORTag(n, value), pos
