"""FedProx: the devices' proximal term against a plain numpy formula, the trainers that
cannot apply it refusing, and a whole session over a real broker."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.trainers.base import TrainTask, proximal_mu
from device_agent.trainers.numpy_trainer import NumpyTrainer
from device_agent.trainers.onnx_trainer import OnnxTrainer
from edgefl.aggregation import make_aggregator
from edgefl.models.numpy_models import train_epochs
from edgefl.packages.digits_models import digits_softmax_onnx
from edgefl.packages.onnx_autodiff import build_onnx_training
from edgefl.tasks import digits
from tests.harness import completed_accuracies


def prox_sgd(w0: dict, X: np.ndarray, y: np.ndarray, *, mu: float, r: int, k: int, lr=0.1):
    """FedProx's local solver written out: SGD on F_k(w) + mu/2 ||w - w0||^2 (softmax)."""
    w = {n: v.copy() for n, v in w0.items()}
    perm = np.random.default_rng([k, r]).permutation(len(y))
    for s in range(0, len(y), 32):
        xb, yb = X[perm[s : s + 32]], y[perm[s : s + 32]]
        z = xb @ w["W"] + w["b"]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(yb)), yb] -= 1
        p /= len(yb)
        gW = xb.T @ p + mu * (w["W"] - w0["W"])
        gb = p.sum(0) + mu * (w["b"] - w0["b"])
        w["W"], w["b"] = w["W"] - lr * gW, w["b"] - lr * gb
    return w


def start_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)  # away from zero, so the pull towards w0 matters
    return {"W": rng.normal(0, 0.3, (64, 10)), "b": rng.normal(0, 0.3, 10)}


@pytest.mark.parametrize("mu", [0.0, 0.5, 5.0])
def test_numpy_trainer_applies_the_proximal_gradient(mu: float) -> None:
    X, y = digits.device_data(10, 3)
    w0 = start_weights()
    got = NumpyTrainer(X, y).train(w0, TrainTask(round=2, config={"mu": mu}, seed=3)).weights
    want = prox_sgd(w0, X, y, mu=mu, r=2, k=3)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-12)
    if mu == 0.0:  # no mu: bit-identical to the canonical loop (the reference runs stay exact)
        plain = train_epochs(w0, X, y, round_=2, seed=3)
        assert all(np.array_equal(got[n], plain[n]) for n in plain)


def test_a_larger_mu_keeps_the_local_model_nearer_the_global_one() -> None:
    X, y = digits.device_data(10, 0)
    w0 = start_weights()
    drift = [
        sum(np.linalg.norm(w[n] - w0[n]) for n in w0)
        for w in (train_epochs(w0, X, y, round_=1, seed=0, mu=mu) for mu in (0.0, 1.0, 4.0))
    ]
    assert drift[0] > drift[1] > drift[2] > 0


def test_onnx_sgd_package_honours_mu() -> None:
    art = build_onnx_training(digits_softmax_onnx(np.float64))
    X, y = digits.device_data(10, 5)
    w0 = start_weights()
    task = TrainTask(round=3, config={"mu": 0.7}, seed=5)
    got = OnnxTrainer(art.manifest, art.files, X, y).train(w0, task).weights
    want = prox_sgd(w0, X, y, mu=0.7, r=3, k=5)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-9)


def test_onnx_package_with_optimizer_state_refuses_mu() -> None:
    art = build_onnx_training(
        digits_softmax_onnx(np.float64), optimizer={"name": "momentum", "lr": 0.1}
    )
    X, y = digits.device_data(10, 5)
    trainer = OnnxTrainer(art.manifest, art.files, X, y)
    trainer.train(start_weights(), TrainTask(round=1, config={}, seed=5))  # plain FedAvg: fine
    with pytest.raises(ValueError, match=r"'momentum'.*proximal term \(mu=0.1\)"):
        trainer.train(start_weights(), TrainTask(round=1, config={"mu": 0.1}, seed=5))


