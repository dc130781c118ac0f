"""FedAvg (McMahan et al. 2017): the next global model is the example-weighted mean."""

from __future__ import annotations

import numpy as np

from edgefl.protocol.types import Weights


class FedAvg:
    """The next global model is the mean itself; stateless, so restarts need nothing stored."""

    name = "fedavg"

    def step(self, global_weights: Weights, mean: Weights) -> Weights:
        return {k: np.asarray(mean[k], dtype=global_weights[k].dtype) for k in global_weights}

    def state_dict(self) -> Weights:
        return {}

    def load_state_dict(self, state: Weights) -> None:
        if state:
            raise ValueError("FedAvg keeps no state")
