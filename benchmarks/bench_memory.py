"""Combiner peak RSS against the number of devices in a round (1M-parameter float32 model).

For each N in (10, 100, 500) a fresh combiner runs in its own process on a private Mosquitto.
Two publisher processes act as N devices: they publish one valid, pre-encoded update per
device id (the same bytes under each device's own topic, chunked at 256 KiB, QoS 1), keeping
at most a few updates ahead of the combiner's progress reports so the broker's queue stays
small. The combiner reassembles, verifies, decodes, validates and folds every update, then
sends its partial.

Figures: the combiner's RSS before the round (connected, idle), its peak RSS during the round
(ru_maxrss from inside the process, cross-checked by sampling it from outside with psutil)
for each N, the model size, and the growth from 10 to 500 devices. The design promises that a
combiner's memory is O(model size) whatever the fleet size. Target: growth <= 2 x model size.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import threading
import time

from _common import (
    RoundOpener,
    RssSampler,
    broker,
    emit,
    encode_update,
    log,
    maxrss_bytes,
    mb,
    model_bytes,
    model_weights,
    setup_logging,
)

PROJECT = "bench"
REGION = "region-0"
MODEL_VERSION = "bench-v1"
DEVICE_COUNTS = (10, 100, 500)
N_PUBLISHERS = 2
WINDOW = 6  # updates published ahead of the combiner's accepted count (all publishers)
TARGET_FACTOR = 2.0
TIMEOUT_S = 120.0


def _own_rss() -> int:
    """RSS of this process from /proc (no psutil import in the measured process)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# the measured process ----------------------------------------------------------------------
def combiner_process(url: str, pipe) -> None:
    import gc

    setup_logging()
    from edgefl.combiner import Combiner, CombinerConfig

    comb = Combiner(CombinerConfig(url, project=PROJECT, region=REGION)).start()
    time.sleep(0.3)  # let the connection settle (SUBACKs, the retained status)
    gc.collect()
    pipe.send(("ready", _own_rss()))
    end = time.monotonic() + TIMEOUT_S
    while comb.stats["partials"] < 1 and time.monotonic() < end:
        time.sleep(0.01)
    maxrss = maxrss_bytes()
    pipe.send(("done", {"maxrss": maxrss, "rss_after": _own_rss(), **comb.stats}))
    pipe.recv()
    comb.stop()


# the devices -------------------------------------------------------------------------------
def publisher(idx: int, url: str, pipe) -> None:
    setup_logging()
    from edgefl.protocol import Topics, decode
    from edgefl.protocol.chunking import DEFAULT_CHUNK_SIZE, split_payload
    from edgefl.transport import MqttConnection

    topics = Topics(PROJECT)
    weights = model_weights()
    progress = {"task": "", "accepted": 0}
    moved = threading.Condition()

    def on_progress(_topic: str, payload: bytes) -> None:
        msg = decode(payload, "progress")
        with moved:
            if msg["task_id"] == progress["task"]:
                progress["accepted"] = max(progress["accepted"], msg["accepted"])
                moved.notify_all()

    conn = MqttConnection(url, client_id=f"bench-mem-pub-{idx}", clean_session=True)
    conn.subscribe(topics.combiner(REGION, "progress"), on_progress)
    conn.start()
    try:
        while True:
            cmd = pipe.recv()
            if cmd[0] == "stop":
                return
            _, task_id, devices = cmd
            with moved:
                progress.update(task=task_id, accepted=0)
            infos = []
            for sent, dev in enumerate(devices):
                with moved:  # flow control: stay at most WINDOW updates ahead (all publishers)
                    moved.wait_for(
                        lambda sent=sent: N_PUBLISHERS * sent - progress["accepted"] < WINDOW,
                        timeout=TIMEOUT_S,
                    )
                # each device's update names its sender, as the combiner checks
                update = encode_update(weights, task_id, MODEL_VERSION, 100 + idx, dev)
                msgs = [
                    c.to_bytes()
                    for c in split_payload(update, DEFAULT_CHUNK_SIZE, meta={"task_id": task_id})
                ]
                topic = topics.device(REGION, dev, "update")
                infos += [conn.publish(topic, m, qos=1) for m in msgs]
                infos = [i for i in infos if not i.is_published()]
            for info in infos:
                info.wait_for_publish(TIMEOUT_S)
            pipe.send(("done", len(devices)))
    finally:
        conn.stop()


