"""Aggregation: combiner-side sufficient statistics and controller-side server aggregators."""

from edgefl.aggregation.base import ServerAggregator, available_aggregators, make_aggregator
from edgefl.aggregation.spec import UpdateRejected, validate_update
from edgefl.aggregation.weighted_sum import WeightedSum
from edgefl.protocol.types import spec_of

__all__ = [
    "ServerAggregator",
    "UpdateRejected",
    "WeightedSum",
    "available_aggregators",
    "make_aggregator",
    "spec_of",
    "validate_update",
]
