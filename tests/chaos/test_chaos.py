"""Chaos suite: each fault strikes a live session of real processes on a real Mosquitto.

Every tier is an OS process started the way an operator would (``edgefl combiner``,
``edgefl controller``, ``edgefl simulate``, ``edgefl-agent``); the faults are real too: SIGKILL,
a cut TCP link, a full filesystem, hostile MQTT clients. Each case demands the same outcome:

* the session completes (``status == "completed"``, every round recorded once as completed);
* no model version is lost: the completed rounds chain from the initial model to the session's
  model, each version's blob is present and verifies against its recorded digest, and no
  half-written file is left in the model store;
* the accuracies are exactly those of the single-process reference for the devices that took
  part: ``digits.reference_run`` when every device took part in every round, otherwise the same
  FedAvg loop replayed over the recorded participants (and the stored weights must match it).

docs/reliability.md maps each fault to its guarantee and to the test here that checks it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefl.controller.model_versions import ModelRepository
from edgefl.deploy import random_project
from edgefl.models.numpy_models import train_epochs
from edgefl.protocol import Topics, encode
from edgefl.store.base import RoundRecord
from edgefl.store.blobs import FileBlobStore
from edgefl.tasks import digits
from edgefl.transport import parse_broker_url
from tests.chaos.procs import (
    Cluster,
    LinkProxy,
    PersistentMosquitto,
    Proc,
    Procs,
    Watcher,
    blob_digest,
    device_name,
    last_json_line,
    mqtt_client,
    retained_models,
    wait_until,
)

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` leaves them out

N_DEVICES = 10
REGIONS = 2
SESSION_DONE_S = 150  # a controller that has not finished by then is stuck


# fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PersistentMosquitto]:
    """A private Mosquitto with persistence on, on a free loopback port, anonymous."""
    mq = PersistentMosquitto(tmp_path / "broker")
    mq.start()
    yield mq
    mq.stop()


@pytest.fixture
def procs(tmp_path: Path, broker: PersistentMosquitto) -> Iterator[Procs]:
    """The test's child processes; every process group still alive is ended afterwards,
    before the broker stops (so nothing logs a lost broker on the way out)."""
    p = Procs(tmp_path / "logs")
    yield p
    p.close()


@pytest.fixture
def cluster(procs: Procs, broker: PersistentMosquitto, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(procs, broker.url, tmp_path, random_project())
    yield c
    c.close()


@pytest.fixture
def watcher(cluster: Cluster) -> Iterator[Watcher]:
    w = Watcher(cluster.url, cluster.project)
    yield w
    w.stop()


# helpers -------------------------------------------------------------------------------------
def region_of(k: int, regions: int = REGIONS) -> str:
    return f"region-{k % regions}"


def start_tiers(
    cluster: Cluster, watcher: Watcher, n: int = N_DEVICES, regions: int = REGIONS
) -> list[Proc]:
    """One ``edgefl combiner`` per region and ``edgefl simulate`` with n devices, all online."""
    parts = [cluster.combiner(f"region-{i}") for i in range(regions)]
    parts.append(cluster.simulate(n, regions))
    wait_online(cluster, watcher, parts, {device_name(k) for k in range(n)}, regions)
    return parts


def wait_online(
    cluster: Cluster, watcher: Watcher, parts: list[Proc], devices: set[str], regions: int
) -> None:
    want = {f"region-{i}" for i in range(regions)}
    wait_until(
        lambda: watcher.online_combiners() >= want and watcher.online_devices() >= devices,
        60,
        f"{len(want)} combiners and {len(devices)} devices online",
        cluster.procs,
        parts,
    )


def session_config(**overrides: object) -> dict[str, object]:
    """Short deadlines so that a fault costs seconds, not minutes."""
    return {
        "rounds": 5,
        "min_devices": N_DEVICES,
        "round_timeout_s": 8.0,
        "close_grace_s": 2.0,
        "wait_for_devices_s": 30.0,
        **overrides,
    }


def rounds_of(cluster: Cluster, sid: str) -> list[RoundRecord]:
    return cluster.store.list_rounds(sid) if cluster.store.get_session(sid) else []


def round_running(cluster: Cluster, sid: str, r: int) -> bool:
    return any(x.round == r and x.status == "running" for x in rounds_of(cluster, sid))


def finish(ctl: Proc, timeout: float = SESSION_DONE_S) -> None:
    """The controller process must end the session by itself, with exit code 0."""
    rc = ctl.wait(timeout)
    assert rc == 0, f"{ctl.name} exited with {rc}; log tail:\n{ctl.tail()}"


def describe(rounds: list[RoundRecord]) -> str:
    return "\n".join(
        f"  round {r.round} attempt {r.attempt}: {r.status} {r.reason!r} "
        f"participants={len(r.participants)} rejected={len(r.rejected)}"
        for r in rounds
    )


def assert_no_version_lost(cluster: Cluster, sid: str) -> list[RoundRecord]:
    """The session completed and its model history is whole; returns the completed rounds.

    Completed rounds 1..R each appear once and chain from the initial model (round r's input
    is round r-1's output); each output is a recorded version whose parent is that input and
    whose blob verifies; the session points at the last one; no attempt is left 'running';
    and no temporary or unrecorded file sits in the model store.
    """
    store = cluster.store
    sess = store.get_session(sid)
    rounds = store.list_rounds(sid)
    cfg_rounds = sess.config["rounds"]
    assert sess.status == "completed" and sess.current_round == cfg_rounds, (
        f"session {sid}: {sess.status} after round {sess.current_round} of {cfg_rounds}\n"
        + describe(rounds)
    )
    assert not [r for r in rounds if r.status == "running"], describe(rounds)
    done = [r for r in rounds if r.status == "completed"]
    assert [r.round for r in done] == list(range(1, cfg_rounds + 1)), describe(rounds)
    models = {m.version: m for m in store.list_models(sid)}
    initial = [m.version for m in models.values() if m.round == 0]
    assert len(initial) == 1, initial
    repo = ModelRepository(store, FileBlobStore(cluster.models_dir))
    current = initial[0]
    repo.load(current)
    for r in done:
        assert r.model_in == current, f"round {r.round} trained {r.model_in}, not {current}"
        rec = models.get(r.model_out or "")
        assert rec is not None, f"round {r.round}: output {r.model_out} has no record"
        assert rec.parent == current and rec.round == r.round, rec
        repo.load(rec.version)  # raises if the blob is missing or does not verify
        current = rec.version
    assert sess.model_version == current
    assert_store_files_whole(cluster, sid)
    return done


def assert_store_files_whole(cluster: Cluster, sid: str, ignore: tuple[str, ...] = ()) -> None:
    """Every file in the model store is a recorded blob that verifies (or its optimizer
    state); nothing half-written, temporary or unrecorded is left behind."""
    models = {m.version: m for m in cluster.store.list_models(sid)}
    for path in sorted(cluster.models_dir.iterdir()):
        if path.name in ignore:
            continue
        base = path.name.removesuffix(".opt")
        assert base in models, f"{path.name} in the model store is not a recorded version"
        if path.name == base:
            assert blob_digest(path.read_bytes()) == models[base].digest, f"{path} is corrupt"


def replay_reference(cluster: Cluster, done: list[RoundRecord], partition: int) -> None:
    """The digits FedAvg loop replayed over the recorded participants of each round.

    Checks each participant's example count against its partition, the accuracy of every
    round (within 1e-9) and the stored weights (within 1e-9): any lost, duplicated,
    mis-weighted or corrupted update changes them.
    """
    d = digits.load()
    parts = digits.partition(d.ytr, partition)
    repo = ModelRepository(cluster.store, FileBlobStore(cluster.models_dir))
    w = digits.initial_weights("softmax")
    devices = {device_name(k): k for k in range(partition)}
    for rec in done:
        strangers = sorted({p["device"] for p in rec.participants} - set(devices))
        assert not strangers, (
            f"round {rec.round} counted updates for {strangers}, which never trained: "
            f"participants {[(p['device'], p['n']) for p in rec.participants]}"
        )
        ks = sorted(devices[p["device"]] for p in rec.participants)
        assert ks, f"round {rec.round} has no participants"
        for p in rec.participants:
            assert p["n"] == len(parts[devices[p["device"]]]), f"round {rec.round}: {p}"
        new = [
            train_epochs(w, d.Xtr[parts[k]], d.ytr[parts[k]], round_=rec.round, seed=k) for k in ks
        ]
        sizes = [float(len(parts[k])) for k in ks]
        w = {n: sum(s * u[n] for s, u in zip(sizes, new, strict=True)) / sum(sizes) for n in w}
        assert rec.metrics["accuracy"] == pytest.approx(
            digits.evaluator(w)["accuracy"], abs=1e-9
        ), f"round {rec.round}"
        stored, _ = repo.load(rec.model_out or "")
        for name in w:
            assert np.max(np.abs(stored[name] - w[name])) < 1e-9, (rec.round, name)


def accuracies(done: list[RoundRecord]) -> list[float]:
    return [r.metrics["accuracy"] for r in done]


def all_participants(done: list[RoundRecord]) -> list[set[str]]:
    return [{p["device"] for p in r.participants} for r in done]


class SilentDevice:
    """A device that announces itself and never trains: every round it is selected in lasts
    until the deadline, which stretches a session to a known length."""

    def __init__(self, url: str, project: str, region: str, name: str) -> None:
        topics = Topics(project)
        self.status = topics.device(region, name, "status")
        self.client = mqtt_client(url, f"edgefl-{project}-{name}")
        addr = parse_broker_url(url)
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        self.client.subscribe(topics.device(region, name, "task"), qos=1)
        online = encode("status", state="online", ts=time.time(), device=name, region=region)
        self.client.publish(self.status, online, qos=1, retain=True).wait_for_publish(10)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def silent_device(cluster: Cluster, watcher: Watcher, region: str) -> Iterator[SilentDevice]:
    """A ``SilentDevice`` named 'silent', online (as the watcher sees it) for the block."""
    dev = SilentDevice(cluster.url, cluster.project, region, "silent")
    try:
        wait_until(lambda: "silent" in watcher.online_devices(), 10, "the silent device online")
        yield dev
    finally:
        dev.stop()


# 1. broker -----------------------------------------------------------------------------------
def test_broker_sigkilled_mid_round_restarts_from_an_older_persistence_file(
    cluster: Cluster, broker: PersistentMosquitto, watcher: Watcher, procs: Procs
) -> None:
    """Mosquitto is SIGKILLed mid-round 4, after the controller published round 3's model,
    and restarts from a persistence file written after round 1: that model's retained chunks,
    the round's queued tasks and all session state since are gone. The devices were frozen
    (SIGSTOP) before they could fetch the model, so after the restart they need it from the
    broker. The session must still complete on the reference trajectory, and the broker must
    end up holding the current model, complete and verified."""
    parts = start_tiers(cluster, watcher)
    fleet = parts[-1]
    sid = "brokerkill"
    everyone = {device_name(k) for k in range(N_DEVICES)}

    def round3_uploaded() -> bool:
        with watcher.lock:
            return any(
                t.startswith(f"{sid}:3:") and everyone <= set(u)
                for t, u in watcher.update_chunks.items()
            )

    # the silent device keeps each round open until its deadline: room to act mid-round
    with silent_device(cluster, watcher, "region-1"):
        cluster.create_session(
            sid, **session_config(rounds=6, round_timeout_s=2.0, close_grace_s=1.0)
        )
        ctl = cluster.controller("controller", "--resume", sid)
        wait_until(
            lambda: cluster.store.get_session(sid).current_round >= 1, 60, "round 1", procs, [ctl]
        )
        snapshot_at = broker.snapshot()
        wait_until(round3_uploaded, 60, "round-3 uploads", procs, [ctl, *parts])
        assert round_running(cluster, sid, 3), "round 3 closed before the devices were frozen"
        fleet.signal(signal.SIGSTOP)  # every device is frozen before round 3's model is out
        try:
            version = wait_until(
                lambda: next(
                    (v for v in list(watcher.models) if v.startswith(f"{sid}-r0003-")), None
                ),
                30,
                "the round-3 model published",
                procs,
                [ctl],
            )
            wait_until(lambda: round_running(cluster, sid, 4), 30, "round 4", procs, [ctl])
            broker.kill()
            killed_at = time.time()
            time.sleep(1.0)
            broker.restart()
        finally:
            fleet.signal(signal.SIGCONT)
        assert snapshot_at < watcher.models[version] <= killed_at, "persistence file not older"
        finish(ctl)
    done = assert_no_version_lost(cluster, sid)
    assert accuracies(done) == pytest.approx(digits.reference_run(N_DEVICES, 6), abs=1e-9)
    # devices that join now must find the current model: retained, complete, verified
    current = cluster.store.get_session(sid).model_version
    retained = retained_models(cluster.url, cluster.project)
    assert retained.get(current) is not None, f"{current} not retained after the restart"
    assert blob_digest(retained[current] or b"") == cluster.store.get_model(current).digest
    procs.check_alive(*parts)


# 2. combiner ---------------------------------------------------------------------------------
def test_combiner_sigkilled_mid_round_restarts(
    cluster: Cluster, watcher: Watcher, procs: Procs
) -> None:
    """A regional combiner is SIGKILLed holding an open round (its honest devices' updates
    folded, one device still to answer) and started again at once: the round it lost is
    redone and the session ends on the reference."""
    parts = start_tiers(cluster, watcher)
    sid = "combkill"
    region0 = {device_name(k) for k in range(0, N_DEVICES, REGIONS)}
    with silent_device(cluster, watcher, "region-0"):  # keeps region-0's rounds open
        cluster.create_session(sid, **session_config(round_timeout_s=2.0, close_grace_s=1.0))
        ctl = cluster.controller("controller", "--resume", sid)

        def region0_uploaded() -> bool:
            with watcher.lock:
                return any(
                    task.startswith(f"{sid}:3:") and region0 <= set(per)
                    for task, per in watcher.update_chunks.items()
                )

        wait_until(region0_uploaded, 90, "round-3 uploads to region-0", procs, [ctl, *parts])
        time.sleep(0.3)  # let the combiner fold them
        assert round_running(cluster, sid, 3), "the kill would not land mid-round"
        parts[0].kill()
        restarted = cluster.combiner("region-0")
        finish(ctl)
    done = assert_no_version_lost(cluster, sid)
    assert accuracies(done) == pytest.approx(digits.reference_run(N_DEVICES, 5), abs=1e-9)
    procs.check_alive(restarted, *parts[1:])


# 3. controller --------------------------------------------------------------------------------
def test_controller_sigkilled_mid_round_resumes(
    cluster: Cluster, watcher: Watcher, procs: Procs
) -> None:
    """The controller is SIGKILLed while round 3 is open and its updates are in; ``edgefl
    controller --resume`` finishes the session exactly where an uninterrupted one would end."""
    parts = start_tiers(cluster, watcher)
    sid = "ctlkill"
    with silent_device(cluster, watcher, "region-1"):  # keeps every round open to its deadline
        cluster.create_session(sid, **session_config(round_timeout_s=2.0, close_grace_s=1.0))
        first = cluster.controller("controller", "--resume", sid)

        def uploading() -> bool:
            with watcher.lock:
                return any(
                    t.startswith(f"{sid}:3:") and u for t, u in watcher.update_chunks.items()
                )

        wait_until(uploading, 90, "round-3 uploads", procs, [first, *parts])
        assert round_running(cluster, sid, 3), "the kill would not land mid-round"
        first.kill()
        assert cluster.store.get_session(sid).status == "running"
        resumed = cluster.controller("controller-resumed", "--resume", sid)
        finish(resumed)
    done = assert_no_version_lost(cluster, sid)
    assert accuracies(done) == pytest.approx(digits.reference_run(N_DEVICES, 5), abs=1e-9)
    current = cluster.store.get_session(sid).model_version
    retained = retained_models(cluster.url, cluster.project)
    assert retained.get(current) is not None and len(retained) <= 2, sorted(retained)
    procs.check_alive(*parts)


# 4. two controllers -----------------------------------------------------------------------------
def test_second_controller_on_a_running_session_refuses_or_waits(
    cluster: Cluster, watcher: Watcher, procs: Procs
) -> None:
    """While controller A runs a session, controller B is started on it. Exactly one runs
    rounds at any time: A's rounds go on undisturbed (one attempt each, none overlapping), and
    B waits, or exits non-zero with a refusal that names the session. When A then dies
    (SIGKILL), the session is not stuck in 'running': B takes over, or ``--resume`` does
    within a bounded time, and the session ends on the reference."""
    parts = start_tiers(cluster, watcher)
    with silent_device(cluster, watcher, "region-0"):
        sid = "twoctl"
        rounds = 10
        # the silent device is selected and never answers: each round lasts its deadline
        cluster.create_session(
            sid, **session_config(rounds=rounds, round_timeout_s=1.5, close_grace_s=1.0)
        )
        # A's hold on the session outlives it by 3 s; B may wait up to its own 30 s + 2 s for
        # it. So when A dies, B is still waiting and must take over from where A got to
        a = cluster.controller("controller-a", "--resume", sid, "--lease-ttl", "3")
        wait_until(lambda: round_running(cluster, sid, 2), 60, "round 2 running", procs, [a])
        b = cluster.controller("controller-b", "--resume", sid, "--lease-ttl", "30")
        with_b = cluster.store.get_session(sid).current_round
        # A must run three more rounds, undisturbed, while B starts, connects and decides
        wait_until(
            lambda: cluster.store.get_session(sid).current_round >= with_b + 3,
            60,
            f"controller A to finish round {with_b + 3} beside B",
            procs,
            [a],
        )
        seen = rounds_of(cluster, sid)
        assert all(r.attempt == 0 and r.status in ("completed", "running") for r in seen), (
            "a second controller disturbed the first:\n" + describe(seen) + f"\n--- B:\n{b.tail()}"
        )
        if not b.alive():
            assert_refusal(b, sid)
        # A dies mid-round: whoever is left must finish the session
        current = cluster.store.get_session(sid).current_round
        wait_until(lambda: round_running(cluster, sid, current + 1), 30, "the next round", procs)
        a.kill()
        killed_at = time.time()
        finisher, tries = b, 0
        while finisher.wait(SESSION_DONE_S) != 0:
            assert_refusal(finisher, sid)
            tries += 1
            assert tries <= 3 and time.time() - killed_at < 60, (
                f"session {sid} still not resumable {time.time() - killed_at:.0f} s after its "
                f"controller died; last refusal:\n{finisher.tail()}"
            )
            time.sleep(2.0)
            finisher = cluster.controller(f"controller-resume-{tries}", "--resume", sid)
        print(f"finished by {finisher.name}, {time.time() - killed_at:.1f} s after A died")
    done = assert_no_version_lost(cluster, sid)
    attempts = sorted(rounds_of(cluster, sid), key=lambda r: r.started)
    for prev, nxt in itertools.pairwise(attempts):
        assert nxt.started >= (prev.finished or float("inf")), (
            "two controllers ran rounds at once:\n" + describe(attempts)
        )
    failed = [r for r in attempts if r.status == "failed"]
    assert {r.round for r in failed} <= {current + 1}, describe(attempts)
    assert accuracies(done) == pytest.approx(digits.reference_run(N_DEVICES, rounds), abs=1e-9)
    assert all(ps == {device_name(k) for k in range(N_DEVICES)} for ps in all_participants(done))
    procs.check_alive(*parts)


def assert_refusal(ctl: Proc, sid: str) -> None:
    """A controller that does not run a session must say so: non-zero, naming the session,
    without a traceback."""
    out = ctl.output()
    assert ctl.returncode not in (None, 0), f"{ctl.name} exited 0 without running {sid}"
    assert sid in out and "Traceback" not in out, f"{ctl.name}: unclear refusal:\n{out[-3000:]}"


# 5. devices drop mid-upload ---------------------------------------------------------------------
def test_devices_drop_mid_upload_and_half_return(
    cluster: Cluster, broker: PersistentMosquitto, watcher: Watcher, procs: Procs
) -> None:
    """6 of 20 devices (30%) lose their link in the middle of an upload. Three never come
    back (SIGKILLed at the cut); three reconnect after 1.5 s and finish the same upload. The
    round they were cut in ends at its deadline with the 17 survivors, later rounds run with
    the 17, and every round is the reference FedAvg of exactly its participants."""
    total, droppers = 20, list(range(14, 20))
    dead, returning = droppers[:3], droppers[3:]
    combiners = [cluster.combiner(f"region-{i}") for i in range(REGIONS)]
    fleet = cluster.partial_fleet(14, total, REGIONS)
    proxies: dict[int, LinkProxy] = {}
    agents: dict[int, Proc] = {}
    try:
        for k in droppers:
            marker = cluster.topics.device(region_of(k), device_name(k), "update").encode()
            proxy = LinkProxy(
                broker.port,
                marker,
                cut_after=2500,  # updates are ~6 chunks of 1 KiB: the cut lands mid-upload
                refuse_s=float("inf") if k in dead else 1.5,
                on_cut=(lambda k=k: agents[k].kill()) if k in dead else None,
            )
            proxies[k] = proxy
            agents[k] = cluster.agent(k, total, region_of(k), proxy.url)
        everyone = {device_name(k) for k in range(total)}
        wait_online(cluster, watcher, [*combiners, fleet, *agents.values()], everyone, REGIONS)
        sid = "dropout"
        cluster.create_session(
            sid,
            **session_config(rounds=4, min_devices=14, round_timeout_s=6.0, chunk_size=1024),
        )
        ctl = cluster.controller("controller", "--resume", sid)
        wait_until(
            lambda: cluster.store.get_session(sid).current_round >= 1, 60, "round 1", procs, [ctl]
        )
        for proxy in proxies.values():
            proxy.arm()
        finish(ctl)
        cut_at = {k: p.cut_at for k, p in proxies.items()}
    finally:
        for proxy in proxies.values():
            proxy.close()
    assert all(t is not None for t in cut_at.values()), f"links never cut: {cut_at}"
    done = assert_no_version_lost(cluster, sid)
    replay_reference(cluster, done, total)

    def cut_round(k: int) -> int:
        t = cut_at[k]
        return next(r.round for r in done if r.started <= (t or 0) <= (r.finished or 0))

    for rec, ps in zip(done, all_participants(done), strict=True):
        for k in range(total):
            name = device_name(k)
            if k in dead and rec.round >= cut_round(k):
                assert name not in ps, f"round {rec.round}: dead {name} took part"
            else:  # stable devices always; returning ones in their cut round and after
                assert name in ps, f"round {rec.round}: {name} missing from {sorted(ps)}"
    procs.check_alive(*combiners, fleet, *(agents[k] for k in returning))


# 6. a flooding device ---------------------------------------------------------------------------
def test_device_flooding_never_completing_transfers(
    cluster: Cluster, watcher: Watcher, procs: Procs
) -> None:
    """A selected device answers its first task with 20,000 distinct chunked transfers that
    never complete, and never sends an update. The honest devices' updates must still be
    taken in every round, including the rounds that run after the whole flood has reached the
    broker, and the session ends on the reference; the combiner survives."""
    parts = start_tiers(cluster, watcher)
    flooder = cluster.tool(
        "flooder", "flood", "--region", "region-0", "--device", "flood", "--transfers", "20000"
    )
    wait_until(lambda: "flood" in watcher.online_devices(), 30, "the flooder", procs, [flooder])
    sid = "flood"
    rounds = 6
    # the flooder is selected and never answers: each round lasts its deadline, so the
    # session outlasts the flood
    cluster.create_session(sid, **session_config(rounds=rounds, round_timeout_s=3.0))
    ctl = cluster.controller("controller", "--resume", sid)
    finish(ctl)
    summary = wait_until(
        lambda: "flood_transfers" in flooder.output() and last_json_line(flooder.output()),
        120,
        "the flood acknowledged",
    )
    print(f"flood: {summary}; combiner region-0 peak RSS {peak_rss_mib(parts[0].pid):.0f} MiB")
    assert summary["flood_transfers"] == 20_000
    done = assert_no_version_lost(cluster, sid)
    after = [r.round for r in done if r.started > summary["flood_done_at"]]
    assert len(after) >= 2, f"only rounds {after} ran after the flood was complete"
    honest = {device_name(k) for k in range(N_DEVICES)}
    assert all(ps == honest for ps in all_participants(done)), all_participants(done)
    assert accuracies(done) == pytest.approx(digits.reference_run(N_DEVICES, rounds), abs=1e-9)
    procs.check_alive(*parts, flooder)


def peak_rss_mib(pid: int) -> float:
    """VmHWM of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# 7. a fault injector ----------------------------------------------------------------------------
def test_fault_injector_on_every_topic_during_a_session(
    cluster: Cluster, watcher: Watcher, procs: Procs
) -> None:
    """On an unauthenticated broker, an injector publishes 500 messages/s of random,
    truncated, bit-flipped and replayed payloads on every topic of the project for the whole
    session. No component may crash, and no garbage may reach a model: every round is the
    reference FedAvg of exactly the updates recorded as taken."""
    parts = start_tiers(cluster, watcher)
    injector = cluster.tool("injector", "inject", "--rate", "500")
    wait_until(
        lambda: "injector running" in injector.output(), 30, "the injector", procs, [injector]
    )
    # a selected device that never answers makes every round last its deadline (~1.5 s), so
    # the injector hits combiners and devices while rounds are open, not only between them
    with silent_device(cluster, watcher, "region-1"):
        time.sleep(1.0)  # it learns the tree from retained statuses and hits it before round 1
        sid = "inject"
        cluster.create_session(
            sid, **session_config(rounds=8, min_devices=8, round_timeout_s=1.5, close_grace_s=1.0)
        )
        ctl = cluster.controller("controller", "--resume", sid)
        finish(ctl)
    injector.signal(signal.SIGTERM)
    injector.wait(20)
    stats = last_json_line(injector.output())
    print(f"injector: {stats}")
    assert stats["rate"] >= 400, f"the injector ran at {stats['rate']:.0f} msg/s, not ~500"
    assert all(stats["kinds"][k] > 0 for k in ("random", "truncated", "bitflip", "replay"))
    channels = set(stats["channels"])
    want = {"task", "update", "status", "telemetry", "request", "round", "partial", "progress"}
    assert want | {"model"} <= channels, f"topics never hit: {want | {'model'} - channels}"
    done = assert_no_version_lost(cluster, sid)
    replay_reference(cluster, done, N_DEVICES)
    procs.check_alive(*parts)


# 8. the model store's disk is full ----------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (needs root, or sudo without a password; the suite fails otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    opts = f"size=1m,mode=0755,uid={os.getuid()},gid={os.getgid()}"
    res = subprocess.run(
        [*sudo, "mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.fail(
            f"cannot mount a tmpfs for the disk-full case ({res.stderr.strip()}); run the "
            "chaos suite as root or with passwordless sudo",
            pytrace=False,
        )
    yield mnt
    subprocess.run([*sudo, "umount", "-l", str(mnt)], check=False, capture_output=True)


def fill_disk(path: Path) -> int:
    """Write ``path`` until the filesystem refuses (ENOSPC); returns the bytes written."""
    written = 0
    block = os.urandom(64 * 1024)
    with path.open("wb", buffering=0) as f:
        for size in (len(block), 512):  # big blocks, then the last partial one
            try:
                while f.write(block[:size]):
                    written += size
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return written


def test_model_store_disk_full(
    small_disk: Path, cluster: Cluster, watcher: Watcher, procs: Procs
) -> None:
    """The filesystem under the model store fills up mid-session. The controller stops with a
    clear error (no traceback) saying that a model could not be stored because the disk is
    full, and does not leave the session 'running'; the store keeps no half-written version;
    once space is freed, ``--resume`` (with ``--retry`` for a failed session) ends on the
    reference."""
    cluster.models_dir = small_disk / "models"
    parts = start_tiers(cluster, watcher)
    sid = "diskfull"
    cluster.create_session(sid, **session_config(rounds=8, round_timeout_s=6.0))
    ctl = cluster.controller("controller", "--resume", sid)
    wait_until(
        lambda: cluster.store.get_session(sid).current_round >= 2, 60, "round 2", procs, [ctl]
    )
    filler = small_disk / "filler"
    fill_disk(filler)
    rc = ctl.wait(90)
    out = ctl.output()
    sess = cluster.store.get_session(sid)
    assert sess.current_round < 8, "the session finished on a full disk"
    assert rc != 0, f"controller exited 0 on a full disk:\n{out[-3000:]}"
    # one line that says what could not be written (a model) and why (the disk is full)
    assert any(
        "No space left on device" in line and "model" in line for line in out.splitlines()
    ), f"no clear disk-full error:\n{out[-3000:]}"
    assert "Traceback" not in out, f"a traceback instead of a clear error:\n{out[-3000:]}"
    assert sess.status != "running", "the session claims a controller is still running it"
    # nothing half-written: every file is a recorded, verifying version, and so is the current
    assert_store_files_whole(cluster, sid)
    ModelRepository(cluster.store, FileBlobStore(cluster.models_dir)).load(sess.model_version)
    filler.unlink()
    # the operator's way back once space is freed (a failed session runs again with --retry)
    again = ("--resume", sid, "--retry") if sess.status == "failed" else ("--resume", sid)
    resumed = cluster.controller("controller-resumed", *again)
    finish(resumed)
    done = assert_no_version_lost(cluster, sid)
    assert accuracies(done) == pytest.approx(digits.reference_run(N_DEVICES, 8), abs=1e-9)
    procs.check_alive(*parts)
