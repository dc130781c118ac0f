"""Model specs (names, dtypes, shapes) and the validation of incoming updates against them.

An update is checked before it touches any running sum: one bad device must never poison an
aggregate, and the reason for a rejection must be precise enough to debug a fleet.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Spec = dict[str, tuple[str, tuple[int, ...]]]


class UpdateRejected(ValueError):
    """An update that must not be aggregated; the message is the logged reason."""


def spec_of(weights: Mapping[str, np.ndarray]) -> Spec:
    return {k: (np.asarray(v).dtype.name, tuple(np.asarray(v).shape)) for k, v in weights.items()}


def spec_to_wire(spec: Spec) -> list[list]:
    return [[name, dtype, list(shape)] for name, (dtype, shape) in sorted(spec.items())]


def spec_from_wire(value: object) -> Spec:
    if not isinstance(value, (list, tuple)):
        raise ValueError("spec must be a list of [name, dtype, shape]")
    out: Spec = {}
    for item in value:
        name, dtype, shape = item
        out[str(name)] = (str(dtype), tuple(int(d) for d in shape))
    return out


def validate_update(tensors: Mapping[str, np.ndarray], spec: Spec) -> None:
    missing = sorted(set(spec) - set(tensors))
    extra = sorted(set(tensors) - set(spec))
    if missing or extra:
        raise UpdateRejected(
            f"tensor names differ from the model: missing {missing}, unexpected {extra}"
        )
    for name, (dtype, shape) in spec.items():
        arr = tensors[name]
        if arr.dtype.name != dtype:
            raise UpdateRejected(f"tensor {name!r}: dtype {arr.dtype.name}, expected {dtype}")
        if tuple(arr.shape) != shape:
            raise UpdateRejected(f"tensor {name!r}: shape {tuple(arr.shape)}, expected {shape}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise UpdateRejected(f"tensor {name!r} holds NaN or infinite values")
