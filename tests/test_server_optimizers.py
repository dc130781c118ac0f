"""Server optimizers on the canonical digits task (non-IID Dirichlet 0.5, 10 devices, 20
rounds, as in the demo): FedAdam and FedAvgM with their documented default server learning
rates reach at least FedAvg's accuracy, over a real broker and two regions."""

from __future__ import annotations

import pytest

from edgefl.aggregation import make_aggregator
from edgefl.tasks import digits
from tests.harness import Deployment, completed_accuracies


@pytest.mark.parametrize("aggregator", ["fedadam", "fedavgm"])
def test_server_optimizer_reaches_fedavg_accuracy(mosquitto, tmp_path, aggregator: str) -> None:
    dep = Deployment(mosquitto.url, tmp_path)
    try:
        dep.start_combiners(2)
        dep.start_fleet(10)
        ctl = dep.controller()
        _, rounds = dep.run_session(
            ctl, rounds=20, min_devices=10, round_timeout_s=30, aggregator=aggregator
        )
        accs = completed_accuracies(rounds)
        fedavg = digits.reference_run(10, 20)  # what a FedAvg session reproduces exactly
        assert len(accs) == 20
        print(f"{aggregator}: {accs[-1]:.4f}, FedAvg {fedavg[-1]:.4f}")
        assert accs[-1] >= fedavg[-1]
        # the defaults the docs name are the ones used
        defaults = make_aggregator(aggregator)
        lr = defaults.lr if aggregator == "fedadam" else defaults.server_lr  # type: ignore[attr-defined]
        assert lr == (0.1 if aggregator == "fedadam" else 1.0)
        # the server optimizer's state was stored with the versions (restart safety)
        assert ctl.models.load_optimizer_state(rounds[-1].model_out)
    finally:
        dep.close()
