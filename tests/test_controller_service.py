"""The controller as a service (``ControllerService``, ``edgefl controller --serve``) and the
fleet state it records: real controllers on the embedded broker, simulated devices, and a
state store on PostgreSQL shared by two serving controllers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from edgefl.auth.tokens import Role
from edgefl.controller import Controller, SessionConfig
from edgefl.controller.fleet_state import FleetRecorder
from edgefl.controller.presence import Presence
from edgefl.controller.service import ControllerService, project_lease_key
from edgefl.controller.session_setup import new_session
from edgefl.protocol import Topics, encode
from edgefl.store import make_store
from edgefl.store.base import SessionRecord, Store
from edgefl.store.blobs import FileBlobStore
from edgefl.tasks import digits
from tests.harness import Deployment

DEVICES = 3


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def _queue(dep: Deployment, store: Store, sid: str, rounds: int = 2) -> None:
    config = SessionConfig(
        session_id=sid,
        rounds=rounds,
        min_devices=DEVICES,
        round_timeout_s=20,
        train={"lr": 0.1, "batch_size": 32},
    )
    blobs = FileBlobStore(dep.models_dir)
    new_session(store, blobs, dep.project, config, digits.initial_weights(), status="queued")


def _service(ctl: Controller) -> ControllerService:
    return ControllerService(ctl, poll_s=0.1, evaluator_for=lambda _cfg: digits.evaluator)


def _done(store: Store, sids: list[str]) -> list[SessionRecord] | None:
    found = [store.get_session(s) for s in sids]
    ended = [s for s in found if s is not None and s.status in ("completed", "failed", "stopped")]
    return ended if len(ended) == len(sids) else None


def test_two_serving_controllers_on_one_postgresql_store_never_run_one_session_twice(
    embedded_broker, tmp_path, postgres_url
) -> None:
    dep = Deployment(embedded_broker.url, tmp_path, state_url=postgres_url)
    try:
        dep.start_combiners(1)
        dep.start_fleet(DEVICES)
        first = dep.controller()
        other_store = dep.own(make_store(postgres_url))  # a second process's own connections
        second = Controller(
            dep.url,
            other_store,
            FileBlobStore(dep.models_dir),
            project=dep.project,
            evaluator=digits.evaluator,
            controller_id="controller-b",
            **dep.credentials.login("controller", Role.controller),
        )
        dep.own(second.start())
        wait_for("devices", lambda: len(second.presence.eligible()) >= DEVICES, 20)
        sids = [f"q-{i}" for i in range(4)]
        for sid in sids:
            _queue(dep, dep.store, sid)
        services = [dep.own(_service(first).start()), dep.own(_service(second).start())]
        ended = wait_for("every queued session", lambda: _done(dep.store, sids), 120)
        assert [s.status for s in ended] == ["completed"] * len(sids)
        ran = [set(s.ran) for s in services]
        assert ran[0].isdisjoint(ran[1]) and ran[0] | ran[1] == set(sids)
        reference = digits.reference_run(DEVICES, 2)
        spans = []
        for sid in sids:
            rounds = dep.store.list_rounds(sid)
            # each round ran once, by one controller, under the first lease it ever had
            assert [(r.round, r.attempt, r.status) for r in rounds] == [
                (1, 0, "completed"),
                (2, 0, "completed"),
            ]
            assert [r.metrics["accuracy"] for r in rounds] == pytest.approx(reference, abs=1e-9)
            lease = dep.store.get_lease(sid)
            assert lease is not None and lease.fence == 1 and lease.expires == 0.0
            spans.append((rounds[0].started, rounds[-1].finished))
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end is not None and end <= start  # one session of a project at a time
        slot = dep.store.get_lease(project_lease_key(dep.project))
        assert slot is not None and slot.expires == 0.0  # released after each session
    finally:
        dep.close()


def test_a_serving_controller_takes_over_a_session_whose_controller_died(
    embedded_broker, tmp_path
) -> None:
    dep = Deployment(embedded_broker.url, tmp_path)
    try:
        dep.start_combiners(1)
        dep.start_fleet(DEVICES)
        ctl = dep.controller()
        wait_for("devices", lambda: len(ctl.presence.eligible()) >= DEVICES, 20)
        config = SessionConfig(
            session_id="orphan", rounds=2, min_devices=DEVICES, train={"lr": 0.1}
        )
        ctl.create_session(config, digits.initial_weights())  # running, as a controller left it
        assert dep.store.acquire_lease("orphan", "dead@elsewhere:1:0", 0.3) == 1
        service = dep.own(_service(ctl))
        assert service.next_session() is None  # its lease is live: not ours
        time.sleep(0.4)
        assert service.next_session() == ("orphan", False)
        service.start()
        [done] = wait_for("the take-over", lambda: _done(dep.store, ["orphan"]), 60)
        assert (done.status, done.current_round) == ("completed", 2)
        assert dep.store.get_lease("orphan").fence == 2  # taken over: the fence went up
        accs = [r.metrics["accuracy"] for r in dep.store.list_rounds("orphan")]
        assert accs == pytest.approx(digits.reference_run(DEVICES, 2), abs=1e-9)
    finally:
        dep.close()


def test_a_session_that_cannot_run_fails_and_the_service_goes_on(embedded_broker, tmp_path) -> None:
    dep = Deployment(embedded_broker.url, tmp_path)
    try:
        dep.start_combiners(1)
        dep.start_fleet(DEVICES)
        ctl = dep.controller()
        wait_for("devices", lambda: len(ctl.presence.eligible()) >= DEVICES, 20)
        broken = SessionConfig(session_id="broken", rounds=1, package="ab" * 32)
        dep.store.create_session(
            SessionRecord("broken", dep.project, broken.model_dump(), "queued", 0, "gone", 1, 1)
        )
        _queue(dep, dep.store, "fine", rounds=1)
        service = dep.own(_service(ctl).start())
        ended = wait_for("both", lambda: _done(dep.store, ["broken", "fine"]), 60)
        assert [s.status for s in ended] == ["failed", "completed"]
        assert "could not run it" in ended[0].reason
        assert service.ran == ["broken", "fine"]
    finally:
        dep.close()


def test_the_fleet_recorder_batches_a_thousand_statuses_into_one_write(tmp_path) -> None:
    """At 1,000 devices a status flood is one transaction, not 1,000; counts from two
    controllers add up instead of overwriting each other."""
    store = make_store(f"sqlite:///{tmp_path / 'state.db'}")
    topics = Topics("big")
    presence = Presence(topics)
    recorder = FleetRecorder(store, topics, flush_s=3600)  # flushed by hand here
    presence.on_change = recorder.on_presence
    for i in range(1000):
        status = encode("status", state="online", ts=time.time(), agent="1.2", board="pi4")
        presence.on_device_status(topics.device(f"r{i % 4}", f"d{i:04d}", "status"), status)
    assert store.count_devices("big") == 0  # nothing written per message
    recorder.flush()
    assert recorder.flushes == 1 and store.count_devices("big") == 1000
    assert store.count_devices("big", region="r1", state="online") == 250
    one = store.get_device("big", "d0001")
    assert one is not None and (one.region, one.state) == ("r1", "online")
    assert one.attributes == {"agent": "1.2", "board": "pi4"}
    offline = encode("status", state="offline", ts=time.time())
    presence.on_device_status(topics.device("r1", "d0001", "status"), offline)
    recorder.flush()
    recorder.flush()  # nothing pending: no transaction
    assert recorder.flushes == 2
    assert store.get_device("big", "d0001").state == "offline"
    assert store.count_devices("big", state="offline") == 1
    other = FleetRecorder(store, topics, flush_s=3600)
    for rec in (recorder, other):
        rec.on_progress(
            topics.combiner("r0", "progress"),
            encode("progress", task_id="s:3:0", region="r0", accepted=2, rejected=1),
        )
    combiner_status = encode("status", state="online", ts=time.time(), combiner="comb-a")
    presence.on_combiner_status(topics.combiner("r0", "status"), combiner_status)
    recorder.on_progress(  # the same round, further on: only the increment counts
        topics.combiner("r0", "progress"),
        encode("progress", task_id="s:3:0", region="r0", accepted=5, rejected=1),
    )
    recorder.flush()
    other.flush()
    [comb] = store.list_combiners("big")
    assert (comb.combiner, comb.state, comb.current_round) == ("comb-a", "online", 3)
    assert (comb.accepted, comb.rejected) == (5 + 2, 1 + 1)
    store.close()
