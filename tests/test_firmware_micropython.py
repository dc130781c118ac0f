"""The MicroPython device (firmware_examples/micropython) under CPython, in real sessions.

Debian's stable release has no MicroPython, so the device's own code (CBOR, SHA-256 via
hashlib, numpy's shuffle on big integers, pure-Python softmax training, chunking, resume)
runs under CPython with tests/umqtt_shim.py standing in for ``umqtt.simple``. Its shuffle is
numpy's, so a mixed fleet must reproduce the reference run like an all-Python one.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest

from edgefl.broker.mosquitto import MosquittoProcess
from edgefl.fleet.simulate import device_name
from edgefl.models.numpy_models import evaluate, train_epochs
from edgefl.protocol.tensors import dumps_tensors, loads_tensors
from edgefl.tasks import digits
from edgefl.transport import parse_broker_url
from tests import umqtt_shim
from tests.harness import Deployment, completed_accuracies

umqtt_shim.install()
_PATH = (
    Path(__file__).resolve().parents[1] / "firmware_examples" / "micropython" / "edgefl_device.py"
)
_spec = importlib.util.spec_from_file_location("edgefl_device", _PATH)
assert _spec is not None and _spec.loader is not None
mp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mp)


def test_cbor_codec_agrees_with_cbor2() -> None:
    value = {"v": 1, "s": "é", "neg": -70000, "big": 2**40, "f": 0.1, "b": b"\x00\xff" * 40,
             "l": [1, [2, {"x": None}], True, False]}  # fmt: skip
    assert mp.dumps(value) == cbor2.dumps(value)
    assert mp.loads(cbor2.dumps(value)) == value
    assert mp.loads(bytes.fromhex("f93e00")) == 1.5  # half
    assert mp.loads(bytes.fromhex("fa3fc00000")) == 1.5  # single
    with pytest.raises(ValueError):
        mp.loads(bytes.fromhex("5a00000010aa"))  # a byte string cut short


def test_tensor_and_chunk_layout_match_the_protocol_examples() -> None:
    """The worked example of protocol 6.4: a 19-byte tensor set in a 129-byte chunk."""
    payload = bytes.fromhex("a16162d82882810 2d85548 0000c03f000000c0".replace(" ", ""))
    model = cbor2.loads(payload)
    assert model["b"].tag == 40
    digest = bytes.fromhex("114fb1700560e8afb767944b39cfafedefb8e00a5b4aa9977a8070af28a19bcc")
    (_, chunk) = next(mp.chunks(payload, 1024, digest, "x1", "s1:1:0"))
    assert len(chunk) == 129 and cbor2.loads(chunk)["data"] == payload
    w = {"W": np.arange(6.0).reshape(3, 2) / 7, "b": np.array([0.5, -2.0])}
    W, b, d, k = mp.decode_model(dumps_tensors(w))
    assert (d, k) == (3, 2) and loads_tensors(mp.dumps(mp.encode_tensors(W, b)))["W"].tolist() == (
        w["W"].tolist()
    )


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_training_equals_numpy(mu: float) -> None:
    X, y = digits.device_data(10, 4)
    rng = np.random.default_rng(4)
    w = {"W": rng.normal(0, 0.1, (64, 10)), "b": rng.normal(0, 0.1, 10)}
    W, b = [list(r) for r in w["W"]], list(w["b"])
    mp.train(W, b, X.tolist(), y.tolist(), 4, 3, 0.1, 32, 1, mu)
    ref = train_epochs(w, X, y, round_=3, seed=4, mu=mu)
    assert np.abs(np.array(W) - ref["W"]).max() <= 1e-12
    assert np.abs(np.array(b) - ref["b"]).max() <= 1e-12
    loss, acc = mp.evaluate(W, b, X.tolist(), y.tolist())
    assert (
        acc == evaluate(ref, X, y)["accuracy"] and abs(loss - evaluate(ref, X, y)["loss"]) < 1e-12
    )
    assert (
        mp.PCG64([9, 20]).permutation(1437)
        == np.random.default_rng([9, 20]).permutation(1437).tolist()
    )


def test_micropython_devices_in_a_mixed_session(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    """2 MicroPython devices (1 KiB chunks) + 3 Python devices: every update is accepted and
    the run equals the single-process reference."""
    n, rounds = 5, 4
    dep = Deployment(mosquitto.url, tmp_path)
    addr = parse_broker_url(mosquitto.url)
    stop = threading.Event()
    devices: list[Any] = []
    threads: list[threading.Thread] = []
    try:
        dep.start_combiners(1)
        for k in range(2):
            X, y = digits.device_data(n, k)
            cfg = {"host": addr.host, "port": addr.port, "project": dep.project,
                   "region": dep.regions[0], "device": device_name(k), "seed": k,
                   "X": X.tolist(), "y": y.tolist(), "max_chunk": 1024}  # fmt: skip
            devices.append(mp.Device(cfg))
            threads.append(threading.Thread(target=devices[-1].run, args=(stop.is_set,)))
            threads[-1].start()
        dep.start_fleet(n - 2, partition_size=n, first_device=2)
        ctl = dep.controller()
        _, recs = dep.run_session(ctl, rounds=rounds, min_devices=n, round_timeout_s=30)
        accs = completed_accuracies(recs)
        assert accs == pytest.approx(digits.reference_run(n, rounds), abs=1e-9)
        assert accs[-1] > 0.7
        for rec in recs:
            assert {p["device"] for p in rec.participants} == {device_name(k) for k in range(n)}
            assert not rec.metrics.get("rejected")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        dep.close()
    assert [d.completed for d in devices] == [rounds, rounds]
    assert all(d.declined == 0 for d in devices)


def test_micropython_device_resumes_its_upload_across_a_broker_restart(tmp_path: Path) -> None:
    """Mosquitto (persistence on) restarts half-way through the device's round-1 upload: the
    device redials and resends from the first unacknowledged chunk under the same xfer, and its
    update counts."""
    n, rounds = 3, 2
    workdir = tmp_path / "broker"
    persist = f"persistence true\npersistence_location {workdir}/\nautosave_interval 1\n"
    broker = MosquittoProcess(workdir=workdir, config_extra=persist).start()
    dep = Deployment(broker.url, tmp_path)
    stop = threading.Event()
    X, y = digits.device_data(n, 0)
    cfg = {"host": broker.host, "port": broker.port, "project": dep.project,
           "region": "region-0", "device": device_name(0), "seed": 0, "X": X.tolist(),
           "y": y.tolist(), "max_chunk": 1024, "chunk_delay": 0.3}  # fmt: skip
    dev = mp.Device(cfg)
    thread = threading.Thread(target=dev.run, args=(stop.is_set,))
    try:
        dep.start_combiners(1)
        thread.start()
        dep.start_fleet(n - 1, partition_size=n, first_device=1)
        ctl = dep.controller()
        result: dict[str, Any] = {}
        runner = threading.Thread(
            target=lambda: result.update(
                recs=dep.run_session(ctl, rounds=rounds, min_devices=n, round_timeout_s=30)[1]
            ),
            daemon=True,
        )
        runner.start()
        end = time.monotonic() + 30
        while dev.upload is None or dev.upload[1] < 2:
            assert time.monotonic() < end, "the upload never started"
            time.sleep(0.02)
        xfer, sent = dev.upload
        broker.stop()
        broker.start()
        runner.join(90)
        assert not runner.is_alive(), "the session did not finish"
        accs = completed_accuracies(result["recs"])
        assert accs == pytest.approx(digits.reference_run(n, rounds), abs=1e-9)
        for rec in result["recs"]:
            assert device_name(0) in {p["device"] for p in rec.participants}
        assert dev.resumed >= 1 and dev.completed == rounds
        # the interrupted transfer went on (same xfer), from a chunk at or after the cut
        assert dev.resumed_at[0] == xfer and dev.resumed_at[1] >= sent
    finally:
        stop.set()
        thread.join(10)
        dep.close()
        broker.stop()
