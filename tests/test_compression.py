"""Compressed updates: the codec's error bounds, exact folding, and digits sessions per codec.

The sessions run the demo's setup (20 devices on the non-IID partition, 2 regions, 20
rounds, softmax) on each real broker and compare accuracy and bytes per round between the
encodings, from the round records the controller stores.
"""

from __future__ import annotations

import json
import math
import threading

import cbor2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from device_agent.compressed_update import compressed_update
from edgefl.aggregation import WeightedSum
from edgefl.aggregation.compressed import add_global, check_update, fold_delta
from edgefl.aggregation.spec import UpdateRejected
from edgefl.protocol import decode, encode
from edgefl.protocol.chunking import split_payload
from edgefl.protocol.compression import (
    Dense,
    ErrorFeedback,
    Sparse,
    decode_delta,
    encode_delta,
    squared_norm,
    tensor_bytes,
    topk_count,
)
from edgefl.protocol.tensors import CodecError, encode_tensors, tensor_to_cbor
from edgefl.tasks import digits
from edgefl.telemetry import JsonLinesSink
from tests.harness import Deployment, RogueDevice

SPEC = {"W": ("float64", (6, 5)), "b": ("float64", (5,))}


def _wire(tensors: dict) -> object:
    """What the combiner sees: the encoded map after a CBOR round trip."""
    return cbor2.loads(cbor2.dumps(tensors))


def _dense(enc: object) -> np.ndarray:
    """A decoded delta as a dense float64 array (the reference for the fold)."""
    if isinstance(enc, Sparse):
        raise AssertionError("use _full for sparse")
    assert isinstance(enc, Dense)
    return enc.data.astype(np.float64) * enc.scale


def _full(enc: object, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(enc, Sparse):
        out = np.zeros(math.prod(shape))
        out[enc.index.astype(np.int64)] = enc.values
        return out.reshape(shape)
    return _dense(enc)


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, (6, 5), elements=finite))
def test_int8_and_float16_error_bounds(x: np.ndarray) -> None:
    spec = {"W": ("float64", (6, 5))}
    q = decode_delta(_wire(encode_delta({"W": x}, "int8")), "int8", spec)["W"]
    assert isinstance(q, Dense) and q.data.dtype == np.int8
    # round to nearest on a grid of step scale = max|x| / 127 (a float32)
    assert q.scale == pytest.approx(float(np.abs(x).max()) / 127, rel=1e-6, abs=1e-30)
    assert np.all(np.abs(_dense(q) - x) <= q.scale / 2 * (1 + 1e-6) + 1e-30)
    h = decode_delta(_wire(encode_delta({"W": x}, "float16")), "float16", spec)["W"]
    # float16 keeps 11 significant bits; below 2^-14 the absolute step is 2^-24
    assert np.all(np.abs(_dense(h) - x) <= np.abs(x) * 2.0**-11 + 2.0**-24)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float64, (3, 6, 5), elements=finite),
    st.sampled_from([0.01, 0.1, 0.5, 1.0]),
)
def test_topk_sends_largest_and_error_feedback_loses_nothing(
    deltas: np.ndarray, fraction: float
) -> None:
    """Each round sends the k largest of delta + residual; over rounds, what was sent plus
    what is left equals the sum of all deltas (error feedback drops nothing)."""
    spec = {"W": ("float64", (6, 5))}
    feedback = ErrorFeedback()
    sent = np.zeros((6, 5))
    for d in deltas:
        before = d + feedback.for_session("s").get("W", np.zeros(30)).reshape(6, 5)
        wire = encode_delta({"W": d}, "topk", topk_fraction=fraction, residual=feedback.residual)
        enc = decode_delta(_wire(wire), "topk", spec)["W"]
        assert isinstance(enc, Sparse)
        k = topk_count(30, fraction)
        assert enc.index.size == k
        kept = np.abs(before).reshape(-1)[enc.index.astype(np.int64)]
        assert kept.min() >= np.sort(np.abs(before).reshape(-1))[-k] - 1e-12
        sent += _full(enc, (6, 5))
    total = deltas.sum(axis=0)
    np.testing.assert_allclose(sent + feedback.residual["W"].reshape(6, 5), total, atol=1e-9)
    # a new session starts from zero
    assert feedback.for_session("other") == {}


