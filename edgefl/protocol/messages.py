"""Control messages of protocol v1 (CBOR maps) and their validation.

Plain dicts on the wire keep the device side dependency-free (no pydantic on a Pi). Each
message type has a schema of required fields and their CBOR types; ``decode`` checks them so
no component ever acts on a half-formed message.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import cbor2

from edgefl.protocol.cborview import loads_view

if TYPE_CHECKING:
    import numpy as np

    from edgefl.protocol.chunking import Payload

MESSAGE_VERSION = 1
ZERO_COPY_FROM = 64 * 1024  # larger messages (updates, partials) decode without copying

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
        "device": str,  # the sender, as on the topic: a replay onto another device's topic fails
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
    # device -> combiner, on the update channel (chunked like an update): the device cannot
    # take part in this round (a refused package, data that does not fit, a failed trainer)
    "decline": {"task_id": str, "reason": str},
    # device -> controller, on .../dev/{device}/request: a retained model or package that the
    # device could not find (e.g. lost in a broker crash); the controller republishes it
    "fetch": {"version": str},
}

# Fields a message may carry; when present they must have this type.
OPTIONAL: dict[str, dict[str, type | tuple[type, ...]]] = {
    # fence: the controller's lease token for the session; a plan or task with a lower fence
    # than one already seen for its session comes from a stale controller and is dropped
    # assign: in a region served by a combiner pool, pool member -> the devices it serves
    # aggregate (round): {"rule": name, "params": map}: hold the updates and apply this robust
    # rule (docs/algorithms.md); (partial): the rule whose estimate ``sums`` holds
    # trace: the W3C trace context ({"traceparent", "tracestate"?}) of the sender's span, so
    # one round can be followed across tiers (edgefl.observability.tracing); only when on
    "round": {
        "package": dict,
        "fence": int,
        "assign": dict,
        "compression": dict,
        "dp": dict,
        "aggregate": dict,
        "trace": dict,
        "async": dict,
    },
    # compression: {"encoding": float32|float16|int8|topk, "topk_fraction"}: send the delta
    # to the global model, so encoded (edgefl.protocol.compression); a device that cannot
    # declines
    "task": {"package": dict, "fence": int, "compression": dict, "trace": dict},
    # combiner: the pool member reporting (a pool's members report on one region topic)
    "progress": {"combiner": str},
    # encoding set: ``tensors`` holds the delta in this encoding
    "update": {"encoding": str, "trace": dict},
    # sums_of "delta": the sums are sum(w * delta), the controller adds W * global;
    # update_bytes: the payload bytes of the updates folded (bytes on the wire, upward),
    # tensor_bytes: the tensor data within them
    # async (round): {"max_staleness": S, "exponent": a}: a FedBuff round (docs/protocol.md
    # 5b); (partial): the same map echoed, proof that the combiner weighed by staleness
    "partial": {
        "sums_of": str,
        "update_bytes": int,
        "tensor_bytes": int,
        "aggregate": str,
        "async": dict,
    },
}

PACKAGE_REF: dict[str, type] = {"id": str, "digest": bytes, "size": int}
"""A session's model package: published like a model version under ``id`` (``pkg-...``)."""


class MessageError(ValueError):
    """A control message that is malformed or of the wrong type."""


def encode(msg_type: str, **fields: Any) -> bytes:
    if msg_type not in SCHEMAS:
        raise MessageError(f"unknown message type {msg_type!r}")
    missing = [k for k in SCHEMAS[msg_type] if k not in fields]
    if missing:
        raise MessageError(f"{msg_type} message lacks {missing}")
    return cbor2.dumps({"v": MESSAGE_VERSION, "type": msg_type, **fields})


def encode_payload(
    msg_type: str, tensor_field: str, tensors: Mapping[str, np.ndarray], **fields: Any
) -> Payload:
    """``encode`` of a message with a tensor set, as segments that reference the tensors.

    The same bytes as ``encode(msg_type, **fields, tensor_field=encode_tensors(tensors))``,
    but the tensors are not copied: chunks are cut straight from their memory
    (``chunking.ChunkWriter``). The tensors must not change until the payload is sent.
    """
    from edgefl.protocol.chunking import Payload
    from edgefl.protocol.tensors import lazy_tensors

    tags, blobs = lazy_tensors(tensors)
    return Payload.splice(encode(msg_type, **fields, **{tensor_field: tags}), blobs)


def decode(
    payload: bytes | bytearray | memoryview, expected: str | tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Parse and validate one message; raise MessageError with the reason otherwise.

    A large message (an update, a partial) is decoded without copying its byte strings: its
    tensors' typed arrays are ``memoryview`` slices of ``payload`` (``cborview``).
    """
    try:
        big = len(payload) >= ZERO_COPY_FROM
        msg = loads_view(payload) if big else cbor2.loads(payload)
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
    for key, kind in OPTIONAL.get(msg_type, {}).items():
        if key in msg and (not isinstance(msg[key], kind) or isinstance(msg[key], bool)):
            raise MessageError(f"{msg_type} message: field {key!r} of the wrong type")
    if "package" in msg:
        check_package_ref(msg["package"])
    return msg


def check_package_ref(ref: Any) -> None:
    """Raise MessageError unless ``ref`` is ``{"id": "pkg-...", "digest": 32 bytes, "size"}``."""
    if not isinstance(ref, dict):
        raise MessageError("package reference must be a map")
    for key, kind in PACKAGE_REF.items():
        value = ref.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise MessageError(f"package reference: field {key!r} missing or of the wrong type")
    if len(ref["digest"]) != 32 or not ref["id"].startswith("pkg-") or ref["size"] <= 0:
        raise MessageError("package reference: id must be pkg-..., digest 32 bytes, size > 0")


def package_ref(digest_hex: str, size: int) -> dict[str, Any]:
    """The wire reference of a package: its transfer id on the model tree, digest and size."""
    return {"id": f"pkg-{digest_hex[:32]}", "digest": bytes.fromhex(digest_hex), "size": size}


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
