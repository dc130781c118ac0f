"""A PyTorch device trainer for the digits task: the Jetson case of a black-box trainer.

The agent knows nothing about PyTorch. It hands this trainer the global model as named numpy
arrays (the module's ``state_dict`` names) and gets back arrays of the same names, shapes and
dtypes, so the combiners aggregate it like any other model. Nothing here is imported by the
agent itself: PyTorch stays an optional dependency of this example only.

Model: a one-hidden-layer MLP (64 -> hidden -> 10, ReLU) in float32, trained with plain
minibatch SGD in the digits protocol's order: ``np.random.default_rng([seed, round])`` shuffles
the local samples, batches are consecutive slices of that permutation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 (the PyTorch convention)

from device_agent.trainers.base import TrainResult, TrainTask
from device_agent.trainers.numpy_trainer import load_local_data
from edgefl.models.numpy_models import minibatches

N_FEATURES = 64
N_CLASSES = 10
HIDDEN = 32
Weights = dict[str, np.ndarray]  # runtime alias: builtin generics work on Python 3.9, ``|`` not


class DigitsMLP(nn.Module):
    """64 -> hidden -> 10 with ReLU; its ``state_dict`` names are the wire tensor names.

    The names (``fc1.weight`` [hidden, 64], ``fc1.bias``, ``fc2.weight`` [10, hidden],
    ``fc2.bias``) are part of the contract with the controller's initial model: renaming a
    layer changes the model the session runs.
    """

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.fc1 = nn.Linear(N_FEATURES, hidden)
        self.fc2 = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, one row per sample."""
        out: torch.Tensor = self.fc2(F.relu(self.fc1(x)))
        return out


def initial_weights(seed: int = 0, hidden: int = HIDDEN) -> Weights:
    """The session's first model: PyTorch's default init under ``seed``, as float32 arrays.

    The global RNG is forked, so calling this does not disturb the caller's torch seed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = DigitsMLP(hidden)
    return state_to_numpy(module)


def state_to_numpy(module: nn.Module) -> Weights:
    """The module's ``state_dict`` as fresh float32 numpy arrays (never views of the module)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def module_for(weights: Mapping[str, np.ndarray]) -> DigitsMLP:
    """A DigitsMLP holding ``weights``; the hidden width is read from ``fc1.weight``.

    Raises ValueError naming the tensor when the names or shapes are not this model's, so a
    device that got the wrong model says why instead of failing inside PyTorch.
    """
    if "fc1.weight" not in weights:
        raise ValueError(f"weights {sorted(weights)} are not a DigitsMLP: missing 'fc1.weight'")
    hidden = int(np.shape(weights["fc1.weight"])[0])
    module = DigitsMLP(hidden)
    load_numpy(module, weights)
    return module


def load_numpy(module: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Copy named numpy arrays into ``module`` (the caller's arrays are never aliased)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ValueError(
            f"weights do not match the module's state_dict: missing {missing}, unexpected {extra}"
        )
    state = {}
    for name, ref in expected.items():
        arr = np.asarray(weights[name])
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(
                f"tensor {name!r}: shape {tuple(arr.shape)}, the module needs {tuple(ref.shape)}"
            )
        # a writable float32 copy: received arrays may be read-only views of the download
        state[name] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
    module.load_state_dict(state)


def evaluate_arrays(
    weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``weights`` on (x, y), computed in float32."""
    module = module_for(weights)
    return _evaluate_module(module, _as_inputs(x), _as_labels(y))


def _evaluate_module(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    module.eval()
    with torch.no_grad():
        logits = module(x)
        loss = float(F.cross_entropy(logits, y))
        acc = float((logits.argmax(dim=1) == y).float().mean())
    return {"accuracy": acc, "loss": loss}


def _as_inputs(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32, copy=True))


def _as_labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(y, dtype=np.int64, copy=True))


def _setting(config: Mapping[str, Any], name: str, default: float, *, integer: bool) -> float:
    raw = config.get(name, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"train setting {name!r} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0 or (integer and value != int(value)):
        kind = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"train setting {name!r} must be {kind}, got {raw!r}")
    return value


class TorchDigitsTrainer:
    """Trains the DigitsMLP on this device's local samples, one SGD pass per epoch.

    Settings come from the round's ``task.config``: ``lr`` (default 0.1), ``batch_size``
    (32) and ``epochs`` (1). The returned weights have the incoming names, shapes and dtypes,
    and ``num_examples`` is the local sample count (the aggregation weight).
    """

    def __init__(
        self,
        X: np.ndarray | None = None,
        y: np.ndarray | None = None,
        data_path: str | Path | None = None,
        threads: int | None = None,
    ) -> None:
        X, y = load_local_data(X, y, data_path, who="TorchDigitsTrainer")
        if np.ndim(X) != 2 or np.shape(X)[1] != N_FEATURES:
            raise ValueError(f"local X has shape {np.shape(X)}; the digits task needs [n, 64]")
        if threads is not None:
            torch.set_num_threads(int(threads))  # process-wide: one trainer per device process
        self.X = _as_inputs(X)
        self.y = _as_labels(y)

    def train(self, weights: Weights, task: TrainTask) -> TrainResult:
        """Load the global model, run the epochs in the protocol's order, return the new model."""
        cfg = task.config
        lr = _setting(cfg, "lr", 0.1, integer=False)
        batch_size = int(_setting(cfg, "batch_size", 32, integer=True))
        epochs = int(_setting(cfg, "epochs", 1, integer=True))
        module = module_for(weights)
        opt = torch.optim.SGD(module.parameters(), lr=lr)
        n = len(self.y)
        module.train()
        for batch in minibatches(
            n, seed=task.seed, round_=task.round, batch_size=batch_size, epochs=epochs
        ):
            idx = torch.from_numpy(batch)
            opt.zero_grad()
            loss = F.cross_entropy(module(self.X[idx]), self.y[idx])
            torch.autograd.backward(loss)
            opt.step()
        new = state_to_numpy(module)
        out = {k: new[k].astype(np.asarray(weights[k]).dtype, copy=False) for k in weights}
        metrics = _evaluate_module(module, self.X, self.y)
        return TrainResult(out, n, {f"train_{k}": v for k, v in metrics.items()})

    def evaluate(self, weights: Weights) -> dict[str, float]:
        """Accuracy and loss of ``weights`` on this trainer's data (local data, or a test split)."""
        return _evaluate_module(module_for(weights), self.X, self.y)