def test_fold_equals_numpy_reference_and_mixed_regions_are_exact() -> None:
    """Deltas of every encoding folded blockwise into float64 sums equal the numpy sum of
    the decoded deltas; a region of plain weights and a region of deltas (plus W * global at
    the controller) merge into the exact weighted mean of g + delta."""
    rng = np.random.default_rng(3)
    g = {k: rng.normal(size=shape) for k, (_, shape) in SPEC.items()}
    plan = {"compression": {"encoding": "int8"}}
    deltas_region = WeightedSum(SPEC)
    reference = {k: np.zeros(shape) for k, (_, shape) in SPEC.items()}
    total_w = 0.0
    for i, encoding in enumerate(["float32", "float16", "int8", "topk", "int8"]):
        d = {k: rng.normal(scale=0.1, size=shape) for k, (_, shape) in SPEC.items()}
        msg = {"encoding": encoding, "tensors": _wire(encode_delta(d, encoding, residual={}))}
        delta = check_update(msg, SPEC, plan)
        assert delta is not None
        w = float(10 + i)
        assert fold_delta(deltas_region, delta, w, plan) == 1.0
        for k, (_, shape) in SPEC.items():
            reference[k] += w * (g[k] + _full(delta[k], shape))
        total_w += w
    plain_region = WeightedSum(SPEC)
    x = {k: rng.normal(size=shape) for k, (_, shape) in SPEC.items()}
    plain_region.fold(x, 7.0)
    for k in SPEC:
        reference[k] += 7.0 * x[k]
    total_w += 7.0
    merged = WeightedSum(SPEC)
    merged.merge(plain_region.sums, plain_region.weight, plain_region.count)
    merged.merge(deltas_region.sums, deltas_region.weight, deltas_region.count)
    add_global(merged, g, deltas_region.weight)
    mean = merged.mean()
    for k in SPEC:
        np.testing.assert_allclose(mean[k], reference[k] / total_w, rtol=1e-12, atol=1e-12)
    assert merged.count == 6


def test_dp_clipping_bounds_each_update() -> None:
    d = {"W": np.full((6, 5), 3.0), "b": np.full(5, -4.0)}
    plan = {"compression": {"encoding": "float32"}, "dp": {"clip_norm": 2.0}}
    delta = check_update(
        {"encoding": "float32", "tensors": _wire(encode_delta(d, "float32"))}, SPEC, plan
    )
    assert delta is not None
    norm = math.sqrt(squared_norm(delta))
    assert norm == pytest.approx(math.sqrt(30 * 9 + 5 * 16))
    acc = WeightedSum(SPEC)
    factor = fold_delta(acc, delta, 123.0, plan)
    assert factor == pytest.approx(2.0 / norm)
    folded = math.sqrt(sum(float((s**2).sum()) for s in acc.sums.values()))
    assert folded == pytest.approx(2.0)
    assert acc.weight == 1.0  # uniform weights under DP, whatever the example count


@pytest.mark.parametrize(
    ("encoding", "entry", "why"),
    [
        ("int8", {"q": tensor_to_cbor(np.zeros(5, np.int8)), "scale": float("nan")}, "scale"),
        ("int8", {"q": tensor_to_cbor(np.zeros(5, np.int16)), "scale": 1.0}, "dtype"),
        ("float16", tensor_to_cbor(np.zeros(4, np.float16)), "shape"),
        ("float16", tensor_to_cbor(np.full(5, np.inf, np.float16)), "NaN or infinite"),
        (
            "topk",
            {
                "idx": tensor_to_cbor(np.array([3, 1], np.uint32)),
                "val": tensor_to_cbor(np.ones(2, np.float32)),
            },
            "strictly increasing",
        ),
        (
            "topk",
            {
                "idx": tensor_to_cbor(np.array([1, 5], np.uint32)),
                "val": tensor_to_cbor(np.ones(2, np.float32)),
            },
            "below 5",
        ),
        ("zstd", tensor_to_cbor(np.zeros(5, np.float16)), "unknown update encoding"),
    ],
)
def test_bad_deltas_are_refused_with_a_reason(encoding: str, entry: object, why: str) -> None:
    spec = {"b": ("float64", (5,))}
    with pytest.raises(CodecError, match=why):
        decode_delta(_wire({"b": entry}), encoding, spec)


def test_kinds_of_update_must_match_the_round() -> None:
    plain = {"tensors": {}}
    with pytest.raises(UpdateRejected, match="plain weights"):
        check_update(plain, SPEC, {"compression": {"encoding": "int8"}})
    with pytest.raises(UpdateRejected, match="round of plain weights"):
        check_update({"encoding": "int8", "tensors": {}}, SPEC, {})
    assert check_update(plain, SPEC, {}) is None


def test_agent_declines_an_encoding_it_does_not_know() -> None:
    g = {"b": np.zeros(5)}
    task = {"compression": {"encoding": "zstd"}, "session": "s"}
    with pytest.raises(ValueError, match=r"compression 'zstd' is not supported.*int8"):
        compressed_update(task, g, g, ErrorFeedback())
    task = {"compression": {"encoding": "int8"}, "session": "s"}
    fields = {
        "task_id": "s:1:0",
        "device": "d",
        "model_version": "v",
        "num_examples": 3,
        "metrics": {},
    }
    payload = compressed_update(task, g, {"b": np.ones(5)}, ErrorFeedback(), **fields)
    msg = decode(payload.segments[0].tobytes(), "update")
    delta = decode_delta(msg["tensors"], msg["encoding"], {"b": ("float64", (5,))})
    np.testing.assert_allclose(_dense(delta["b"]), np.ones(5))
    assert tensor_bytes(delta) == 5


