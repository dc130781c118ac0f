"""The canonical digits task (docs/digits.md): data, split, partition, reference loop.

Every step follows the protocol exactly, so a federated run of plain FedAvg must reproduce the
single-process reference to within one test sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edgefl.models.numpy_models import evaluate, init_weights, train_epochs

N_FEATURES = 64
N_CLASSES = 10


@dataclass(frozen=True)
class DigitsData:
    """The standardised train and test splits of the canonical task."""

    Xtr: np.ndarray
    ytr: np.ndarray
    Xte: np.ndarray
    yte: np.ndarray


@lru_cache(maxsize=1)
def load() -> DigitsData:
    from sklearn.datasets import load_digits  # server/dev extra; ships the data, no download

    X, y = load_digits(return_X_y=True)
    perm = np.random.RandomState(0).permutation(len(y))
    test, train = perm[:360], perm[360:]
    Xtr, Xte = X[train].astype(np.float64), X[test].astype(np.float64)
    mu = Xtr.mean(0)
    sd = Xtr.std(0)
    sd[sd == 0] = 1
    return DigitsData(
        (Xtr - mu) / sd, y[train].astype(np.int64), (Xte - mu) / sd, y[test].astype(np.int64)
    )


def partition(
    ytr: np.ndarray, n_devices: int, alpha: float = 0.5, seed: int = 42
) -> list[np.ndarray]:
    """Dirichlet label partition, step 4 of the protocol (one generator for everything)."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(n_devices)]
    for c in range(N_CLASSES):
        idx_c = np.flatnonzero(ytr == c)
        rng.shuffle(idx_c)
        p = rng.dirichlet(np.full(n_devices, alpha))
        cuts = (np.cumsum(p) * len(idx_c)).astype(np.int64)[:-1]
        for k, chunk in enumerate(np.split(idx_c, cuts)):
            parts[k].extend(chunk.tolist())
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


@lru_cache(maxsize=4)
def _partition_of(n_devices: int) -> tuple[np.ndarray, ...]:
    """The canonical partition for ``n_devices``, computed once: a fleet of N devices asks
    N times, and recomputing it each time made starting 10,000 devices take minutes."""
    return tuple(partition(load().ytr, n_devices))


def device_data(n_devices: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Device k's share of the training split; empty for some devices when N is large (about
    5 of 300 and 231 of 1,000 devices get no example: such a device declines every round)."""
    d = load()
    idx = _partition_of(n_devices)[k]
    return d.Xtr[idx], d.ytr[idx]


def devices_with_data(n_devices: int) -> int:
    """How many of the partition's ``n_devices`` devices hold at least one example: the most
    updates a round can get (the others decline), so the quorum to ask for."""
    return sum(1 for p in _partition_of(n_devices) if len(p))


def initial_weights(model: str = "softmax", seed: int = 0) -> dict[str, np.ndarray]:
    return init_weights(model, N_FEATURES, N_CLASSES, seed=seed)


def evaluator(weights: dict[str, np.ndarray]) -> dict[str, float]:
    """Server-side evaluation on the 360-sample held-out split."""
    d = load()
    return evaluate(weights, d.Xte, d.yte)


def reference_run(
    n_devices: int,
    rounds: int,
    model: str = "softmax",
    lr: float = 0.1,
    batch_size: int = 32,
    devices: Sequence[int] | None = None,
) -> list[float]:
    """Single-process FedAvg: the ground truth a federated run must reproduce.

    ``devices`` (default: all) are the indices of the partition's devices that take part.
    Devices with no data train nothing (they decline in a federated run) and are left out.
    """
    d = load()
    parts = partition(d.ytr, n_devices)
    chosen = range(n_devices) if devices is None else devices
    taking_part = [(k, parts[k]) for k in chosen if len(parts[k])]
    w = initial_weights(model)
    accs = []
    for r in range(1, rounds + 1):
        sizes = np.array([len(p) for _, p in taking_part], dtype=np.float64)
        new = [
            train_epochs(w, d.Xtr[p], d.ytr[p], round_=r, seed=k, lr=lr, batch_size=batch_size)
            for k, p in taking_part
        ]
        total = sizes.sum()
        w = {name: sum(s * u[name] for s, u in zip(sizes, new, strict=True)) / total for name in w}
        accs.append(evaluator(w)["accuracy"])
    return accs
