"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks").

Each device minimises its local loss plus a proximal term that keeps it near the global
model it started from:

    min_w  F_k(w) + (mu / 2) * ||w - w_t||^2,   so its gradient is  grad F_k(w) + mu (w - w_t)

The server side is FedAvg's weighted mean (splittable, exact over any number of combiners).
``mu`` reaches the devices in the task's ``train`` settings (``task_settings``). The numpy
trainer applies it; trainers that cannot (the ONNX and LiteRT package trainers) decline the
task with a reason instead of silently training plain FedAvg. Default ``mu = 0.01`` (the
paper tunes mu in {0.001, 0.01, 0.1, 1}; 0.01 is a mild pull that suits the digits task).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from edgefl.aggregation.base import StrictParams
from edgefl.aggregation.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg on the server plus a proximal term ``mu`` applied by the devices."""

    name = "fedprox"

    class Params(StrictParams):
        mu: float = Field(0.01, gt=0, le=1e3, description="proximal term, applied by devices")

    def __init__(self, mu: float = 0.01) -> None:
        self.mu = mu

    def task_settings(self) -> dict[str, Any]:
        """Sent to every device in the task's ``train`` settings."""
        return {"mu": self.mu}
