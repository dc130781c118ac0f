"""Server-side aggregator interface and registry.

Aggregation is split in two: combiners compute sufficient statistics (``WeightedSum``), and the
controller runs one ``ServerAggregator`` on the merged weighted mean. FedAvg takes the mean;
the FedOpt family treats ``mean - global`` as a pseudo-gradient for a server optimizer.
Plug-ins register under the ``edgefl.aggregators`` entry-point group.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Protocol

from edgefl.protocol.types import Weights


class ServerAggregator(Protocol):
    """The controller's optimizer: turns the fleet's exact weighted mean into the next model.

    Runs once per round, at the controller, on the merged mean of every region, so it need
    not be splittable. Its state (e.g. FedAdam's moments) must round-trip through
    ``state_dict``/``load_state_dict``: it is stored with each model version, and a restarted
    controller resumes with it. Not called concurrently.
    """

    name: str

    def step(self, global_weights: Weights, mean: Weights) -> Weights:
        """Return the next global model from the current one and the clients' weighted mean."""

    def state_dict(self) -> Weights:
        """Optimizer state to persist with each model version (restart safety)."""

    def load_state_dict(self, state: Weights) -> None:
        """Restore what ``state_dict`` returned (``{}`` before the first round)."""


def _builtin() -> dict[str, type]:
    from edgefl.aggregation.fedavg import FedAvg
    from edgefl.aggregation.fedopt import FedAdaGrad, FedAdam, FedYogi

    return {"fedavg": FedAvg, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdaGrad}


def available_aggregators() -> list[str]:
    """Built-in names plus those registered under the ``edgefl.aggregators`` entry point."""
    names = set(_builtin())
    names.update(ep.name for ep in entry_points(group="edgefl.aggregators"))
    return sorted(names)


def make_aggregator(name: str, **params: Any) -> ServerAggregator:
    """A fresh aggregator by name; ValueError lists the available names for a typo."""
    builtin = _builtin()
    if name in builtin:
        made: ServerAggregator = builtin[name](**params)
        return made
    for ep in entry_points(group="edgefl.aggregators"):
        if ep.name == name:
            plugin: ServerAggregator = ep.load()(**params)
            return plugin
    raise ValueError(f"unknown aggregator {name!r}; available: {available_aggregators()}")
