"""What observability costs a round: the demo setup with traces and JSON logs on, against off.

20 real DeviceAgents (numpy trainer), 2 regional combiners and a controller in this process,
over a private Mosquitto (edgefl.deploy.Deployment, as bench_round_time). Four sessions of 10
digits rounds each, alternating: tracing and JSON logs off, then on, then off, then on (so
drift on a shared machine hits both alike). "On" is every span of every tier (1 round span,
2 region spans, and per device a task, download, train and upload span plus the combiner's
update span: 103 spans a round) exported in batches from a background thread, as the OTLP
exporter does (into memory here, so the network is not what is measured), and JSON log lines
at info (with their context fields) written to a file.

A round's time is ``finished - started`` of its stored record; the first round of each session
is left out (it includes the fleet's first model download). Every session must reproduce the
single-process reference run exactly (tracing changes no arithmetic). Target: the median
traced round at most 1.15 x the median untraced one.
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import broker, emit, log, setup_logging

from edgefl.tasks import digits

DEVICES = 20
REGIONS = 2
ROUNDS = 10
TRAIN = {"model": "softmax", "lr": 0.1, "batch_size": 32, "epochs": 1}
TARGET_RATIO = 1.15


def session(url: str, workdir: Path, traced: bool, name: str) -> tuple[list[float], int, int]:
    """One session's round times (from round 2), spans exported, and JSON log lines written."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from edgefl.controller import SessionConfig
    from edgefl.deploy import Deployment
    from edgefl.observability.logs import configure_logging
    from edgefl.observability.tracing import configure_tracing, shutdown_tracing

    exporter = InMemorySpanExporter()
    workdir.mkdir(parents=True)
    log_file = workdir / "edgefl.jsonl"
    if traced:
        configure_tracing(exporter=exporter, service_name="bench", batch=True)
        configure_logging(True, "info", log_file)
    try:
        with Deployment(workdir, project=name, broker_url=url) as dep:
            dep.start_combiners(REGIONS)
            dep.start_fleet(DEVICES)
            ctl = dep.start_controller(evaluator=digits.evaluator)
            config = SessionConfig(
                session_id=name, rounds=ROUNDS, min_devices=DEVICES, round_timeout_s=30, train=TRAIN
            )
            ctl.create_session(config, digits.initial_weights(TRAIN["model"]))
            ctl.run(config.session_id)
            rounds = [r for r in dep.store.list_rounds(name) if r.status == "completed"]
    finally:
        shutdown_tracing()  # flushes the batch processor
        configure_logging(False, "warning")  # back to text on stderr
    accs = [r.metrics["accuracy"] for r in rounds]
    reference = digits.reference_run(DEVICES, ROUNDS)
    if len(accs) != ROUNDS or not np.allclose(accs, reference, atol=1e-9):
        raise SystemExit(f"{name}: accuracies {accs} differ from the reference run {reference}")
    times = [(r.finished or 0.0) - r.started for r in rounds[1:]]
    lines = len(log_file.read_text().splitlines()) if log_file.exists() else 0
    return times, len(exporter.get_finished_spans()), lines


def main() -> None:
    setup_logging()
    times: dict[bool, list[float]] = {False: [], True: []}
    spans = lines = 0
    with broker() as b, tempfile.TemporaryDirectory(prefix="edgefl-bench-tracing-") as tmp:
        for i, traced in enumerate((False, True, False, True)):
            got, n_spans, n_lines = session(b.url, Path(tmp) / str(i), traced, f"trial{i}")
            times[traced].extend(got)
            spans += n_spans
            lines += n_lines
            log(
                f"trial {i} ({'on' if traced else 'off'}): median "
                f"{statistics.median(got) * 1e3:.1f} ms/round, {n_spans} spans, {n_lines} lines"
            )
    off, on = statistics.median(times[False]), statistics.median(times[True])
    ratio = on / off
    emit(
        {
            "benchmark": "tracing",
            "devices": DEVICES,
            "regions": REGIONS,
            "rounds_per_trial": ROUNDS,
            "broker": "mosquitto",
            "round_s_median_traced": round(on, 4),
            "round_s_median_untraced": round(off, 4),
            "ratio": round(ratio, 3),
            "spans_per_round": round(spans / (2 * ROUNDS), 1),
            "json_log_lines": lines,
            "sessions_match_reference": True,
            "target": f"traced median <= {TARGET_RATIO} x untraced",
            "target_met": ratio <= TARGET_RATIO,
        }
    )
    logging.shutdown()


if __name__ == "__main__":
    sys.exit(main())
