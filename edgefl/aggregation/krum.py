"""Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent").

Each of the n updates gets a score: the sum of its squared distances to its ``n - f - 2``
nearest other updates (all tensors flattened into one vector),

    s(i) = sum_{j in N_i}  ||w_i - w_j||^2

Krum returns the update with the lowest score; Multi-Krum the plain mean of the ``m`` updates
with the lowest scores (``m = 1`` is Krum, ``m = n`` the mean). ``f`` (default 1) is the
number of Byzantine updates tolerated **per combiner**; the rule needs ``n >= 2f + 3``
updates, and a combiner with fewer reports that instead of computing something else. ``m``
defaults to ``n - f``. Not splittable: it runs as the two-level estimator of
``edgefl.aggregation.robust`` (exact with one combiner; docs/algorithms.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import Field

from edgefl.aggregation.base import StrictParams
from edgefl.aggregation.robust import RobustAggregator, stack
from edgefl.protocol.types import Weights


def krum_scores(updates: Sequence[Weights], f: int) -> np.ndarray:
    """Krum's score of every update; ValueError unless ``n >= 2f + 3``."""
    n = len(updates)
    if n < 2 * f + 3:
        raise ValueError(f"Krum with f={f} needs at least {2 * f + 3} updates, got {n}")
    d2 = np.zeros((n, n))
    for name in updates[0]:  # ||x_i - x_j||^2 = |x_i|^2 + |x_j|^2 - 2 x_i.x_j, a tensor at a time
        x = stack(updates, name).reshape(n, -1)
        sq = np.einsum("ij,ij->i", x, x)
        d2 += sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(d2, 0.0, out=d2)  # rounding can leave tiny negatives for near-equal updates
    closest = np.sort(d2 + np.diag(np.full(n, np.inf)), axis=1)[:, : n - f - 2]
    scores: np.ndarray = closest.sum(axis=1)
    return scores


class MultiKrum(RobustAggregator):
    """Mean of the ``m`` updates with the lowest Krum scores."""

    name = "multikrum"

    class Params(StrictParams):
        f: int = Field(1, ge=0, description="Byzantine updates tolerated per combiner")
        m: int | None = Field(None, ge=1, description="updates averaged (default n - f)")

    def __init__(self, f: int = 1, m: int | None = None) -> None:
        super().__init__(f=f, m=m)
        self.f, self.m = f, m

    def _selected(self, updates: Sequence[Weights]) -> int:
        return min(len(updates), self.m) if self.m is not None else len(updates) - self.f

    def estimate(self, updates: Sequence[Weights]) -> Weights:
        scores = krum_scores(updates, self.f)
        chosen = np.argsort(scores, kind="stable")[: self._selected(updates)]
        picked = [updates[i] for i in chosen]
        return {name: stack(picked, name).mean(axis=0) for name in updates[0]}


class Krum(MultiKrum):
    """The single update with the lowest Krum score."""

    name = "krum"

    class Params(StrictParams):
        f: int = Field(1, ge=0, description="Byzantine updates tolerated per combiner")

    def __init__(self, f: int = 1) -> None:
        super().__init__(f=f, m=1)
        self.params = {"f": f}