CODECS = ("none", "float32", "float16", "int8", "topk")


@pytest.mark.slow
def test_digits_sessions_per_codec(mosquitto, tmp_path) -> None:
    """The demo's task once per encoding: accuracy and bytes from the stored round records.

    On Mosquitto only: the encodings are the devices' and the combiners' business, the
    same on any broker (the refusal test below runs on both).
    """
    dep = Deployment(mosquitto.url, tmp_path)
    try:
        dep.start_combiners(2)
        dep.start_fleet(20)
        sink = JsonLinesSink(tmp_path / "telemetry.jsonl")
        ctl = dep.controller(sink=sink)
        runs = {}
        for codec in CODECS:
            _sid, rounds = dep.run_session(
                ctl,
                session_id=f"c-{codec}",
                rounds=20,
                min_devices=digits.devices_with_data(20),
                round_timeout_s=30,
                compression=codec,
                topk_fraction=0.1,
            )
            done = [r for r in rounds if r.status == "completed"]
            assert len(done) == 20, codec
            runs[codec] = {
                "acc": done[-1].metrics["accuracy"],
                "up": np.mean([r.metrics["bytes_up"] for r in done]),
                "tensor": np.mean([r.metrics["tensor_bytes_up"] for r in done]),
            }
        sink.close()
    finally:
        dep.close()
    fedavg, f32 = runs["none"], runs["float32"]
    # plain FedAvg is the reference run; float32 deltas of the float64 model match it
    assert fedavg["acc"] == pytest.approx(digits.reference_run(20, 20)[-1], abs=1e-9)
    assert abs(f32["acc"] - fedavg["acc"]) <= 1 / 360
    # float64 weights are twice the float32 deltas' tensor bytes
    assert fedavg["tensor"] == pytest.approx(2 * f32["tensor"])
    # float16: about half the bytes, the same accuracy to a test sample
    assert runs["float16"]["tensor"] == pytest.approx(0.5 * f32["tensor"])
    assert runs["float16"]["up"] <= 0.56 * f32["up"]
    assert abs(runs["float16"]["acc"] - f32["acc"]) <= 1 / 360
    # int8: within 1 point of float32 at <= 27% of its tensor bytes (the whole payload,
    # with the message's fixed ~220 bytes per update, is <= 33% on this 650-weight model)
    assert abs(runs["int8"]["acc"] - f32["acc"]) <= 0.01
    assert runs["int8"]["tensor"] <= 0.27 * f32["tensor"]
    assert runs["int8"]["up"] <= 0.33 * f32["up"]
    # top-k 10 % with error feedback: converges within 3 points of FedAvg
    assert runs["topk"]["acc"] >= fedavg["acc"] - 0.03
    assert runs["topk"]["tensor"] <= 0.21 * f32["tensor"]
    # the bytes reach the telemetry with every round point
    points = [json.loads(line) for line in sink.path.read_text().splitlines()]
    ups = [p["fields"]["bytes_up"] for p in points if p["m"] == "round"]
    assert len(ups) == 20 * len(CODECS) and all(u > 0 for u in ups)


def _old_agent(rogue: RogueDevice, task: dict) -> None:
    """A device that predates compression: it ignores the task's field and sends weights."""

    def send() -> None:
        payload = encode(
            "update",
            task_id=task["task_id"],
            device=rogue.device,
            model_version=task["model_version"],
            num_examples=50,
            metrics={},
            tensors=encode_tensors({"W": np.zeros((64, 10)), "b": np.zeros(10)}),
        )
        for chunk in split_payload(payload, 1 << 20, meta={"task_id": task["task_id"]}):
            rogue.publish_update(chunk.to_bytes())

    threading.Thread(target=send, daemon=True).start()


def test_weights_in_a_round_of_deltas_are_refused_with_the_reason(broker_url, tmp_path) -> None:
    dep = Deployment(broker_url, tmp_path)
    try:
        dep.start_combiners(1)
        dep.start_fleet(4)
        dep.own(RogueDevice(dep.url, dep.project, "region-0", "old-agent", "x", _old_agent))
        ctl = dep.controller()
        _sid, rounds = dep.run_session(
            ctl, session_id="mixed", rounds=2, min_devices=4, round_timeout_s=10, compression="int8"
        )
    finally:
        dep.close()
    done = [r for r in rounds if r.status == "completed"]
    assert len(done) == 2
    for rec in done:
        assert "old-agent" not in {p["device"] for p in rec.participants}
        assert len(rec.participants) == 4
        reasons = [r["reason"] for r in rec.rejected if r["device"] == "old-agent"]
        assert reasons and "folds compressed deltas (int8)" in reasons[0]
        assert "plain weights" in reasons[0]
    # the four genuine int8 updates still make the model FedAvg would (to int8 precision)
    reference = digits.reference_run(4, 2)
    assert [r.metrics["accuracy"] for r in done] == pytest.approx(reference, abs=0.02)
