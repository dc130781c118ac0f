"""Black-box trainers: the PyTorch and scikit-learn examples run under the real device agent.

The agent treats a trainer as a black box (named numpy arrays in, same names/shapes/dtypes
out). These tests check that the two examples in ``examples/`` honour that contract, learn on
a digits partition, and drive a federated session over each real test broker, with one of the
devices started exactly as a user would start it (``run_agent.py`` in its own process). They
also check the other side of the bargain: the agent with the numpy trainer never imports a
framework.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from device_agent.trainers.base import TrainTask
from edgefl.auth.tokens import Role
from edgefl.controller import SessionConfig
from edgefl.tasks import digits

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = ROOT / "examples"


@dataclass(frozen=True)
class Example:
    name: str  # folder under examples/
    trainer_class: str
    train: dict[str, Any]  # the session's train settings
    floor: float  # test accuracy the federated run must exceed after its last round
    flags: tuple[str, ...] = field(default=())  # extra run_agent.py flags


# Measured test accuracies, 3 rounds of 4 Dirichlet devices: torch 0.722, 0.817, 0.875;
# sklearn 0.867, 0.886, 0.894. The runs are deterministic, the floors leave room for a
# change of library version.
EXAMPLES = {
    "pytorch": Example(
        "pytorch", "TorchDigitsTrainer", {"lr": 0.2, "batch_size": 32}, 0.8, ("--threads", "1")
    ),
    "sklearn": Example("sklearn", "SklearnDigitsTrainer", {"lr": 0.003, "batch_size": 32}, 0.85),
}


@cache
def load_example(name: str) -> ModuleType:
    """Import examples/<name>/trainer.py by path (examples/ is not a package)."""
    path = EXAMPLES_DIR / name / "trainer.py"
    spec = importlib.util.spec_from_file_location(f"edgefl_example_{name}_trainer", path)
    assert spec is not None, f"cannot import {path}"
    assert spec.loader is not None, f"cannot import {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_trainer(example: Example, x: np.ndarray, y: np.ndarray) -> Any:
    return getattr(load_example(example.name), example.trainer_class)(x, y)


@pytest.fixture(params=sorted(EXAMPLES))
def example(request: pytest.FixtureRequest) -> Example:
    return EXAMPLES[request.param]


# (a) local training ------------------------------------------------------------------------
def test_local_training_learns_and_keeps_the_contract(example: Example) -> None:
    mod = load_example(example.name)
    x, y = digits.device_data(10, 3)
    trainer = make_trainer(example, x, y)
    w0 = mod.initial_weights()
    frozen = {k: v.copy() for k, v in w0.items()}
    start = trainer.evaluate(w0)
    w, history = w0, []
    for r in (1, 2, 3):
        res = trainer.train(w, TrainTask(round=r, config=example.train, seed=3))
        assert res.num_examples == len(y) == 220
        assert {k: (v.dtype, v.shape) for k, v in res.weights.items()} == {
            k: (v.dtype, v.shape) for k, v in w0.items()
        }
        assert set(res.metrics) == {"train_loss", "train_accuracy"}
        # the metrics describe the returned model on the local data
        assert res.metrics["train_loss"] == pytest.approx(trainer.evaluate(res.weights)["loss"])
        history.append(res.metrics)
        w = res.weights
    for k in w0:  # the global model the agent caches is never written to
        np.testing.assert_array_equal(w0[k], frozen[k])
    losses = [start["loss"]] + [m["train_loss"] for m in history]
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert history[-1]["train_accuracy"] > max(0.8, start["accuracy"] + 0.5), history


def test_a_retried_round_retrains_identically(example: Example) -> None:
    """Restart safety needs determinism: same weights + same task -> the same update."""
    mod = load_example(example.name)
    x, y = digits.device_data(10, 1)
    task = TrainTask(round=2, config=example.train, seed=1)
    w = mod.initial_weights()
    a = make_trainer(example, x, y).train(w, task).weights
    b = make_trainer(example, x, y).train(w, task).weights
    c = make_trainer(example, x, y).train(w, TrainTask(round=3, config=example.train, seed=1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c.weights[k]) for k in a)  # the order follows the round


def test_wrong_model_is_refused_with_the_tensor_named(example: Example) -> None:
    mod = load_example(example.name)
    x, y = digits.device_data(10, 0)
    trainer = make_trainer(example, x, y)
    w = mod.initial_weights()
    name = sorted(w)[-1]
    bad = {**w, name: np.zeros((3, 3), dtype=w[name].dtype)}
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        trainer.train(bad, TrainTask(round=1, config=example.train, seed=0))
    with pytest.raises(ValueError, match="missing"):
        trainer.train({"W": np.zeros((64, 10))}, TrainTask(round=1, config={}, seed=0))


# (b) a federated session over a real broker ------------------------------------------------
def fedavg_reference(example: Example, n_devices: int, rounds: int) -> list[float]:
    """Single-process FedAvg of the example's trainers: what the federated run must give.

    Sums in float64 and casts to the model's dtype, as the combiner and FedAvg do.
    """
    mod = load_example(example.name)
    trainers = [make_trainer(example, *digits.device_data(n_devices, k)) for k in range(n_devices)]
    d = digits.load()
    judge = make_trainer(example, d.Xte, d.yte)
    w, accs = mod.initial_weights(), []
    for r in range(1, rounds + 1):
        results = [
            t.train(w, TrainTask(round=r, config=example.train, seed=k))
            for k, t in enumerate(trainers)
        ]
        total = float(sum(res.num_examples for res in results))
        w = {
            name: (
                sum(res.num_examples * res.weights[name].astype(np.float64) for res in results)
                / total
            ).astype(w[name].dtype)
            for name in w
        }
        accs.append(judge.evaluate(w)["accuracy"])
    return accs


class CliAgent:
    """A device started exactly as the example's README says: ``run_agent.py`` in a process."""

    def __init__(
        self, example: Example, deployment: Any, device: str, seed: int, data: Path
    ) -> None:
        region = deployment.regions[0]
        self.log = data.with_suffix(".log")
        cmd = [
            sys.executable,
            str(EXAMPLES_DIR / example.name / "run_agent.py"),
            "--broker-url", deployment.url,
            "--project", deployment.project,
            "--region", region,
            "--device-id", device,
            "--data-path", str(data),
            "--seed", str(seed),
            "--log-level", "warning",
            *example.flags,
        ]  # fmt: skip
        # no inherited EDGEFL_* settings may override the flags; the token goes in the env
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFL_")}
        token = deployment.credentials.token(device, Role.device, region)
        if token is not None:
            env["EDGEFL_PASSWORD"] = token
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, as a service manager sends it, must stop the agent cleanly; exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return int(self.proc.returncode)


