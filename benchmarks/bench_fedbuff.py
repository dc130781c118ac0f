"""Synchronous FedAvg vs FedBuff (async sessions) with stragglers: wall time to an accuracy.

10 devices on the canonical non-IID digits split (Dirichlet 0.5), 2 regions, softmax, lr 0.1,
over a private Mosquitto. 30 % of the devices are stragglers: each task takes them
``STRAGGLER_S`` seconds longer; the others answer after 20·k ms (device k). A synchronous
round waits for every device (the quorum is all 10), so it runs at the stragglers' pace.
FedBuff (K = 5, S = 16, a = 0.5) makes a version from each 5 updates; the stragglers' updates
arrive a few versions late and are discounted. Figures: wall time until the server-side
accuracy first reaches ``TARGET_ACCURACY``, final accuracy, versions per second, the
staleness of the applied updates and how many were refused as stale. Prints one JSON line.
"""

from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import broker, emit, log, setup_logging

from edgefl.tasks import digits

PROJECT = "bench"
DEVICES = 10
REGIONS = 2
STRAGGLERS = (7, 8, 9)
STRAGGLER_S = 1.0
SYNC_ROUNDS = 20
ASYNC_VERSIONS = 60
TARGET_ACCURACY = 0.90
ASYNC = {"buffer": 5, "max_staleness": 16, "staleness_exponent": 0.5}


def trainer_factory(k: int, X: np.ndarray, y: np.ndarray) -> Any:
    from device_agent.trainers.base import CallableTrainer, TrainTask
    from device_agent.trainers.numpy_trainer import NumpyTrainer

    inner = NumpyTrainer(X, y)
    pause = STRAGGLER_S if k in STRAGGLERS else 0.02 * k

    def train(weights: dict[str, np.ndarray], task: TrainTask) -> Any:
        time.sleep(pause)
        return inner.train(weights, task)

    return CallableTrainer(train)


def run_session(ctl: Any, session_id: str, rounds: int, **options: Any) -> dict[str, Any]:
    from edgefl.controller import SessionConfig

    config = SessionConfig(
        session_id=session_id,
        rounds=rounds,
        round_timeout_s=30,
        train={"model": "softmax", "lr": 0.1, "batch_size": 32, "epochs": 1},
        **options,
    )
    ctl.create_session(config, digits.initial_weights())
    t0 = time.time()
    ctl.run(session_id)
    done = [r for r in ctl.store.list_rounds(session_id) if r.status == "completed"]
    reached = [r for r in done if r.metrics["accuracy"] >= TARGET_ACCURACY]
    taus = collections.Counter(
        int(p["metrics"].get("staleness", 0)) for r in done for p in r.participants
    )
    out = {
        "versions": len(done),
        "final_accuracy": round(done[-1].metrics["accuracy"], 4),
        "session_s": round(time.time() - t0, 2),
        "s_to_target": round(reached[0].finished - t0, 2) if reached else None,
        "versions_to_target": reached[0].round if reached else None,
        "updates_per_version": round(float(np.mean([len(r.participants) for r in done])), 2),
        "staleness_counts": {str(k): v for k, v in sorted(taus.items())},
        "refused_stale": sum(
            1 for r in done for j in r.rejected if j["reason"].startswith("stale:")
        ),
    }
    log(f"{session_id}: {out}")
    return out


def main() -> None:
    setup_logging()
    from edgefl.deploy import Deployment

    with (
        broker() as b,
        tempfile.TemporaryDirectory(
            prefix="edgefl-bench-fedbuff-", ignore_cleanup_errors=True
        ) as tmp,
        Deployment(Path(tmp), project=PROJECT, broker_url=b.url) as dep,
    ):
        dep.start_combiners(REGIONS)
        dep.start_fleet(DEVICES, trainer_factory=trainer_factory)
        ctl = dep.start_controller(evaluator=digits.evaluator)
        sync = run_session(ctl, "bench-sync", SYNC_ROUNDS, min_devices=DEVICES)
        time.sleep(STRAGGLER_S + 0.5)  # the stragglers finish their last task
        fedbuff = run_session(
            ctl, "bench-fedbuff", ASYNC_VERSIONS, mode="async", asynchronous=ASYNC
        )
    speedup = (
        round(sync["s_to_target"] / fedbuff["s_to_target"], 2)
        if sync["s_to_target"] and fedbuff["s_to_target"]
        else None
    )
    emit(
        {
            "benchmark": "fedbuff",
            "devices": DEVICES,
            "regions": REGIONS,
            "stragglers": len(STRAGGLERS),
            "straggler_extra_s": STRAGGLER_S,
            "broker": "mosquitto",
            "target_accuracy": TARGET_ACCURACY,
            "async": ASYNC,
            "sync": sync,
            "fedbuff": fedbuff,
            "speedup_to_target": speedup,
            "target": f"FedBuff reaches {TARGET_ACCURACY} accuracy in at most half the wall time "
            "of synchronous FedAvg",
            "target_met": speedup is not None and speedup >= 2.0,
        }
    )


if __name__ == "__main__":
    main()
