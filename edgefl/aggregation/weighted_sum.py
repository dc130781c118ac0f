"""Sufficient statistics of a weighted mean: sum(w * x) and sum(w).

Combiners fold updates into these as they complete and send them upward; the controller adds
the partials of all regions. Because only sums travel, the merge is exact for any number of
regions and combiners, and a combiner's memory is O(model size) whatever the fleet size.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# Fold in blocks so the w*x temporary stays in cache instead of costing a full model copy.
_BLOCK = 1 << 15


def axpy_inplace(acc: np.ndarray, x: np.ndarray, w: float, scratch: np.ndarray) -> None:
    """acc += w * x on flat float64 views, blockwise, without a model-sized temporary."""
    a = acc.reshape(-1)
    b = x.reshape(-1)
    n = a.size
    w64 = np.float64(w)  # a numpy float64 scalar keeps float32 updates multiplying in float64
    for s in range(0, n, _BLOCK):
        e = min(s + _BLOCK, n)
        t = scratch[: e - s]
        np.multiply(b[s:e], w64, out=t)
        a[s:e] += t


class WeightedSum:
    """Running sum(w * x) and sum(w) over named tensors, accumulated in float64."""

    def __init__(self, spec: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
        self.sums = {name: np.zeros(shape, dtype=np.float64) for name, (_, shape) in spec.items()}
        self.weight = 0.0
        self.count = 0
        self._scratch = np.empty(_BLOCK, dtype=np.float64)

    def fold(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        for name, acc in self.sums.items():
            axpy_inplace(acc, np.asarray(tensors[name]), float(weight), self._scratch)
        self.weight += float(weight)
        self.count += 1

    def merge(self, sums: Mapping[str, np.ndarray], weight: float, count: int) -> None:
        """Add another partial's statistics (as sent by a combiner)."""
        for name, acc in self.sums.items():
            acc += sums[name]
        self.weight += float(weight)
        self.count += int(count)

    def mean(self, dtypes: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        if self.weight <= 0:
            raise ValueError("no updates were aggregated")
        out = {}
        for name, acc in self.sums.items():
            m = acc / self.weight
            out[name] = m.astype(dtypes[name]) if dtypes else m
        return out
