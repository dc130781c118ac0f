"""The device's compressed update: its delta to the round's model, encoded as the task asks.

Numpy and cbor2 only, like the rest of the agent. The top-k residual (error feedback) lives
in the agent's ``ErrorFeedback`` for the session, in memory: a restarted agent starts again
from zero, which costs accuracy only for the entries it had not yet sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgefl.protocol.chunking import Payload
from edgefl.protocol.compression import ENCODINGS, ErrorFeedback, encode_delta
from edgefl.protocol.messages import encode

__all__ = ["compressed_update"]


def compressed_update(
    task: Mapping[str, Any],
    global_weights: Mapping[str, np.ndarray],
    new_weights: Mapping[str, np.ndarray],
    feedback: ErrorFeedback,
    **fields: Any,
) -> Payload:
    """The update message for a task with ``compression``; ValueError if this agent cannot.

    The error names what the task asked and what this agent supports: the agent declines
    with it, so the operator sees why the device sat the round out.
    """
    spec = task["compression"]
    encoding = spec.get("encoding") if isinstance(spec, Mapping) else None
    if encoding not in ENCODINGS:
        raise ValueError(
            f"compression {encoding!r} is not supported by this agent (it supports "
            f"{', '.join(ENCODINGS)})"
        )
    fraction = float(spec.get("topk_fraction", 0.1))
    if not 0 < fraction <= 1:
        raise ValueError(f"topk_fraction {fraction} is outside (0, 1]")
    if set(new_weights) != set(global_weights):
        raise ValueError("the trainer's tensors do not match the model's")
    delta = {
        k: np.subtract(new_weights[k], global_weights[k], dtype=np.float64) for k in global_weights
    }
    residual = feedback.for_session(str(task["session"])) if encoding == "topk" else None
    tensors = encode_delta(delta, encoding, topk_fraction=fraction, residual=residual)
    return Payload([encode("update", encoding=encoding, tensors=tensors, **fields)])
