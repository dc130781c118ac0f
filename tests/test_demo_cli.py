"""`edgefl demo`, the README's main job, run exactly as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgefl.tasks import digits

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` leaves them out


def _demo(tmp_path, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "edgefl.cli.main", "demo", "--workdir", str(tmp_path / "w"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out.stdout
    return json.loads(lines[0])


def test_demo_reproduces_the_reference_on_the_embedded_broker(tmp_path) -> None:
    result = _demo(
        tmp_path, "--devices", "20", "--regions", "2", "--rounds", "20", "--no-dashboard"
    )
    assert abs(result["final_accuracy"] - 0.925) <= 0.003
    assert (result["rounds"], result["devices"], result["regions"]) == (20, 20, 2)
    assert result["broker"] == "embedded-amqtt"
    assert 0 < result["round_s_median"] < result["total_s"]
    assert (tmp_path / "w" / "state.db").exists()


def test_demo_on_mosquitto_with_the_dashboard(tmp_path, mosquitto) -> None:
    result = _demo(
        tmp_path,
        "--devices",
        "10",
        "--regions",
        "3",
        "--rounds",
        "5",
        "--broker",
        mosquitto.url,
        "--insecure",  # the suite's Mosquitto is anonymous; without it the demo refuses
        "--dashboard-port",
        "0",
        "--no-serve-after",
    )
    assert result["final_accuracy"] == pytest.approx(digits.reference_run(10, 5)[-1], abs=1e-6)
    assert result["dashboard"].startswith("http://127.0.0.1:")
    assert result["broker"] == "external"