def _expect(pipe, what: str):
    if not pipe.poll(TIMEOUT_S):
        raise TimeoutError(f"no {what!r} from a child process")
    tag, value = pipe.recv()
    if tag != what:
        raise RuntimeError(f"expected {what!r}, got {tag!r}")
    return value


def measure(url: str, n: int, pub_pipes: list, opener: RoundOpener, weights: dict) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=combiner_process, args=(url, child), daemon=True)
    proc.start()
    try:
        rss_before = _expect(parent, "ready")
        sampler = RssSampler(proc.pid).start()
        task_id = f"bench-memory:{n}"
        devices = [f"dev-{k:04d}" for k in range(n)]
        opener.open_round(task_id, MODEL_VERSION, devices, weights, 256 * 1024, TIMEOUT_S)
        t0 = time.perf_counter()
        for i, pipe in enumerate(pub_pipes):
            pipe.send(("run", task_id, devices[i::N_PUBLISHERS]))
        for pipe in pub_pipes:
            _expect(pipe, "done")
        done = _expect(parent, "done")
        elapsed = time.perf_counter() - t0
        sampled_peak = sampler.stop()
        parent.send(("stop",))
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.terminate()
    if done["accepted"] != n or done["rejected"]:
        raise RuntimeError(f"N={n}: combiner accepted {done['accepted']}, rejected {done}")
    log(
        f"N={n:4d}: RSS before {mb(rss_before)} MB, peak {mb(done['maxrss'])} MB"
        f" (sampled {mb(sampled_peak)} MB), after {mb(done['rss_after'])} MB;"
        f" {n} updates in {elapsed:.1f} s"
    )
    return {
        "rss_before": rss_before,
        "peak": done["maxrss"],
        "sampled_peak": sampled_peak,
        "after": done["rss_after"],
        "seconds": elapsed,
    }


def main() -> None:
    setup_logging()

    weights = model_weights()
    size = model_bytes(weights)
    results: dict[int, dict] = {}
    with broker() as b:
        opener = RoundOpener(b.url, "bench-mem-ctl", PROJECT, REGION)
        ctx = mp.get_context("spawn")
        pipes, procs = [], []
        for i in range(N_PUBLISHERS):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=publisher, args=(i, b.url, child), daemon=True)
            p.start()
            pipes.append(parent)
            procs.append(p)
        try:
            for n in DEVICE_COUNTS:
                results[n] = measure(b.url, n, pipes, opener, weights)
        finally:
            for pipe in pipes:
                pipe.send(("stop",))
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.terminate()
            opener.stop()
    lo, hi = results[DEVICE_COUNTS[0]], results[DEVICE_COUNTS[-1]]
    growth = hi["peak"] - lo["peak"]
    emit(
        {
            "benchmark": "memory",
            "params": sum(w.size for w in weights.values()),
            "model_bytes": size,
            "devices": list(DEVICE_COUNTS),
            "rss_before_round_mb": {n: mb(r["rss_before"]) for n, r in results.items()},
            "peak_rss_mb": {n: mb(r["peak"]) for n, r in results.items()},
            "sampled_peak_rss_mb": {n: mb(r["sampled_peak"]) for n, r in results.items()},
            "rss_after_round_mb": {n: mb(r["after"]) for n, r in results.items()},
            "peak_over_baseline_mb": {
                n: mb(r["peak"] - r["rss_before"]) for n, r in results.items()
            },
            "round_s": {n: round(r["seconds"], 2) for n, r in results.items()},
            "growth_10_to_500_mb": mb(growth),
            "growth_over_model_size": round(growth / size, 3),
            "target": f"peak RSS growth from 10 to 500 devices <= {TARGET_FACTOR} x model size",
            "target_met": growth <= TARGET_FACTOR * size,
        }
    )


if __name__ == "__main__":
    sys.exit(main())
