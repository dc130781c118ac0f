"""Devices with no local data: they start, stay online and decline; the round goes on.

The canonical Dirichlet partition leaves devices empty once the fleet is large (231 of 1,000).
Before, such a device could not even be constructed (``ValueError: local data has 0 samples
but 0 labels``), which crashed a 300-device simulation. Now it declines each task with "no
local data" before fetching the model, the combiner counts it as reported (the round does not
wait for its deadline) and records the decline, and FedAvg over the devices that trained is
exactly the single-process reference over those devices.
"""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.trainers.base import TrainTask
from device_agent.trainers.data import NO_LOCAL_DATA, NoLocalData, check_local_data
from device_agent.trainers.numpy_trainer import NumpyTrainer
from device_agent.trainers.package_trainer import PackageTrainer
from edgefl.tasks import digits
from tests.harness import Deployment, completed_accuracies

PARTITION = 1000  # the canonical partition of a 1,000-device fleet...
FLEET = 40  # ...of which this test runs devices 0..39: 11 of them hold no example
ROUNDS = 4


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, digits.N_FEATURES)), np.zeros((0,), dtype=np.int64)


def test_a_trainer_without_data_starts_and_refuses_only_to_train() -> None:
    trainer = NumpyTrainer(*_empty())
    assert trainer.local_examples == 0
    with pytest.raises(NoLocalData, match=NO_LOCAL_DATA):
        trainer.train(digits.initial_weights(), TrainTask(round=1, config={}, seed=0))
    package_trainer = PackageTrainer(*_empty())
    assert package_trainer.local_examples == 0
    with pytest.raises(NoLocalData):
        package_trainer.load_package(object())  # refused before the package is even looked at


def test_data_that_cannot_be_right_is_still_refused() -> None:
    X, y = digits.device_data(20, 0)
    with pytest.raises(ValueError, match=f"local data has {len(y)} samples but labels"):
        NumpyTrainer(X, y[:-1])
    with pytest.raises(ValueError, match="needs local data"):
        NumpyTrainer()
    # the check the ONNX and LiteRT trainers share: zero examples is refused where asked
    with pytest.raises(NoLocalData):
        check_local_data(*_empty(), allow_empty=False, who="OnnxTrainer")
    assert check_local_data(*_empty(), allow_empty=True)[0].shape == (0, digits.N_FEATURES)


def test_partition_reports_its_empty_devices() -> None:
    sizes = [len(digits.device_data(PARTITION, k)[1]) for k in range(PARTITION)]
    assert sum(sizes) == len(digits.load().ytr)  # nothing lost, nothing duplicated
    assert sizes.count(0) == PARTITION - digits.devices_with_data(PARTITION) == 231
    assert digits.devices_with_data(300) == 295


@pytest.mark.slow
def test_session_with_empty_devices_completes_and_matches_the_reference(
    broker_url: str, tmp_path
) -> None:
    empty = {f"dev-{k:04d}" for k in range(FLEET) if len(digits.device_data(PARTITION, k)[1]) == 0}
    assert len(empty) == 11
    dep = Deployment(broker_url, tmp_path)
    try:
        dep.start_combiners(2)
        fleet = dep.start_fleet(FLEET, partition_size=PARTITION)
        ctl = dep.controller()
        timeout = 30.0
        _, rounds = dep.run_session(
            ctl, rounds=ROUNDS, min_devices=FLEET - len(empty), round_timeout_s=timeout
        )
        assert [r.status for r in rounds] == ["completed"] * ROUNDS
        for rec in rounds:
            declined = {r["device"]: r["reason"] for r in rec.rejected}
            assert declined == dict.fromkeys(empty, f"device declined: {NO_LOCAL_DATA}")
            assert {p["device"] for p in rec.participants} == set(rec.devices) - empty
            assert len(rec.devices) == FLEET
            # the declines count as answers: the round closed without waiting out its deadline
            assert (rec.finished or 0) - rec.started < timeout / 3
        reference = digits.reference_run(PARTITION, ROUNDS, devices=range(FLEET))
        assert completed_accuracies(rounds) == pytest.approx(reference, abs=1e-9)
        # the empty devices are alive and never fetched a model they could not use
        agents = {a.config.device_id: a for a in fleet.agents}
        assert all(a.conn.connected.is_set() for a in fleet.agents)
        assert all(agents[d].bytes_received == 0 and agents[d].completed == 0 for d in empty)
        assert all(agents[d].completed == ROUNDS for d in set(agents) - empty)
    finally:
        dep.close()
