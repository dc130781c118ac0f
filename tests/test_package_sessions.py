"""Sessions that train model packages, end to end over the real brokers.

The controller keeps a package and publishes it retained; each device fetches it over MQTT,
verifies it and trains it with the real runtime (onnxruntime, LiteRT). A float64 ONNX softmax
package computes the numpy reference's SGD, so those sessions must reproduce the canonical
digits accuracies exactly, like the weights-only sessions in ``test_session_e2e.py``. A device
that cannot run the package (signature policy, data shape) declines its task: the round goes
on at once without it, and the round record says why.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig
from device_agent.trainers.base import Trainer
from device_agent.trainers.numpy_trainer import NumpyTrainer
from device_agent.trainers.package_trainer import PackageTrainer
from edgefl.auth.tokens import Role
from edgefl.controller import Controller, SessionConfig
from edgefl.fleet.evaluation import package_evaluator
from edgefl.fleet.simulate import device_name
from edgefl.packages.format import ModelPackage, PackageError
from edgefl.packages.signing import generate_private_key, key_id_of, save_keypair
from edgefl.store.base import RoundRecord
from edgefl.tasks import digits, digits_packages
from tests.harness import Deployment, completed_accuracies

ROOT = Path(__file__).resolve().parents[1]
# the console script pip installs beside the interpreter, as a device operator runs it
AGENT_SCRIPT = Path(sys.executable).with_name("edgefl-agent")

DEADLINE_S = 60.0  # round_timeout_s of the refusal sessions
QUICK_S = 10.0  # a round with a declining device must end well before its deadline


def package_trainer(_k: int, x: np.ndarray, y: np.ndarray) -> Trainer:
    """The fleet's trainer for package sessions: no model until the session's package arrives."""
    return PackageTrainer(x, y)


def train_settings(trainer: str, model: str) -> dict[str, Any]:
    """The session's train settings for a digits recipe (as the demo sends them)."""
    r = digits_packages.recipe(trainer, model)
    return {"lr": r.lr, "epochs": r.epochs, "batch_size": 32}


def run_package_session(
    ctl: Controller,
    digest: str,
    *,
    rounds: int,
    min_devices: int,
    train: dict[str, Any],
    **cfg: Any,
) -> list[RoundRecord]:
    """Create a session on the stored package (its own initial weights) and run it to the end."""
    config = SessionConfig(
        rounds=rounds,
        min_devices=min_devices,
        round_timeout_s=cfg.pop("round_timeout_s", 30.0),
        wait_for_devices_s=cfg.pop("wait_for_devices_s", 30.0),
        train=train,
        package=digest,
        **cfg,
    )
    ctl.create_session(config, None)
    ctl.run(config.session_id)
    return ctl.store.list_rounds(config.session_id)


def devices_of(rec: RoundRecord) -> list[str]:
    return sorted(p["device"] for p in rec.participants)


