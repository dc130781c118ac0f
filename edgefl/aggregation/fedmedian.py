"""FedMedian: the coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates").

    w_{t+1}[j] = median_k  w_k[j]        for every coordinate j

over the round's accepted updates ``w_k``, unweighted. No parameters. Tolerates fewer than
half of the updates being arbitrary. Not splittable: it runs as the two-level estimator of
``edgefl.aggregation.robust`` (exact with one combiner; see docs/algorithms.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgefl.aggregation.base import StrictParams
from edgefl.aggregation.robust import RobustAggregator, stack
from edgefl.protocol.types import Weights


class FedMedian(RobustAggregator):
    """Coordinate-wise median of the updates; needs the updates themselves (not splittable)."""

    name = "fedmedian"

    class Params(StrictParams):
        """FedMedian takes no parameters."""

    def estimate(self, updates: Sequence[Weights]) -> Weights:
        if not updates:
            raise ValueError("the median of no updates")
        return {name: np.median(stack(updates, name), axis=0) for name in updates[0]}
