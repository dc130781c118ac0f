"""Resident memory of one device agent, idle and while it trains; numpy and ONNX trainers.

The agent runs as shipped, ``python -m device_agent.cli`` (what ``edgefl-agent`` runs on a
Raspberry Pi), in a fresh process, first with the numpy trainer, then with the ONNX softmax
package of the digits task loaded at start (``--package FILE``, the same model as the numpy
trainer's). Its local data (one device's digits partition, as in the demo) is written by
this process to an .npz and handed over with ``--data-path``, so the agent process never
imports scikit-learn; the benchmark checks the agent's memory map for server-side libraries
to prove it.

1. idle: RSS a second after the agent is online on a private Mosquitto (with the ONNX package:
   onnxruntime imported and both sessions, train step and eval, built);
2. training: a combiner and a controller (SQLite store in a temporary folder) in this process
   drive a few real rounds (with the package: a package session, as the demo runs it); the
   agent's RSS is sampled every 5 ms (peak) and read again after;
3. one local epoch, ONNX against numpy, in this process: ``trainer.train`` (one epoch plus the
   train metrics, what a round asks of a device) on the same data and zero weights, calls
   interleaved, median of many; on the agent's partition and on the whole 1437-sample train
   split. The two must produce the same weights (the float64 package reproduces the numpy
   reference), and the agents' round accuracies must agree.

Same-run baseline: a bare ``python -c "import numpy, paho.mqtt.client, cbor2"`` process, the
floor for any agent built on the three dependencies; the ONNX agent is also set against the
numpy agent of the same run. Targets: idle RSS <= 40 MB (10^6 bytes) with the numpy trainer,
<= 64 MB with the ONNX trainer loaded. ``*_anon_mb``/``*_file_mb`` split an RSS into anonymous
memory and pages of mapped files (mostly shared-library code, shared with other processes and
reclaimable by the kernel).

The agent runs from a copy of ``edgefl/`` and ``device_agent/`` in a temporary folder, compiled
to bytecode first, as ``pip install`` leaves it on a device: this checkout may have no .pyc
files (PYTHONDONTWRITEBYTECODE is set on the build machines), and compiling the sources at
start-up would leave about 0.7 MB more in the agent's heap.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import MIB, REPO, RssSampler, broker, emit, log, mb, median, rss_bytes, setup_logging

PROJECT = "bench"
REGION = "region-0"
DEVICE = "dev-0000"
DEVICE_ONNX = "dev-onnx"  # same data and seed as DEVICE; its own MQTT session and status
ROUNDS = 5
TARGET_MB = 40.0
TARGET_ONNX_MB = 64.0
SETTLE_S = 1.0
EPOCH_REPS = 200  # timed epochs per trainer on the device partition (interleaved)
EPOCH_REPS_FULL = 30  # ... and on the whole train split
TRAIN = {"model": "softmax", "lr": 0.1, "batch_size": 32, "epochs": 1}
# shared objects that must not be in a device agent's memory map
SERVER_LIBS = ("sklearn", "scipy", "sqlalchemy", "pydantic_core", "fastapi", "uvicorn", "amqtt")
# device-side libraries an idle ONNX agent need not map (cryptography: only to check signatures)
OPTIONAL_LIBS = ("cryptography",)

BASELINE_CODE = (
    "import sys, numpy, paho.mqtt.client, cbor2; print('ready', flush=True); sys.stdin.read()"
)


def _env(path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = str(path)
    return env


def install_agent(dest: Path) -> Path:
    """Copy the agent's packages to ``dest`` and compile them, as an installed agent has them."""
    import compileall
    import shutil

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("edgefl", "device_agent"):
        shutil.copytree(REPO / pkg, dest / pkg, ignore=ignore)
    if not compileall.compile_dir(dest, quiet=1):
        raise RuntimeError(f"could not compile the agent's sources in {dest}")
    return dest


def _settled_rss(pid: int, n: int = 5, every_s: float = 0.05) -> int:
    samples = []
    for _ in range(n):
        samples.append(rss_bytes(pid))
        time.sleep(every_s)
    return int(median(samples))


