"""Goodput of model updates through Mosquitto into a real combiner, vs raw paho.

edgefl side: 2 publisher processes act as devices. Each encodes a ~1M-parameter float32 update
(4 MB) the way the device agent does (encode_tensors, an ``update`` message, split_payload into
256 KiB chunks) and publishes the chunks with QoS 1 through MqttConnection, once per simulated
device id. A real Combiner in the parent process reassembles, checks the digest, decodes,
validates and folds every update into its WeightedSum. Goodput = update bytes delivered *and
folded* per second, from the start signal to the last fold.

Baseline, same run, same broker: raw paho publishers in the same 2 processes send the same total
bytes in the same 256 KiB message sizes with QoS 1 to a raw paho subscriber that only counts
bytes. Both sides use MQTT 3.1.1, TCP_NODELAY and 64 in-flight messages (MqttConnection's
setting). Trials alternate raw / edgefl, so each pair sees the same background load; the
headline ratio is the median of the paired ratios. Target: goodput >= 90% of raw.

Also reported, to explain the ratio: CPU milliseconds per MiB spent by the receiver, the broker
and the publishers in each mode, and the cost of each step of the combiner's accept path
measured in-process without a broker.

The update is encoded once per trial before the start signal (a device encodes its update
before uploading; on this 2-core machine, encoding inside the timed window would only measure
the publishers competing with the combiner and the broker for the same cores). The per-update
encode and split cost is reported separately.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import socket
import sys
import threading
import time

from _common import (
    MIB,
    RoundOpener,
    broker,
    emit,
    encode_update,
    log,
    median,
    model_bytes,
    model_weights,
    setup_logging,
)

PROJECT = "bench"
REGION = "region-0"
MODEL_VERSION = "bench-v1"
N_PUBLISHERS = 2
UPDATES_PER_PUBLISHER = 32  # per trial: 64 updates of 4 MB = 256 MB
TRIALS = 5
INFLIGHT = 64  # MqttConnection's max_inflight, used for the raw clients too
TARGET = 0.90
TIMEOUT_S = 120.0


def _raw_client(url: str, client_id: str):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefl.transport import parse_broker_url

    addr = parse_broker_url(url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    client.max_inflight_messages_set(INFLIGHT)
    client.max_queued_messages_set(0)
    connected = threading.Event()

    def on_connect(c, _u, _f, rc, _p=None) -> None:
        c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connected.set()

    client.on_connect = on_connect
    client.connect(addr.host, addr.port)
    client.loop_start()
    if not connected.wait(10):
        raise ConnectionError(f"{client_id}: no CONNACK from {url}")
    return client


# publisher processes ---------------------------------------------------------------------
def publisher(idx: int, url: str, pipe) -> None:
    """Runs in a child process: prepares a trial on command, publishes it on 'go'."""
    setup_logging()
    from edgefl.protocol import Topics
    from edgefl.protocol.chunking import DEFAULT_CHUNK_SIZE, split_payload
    from edgefl.transport import MqttConnection

    topics = Topics(PROJECT)
    weights = model_weights(seed=idx)
    conn = MqttConnection(url, client_id=f"bench-pub-{idx}", clean_session=True).start()
    raw = _raw_client(url, f"bench-raw-pub-{idx}")
    raw_payload = b""
    try:
        while True:
            cmd = pipe.recv()
            if cmd[0] == "stop":
                return
            kind, arg, devices = cmd
            prep: dict[str, float] = {}
            if kind == "edgefl":
                # each device's update names its sender, as the combiner checks: one
                # encoding per device, all before the clock starts
                jobs, enc_s, split_s = [], 0.0, 0.0
                for d in devices:
                    t0 = time.perf_counter()
                    update = encode_update(weights, arg, MODEL_VERSION, 100 + idx, d)
                    t1 = time.perf_counter()
                    msgs = [
                        c.to_bytes()
                        for c in split_payload(update, DEFAULT_CHUNK_SIZE, meta={"task_id": arg})
                    ]
                    enc_s, split_s = enc_s + t1 - t0, split_s + time.perf_counter() - t1
                    jobs.append((topics.device(REGION, d, "update"), msgs))
                n = max(1, len(devices))
                prep = {"encode_ms": enc_s / n * 1e3, "split_ms": split_s / n * 1e3}
                publish = conn.publish
            else:  # arg: the size of one update, sent as the same number of raw messages
                if len(raw_payload) != int(arg):
                    raw_payload = os.urandom(int(arg))
                view = memoryview(raw_payload)
                step = DEFAULT_CHUNK_SIZE
                msgs = [bytes(view[s : s + step]) for s in range(0, len(raw_payload), step)]
                jobs = [(f"bench/raw/{idx}", msgs) for _ in devices]
                publish = raw.publish
            pipe.send(("ready", prep))
            pipe.recv()  # go
            t0 = time.perf_counter()
            infos = [publish(topic, m, qos=1) for topic, ms in jobs for m in ms]
            for info in infos:
                info.wait_for_publish(TIMEOUT_S)
            pipe.send(("done", time.perf_counter() - t0))
    finally:
        conn.stop()
        raw.disconnect()
        raw.loop_stop()


class Publishers:
    def __init__(self, url: str) -> None:
        ctx = mp.get_context("spawn")
        self.pipes = []
        self.procs = []
        for i in range(N_PUBLISHERS):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=publisher, args=(i, url, child), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)

    def prepare(self, kind: str, arg: str, devices: list[list[str]]) -> list[dict]:
        for pipe, devs in zip(self.pipes, devices, strict=True):
            pipe.send((kind, arg, devs))
        return [self._expect(pipe, "ready") for pipe in self.pipes]

    def go(self) -> None:
        for pipe in self.pipes:
            pipe.send(("go",))

    def wait_done(self) -> list[float]:
        return [self._expect(pipe, "done") for pipe in self.pipes]

    @staticmethod
    def _expect(pipe, what: str):
        if not pipe.poll(TIMEOUT_S):
            raise TimeoutError(f"publisher did not answer {what!r}")
        tag, value = pipe.recv()
        assert tag == what, (tag, what)
        return value

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()


# the two receivers -----------------------------------------------------------------------
class RawCounter:
    def __init__(self, url: str) -> None:
        self.bytes = 0
        self.expected = math.inf
        self.done = threading.Event()
        self.client = _raw_client(url, "bench-raw-sub")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.subscribe("bench/raw/#", qos=1)
        if not subscribed.wait(10):
            raise TimeoutError("raw subscriber: no SUBACK")

    def _on_message(self, _c, _u, msg) -> None:
        self.bytes += len(msg.payload)
        if self.bytes >= self.expected:
            self.done.set()

    def arm(self, expected: int) -> None:
        self.bytes = 0
        self.expected = expected
        self.done.clear()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class CpuMeter:
    """CPU seconds (user + system) used by the receiver, the broker and the publishers."""

    def __init__(self, broker_pid: int, publisher_pids: list[int]) -> None:
        import psutil

        self.procs = {
            "receiver": [psutil.Process()],
            "broker": [psutil.Process(broker_pid)],
            "publishers": [psutil.Process(pid) for pid in publisher_pids],
        }
        self._t0: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {
            k: sum(p.cpu_times().user + p.cpu_times().system for p in ps)
            for k, ps in self.procs.items()
        }

    def start(self) -> None:
        self._t0 = self._now()

    def stop(self) -> dict[str, float]:
        return {k: v - self._t0[k] for k, v in self._now().items()}


def run_edgefl_trial(trial: int, comb, opener: RoundOpener, pubs: Publishers, weights, cpu) -> dict:
    task_id = f"bench-transport:{trial}"
    devices = [
        [f"p{i}-dev-{j:03d}" for j in range(UPDATES_PER_PUBLISHER)] for i in range(N_PUBLISHERS)
    ]
    flat = [d for devs in devices for d in devs]
    opener.open_round(task_id, MODEL_VERSION, flat, weights, 256 * 1024, TIMEOUT_S)
    prep = pubs.prepare("edgefl", task_id, devices)
    accepted0, rejected0, partials0 = (comb.stats[k] for k in ("accepted", "rejected", "partials"))
    cpu.start()
    t0 = time.perf_counter()
    pubs.go()
    end = time.monotonic() + TIMEOUT_S
    while comb.stats["accepted"] - accepted0 < len(flat):
        if comb.stats["rejected"] != rejected0:
            raise RuntimeError("the combiner rejected an update; see the log above")
        if time.monotonic() > end:
            raise TimeoutError(
                f"only {comb.stats['accepted'] - accepted0} of {len(flat)} updates folded"
            )
        time.sleep(0.001)
    elapsed = time.perf_counter() - t0
    cpu_s = cpu.stop()
    pub_s = pubs.wait_done()
    while comb.stats["partials"] == partials0:  # let the partial go out before the next trial
        time.sleep(0.01)
    return {"elapsed": elapsed, "prep": prep, "publish_s": pub_s, "cpu_s": cpu_s}


def run_raw_trial(counter: RawCounter, pubs: Publishers, update_len: int, cpu: CpuMeter) -> dict:
    devices = [[str(j) for j in range(UPDATES_PER_PUBLISHER)] for _ in range(N_PUBLISHERS)]
    total = update_len * UPDATES_PER_PUBLISHER * N_PUBLISHERS
    counter.arm(total)
    pubs.prepare("raw", str(update_len), devices)
    cpu.start()
    t0 = time.perf_counter()
    pubs.go()
    if not counter.done.wait(TIMEOUT_S):
        raise TimeoutError(f"raw subscriber got {counter.bytes} of {total} bytes")
    elapsed = time.perf_counter() - t0
    cpu_s = cpu.stop()
    pub_s = pubs.wait_done()
    return {"elapsed": elapsed, "publish_s": pub_s, "bytes": counter.bytes, "cpu_s": cpu_s}


def stage_costs(weights: dict, n: int = 16) -> dict[str, float]:
    """Where the combiner's time goes: ms per update for each step of its accept path, run
    in-process without a broker (the public pieces the combiner is built from)."""
    import hashlib

    from edgefl.aggregation import WeightedSum, spec_of, validate_update
    from edgefl.protocol import Reassembler, decode
    from edgefl.protocol.chunking import DEFAULT_CHUNK_SIZE, split_payload
    from edgefl.protocol.tensors import decode_tensors

    update = encode_update(weights, "bench-transport:stages", MODEL_VERSION, 100, "dev-0000")
    msgs = [c.to_bytes() for c in split_payload(update, DEFAULT_CHUNK_SIZE)]
    reasm = Reassembler()
    spec = spec_of(weights)
    acc = WeightedSum(spec)
    t = dict.fromkeys(("reassemble", "sha256_part", "decode", "validate", "fold"), 0.0)
    for i in range(n):
        t0 = time.perf_counter()
        done = None
        for m in msgs:
            done = reasm.feed(f"dev-{i}", m) or done
        t1 = time.perf_counter()
        hashlib.sha256(done.payload).digest()
        t2 = time.perf_counter()
        tensors = decode_tensors(decode(done.payload, "update")["tensors"])
        t3 = time.perf_counter()
        validate_update(tensors, spec)
        t4 = time.perf_counter()
        acc.fold(tensors, 100.0)
        t5 = time.perf_counter()
        for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            t[k] += v
    out = {k: round(v / n * 1e3, 2) for k, v in t.items()}
    out["total"] = round(sum(v for k, v in out.items() if k != "sha256_part"), 2)
    return out


def _per_mib(samples: list[dict[str, float]], nbytes: int) -> dict[str, float]:
    return {k: round(median([s[k] for s in samples]) * 1e3 / (nbytes / MIB), 3) for k in samples[0]}


def main() -> None:
    setup_logging()
    from edgefl.combiner import Combiner, CombinerConfig

    weights = model_weights()
    update_len = len(encode_update(weights, "bench-transport:0", MODEL_VERSION, 100, "dev-0000"))
    n_updates = UPDATES_PER_PUBLISHER * N_PUBLISHERS
    total = update_len * n_updates
    log(f"model {model_bytes(weights)} B, update message {update_len} B, {n_updates} updates/trial")
    with broker() as b:
        comb = Combiner(CombinerConfig(b.url, project=PROJECT, region=REGION)).start()
        opener = RoundOpener(b.url, "bench-ctl", PROJECT, REGION)
        counter = RawCounter(b.url)
        pubs = Publishers(b.url)
        cpu = CpuMeter(b.proc.pid, [p.pid for p in pubs.procs])
        raw_cpu: list[dict] = []
        edge_cpu: list[dict] = []
        raw_mibs: list[float] = []
        edge_mibs: list[float] = []
        prep: list[dict] = []
        try:
            for t in range(TRIALS):
                r = run_raw_trial(counter, pubs, update_len, cpu)
                raw_mibs.append(r["bytes"] / r["elapsed"] / MIB)
                raw_cpu.append(r["cpu_s"])
                log(
                    f"trial {t + 1}/{TRIALS} raw:    {raw_mibs[-1]:7.1f} MiB/s"
                    f" ({r['elapsed']:.2f} s)"
                )
                e = run_edgefl_trial(t, comb, opener, pubs, weights, cpu)
                edge_mibs.append(total / e["elapsed"] / MIB)
                edge_cpu.append(e["cpu_s"])
                prep += e["prep"]
                log(
                    f"trial {t + 1}/{TRIALS} edgefl: {edge_mibs[-1]:7.1f} MiB/s"
                    f" ({e['elapsed']:.2f} s; publishers done after"
                    f" {max(e['publish_s']):.2f} s)"
                )
        finally:
            pubs.stop()
            counter.stop()
            opener.stop()
            comb.stop()
    stages = stage_costs(weights)
    log(f"combiner accept path, ms per update (no broker): {stages}")
    # Adjacent raw/edgefl trials see the same background load: the median of their ratios is
    # the headline; the ratio of the medians is reported too.
    ratio = median([e / r for e, r in zip(edge_mibs, raw_mibs, strict=True)])
    emit(
        {
            "benchmark": "transport",
            "publishers": N_PUBLISHERS,
            "params": sum(w.size for w in weights.values()),
            "update_bytes": update_len,
            "chunk_bytes": 256 * 1024,
            "updates_per_trial": n_updates,
            "trials": TRIALS,
            "goodput_mib_s": round(median(edge_mibs), 1),
            "baseline_raw_mib_s": round(median(raw_mibs), 1),
            "ratio": round(ratio, 3),
            "ratio_of_medians": round(median(edge_mibs) / median(raw_mibs), 3),
            "goodput_trials_mib_s": [round(x, 1) for x in edge_mibs],
            "raw_trials_mib_s": [round(x, 1) for x in raw_mibs],
            # CPU milliseconds per MiB delivered, by process group (medians over the trials)
            "cpu_ms_per_mib_edgefl": _per_mib(edge_cpu, total),
            "cpu_ms_per_mib_raw": _per_mib(raw_cpu, total),
            # the combiner's accept path in-process: reassemble includes the SHA-256 check,
            # sha256_part is that check alone
            "combiner_stage_ms_per_update": stages,
            "encode_ms_per_update": round(median([p["encode_ms"] for p in prep]), 2),
            "split_ms_per_update": round(median([p["split_ms"] for p in prep]), 2),
            "target": f"goodput / raw >= {TARGET}",
            "target_met": ratio >= TARGET,
        }
    )


if __name__ == "__main__":
    sys.exit(main())
