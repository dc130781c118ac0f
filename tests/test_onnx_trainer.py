"""The ONNX device trainer: digits-protocol reproduction, data checks, and real learning."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from device_agent.trainers.base import TrainTask
from device_agent.trainers.onnx_trainer import OnnxTrainer
from edgefl.models.numpy_models import evaluate, init_weights, train_epochs
from edgefl.packages.artifacts import TrainingArtifacts
from edgefl.packages.digits_models import digits_cnn_onnx, digits_mlp_onnx, digits_softmax_onnx
from edgefl.packages.onnx_autodiff import build_onnx_training
from edgefl.tasks import digits


@pytest.fixture(scope="module")
def softmax_package() -> TrainingArtifacts:
    return build_onnx_training(digits_softmax_onnx(np.float64))


def _softmax_grad(w: dict[str, np.ndarray], xb: np.ndarray, yb: np.ndarray) -> tuple:
    p = xb @ w["W"] + w["b"]
    p = np.exp(p - p.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(yb)), yb] -= 1
    p /= len(yb)
    return xb.T @ p, p.sum(0)


@pytest.mark.parametrize("k", [0, 2, 10])
def test_softmax_package_reproduces_the_numpy_reference(
    softmax_package: TrainingArtifacts, k: int
) -> None:
    X, y = digits.device_data(20, k)
    trainer = OnnxTrainer(softmax_package.manifest, softmax_package.files, X, y)
    w_onnx = w_ref = init_weights("softmax", 64, 10)
    for r in range(1, 4):
        result = trainer.train(w_onnx, TrainTask(round=r, config={}, seed=k))
        w_onnx = result.weights
        w_ref = train_epochs(w_ref, X, y, round_=r, seed=k)
        for name in w_ref:
            assert w_onnx[name].dtype == np.float64
            np.testing.assert_allclose(w_onnx[name], w_ref[name], rtol=0, atol=1e-9)
        assert result.num_examples == len(y)
        ref_metrics = evaluate(w_ref, X, y)
        assert result.metrics["train_accuracy"] == ref_metrics["accuracy"]
        assert result.metrics["train_loss"] == pytest.approx(ref_metrics["loss"], abs=1e-9)


def test_config_overrides_lr_batch_size_and_epochs(softmax_package: TrainingArtifacts) -> None:
    X, y = digits.device_data(20, 3)
    trainer = OnnxTrainer(softmax_package.manifest, softmax_package.files, X, y)
    w0 = digits.initial_weights()
    cfg = {"lr": 0.05, "batch_size": 10, "epochs": 3}
    got = trainer.train(w0, TrainTask(round=4, config=cfg, seed=3)).weights
    ref = train_epochs(w0, X, y, round_=4, seed=3, lr=0.05, batch_size=10, epochs=3)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-9)
    assert trainer.evaluate(got) == pytest.approx(evaluate(ref, X, y), abs=1e-9)


def test_momentum_state_threads_through_batches_and_resets_each_round() -> None:
    art = build_onnx_training(
        digits_softmax_onnx(), optimizer={"name": "momentum", "lr": 0.05, "momentum": 0.9}
    )
    X, y = digits.device_data(10, 1)
    trainer = OnnxTrainer.from_package(
        SimpleNamespace(manifest=art.manifest, files=art.files), X, y
    )
    w0 = {"W": np.random.default_rng(0).normal(size=(64, 10)), "b": np.zeros(10)}
    task = TrainTask(round=2, config={"batch_size": 16}, seed=1)
    first = trainer.train(w0, task).weights
    again = trainer.train(w0, task).weights  # fresh momentum buffers: same result
    # the protocol's loop with torch-style momentum (buf = mu*buf + g; w -= lr*buf)
    w = {k: v.copy() for k, v in w0.items()}
    buf = {k: np.zeros_like(v) for k, v in w.items()}
    perm = np.random.default_rng([1, 2]).permutation(len(y))
    for s in range(0, len(y), 16):
        idx = perm[s : s + 16]
        g = dict(zip(("W", "b"), _softmax_grad(w, X[idx], y[idx]), strict=True))
        for name in w:
            buf[name] = 0.9 * buf[name] + g[name]
            w[name] = w[name] - 0.05 * buf[name]
    for name in w:
        np.testing.assert_allclose(first[name], w[name], rtol=0, atol=1e-9)
        np.testing.assert_array_equal(first[name], again[name])


def test_returned_weights_keep_the_incoming_dtypes(softmax_package: TrainingArtifacts) -> None:
    X, y = digits.device_data(20, 5)
    trainer = OnnxTrainer(softmax_package.manifest, softmax_package.files, X, y)
    w32 = {k: v.astype(np.float32) for k, v in digits.initial_weights().items()}
    out = trainer.train(w32, TrainTask(round=1, config={}, seed=5)).weights
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {
        "W": (np.float32, (64, 10)),
        "b": (np.float32, (10,)),
    }
    with pytest.raises(ValueError, match=r"do not match the package parameters \['W', 'b'\]"):
        trainer.train({"W": w32["W"]}, TrainTask(round=1, config={}, seed=5))
    with pytest.raises(ValueError, match="weight 'b' has shape"):
        trainer.train({"W": w32["W"], "b": np.zeros(9)}, TrainTask(round=1, config={}, seed=5))


def test_data_that_does_not_fit_the_package_is_refused(softmax_package: TrainingArtifacts) -> None:
    X, y = digits.device_data(20, 0)
    with pytest.raises(ValueError) as err:
        OnnxTrainer(softmax_package.manifest, softmax_package.files, X[:, :63], y)
    assert str(err.value) == (f"package input 'x' expects (-1, 64), device data has ({len(y)}, 63)")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        OnnxTrainer(softmax_package.manifest, softmax_package.files, X, y + 1)
    with pytest.raises(ValueError, match="samples but"):
        OnnxTrainer(softmax_package.manifest, softmax_package.files, X, y[:-1])
    files = {k: v for k, v in softmax_package.files.items() if k != "eval.onnx"}
    with pytest.raises(ValueError, match=r"package lacks file 'eval\.onnx'"):
        OnnxTrainer(softmax_package.manifest, files, X, y)


def test_cnn_package_reshapes_flat_digits_and_learns() -> None:
    art = build_onnx_training(digits_cnn_onnx(), optimizer={"name": "sgd", "lr": 0.05})
    assert art.manifest["inputs"][0]["shape"] == [-1, 1, 8, 8]
    X, y = digits.device_data(3, 0)  # flat (n, 64) rows become (n, 1, 8, 8)
    trainer = OnnxTrainer(art.manifest, art.files, X, y, threads=2)
    w = art.initial_weights
    before = trainer.evaluate(w)
    for r in range(1, 3):
        w = trainer.train(w, TrainTask(round=r, config={}, seed=0)).weights
    after = trainer.evaluate(w)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > before["accuracy"] + 0.3


def test_mse_package_regresses() -> None:
    art = build_onnx_training(
        digits_softmax_onnx(), loss="mse", optimizer={"name": "adam", "lr": 0.01}
    )
    X, y = digits.device_data(10, 4)
    targets = np.eye(10)[y]
    trainer = OnnxTrainer(art.manifest, art.files, X, targets)
    before = trainer.evaluate(art.initial_weights)
    result = trainer.train(art.initial_weights, TrainTask(round=1, config={"epochs": 3}, seed=4))
    assert set(result.metrics) == {"train_loss"}
    assert result.metrics["train_loss"] < 0.5 * before["loss"]


def test_federated_rounds_of_the_onnx_mlp_learn_digits() -> None:
    """3 devices, local ONNX training and plain FedAvg in the test: accuracy passes 0.85."""
    art = build_onnx_training(digits_mlp_onnx(), optimizer={"name": "sgd", "lr": 0.1})
    data = digits.load()
    devices = [digits.device_data(3, k) for k in range(3)]
    trainers = [OnnxTrainer(art.manifest, art.files, X, y) for X, y in devices]
    judge = OnnxTrainer(art.manifest, art.files, data.Xte, data.yte)
    w = art.initial_weights
    accuracies = [judge.evaluate(w)["accuracy"]]
    for r in range(1, 7):
        results = [
            t.train(w, TrainTask(round=r, config={}, seed=k)) for k, t in enumerate(trainers)
        ]
        total = sum(res.num_examples for res in results)
        w = {
            name: sum(res.num_examples * res.weights[name] for res in results) / total for name in w
        }
        w = {name: v.astype(np.float32) for name, v in w.items()}
        accuracies.append(judge.evaluate(w)["accuracy"])
    print("test accuracy by round:", accuracies)
    assert accuracies[-1] > 0.85, accuracies
    assert accuracies[-1] > accuracies[0] + 0.5, accuracies


def test_importing_the_trainer_does_not_load_onnxruntime() -> None:
    code = (
        "import sys, device_agent.trainers.onnx_trainer; "
        "assert 'onnxruntime' not in sys.modules and 'onnx' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
