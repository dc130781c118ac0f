"""The controller's side of a round's optional steps: DP noise, and the bytes it moved.

Kept out of ``rounds.py`` so the round loop only calls hooks: ``noised`` (the Gaussian
mechanism on the merged mean, when the session has DP), ``metrics`` (the privacy figures
for the round record) and ``traffic`` (bytes up and down, for the record and telemetry).
"""

from __future__ import annotations

from typing import Any

from edgefl.aggregation.privacy import add_noise, noise_multiplier, privacy_record
from edgefl.controller.config import SessionConfig
from edgefl.controller.records import RoundAttempt
from edgefl.protocol.types import Weights
from edgefl.store.base import Store

__all__ = ["metrics", "noised", "traffic"]


def noised(
    config: SessionConfig, mean: Weights, updates: int, attempt: RoundAttempt
) -> tuple[Weights, dict[str, Any] | None]:
    """The mean to hand the server optimizer, and the privacy record (None without DP).

    Noise of std ``z * clip_norm / updates`` (the mean's sensitivity with clipped,
    uniformly weighted deltas); the record's epsilon counts this round's release too.
    Rounds are numbered from 1 and each number completes once, so ``attempt.round`` is the
    number of noisy releases so far.
    """
    if config.dp is None:
        return mean, None
    z = noise_multiplier(config.dp, config.rounds)
    record = privacy_record(config.dp, z, attempt.round, updates)
    return add_noise(mean, record["noise_std"]), record


def metrics(record: dict[str, Any] | None) -> dict[str, float]:
    """The round metrics of a privacy record: the running epsilon and the noise std."""
    if record is None:
        return {}
    return {
        "dp_epsilon": float(record["epsilon"]),
        "dp_noise_std": float(record["noise_std"]),
        "dp_noise_multiplier": float(record["noise_multiplier"]),
    }


def traffic(
    store: Store, attempt: RoundAttempt, bytes_up: int, tensor_bytes_up: int, selected: int
) -> dict[str, float]:
    """``bytes_up``: the update payloads the combiners folded (as the partials report), and
    ``tensor_bytes_up`` the tensor data in them (without the message's other fields);
    ``bytes_down``: the round's model payload times the devices selected (each downloads it
    once unless it already holds it, so an upper bound)."""
    out = {"bytes_up": float(bytes_up), "tensor_bytes_up": float(tensor_bytes_up)}
    model = store.get_model(attempt.model_in)
    if model is not None:
        out["bytes_down"] = float(model.size * selected)
    return out
