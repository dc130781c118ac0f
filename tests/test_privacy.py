"""Central DP: the RDP accountant, the noise calibration, and a DP session on real brokers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.optimize import minimize_scalar

from edgefl.aggregation.privacy import (
    DPConfig,
    add_noise,
    calibrate_noise,
    epsilon,
    noise_multiplier,
)
from edgefl.controller import SessionConfig
from edgefl.tasks import digits
from tests.harness import Deployment


def _epsilon_independent(z: float, rounds: int, delta: float) -> float:
    """The same RDP bound minimised by scipy over a continuous order (not our grid)."""

    def eps(a: float) -> float:
        rdp = rounds * a / (2 * z * z)
        return rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)

    res = minimize_scalar(eps, bounds=(1.0001, 1e7), method="bounded", options={"xatol": 1e-9})
    return max(0.0, float(res.fun))


@pytest.mark.parametrize(
    ("z", "rounds", "delta"),
    [(1.0, 1, 1e-5), (1.0, 20, 1e-5), (0.7, 5, 1e-6), (4.0, 100, 1e-5), (20.0, 10, 1e-5)],
)
def test_accountant_matches_the_rdp_bound(z: float, rounds: int, delta: float) -> None:
    ours = epsilon(z, rounds, delta)
    assert ours == pytest.approx(_epsilon_independent(z, rounds, delta), rel=2e-3)
    # never above Mironov's (2017, Prop. 3) conversion at its optimal order, a looser bound
    mironov = rounds / (2 * z * z) + math.sqrt(2 * rounds * math.log(1 / delta)) / z
    assert ours <= mironov


def test_epsilon_grows_round_by_round() -> None:
    eps = [epsilon(1.1, r, 1e-5) for r in range(30)]
    assert eps[0] == 0.0
    assert all(b > a for a, b in zip(eps, eps[1:]))


@pytest.mark.parametrize(("target", "rounds"), [(1.0, 10), (8.0, 5), (8.0, 20), (50.0, 3)])
def test_calibration_spends_the_target(target: float, rounds: int) -> None:
    z = calibrate_noise(target, 1e-5, rounds)
    assert epsilon(z, rounds, 1e-5) <= target
    assert epsilon(z, rounds, 1e-5) == pytest.approx(target, rel=1e-4)
    assert epsilon(z * 0.999, rounds, 1e-5) > target  # the smallest such z
    dp = DPConfig(clip_norm=1.0, target_epsilon=target)
    assert noise_multiplier(dp, rounds) == z


def test_noise_has_the_calibrated_std() -> None:
    mean = {"W": np.zeros((400, 500)), "b": np.ones(10, dtype=np.float32)}
    noisy = add_noise(mean, 0.03, np.random.default_rng(1))
    assert noisy["b"].dtype == np.float32
    assert float(noisy["W"].std()) == pytest.approx(0.03, rel=0.01)
    assert abs(float(noisy["W"].mean())) < 0.001


def test_dp_config_needs_exactly_one_of_z_and_target() -> None:
    with pytest.raises(ValidationError, match="exactly one of"):
        DPConfig(clip_norm=1.0)
    with pytest.raises(ValidationError, match="exactly one of"):
        DPConfig(clip_norm=1.0, noise_multiplier=1.0, target_epsilon=2.0)
    with pytest.raises(ValidationError):
        DPConfig(clip_norm=0.0, noise_multiplier=1.0)
    cfg = SessionConfig(dp={"clip_norm": 2.0, "noise_multiplier": 1.0})
    # DP clips deltas: with compression none the devices send float32 deltas
    assert cfg.plan_fields() == {
        "compression": {"encoding": "float32"},
        "dp": {"clip_norm": 2.0},
    }
    assert SessionConfig().plan_fields() == {}


@pytest.mark.slow
def test_dp_session_records_noise_and_running_epsilon(broker_url, tmp_path) -> None:
    dep = Deployment(broker_url, tmp_path)
    try:
        dep.start_combiners(2)
        dep.start_fleet(20)
        ctl = dep.controller()
        dp = DPConfig(clip_norm=1.0, target_epsilon=8.0)
        _sid, rounds = dep.run_session(
            ctl,
            session_id="dp",
            rounds=5,
            min_devices=digits.devices_with_data(20),
            round_timeout_s=30,
            train={"lr": 0.5, "batch_size": 32},  # larger steps: clipped to C, noised
            dp=dp,
        )
        models = {r.model_out: ctl.store.get_model(r.model_out) for r in rounds if r.model_out}
    finally:
        dep.close()
    done = [r for r in rounds if r.status == "completed"]
    assert len(done) == 5
    z = calibrate_noise(8.0, dp.delta, 5)
    eps = []
    for i, rec in enumerate(done, start=1):
        m = rec.metrics
        assert m["dp_noise_multiplier"] == pytest.approx(z)
        assert m["dp_noise_std"] == pytest.approx(z * dp.clip_norm / m["updates"])
        assert m["dp_epsilon"] == pytest.approx(epsilon(z, i, dp.delta))
        model = models[rec.model_out]
        assert model is not None
        privacy = model.meta["privacy"]
        assert privacy["epsilon"] == m["dp_epsilon"] and privacy["rounds"] == i
        assert privacy["clip_norm"] == 1.0 and privacy["delta"] == dp.delta
        eps.append(m["dp_epsilon"])
    assert all(b > a for a, b in zip(eps, eps[1:]))
    assert eps[-1] <= 8.0
    # the noise is real but the model still learns: chance is 0.1, and the same DP loop run
    # in-process (uniform weights, clip 1, the same z) ends at 0.79-0.81 over 5 noise seeds
    assert done[-1].metrics["accuracy"] > 0.65
