"""A scikit-learn device trainer for the digits task: ``SGDClassifier.partial_fit`` as a black box.

The tabular case: a linear one-vs-rest logistic model whose global weights travel as two
float64 tensors, ``coef`` [10, 64] and ``intercept`` [10]. Each round the trainer puts them
into a fresh estimator (``coef_``, ``intercept_``, ``classes_``), calls ``partial_fit`` on
minibatches taken in the digits protocol's order, and returns the estimator's new
``coef_``/``intercept_``. FedAvg of these is the plain average of the devices' linear models.

scikit-learn is a dependency of this example only; the agent never imports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import log_loss

from device_agent.trainers.base import TrainResult, TrainTask
from device_agent.trainers.numpy_trainer import load_local_data
from edgefl.models.numpy_models import minibatches

N_FEATURES = 64
N_CLASSES = 10
CLASSES = np.arange(N_CLASSES)
Weights = dict[str, np.ndarray]  # runtime alias: builtin generics work on Python 3.9, ``|`` not
SPEC = {"coef": (N_CLASSES, N_FEATURES), "intercept": (N_CLASSES,)}


def initial_weights() -> Weights:
    """The session's first model: all zeros, float64 (every class scores 0 for every sample)."""
    return {name: np.zeros(shape, dtype=np.float64) for name, shape in SPEC.items()}


def _setting(config: Mapping[str, Any], name: str, default: float, *, integer: bool) -> float:
    raw = config.get(name, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"train setting {name!r} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 0 or (integer and value != int(value)):
        kind = "a non-negative integer" if integer else "a non-negative finite number"
        raise ValueError(f"train setting {name!r} must be {kind}, got {raw!r}")
    return value


def make_estimator(weights: Mapping[str, np.ndarray], lr: float = 0.01, alpha: float = 1e-4) -> Any:
    """An SGDClassifier (log loss, constant step ``lr``, L2 ``alpha``) holding ``weights``.

    ``shuffle=False`` because the order is the protocol's, chosen by the caller. The arrays
    are copied: ``partial_fit`` updates ``coef_`` in place and must not touch the caller's
    (possibly cached, possibly read-only) global model. Raises ValueError naming the tensor
    when the names or shapes are not this model's.
    """
    missing = sorted(set(SPEC) - set(weights))
    extra = sorted(set(weights) - set(SPEC))
    if missing or extra:
        raise ValueError(
            f"weights do not match the SGDClassifier model: missing {missing}, unexpected {extra}"
        )
    for name, shape in SPEC.items():
        got = tuple(np.shape(weights[name]))
        if got != shape:
            raise ValueError(f"tensor {name!r}: shape {got}, the model needs {shape}")
    est = SGDClassifier(
        loss="log_loss",
        penalty="l2",
        alpha=alpha,
        learning_rate="constant",
        eta0=lr,
        shuffle=False,
        random_state=0,
    )
    est.classes_ = CLASSES.copy()
    est.coef_ = np.array(weights["coef"], dtype=np.float64, order="C", copy=True)
    est.intercept_ = np.array(weights["intercept"], dtype=np.float64, copy=True)
    est.n_features_in_ = N_FEATURES
    return est


def evaluate_arrays(
    weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> dict[str, float]:
    """Accuracy (argmax of the decision function) and log loss of ``predict_proba``."""
    est = make_estimator(weights)
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.int64)
    acc = float(np.mean(est.predict(xs) == ys))
    loss = float(log_loss(ys, est.predict_proba(xs), labels=CLASSES))
    return {"accuracy": acc, "loss": loss}


class SklearnDigitsTrainer:
    """Trains the one-vs-rest logistic model on local samples with ``partial_fit``.

    Settings from ``task.config``: ``lr`` (constant step, default 0.01), ``alpha`` (L2
    strength, 1e-4), ``batch_size`` (32) and ``epochs`` (1). Minibatch ``s`` of an epoch is
    ``perm[s:s+batch_size]`` with ``perm = np.random.default_rng([seed, round]).permutation(n)``
    (one generator per round, one permutation per epoch), so a retried round retrains the same.
    """

    def __init__(
        self,
        X: np.ndarray | None = None,
        y: np.ndarray | None = None,
        data_path: str | Path | None = None,
    ) -> None:
        X, y = load_local_data(X, y, data_path, who="SklearnDigitsTrainer")
        if np.ndim(X) != 2 or np.shape(X)[1] != N_FEATURES:
            raise ValueError(f"local X has shape {np.shape(X)}; the digits task needs [n, 64]")
        self.x = np.ascontiguousarray(X, dtype=np.float64)
        self.y = np.asarray(y, dtype=np.int64)

    def train(self, weights: Weights, task: TrainTask) -> TrainResult:
        """Load the global model, ``partial_fit`` the minibatches, return the new model."""
        cfg = task.config
        lr = _setting(cfg, "lr", 0.01, integer=False)
        alpha = _setting(cfg, "alpha", 1e-4, integer=False)
        batch_size = int(_setting(cfg, "batch_size", 32, integer=True))
        epochs = int(_setting(cfg, "epochs", 1, integer=True))
        if lr <= 0 or batch_size < 1 or epochs < 1:
            raise ValueError(
                f"train settings lr={lr}, batch_size={batch_size}, epochs={epochs} must be positive"
            )
        est = make_estimator(weights, lr=lr, alpha=alpha)
        n = len(self.y)
        for idx in minibatches(
            n, seed=task.seed, round_=task.round, batch_size=batch_size, epochs=epochs
        ):
            est.partial_fit(self.x[idx], self.y[idx], classes=CLASSES)
        new = {
            "coef": np.array(est.coef_, dtype=np.float64, copy=True),
            "intercept": np.array(est.intercept_, dtype=np.float64, copy=True),
        }
        metrics = evaluate_arrays(new, self.x, self.y)
        return TrainResult(new, n, {f"train_{k}": v for k, v in metrics.items()})

    def evaluate(self, weights: Weights) -> dict[str, float]:
        """Accuracy and log loss of ``weights`` on this trainer's data (local, or a test split)."""
        return evaluate_arrays(weights, self.x, self.y)
