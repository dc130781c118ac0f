"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data").

    w_{t+1} = sum_k (n_k / n) w_k

where ``w_k`` is device k's locally trained model and ``n_k`` its example count. No
parameters. Splittable: combiners send ``sum n_k w_k`` and ``sum n_k``.
"""

from __future__ import annotations

import numpy as np

from edgefl.aggregation.base import StrictParams
from edgefl.protocol.types import Weights


class FedAvg:
    """The next global model is the example-weighted mean; stateless, so restarts need
    nothing stored."""

    name = "fedavg"
    splittable = True

    class Params(StrictParams):
        """FedAvg takes no parameters."""

    def step(self, global_weights: Weights, mean: Weights) -> Weights:
        return {k: np.asarray(mean[k], dtype=global_weights[k].dtype) for k in global_weights}

    def state_dict(self) -> Weights:
        return {}

    def load_state_dict(self, state: Weights) -> None:
        if state:
            raise ValueError("FedAvg keeps no state")
