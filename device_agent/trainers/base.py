"""The trainer interface every device-side training backend implements.

A trainer is a black box to the rest of the system: it receives the global weights as named
numpy arrays and returns new weights of the same names, shapes and dtypes, the number of
examples it trained on (the aggregation weight) and finite scalar metrics. ONNX, LiteRT and
user callables (PyTorch on a Jetson, scikit-learn) all slot in here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgefl.protocol.types import Weights


@dataclass(frozen=True)
class TrainTask:
    round: int  # 1-based round number of the session
    config: Mapping[str, Any]  # training settings sent by the controller (lr, epochs, ...)
    seed: int  # the device's seed index, for reproducible shuffling
    task_id: str = ""


@dataclass
class TrainResult:
    weights: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer(Protocol):
    def train(self, weights: Weights, task: TrainTask) -> TrainResult: ...


class CallableTrainer:
    """Adapt any ``fn(weights, task) -> TrainResult | (weights, n, metrics)`` to a Trainer."""

    def __init__(self, fn: Callable[[Weights, TrainTask], Any]) -> None:
        self.fn = fn

    def train(self, weights: Weights, task: TrainTask) -> TrainResult:
        out = self.fn(weights, task)
        if isinstance(out, TrainResult):
            return out
        new_weights, n, metrics = out
        return TrainResult(dict(new_weights), int(n), dict(metrics or {}))


def load_trainer(name: str, **kwargs: Any) -> Trainer:
    """Find a trainer by its ``edgefl.trainers`` entry point (third parties register theirs)."""
    if name == "numpy":  # built in; skipping the entry-point scan keeps the agent small
        from device_agent.trainers.numpy_trainer import NumpyTrainer

        return NumpyTrainer(**kwargs)
    from importlib.metadata import entry_points

    for ep in entry_points(group="edgefl.trainers"):
        if ep.name == name:
            return ep.load()(**kwargs)
    known = sorted(ep.name for ep in entry_points(group="edgefl.trainers"))
    raise ValueError(f"unknown trainer {name!r}; installed trainers: {known}")
