"""Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates").

For every coordinate j, sort the n updates' values, drop the ``k = floor(beta * n)`` smallest
and the k largest, and average the rest:

    w_{t+1}[j] = 1 / (n - 2k) * sum_{i = k+1}^{n-k}  w_(i)[j]

Unweighted. ``beta`` (default 0.1) is the fraction trimmed at each end, ``0 <= beta < 0.5``;
it must exceed the fraction of Byzantine updates. Not splittable: it runs as the two-level
estimator of ``edgefl.aggregation.robust`` (exact with one combiner; docs/algorithms.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import Field

from edgefl.aggregation.base import StrictParams
from edgefl.aggregation.robust import RobustAggregator, stack
from edgefl.protocol.types import Weights


class TrimmedMean(RobustAggregator):
    """Mean of each coordinate after trimming ``beta`` of the values at each end."""

    name = "trimmed_mean"

    class Params(StrictParams):
        beta: float = Field(0.1, ge=0, lt=0.5, description="fraction trimmed at each end")

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__(beta=beta)
        self.beta = beta

    def estimate(self, updates: Sequence[Weights]) -> Weights:
        n = len(updates)
        if n == 0:
            raise ValueError("the trimmed mean of no updates")
        k = math.floor(self.beta * n)
        out = {}
        for name in updates[0]:
            s = np.sort(stack(updates, name), axis=0)
            out[name] = s[k : n - k].mean(axis=0)
        return out
