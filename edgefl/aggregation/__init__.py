"""Aggregation: combiner-side sufficient statistics, controller-side server aggregators, and
the robust rules that run as a two-level estimator (docs/algorithms.md)."""

from edgefl.aggregation.base import (
    ServerAggregator,
    available_aggregators,
    describe_aggregators,
    make_aggregator,
    validate_params,
)
from edgefl.aggregation.spec import UpdateRejected, validate_update
from edgefl.aggregation.weighted_sum import WeightedSum
from edgefl.protocol.types import spec_of

__all__ = [
    "ServerAggregator",
    "UpdateRejected",
    "WeightedSum",
    "available_aggregators",
    "describe_aggregators",
    "make_aggregator",
    "spec_of",
    "validate_params",
    "validate_update",
]
