"""The same edgefl code on clustered brokers: RabbitMQ's MQTT plugin and a 3-node NATS cluster.

Each broker is started by the test itself (``tests/rabbitmq.py``, ``tests/nats.py``), never the
machine's own. A whole digits session on each must give the single-process reference's
accuracies in every round: any update, partial, plan or model chunk lost or duplicated by the
broker breaks that equality. The controller starts after the fleet, so it learns who is
online only from what the broker keeps (retained presence) or what the components repeat.

The probe tests pin down the broker features docs/scaling.md lists as measured here.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence

import pytest

from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig
from device_agent.trainers.numpy_trainer import NumpyTrainer
from edgefl import deploy
from edgefl.auth.tokens import Role
from edgefl.combiner import Combiner, CombinerConfig
from edgefl.controller import SessionConfig
from edgefl.fleet.simulate import device_name
from edgefl.protocol import Topics
from edgefl.tasks import digits
from edgefl.transport import MqttConnection
from edgefl.transport.compat import BrokerQuirks, broker_quirks
from tests.brokers import Probe, settle
from tests.harness import completed_accuracies
from tests.nats import NatsCluster, nats_cluster  # noqa: F401
from tests.rabbitmq import RabbitNode, rabbitmq  # noqa: F401

N_DEVICES = 10
REGIONS = ["region-0", "region-1"]
ROUNDS = 20
CANONICAL_FINAL = 0.938889  # digits, 10 devices, 20 rounds (as in test_session_e2e)


def _start_devices(dep: deploy.Deployment, urls: Sequence[str]) -> list[DeviceAgent]:
    """The simulated fleet's devices, but device k dials ``urls[k % len(urls)]`` (round-robin
    over cluster nodes) instead of one URL per region."""
    agents = []
    for k in range(N_DEVICES):
        X, y = digits.device_data(N_DEVICES, k)
        cfg = AgentConfig(
            broker_url=urls[k % len(urls)],
            project=dep.project,
            region=REGIONS[k % len(REGIONS)],
            device_id=device_name(k),
            seed=k,
            max_chunk_size=1024 * 1024,
            min_backoff_s=0.2,
            max_backoff_s=5.0,
        )
        agents.append(dep.own(DeviceAgent(cfg, NumpyTrainer(X, y)).start()))
    return agents


def _run_canonical_session(
    tmp_path,
    controller_url: str,
    combiner_urls: Sequence[str],
    device_urls: Sequence[str],
    pool_urls: Sequence[str] = (),
    n_rounds: int = ROUNDS,
) -> None:
    """Combiners, then devices, then the controller; a 20-round FedAvg session that must equal
    the reference run, with no device ever having to ask for a model (retained chunks found).

    With ``pool_urls``, the first region is served by a combiner pool, one member on each of
    those URLs (its first combiner URL is then unused)."""
    project = deploy.random_project()
    dep = deploy.Deployment(
        tmp_path,
        project=project,
        broker_url=controller_url,
        region_urls=dict(zip(REGIONS, combiner_urls)),
    )
    t = Topics(project)
    requests = Probe(controller_url)  # devices ask for a model they cannot find here
    assert requests.connect() == 0
    requests.subscribe(t.device_wildcard(None, "request"))
    t0 = time.monotonic()
    try:
        members = []
        for i, url in enumerate(pool_urls):
            login = dep.credentials.login(f"combiner-{REGIONS[0]}", Role.combiner, REGIONS[0])
            cfg = CombinerConfig(
                url,
                project=project,
                region=REGIONS[0],
                combiner_id=f"member-{i}",
                pool=True,
                **login,
            )
            members.append(dep.own(Combiner(cfg).start()))
        dep.start_combiners(REGIONS[1:] if pool_urls else REGIONS)
        agents = _start_devices(dep, device_urls)
        ctl = dep.start_controller(evaluator=digits.evaluator)
        # a controller that starts last still sees every device and combiner
        assert len(ctl.presence.wait_for(N_DEVICES, 20)) == N_DEVICES
        config = SessionConfig(
            rounds=n_rounds,
            min_devices=N_DEVICES,
            round_timeout_s=30,
            train={"lr": 0.1, "batch_size": 32},
        )
        ctl.create_session(config, digits.initial_weights("softmax"))
        ctl.run(config.session_id)
        rounds = ctl.store.list_rounds(config.session_id)
        completed = sum(a.completed for a in agents)
    finally:
        dep.close()
        requests.close()
    elapsed = time.monotonic() - t0

    accs = completed_accuracies(rounds)
    assert len(accs) == n_rounds, [(r.round, r.status) for r in rounds]
    if n_rounds == ROUNDS:
        assert abs(accs[-1] - CANONICAL_FINAL) <= 0.003
    assert accs == pytest.approx(digits.reference_run(N_DEVICES, n_rounds), abs=1e-9)
    for rec in rounds:
        assert {p["region"] for p in rec.participants} == set(REGIONS)
        assert len(rec.participants) == N_DEVICES
    assert completed == N_DEVICES * n_rounds
    if pool_urls:  # the pool shared its region's updates, none twice
        accepted = [m.stats["accepted"] for m in members]
        in_region = sum(1 for rec in rounds for p in rec.participants if p["region"] == REGIONS[0])
        assert all(accepted) and sum(accepted) == in_region
    assert requests.topics() == [], "devices had to ask for models the broker should have kept"
    assert elapsed < 120, f"session took {elapsed:.1f} s"


# -- the broker URL names the broker's quirks ------------------------------------------------


def test_broker_url_names_the_quirks() -> None:
    assert broker_quirks("mqtt://h:1883") == BrokerQuirks()
    assert broker_quirks("mqtt://h:1883?broker=mosquitto") == BrokerQuirks()
    rabbit = broker_quirks("mqtt://u:p@h:1883?broker=rabbitmq")
    assert rabbit == BrokerQuirks(retained_wildcards=False, topic_dots=False)
    assert broker_quirks("mqtt://h?broker=nats") == BrokerQuirks(topic_dots=False)
    # single flags, also on top of a profile
    assert not broker_quirks("mqtt://h?retained_wildcards=false").retained_wildcards
    assert broker_quirks("mqtt://h?broker=rabbitmq&topic_dots=1").topic_dots
    for bad in ("mqtt://h?broker=kafka", "mqtt://h?retained_wildcard=0", "mqtt://h?topic_dots=x"):
        with pytest.raises(ValueError, match="broker URL"):
            broker_quirks(bad)


def test_a_dot_in_a_topic_fails_loudly_where_the_broker_would_lose_it() -> None:
    """NATS 2.9 drops a topic with '.', RabbitMQ turns it into '/': refuse, never send."""
    conn = MqttConnection("mqtt://127.0.0.1:1?broker=nats", "x", clean_session=True)
    with pytest.raises(ValueError, match=r"'\.'.*topic_dots"):
        conn.subscribe("edgefl/v1/p/region-0/dev/pi.17/task", lambda _t, _p: None)
    with pytest.raises(ValueError, match=r"'\.'"):
        conn.publish("edgefl/v1/p/model/s.1-r1-abcdef12/0", b"x")
    # the same names are fine where '.' is an ordinary character
    plain = MqttConnection("mqtt://127.0.0.1:1", "y", clean_session=True)
    plain.subscribe("edgefl/v1/p/region-0/dev/pi.17/task", lambda _t, _p: None)


# -- what each broker does (the measured rows of docs/scaling.md) ---------------------------


def _probe_features(urls: Sequence[str]) -> dict[str, object]:
    """Retained delivery (exact and wildcard), '.' in topics, a 1 MiB chunk plus envelope,
    a persistent session's queued QoS 1 message, a will, and a shared subscription; with
    publisher and subscribers on different nodes when there are several."""
    pub_url, sub_url = urls[0], urls[-1]
    base = f"probe/{uuid.uuid4().hex[:8]}"
    seen: dict[str, object] = {}
    clients: list[Probe] = []

    def client(url: str, **kw: object) -> Probe:
        p = Probe(url, **kw)  # type: ignore[arg-type]
        assert p.connect() == 0
        clients.append(p)
        return p

    def send(topic: str, payload: bytes, retain: bool = False) -> None:
        try:
            pub.publish(topic, payload, retain=retain)
        except RuntimeError as exc:  # name the step, not only paho's "not connected"
            raise AssertionError(f"{pub_url}: publishing {topic} failed: {exc}") from exc

    try:
        pub = client(pub_url)
        seen["qos2_granted"] = client(sub_url).subscribe(f"{base}/q2", qos=2)
        send(f"{base}/r/0", b"kept", retain=True)
        settle(0.3)
        for name, flt in (("exact", f"{base}/r/0"), ("plus", f"{base}/r/+"), ("hash", f"{base}/#")):
            sub = client(sub_url)
            sub.subscribe(flt)
            settle(0.4)
            seen[f"retained_{name}"] = [m.payload for m in sub.messages] == [b"kept"]
        dots = client(sub_url)
        dots.subscribe(f"{base}/d/+/x", f"{base}/d/a.b/x")
        big = client(sub_url)
        big.subscribe(f"{base}/big")
        cid = f"probe-{uuid.uuid4().hex[:8]}"
        gone = client(sub_url, client_id=cid, clean_session=False)
        gone.subscribe(f"{base}/q")
        gone.close()
        shared = [client(u) for u in (pub_url, sub_url)]
        for s in shared:
            s.subscribe(f"$share/g/{base}/s")
        will_sub = client(pub_url)
        will_sub.subscribe(f"{base}/will")
        dying = client(sub_url, will=(f"{base}/will", b"gone"))
        settle(0.3)
        dotted = client(pub_url)
        info = dotted.client.publish(f"{base}/d/a.b/x", b"dot", qos=1)
        with contextlib.suppress(RuntimeError):  # NATS 2.9 disconnects instead of acking
            info.wait_for_publish(3)
        seen["dot_publisher_kept"] = info.is_published() and dotted.client.is_connected()
        chunk = b"\x01" * (1024 * 1024 + 200)  # a 1 MiB chunk and its CBOR envelope
        send(f"{base}/big", chunk)
        send(f"{base}/q", b"queued")
        for i in range(6):
            send(f"{base}/s", b"%d" % i)
        sock = dying.client.socket()
        assert sock is not None
        sock.close()  # a crash: the broker publishes the will
        back = client(sub_url, client_id=cid, clean_session=False)
        settle(1.5)
        seen["dot_topic"] = sorted({m.topic.removeprefix(base) for m in dots.messages})
        seen["chunk_1MiB"] = [len(m.payload) for m in big.messages] == [len(chunk)]
        seen["session_queued"] = back.session_present and [m.payload for m in back.messages] == [
            b"queued"
        ]
        seen["will"] = [m.payload for m in will_sub.messages] == [b"gone"]
        counts = [len(s.messages) for s in shared]
        seen["shared_subscription"] = sum(counts) == 6 and min(counts) < 6
    finally:
        for c in clients:
            c.close()
    return seen


@pytest.mark.slow
def test_mosquitto_features_as_documented(mosquitto) -> None:
    """The reference: everything edgefl relies on, and shared subscriptions for pools."""
    seen = _probe_features([mosquitto.url])
    assert seen == {
        "qos2_granted": [2],
        "retained_exact": True,
        "retained_plus": True,
        "retained_hash": True,
        "dot_publisher_kept": True,
        "dot_topic": ["/d/a.b/x"],  # one topic, matched by both filters
        "chunk_1MiB": True,  # with max_packet_size from edgefl.broker.mosquitto
        "session_queued": True,
        "will": True,
        "shared_subscription": True,
    }


@pytest.mark.slow
def test_amqtt_features_as_documented(embedded_broker) -> None:
    seen = _probe_features([embedded_broker.url])
    assert seen == {
        "qos2_granted": [2],
        "retained_exact": True,
        "retained_plus": True,
        "retained_hash": True,
        "dot_publisher_kept": True,
        "dot_topic": ["/d/a.b/x"],
        "chunk_1MiB": True,
        "session_queued": True,
        "will": True,
        "shared_subscription": False,  # no $share: one combiner per region
    }


@pytest.mark.slow
def test_rabbitmq_features_as_documented(rabbitmq: RabbitNode) -> None:  # noqa: F811
    seen = _probe_features([rabbitmq.url])
    assert seen == {
        "qos2_granted": [1],  # QoS 2 is granted as QoS 1
        "retained_exact": True,
        "retained_plus": False,  # 3.10 looks retained messages up by the exact filter only
        "retained_hash": False,
        "dot_publisher_kept": True,
        "dot_topic": ["/d/a/b/x"],  # '.' becomes '/': a different topic arrives
        "chunk_1MiB": True,
        "session_queued": True,
        "will": True,
        "shared_subscription": False,  # $share/... is a literal topic
    }


@pytest.mark.slow
def test_nats_cluster_features_as_documented(nats_cluster: NatsCluster) -> None:  # noqa: F811
    seen = _probe_features(nats_cluster.urls)
    assert seen == {
        "qos2_granted": [1],  # QoS 2 is granted as QoS 1
        "retained_exact": True,
        "retained_plus": True,
        "retained_hash": True,
        "dot_publisher_kept": False,  # 2.9: publishing a topic with '.' ends the connection
        "dot_topic": [],
        "chunk_1MiB": True,  # only with max_payload raised above the 1 MB default
        "session_queued": True,
        "will": True,
        "shared_subscription": False,
    }


# -- whole sessions ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("query", "expected"), [("", 0), ("?broker=rabbitmq", 3)])
def test_late_controller_on_rabbitmq_needs_the_profile(
    rabbitmq: RabbitNode,  # noqa: F811
    tmp_path,
    query: str,
    expected: int,
) -> None:
    """RabbitMQ never hands a late controller the retained statuses through its wildcard
    subscription; with the profile, its hello makes everyone announce again (protocol 7.1)."""
    dep = deploy.Deployment(
        tmp_path, project=deploy.random_project(), broker_url=rabbitmq.url + query
    )
    try:
        dep.start_combiners(1)
        dep.start_fleet(3)
        settle(0.5)  # every retained status is on the broker before the controller comes
        ctl = dep.start_controller()
        assert len(ctl.presence.wait_for(3, 10 if expected else 3)) == expected
    finally:
        dep.close()


@pytest.mark.slow
def test_session_on_rabbitmq_reproduces_reference(rabbitmq: RabbitNode, tmp_path) -> None:  # noqa: F811
    url = f"{rabbitmq.url}?broker=rabbitmq"  # the documented URL: its quirks, by name
    _run_canonical_session(tmp_path, url, [url, url], [url])


@pytest.mark.slow
def test_session_on_nats_cluster_reproduces_reference(
    nats_cluster: NatsCluster,  # noqa: F811
    tmp_path,
) -> None:
    urls = [f"{u}?broker=nats" for u in nats_cluster.urls]
    # controller on node 0, a combiner on each of nodes 1 and 2, devices round-robin on all
    _run_canonical_session(tmp_path, urls[0], urls[1:], urls)


@pytest.mark.slow
def test_combiner_pool_across_nats_nodes_reproduces_reference(
    nats_cluster: NatsCluster,  # noqa: F811
    tmp_path,
) -> None:
    """A pool needs no shared subscriptions, which NATS's MQTT gateway lacks: region-0's two
    members sit on nodes 1 and 2, its devices are spread over all three nodes."""
    urls = [f"{u}?broker=nats" for u in nats_cluster.urls]
    # 8 rounds, each equal to the reference's (the 20-round run is the test above)
    _run_canonical_session(tmp_path, urls[0], urls[1:], urls, pool_urls=urls[1:], n_rounds=8)
