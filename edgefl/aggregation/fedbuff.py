"""FedBuff: buffered asynchronous aggregation (Nguyen et al. 2022, "Federated Learning with
Buffered Asynchronous Aggregation", AISTATS).

Devices train whenever they are idle, each on the model version current when it got its
task. The server keeps a buffer; once ``K`` updates are in, it applies them and starts the
next version. An update trained on version ``t - tau`` (``tau`` versions old) counts with the
staleness weight ``s(tau) = (1 + tau) ** -a`` (the paper's polynomial; ``a = 0.5`` in its
experiments). With example counts ``n_i`` as FedAvg's weights, the buffer's step is

    Delta_bar = sum_i s(tau_i) * n_i * delta_i / sum_i n_i,      delta_i = y_i - x_{t - tau_i}
    x_{t+1}   = server optimizer step on the mean x_t + Delta_bar

which is the paper's ``Delta_bar = (1/K) sum_i s(tau_i) delta_i`` when every ``n_i`` is equal.
The denominator is ``sum n_i``, not ``sum s(tau_i) n_i``: stale updates shrink the step, as in
the paper (normalising by the staleness weights would give a buffer of stale updates a full
step, which the paper's convergence bound does not cover). With FedAvg the server step is
``x_t + Delta_bar`` (``eta_g = 1``); FedAvgM's ``server_lr`` is the paper's ``eta_g`` and its
momentum applies as in synchronous rounds.

Splittable: a combiner folds ``s(tau) * n * delta`` into its sums and ``n`` into its weight,
so the controller's merge stays exact over any number of regions. Updates older than
``max_staleness`` versions are refused, never applied.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AsyncSettings", "parse_async_plan", "staleness_weight"]


class AsyncSettings(BaseModel):
    """The settings of an asynchronous (FedBuff) session; see the module docstring."""

    model_config = ConfigDict(extra="forbid")

    buffer: int = Field(
        10, ge=1, description="K: updates that make a model version (the round closes at K)"
    )
    max_staleness: int = Field(
        4, ge=0, le=64, description="S: updates trained more than S versions ago are refused"
    )
    staleness_exponent: float = Field(
        0.5, ge=0, le=8, description="a in s(tau) = (1 + tau) ** -a (0: no discount)"
    )
    concurrency: int | None = Field(
        None, ge=1, description="devices training at once (None: every idle online device)"
    )

    def plan(self) -> dict[str, Any]:
        """The ``async`` field of a round plan: what a combiner needs to weigh an update."""
        return {"max_staleness": self.max_staleness, "exponent": self.staleness_exponent}


def staleness_weight(tau: int, exponent: float) -> float:
    """``s(tau) = (1 + tau) ** -exponent``: 1 for a fresh update, decreasing with age."""
    if tau < 0:
        raise ValueError(f"staleness {tau} < 0: an update from a future version")
    return float((1.0 + tau) ** -exponent)


def parse_async_plan(value: Any) -> tuple[int, float]:
    """``(max_staleness, exponent)`` from a plan's ``async`` field; ValueError if malformed."""
    if not isinstance(value, dict):
        raise ValueError("async must be a map")
    s, a = value.get("max_staleness"), value.get("exponent")
    if not isinstance(s, int) or isinstance(s, bool) or s < 0:
        raise ValueError(f"async.max_staleness must be an integer >= 0, got {s!r}")
    if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0 <= a <= 8:
        raise ValueError(f"async.exponent must be a number in [0, 8], got {a!r}")
    return s, float(a)
