"""The validation of incoming updates against the round's model spec.

An update is checked before it touches any running sum: one bad device must never poison an
aggregate, and the reason for a rejection must be precise enough to debug a fleet.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgefl.protocol.types import Spec


class UpdateRejected(ValueError):
    """An update that must not be aggregated; the message is the logged reason."""


def validate_update(tensors: Mapping[str, np.ndarray], spec: Spec) -> None:
    """Raise UpdateRejected unless names, dtypes and shapes match and every value is finite."""
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
