"""Central differential privacy for a session: clip at the combiner, noise at the controller.

The mechanism is DP-FedAvg's (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models"), with user-level privacy: one device is one user.

- Each update's delta is scaled to L2 norm <= ``clip_norm`` (C) at the combiner, before it is
  folded (``edgefl.aggregation.compressed.fold_delta``), and weighs 1, not its example count.
  Adding or removing one device then moves the sum of deltas by at most C, so the mean over
  ``n`` updates by at most C / n (n, the participant count, is released in the round record
  anyway and is treated as public).
- The controller adds Gaussian noise of std ``sigma = z * C / n`` to every coordinate of that
  mean (``z``: the noise multiplier). That is the Gaussian mechanism with sensitivity C / n.
- The accountant is Renyi DP (Mironov 2017, "Renyi Differential Privacy"): one release has
  RDP ``alpha / (2 z^2)`` at every order alpha > 1; T rounds compose additively to
  ``T * alpha / (2 z^2)``. Conversion to (epsilon, delta) uses the bound of Balle et al. 2020
  ("Hypothesis Testing Interpretations and Renyi DP", Thm 21; also Canonne, Kamath and
  Steinke 2020), as TensorFlow Privacy and Opacus do:
  ``eps = rdp + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1)``,
  minimised over a grid of orders.

Limits, stated: every selected device takes part each round (sampling rate q = 1). With
``max_devices`` the controller samples a fixed-size subset, for which the Poisson
subsampling amplification does not apply as such, so no amplification is claimed: the
epsilon reported is an upper bound for q = 1. The noise is drawn from the OS entropy source
at each round, never from the session seed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefl.protocol.types import Weights

__all__ = [
    "DPConfig",
    "add_noise",
    "calibrate_noise",
    "epsilon",
    "noise_multiplier",
    "privacy_record",
]

# Orders alpha > 1: fine near 1 (large epsilon), geometric above (small epsilon).
_ORDERS = np.concatenate([1 + np.linspace(0.01, 10, 1000), np.geomspace(11, 1e7, 3000)])


class DPConfig(BaseModel):
    """A session's differential privacy: clip norm, and either z or a target epsilon.

    ``delta`` defaults to 1e-5, below 1/N for fleets of up to 100,000 devices, as is usual.
    """

    model_config = ConfigDict(extra="forbid")

    clip_norm: float = Field(gt=0, description="L2 bound on each update's delta")
    noise_multiplier: float | None = Field(None, gt=0, description="z: noise std / clip_norm")
    target_epsilon: float | None = Field(
        None, gt=0, description="calibrate z so that the whole session spends this epsilon"
    )
    delta: float = Field(1e-5, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_of(self) -> DPConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("dp needs exactly one of noise_multiplier and target_epsilon")
        return self


def epsilon(z: float, rounds: int, delta: float) -> float:
    """The (epsilon, delta)-DP epsilon after ``rounds`` Gaussian releases of multiplier z."""
    if rounds <= 0:
        return 0.0
    a = _ORDERS
    rdp = rounds * a / (2.0 * z * z)
    eps = rdp + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)
    return max(0.0, float(np.min(eps)))


def calibrate_noise(target_epsilon: float, delta: float, rounds: int) -> float:
    """The smallest z (to 1e-6 relative) whose ``rounds`` releases spend <= target_epsilon."""
    lo, hi = 1e-3, 1.0
    while epsilon(hi, rounds, delta) > target_epsilon:
        hi *= 2
        if hi > 1e6:
            raise ValueError(f"epsilon {target_epsilon} is out of reach in {rounds} rounds")
    while hi - lo > 1e-6 * hi:
        mid = (lo + hi) / 2
        if epsilon(mid, rounds, delta) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def noise_multiplier(dp: DPConfig, rounds: int) -> float:
    """The session's z: as configured, or calibrated to its target over ``rounds``."""
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    assert dp.target_epsilon is not None  # the validator guarantees one of them
    return calibrate_noise(dp.target_epsilon, dp.delta, rounds)


def add_noise(mean: Weights, std: float, rng: np.random.Generator | None = None) -> Weights:
    """``mean`` plus N(0, std^2) on every coordinate, in each tensor's dtype."""
    gen = rng if rng is not None else np.random.default_rng()
    return {
        k: (np.asarray(v, dtype=np.float64) + gen.normal(0.0, std, np.shape(v))).astype(
            np.asarray(v).dtype
        )
        for k, v in mean.items()
    }


def privacy_record(dp: DPConfig, z: float, rounds_done: int, updates: int) -> dict[str, Any]:
    """What a model version records: the parameters and the epsilon spent so far."""
    return {
        "clip_norm": dp.clip_norm,
        "noise_multiplier": z,
        "noise_std": z * dp.clip_norm / updates,
        "delta": dp.delta,
        "target_epsilon": dp.target_epsilon,
        "rounds": rounds_done,
        "epsilon": epsilon(z, rounds_done, dp.delta),
        "accountant": "rdp-gaussian, q=1 (Mironov 2017; Balle et al. 2020 conversion)",
    }
