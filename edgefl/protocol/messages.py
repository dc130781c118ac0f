"""Control messages of protocol v1 (CBOR maps) and their validation.

Plain dicts on the wire keep the device side dependency-free (no pydantic on a Pi). Each
message type has a schema of required fields and their CBOR types; ``decode`` checks them so
no component ever acts on a half-formed message.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import cbor2

MESSAGE_VERSION = 1

_num = (int, float)
SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    # combiner -> device (QoS 1, persistent session)
    "task": {
        "task_id": str,
        "session": str,
        "round": int,
        "model_version": str,
        "model_digest": bytes,
        "deadline": _num,
        "train": dict,
        "chunk_size": int,
    },
    # device -> combiner (chunked)
    "update": {
        "task_id": str,
        "model_version": str,
        "num_examples": int,
        "metrics": dict,
        "tensors": dict,
    },
    # device presence (retained; last will says offline)
    "status": {"state": str, "ts": _num},
    "telemetry": {"ts": _num, "metrics": dict},
    # controller -> combiner
    "round": {
        "task_id": str,
        "session": str,
        "round": int,
        "model_version": str,
        "model_digest": bytes,
        "devices": list,
        "deadline": _num,
        "train": dict,
        "chunk_size": int,
        "spec": list,
    },
    "close": {"task_id": str},
    # combiner -> controller
    "progress": {"task_id": str, "region": str, "accepted": int, "rejected": int},
    "partial": {
        "task_id": str,
        "region": str,
        "combiner": str,
        "count": int,
        "weight": _num,
        "devices": list,
        "rejected": list,
        "sums": dict,
    },
}


class MessageError(ValueError):
    """A control message that is malformed or of the wrong type."""


def encode(msg_type: str, **fields: Any) -> bytes:
    if msg_type not in SCHEMAS:
        raise MessageError(f"unknown message type {msg_type!r}")
    missing = [k for k in SCHEMAS[msg_type] if k not in fields]
    if missing:
        raise MessageError(f"{msg_type} message lacks {missing}")
    return cbor2.dumps({"v": MESSAGE_VERSION, "type": msg_type, **fields})


def decode(payload: bytes, expected: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Parse and validate one message; raise MessageError with the reason otherwise."""
    try:
        msg = cbor2.loads(payload)
    except Exception as exc:
        raise MessageError(f"malformed CBOR: {exc}") from exc
    if not isinstance(msg, dict):
        raise MessageError("message must be a CBOR map")
    if msg.get("v") != MESSAGE_VERSION:
        raise MessageError(f"unsupported message version {msg.get('v')!r}")
    msg_type = msg.get("type")
    if not isinstance(msg_type, str) or msg_type not in SCHEMAS:
        raise MessageError(f"unknown message type {msg_type!r}")
    if expected is not None:
        allowed = (expected,) if isinstance(expected, str) else expected
        if msg_type not in allowed:
            raise MessageError(f"expected a {'/'.join(allowed)} message, got {msg_type!r}")
    for key, kind in SCHEMAS[msg_type].items():
        value = msg.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise MessageError(f"{msg_type} message: field {key!r} missing or of the wrong type")
    return msg


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Keep only finite numeric metrics with string names (metrics come from devices)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        if isinstance(k, str) and numeric and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def now() -> float:
    return time.time()
