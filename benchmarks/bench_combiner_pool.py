"""Update throughput of one region's combiner pool with 1, 2 and 4 members, on Mosquitto.

Layout, over a private Mosquitto (issue 10, Combiner pools):
- **controller** (a child process): SQLite store, file blob store, plain FedAvg;
- **pool members** (one child process each, as they would run on separate machines): each
  a ``Combiner`` with ``pool=True`` in the same region;
- **devices** (two child processes of 20 real ``DeviceAgent``s each): a trivial trainer adds
  0.001 to every weight of a 1M-parameter float32 model (4 MB), so the rounds move and fold
  real 4 MB updates; after each session the global model must equal the initial one plus
  0.001 per round, bit for bit (the pool is exact, not only fast).

Figures per pool size: the median round (the round records' ``finished - started``: dispatch,
40 downloads, uploads, folding, partials, merge and storage), ``updates_per_s`` (40 updates
over it), the combiner tier's CPU seconds per update (all members summed) and how the
updates were shared out between the members.

Baseline, same run: the 1-member pool. ``speedup_2``/``speedup_4`` are the throughput ratios
against it. Target: a pool of 2 is faster than 1 (``speedup_2 > 1``). On a 2-core machine the
devices, the broker and the controller share the same two cores as the pool, which bounds
what more members can win; on a real deployment the members run on their own machines.

``share_split_fraction`` is why pools do not use ``$share`` on Mosquitto: the fraction of
8-chunk transfers, published on one topic to a shared subscription of 2 members, whose chunks
Mosquitto handed to more than one member (a member cannot fold a part of an update).
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    Children,
    CpuMeter,
    broker,
    emit,
    expect,
    log,
    median,
    reporting,
    setup_logging,
)

REGION = "region-0"
DEVICES_PER_PROCESS = 20
DEVICE_PROCESSES = 2
N_DEVICES = DEVICES_PER_PROCESS * DEVICE_PROCESSES
SHAPE = (1000, 1000)  # 1,000,000 float32 parameters, 4 MB
DELTA = np.float32(0.001)
ROUNDS = 5
POOLS = (1, 2, 4)


def initial_weights() -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)}


def controller(url: str, workdir: str, project: str, pipe: Connection) -> None:
    setup_logging()
    with reporting(pipe):
        from edgefl.controller import SessionConfig
        from edgefl.deploy import Deployment

        with Deployment(Path(workdir), project=project, broker_url=url) as dep:
            ctl = dep.start_controller()
            pipe.send(("ready", None))
            pipe.recv()  # go: the devices and members are online
            config = SessionConfig(
                session_id="pool",
                rounds=ROUNDS,
                min_devices=N_DEVICES,
                round_timeout_s=120,
                wait_for_devices_s=60,
                chunk_size=1024 * 1024,
            )
            ctl.create_session(config, initial_weights())
            ctl.run(config.session_id)
            records = [r for r in ctl.store.list_rounds("pool") if r.status == "completed"]
            sess = ctl.store.get_session("pool")
            final, _ = ctl.models.load(sess.model_version)
            expected = initial_weights()["w"]
            for _ in range(ROUNDS):
                expected = expected + DELTA
            pipe.send(
                (
                    "done",
                    {
                        "round_s": [r.finished - r.started for r in records if r.finished],
                        "updates": [len(r.participants) for r in records],
                        "exact": bool(np.array_equal(final["w"], expected)),
                    },
                )
            )
            pipe.recv()


def member(url: str, project: str, name: str, pipe: Connection) -> None:
    setup_logging()
    with reporting(pipe):
        from edgefl.combiner import Combiner, CombinerConfig

        comb = Combiner(
            CombinerConfig(url, project=project, region=REGION, combiner_id=name, pool=True)
        ).start()
        pipe.send(("ready", None))
        pipe.recv()  # the session is over
        pipe.send(("done", dict(comb.stats)))
        pipe.recv()
        comb.stop()


def devices(url: str, project: str, first: int, pipe: Connection) -> None:
    setup_logging()
    with reporting(pipe):
        from device_agent.agent import DeviceAgent
        from device_agent.config import AgentConfig
        from device_agent.trainers.base import CallableTrainer, TrainResult

        def add_delta(weights: dict, _task: object) -> TrainResult:
            return TrainResult({k: v + DELTA for k, v in weights.items()}, 100, {})

        agents = [
            DeviceAgent(
                AgentConfig(
                    broker_url=url,
                    project=project,
                    region=REGION,
                    device_id=f"dev-{k:04d}",
                    download_timeout_s=120,
                ),
                CallableTrainer(add_delta),
            ).start()
            for k in range(first, first + DEVICES_PER_PROCESS)
        ]
        pipe.send(("ready", None))
        pipe.recv()
        pipe.send(("done", [a.completed for a in agents]))
        pipe.recv()
        for a in agents:
            a.stop()


def run_pool(url: str, size: int, workdir: str) -> dict[str, Any]:
    """One session with a pool of ``size`` members; its figures."""
    project = f"benchpool{size}"
    kids = Children()
    try:
        members = {
            f"member-{i}": kids.spawn(f"m{i}", member, url, project, f"member-{i}")
            for i in range(size)
        }
        for pipe in members.values():
            expect(pipe, "ready", 60)
        ctl = kids.spawn("controller", controller, url, workdir, project)
        expect(ctl, "ready", 60)
        devs = [
            kids.spawn(f"devices{p}", devices, url, project, p * DEVICES_PER_PROCESS)
            for p in range(DEVICE_PROCESSES)
        ]
        for pipe in devs:
            expect(pipe, "ready", 120)
        cpu = CpuMeter({name: kids.pid(f"m{i}") for i, name in enumerate(members)})
        cpu.start()
        ctl.send("go")
        result = expect(ctl, "done", 900)
        cpu.stop()
        stats = {}
        for name, pipe in members.items():
            pipe.send("over")
            stats[name] = expect(pipe, "done", 60)
        for pipe in devs:
            pipe.send("over")
            expect(pipe, "done", 60)
    finally:
        kids.close()
    accepted = [int(stats[n]["accepted"]) for n in sorted(stats)]
    total = sum(accepted)
    round_s = median(result["round_s"])
    out = {
        "round_s_median": round(round_s, 3),
        "updates_per_s": round(N_DEVICES / round_s, 1),
        "combiner_cpu_s_per_update": round(sum(cpu.total.values()) / max(1, total), 4),
        "accepted_per_member": accepted,
        "rejected": sum(int(stats[n]["rejected"]) for n in stats),
        "exact": result["exact"] and result["updates"] == [N_DEVICES] * ROUNDS,
    }
    log(f"pool of {size}: {out}")
    return out


def share_split_fraction(url: str, transfers: int = 50, chunks: int = 8) -> float:
    """Publish ``transfers`` transfers of ``chunks`` messages on one topic to a shared
    subscription of 2 raw members; the fraction of transfers split across both."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefl.transport import parse_broker_url

    addr = parse_broker_url(url)
    got: dict[int, set[int]] = {}
    lock = threading.Lock()
    clients = []
    for m in range(2):
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"share-{m}")

        def on_message(_c: Any, _u: Any, msg: Any, m: int = m) -> None:
            with lock:
                got.setdefault(int(msg.payload.split(b":")[0]), set()).add(m)

        c.on_message = on_message
        c.connect(addr.host, addr.port)
        c.loop_start()
        c.subscribe("$share/pool/bench/share/dev/update", qos=1)
        clients.append(c)
    time.sleep(0.5)
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="share-pub")
    pub.connect(addr.host, addr.port)
    pub.loop_start()
    for t in range(transfers):
        for i in range(chunks):
            pub.publish("bench/share/dev/update", f"{t}:{i}".encode(), qos=1).wait_for_publish(5)
    deadline = time.time() + 10
    while time.time() < deadline:
        with lock:
            if len(got) == transfers:
                break
        time.sleep(0.05)
    for c in [*clients, pub]:
        c.disconnect()
        c.loop_stop()
    with lock:
        return sum(len(v) > 1 for v in got.values()) / transfers


def main() -> None:
    setup_logging()
    with broker() as b, tempfile.TemporaryDirectory() as tmp:
        split = share_split_fraction(b.url)
        log(f"$share: {split:.0%} of transfers split across members")
        pools = {}
        for size in POOLS:
            workdir = Path(tmp) / f"pool{size}"
            workdir.mkdir()
            pools[size] = run_pool(b.url, size, str(workdir))
    base = pools[1]["updates_per_s"]
    result: dict[str, Any] = {
        "benchmark": "combiner_pool",
        "devices": N_DEVICES,
        "model_bytes": int(np.prod(SHAPE)) * 4,
        "rounds": ROUNDS,
        **{f"pool_{n}": fig for n, fig in pools.items()},
        **{f"speedup_{n}": round(pools[n]["updates_per_s"] / base, 3) for n in POOLS if n > 1},
        "share_split_fraction": round(split, 3),
        "exact": all(p["exact"] for p in pools.values()),
        "target": "speedup_2 > 1 (pool of 2 faster than 1), every session exact",
    }
    result["target_met"] = bool(result["speedup_2"] > 1 and result["exact"])
    emit(result)


if __name__ == "__main__":
    sys.exit(main())
