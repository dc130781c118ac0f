"""Large models: multi-chunk sessions stay exact, and the streaming pieces behind them.

A session whose model spans hundreds of chunks must produce, bit for bit, the weighted mean
of what the devices sent, on both brokers: reassembly into spill files, zero-copy decoding,
one-tensor-at-a-time folding and merging, streamed partials and windowed uploads all sit on
that path. The transport's windowed publishing (``publish_stream``) and the protocol's
segment-based encoder (``Payload``, ``ChunkWriter``) and zero-copy decoder (``cborview``)
are checked on their own too.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest

from device_agent.trainers.base import CallableTrainer, TrainResult, TrainTask
from edgefl.controller import SessionConfig
from edgefl.protocol import decode, encode
from edgefl.protocol.cborview import loads_view
from edgefl.protocol.chunking import (
    Chunk,
    ChunkWriter,
    Payload,
    Reassembler,
    release_array,
    split_payload,
)
from edgefl.protocol.messages import encode_payload
from edgefl.protocol.tensors import decode_tensors, dumps_tensors, encode_tensors, loads_tensors
from edgefl.transport import MqttConnection
from tests.brokers import Probe
from tests.harness import Deployment

N_DEVICES = 3
ROUNDS = 2


def _model() -> dict[str, np.ndarray]:
    """~3 MB of float32 in three tensors (one of them a scalar-like tail)."""
    rng = np.random.default_rng(7)
    return {
        "dense": rng.standard_normal((700, 1000)).astype(np.float32),
        "bias": rng.standard_normal(50_000).astype(np.float32),
        "tail": rng.standard_normal((3, 5)).astype(np.float32),
    }


def _delta(k: int) -> np.float32:
    return np.float32((k + 1) / 256)  # exact in float32


def _expected(initial: dict[str, np.ndarray], rounds: int) -> dict[str, np.ndarray]:
    """FedAvg as the controller computes it: float64 sums of n_k * update_k, / sum n_k."""
    weights = initial
    for _ in range(rounds):
        total = sum(k + 1 for k in range(N_DEVICES))
        mean = {}
        for name, w in weights.items():
            acc = np.zeros(w.shape, dtype=np.float64)
            for k in range(N_DEVICES):
                acc += float(k + 1) * (w + _delta(k)).astype(np.float64)
            mean[name] = (acc / float(total)).astype(np.float32)
        weights = mean
    return weights


def _trainer_factory(k: int, _x: Any, _y: Any) -> CallableTrainer:
    def train(weights: dict[str, np.ndarray], _task: TrainTask) -> TrainResult:
        return TrainResult({n: w + _delta(k) for n, w in weights.items()}, k + 1, {})

    return CallableTrainer(train)


@pytest.mark.slow
def test_multi_chunk_session_is_exact(broker_url: str, tmp_path: Path) -> None:
    """3 MB model in 16 KiB chunks (~190 per transfer), updates spilled to files: exact."""
    dep = Deployment(broker_url, tmp_path)
    try:
        # 1 MiB spill threshold: every update is reassembled in a file and read mapped
        dep.start_combiners(1, spill_above_bytes=1024 * 1024, partial_chunk_size=32 * 1024)
        dep.start_fleet(N_DEVICES, trainer_factory=_trainer_factory)
        ctl = dep.start_controller()
        initial = _model()
        config = SessionConfig(
            session_id="large",
            rounds=ROUNDS,
            min_devices=N_DEVICES,
            round_timeout_s=60,
            chunk_size=16 * 1024,
        )
        ctl.create_session(config, initial)
        ctl.run(config.session_id)
        rounds = ctl.store.list_rounds(config.session_id)
        assert [r.status for r in rounds] == ["completed"] * ROUNDS
        assert all(len(r.participants) == N_DEVICES for r in rounds)
        final, _ = ctl.models.load(ctl.store.get_session(config.session_id).model_version)
        expected = _expected(initial, ROUNDS)
        assert set(final) == set(expected)
        for name in expected:
            assert final[name].dtype == np.float32
            assert np.array_equal(final[name], expected[name]), name
        comb = dep.combiners[0]
        assert comb.stats["accepted"] == N_DEVICES * ROUNDS and comb.stats["rejected"] == 0
    finally:
        dep.close()


# protocol: segments, chunk messages, zero-copy decoding ------------------------------------
def test_segmented_encoding_is_byte_identical() -> None:
    """``encode_payload``/``ChunkWriter`` give exactly ``encode``/``split_payload``'s bytes."""
    w = {**_model(), "i": np.arange(7, dtype=np.int16), "e": np.zeros((0, 3), np.float64)}
    fields: dict[str, Any] = {
        "task_id": "s:1:0",
        "device": "d",
        "model_version": "v",
        "num_examples": 5,
        "metrics": {"a": 1.0},
    }
    plain = encode("update", **fields, tensors=encode_tensors(w))
    streamed = encode_payload("update", "tensors", w, **fields)
    assert streamed.size == len(plain) and streamed.tobytes() == plain
    assert dumps_tensors(w) == cbor2.dumps(encode_tensors(w))
    for csz in (1024, 5000, 1 << 20):
        old = [c.to_bytes() for c in split_payload(plain, csz, "x1", {"task_id": "s:1:0"})]
        new = list(ChunkWriter(streamed, csz, "x1", {"task_id": "s:1:0"}))
        assert new == old
    # the protocol's worked example (docs/protocol.md 6.4), from a segmented payload
    example = Payload([b"\xa1ab", b"\xd8(\x82\x81\x02\xd8UH", b"\x00\x00\xc0?\x00\x00\x00\xc0"])
    one = ChunkWriter(example, 1024, "x1", {"task_id": "s1:1:0"}).message(0)
    assert len(one) == 129
    assert (
        one
        == Chunk(
            "x1", 0, 1, 19, 1024, example.digest(), example.tobytes(), {"task_id": "s1:1:0"}
        ).to_bytes()
    )


