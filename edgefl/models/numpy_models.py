"""Reference models in pure numpy: softmax regression and a one-hidden-layer MLP.

They are shared by the device trainer and by server-side evaluation, so both sides compute
exactly the same function. float64 throughout: the canonical digits task is bit-reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from edgefl.protocol.types import Weights

MODELS = ("softmax", "mlp")


def init_weights(model: str, n_in: int, n_out: int, hidden: int = 32, seed: int = 0) -> Weights:
    if model == "softmax":
        return {"W": np.zeros((n_in, n_out)), "b": np.zeros(n_out)}
    if model == "mlp":
        rng = np.random.default_rng(seed)
        return {
            "W1": rng.normal(0.0, np.sqrt(2.0 / n_in), (n_in, hidden)),
            "b1": np.zeros(hidden),
            "W2": rng.normal(0.0, np.sqrt(1.0 / hidden), (hidden, n_out)),
            "b2": np.zeros(n_out),
        }
    raise ValueError(f"unknown model {model!r}; choose one of {MODELS}")


def model_kind(weights: Weights) -> str:
    if set(weights) == {"W", "b"}:
        return "softmax"
    if set(weights) == {"W1", "b1", "W2", "b2"}:
        return "mlp"
    raise ValueError(f"weights {sorted(weights)} match no numpy reference model")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def logits(weights: Weights, X: np.ndarray) -> np.ndarray:
    if "W" in weights:
        return np.asarray(X @ weights["W"] + weights["b"])
    h = np.maximum(X @ weights["W1"] + weights["b1"], 0.0)
    return np.asarray(h @ weights["W2"] + weights["b2"])


def evaluate(weights: Weights, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    z = logits(weights, X)
    p = _softmax(z)
    loss = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))
    acc = float(np.mean(np.argmax(z, axis=1) == y))
    return {"accuracy": acc, "loss": loss}


def minibatches(
    n: int, *, seed: int, round_: int, batch_size: int = 32, epochs: int = 1
) -> Iterator[np.ndarray]:
    """Sample indices of each minibatch, in the order every edgefl trainer uses.

    One generator seeded with ``(seed, round)`` draws a fresh permutation per epoch; batches
    are consecutive slices of it (the last may be partial). A retried or resumed round
    therefore retrains bit-identically, whatever the runtime.
    """
    rng = np.random.default_rng([seed, round_])
    for _ in range(epochs):
        perm = rng.permutation(n)
        for s in range(0, n, batch_size):
            yield perm[s : s + batch_size]


def train_epochs(
    weights: Weights,
    X: np.ndarray,
    y: np.ndarray,
    *,
    round_: int,
    seed: int,
    lr: float = 0.1,
    batch_size: int = 32,
    epochs: int = 1,
    mu: float = 0.0,
) -> Weights:
    """Minibatch SGD as fixed by the digits protocol (shuffle with default_rng([seed, round])).

    ``mu > 0`` adds FedProx's proximal term (Li et al. 2020): each step's gradient gets
    ``mu * (w - w_global)``, pulling the local model towards the ``weights`` it started from.
    """
    if not (np.isfinite(mu) and mu >= 0):
        raise ValueError(f"the proximal term mu must be finite and >= 0, got {mu}")
    w = {k: np.array(v, dtype=np.float64, copy=True) for k, v in weights.items()}
    anchor = {k: v.copy() for k, v in w.items()} if mu > 0 else {}
    batches = minibatches(len(y), seed=seed, round_=round_, batch_size=batch_size, epochs=epochs)
    for idx in batches:
        Xb, yb = X[idx], y[idx]
        B = len(idx)
        grads: Weights = {}
        if "W" in w:
            P = _softmax(Xb @ w["W"] + w["b"])
            P[np.arange(B), yb] -= 1
            P /= B
            grads["W"] = Xb.T @ P
            grads["b"] = P.sum(0)
        else:
            pre = Xb @ w["W1"] + w["b1"]
            h = np.maximum(pre, 0.0)
            P = _softmax(h @ w["W2"] + w["b2"])
            P[np.arange(B), yb] -= 1
            P /= B
            dh = (P @ w["W2"].T) * (pre > 0)
            grads = {"W2": h.T @ P, "b2": P.sum(0), "W1": Xb.T @ dh, "b1": dh.sum(0)}
        for k, g in grads.items():
            if mu > 0:
                g = g + mu * (w[k] - anchor[k])
            w[k] -= lr * g
    return w
