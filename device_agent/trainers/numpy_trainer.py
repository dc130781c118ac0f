"""The built-in numpy reference trainer (no ML framework needed on the device)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from device_agent.trainers.base import TrainResult, TrainTask
from device_agent.trainers.data import NoLocalData, load_local_data
from edgefl.models.numpy_models import evaluate, train_epochs
from edgefl.protocol.types import Weights

__all__ = ["NoLocalData", "NumpyTrainer", "load_local_data"]


class NumpyTrainer:
    """Trains softmax regression or the MLP on local arrays ``X`` (float) and ``y`` (int labels).

    A device with no examples is a valid device: ``local_examples`` is 0, the agent declines
    its tasks without fetching the model, and ``train`` raises ``NoLocalData``.
    """

    def __init__(
        self,
        X: np.ndarray | None = None,
        y: np.ndarray | None = None,
        data_path: str | Path | None = None,
    ) -> None:
        self.X, self.y = load_local_data(X, y, data_path, who="NumpyTrainer")

    @property
    def local_examples(self) -> int:
        return len(self.y)

    def train(self, weights: Weights, task: TrainTask) -> TrainResult:
        if len(self.y) == 0:
            raise NoLocalData("NumpyTrainer")
        cfg = task.config
        new = train_epochs(
            weights,
            self.X,
            self.y,
            round_=task.round,
            seed=task.seed,
            lr=float(cfg.get("lr", 0.1)),
            batch_size=int(cfg.get("batch_size", 32)),
            epochs=int(cfg.get("epochs", 1)),
            mu=float(cfg.get("mu", 0.0)),  # FedProx's proximal term, when the session asks
        )
        metrics = {f"train_{k}": v for k, v in evaluate(new, self.X, self.y).items()}
        return TrainResult(new, len(self.y), metrics)