def test_payload_slices_cross_segments() -> None:
    p = Payload([b"abc", b"", b"defgh", b"ij"])
    assert p.size == 10
    for start in range(11):
        for length in range(11 - start):
            got = b"".join(bytes(v) for v in p.slices(start, length))
            assert got == b"abcdefghij"[start : start + length]


@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, -2, 2**40, -(2**63), 1.5, True, None, "x" * 30, b"y" * 5000]},
        cbor2.CBORTag(40, [[2], cbor2.CBORTag(85, b"\0" * 8)]),
        [[[[]]], {}, {"k": {"n": 0.1}}],
    ],
)
def test_loads_view_matches_cbor2(value: Any) -> None:
    data = cbor2.dumps(value)
    got = loads_view(data)
    want = cbor2.loads(data)

    def plain(v: Any) -> Any:
        if isinstance(v, memoryview):
            return v.tobytes()
        if isinstance(v, cbor2.CBORTag):
            return (v.tag, plain(v.value))
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    assert plain(got) == plain(want)


def test_loads_view_defers_to_cbor2_outside_its_subset() -> None:
    """Indefinite lengths, other tags, trailing bytes and junk: exactly cbor2's answer."""
    indefinite = b"\x9f\x01\x02\xff"  # [_ 1, 2]
    assert loads_view(indefinite) == cbor2.loads(indefinite) == [1, 2]
    dated = cbor2.dumps(cbor2.CBORTag(1, 0))
    assert loads_view(dated) == cbor2.loads(dated)
    assert loads_view(b"\x01\x02") == cbor2.loads(b"\x01\x02") == 1  # trailing bytes ignored
    for junk in (b"\x5a\xff\xff\xff\xff", b"\x7f", b"\xa1", b"\x62\xff\xfe"):
        with pytest.raises(Exception) as mine:
            loads_view(junk)
        with pytest.raises(Exception) as theirs:
            cbor2.loads(junk)
        assert type(mine.value) is type(theirs.value)


def test_large_byte_strings_are_views_and_tensors_read_only() -> None:
    w = _model()
    blob = dumps_tensors(w)
    value = loads_view(blob)
    assert isinstance(value["dense"].value[1].value, memoryview)
    back = loads_tensors(bytearray(blob))
    for name in w:
        assert np.array_equal(back[name], w[name])
        assert not back[name].flags.writeable
    msg = decode(
        encode(
            "update",
            task_id="t",
            device="d",
            model_version="v",
            num_examples=1,
            metrics={},
            tensors=encode_tensors(w),
        ),
        "update",
    )
    assert isinstance(msg["tensors"]["bias"].value[1].value, memoryview)


