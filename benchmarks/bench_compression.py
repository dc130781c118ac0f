"""Bytes per round and accuracy of each update encoding on the canonical digits task.

The demo's setup (20 devices on the non-IID Dirichlet(0.5) partition, 2 regions, 20 rounds,
softmax regression, lr 0.1, FedAvg), wired by ``edgefl.deploy.Deployment`` over a private
Mosquitto, once per ``compression``: ``none`` (the devices' float64 weights, today's
protocol), then the delta encodings ``float32``, ``float16``, ``int8`` and ``topk`` (10 %,
error feedback). ``bytes_up`` per round is what the combiners report folding (the update
payloads, CBOR message included); ratios are to ``float32``, the issue's baseline.
One DP session (int8, clip 1.0, z = 1.0) shows the privacy figures. Prints one JSON line.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import broker, emit, log, setup_logging

from edgefl.tasks import digits

PROJECT = "bench"
DEVICES = 20
REGIONS = 2
ROUNDS = 20
TRAIN = {"model": "softmax", "lr": 0.1, "batch_size": 32, "epochs": 1}
MODES = ("none", "float32", "float16", "int8", "topk")
TOPK_FRACTION = 0.1


def run_session(ctl: Any, session_id: str, **options: Any) -> dict[str, Any]:
    from edgefl.controller import SessionConfig

    config = SessionConfig(
        session_id=session_id,
        rounds=ROUNDS,
        min_devices=digits.devices_with_data(DEVICES),
        round_timeout_s=30,
        train=TRAIN,
        **options,
    )
    ctl.create_session(config, digits.initial_weights(TRAIN["model"]))
    t0 = time.perf_counter()
    ctl.run(session_id)
    rounds = [r for r in ctl.store.list_rounds(session_id) if r.status == "completed"]
    up = [r.metrics["bytes_up"] for r in rounds]
    out = {
        "rounds": len(rounds),
        "final_accuracy": round(rounds[-1].metrics["accuracy"], 4),
        "bytes_up_per_round": round(sum(up) / len(up)),
        "tensor_bytes_up_per_round": round(
            sum(r.metrics["tensor_bytes_up"] for r in rounds) / len(up)
        ),
        "bytes_down_per_round": round(sum(r.metrics["bytes_down"] for r in rounds) / len(up)),
        "session_s": round(time.perf_counter() - t0, 2),
    }
    if "dp_epsilon" in rounds[-1].metrics:
        out["epsilon_per_round"] = [round(r.metrics["dp_epsilon"], 3) for r in rounds]
        out["noise_std"] = round(rounds[-1].metrics["dp_noise_std"], 5)
    log(f"{session_id}: {out}")
    return out


def main() -> None:
    setup_logging()
    from edgefl.aggregation.privacy import DPConfig
    from edgefl.deploy import Deployment

    results: dict[str, Any] = {}
    with (
        broker() as b,
        tempfile.TemporaryDirectory(
            prefix="edgefl-bench-compress-", ignore_cleanup_errors=True
        ) as tmp,
        Deployment(Path(tmp), project=PROJECT, broker_url=b.url) as dep,
    ):
        dep.start_combiners(REGIONS)
        dep.start_fleet(DEVICES)
        ctl = dep.start_controller(evaluator=digits.evaluator)
        for mode in MODES:
            results[mode] = run_session(
                ctl, f"bench-{mode}", compression=mode, topk_fraction=TOPK_FRACTION
            )
        results["int8_dp"] = run_session(
            ctl,
            "bench-int8-dp",
            compression="int8",
            dp=DPConfig(clip_norm=1.0, noise_multiplier=1.0),
        )
    base = results["float32"]
    for mode in ("none", "float16", "int8", "topk", "int8_dp"):
        r = results[mode]
        r["bytes_vs_float32"] = round(r["bytes_up_per_round"] / base["bytes_up_per_round"], 4)
        r["tensor_bytes_vs_float32"] = round(
            r["tensor_bytes_up_per_round"] / base["tensor_bytes_up_per_round"], 4
        )
        r["accuracy_vs_float32"] = round(r["final_accuracy"] - base["final_accuracy"], 4)
    emit(
        {
            "benchmark": "compression",
            "devices": DEVICES,
            "regions": REGIONS,
            "rounds": ROUNDS,
            "model": TRAIN["model"],
            "broker": "mosquitto",
            "topk_fraction": TOPK_FRACTION,
            "results": results,
            "target": "int8 within 0.01 of float32 accuracy at <= 27% of its bytes; topk "
            "within 0.03 of FedAvg (none)",
            "target_met": abs(results["int8"]["accuracy_vs_float32"]) <= 0.01
            and results["int8"]["bytes_vs_float32"] <= 0.27
            and results["topk"]["final_accuracy"] >= results["none"]["final_accuracy"] - 0.03,
        }
    )


if __name__ == "__main__":
    sys.exit(main())
