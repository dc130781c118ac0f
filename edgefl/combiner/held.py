"""The combiner's held-updates path, for aggregators that cannot be split into sums.

A round plan with an ``aggregate`` field (``{"rule": "trimmed_mean", "params": {...}}``) asks
the combiner to keep the round's accepted updates and apply the robust rule to them when the
round closes, instead of folding each into a running sum (``edgefl.aggregation.robust``). The
regional estimate then travels in the partial's ``sums`` with ``count = weight = n`` and
``aggregate = rule``.

Memory grows with the number of devices here, unlike the sums path: ``max_updates`` and
``max_bytes`` bound it. An update beyond either bound is rejected (``HeldFull``) with a reason
the round record shows; the rule then runs over the updates held. Not thread-safe: the
combiner's worker is its only user.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgefl.aggregation.robust import RobustAggregator, rule_from_plan
from edgefl.aggregation.spec import UpdateRejected
from edgefl.protocol.chunking import release_array
from edgefl.protocol.types import Weights

__all__ = ["HeldFull", "HeldUpdates", "rule_from_plan"]


class HeldFull(UpdateRejected):
    """The combiner holds as many updates as it may: this one is refused."""


class HeldUpdates:
    """The accepted updates of one round, copied out of their transfer buffers."""

    def __init__(self, rule: RobustAggregator, max_updates: int, max_bytes: int) -> None:
        self.rule = rule
        self.max_updates, self.max_bytes = max_updates, max_bytes
        self.updates: list[Weights] = []
        self.nbytes = 0

    def check_room(self, tensors: Mapping[str, Any]) -> None:
        """Raise HeldFull unless one more update of this size fits both bounds."""
        size = sum(int(np.asarray(a).nbytes) for a in tensors.values())
        if len(self.updates) >= self.max_updates:
            raise HeldFull(
                f"combiner holds its maximum of {self.max_updates} updates for "
                f"{self.rule.name} (max_held_updates); use more combiners or a larger bound"
            )
        if self.nbytes + size > self.max_bytes:
            raise HeldFull(
                f"combiner holds {self.nbytes} bytes of updates for {self.rule.name}; one "
                f"more of {size} exceeds max_held_bytes={self.max_bytes}"
            )

    def add(self, tensors: Mapping[str, Any]) -> None:
        """Keep a copy of a validated update (its transfer buffer is reused afterwards)."""
        kept = {}
        for name, arr in tensors.items():
            kept[name] = np.array(arr, copy=True)
            release_array(arr)
            self.nbytes += kept[name].nbytes
        self.updates.append(kept)

    def estimate(self) -> Weights:
        """The rule over the held updates (float64); ValueError if the rule cannot run."""
        return self.rule.estimate(self.updates)

    def clear(self) -> None:
        self.updates.clear()
        self.nbytes = 0