def test_litert_trainer_refuses_mu() -> None:
    from device_agent.trainers.litert_trainer import LiteRtTrainer
    from edgefl.packages.tflite import build_tflite_training
    from edgefl.tasks.digits_packages import MODELS_DIR

    art = build_tflite_training(MODELS_DIR / "digits_litert.tflite")
    X, y = digits.device_data(10, 0)
    trainer = LiteRtTrainer(art.manifest, art.files, X, y)
    with pytest.raises(ValueError, match="LiteRT trainer cannot apply FedProx"):
        trainer.train(art.initial_weights, TrainTask(round=1, config={"mu": 0.01}, seed=0))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "0.1", True])
def test_a_malformed_mu_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="mu must be"):
        proximal_mu({"mu": bad})


def test_fedprox_sends_mu_and_averages_like_fedavg() -> None:
    agg = make_aggregator("fedprox", mu=0.2)
    assert agg.task_settings() == {"mu": 0.2}  # type: ignore[attr-defined]
    g = {"W": np.ones((2, 2))}
    mean = {"W": np.full((2, 2), 3.0)}
    assert np.array_equal(agg.step(g, mean)["W"], mean["W"])


def test_fedprox_session_matches_its_reference(broker_url, tmp_path) -> None:
    """Over a real broker, 2 regions: each round's model is FedAvg of prox_sgd's models."""
    from tests.harness import Deployment

    dep = Deployment(broker_url, tmp_path)
    try:
        dep.start_combiners(2)
        dep.start_fleet(10)
        ctl = dep.controller()
        _, rounds = dep.run_session(
            ctl,
            rounds=3,
            min_devices=10,
            round_timeout_s=30,
            aggregator="fedprox",
            aggregator_params={"mu": 0.5},
        )
        d = digits.load()
        parts = digits.partition(d.ytr, 10)
        w = digits.initial_weights()
        want = []
        for r in range(1, 4):
            new = [prox_sgd(w, d.Xtr[p], d.ytr[p], mu=0.5, r=r, k=k) for k, p in enumerate(parts)]
            n = np.array([len(p) for p in parts], dtype=np.float64)
            w = {name: sum(s * u[name] for s, u in zip(n, new)) / n.sum() for name in w}
            want.append(digits.evaluator(w)["accuracy"])
        assert completed_accuracies(rounds) == pytest.approx(want, abs=1e-9)
        assert want != pytest.approx(digits.reference_run(10, 3), abs=1e-9)  # mu mattered
    finally:
        dep.close()


def test_litert_devices_decline_a_fedprox_session_with_the_reason(broker_url, tmp_path) -> None:
    """Over a real broker: LiteRT devices cannot apply mu, so they decline (not train FedAvg);
    the round fails at once, its record saying why, instead of waiting for its deadline."""
    import time

    from device_agent.trainers.package_trainer import PackageTrainer
    from edgefl.controller import SessionConfig, SessionFailed
    from edgefl.fleet.evaluation import package_evaluator
    from edgefl.tasks import digits_packages
    from tests.harness import Deployment

    dep = Deployment(broker_url, tmp_path)
    try:
        built = digits_packages.build_digits_package("litert", "softmax", tmp_path)
        dep.start_combiners(1)
        ctl = dep.start_controller(evaluator=package_evaluator(built))
        pkg = ctl.add_package(built.dumps())
        dep.start_fleet(4, trainer_factory=lambda _k, x, y: PackageTrainer(x, y))
        config = SessionConfig(
            rounds=1,
            min_devices=4,
            round_timeout_s=60,
            max_attempts=1,
            aggregator="fedprox",
            aggregator_params={"mu": 0.05},
            train={"lr": 0.1, "batch_size": 32},
            package=pkg.digest,
        )
        ctl.create_session(config, None)
        t0 = time.monotonic()
        with pytest.raises(SessionFailed):
            ctl.run(config.session_id)
        assert time.monotonic() - t0 < 30  # declines end the round; no 60 s deadline wait
        (rec,) = ctl.store.list_rounds(config.session_id)
        assert rec.status == "failed" and not rec.participants
        assert len(rec.rejected) == 4
        assert all(
            "cannot apply FedProx's proximal term (mu=0.05)" in r["reason"] for r in rec.rejected
        )
    finally:
        dep.close()
