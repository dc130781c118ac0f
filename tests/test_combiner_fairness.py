"""One device must not be able to take its region down, and a replayed plan must not win.

A device flooding its update topic with transfers it never completes only ever replaces its
own (the combiner keeps a fixed share per device), so the honest fleet's session runs as if
the flood were not there; partial transfers expire on a timer even on a quiet link; the
flood costs a handful of log lines; and a round plan replayed from an earlier round, or sent
with a lower fence, is dropped while the open round goes on.
"""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefl.combiner import Combiner
from edgefl.protocol import Topics, decode, encode, split_payload
from edgefl.protocol.chunking import Chunk
from edgefl.protocol.types import spec_of, spec_to_wire
from edgefl.tasks import digits
from edgefl.transport import parse_broker_url
from tests.harness import Deployment, RogueDevice, completed_accuracies

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` leaves them out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOOD = 20_000
FLOOD_CSZ = 1024 * 1024  # each flood transfer declares 1 MiB + 1 byte: 2 chunks, 1 sent


def wait_for(what: str, ok: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def raw_client(url: str, name: str) -> paho.Client:
    addr = parse_broker_url(url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv311)
    client.max_queued_messages_set(0)
    client.connect(addr.host, addr.port)
    client.loop_start()
    return client


def flood_chunk(k: int) -> bytes:
    """Chunk 1 (of 2) of a never-completed transfer: a valid envelope, 1 byte of data."""
    digest = k.to_bytes(32, "big")
    return Chunk(f"flood-{k}", 1, 2, FLOOD_CSZ + 1, FLOOD_CSZ, digest, b"x").to_bytes()


def flood_main(url: str, project: str, region: str, device: str) -> None:
    """The flooding device, run as its own process: it announces itself like any device, sends
    FLOOD never-completing transfers and a junk sentinel, says "flooded", then keeps sending
    new transfers (about 1,000/s) until it is killed."""
    topics = Topics(project)
    client = raw_client(url, f"flood-{device}")
    client.publish(
        topics.device(region, device, "status"),
        encode("status", state="online", ts=time.time()),
        qos=1,
        retain=True,
    ).wait_for_publish(10)
    topic = topics.device(region, device, "update")
    last = None
    for k in range(FLOOD):
        last = client.publish(topic, flood_chunk(k), qos=1)
    # a complete transfer of junk: once the combiner has rejected it, it has seen the flood
    (sentinel,) = split_payload(b"not an update", 1024)
    client.publish(topic, sentinel.to_bytes(), qos=1).wait_for_publish(120)
    assert last is not None
    last.wait_for_publish(120)
    print("flooded", flush=True)
    k = FLOOD
    while True:
        for _ in range(50):
            client.publish(topic, flood_chunk(k), qos=1)
            k += 1
        time.sleep(0.05)


class Sampler:
    """Samples, every few ms, what the flood could grow: the combiner's partial transfers
    (all, and the flooder's), this process's open files and its RSS."""

    def __init__(self, comb: Combiner, flooder: str) -> None:
        self.comb, self.flooder = comb, flooder
        self.fds0 = self.fds()
        self.max_pending = self.max_flooder = self.max_spill = 0
        self.max_fds = self.fds0
        self.rss0 = self.rss()
        self.max_rss = self.rss0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def _run(self) -> None:
        r = self.comb.reassembler
        while not self._stop.is_set():
            self.max_pending = max(self.max_pending, r.pending)
            self.max_flooder = max(self.max_flooder, r.pending_from(self.flooder))
            self.max_spill = max(self.max_spill, r.spill_files)
            self.max_fds = max(self.max_fds, self.fds())
            self.max_rss = max(self.max_rss, self.rss())
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def own_deployment(tmp_path: Path) -> Iterator[Deployment]:
    """A deployment on a Mosquitto of its own: a flood leaves a broker with a backlog of
    deliveries that would slow the brokers the rest of the suite shares.

    Mosquitto only: the embedded amqtt broker is the zero-setup development broker, and under
    20,000 messages in a few seconds it times out waiting for PUBACKs and drops messages of
    every client (its known limit, see docs/reliability.md); production runs Mosquitto.
    """
    from edgefl.broker.mosquitto import MosquittoProcess

    with MosquittoProcess() as broker:
        dep = Deployment(broker.url, tmp_path)
        try:
            yield dep
        finally:
            dep.close()


def test_a_flooding_device_does_not_starve_the_region(
    own_deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    """One device (its own process) starts 20,000 transfers it never completes, then keeps
    going during a session. The honest devices' session gives exactly the reference result;
    the flooder only ever held its own 2 transfers, the combiner's open files and partial
    transfers stay bounded, and the flood costs a handful of log lines, not 20,000."""
    dep = own_deployment
    n = 4
    # a small memory budget: every flood transfer (1 MiB + 1 byte declared) spills to a file
    (comb,) = dep.start_combiners(1, memory_budget_bytes=2 * 1024 * 1024)
    dep.start_fleet(n)
    ctl = dep.controller()
    sampler = Sampler(comb, "flood")
    flooder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from tests.test_combiner_fairness import flood_main; "
            "flood_main(*sys.argv[1:])",
            *(dep.url, dep.project, "region-0", "flood"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        t0 = time.monotonic()
        line = flooder.stdout.readline() if flooder.stdout else ""
        assert line.strip() == "flooded", flooder.stderr.read() if flooder.stderr else ""
        # the junk sentinel came after the flood on the same topic: once it is rejected,
        # the combiner has handled every flood chunk before it
        wait_for("the flood to be handled", lambda: comb.stats["rejected_bad_update"] == 1, 300)
        flood_s = time.monotonic() - t0
        assert comb.stats["evicted"] >= FLOOD - 1  # all but the 2 it may hold, + the sentinel
        # the session runs while the flood goes on; the flooder is selected (it announced
        # itself) but never trains, so a round closes once the n honest updates are in
        _, rounds = dep.run_session(ctl, rounds=3, min_devices=n, buffer_size=n, round_timeout_s=20)
    finally:
        flooder.kill()
        flooder.wait(10)
        sampler.stop()
    assert [r.status for r in rounds] == ["completed"] * 3
    honest = {f"dev-{k:04d}" for k in range(n)}
    for rec in rounds:
        assert {p["device"] for p in rec.participants} == honest
        assert rec.attempt == 0
    assert completed_accuracies(rounds) == pytest.approx(digits.reference_run(n, 3), abs=1e-9)
    # bounded state: the flooder held at most its 2 transfers (one spilled), all of them
    # together at most 2 per device, and the open files did not follow the flood
    assert comb.stats["evicted"] > FLOOD
    assert sampler.max_flooder <= 2
    assert sampler.max_pending <= 2 * (n + 1)
    assert sampler.max_spill <= 2
    assert sampler.max_fds - sampler.fds0 <= 16, (sampler.fds0, sampler.max_fds)
    # log lines: a few warnings and summaries, not one per flood chunk
    flood_lines = [r for r in caplog.records if "flood" in r.getMessage()]
    assert len(flood_lines) < 50, [r.getMessage() for r in flood_lines[:5]]
    print(
        f"\nflood of {FLOOD} transfers handled in {flood_s:.1f} s; "
        f"evicted {comb.stats['evicted']}; max partial transfers {sampler.max_pending}, "
        f"flooder's {sampler.max_flooder}, spill files {sampler.max_spill}; "
        f"open files +{sampler.max_fds - sampler.fds0}; "
        f"RSS {sampler.rss0 / 2**20:.0f} -> max {sampler.max_rss / 2**20:.0f} MiB; "
        f"{len(flood_lines)} log lines about the flooder"
    )


def test_a_partial_transfer_expires_on_a_quiet_link(deployment: Deployment) -> None:
    """With nothing else arriving, a half-sent transfer is dropped once its TTL has passed."""
    dep = deployment
    ttl = 1.0
    (comb,) = dep.start_combiners(1, transfer_ttl_s=ttl)
    rogue = dep.own(RogueDevice(dep.url, dep.project, "region-0", "half", mode="silent"))
    first = split_payload(os.urandom(5000), 1024, meta={"task_id": "none"})[0]
    rogue.publish_update(first.to_bytes())
    wait_for("the chunk to arrive", lambda: comb.reassembler.pending == 1, 10)
    t0 = time.monotonic()
    wait_for("the transfer to expire", lambda: comb.reassembler.pending == 0, 10)
    waited = time.monotonic() - t0
    assert waited <= ttl + 2 * comb.sweep_interval_s + 0.5, waited
    wait_for("the expiry to be counted", lambda: comb.stats["expired"] == 1, 5)


def test_a_replayed_round_plan_is_dropped_and_the_round_goes_on(deployment: Deployment) -> None:
    """A raw client records round 1's plan and republishes it, byte for byte, as round 18
    starts (round 1 is then older than the combiner's list of closed rounds). The combiner
    drops it as stale and round 18 completes on its first attempt: the session gives exactly
    the reference result, with no retried round."""
    dep = deployment
    n, total = 3, 18
    (comb,) = dep.start_combiners(1)
    dep.start_fleet(n)
    ctl = dep.controller()
    topic = Topics(dep.project).combiner("region-0", "round")
    plans: dict[int, bytes] = {}
    replayed = threading.Event()
    spy = raw_client(dep.url, f"spy-{dep.project}")
    dep.own(_Disconnect(spy))

    def on_message(client: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        plan = decode(msg.payload)
        if plan["type"] != "round":
            return
        plans.setdefault(plan["round"], msg.payload)
        if plan["round"] == total and not replayed.is_set():
            replayed.set()
            client.publish(topic, plans[1], qos=1)

    spy.on_message = on_message
    spy.subscribe(topic, qos=1)
    time.sleep(0.2)
    _, rounds = dep.run_session(
        ctl, rounds=total, min_devices=n, round_timeout_s=5, close_grace_s=1
    )
    assert replayed.is_set()
    assert [(r.round, r.attempt, r.status) for r in rounds] == [
        (k, 0, "completed") for k in range(1, total + 1)
    ]
    wait_for("the replay to be dropped", lambda: comb.stats["stale_plans"] == 1, 10)
    assert completed_accuracies(rounds) == pytest.approx(digits.reference_run(n, total), abs=1e-9)


class _Disconnect:
    def __init__(self, client: paho.Client) -> None:
        self.client = client

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_plans_are_ordered_by_fence_round_and_attempt(
    deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    """Hand-made plans: within a session only a newer (fence, round, attempt) is accepted, its
    fence is forwarded in the device task, and a new session starts afresh."""
    dep = deployment
    (comb,) = dep.start_combiners(1)
    dev = dep.own(RogueDevice(dep.url, dep.project, "region-0", "d1", mode="silent"))
    pub = raw_client(dep.url, f"ctl-{dep.project}")
    dep.own(_Disconnect(pub))
    topic = Topics(dep.project).combiner("region-0", "round")
    wire_spec = spec_to_wire(spec_of(digits.initial_weights("softmax")))

    def send(session: str, round_: int, attempt: int, fence: int | None = None) -> None:
        extra = {} if fence is None else {"fence": fence}
        plan = encode(
            "round",
            **extra,
            task_id=f"{session}:{round_}:{attempt}",
            session=session,
            round=round_,
            model_version="v0",
            model_digest=bytes(32),
            devices=["d1"],
            deadline=time.time() + 60,
            train={},
            chunk_size=1024,
            spec=wire_spec,
        )
        pub.publish(topic, plan, qos=1).wait_for_publish(5)

    def tasks() -> list[tuple[str, int | None]]:
        return [(t["task_id"], t.get("fence")) for t in dev.tasks]

    with caplog.at_level(logging.WARNING, logger="edgefl.combiner.combiner"):
        send("s", 1, 0, fence=2)
        wait_for("the first task", lambda: len(dev.tasks) == 1)
        send("s", 5, 0, fence=1)  # a stale controller: a later round, but a lower fence
        send("s", 1, 1, fence=2)  # the same controller's next attempt
        wait_for("the second task", lambda: len(dev.tasks) == 2)
        send("s", 1, 0, fence=2)  # a replay of the first plan (it was never closed)
        send("s", 1, 0, fence=2)  # ... replayed again: counted, but logged once
        send("s", 9, 0)  # no fence counts as 0: older than fence 2
        send("t", 1, 0)  # another session starts afresh
        wait_for("the third task", lambda: len(dev.tasks) == 3)
    assert tasks() == [("s:1:0", 2), ("s:1:1", 2), ("t:1:0", None)]
    assert comb.stats["stale_plans"] == 4
    stale = [r.getMessage() for r in caplog.records if "stale plan" in r.getMessage()]
    assert len(stale) == 3, stale
    assert (
        "plan s:5:0 of session s: (fence, round, attempt) (1, 5, 0) is not newer than (2, 1, 0)"
        in stale[0]
    )
