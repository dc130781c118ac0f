"""The FedOpt family (Reddi et al. 2021, "Adaptive Federated Optimization").

The pseudo-gradient is ``delta = mean - global``; the server keeps first and second moments
and applies ``global + lr * m / (sqrt(v) + tau)``. The variants differ only in how ``v`` moves.
"""

from __future__ import annotations

import numpy as np

from edgefl.protocol.types import Weights


class _FedOpt:
    name = "fedopt"

    def __init__(
        self, lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        if lr <= 0 or tau <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1:
            raise ValueError("need lr > 0, tau > 0 and 0 <= beta1, beta2 < 1")
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: Weights = {}
        self.v: Weights = {}

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(self, global_weights: Weights, mean: Weights) -> Weights:
        out = {}
        for k, g in global_weights.items():
            delta = np.asarray(mean[k], dtype=np.float64) - g
            m = self.m.get(k, np.zeros_like(delta))
            v = self.v.get(k, np.full_like(delta, self.tau**2))
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self._second_moment(v, delta * delta)
            self.m[k], self.v[k] = m, v
            out[k] = (g + self.lr * m / (np.sqrt(v) + self.tau)).astype(g.dtype)
        return out

    def state_dict(self) -> Weights:
        state = {f"m/{k}": v for k, v in self.m.items()}
        state.update({f"v/{k}": v for k, v in self.v.items()})
        return state

    def load_state_dict(self, state: Weights) -> None:
        self.m = {k[2:]: np.array(v) for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: np.array(v) for k, v in state.items() if k.startswith("v/")}


class FedAdam(_FedOpt):
    """Adam: v moves to d^2 exponentially (beta2)."""

    name = "fedadam"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * d2


class FedYogi(_FedOpt):
    """Yogi: v moves towards d^2 by a sign step, so it grows slowly (Zaheer et al. 2018)."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        out: np.ndarray = v - (1 - self.beta2) * d2 * np.sign(v - d2)
        return out


class FedAdaGrad(_FedOpt):
    """AdaGrad: v accumulates d^2, so the step size only shrinks."""

    name = "fedadagrad"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        out: np.ndarray = v + d2
        return out