@pytest.mark.slow
def test_federated_session_on_a_real_broker(example: Example, deployment: Any) -> None:
    n_devices, rounds = 4, 3
    deployment.start_combiners(1)
    # devices 0-2 in this process through the simulator's fleet builder, device 3 on its own
    fleet = deployment.start_fleet(
        n_devices - 1,
        partition_size=n_devices,
        trainer_factory=lambda _k, x, y: make_trainer(example, x, y),
    )
    x3, y3 = digits.device_data(n_devices, 3)
    data3 = deployment.workdir / "dev-0003.npz"
    np.savez(data3, X=x3, y=y3)
    cli = deployment.own(CliAgent(example, deployment, "dev-0003", 3, data3))

    test_split = digits.load()
    judge = make_trainer(example, test_split.Xte, test_split.yte)  # the example's own evaluate
    ctl = deployment.start_controller(evaluator=judge.evaluate)
    config = SessionConfig(
        session_id=f"{example.name}-blackbox",
        rounds=rounds,
        min_devices=n_devices,
        round_timeout_s=30,
        wait_for_devices_s=30,
        train=example.train,
    )
    t0 = time.perf_counter()
    ctl.create_session(config, load_example(example.name).initial_weights())
    ctl.run(config.session_id)
    elapsed = time.perf_counter() - t0
    records = ctl.store.list_rounds(config.session_id)

    completed = [r for r in records if r.status == "completed"]
    accs = [r.metrics["accuracy"] for r in completed]
    assert len(completed) == rounds, (records, cli.output())
    for rec in completed:  # every device, the subprocess one included, took part each round
        assert sorted(p["device"] for p in rec.participants) == [
            f"dev-{k:04d}" for k in range(n_devices)
        ]
    assert [a.last_error for a in fleet.agents] == [None] * (n_devices - 1)
    assert accs[-1] > accs[0], accs
    assert accs[-1] > example.floor, accs
    # nothing lost, duplicated or mis-weighted: the single-process FedAvg, to one test sample
    # (the float64 sums may be added in another order before the cast to the model dtype)
    reference = fedavg_reference(example, n_devices, rounds)
    assert accs == pytest.approx(reference, abs=1.01 / len(test_split.yte)), (accs, reference)
    print(f"{example.name} on {deployment.url}: accuracies {accs} in {elapsed:.1f}s")
    assert cli.proc.poll() is None, f"run_agent.py exited early: {cli.output()}"
    assert cli.stop() == 0, cli.output()


@pytest.mark.slow
def test_run_agent_refuses_to_start_without_local_data(example: Example, tmp_path: Path) -> None:
    """A device without data fails at start with the reason, not at its first round."""
    script = str(EXAMPLES_DIR / example.name / "run_agent.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFL_")}
    out = subprocess.run(
        [sys.executable, script, "--device-id", "d1", "--broker-url", "mqtt://127.0.0.1:1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "--data-path" in out.stderr, out.stderr
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=np.zeros((3, 5)), y=np.zeros(3, dtype=np.int64))
    out = subprocess.run(
        [sys.executable, script, "--device-id", "d1", "--data-path", str(bad)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "shape (3, 5)" in out.stderr, out.stderr


# (c) the agent stays framework-free ---------------------------------------------------------
def test_numpy_agent_imports_no_framework() -> None:
    code = (
        "import device_agent.agent, device_agent.trainers.numpy_trainer, sys; "
        "print('torch' in sys.modules, 'sklearn' in sys.modules, "
        "'tensorflow' in sys.modules, 'onnxruntime' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False", "False"], out.stdout
