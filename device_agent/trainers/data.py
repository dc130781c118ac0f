"""The one rule every trainer applies to a device's local data set.

A device may hold no examples at all (a Dirichlet partition leaves some devices empty; a real
sensor may not have collected any yet). That is not a fault: such a device starts, stays
online and declines each round with ``NO_LOCAL_DATA``. Data that cannot be right (a different
number of samples and labels) is still refused when the trainer is built.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NO_LOCAL_DATA = "no local data"


class NoLocalData(ValueError):
    """This device has no examples to train on: it declines the round; nothing is broken."""

    def __init__(self, who: str = "") -> None:
        super().__init__(f"{NO_LOCAL_DATA} ({who} has 0 examples)" if who else NO_LOCAL_DATA)


def check_local_data(
    X: np.ndarray, y: np.ndarray, *, allow_empty: bool, who: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` as arrays with as many samples as labels.

    ``allow_empty`` says whether zero examples is acceptable here: yes for a trainer that lives
    as long as the agent (it declines each round instead), no for one built to train a round
    (the ONNX and LiteRT trainers), which raises ``NoLocalData``.
    """
    X, y = np.asarray(X), np.asarray(y)
    n = len(X) if X.ndim else 0
    if X.ndim == 0 or y.ndim == 0 or n != len(y):
        raise ValueError(f"local data has {n} samples but labels of shape {y.shape}")
    if n == 0 and not allow_empty:
        raise NoLocalData(who)
    return X, y


def load_local_data(
    X: np.ndarray | None,
    y: np.ndarray | None,
    data_path: str | Path | None,
    *,
    who: str = "trainer",
) -> tuple[np.ndarray, np.ndarray]:
    """The device's data set (arrays, or an .npz with ``X`` and ``y``) as float64 and int64.

    Zero examples is allowed (see the module docstring); a missing data set is not.
    """
    if data_path is not None:
        with np.load(data_path) as data:
            if "X" not in data or "y" not in data:
                raise ValueError(f"{data_path}: the .npz needs arrays 'X' and 'y'")
            X, y = data["X"], data["y"]
    if X is None or y is None:
        raise ValueError(f"{who} needs local data: X and y, or data_path to an .npz")
    X, y = check_local_data(X, y, allow_empty=True, who=who)
    return np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)
