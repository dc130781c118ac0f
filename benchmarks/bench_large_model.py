"""A 10M-parameter (40 MB) float32 model, 10 devices, 1 region, Mosquitto: round time and RSS.

Layout (issue 10), over a private Mosquitto:
- **server** (a child process): one combiner and the controller (SQLite store, file blob
  store), wired by ``edgefl.deploy.Deployment``; plain FedAvg, 1 MiB chunks;
- **devices** (another child process): 10 real ``DeviceAgent``s, each with its own MQTT
  connection and threads, whose trainer adds 0.001 to every weight (a trivial trainer: this
  measures the system, not learning). After the session the global model must equal the
  initial one plus 0.001 once per round, in float32, bit for bit: the benchmark proves the
  rounds were exact, not only fast.

Headline: ``round_s_median``, the median wall time of a round as the controller runs it: from
the publication of the round's input model (retained chunks) to the stored new model, i.e.
publish, dispatch, 10 downloads, training, 10 uploads, folding, partial, merge and storage.
(``record_round_s_median``, the round records' ``finished - started``, leaves the model's
publication out.)

Baseline, same run, same broker, same two-process layout: ``raw_transport_s``, raw paho
moving the same bytes. One process publishes the model's bytes as 1 MiB QoS 1 messages and
receives the uploads; the devices' process holds 10 paho clients that each upload the same
number of bytes as an edgefl update (1 MiB QoS 1 messages) as soon as they have the whole
model. Both sides use MQTT 3.1.1, TCP_NODELAY and 64 messages in flight. A raw trial runs
before each round (the session pauses between rounds for it, and the pause is not timed), so
each round has its baseline measured next to it, under the same background load: ``ratio``
is the median of the per-round ratios, ``raw_transport_s`` the median raw trial.
Target: ``round_s_median <= 1.5 x raw_transport_s`` (and a bar of 2x that must hold).

Memory: peak RSS above the process's idle RSS (connected, before any model exists), from
``VmHWM`` inside each process, cross-checked by sampling from outside every 5 ms. To tell
the tiers apart, a second pass of 2 rounds runs the controller, the combiner, one agent and
the other nine agents each in a process of its own. Targets: agent <= 3x, combiner <= 3x and
controller <= 4x the model's bytes. The timed layout's two processes are reported too.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    MIB,
    Children,
    CpuMeter,
    RssSampler,
    broker,
    emit,
    expect,
    log,
    mb,
    median,
    reporting,
    setup_logging,
)

PROJECT = "benchlarge"
REGION = "region-0"
N_DEVICES = 10
TENSORS = 4  # 4 x (2500 x 1000) float32 = 10,000,000 parameters, 40,000,000 bytes
SHAPE = (2500, 1000)
CHUNK = MIB
DELTA = np.float32(0.001)
EXAMPLES = 100
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
MEMORY_ROUNDS = 2
INFLIGHT = 64
TARGET_RATIO = 1.5
BAR_RATIO = 2.0
TARGETS = {"agent": 3.0, "combiner": 3.0, "controller": 4.0}
TIMEOUT_S = 300.0


def _own_rss() -> int:
    """RSS of this process from /proc (no psutil import in the measured processes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _profile_start() -> Any:
    """With BENCH_PROFILE=DIR, profile this process's CPU (every thread) with yappi."""
    if not os.environ.get("BENCH_PROFILE"):
        return None
    import yappi  # a diagnostic tool only, installed by hand

    yappi.set_clock_type("cpu")
    yappi.start()
    return yappi


def _profile_stop(yappi: Any, name: str) -> None:
    if yappi is None:
        return
    yappi.stop()
    out = Path(os.environ["BENCH_PROFILE"]) / f"{name}-{os.getpid()}.txt"
    with open(out, "w") as f:
        stats = yappi.get_func_stats()
        stats.sort("tsub")
        stats.print_all(
            out=f, columns={0: ("name", 90), 1: ("ncall", 10), 2: ("tsub", 8), 3: ("ttot", 8)}
        )
        stats.sort("ttot")
        stats.print_all(
            out=f, columns={0: ("name", 90), 1: ("ncall", 10), 2: ("tsub", 8), 3: ("ttot", 8)}
        )


def maxrss_bytes() -> int:
    """This process's peak RSS: ``VmHWM``, which starts afresh at exec. (``ru_maxrss`` does
    not: a spawned child inherits its parent's RSS at fork as its starting peak.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _idle_rss() -> int:
    gc.collect()
    time.sleep(0.5)  # SUBACKs, retained status messages
    gc.collect()
    return _own_rss()


def initial_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"w{i}": rng.standard_normal(SHAPE).astype(np.float32) for i in range(TENSORS)}


def model_bytes() -> int:
    return TENSORS * SHAPE[0] * SHAPE[1] * 4


# edgefl: the server process ------------------------------------------------------------------
def server(
    url: str, workdir: str, roles: list[str], rounds: int, paced: bool, pipe: Connection
) -> None:
    """Combiner and/or controller; the controller runs a session of ``rounds`` on 'go'
    (``paced``: pausing after each round until the orchestrator says 'continue')."""
    setup_logging()
    with reporting(pipe):
        from edgefl.controller import SessionConfig
        from edgefl.deploy import Deployment

        with Deployment(Path(workdir), project=PROJECT, broker_url=url) as dep:
            if "combiner" in roles:
                dep.start_combiners([REGION])
            ctl = dep.start_controller() if "controller" in roles else None
            pipe.send(("ready", _idle_rss()))
            if ctl is None:
                pipe.recv()  # until the session is over
                pipe.send(("done", {"maxrss": maxrss_bytes()}))
                pipe.recv()
                return
            pipe.recv()  # go: the devices are online
            prof = _profile_start()
            config = SessionConfig(
                session_id=f"large-{rounds}",
                rounds=rounds,
                min_devices=N_DEVICES,
                round_timeout_s=120,
                chunk_size=CHUNK,
                wait_for_devices_s=60,
            )
            ctl.create_session(config, initial_weights())
            # Between rounds the orchestrator may run a raw trial (paced): each round is timed
            # from the end of that pause to the next round's end, the new model published.
            stamps: list[tuple[float, float]] = []
            resumed = [time.monotonic()]

            def between(_rec: object, _sess: object) -> None:
                stamps.append((resumed[0], time.monotonic()))
                if paced:
                    pipe.send(("round", len(stamps)))
                    if pipe.recv() != "continue":
                        raise RuntimeError("the orchestrator stopped the session")
                resumed[0] = time.monotonic()

            ctl.run(config.session_id, on_round=between)
            peak = maxrss_bytes()
            _profile_stop(prof, "server")
            sess = ctl.store.get_session(config.session_id)
            records = ctl.store.list_rounds(config.session_id)
            final, _ = ctl.models.load(sess.model_version)
            expected = initial_weights()
            for _ in range(rounds):
                expected = {k: v + DELTA for k, v in expected.items()}
            exact = all(np.array_equal(final[k], expected[k]) for k in expected)
            pipe.send(
                (
                    "done",
                    {
                        "maxrss": peak,
                        "round_s": [end - start for start, end in stamps],
                        "record_round_s": [
                            r.finished - r.started
                            for r in records
                            if r.status == "completed" and r.finished
                        ],
                        "failed_attempts": sum(r.status != "completed" for r in records),
                        "exact": exact,
                        "updates": [len(r.participants) for r in records],
                    },
                )
            )
            pipe.recv()


# edgefl: the devices' process ----------------------------------------------------------------
def devices(url: str, first: int, count: int, pipe: Connection) -> None:
    """``count`` real agents whose trainer adds 0.001 to every weight."""
    setup_logging()
    with reporting(pipe):
        from device_agent.agent import DeviceAgent
        from device_agent.config import AgentConfig
        from device_agent.trainers.base import CallableTrainer, TrainResult

        def add_delta(weights: dict, _task: object) -> TrainResult:
            return TrainResult({k: v + DELTA for k, v in weights.items()}, EXAMPLES, {})

        agents = [
            DeviceAgent(
                AgentConfig(
                    broker_url=url,
                    project=PROJECT,
                    region=REGION,
                    device_id=f"dev-{k:04d}",
                    download_timeout_s=120,
                ),
                CallableTrainer(add_delta),
            ).start()
            for k in range(first, first + count)
        ]
        pipe.send(("ready", _idle_rss()))
        prof = _profile_start()
        pipe.recv()  # the session is over
        _profile_stop(prof, f"devices{first}")
        pipe.send(("done", {"maxrss": maxrss_bytes(), "completed": [a.completed for a in agents]}))
        pipe.recv()
        for a in agents:
            a.stop()


# raw paho ------------------------------------------------------------------------------------
def _raw_client(url: str, client_id: str) -> Any:
    import socket

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefl.transport import parse_broker_url

    addr = parse_broker_url(url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    client.max_inflight_messages_set(INFLIGHT)
    client.max_queued_messages_set(0)
    connected = threading.Event()

    def on_connect(c: Any, _u: Any, _f: Any, _rc: Any, _p: Any = None) -> None:
        c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connected.set()

    client.on_connect = on_connect
    client.connect(addr.host, addr.port)
    client.loop_start()
    if not connected.wait(10):
        raise ConnectionError(f"{client_id}: no CONNACK from {url}")
    return client


def _messages(size: int, seed: int) -> list[bytes]:
    data = np.random.default_rng(seed).bytes(size)
    return [data[s : s + CHUNK] for s in range(0, size, CHUNK)]


def raw_server(url: str, model_len: int, update_len: int, pipe: Connection) -> None:
    """Publishes the model as 1 MiB QoS 1 messages on 'go'; times until every upload is in."""
    model = _messages(model_len, 1)
    expected = N_DEVICES * update_len
    got = {"bytes": 0}
    done = threading.Event()
    client = _raw_client(url, "raw-server")

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        got["bytes"] += len(msg.payload)
        if got["bytes"] >= expected:
            done.set()

    client.on_message = on_message
    client.subscribe("rawbench/up/+", qos=1)
    time.sleep(0.3)
    pipe.send(("ready", None))
    while True:
        cmd = pipe.recv()
        if cmd == "stop":
            break
        got["bytes"] = 0
        done.clear()
        t0 = time.perf_counter()
        for m in model:
            client.publish("rawbench/model", m, qos=1)
        if not done.wait(TIMEOUT_S):
            pipe.send(("error", f"raw uploads: {got['bytes']} of {expected} bytes"))
            return
        pipe.send(("done", time.perf_counter() - t0))
    client.disconnect()
    client.loop_stop()


def raw_devices(url: str, model_len: int, update_len: int, pipe: Connection) -> None:
    """10 paho clients; each uploads its update's bytes once it has the whole model."""
    upload = _messages(update_len, 2)
    clients = []
    for k in range(N_DEVICES):
        state = {"bytes": 0}

        def on_message(c: Any, _u: Any, msg: Any, state: dict = state, k: int = k) -> None:
            state["bytes"] += len(msg.payload)
            if state["bytes"] >= model_len:
                state["bytes"] = 0
                for m in upload:
                    c.publish(f"rawbench/up/{k}", m, qos=1)

        client = _raw_client(url, f"raw-dev-{k}")
        client.on_message = on_message
        client.subscribe("rawbench/model", qos=1)
        clients.append(client)
    time.sleep(0.3)
    pipe.send(("ready", None))
    pipe.recv()
    for c in clients:
        c.disconnect()
        c.loop_stop()


def update_length() -> int:
    """The bytes of one device's update message (what an agent uploads)."""
    from edgefl.protocol import encode
    from edgefl.protocol.tensors import encode_tensors

    w = initial_weights()
    return len(
        encode(
            "update",
            task_id="large-5:1:0",
            device="dev-0000",
            model_version="x" * 64,
            num_examples=EXAMPLES,
            metrics={},
            tensors=encode_tensors(w),
        )
    )


def model_length() -> int:
    from edgefl.protocol.tensors import dumps_tensors

    return len(dumps_tensors(initial_weights()))


class RawTransport:
    """The raw paho layout, started once and kept idle between trials."""

    def __init__(self, url: str, broker_pid: int) -> None:
        ml, ul = model_length(), update_length()
        self.kids = Children()
        self.srv = self.kids.spawn("raw-server", raw_server, url, ml, ul)
        devs = self.kids.spawn("raw-devices", raw_devices, url, ml, ul)
        expect(self.srv, "ready")
        expect(devs, "ready")
        self.trials: list[float] = []
        self.cpu = CpuMeter(
            {
                "server": self.kids.pid("raw-server"),
                "devices": self.kids.pid("raw-devices"),
                "broker": broker_pid,
            }
        )

    def trial(self) -> float:
        self.cpu.start()
        self.srv.send("go")
        self.trials.append(expect(self.srv, "done"))
        self.cpu.stop()
        log(f"raw transport: {self.trials[-1]:.2f} s")
        return self.trials[-1]

    def close(self) -> None:
        self.kids.close()


def edgefl_run(
    url: str,
    layout: dict[str, tuple[str, tuple]],
    rounds: int,
    raw: RawTransport | None = None,
    broker_pid: int | None = None,
) -> dict[str, Any]:
    """Start the children of a layout, run a session, return each one's figures.

    With ``raw``, a raw trial runs before the session and between every two rounds, so
    each round has a baseline measured next to it.
    """
    kids = Children()
    samplers: dict[str, RssSampler] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-large-") as workdir:
            pipes = {}
            for name, (kind, args) in layout.items():
                if kind == "server":
                    pipes[name] = kids.spawn(name, server, url, workdir, *args, raw is not None)
                else:
                    pipes[name] = kids.spawn(name, devices, url, *args)
            idle = {name: expect(p, "ready") for name, p in pipes.items()}
            samplers = {name: RssSampler(kids.pid(name)).start() for name in layout}
            ctl = next(n for n, (k, a) in layout.items() if k == "server" and "controller" in a[0])
            pids = {n: kids.pid(n) for n in layout}
            cpu = CpuMeter({**pids, **({"broker": broker_pid} if broker_pid else {})})
            if raw is not None:
                raw.trial()
            cpu.start()
            pipes[ctl].send("go")
            while True:
                if not pipes[ctl].poll(TIMEOUT_S * 2):
                    raise TimeoutError("the session did not finish")
                tag, value = pipes[ctl].recv()
                if tag == "error":
                    raise RuntimeError(f"controller failed: {value}")
                if tag == "done":
                    cpu.stop()
                    result = {ctl: value}
                    break
                cpu.stop()
                if value < rounds and raw is not None:  # a raw trial before the next round
                    raw.trial()
                cpu.start()
                pipes[ctl].send("continue")
            for name, p in pipes.items():
                if name != ctl:
                    p.send("report")
                    result[name] = expect(p, "done")
            for name, s in samplers.items():
                result[name]["sampled_peak"] = s.stop()
                result[name]["idle"] = idle[name]
            result["cpu_s"] = {k: v / rounds for k, v in cpu.total.items()}
            return result
    finally:
        for s in samplers.values():
            s.stop()
        kids.close()


def main() -> None:
    setup_logging()
    load = os.getloadavg()[0]
    size = model_bytes()
    log(f"load {load:.2f}; model {size} B in {TENSORS} tensors, {N_DEVICES} devices")
    with broker() as b:
        raw_layout = RawTransport(b.url, b.proc.pid)
        try:
            raw_layout.trial()  # a warm-up: the first trial on a fresh broker is slower
            raw_layout.trials.clear()
            timed = edgefl_run(
                b.url,
                {
                    "server": ("server", (["combiner", "controller"], ROUNDS)),
                    "devices": ("devices", (0, N_DEVICES)),
                },
                ROUNDS,
                raw_layout,
                b.proc.pid,
            )
        finally:
            raw_layout.close()
        raw = raw_layout.trials
        srv = timed["server"]
        log(f"edgefl rounds (wall): {[round(x, 2) for x in srv['round_s']]}")
        mem = edgefl_run(
            b.url,
            {
                "controller": ("server", (["controller"], MEMORY_ROUNDS)),
                "combiner": ("server", (["combiner"], MEMORY_ROUNDS)),
                "agent": ("devices", (0, 1)),
                "agents9": ("devices", (1, N_DEVICES - 1)),
            },
            MEMORY_ROUNDS,
        )
    round_s = median(srv["round_s"])
    raw_s = median(raw)
    # each round against the raw trial just before it (the same background load)
    ratio = median([e / r for e, r in zip(srv["round_s"], raw, strict=True)])

    def above(r: dict) -> int:
        return int(r["maxrss"] - r["idle"])

    peaks = {tier: above(mem[tier]) for tier in TARGETS}
    sampled = {tier: int(mem[tier]["sampled_peak"] - mem[tier]["idle"]) for tier in TARGETS}
    per_model = {tier: round(v / size, 2) for tier, v in peaks.items()}
    mem_met = {tier: per_model[tier] <= TARGETS[tier] for tier in TARGETS}
    exact = srv["exact"] and mem["controller"]["exact"]
    emit(
        {
            "benchmark": "large_model",
            "load_1min": round(load, 2),
            "params": TENSORS * SHAPE[0] * SHAPE[1],
            "model_bytes": size,
            "devices": N_DEVICES,
            "chunk_bytes": CHUNK,
            "rounds": ROUNDS,
            "round_s_median": round(round_s, 3),
            "round_s": [round(x, 3) for x in srv["round_s"]],
            "record_round_s_median": round(median(srv["record_round_s"]), 3),
            "raw_transport_s": round(raw_s, 3),
            "raw_trials_s": [round(x, 3) for x in raw],
            "ratio": round(ratio, 3),
            "ratio_of_medians": round(round_s / raw_s, 3),
            # CPU seconds per round (edgefl) and per trial (raw), by process
            "cpu_s_per_round": {k: round(v, 3) for k, v in timed["cpu_s"].items()},
            "raw_cpu_s_per_trial": {
                k: round(v / len(raw), 3) for k, v in raw_layout.cpu.total.items()
            },
            "exact": exact,
            "failed_attempts": srv["failed_attempts"] + mem["controller"]["failed_attempts"],
            "peak_rss_above_idle_mb": {t: mb(v) for t, v in peaks.items()},
            "peak_rss_over_model": per_model,
            "sampled_peak_above_idle_mb": {t: mb(v) for t, v in sampled.items()},
            "memory_targets_over_model": TARGETS,
            "memory_targets_met": mem_met,
            "timed_layout_peak_above_idle_mb": {
                "server": mb(above(srv)),
                "devices_10": mb(above(timed["devices"])),
            },
            "target": f"round_s_median <= {TARGET_RATIO} x raw_transport_s (bar {BAR_RATIO}x)",
            "target_met": ratio <= TARGET_RATIO and exact,
            "bar_met": ratio <= BAR_RATIO and exact,
        }
    )
    if not exact:
        raise SystemExit("the global model is not initial + 0.001 per round: rounds were not exact")


if __name__ == "__main__":
    sys.exit(main())
