"""Folding compressed delta updates into the running sums, exactly, without a dense copy.

A round whose plan carries ``compression`` folds deltas, not weights: the combiner has only
the model's spec, not the global model, so its sums are ``sum(w * delta)`` and its partial
says ``sums_of: "delta"``. The controller, which holds the global model ``g``, adds
``W_r * g`` to each such region's sums before merging (``add_global``), since
``sum(w * x) = sum(w * (g + delta)) = W * g + sum(w * delta)``. The merged sums are then
weight sums whatever each region sent, so the mean over mixed regions stays exact.

The fold never materialises a float64 copy of a device's update: dense encodings (float16,
int8, float32) go through the same blockwise axpy as uncompressed updates, with the int8
scale folded into the multiplier; top-k is a scatter-add of its ``k`` values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgefl.aggregation.spec import UpdateRejected
from edgefl.aggregation.weighted_sum import WeightedSum, axpy_inplace
from edgefl.protocol.compression import Dense, Encoded, Sparse, decode_delta, squared_norm
from edgefl.protocol.types import Spec, Weights

__all__ = ["add_global", "check_update", "fold_delta"]

_SCRATCH = 1 << 15


def check_update(
    msg: Mapping[str, Any], spec: Spec, plan: Mapping[str, Any]
) -> dict[str, Encoded] | None:
    """The decoded delta of a compressed update, or None for an uncompressed one.

    Raises ``UpdateRejected`` when the update's kind does not match the round (weights in a
    round that folds deltas, or the reverse: the two cannot share one sum) and
    ``CodecError`` (from ``decode_delta``) for a malformed delta.
    """
    encoding = msg.get("encoding")
    wanted = plan.get("compression")
    if wanted is None:
        if encoding is None:
            return None
        raise UpdateRejected(f"a compressed ({encoding}) update in a round of plain weights")
    if encoding is None:
        raise UpdateRejected(
            f"this round folds compressed deltas ({wanted.get('encoding')}); the update carries "
            "plain weights (an agent without compression support must decline)"
        )
    return decode_delta(msg["tensors"], encoding, spec)


def fold_delta(
    acc: WeightedSum,
    delta: Mapping[str, Encoded],
    num_examples: float,
    plan: Mapping[str, Any],
    scale: float = 1.0,
) -> float:
    """Fold one decoded delta into ``acc``; return the clip factor applied (1.0: none).

    Without DP the weight is the example count, as for plain updates. ``scale`` multiplies
    the delta but not the weight: FedBuff's staleness discount, which shrinks a stale
    update's step instead of only its share (``edgefl.aggregation.fedbuff``). With DP (the plan
    carries ``dp.clip_norm``) every update weighs 1 and is scaled to norm <= ``clip_norm``
    first, which bounds one device's influence on the mean (``edgefl.aggregation.privacy``).
    """
    dp = plan.get("dp")
    factor = 1.0
    if dp is not None:
        weight = 1.0
        norm = float(np.sqrt(squared_norm(delta)))
        clip = float(dp["clip_norm"])
        if norm > clip:
            factor = clip / norm
    else:
        weight = num_examples
    scratch = np.empty(_SCRATCH, dtype=np.float64)
    for name, total in acc.sums.items():
        enc = delta[name]
        if isinstance(enc, Dense):
            axpy_inplace(total, enc.data, weight * factor * scale * enc.scale, scratch)
        elif isinstance(enc, Sparse):
            flat = total.reshape(-1)  # a view: the sums are C-contiguous
            flat[enc.index] += enc.values.astype(np.float64) * (weight * factor * scale)
    acc.weight += weight
    acc.count += 1
    return factor


def add_global(merged: WeightedSum, global_weights: Weights, weight: float) -> None:
    """Turn a region's delta sums (already added to ``merged``) into weight sums: += W_r * g."""
    scratch = np.empty(_SCRATCH, dtype=np.float64)
    for name, acc in merged.sums.items():
        axpy_inplace(acc, np.asarray(global_weights[name]), weight, scratch)
