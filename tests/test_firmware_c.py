"""The C device (firmware_examples/c) against numpy and inside real sessions.

The C client implements numpy's SeedSequence + PCG64 + permutation, so its shuffle is the
reference's bit for bit and a mixed fleet of C and Python devices must reproduce the
single-process reference run exactly, like an all-Python fleet. The build is checked with
-Wall -Wextra -Werror (the Makefile's flags); the broker-restart session runs the
AddressSanitizer/UBSan build, so a memory error on the reconnect and resume path fails it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import paho.mqtt.publish as publish
import pytest

from edgefl.broker.mosquitto import MosquittoProcess
from edgefl.fleet.simulate import device_name
from edgefl.models.numpy_models import evaluate, train_epochs
from edgefl.protocol.tensors import dumps_tensors, loads_tensors
from edgefl.tasks import digits
from edgefl.transport import parse_broker_url
from tests.harness import Deployment, completed_accuracies
from tests.test_tls import PASSWORD as TLS_PASSWORD
from tests.test_tls import (  # the shipped TLS config's broker and the fleet's CA
    _status_collector,
    _wait_status,
    _watcher,
    pki,  # noqa: F401
    tls_broker,  # noqa: F401
)

C_DIR = Path(__file__).resolve().parents[1] / "firmware_examples" / "c"
_spec = importlib.util.spec_from_file_location("digits_data", C_DIR / "tools" / "digits_data.py")
assert _spec is not None and _spec.loader is not None
digits_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits_data)


@pytest.fixture(scope="session")
def c_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the device and the check tool, plain and under ASan, with -Werror (a warning
    fails the build and so the suite)."""
    for tool in ("make", "cc", "pkg-config"):
        assert shutil.which(tool), f"{tool} is missing: run `make system-deps`"
    build = tmp_path_factory.mktemp("c-build")
    done = subprocess.run(
        ["make", "-C", str(C_DIR), f"BUILD={build}", "-j2", "all", "asan"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "-Werror" in done.stdout
    return build


class CDevice:
    """One C device process on the digits partition, logging to a file; ``stop`` sends
    SIGTERM (a clean goodbye) and returns the device's final JSON counters."""

    def __init__(
        self,
        binary: Path,
        url: str,
        project: str,
        region: str,
        k: int,
        n_devices: int,
        workdir: Path,
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = device_name(k)
        data = workdir / f"{self.name}.efld"
        digits_data.write_efld(data, *digits.device_data(n_devices, k))
        addr = parse_broker_url(url)
        self.log_path = workdir / f"{self.name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(binary), "--host", addr.host, "--port", str(addr.port), "--project", project,
             "--region", region, "--device", self.name, "--data", str(data), "--seed", str(k),
             *extra],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=20)
        self._log.close()
        assert self.proc.returncode == 0, (
            f"{self.name} exited {self.proc.returncode}:\n{self.log()}"
        )
        return dict(json.loads(out.decode().strip().splitlines()[-1]))


def _participants(rounds: list[Any]) -> list[set[str]]:
    return [{p["device"] for p in r.participants} for r in rounds if r.status == "completed"]


# ---- the training step against numpy --------------------------------------------------


@pytest.mark.parametrize(("seed", "round_", "n"), [(0, 1, 155), (3, 7, 220), (9, 20, 1437)])
def test_shuffle_is_numpys_permutation(c_build: Path, seed: int, round_: int, n: int) -> None:
    out = subprocess.run(
        [str(c_build / "train_check"), "perm", str(seed), str(round_), str(n)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [int(v) for v in out] == np.random.default_rng([seed, round_]).permutation(n).tolist()


@pytest.mark.parametrize(
    ("k", "round_", "lr", "batch", "epochs", "mu"),
    [(3, 5, 0.1, 32, 1, 0.0), (6, 2, 0.05, 16, 2, 0.0), (1, 4, 0.1, 32, 2, 0.5)],
)
def test_training_step_equals_numpy(
    c_build: Path,
    tmp_path: Path,
    k: int,
    round_: int,
    lr: float,
    batch: int,
    epochs: int,
    mu: float,
) -> None:
    """The C step equals numpy_models.train_epochs, FedProx's proximal term (mu) included."""
    X, y = digits.device_data(10, k)
    digits_data.write_efld(tmp_path / "d.efld", X, y)
    rng = np.random.default_rng(k)  # a non-zero start: every weight moves
    w = {"W": rng.normal(0, 0.1, (64, 10)), "b": rng.normal(0, 0.1, 10)}
    (tmp_path / "in.cbor").write_bytes(dumps_tensors(w))
    out = subprocess.run(
        [str(c_build / "train_check"), "train", str(tmp_path / "d.efld"),
         str(tmp_path / "in.cbor"), str(tmp_path / "out.cbor"), str(k), str(round_), str(lr),
         str(batch), str(epochs), str(mu)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    got = loads_tensors((tmp_path / "out.cbor").read_bytes())
    ref = train_epochs(
        w, X, y, round_=round_, seed=k, lr=lr, batch_size=batch, epochs=epochs, mu=mu
    )
    assert set(got) == {"W", "b"}
    for name in ref:
        assert got[name].dtype == np.float64 and got[name].shape == ref[name].shape
        assert float(np.abs(got[name] - ref[name]).max()) <= 1e-12
        assert float(np.abs(got[name] - w[name]).max()) > 1e-3  # it did train
    metrics = evaluate(ref, X, y)
    assert abs(float(out[0]) - metrics["loss"]) <= 1e-12
    assert float(out[1]) == metrics["accuracy"]


# ---- sessions on a real Mosquitto ------------------------------------------------------


def test_mixed_session_of_c_and_python_devices_reproduces_reference(
    c_build: Path, mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    """3 C devices + 7 Python devices on the 10-device partition, two regions: the per-round
    accuracies equal the single-process reference (the C shuffle is numpy's)."""
    n, rounds = 10, 20
    dep = Deployment(mosquitto.url, tmp_path)
    cdevs: list[CDevice] = []
    try:
        dep.start_combiners(2)
        cdevs = [
            CDevice(c_build / "edgefl-device", mosquitto.url, dep.project,
                    dep.regions[k % 2], k, n, tmp_path)
            for k in range(3)
        ]  # fmt: skip
        dep.start_fleet(n - 3, partition_size=n, first_device=3)
        ctl = dep.controller()
        _, recs = dep.run_session(ctl, rounds=rounds, min_devices=n, round_timeout_s=30)
        accs = completed_accuracies(recs)
        assert len(accs) == rounds
        assert accs == pytest.approx(digits.reference_run(n, rounds), abs=1e-9)
        assert abs(accs[-1] - 0.938889) <= 0.003  # the canonical N=10, R=20 figure
        for devices in _participants(recs):
            assert devices == {device_name(k) for k in range(n)}
    finally:
        stats = [d.stop() for d in cdevs]
        dep.close()
    assert [s["completed"] for s in stats] == [rounds] * 3
    assert all(s["failed"] == 0 and s["declined"] == 0 for s in stats)


def test_c_device_survives_broker_restart_mid_upload(c_build: Path, tmp_path: Path) -> None:
    """Mosquitto (persistence on) freezes and restarts while the C device (ASan build) is
    half-way through its round-1 upload: it reconnects with backoff, resends the chunks that
    were never acknowledged under the same xfer, and its update counts in round 1; the run
    equals the reference."""
    n, rounds = 3, 2
    workdir = tmp_path / "broker"
    persist = f"persistence true\npersistence_location {workdir}/\nautosave_interval 1\n"
    broker = MosquittoProcess(workdir=workdir, config_extra=persist).start()
    dep = Deployment(broker.url, tmp_path)
    asan_env = {
        "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=23",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=24",
        "PATH": "/usr/bin:/bin",
    }
    cdev: CDevice | None = None
    try:
        dep.start_combiners(1)
        # 1 KiB chunks, 0.3 s apart: the ~5.4 KB update takes ~2 s to go out
        cdev = CDevice(
            c_build / "asan" / "edgefl-device", broker.url, dep.project, dep.regions[0], 0, n,
            tmp_path, extra=["--max-chunk", "1024", "--chunk-delay-ms", "300", "--window", "2"],
            env=asan_env,
        )  # fmt: skip
        dep.start_fleet(n - 1, partition_size=n, first_device=1)
        ctl = dep.controller()
        result: dict[str, Any] = {}

        def run() -> None:
            result["recs"] = dep.run_session(ctl, rounds=rounds, min_devices=n, round_timeout_s=30)[
                1
            ]

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        end = time.monotonic() + 30
        while "upload" not in cdev.log() or " started: " not in cdev.log():
            assert time.monotonic() < end, cdev.log()
            time.sleep(0.05)
        time.sleep(0.4)  # a chunk or two acknowledged, the rest still to go
        # the broker freezes (the device's next chunks go out unacknowledged), then stops
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)
        time.sleep(1.0)
        broker.proc.send_signal(signal.SIGTERM)
        broker.proc.send_signal(signal.SIGCONT)
        broker.stop()
        broker.start()
        runner.join(90)
        assert not runner.is_alive(), "the session did not finish"
        recs = result["recs"]
        accs = completed_accuracies(recs)
        assert len(accs) == rounds
        assert accs == pytest.approx(digits.reference_run(n, rounds), abs=1e-9)
        assert all(device_name(0) in devices for devices in _participants(recs))
        log = cdev.log()
        started = log.split(" started: ")[0].rsplit("upload ", 1)[1]
        resumed = log.split(f"resuming upload {started}: ")[1].split("\n")[0]
        assert int(resumed.rsplit(" ", 1)[1]) >= 1, resumed  # in-flight chunks were resent
        assert f"upload {started} acknowledged" in log, log
    finally:
        stats = cdev.stop() if cdev is not None else {}
        dep.close()
        broker.stop()
    assert stats["completed"] == rounds and stats["resumed_uploads"] >= 1
    assert "AddressSanitizer" not in cdev.log() and "runtime error" not in cdev.log()


def test_c_device_drops_bad_tasks_and_declines_without_data(
    c_build: Path, mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    """Malformed tasks are logged and dropped (the device lives on); a task asking for update
    compression is declined; a device with no local data declines every task at once, so
    rounds close without waiting for their deadline."""
    n, rounds = 3, 3
    dep = Deployment(mosquitto.url, tmp_path)
    cdev: CDevice | None = None
    try:
        dep.start_combiners(1)
        digits_data.write_efld(tmp_path / "empty.efld", np.zeros((0, 64)), np.zeros(0))
        # the last --data wins: this device has no examples
        cdev = CDevice(c_build / "edgefl-device", mosquitto.url, dep.project, dep.regions[0], 0,
                       n, tmp_path, extra=["--data", str(tmp_path / "empty.efld")])  # fmt: skip
        end = time.monotonic() + 10
        while "connected to" not in cdev.log():
            assert time.monotonic() < end, cdev.log()
            time.sleep(0.05)
        task_topic = f"edgefl/v1/{dep.project}/{dep.regions[0]}/dev/{device_name(0)}/task"
        bad_task = cbor2.dumps({"v": 1, "type": "task", "task_id": "s:1:0", "session": "s",
                                "round": 1, "model_version": "m", "model_digest": b"\0" * 32,
                                "deadline": True, "train": {}, "chunk_size": 1024})  # fmt: skip
        compressed = cbor2.loads(bad_task) | {"deadline": time.time() + 60,
                                              "compression": {"encoding": "int8"}}  # fmt: skip
        for payload in (b"\xff\x00 not cbor", cbor2.dumps([1, 2]), bad_task,
                        cbor2.dumps(compressed)):  # fmt: skip
            publish.single(task_topic, payload, qos=1, hostname=mosquitto.host,
                           port=mosquitto.port)  # fmt: skip
        dep.start_fleet(n - 1, partition_size=n, first_device=1)
        ctl = dep.controller()
        t0 = time.monotonic()
        _, recs = dep.run_session(ctl, rounds=rounds, min_devices=n - 1, round_timeout_s=30)
        assert time.monotonic() - t0 < 20  # no round waited 30 s for the empty device
        accs = completed_accuracies(recs)
        assert accs == pytest.approx(digits.reference_run(n, rounds, devices=[1, 2]), abs=1e-9)
        for rec in recs:
            assert device_name(0) not in {p["device"] for p in rec.participants}
        assert cdev.log().count("ignoring bad task") == 3, cdev.log()
        # a task the device cannot do is declined with the reason (protocol 5a)
        assert "declining s:1:0: update compression 'int8' is not supported" in cdev.log()
    finally:
        stats = cdev.stop() if cdev is not None else {}
        dep.close()
    assert stats["declined"] == rounds + 1 and stats["completed"] == 0


@pytest.mark.parametrize("ca", ["fleet", "other", "fleet, wrong host name"])
def test_c_device_over_tls_verifies_the_broker(
    c_build: Path, request: pytest.FixtureRequest, tmp_path: Path, ca: str
) -> None:
    """On the shipped TLS config: with the fleet CA the device comes online (and says goodbye)
    over TLS; with another CA, or under a name the certificate does not carry (localhost), it
    refuses the broker and never connects."""
    certs: dict[str, Path] = request.getfixturevalue("pki")  # fixtures from tests/test_tls.py
    broker = request.getfixturevalue("tls_broker")
    watcher = _watcher(broker, certs["fleet"] / "ca.crt")
    seen = _status_collector(watcher)
    X, y = digits.device_data(10, 1)
    digits_data.write_efld(tmp_path / "d.efld", X, y)
    log_path = tmp_path / "dev.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(c_build / "edgefl-device"), "--host",
             "localhost" if "wrong host" in ca else "127.0.0.1", "--port",
             str(broker.port), "--region", "region-0", "--device", "dev-1", "--password",
             TLS_PASSWORD, "--ca-file", str(certs[ca.split(",")[0]] / "ca.crt"), "--data",
             str(tmp_path / "d.efld")],
            stdout=subprocess.PIPE, stderr=log,
        )  # fmt: skip
        try:
            if ca == "fleet":
                assert _wait_status(seen, "dev-1", "online")["region"] == "region-0"
            else:
                time.sleep(3)
                assert not [
                    s for s in seen if s.get("device") == "dev-1" and s["state"] == "online"
                ]
                assert "TLS" in log_path.read_text(), log_path.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=20)
    assert proc.returncode == 0, log_path.read_text()
    if ca == "fleet":
        _wait_status(seen, "dev-1", "offline")  # the clean goodbye crossed TLS too
    watcher.stop()
