"""The trainer interface every device-side training backend implements.

A trainer is a black box to the rest of the system: it receives the global weights as named
numpy arrays and returns new weights of the same names, shapes and dtypes, the number of
examples it trained on (the aggregation weight) and finite scalar metrics. The agent checks
nothing about how: numpy, an ONNX train-step graph, a LiteRT signature runner or a user's
PyTorch or scikit-learn code all look the same from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from edgefl.protocol.types import Weights

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

__all__ = [
    "CallableTrainer",
    "EvaluatingTrainer",
    "TrainResult",
    "TrainTask",
    "Trainer",
    "Weights",
    "load_trainer",
]


@dataclass(frozen=True)
class TrainTask:
    """What the round asks of a device; ``(seed, round)`` makes local shuffling reproducible."""

    round: int  # 1-based round number of the session
    config: Mapping[str, Any]  # training settings sent by the controller (lr, epochs, ...)
    seed: int  # the device's seed index, for reproducible shuffling
    task_id: str = ""


@dataclass
class TrainResult:
    """A local update: new weights, its aggregation weight (examples) and finite metrics."""

    weights: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer(Protocol):
    """Trains the global model on local data. Called from the agent's one worker thread.

    Must return weights with exactly the names, dtypes and shapes it was given (the combiner
    rejects anything else) and may raise: the agent logs the error and skips the round.
    """

    def train(self, weights: Weights, task: TrainTask) -> TrainResult: ...


class EvaluatingTrainer(Trainer, Protocol):
    """A trainer that can also score a model on the device's own data (no data leaves it)."""

    def evaluate(self, weights: Weights) -> dict[str, float]: ...


class CallableTrainer:
    """Adapt any ``fn(weights, task) -> TrainResult | (weights, n, metrics)`` to a Trainer.

    ``evaluate_fn(weights) -> metrics``, when given, makes it an ``EvaluatingTrainer``: the
    black-box route for any framework (PyTorch on a Jetson, scikit-learn, ...).
    """

    def __init__(
        self,
        fn: Callable[[Weights, TrainTask], Any],
        evaluate_fn: Callable[[Weights], Mapping[str, float]] | None = None,
    ) -> None:
        self.fn = fn
        self.evaluate_fn = evaluate_fn

    def evaluate(self, weights: Weights) -> dict[str, float]:
        if self.evaluate_fn is None:
            raise NotImplementedError("this CallableTrainer was given no evaluate_fn")
        return dict(self.evaluate_fn(weights))

    def train(self, weights: Weights, task: TrainTask) -> TrainResult:
        out = self.fn(weights, task)
        if isinstance(out, TrainResult):
            return out
        new_weights, n, metrics = out
        return TrainResult(dict(new_weights), int(n), dict(metrics or {}))


def proximal_mu(config: Mapping[str, Any]) -> float:
    """FedProx's proximal term from the task's ``train`` settings (0 when absent).

    A trainer that cannot apply it must refuse the task (raise, so the agent declines with
    the reason) rather than silently train plain FedAvg.
    """
    raw = config.get("mu", 0.0)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ValueError(f"train setting mu must be a number, got {raw!r}")
    mu = float(raw)
    if not (mu >= 0 and mu != float("inf")):
        raise ValueError(f"train setting mu must be finite and >= 0, got {raw!r}")
    return mu


def load_trainer(name: str, **kwargs: Any) -> Trainer:
    """Find a trainer by its ``edgefl.trainers`` entry point (third parties register theirs)."""
    if name == "numpy":  # built in; skipping the entry-point scan keeps the agent small
        from device_agent.trainers.numpy_trainer import NumpyTrainer

        return NumpyTrainer(**kwargs)
    if name == "package":
        from device_agent.trainers.package_trainer import PackageTrainer

        return PackageTrainer(**kwargs)
    found = _trainer_entry_points()
    for ep in found:
        if ep.name == name:
            trainer: Trainer = ep.load()(**kwargs)
            return trainer
    known = sorted(ep.name for ep in found)
    raise ValueError(f"unknown trainer {name!r}; installed trainers: {known}")


def _trainer_entry_points() -> list[EntryPoint]:
    """Installed ``edgefl.trainers`` plug-ins (Python 3.9's API has no ``group=`` yet).

    Imported here, not at the top: importlib.metadata pulls in the email package, several MB
    of resident memory an agent with the built-in trainer never needs.
    """
    from importlib.metadata import entry_points

    eps = entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group="edgefl.trainers"))
    return list(eps.get("edgefl.trainers", []))  # pragma: no cover - Python 3.9
