"""The built-in numpy reference trainer (no ML framework needed on the device)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from device_agent.trainers.base import TrainResult, TrainTask
from edgefl.models.numpy_models import evaluate, train_epochs
from edgefl.protocol.types import Weights


def load_local_data(
    X: np.ndarray | None,
    y: np.ndarray | None,
    data_path: str | Path | None,
    *,
    who: str = "NumpyTrainer",
) -> tuple[np.ndarray, np.ndarray]:
    """The device's data set: arrays, or an .npz with ``X`` and ``y``; refuses empty data."""
    if data_path is not None:
        with np.load(data_path) as data:
            if "X" not in data or "y" not in data:
                raise ValueError(f"{data_path}: the .npz needs arrays 'X' and 'y'")
            X, y = data["X"], data["y"]
    if X is None or y is None:
        raise ValueError(f"{who} needs local data: X and y, or data_path to an .npz")
    if len(X) != len(y) or len(y) == 0:
        raise ValueError(f"local data has {len(X)} samples but {len(y)} labels")
    return np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)


class NumpyTrainer:
    """Trains softmax regression or the MLP on local arrays ``X`` (float) and ``y`` (int labels)."""

    def __init__(
        self,
        X: np.ndarray | None = None,
        y: np.ndarray | None = None,
        data_path: str | Path | None = None,
    ) -> None:
        self.X, self.y = load_local_data(X, y, data_path)

    def train(self, weights: Weights, task: TrainTask) -> TrainResult:
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
        )
        metrics = {f"train_{k}": v for k, v in evaluate(new, self.X, self.y).items()}
        return TrainResult(new, len(self.y), metrics)
