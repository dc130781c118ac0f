"""The whole tiered loop over real brokers: devices, regional combiners and the controller.

The digits task is bit-reproducible, so plain FedAvg across any number of regions must give
the same per-round accuracies as the single-process reference loop. That equality fails if any
update is lost, duplicated, mis-weighted or mixed up across rounds or regions.
"""

from __future__ import annotations

import json

import pytest

from edgefl.tasks import digits
from edgefl.telemetry import JsonLinesSink
from tests.harness import Deployment, completed_accuracies


@pytest.mark.slow
def test_two_regions_reproduce_reference_20_devices(mosquitto, tmp_path) -> None:
    """On Mosquitto; the same 20-device, 2-region session on the embedded broker is the
    demo's, which tests/test_demo_cli.py checks against the reference too."""
    deployment = Deployment(mosquitto.url, tmp_path)
    try:
        _two_regions(deployment)
    finally:
        deployment.close()


def _two_regions(deployment: Deployment) -> None:
    deployment.start_combiners(2)
    deployment.start_fleet(20)
    sink = JsonLinesSink(deployment.workdir / "telemetry.jsonl")
    ctl = deployment.controller(sink=sink)
    sid, rounds = deployment.run_session(ctl, rounds=20, min_devices=20, round_timeout_s=30)
    accs = completed_accuracies(rounds)
    assert len(accs) == 20
    reference = digits.reference_run(20, 20)
    assert abs(accs[-1] - 0.925) <= 0.003
    assert accs == pytest.approx(reference, abs=1e-9)
    # every round took every device exactly once, split over both regions
    for rec in rounds:
        devices = [p["device"] for p in rec.participants]
        assert sorted(devices) == sorted(set(devices)) and len(devices) == 20
        assert {p["region"] for p in rec.participants} == {"region-0", "region-1"}
    # telemetry: one point per round, and device points forwarded from the devices
    sink.close()
    points = [json.loads(line) for line in sink.path.read_text().splitlines()]
    round_points = [p for p in points if p["m"] == "round"]
    assert [p["fields"]["accuracy"] for p in round_points] == pytest.approx(accs)
    assert {p["tags"]["device"] for p in points if p["m"] == "device"} >= {"dev-0000", "dev-0019"}
    # lineage: each model version points at the previous one
    models = {m.version: m for m in ctl.store.list_models(sid)}
    chain = [r.model_out for r in rounds]
    assert models[chain[0]].parent == rounds[0].model_in
    for prev, cur in zip(chain, chain[1:], strict=False):
        assert models[cur].parent == prev


@pytest.mark.slow
@pytest.mark.parametrize("n_regions", [1, 3])
def test_region_count_does_not_change_the_result(broker_url, tmp_path, n_regions) -> None:
    dep = Deployment(broker_url, tmp_path)
    try:
        dep.start_combiners(n_regions)
        dep.start_fleet(10)
        ctl = dep.controller()
        _, rounds = dep.run_session(ctl, rounds=20, min_devices=10, round_timeout_s=30)
        accs = completed_accuracies(rounds)
        assert abs(accs[-1] - 0.938889) <= 0.003
        assert accs == pytest.approx(digits.reference_run(10, 20), abs=1e-9)
    finally:
        dep.close()


def test_mlp_learns(broker_url, tmp_path) -> None:
    dep = Deployment(broker_url, tmp_path)
    try:
        dep.start_combiners(2)
        dep.start_fleet(10)
        ctl = dep.controller()
        _, rounds = dep.run_session(
            ctl,
            rounds=5,
            min_devices=10,
            round_timeout_s=30,
            train={"model": "mlp", "lr": 0.2, "batch_size": 32},
        )
        accs = completed_accuracies(rounds)
        losses = [r.metrics["loss"] for r in rounds]
        assert accs == pytest.approx(digits.reference_run(10, 5, "mlp", lr=0.2), abs=1e-9)
        assert accs[-1] > 0.6 and losses[-1] < losses[0]
    finally:
        dep.close()
