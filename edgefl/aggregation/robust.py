"""Robust aggregation: the shared machinery of FedMedian, the trimmed mean and Krum.

These rules need the individual updates, not running sums, so they cannot be split into
sufficient statistics. edgefl runs them as a **two-level estimator**:

1. each combiner holds its round's accepted updates (bounded by ``max_held_updates`` and
   ``max_held_bytes``; beyond that it rejects updates with a reason) and applies the rule to
   them: its partial carries the regional estimate ``e_r``, with ``count = n_r`` and the
   partial field ``aggregate`` naming the rule (a partial that does not name the round's rule
   is refused, so a combiner that folded sums is never mistaken for a robust one);
2. the controller merges the regional estimates with the count-weighted coordinate-wise
   median: per coordinate, the smallest ``e`` among the ``e_r`` such that the regions at or
   below it hold at least half of all accepted updates.

With one region (one combiner) the result is exactly the paper's estimator over all updates.
With several, each coordinate of the result lies between the smallest and largest regional
estimate, and within the range of the honest regions' estimates as long as the regions whose
estimate an attacker controls hold less than half of the updates: every region's own rule
bounds its attackers, and the median bounds the regions.

The rules are unweighted, as in the papers: every update counts once, whatever its example
count (an example count is a claim a Byzantine device can inflate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgefl.aggregation.base import is_splittable, make_aggregator
from edgefl.protocol.types import Spec, Weights

__all__ = [
    "RegionalEstimates",
    "RobustAggregator",
    "robust_rule",
    "weighted_median",
]


class RobustAggregator:
    """Base of the non-splittable rules: ``estimate`` over held updates, stateless ``step``.

    Subclasses set ``name`` and ``Params`` and implement ``estimate``. ``step`` returns the
    round's two-level estimate as the next model (the rules are estimators of the next model,
    not server optimizers). Stateless and thread-compatible.
    """

    name = "robust"
    splittable = False

    def __init__(self, **params: Any) -> None:
        self.params = params

    def estimate(self, updates: Sequence[Weights]) -> Weights:
        """The rule over ``updates`` (float64 results); ValueError if too few updates."""
        raise NotImplementedError

    def plan(self) -> dict[str, Any]:
        """The round plan's ``aggregate`` field: tells combiners to hold and apply the rule."""
        return {"rule": self.name, "params": dict(self.params)}

    def step(self, global_weights: Weights, mean: Weights) -> Weights:
        return {k: np.asarray(mean[k], dtype=global_weights[k].dtype) for k in global_weights}

    def state_dict(self) -> Weights:
        return {}

    def load_state_dict(self, state: Weights) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state")


def robust_rule(aggregator: Any) -> RobustAggregator | None:
    """The aggregator as a robust rule, or None if it is splittable (the sums path).

    TypeError for a plug-in that says it is not splittable but is no ``RobustAggregator``:
    edgefl would not know how to run it, and must not fall back to the mean.
    """
    if is_splittable(aggregator):
        return None
    if not isinstance(aggregator, RobustAggregator):
        raise TypeError(
            f"aggregator {getattr(aggregator, 'name', aggregator)!r} is not splittable but "
            "does not implement RobustAggregator.estimate; edgefl cannot run it"
        )
    return aggregator


def rule_from_plan(aggregate: Any) -> RobustAggregator:
    """The rule a round plan's ``aggregate`` field names; ValueError if it is unknown, its
    parameters are bad, or it names a splittable aggregator (no hold needed)."""
    if not isinstance(aggregate, dict) or not isinstance(aggregate.get("rule"), str):
        raise ValueError(f"aggregate field must be {{rule: str, params: map}}, got {aggregate!r}")
    params = aggregate.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError("aggregate.params must be a map")
    rule = robust_rule(make_aggregator(aggregate["rule"], **params))
    if rule is None:
        raise ValueError(f"aggregator {aggregate['rule']!r} is splittable: it needs no hold")
    return rule


def stack(updates: Sequence[Weights], name: str) -> np.ndarray:
    """One tensor of every update, stacked as float64: shape ``(n, *tensor shape)``."""
    return np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])


def weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Coordinate-wise weighted (lower) median along axis 0.

    Per coordinate: sort the values, and take the first whose cumulative weight reaches half
    the total. With equal weights and an odd count this is ``np.median``.
    """
    w = np.asarray(weights, dtype=np.float64)
    order = np.argsort(values, axis=0, kind="stable")
    sorted_vals = np.take_along_axis(values, order, axis=0)
    cum = np.cumsum(w[order], axis=0)
    idx = np.argmax(cum >= 0.5 * w.sum(), axis=0)
    out: np.ndarray = np.take_along_axis(sorted_vals, idx[None, ...], axis=0)[0]
    return out


class RegionalEstimates:
    """The controller's side of the two-level estimator: regional estimates, then their
    count-weighted coordinate-wise median. Memory: one float64 model per region."""

    def __init__(self, rule: RobustAggregator, spec: Spec) -> None:
        self.rule, self.spec = rule, spec
        self.estimates: list[Weights] = []
        self.counts: list[int] = []
        self.count = 0
        self.weight = 0.0

    def add(self, estimate: Weights, count: int) -> None:
        """Keep one region's estimate (copied out of the partial's buffer)."""
        missing = set(self.spec) - set(estimate)
        if missing:
            raise KeyError(f"partial lacks {sorted(missing)}")
        kept = {}
        for name, (_, shape) in self.spec.items():
            arr = np.array(estimate[name], dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"partial tensor {name!r} has shape {arr.shape}")
            kept[name] = arr
        self.estimates.append(kept)
        self.counts.append(int(count))
        self.count += int(count)
        self.weight += float(count)

    def center(self) -> Weights:
        """The merged estimate (float64); the single region's own when there is one."""
        if not self.estimates:
            raise ValueError("no regional estimates")
        if len(self.estimates) == 1:
            return self.estimates[0]
        counts = np.asarray(self.counts, dtype=np.float64)
        return {name: weighted_median(stack(self.estimates, name), counts) for name in self.spec}
