"""FedAvgM: FedAvg with server momentum (Hsu, Qi and Brown 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification").

With ``Delta_t = w_t - mean_t`` (the global model minus the devices' weighted mean, i.e. the
negated FedAvg step):

    v_t     = beta * v_{t-1} + Delta_t,      v_0 = 0
    w_{t+1} = w_t - server_lr * v_t

``server_lr = 1, beta = 0`` is FedAvg. Defaults: ``server_lr = 1.0``, ``beta = 0.9``, the
paper's setting for non-identical data (the effective step is ``server_lr / (1 - beta)``
once momentum builds up). Splittable: it needs only the merged mean; ``v`` is stored with
each model version, so a restarted controller resumes with it.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from edgefl.aggregation.base import StrictParams
from edgefl.protocol.types import Weights


class FedAvgM:
    """Server momentum on the FedAvg step; not thread-safe (the controller calls it once a
    round)."""

    name = "fedavgm"
    splittable = True

    class Params(StrictParams):
        server_lr: float = Field(1.0, gt=0, description="server learning rate")
        beta: float = Field(0.9, ge=0, lt=1, description="server momentum")

    def __init__(self, server_lr: float = 1.0, beta: float = 0.9) -> None:
        self.server_lr, self.beta = server_lr, beta
        self.v: Weights = {}

    def step(self, global_weights: Weights, mean: Weights) -> Weights:
        out = {}
        for k, g in global_weights.items():
            delta = g - np.asarray(mean[k], dtype=np.float64)
            v = self.beta * self.v[k] + delta if k in self.v else delta
            self.v[k] = v
            out[k] = (g - self.server_lr * v).astype(g.dtype)
        return out

    def state_dict(self) -> Weights:
        return {f"v/{k}": v for k, v in self.v.items()}

    def load_state_dict(self, state: Weights) -> None:
        self.v = {k[2:]: np.array(v) for k, v in state.items() if k.startswith("v/")}