@pytest.mark.parametrize("spill_above", [None, 64 * 1024])
def test_zero_copy_reassembly_in_memory_and_spilled(spill_above: int | None) -> None:
    """Out-of-order chunks into memory or a spill file; the payload is a view (of a mapping
    when spilled) and stays intact after its pages are released."""
    w = _model()
    payload = encode_payload(
        "update",
        "tensors",
        w,
        task_id="t",
        device="d",
        model_version="v",
        num_examples=1,
        metrics={},
    )
    reasm = Reassembler(zero_copy=True, spill_above=spill_above)
    got = None
    messages = list(ChunkWriter(payload, 64 * 1024, meta={"task_id": "t"}))
    for m in messages[1::2] + messages[::2]:
        got = reasm.feed("dev", m) or got
    assert got is not None and isinstance(got.payload, memoryview)
    # a spill file is mapped read-only; memory is the reassembly bytearray itself
    kind = "mmap" if spill_above is not None else "bytearray"
    assert type(got.payload.obj).__name__ == kind
    assert reasm.memory_bytes == 0 and reasm.spill_files == 0
    tensors = decode_tensors(decode(got.payload, "update")["tensors"])
    for name, arr in tensors.items():
        release_array(arr)  # pages go; the data comes back from the page cache on reading
        assert np.array_equal(arr, w[name])


# transport: windowed QoS 1 publishing ----------------------------------------------------------
def test_publish_stream_keeps_a_window_and_delivers_in_order(broker_url: str) -> None:
    """At most ``window`` messages are made ahead of the PUBACKs; all arrive, in order."""
    conn = MqttConnection(broker_url, client_id="stream-sender", clean_session=True).start()
    n, window = 60, 4
    made: list[int] = []
    lock = threading.Lock()
    ahead: list[int] = []

    def make(i: int) -> tuple[str, bytes]:
        with lock:
            made.append(i)
            ahead.append(len(made) - stream_ref[0].acked if stream_ref else len(made))
        return "streamtest/x", i.to_bytes(4, "big") + bytes(200_000)  # large: view packets

    stream_ref: list[Any] = []
    try:
        with Probe(broker_url) as probe:
            probe.connect()
            probe.subscribe("streamtest/x")
            stream = conn.publish_stream(range(n), make, window=window)
            stream_ref.append(stream)
            assert stream.wait(30)
            assert stream.finished and stream.acked == n and stream.unacked() == []
            assert stream.sent_bytes == n * 200_004
            assert made == list(range(n))
            assert max(ahead) <= window + 1  # +1: the message being made
            got = probe.wait_messages(n, timeout=30)
            assert [int.from_bytes(m.payload[:4], "big") for m in got] == list(range(n))
            assert all(len(m.payload) == 200_004 for m in got)
    finally:
        conn.stop()


def test_publish_stream_is_lazy_and_reports_errors(broker_url: str) -> None:
    """Before any PUBACK (not even connected yet) only one window is made; the rest follow
    the acknowledgements; a failing ``make`` ends the stream and ``wait`` raises it."""
    conn = MqttConnection(broker_url, client_id="stream-lazy", clean_session=True)
    calls: list[int] = []

    def make(i: int) -> tuple[str, bytes]:
        calls.append(i)
        if i == 5:
            raise ValueError("cannot make message 5")
        return "streamtest/lazy", b"m" * 100_000

    try:
        stream = conn.publish_stream(range(10), make, window=3)
        assert calls == [0, 1, 2] and not stream.finished  # queued by paho, unacknowledged
        conn.start()  # paho sends what it queued; each PUBACK makes the next message
        with pytest.raises(ValueError, match="message 5"):
            stream.wait(30)
        assert calls == [0, 1, 2, 3, 4, 5]
        assert stream.unacked()[-5:] == [5, 6, 7, 8, 9]
        empty = conn.publish_stream([], make)
        assert empty.wait(1)
    finally:
        conn.stop()


def test_released_spill_files_are_reused_and_stay_correct() -> None:
    """A released spill file takes the next large transfer; its bytes are the new ones."""
    reasm = Reassembler(zero_copy=True, spill_above=1024)
    payloads = [bytes([k]) * 300_000 + bytes(range(256)) for k in range(3)]
    for k, data in enumerate(payloads):
        got = None
        for m in ChunkWriter(Payload([data]), 64 * 1024, meta={"k": k}):
            got = reasm.feed("dev", m) or got
        assert got is not None and got.release is not None
        assert bytes(got.payload) == data
        got.release()
        assert len(reasm._spill_pool) == 1  # the same file, each time
