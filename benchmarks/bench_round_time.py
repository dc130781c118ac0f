"""Round time of the demo setup on Mosquitto: 20 devices, 2 regions, 20 rounds, digits softmax.

Wired by edgefl.deploy.Deployment, like the demo and the tests: 2 regional combiners, 20 real
DeviceAgents (numpy trainer, one MQTT connection each, all in this process), a controller with
a SQLite store and a filesystem blob store in a temporary folder, plain FedAvg, all over a
private Mosquitto.
A round's time is ``finished - started`` of its stored record, as ``edgefl demo`` reports it.

Same-run baseline: the pure compute of one round with no MQTT, i.e. the 20 devices' local
training (the numpy trainer, with its local metrics), the weighted mean and the server-side
evaluation, in-process (the median over the 20 rounds of edgefl.tasks.digits' reference loop).
The final accuracy must be 0.925 +/- 0.003 (the digits reference). Target: median round < 0.25 s.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import broker, emit, log, setup_logging

from edgefl.store.base import RoundRecord, SessionRecord
from edgefl.tasks import digits

PROJECT = "bench"
DEVICES = 20
REGIONS = 2
ROUNDS = 20
TRAIN = {"model": "softmax", "lr": 0.1, "batch_size": 32, "epochs": 1}
TARGET_S = 0.25
ACCURACY = (0.925, 0.003)


def compute_baseline() -> tuple[list[float], list[float]]:
    """Per-round seconds and accuracies of the in-process loop (what a round must compute)."""
    from device_agent.trainers.base import TrainTask
    from device_agent.trainers.numpy_trainer import NumpyTrainer
    from edgefl.aggregation import WeightedSum, spec_of

    trainers = [NumpyTrainer(*digits.device_data(DEVICES, k)) for k in range(DEVICES)]
    w = digits.initial_weights(TRAIN["model"])
    spec = spec_of(w)
    times, accs = [], []
    for r in range(1, ROUNDS + 1):
        t0 = time.perf_counter()
        acc = WeightedSum(spec)
        for k, trainer in enumerate(trainers):
            res = trainer.train(w, TrainTask(round=r, config=TRAIN, seed=k))
            acc.fold(res.weights, float(res.num_examples))
        w = acc.mean({k: d for k, (d, _) in spec.items()})
        accs.append(digits.evaluator(w)["accuracy"])
        times.append(time.perf_counter() - t0)
    return times, accs


def federated_run(url: str, workdir: Path) -> tuple[list[float], list[float], list[float]]:
    from edgefl.controller import SessionConfig
    from edgefl.deploy import Deployment

    with Deployment(workdir, project=PROJECT, broker_url=url) as dep:
        dep.start_combiners(REGIONS)
        dep.start_fleet(DEVICES)
        ctl = dep.start_controller(evaluator=digits.evaluator)
        config = SessionConfig(
            session_id="bench-round-time",
            rounds=ROUNDS,
            min_devices=DEVICES,
            round_timeout_s=30,
            train=TRAIN,
        )
        ctl.create_session(config, digits.initial_weights(TRAIN["model"]))
        durations: list[float] = []
        walls: list[float] = []
        last = [time.perf_counter()]

        def on_round(rec: RoundRecord, _sess: SessionRecord) -> None:
            durations.append((rec.finished or time.time()) - rec.started)
            now = time.perf_counter()
            walls.append(now - last[0])
            last[0] = now
            log(
                f"round {rec.round:2d}: {durations[-1] * 1e3:6.1f} ms,"
                f" accuracy {rec.metrics['accuracy']:.4f}"
            )

        last[0] = time.perf_counter()
        ctl.run(config.session_id, on_round=on_round)
        rounds = [r for r in dep.store.list_rounds(config.session_id) if r.status == "completed"]
        accs = [r.metrics["accuracy"] for r in rounds]
        return durations, walls, accs


def main() -> None:
    setup_logging()
    log(f"compute baseline: {DEVICES} devices x {ROUNDS} rounds in-process")
    base_times, base_accs = compute_baseline()
    log(
        f"compute baseline: median {statistics.median(base_times) * 1e3:.1f} ms/round,"
        f" final accuracy {base_accs[-1]:.4f}"
    )
    with broker() as b, tempfile.TemporaryDirectory(prefix="edgefl-bench-rounds-") as tmp:
        t0 = time.perf_counter()
        durations, walls, accs = federated_run(b.url, Path(tmp))
        total = time.perf_counter() - t0
    med = statistics.median(durations)
    base = statistics.median(base_times)
    final = accs[-1] if accs else float("nan")
    acc_ok = len(accs) == ROUNDS and abs(final - ACCURACY[0]) <= ACCURACY[1]
    same_as_reference = len(accs) == ROUNDS and bool(np.allclose(accs, base_accs, atol=1e-9))
    emit(
        {
            "benchmark": "round_time",
            "devices": DEVICES,
            "regions": REGIONS,
            "rounds": len(accs),
            "broker": "mosquitto",
            "round_s_median": round(med, 4),
            "round_s_p90": round(float(np.percentile(durations, 90)), 4),
            "round_s_max": round(max(durations), 4),
            "wall_s_per_round_median": round(statistics.median(walls), 4),
            "baseline_compute_s_median": round(base, 4),
            "ratio": round(med / base, 2),
            "final_accuracy": round(final, 6),
            "accuracy_ok": acc_ok,
            "matches_reference_run": same_as_reference,
            "session_s": round(total, 2),
            "target": f"round_s_median < {TARGET_S} and final accuracy "
            f"{ACCURACY[0]} +/- {ACCURACY[1]}",
            "target_met": med < TARGET_S and acc_ok,
        }
    )


if __name__ == "__main__":
    sys.exit(main())
