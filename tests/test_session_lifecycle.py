"""Sessions can always go on, and one controller runs a session at a time.

A failed session keeps its reason and can be run again with a fresh attempt budget; a second
controller on a running session is refused (its lease is held), and the first finishes
undisturbed.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edgefl.api.app import create_app
from edgefl.controller import SessionBusy, SessionConfig, SessionFailed
from edgefl.controller.controller import Controller
from edgefl.store import make_store
from edgefl.store.blobs import FileBlobStore
from edgefl.tasks import digits
from tests.harness import Deployment, completed_accuracies


def test_a_failed_session_keeps_its_reason_and_runs_again_with_retry(deployment) -> None:
    dep = deployment
    dep.start_combiners(1)
    ctl = dep.controller()
    config = SessionConfig(
        rounds=2, min_devices=4, wait_for_devices_s=0.2, max_attempts=2, round_timeout_s=30
    )
    ctl.create_session(config, digits.initial_weights())
    with pytest.raises(SessionFailed, match="round 1 failed 2 times"):
        ctl.run(config.session_id)  # no devices yet
    failed = ctl.store.get_session(config.session_id)
    assert failed.status == "failed"
    assert "round 1 failed 2 times" in failed.reason and "devices online" in failed.reason
    client = TestClient(create_app(ctl.store, insecure=True))
    api = client.get(f"/api/sessions/{config.session_id}").json()
    assert api["status"] == "failed" and api["reason"] == failed.reason

    with pytest.raises(SessionFailed, match="retry"):
        ctl.run(config.session_id)  # a failed session does not silently start over
    dep.start_fleet(4)
    done = ctl.run(config.session_id, retry_failed=True)
    assert done.status == "completed" and done.reason == ""
    rounds = ctl.store.list_rounds(config.session_id)
    assert [(r.round, r.attempt, r.status) for r in rounds] == [
        (1, 0, "failed"),
        (1, 1, "failed"),
        (1, 2, "completed"),  # the retry continued the attempt numbering: ids stay unique
        (2, 0, "completed"),
    ]
    assert completed_accuracies(rounds) == pytest.approx(digits.reference_run(4, 2), abs=1e-9)


def test_a_second_controller_is_refused_while_the_first_runs(deployment) -> None:
    dep = deployment
    dep.start_combiners(2)
    dep.start_fleet(6)
    first = dep.controller(lease_ttl_s=5.0)
    config = SessionConfig(rounds=30, min_devices=6, round_timeout_s=30)
    first.create_session(config, digits.initial_weights())
    outcome: dict[str, object] = {}
    runner = threading.Thread(
        target=lambda: outcome.update(done=first.run(config.session_id)), daemon=True
    )
    runner.start()
    deadline = time.time() + 30
    while first.store.get_session(config.session_id).current_round < 1:
        assert time.time() < deadline, "the first controller never finished a round"
        time.sleep(0.01)

    store = dep.own(make_store(dep.state_url))  # a separate process would have its own pool
    second = dep.own(
        Controller(
            dep.url,
            store,
            FileBlobStore(dep.models_dir),
            project=dep.project,
            lease_ttl_s=5.0,
            lease_wait_s=0.3,  # it would take over an expired lease, never a live one
        ).start()
    )
    with pytest.raises(SessionBusy, match="is run by controller@"):
        second.run(config.session_id)
    assert first.store.get_session(config.session_id).status == "running"
    runner.join(60)
    done = outcome["done"]
    assert done.status == "completed" and done.current_round == 30
    rounds = first.store.list_rounds(config.session_id)
    assert [r.status for r in rounds] == ["completed"] * 30
    assert completed_accuracies(rounds) == pytest.approx(digits.reference_run(6, 30), abs=1e-9)
    # the session's lease went to the first controller only, and was let go at the end
    lease = store.get_lease(config.session_id)
    assert lease.holder == first.instance_id and lease.fence == 1 and lease.expires <= time.time()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real, tiny filesystem (tmpfs) for the model store: writes fail with ENOSPC."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(
            f"the disk-full test mounts a tmpfs, which needs root (make test runs as root): "
            f"{mounted.stderr.strip()}",
            pytrace=False,
        )
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_model_store_fails_the_session_cleanly_and_retry_continues(
    broker_url: str, tmp_path: Path, small_disk: Path
) -> None:
    dep = Deployment(broker_url, tmp_path, models_dir=small_disk)
    try:
        dep.start_combiners(1)
        dep.start_fleet(4)
        ctl = dep.controller()
        config = SessionConfig(rounds=20, min_devices=4, round_timeout_s=30)
        ctl.create_session(config, digits.initial_weights())
        with pytest.raises(SessionFailed, match="No space left on device"):
            ctl.run(config.session_id)
        sess = ctl.store.get_session(config.session_id)
        assert sess.status == "failed" and "No space left on device" in sess.reason
        assert 1 <= sess.current_round < 20
        # no half-written version: every recorded version's blob is there and intact
        for m in ctl.store.list_models(config.session_id):
            ctl.models.load(m.version)
        assert ctl.store.list_rounds(config.session_id)[-1].status == "failed"

        remount = ["mount", "-o", "remount,size=2m", str(small_disk)]
        subprocess.run(remount, check=True)  # the operator frees space
        done = ctl.run(config.session_id, retry_failed=True)
        assert done.status == "completed"
        rounds = ctl.store.list_rounds(config.session_id)
        assert completed_accuracies(rounds) == pytest.approx(
            digits.reference_run(4, 20), abs=1e-9
        )
    finally:
        dep.close()
