"""The typed vocabulary that crosses layers: weights, specs, participants, rejections, statuses.

Plain aliases and ``TypedDict``s (no pydantic), because the device agent imports this module
too. The wire schemas in ``messages.py`` stay the single source of the fields on the wire;
these types say what those fields hold once decoded, so the combiner, controller, store and
API agree on one shape instead of comments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict

import numpy as np

from edgefl.protocol.tensors import DTYPE_TO_TAG

# Aliases are evaluated at import time: builtin generics work on Python 3.9, `X | Y` would not.
Weights = dict[str, np.ndarray]
"""Named tensors: a model's parameters, an update, or optimizer state."""

Spec = dict[str, tuple[str, tuple[int, ...]]]
"""name -> (numpy dtype name, shape): what every update of a round must look like."""

WireSpec = list[list[Any]]
"""A spec on the wire: ``[[name, dtype, [dims...]], ...]`` sorted by name."""

# created (through the API, not started yet) -> queued (waiting for a serving controller)
# -> running -> completed, failed or stopped
SessionStatus = Literal["created", "queued", "running", "completed", "failed", "stopped"]
RoundStatus = Literal["running", "completed", "failed"]
PresenceState = Literal["online", "offline"]

SESSION_STATUSES: tuple[str, ...] = (
    "created",
    "queued",
    "running",
    "completed",
    "failed",
    "stopped",
)
ROUND_STATUSES: tuple[str, ...] = ("running", "completed", "failed")


class Participant(TypedDict):
    """One accepted update, as a combiner reports it in its partial and the store keeps it."""

    device: str
    region: str
    n: int  # examples trained on: the update's aggregation weight
    metrics: dict[str, float]


class Rejection(TypedDict):
    """One refused update and the reason, precise enough to debug a fleet from the record."""

    device: str
    reason: str


def spec_of(weights: Mapping[str, np.ndarray]) -> Spec:
    """The spec every update of a model must match."""
    return {k: (np.asarray(v).dtype.name, tuple(np.asarray(v).shape)) for k, v in weights.items()}


def spec_to_wire(spec: Spec) -> WireSpec:
    """Encode a spec for the ``round`` message (sorted, so equal specs encode equally)."""
    return [[name, dtype, list(shape)] for name, (dtype, shape) in sorted(spec.items())]


def spec_from_wire(value: object) -> Spec:
    """Decode a wire spec; raise ValueError on anything that is not ``[[name, dtype, shape]]``."""
    if not isinstance(value, (list, tuple)):
        raise ValueError("spec must be a list of [name, dtype, shape]")
    out: Spec = {}
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise ValueError(f"spec entry {item!r} is not [name, dtype, shape]")
        name, dtype, shape = item
        if not isinstance(name, str) or not isinstance(dtype, str) or dtype not in DTYPE_TO_TAG:
            raise ValueError(
                f"spec entry {name!r}: name must be text and dtype one of {sorted(DTYPE_TO_TAG)},"
                f" got {dtype!r}"
            )
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(f"spec entry {name!r}: shape must be a list of sizes >= 0")
        out[name] = (dtype, tuple(shape))
    return out


def participants_from_wire(value: object) -> list[Participant]:
    """Check the ``devices`` list of a partial: every entry must be a well-formed Participant."""
    if not isinstance(value, list):
        raise ValueError("partial devices must be a list")
    out: list[Participant] = []
    for p in value:
        if not (
            isinstance(p, dict)
            and isinstance(p.get("device"), str)
            and isinstance(p.get("region"), str)
            and isinstance(p.get("n"), int)
            and not isinstance(p.get("n"), bool)
            and isinstance(p.get("metrics"), dict)
        ):
            raise ValueError(f"malformed participant {p!r}")
        out.append(
            Participant(device=p["device"], region=p["region"], n=p["n"], metrics=p["metrics"])
        )
    return out


def rejections_from_wire(value: object) -> list[Rejection]:
    """Check the ``rejected`` list of a partial."""
    if not isinstance(value, list):
        raise ValueError("partial rejected must be a list")
    out: list[Rejection] = []
    for r in value:
        if not (isinstance(r, dict) and isinstance(r.get("device"), str)):
            raise ValueError(f"malformed rejection {r!r}")
        out.append(Rejection(device=r["device"], reason=str(r.get("reason", ""))))
    return out
