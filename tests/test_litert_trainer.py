"""The LiteRT trainer on the committed fixtures, with the real ai-edge-litert interpreter.

The fixtures were built by tools/build_tflite_model.py with TensorFlow 2.21 (see
docs/litert-training.md); these tests need no TensorFlow. The numpy reference loop of the digits
task (float64) is the ground truth: a float32 LiteRT model must follow it to float32 rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.trainers.base import TrainTask
from device_agent.trainers.litert_trainer import LiteRtTrainer, load_interpreter
from edgefl.packages.artifacts import TrainingArtifacts
from edgefl.packages.tflite import build_tflite_training, read_metadata
from edgefl.tasks import digits

MODELS = Path(__file__).resolve().parents[1] / "edgefl" / "packages" / "models"
SOFTMAX = MODELS / "digits_litert.tflite"
MLP = MODELS / "digits_litert_mlp.tflite"
NO_RESTORE = MODELS / "digits_litert_no_restore.tflite"
FLEX = MODELS / "digits_litert_flex.tflite"  # TF's own cross-entropy + SELECT_TF_OPS


@pytest.fixture(scope="module")
def softmax() -> TrainingArtifacts:
    return build_tflite_training(SOFTMAX)


def as_float64(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in weights.items()}


def test_fixture_has_the_four_signatures_and_tensor_weights(softmax: TrainingArtifacts) -> None:
    sigs = load_interpreter(SOFTMAX.read_bytes()).get_signature_list()
    assert sigs["train"] == {"inputs": ["lr", "x", "y"], "outputs": ["loss"]}
    assert sigs["infer"] == {"inputs": ["x"], "outputs": ["logits"]}
    assert sigs["save"] == {"inputs": [], "outputs": ["W", "b"]}
    assert sigs["restore"]["inputs"] == ["W", "b"]

    m = softmax.manifest
    assert softmax.framework == "tflite"
    assert softmax.files == {"model.tflite": SOFTMAX.read_bytes()}
    assert m["parameters"] == [
        {"name": "W", "dtype": "float32", "shape": [64, 10]},
        {"name": "b", "dtype": "float32", "shape": [10]},
    ]
    assert m["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 64]}]
    assert m["labels"] == {"name": "y", "dtype": "int32", "shape": [-1]}
    assert m["loss"] == "cross_entropy"
    assert m["optimizer"] == {"name": "sgd", "lr": 0.1}
    assert m["training"]["train_inputs"] == {"x": "x", "y": "y", "lr": "lr"}
    assert m["training"]["num_classes"] == 10
    # the canonical digits model starts at zero (protocol step 5), read back through save()
    for name, w in softmax.initial_weights.items():
        assert w.dtype == np.float32
        assert not w.any(), name
    assert read_metadata(SOFTMAX.read_bytes())["built_with"].startswith("tensorflow 2.21")


@pytest.mark.parametrize(
    ("path", "model", "k", "config"),
    [
        (SOFTMAX, "softmax", 0, {}),  # 155 samples: a partial last batch of 27
        (MLP, "mlp", 3, {"lr": 0.05, "batch_size": 16, "epochs": 2}),  # runtime lr, 2 epochs
    ],
    ids=["softmax", "mlp"],
)
def test_one_round_follows_the_numpy_reference(
    path: Path, model: str, k: int, config: dict[str, float]
) -> None:
    art = build_tflite_training(path)
    start = as_float64(art.initial_weights)
    np.testing.assert_allclose(
        start["W1" if model == "mlp" else "W"],
        digits.initial_weights(model)["W1" if model == "mlp" else "W"],
        atol=1e-7,
    )
    x, y = digits.device_data(10, k)
    task = TrainTask(round=2, config=config, seed=k)
    result = LiteRtTrainer(art.manifest, art.files, x, y).train(art.initial_weights, task)

    # digits.train_epochs is the task's reference loop (float64 numpy)
    ref = digits.train_epochs(
        start,
        x,
        y,
        round_=2,
        seed=k,
        lr=float(config.get("lr", 0.1)),
        batch_size=int(config.get("batch_size", 32)),
        epochs=int(config.get("epochs", 1)),
    )
    assert result.num_examples == len(y)
    assert set(result.weights) == set(art.initial_weights)
    for name, w in result.weights.items():
        assert w.dtype == art.initial_weights[name].dtype
        assert w.shape == art.initial_weights[name].shape
        assert np.abs(ref[name]).max() > 1e-3  # it really moved
        np.testing.assert_allclose(w, ref[name], atol=1e-5, err_msg=name)
    assert set(result.metrics) == {"train_loss", "train_accuracy"}


def test_local_training_lowers_loss_and_raises_accuracy(softmax: TrainingArtifacts) -> None:
    x, y = digits.device_data(10, 3)
    trainer = LiteRtTrainer.from_package(softmax, x, y)
    w = softmax.initial_weights
    history = [trainer.evaluate(w)]
    for r in range(1, 4):
        w = trainer.train(w, TrainTask(round=r, config={"lr": 0.1}, seed=3)).weights
        history.append(trainer.evaluate(w))
    losses = [h["loss"] for h in history]
    assert losses == sorted(losses, reverse=True), losses
    assert history[-1]["accuracy"] > history[0]["accuracy"] + 0.5, history
    assert history[-1]["accuracy"] > 0.9


def test_federated_rounds_lower_the_loss_and_match_the_reference(
    softmax: TrainingArtifacts,
) -> None:
    """3 devices + plain FedAvg in process: every round lowers the held-out loss, and the
    accuracies equal the numpy single-process reference to within one test sample."""
    n_dev, rounds = 3, 4
    d = digits.load()
    devices = [
        LiteRtTrainer(softmax.manifest, softmax.files, *digits.device_data(n_dev, k))
        for k in range(n_dev)
    ]
    judge = LiteRtTrainer(softmax.manifest, softmax.files, d.Xte, d.yte)
    w = softmax.initial_weights
    held_out = [judge.evaluate(w)]
    for r in range(1, rounds + 1):
        results = [t.train(w, TrainTask(round=r, config={}, seed=k)) for k, t in enumerate(devices)]
        total = sum(res.num_examples for res in results)
        w = {
            name: (
                sum(res.num_examples * res.weights[name].astype(np.float64) for res in results)
                / total
            ).astype(np.float32)
            for name in w
        }
        held_out.append(judge.evaluate(w))
    losses = [h["loss"] for h in held_out]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    reference = digits.reference_run(n_dev, rounds)
    for h, ref in zip(held_out[1:], reference):
        assert abs(h["accuracy"] - ref) <= 1 / 360 + 1e-9, (held_out, reference)
    assert held_out[-1]["accuracy"] > 0.9


def test_a_model_without_restore_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="lacks the 'restore' signature"):
        build_tflite_training(NO_RESTORE)


def test_a_model_that_needs_flex_ops_is_refused_naming_the_op() -> None:
    # it has all four signatures and loads; only preparing `train` shows the missing op
    assert set(load_interpreter(FLEX.read_bytes()).get_signature_list()) == {
        "train",
        "infer",
        "save",
        "restore",
    }
    with pytest.raises(ValueError, match="FlexSparseSoftmaxCrossEntropyWithLogits"):
        build_tflite_training(FLEX)


def test_the_trainer_refuses_a_model_missing_a_signature_the_manifest_names(
    softmax: TrainingArtifacts,
) -> None:
    x, y = digits.device_data(10, 0)
    files = {"model.tflite": NO_RESTORE.read_bytes()}
    with pytest.raises(ValueError, match="lacks the 'restore' signature"):
        LiteRtTrainer(softmax.manifest, files, x, y)


def test_data_of_the_wrong_shape_is_refused(softmax: TrainingArtifacts) -> None:
    x, y = digits.device_data(10, 0)
    with pytest.raises(
        ValueError, match=r"input 'x' expects \(-1, 64\), device data has \(n, 63\)"
    ):
        LiteRtTrainer(softmax.manifest, softmax.files, x[:, :63], y)
    with pytest.raises(ValueError, match="155 samples but labels of shape"):
        LiteRtTrainer(softmax.manifest, softmax.files, x, y[:-1])
    with pytest.raises(ValueError, match="label 10 is outside the model's 10 classes"):
        LiteRtTrainer(softmax.manifest, softmax.files, x, np.where(y == 9, 10, y))
    # 8x8 images of the same 64 values are reshaped, not refused
    images = LiteRtTrainer(softmax.manifest, softmax.files, x.reshape(-1, 8, 8), y)
    assert images.X.shape == (len(y), 64)


def test_weights_that_do_not_match_the_package_are_refused(softmax: TrainingArtifacts) -> None:
    trainer = LiteRtTrainer(softmax.manifest, softmax.files, *digits.device_data(10, 0))
    task = TrainTask(round=1, config={}, seed=0)
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        trainer.train({"W": softmax.initial_weights["W"]}, task)
    bad = {**softmax.initial_weights, "W": np.zeros((64, 9), np.float32)}
    with pytest.raises(ValueError, match=r"weight 'W' has shape \(64, 9\)"):
        trainer.train(bad, task)


def test_only_the_trainable_variables_are_federated() -> None:
    art = build_tflite_training(SOFTMAX, trainable=["W"])
    assert [p["name"] for p in art.manifest["parameters"]] == ["W"]
    assert art.manifest["training"]["variables"] == ["W", "b"]
    trainer = LiteRtTrainer(art.manifest, art.files, *digits.device_data(10, 0))
    result = trainer.train(art.initial_weights, TrainTask(round=1, config={}, seed=0))
    assert set(result.weights) == {"W"}
    assert np.abs(result.weights["W"]).max() > 1e-3


def test_declarations_that_contradict_the_model_are_refused() -> None:
    with pytest.raises(ValueError, match="'adam' was asked for, but the model's train signature"):
        build_tflite_training(SOFTMAX, optimizer={"name": "adam", "lr": 0.01})
    with pytest.raises(ValueError, match="loss 'mse' is not supported"):
        build_tflite_training(SOFTMAX, loss="mse")
    with pytest.raises(ValueError, match=r"trainable \['V'\] not among"):
        build_tflite_training(SOFTMAX, trainable=["V"])
    with pytest.raises(ValueError, match="not a loadable TFLite model"):
        build_tflite_training(b"this is not a flatbuffer" * 10)
    # a runtime lr input means the declared rate is just the default
    art = build_tflite_training(SOFTMAX, optimizer={"name": "sgd", "lr": 0.05})
    assert art.manifest["optimizer"] == {"name": "sgd", "lr": 0.05}