def rss_split(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes, from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["RssAnon"], fields["RssFile"] + fields.get("RssShmem", 0)


def baseline_rss() -> int:
    proc = subprocess.Popen(
        [sys.executable, "-c", BASELINE_CODE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("baseline process failed")
        time.sleep(SETTLE_S)
        return _settled_rss(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(10)


def loaded_libs(pid: int, libs: tuple[str, ...] = SERVER_LIBS) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({lib for lib in libs if f"/{lib}/" in maps or f"/{lib}." in maps})


class Presence:
    """Watches an agent's retained status topic (online / offline) and its telemetry."""

    def __init__(self, url: str, device: str) -> None:
        from edgefl.protocol import Topics, decode
        from edgefl.transport import MqttConnection

        self.online = threading.Event()
        self.train_s: list[float] = []
        self._decode = decode
        topics = Topics(PROJECT)
        self.conn = MqttConnection(url, client_id=f"bench-watch-{device}", clean_session=True)
        self.conn.subscribe(topics.device(REGION, device, "status"), self._on_status)
        self.conn.subscribe(topics.device(REGION, device, "telemetry"), self._on_telemetry)
        self.conn.start()

    def _on_status(self, _topic: str, payload: bytes) -> None:
        if payload and self._decode(payload, "status")["state"] == "online":
            self.online.set()

    def _on_telemetry(self, _topic: str, payload: bytes) -> None:
        self.train_s.append(float(self._decode(payload, "telemetry")["metrics"]["train_s"]))

    def stop(self) -> None:
        self.conn.stop()


def drive_rounds(
    url: str, workdir: Path, session_id: str, package: Any = None, evaluator: Any = None
) -> list[float]:
    """A combiner and a controller run ROUNDS real rounds with the agent; returns accuracies.

    With ``package`` (a ModelPackage) the session trains that package, as the demo runs it.
    """
    from edgefl.combiner import Combiner, CombinerConfig
    from edgefl.controller import Controller, SessionConfig
    from edgefl.store import make_store
    from edgefl.store.blobs import FileBlobStore
    from edgefl.tasks import digits

    workdir.mkdir(parents=True, exist_ok=True)
    comb = Combiner(CombinerConfig(url, project=PROJECT, region=REGION)).start()
    store = make_store(f"sqlite:///{workdir / 'state.db'}")
    ctl = Controller(
        url,
        store,
        FileBlobStore(workdir / "models"),
        project=PROJECT,
        evaluator=evaluator or digits.evaluator,
    ).start()
    try:
        digest, initial = None, digits.initial_weights("softmax")
        if package is not None:
            digest, initial = ctl.add_package(package.dumps()).digest, None
        config = SessionConfig(
            session_id=session_id,
            rounds=ROUNDS,
            min_devices=1,
            round_timeout_s=30,
            train=dict(TRAIN),
            package=digest,
        )
        ctl.create_session(config, initial)
        ctl.run(config.session_id)
        rounds = [r for r in store.list_rounds(config.session_id) if r.status == "completed"]
        return [r.metrics["accuracy"] for r in rounds]
    finally:
        ctl.stop()
        comb.stop()
        store.close()


def measure_agent(
    url: str,
    site: Path,
    workdir: Path,
    data: Path,
    device: str,
    extra_args: list[str],
    package: Any = None,
    evaluator: Any = None,
) -> dict[str, Any]:
    """Start one agent process, measure it idle and through ROUNDS rounds, stop it."""
    presence = Presence(url, device)
    cmd = [
        sys.executable,
        "-m",
        "device_agent.cli",
        "--broker-url",
        url,
        "--project",
        PROJECT,
        "--region",
        REGION,
        "--device-id",
        device,
        "--data-path",
        str(data),
        "--seed",
        "0",
        "--log-level",
        "warning",
        *extra_args,
    ]
    t_start = time.perf_counter()
    agent = subprocess.Popen(cmd, env=_env(site), cwd=workdir)
    out: dict[str, Any] = {}
    try:
        if not presence.online.wait(60):
            raise TimeoutError(f"the agent {device} did not come online")
        out["startup_s"] = time.perf_counter() - t_start
        time.sleep(SETTLE_S)
        out["idle"] = _settled_rss(agent.pid)
        out["idle_anon"], out["idle_file"] = rss_split(agent.pid)
        out["optional_libs"] = loaded_libs(agent.pid, OPTIONAL_LIBS)
        sampler = RssSampler(agent.pid).start()
        t0 = time.perf_counter()
        out["accs"] = drive_rounds(url, workdir / device, f"bench-{device}", package, evaluator)
        out["elapsed"] = time.perf_counter() - t0
        out["peak"] = sampler.stop()
        time.sleep(0.5)
        out["after"] = _settled_rss(agent.pid)
        out["server_libs"] = loaded_libs(agent.pid)
        out["train_s"] = list(presence.train_s)
    finally:
        agent.send_signal(signal.SIGINT)
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(5)
        presence.stop()
    return out


def epoch_times(X: np.ndarray, y: np.ndarray, package: Any, reps: int) -> dict[str, Any]:
    """Median seconds of one local epoch (``trainer.train``), numpy and ONNX, interleaved."""
    from device_agent.trainers.base import TrainTask
    from device_agent.trainers.numpy_trainer import NumpyTrainer
    from device_agent.trainers.package_trainer import PackageTrainer
    from edgefl.tasks import digits

    ref = NumpyTrainer(X, y)
    onnx = PackageTrainer(X, y, threads=1)
    onnx.load_package(package)
    weights = digits.initial_weights("softmax")
    task = TrainTask(round=1, config=dict(TRAIN), seed=0, task_id="epoch")
    a, b = ref.train(weights, task), onnx.train(weights, task)  # warm-up, and the same result
    same = all(np.allclose(a.weights[k], b.weights[k], rtol=1e-9, atol=1e-12) for k in a.weights)
    t_ref, t_onnx = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        ref.train(weights, task)
        t1 = time.perf_counter()
        onnx.train(weights, task)
        t2 = time.perf_counter()
        t_ref.append(t1 - t0)
        t_onnx.append(t2 - t1)
    return {
        "samples": len(y),
        "numpy_ms": round(median(t_ref) * 1e3, 3),
        "onnx_ms": round(median(t_onnx) * 1e3, 3),
        "ratio": round(median(t_onnx) / median(t_ref), 3),
        "same_weights": same,
    }


def main() -> None:
    setup_logging()
    from edgefl.fleet.evaluation import package_evaluator
    from edgefl.tasks import digits, digits_packages

    with broker() as b, tempfile.TemporaryDirectory(prefix="edgefl-bench-agent-") as tmp:
        workdir = Path(tmp)
        site = install_agent(workdir / "site")
        base = baseline_rss()
        log(f"baseline (python + numpy + paho + cbor2): {mb(base)} MB")
        X, y = digits.device_data(20, 0)
        data = workdir / "local.npz"
        np.savez(data, X=X, y=y)

        ref = measure_agent(b.url, site, workdir, data, DEVICE, [])
        log(f"numpy agent idle after connect: {mb(ref['idle'])} MB")
        log(
            f"numpy agent during {len(ref['accs'])} rounds: peak {mb(ref['peak'])} MB, after "
            f"{mb(ref['after'])} MB ({ref['elapsed']:.1f} s, final accuracy {ref['accs'][-1]:.4f})"
        )

        package = digits_packages.build_digits_package("onnx", "softmax", workdir / "pkg")
        package_file = workdir / "digits-softmax.edgefl"
        package_file.write_bytes(package.dumps())
        evaluator = package_evaluator(package)
        onnx = measure_agent(
            b.url,
            site,
            workdir,
            data,
            DEVICE_ONNX,
            ["--package", str(package_file)],
            package=package,
            evaluator=evaluator,
        )
        log(
            f"onnx agent idle after connect: {mb(onnx['idle'])} MB (anon {mb(onnx['idle_anon'])}"
            f", files {mb(onnx['idle_file'])}; optional libs mapped: {onnx['optional_libs']})"
        )
        log(
            f"onnx agent during {len(onnx['accs'])} rounds: peak {mb(onnx['peak'])} MB, after "
            f"{mb(onnx['after'])} MB ({onnx['elapsed']:.1f} s, final accuracy "
            f"{onnx['accs'][-1]:.4f})"
        )

        d = digits.load()
        epoch = epoch_times(X, y, package, EPOCH_REPS)
        epoch_full = epoch_times(d.Xtr, d.ytr, package, EPOCH_REPS_FULL)
        for e in (epoch, epoch_full):
            log(
                f"one epoch on {e['samples']} samples: numpy {e['numpy_ms']} ms, "
                f"onnx {e['onnx_ms']} ms (x{e['ratio']}), same weights: {e['same_weights']}"
            )

    idle, peak, after, accs = ref["idle"], ref["peak"], ref["after"], ref["accs"]
    same_accuracy = len(onnx["accs"]) == len(accs) and all(
        abs(p - q) <= 1.5 / 360 for p, q in zip(onnx["accs"], accs)
    )
    onnx_met = (
        onnx["idle"] / 1e6 <= TARGET_ONNX_MB
        and len(onnx["accs"]) == ROUNDS
        and same_accuracy
        and epoch["same_weights"]
        and epoch_full["same_weights"]
    )
    emit(
        {
            "benchmark": "agent",
            "trainer": "numpy softmax (digits, 1 device partition of 20)",
            "idle_rss_mb": mb(idle),
            "idle_rss_mib": round(idle / MIB, 2),
            "training_peak_rss_mb": mb(peak),
            "after_training_rss_mb": mb(after),
            "rounds": len(accs),
            "baseline_bare_python_numpy_paho_cbor2_mb": mb(base),
            "idle_over_baseline_mb": mb(idle - base),
            "ratio": round(idle / base, 3),
            "server_libs_loaded": ref["server_libs"],
            "target": f"idle_rss_mb <= {TARGET_MB}",
            "target_met": idle / 1e6 <= TARGET_MB and len(accs) == ROUNDS,
            "idle_rss_anon_mb": mb(ref["idle_anon"]),
            "idle_rss_file_mb": mb(ref["idle_file"]),
            "train_s_median_in_agent": round(median(ref["train_s"]), 5),
            "onnx_trainer": "PackageTrainer + ONNX softmax package (float64), --package at start",
            "onnx_idle_rss_mb": mb(onnx["idle"]),
            "onnx_idle_rss_mib": round(onnx["idle"] / MIB, 2),
            "onnx_idle_rss_anon_mb": mb(onnx["idle_anon"]),
            "onnx_idle_rss_file_mb": mb(onnx["idle_file"]),
            "onnx_training_peak_rss_mb": mb(onnx["peak"]),
            "onnx_after_training_rss_mb": mb(onnx["after"]),
            "onnx_rounds": len(onnx["accs"]),
            "onnx_startup_s": round(onnx["startup_s"], 2),
            "onnx_train_s_median_in_agent": round(median(onnx["train_s"]), 5),
            "onnx_idle_over_numpy_mb": mb(onnx["idle"] - idle),
            "onnx_idle_ratio_vs_numpy": round(onnx["idle"] / idle, 3),
            "onnx_idle_ratio_vs_target": round(onnx["idle"] / 1e6 / TARGET_ONNX_MB, 3),
            "onnx_optional_libs_loaded": onnx["optional_libs"],
            "onnx_server_libs_loaded": onnx["server_libs"],
            "onnx_same_accuracy_as_numpy": same_accuracy,
            "epoch_device_samples": epoch["samples"],
            "epoch_device_numpy_ms": epoch["numpy_ms"],
            "epoch_device_onnx_ms": epoch["onnx_ms"],
            "epoch_device_ratio_onnx_vs_numpy": epoch["ratio"],
            "epoch_full_samples": epoch_full["samples"],
            "epoch_full_numpy_ms": epoch_full["numpy_ms"],
            "epoch_full_onnx_ms": epoch_full["onnx_ms"],
            "epoch_full_ratio_onnx_vs_numpy": epoch_full["ratio"],
            "epoch_same_weights": epoch["same_weights"] and epoch_full["same_weights"],
            "onnx_target": f"onnx_idle_rss_mb <= {TARGET_ONNX_MB}",
            "onnx_target_met": onnx_met,
        }
    )


if __name__ == "__main__":
    sys.exit(main())
