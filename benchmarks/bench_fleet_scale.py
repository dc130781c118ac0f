"""Fleet scale on one machine: digits rounds with 100, 300 and 1,000 devices, and 10,000 idle ones.

Layout, over a private Mosquitto (three processes besides it):
- **server** (a child process): 2 regional combiners and a controller with a SQLite store,
  wired by ``edgefl.deploy.Deployment`` as the demo does;
- **simulator** (this process): ``edgefl.fleet.simulate.start_fleet`` in shared mode, i.e.
  N real ``DeviceAgent``s, each with its own MQTT connection, on one ``SharedLoop`` network
  thread and a pool of task threads.

Rounds: the canonical digits task (softmax, FedAvg, lr 0.1, batch 32) on the canonical
partition generalised to N (``digits.partition(ytr, N)``). Devices the partition leaves empty
decline each round with "no local data", so the quorum is the number of devices with data.
A round's time is ``finished - started`` of its stored record (as ``edgefl demo`` reports it),
from the controller's plan to its merged, evaluated and stored model: devices included.
``server_cpu_ms_per_update`` is the server process's CPU time (user + system) over the
session, per accepted update; the broker's and the simulator's are reported the same way.
Every accuracy must equal the single-process reference (``digits.reference_run``).

Idle: 10,000 devices connect; ``online_s`` is the time from the first device's start to the
controller's presence tracking seeing all of them online. RSS of the broker, the controller
process (controller + 2 combiners) and the simulator once they are all online.

Targets (issue 10): a 1,000-device round in at most 3 s, and 10,000 devices online within
60 s, on this 2-core machine. Mosquitto needs ~1 file descriptor per device (the shell's
``ulimit -n`` is inherited; see docs/scaling.md, "Fleet scale").
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _common import broker, emit, log, setup_logging

ROUND_SIZES = (100, 300, 1000)
ROUNDS = 5
IDLE_DEVICES = 10_000
REGIONS = 2
TRAIN = {"model": "softmax", "lr": 0.1, "batch_size": 32, "epochs": 1}
TARGET_ROUND_S = 3.0
TARGET_ONLINE_S = 60.0


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def serve(url: str, project: str, workdir: str, n: int, rounds: int, pipe: Connection) -> None:
    """The server process: combiners and controller; runs the session once all n are online."""
    setup_logging()
    from edgefl.controller import SessionConfig
    from edgefl.deploy import Deployment
    from edgefl.tasks import digits

    with Deployment(Path(workdir), project=project, broker_url=url) as dep:
        dep.start_combiners(REGIONS)
        ctl = dep.start_controller(evaluator=digits.evaluator if rounds else None)
        pipe.send(("ready", time.time()))
        seen = len(ctl.presence.wait_for(n, 180))
        online_at = time.time()
        rss = _rss_self()
        if not rounds:
            pipe.send(("online", {"seen": seen, "online_at": online_at, "rss": rss}))
            pipe.recv()  # until the simulator has measured
            return
        config = SessionConfig(
            session_id=f"fleet-{n}",
            rounds=rounds,
            min_devices=digits.devices_with_data(n),
            round_timeout_s=60,
            train=TRAIN,
        )
        ctl.create_session(config, digits.initial_weights())
        pipe.send(("started", time.time()))
        cpu0 = _cpu_s()
        ctl.run(config.session_id)
        cpu = _cpu_s() - cpu0
        recs = [r for r in dep.store.list_rounds(config.session_id) if r.status == "completed"]
        pipe.send(
            (
                "done",
                {
                    "durations": [(r.finished or 0) - r.started for r in recs],
                    "accuracies": [r.metrics["accuracy"] for r in recs],
                    "updates": sum(len(r.participants) for r in recs),
                    "declines": sum(len(r.rejected) for r in recs),
                    "cpu_s": cpu,
                    "rss": _rss_self(),
                },
            )
        )


def _rss_self() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _expect(pipe: Connection, kind: str, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise TimeoutError(f"server sent no {kind!r} within {timeout}s")
    got, value = pipe.recv()
    if got != kind:
        raise RuntimeError(f"server sent {got!r}, expected {kind!r}")
    return value


def run_rounds(b: Any, n: int, tmp: Path) -> dict[str, Any]:
    import psutil

    from edgefl.deploy import region_names
    from edgefl.fleet.simulate import start_fleet
    from edgefl.tasks import digits

    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    project = f"fleet{n}"
    server = ctx.Process(
        target=serve, args=(b.url, project, str(tmp / f"s{n}"), n, ROUNDS, theirs), daemon=True
    )
    server.start()
    _expect(mine, "ready", 60)
    t0 = time.perf_counter()
    fleet = start_fleet(b.url, n, region_names(REGIONS), project=project, shared=True)
    up_s = time.perf_counter() - t0
    brk = psutil.Process(b.proc.pid)
    try:
        _expect(mine, "started", 120)
        cpu_sim0, cpu_brk0 = _cpu_s(), sum(brk.cpu_times()[:2])
        done = _expect(mine, "done", 600)
        cpu_sim, cpu_brk = _cpu_s() - cpu_sim0, sum(brk.cpu_times()[:2]) - cpu_brk0
    finally:
        fleet.stop()
        server.join(30)
    reference = digits.reference_run(n, ROUNDS)
    durations = done["durations"]
    updates = max(1, done["updates"])
    out = {
        "devices": n,
        "devices_with_data": digits.devices_with_data(n),
        "rounds": len(durations),
        "round_s_median": round(statistics.median(durations), 3) if durations else None,
        "round_s_max": round(max(durations), 3) if durations else None,
        "server_cpu_ms_per_update": round(1e3 * done["cpu_s"] / updates, 3),
        "broker_cpu_ms_per_update": round(1e3 * cpu_brk / updates, 3),
        "simulator_cpu_ms_per_device_round": round(1e3 * cpu_sim / (n * max(1, len(durations))), 3),
        "declines": done["declines"],
        "fleet_start_s": round(up_s, 2),
        "matches_reference_run": done["accuracies"] == reference,
        "final_accuracy": round(done["accuracies"][-1], 6) if done["accuracies"] else None,
    }
    log(f"{n} devices: {out}")
    return out


def run_idle(b: Any, tmp: Path) -> dict[str, Any]:
    import psutil

    from edgefl.deploy import region_names
    from edgefl.fleet.simulate import start_fleet

    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    project = "fleetidle"
    server = ctx.Process(
        target=serve,
        args=(b.url, project, str(tmp / "idle"), IDLE_DEVICES, 0, theirs),
        daemon=True,
    )
    server.start()
    _expect(mine, "ready", 60)
    rss_sim0 = _rss_self()
    t0 = time.time()
    fleet = start_fleet(
        b.url,
        IDLE_DEVICES,
        region_names(REGIONS),
        project=project,
        shared=True,
        connect_timeout_s=180,
    )
    sim_online_s = time.time() - t0
    try:
        seen = _expect(mine, "online", 200)
        out = {
            "devices": IDLE_DEVICES,
            "online_s": round(seen["online_at"] - t0, 2),
            "simulator_online_s": round(sim_online_s, 2),
            "controller_saw": seen["seen"],
            "broker_rss_mb": round(psutil.Process(b.proc.pid).memory_info().rss / 1e6, 1),
            "controller_rss_mb": round(seen["rss"] / 1e6, 1),
            "simulator_rss_mb": round(_rss_self() / 1e6, 1),
            "simulator_rss_kb_per_device": round((_rss_self() - rss_sim0) / 1e3 / IDLE_DEVICES, 1),
        }
        mine.send(("bye", None))
    finally:
        t1 = time.perf_counter()
        fleet.stop()
        out["stop_s"] = round(time.perf_counter() - t1, 2)
        server.join(30)
    log(f"idle: {out}")
    return out


def main() -> None:
    """Options for a quick look (the defaults are the benchmark): ``--sizes 100,300``,
    ``--idle 2000``, ``--rounds 3``."""
    global ROUND_SIZES, IDLE_DEVICES, ROUNDS
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(map(str, ROUND_SIZES)))
    ap.add_argument("--idle", type=int, default=IDLE_DEVICES)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    args = ap.parse_args()
    ROUND_SIZES = tuple(int(v) for v in args.sizes.split(","))
    IDLE_DEVICES, ROUNDS = args.idle, args.rounds
    setup_logging()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # Mosquitto inherits this limit: it needs one descriptor per device
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < IDLE_DEVICES + 1000:
        raise SystemExit(f"ulimit -n is {hard}: {IDLE_DEVICES} devices need more descriptors")
    load = os.getloadavg()[0]
    log(f"load average {load:.2f}")
    results: dict[str, Any] = {}
    with broker() as b, tempfile.TemporaryDirectory(prefix="edgefl-bench-fleet-") as tmp:
        for n in ROUND_SIZES:
            results[str(n)] = run_rounds(b, n, Path(tmp))
        idle = run_idle(b, Path(tmp))
    big = results[str(max(ROUND_SIZES))]
    round_ok = (
        max(ROUND_SIZES) >= 1000
        and big["round_s_median"] is not None
        and big["round_s_median"] <= TARGET_ROUND_S
    )
    online_ok = idle["controller_saw"] >= 10_000 and idle["online_s"] <= TARGET_ONLINE_S
    exact = all(r["matches_reference_run"] for r in results.values())
    emit(
        {
            "benchmark": "fleet_scale",
            "broker": "mosquitto",
            "regions": REGIONS,
            "rounds_per_size": ROUNDS,
            "load_avg_1m_at_start": round(load, 2),
            **{f"round_s_median_{n}": results[str(n)]["round_s_median"] for n in ROUND_SIZES},
            f"server_cpu_ms_per_update_{max(ROUND_SIZES)}": big["server_cpu_ms_per_update"],
            "sizes": results,
            "idle": idle,
            "all_rounds_match_reference": exact,
            "target": f"1000-device round_s_median <= {TARGET_ROUND_S} and "
            f"{IDLE_DEVICES} devices online within {TARGET_ONLINE_S} s",
            "target_met": bool(round_ok and online_ok and exact),
        }
    )


if __name__ == "__main__":
    sys.exit(main())