def tamper(data: bytes, package: ModelPackage, fname: str) -> bytes:
    """Flip one bit in the middle of file ``fname`` inside an encoded package.

    The CBOR framing stays intact (same lengths), so only the file digest check can notice.
    """
    content = package.files[fname]
    start = data.find(content)
    assert start > 0, f"{fname} not found in the encoded package"
    assert data.find(content, start + 1) == -1, f"{fname} found twice in the encoded package"
    out = bytearray(data)
    out[start + len(content) // 2] ^= 0x01
    return bytes(out)


@pytest.fixture(scope="module")
def softmax_package(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    """The float64 ONNX softmax package, built once for the module (unsigned)."""
    return digits_packages.build_digits_package(
        "onnx", "softmax", tmp_path_factory.mktemp("softmax")
    )


@pytest.fixture(scope="module")
def softmax_evaluator(softmax_package: ModelPackage) -> Callable[[Any], dict[str, float]]:
    return package_evaluator(softmax_package)


# 1. the ONNX softmax package reproduces the reference ------------------------------------
def test_onnx_softmax_package_reproduces_reference_20_devices(
    deployment: Deployment, softmax_package: ModelPackage, softmax_evaluator: Any
) -> None:
    n, rounds = 20, 20
    deployment.start_combiners(2)
    ctl = deployment.start_controller(evaluator=softmax_evaluator)
    pkg = ctl.add_package(softmax_package.dumps())
    fleet = deployment.start_fleet(n, trainer_factory=package_trainer)
    records = run_package_session(
        ctl, pkg.digest, rounds=rounds, min_devices=n, train=train_settings("onnx", "softmax")
    )
    accs = completed_accuracies(records)
    assert len(accs) == rounds, records
    assert accs == pytest.approx(digits.reference_run(n, rounds), abs=1e-9)
    assert abs(accs[-1] - 0.925) <= 0.003
    everyone = [device_name(k) for k in range(n)]
    for rec in records:
        assert devices_of(rec) == everyone
        assert {p["region"] for p in rec.participants} == {"region-0", "region-1"}
        assert rec.rejected == []
    # each device trained the package it fetched over MQTT, not some other model
    assert {a.trainer.package_digest for a in fleet.agents} == {pkg.digest}
    assert [a.last_error for a in fleet.agents] == [None] * n


# 2. exported MLP and CNN beat the softmax reference ----------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_onnx_mlp_and_cnn_packages_beat_softmax_reference(
    deployment: Deployment, model: str, tmp_path: Path
) -> None:
    n, rounds = 10, 20
    built = digits_packages.build_digits_package("onnx", model, tmp_path)
    deployment.start_combiners(2)
    ctl = deployment.start_controller(evaluator=package_evaluator(built))
    pkg = ctl.add_package(built.dumps())
    deployment.start_fleet(n, trainer_factory=package_trainer)
    records = run_package_session(
        ctl,
        pkg.digest,
        rounds=rounds,
        min_devices=n,
        train=train_settings("onnx", model),
        aggregator="fedavg",
    )
    accs = completed_accuracies(records)
    assert len(accs) == rounds, records
    assert all(len(rec.participants) == n for rec in records)
    softmax_reference = digits.reference_run(n, rounds)[-1]  # 0.9389
    assert accs[-1] > softmax_reference, accs
    assert accs[-1] > accs[0], accs
    print(f"{model}: accuracies {[round(a, 4) for a in accs]}")


# 3. a LiteRT package federates ---------------------------------------------------------------
def test_litert_softmax_package_loss_falls_every_round(
    deployment: Deployment, tmp_path: Path
) -> None:
    n, rounds = 6, 5
    built = digits_packages.build_digits_package("litert", "softmax", tmp_path)
    deployment.start_combiners(2)
    ctl = deployment.start_controller(evaluator=package_evaluator(built))
    pkg = ctl.add_package(built.dumps())
    assert pkg.manifest["framework"] == "tflite"
    fleet = deployment.start_fleet(n, trainer_factory=package_trainer)
    records = run_package_session(
        ctl, pkg.digest, rounds=rounds, min_devices=n, train=train_settings("litert", "softmax")
    )
    assert [r.status for r in records] == ["completed"] * rounds, records
    losses = [r.metrics["loss"] for r in records]
    accs = completed_accuracies(records)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert accs[-1] > accs[0], accs
    assert all(len(rec.participants) == n for rec in records)
    assert {a.trainer.package_digest for a in fleet.agents} == {pkg.digest}


# 4. a mixed fleet: package trainers beside the built-in numpy trainer ----------------------
def test_mixed_fleet_package_and_numpy_devices_reproduce_reference(
    deployment: Deployment, softmax_package: ModelPackage, softmax_evaluator: Any
) -> None:
    n, rounds = 10, 20

    def half_and_half(k: int, x: np.ndarray, y: np.ndarray) -> Trainer:
        return PackageTrainer(x, y) if k % 2 == 0 else NumpyTrainer(x, y)

    deployment.start_combiners(2)
    ctl = deployment.start_controller(evaluator=softmax_evaluator)
    pkg = ctl.add_package(softmax_package.dumps())
    fleet = deployment.start_fleet(n, trainer_factory=half_and_half)
    records = run_package_session(
        ctl, pkg.digest, rounds=rounds, min_devices=n, train=train_settings("onnx", "softmax")
    )
    accs = completed_accuracies(records)
    assert len(accs) == rounds, records
    everyone = [device_name(k) for k in range(n)]
    for rec in records:
        assert devices_of(rec) == everyone
        assert rec.rejected == []
    assert accs == pytest.approx(digits.reference_run(n, rounds), abs=1e-9)
    kinds = [type(a.trainer).__name__ for a in fleet.agents]
    assert kinds.count("PackageTrainer") == kinds.count("NumpyTrainer") == n // 2
    for agent in fleet.agents:
        if isinstance(agent.trainer, PackageTrainer):
            assert agent.trainer.package_digest == pkg.digest
    assert [a.last_error for a in fleet.agents] == [None] * n


# 5. refusals: the round goes on without the device, at once, and says why --------------------
N_REFUSAL = 6  # dev-0000..dev-0003 train; dev-0004 (region-0) and dev-0005 (region-1) refuse
GOOD = [device_name(k) for k in range(4)]
REFUSERS = [device_name(k) for k in range(4, N_REFUSAL)]


def start_agent(dep: Deployment, k: int, trainer: Trainer, **overrides: Any) -> DeviceAgent:
    """Device k of the refusal fleet with its own AgentConfig, built as the simulator builds it."""
    dev, region = device_name(k), dep.regions[k % len(dep.regions)]
    config = AgentConfig(
        broker_url=dep.url,
        project=dep.project,
        region=region,
        device_id=dev,
        password=dep.credentials.token(dev, Role.device, region),
        seed=k,
        min_backoff_s=0.2,
        max_backoff_s=5.0,
        **overrides,
    )
    agent: DeviceAgent = dep.own(DeviceAgent(config, trainer).start())
    return agent


def run_with_refusers(
    dep: Deployment, ctl: Controller, digest: str, check_reason: Callable[[str], bool]
) -> list[RoundRecord]:
    """Two rounds with all six devices selected; the refusers must decline each round quickly."""
    online = ctl.presence.wait_for(N_REFUSAL, 15)
    assert sorted(online) == GOOD + REFUSERS, online
    rounds = 2
    t0 = time.monotonic()
    records = run_package_session(
        ctl,
        digest,
        rounds=rounds,
        min_devices=len(GOOD),
        train=train_settings("onnx", "softmax"),
        round_timeout_s=DEADLINE_S,
    )
    elapsed = time.monotonic() - t0
    assert [r.status for r in records] == ["completed"] * rounds, records
    assert elapsed < QUICK_S * rounds, f"session took {elapsed:.1f}s: rounds waited for deadlines"
    for rec in records:
        assert rec.finished is not None
        assert rec.finished - rec.started < QUICK_S, (rec.finished - rec.started, rec.rejected)
        assert devices_of(rec) == GOOD
        assert sorted(r["device"] for r in rec.rejected) == REFUSERS, rec.rejected
        for r in rec.rejected:
            assert r["reason"].startswith("device declined: "), r
            assert check_reason(r["reason"]), r
    losses = [r.metrics["loss"] for r in records]
    assert losses[-1] < losses[0], losses  # the devices that could train did
    print(
        f"rounds took {[round(r.finished - r.started, 3) for r in records]}s; {records[0].rejected}"
    )
    return records


def test_device_requiring_signature_declines_unsigned_package(
    deployment: Deployment, softmax_package: ModelPackage, softmax_evaluator: Any, tmp_path: Path
) -> None:
    _, fleet_pub = save_keypair(generate_private_key(), tmp_path / "fleet")
    deployment.start_combiners(2)
    ctl = deployment.start_controller(evaluator=softmax_evaluator)
    pkg = ctl.add_package(softmax_package.dumps())
    assert pkg.signature is None
    for k in range(N_REFUSAL):
        x, y = digits.device_data(N_REFUSAL, k)
        strict = {"trusted_key": str(fleet_pub), "require_signature": True} if k >= 4 else {}
        start_agent(deployment, k, PackageTrainer(x, y), **strict)
    run_with_refusers(
        deployment,
        ctl,
        pkg.digest,
        lambda reason: "unsigned" in reason and "signature is required" in reason,
    )


def test_device_trusting_another_key_declines_signed_package(
    deployment: Deployment, softmax_evaluator: Any, tmp_path: Path
) -> None:
    key_a, key_b = generate_private_key(), generate_private_key()
    _, pub_a = save_keypair(key_a, tmp_path / "a")
    _, pub_b = save_keypair(key_b, tmp_path / "b")
    signed = digits_packages.build_digits_package("onnx", "softmax", tmp_path, signing_key=key_a)
    deployment.start_combiners(2)
    ctl = deployment.start_controller(evaluator=softmax_evaluator)
    pkg = ctl.add_package(signed.dumps())
    assert pkg.signature is not None
    assert pkg.signature["key_id"] == key_id_of(key_a)
    for k in range(N_REFUSAL):
        x, y = digits.device_data(N_REFUSAL, k)
        trusted = pub_a if k < 4 else pub_b  # the good devices check the signature too
        start_agent(
            deployment, k, PackageTrainer(x, y), trusted_key=str(trusted), require_signature=True
        )
    run_with_refusers(
        deployment,
        ctl,
        pkg.digest,
        lambda reason: (
            "not a trusted key" in reason
            and key_id_of(key_a) in reason
            and key_id_of(key_b) in reason
        ),
    )


def test_device_whose_data_does_not_fit_declines(
    deployment: Deployment, softmax_package: ModelPackage, softmax_evaluator: Any
) -> None:
    deployment.start_combiners(2)
    ctl = deployment.start_controller(evaluator=softmax_evaluator)
    pkg = ctl.add_package(softmax_package.dumps())
    spec = pkg.manifest["inputs"][0]
    sizes = {}
    for k in range(N_REFUSAL):
        x, y = digits.device_data(N_REFUSAL, k)
        if k >= 4:
            x = x[:, :63]  # a sensor short of one feature
            sizes[device_name(k)] = len(x)
        start_agent(deployment, k, PackageTrainer(x, y))
    records = run_with_refusers(
        deployment,
        ctl,
        pkg.digest,
        lambda reason: f"input '{spec['name']}'" in reason and "64)" in reason,
    )
    for r in records[0].rejected:  # both shapes: the package's and the device's
        assert f"({sizes[r['device']]}, 63)" in r["reason"], r


def test_controller_refuses_tampered_package(
    deployment: Deployment, softmax_package: ModelPackage
) -> None:
    deployment.start_combiners(1)
    ctl = deployment.start_controller()
    data = softmax_package.dumps()
    for fname in ("model.onnx", "train_step.onnx", "weights.cbor"):
        bad = tamper(data, softmax_package, fname)
        with pytest.raises(PackageError, match=f"file '{fname}' does not match its digest"):
            ctl.add_package(bad)
        with pytest.raises(KeyError):  # nothing of it was stored
            ctl.load_package(hashlib.sha256(bad).hexdigest())
    assert ctl.add_package(data).digest == softmax_package.digest  # the intact bytes are fine


def test_agents_sharing_a_package_cache_all_train(
    deployment: Deployment, softmax_package: ModelPackage, softmax_evaluator: Any, tmp_path: Path
) -> None:
    """Several agents on one host (a gateway, a simulation) may share one package cache.

    Caching is a saving, not a condition: a device whose package loaded must train, whatever
    another agent does to the same cache file at the same moment.
    """
    n = 12
    cache = tmp_path / "package-cache"
    deployment.start_combiners(2)
    ctl = deployment.start_controller(evaluator=softmax_evaluator)
    pkg = ctl.add_package(softmax_package.dumps())
    for k in range(n):
        x, y = digits.device_data(n, k)
        start_agent(deployment, k, PackageTrainer(x, y), package_cache=str(cache))
    assert len(ctl.presence.wait_for(n, 15)) == n
    records = run_package_session(
        ctl, pkg.digest, rounds=2, min_devices=n, train=train_settings("onnx", "softmax")
    )
    for rec in records:
        assert rec.status == "completed", rec
        assert rec.rejected == [], rec.rejected
        assert devices_of(rec) == [device_name(k) for k in range(n)]
    assert completed_accuracies(records) == pytest.approx(digits.reference_run(n, 2), abs=1e-9)
    # one complete cached copy, no temp files left behind
    assert sorted(p.name for p in cache.iterdir()) == [f"pkg-{pkg.digest}"]
    assert hashlib.sha256((cache / f"pkg-{pkg.digest}").read_bytes()).hexdigest() == pkg.digest


# 6. edgefl-agent --package as a device operator runs it --------------------------------------
def agent_env() -> dict[str, str]:
    """The test's environment without EDGEFL_* settings that could override the flags."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGEFL_")}


@pytest.fixture
def mosquitto_deployment(mosquitto: Any, tmp_path: Path) -> Iterator[Deployment]:
    dep = Deployment(mosquitto.url, tmp_path)
    yield dep
    dep.close()


def test_edgefl_agent_cli_trains_package_and_stops_on_sigterm(
    mosquitto_deployment: Deployment,
    softmax_package: ModelPackage,
    softmax_evaluator: Any,
    tmp_path: Path,
) -> None:
    dep = mosquitto_deployment
    n, rounds, k_cli = 4, 3, 3
    data = softmax_package.dumps()
    package_file = tmp_path / "digits-softmax.edgefl"
    package_file.write_bytes(data)
    x, y = digits.device_data(n, k_cli)
    npz = tmp_path / "dev-0003.npz"
    np.savez(npz, X=x, y=y)

    dep.start_combiners(2)
    ctl = dep.start_controller(evaluator=softmax_evaluator)
    pkg = ctl.add_package(data)
    dep.start_fleet(n - 1, partition_size=n, trainer_factory=package_trainer)
    region, dev = dep.regions[k_cli % 2], device_name(k_cli)
    cmd = [
        str(AGENT_SCRIPT),
        "--package", str(package_file),
        "--data-path", str(npz),
        "--broker-url", dep.url,
        "--project", dep.project,
        "--region", region,
        "--device-id", dev,
        "--seed", str(k_cli),
        "--log-level", "warning",
    ]  # fmt: skip
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as err:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=agent_env(), stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        records = run_package_session(
            ctl, pkg.digest, rounds=rounds, min_devices=n, train=train_settings("onnx", "softmax")
        )
        log = log_path.read_text(errors="replace")
        accs = completed_accuracies(records)
        assert len(accs) == rounds, (records, log)
        for rec in records:  # the command-line device trained every round
            assert devices_of(rec) == [device_name(i) for i in range(n)], log
        # it trained the package from its file: same SGD as the reference, to the last bit
        assert accs == pytest.approx(digits.reference_run(n, rounds), abs=1e-9)
        assert proc.poll() is None, f"edgefl-agent exited early: {log}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log_path.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert "Traceback" not in log_path.read_text(errors="replace")
    # a clean stop: the agent said offline before it left
    deadline = time.monotonic() + 5
    while ctl.presence.snapshot()["devices"].get(f"{region}/{dev}") != "offline":
        assert time.monotonic() < deadline, ctl.presence.snapshot()
        time.sleep(0.05)


def test_edgefl_agent_cli_refuses_tampered_package_file(
    softmax_package: ModelPackage, tmp_path: Path
) -> None:
    data = softmax_package.dumps()
    bad = tmp_path / "tampered.edgefl"
    bad.write_bytes(tamper(data, softmax_package, "train_step.onnx"))
    x, y = digits.device_data(4, 0)
    npz = tmp_path / "dev.npz"
    np.savez(npz, X=x, y=y)
    out = subprocess.run(
        [str(AGENT_SCRIPT), "--package", str(bad), "--data-path", str(npz),
         "--device-id", "d1", "--broker-url", "mqtt://127.0.0.1:1"],
        cwd=tmp_path, env=agent_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "edgefl-agent: file 'train_step.onnx' does not match its digest" in out.stderr
    assert "Traceback" not in out.stderr
