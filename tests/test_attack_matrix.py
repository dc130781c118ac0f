"""The attack matrix of issue 8: every attack, on both brokers, while a session runs.

Each broker gets one world (a module-scoped fixture) and one digits session in progress:

- **embedded:** the amqtt broker with EdDSA keys (``edgefl.auth.keys.KeyDir``) and the
  revocation list, every component logging in with a freshly signed token;
- **mosquitto:** a real Mosquitto started from its binary on the files ``edgefl fleet
  provision`` wrote (tokens as passwords, one ACL block per device), with a server listener and
  a device listener with ``use_username_as_clientid true``. Every component logs in with
  ``ProvisionedLogins``: servers with their login files, devices with their bundles.

Every attack is a named case. Each one asserts that the attack was denied or dropped (the
message never reached a legitimate subscriber, the CONNECT was refused or the connection cut),
and that the denial is visible (``EmbeddedBroker.stats()`` and the broker's log, Mosquitto's
log file at ``log_type all``, or edgefl's own counters). The last test per broker checks the
session came through undisturbed: every round had the six devices and nobody else, no agent
ever reconnected, and the accuracies are exactly the single-process reference run's. An attack
that legitimately removes a device (expiry, revocation) picks a provisioned device outside the
session, so the session stays exactly reproducible.

Rounds are paced (``PACE_S`` between rounds while attacks are pending) so they keep running
through the whole matrix; the session holds before its last round until the matrix is over, and
the last test asserts that rounds were running when the last attack finished.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgefl.api.server import DashboardServer
from edgefl.auth.credentials import ProvisionedLogins
from edgefl.auth.keys import KeyDir
from edgefl.auth.tokens import AuthConfig, Role
from edgefl.broker.embedded import EmbeddedBroker
from edgefl.broker.mosquitto import MosquittoProcess
from edgefl.combiner import Combiner
from edgefl.controller import Controller, SessionConfig
from edgefl.controller.registry import FleetRegistry
from edgefl.deploy import Deployment
from edgefl.fleet.provision import provision, revoke, sync
from edgefl.fleet.simulate import Fleet, device_name
from edgefl.protocol import Topics, decode, encode
from edgefl.protocol.chunking import parse_chunk
from edgefl.store import make_store
from edgefl.store.base import RoundRecord, SessionRecord
from edgefl.tasks import digits
from tests.brokers import NOT_AUTHORIZED, Probe, free_port, settle
from tests.harness import completed_accuracies

pytestmark = pytest.mark.slow

P = "atk"
T = Topics(P)
N = 6  # the session's devices dev-0000..dev-0005; dev-k lives in region-(k % 2)
REGIONS = ["region-0", "region-1"]
EVERYONE = [device_name(k) for k in range(N)]
TRAIN = {"lr": 0.1, "batch_size": 32}
ROUNDS = 120
PACE_S = 0.2  # between rounds while attacks are pending, so rounds run through the matrix
SWEEP_S = 0.5  # the embedded broker's live-token sweep
LEEWAY_S = 0.5  # its clock-skew leeway on expiry
SESSION_ID = "attacked"

VICTIM = "dev-0001"  # region-1, in the session: the takeover and replay target
ATTACKER = "dev-0090"  # region-0, provisioned, never in the session
REVOKED_LIVE = "dev-0091"  # region-1, provisioned, connected, then revoked
REVOKED_IDLE = "dev-0094"  # region-0, provisioned, revoked while offline
EXPIRING_LIVE = "dev-0092"  # region-0: a short token that expires while connected
EXPIRED_IDLE = "dev-0093"  # region-0, Mosquitto: provisioned with a 2 s token
EXTRA = {ATTACKER: "region-0", REVOKED_LIVE: "region-1", REVOKED_IDLE: "region-0"}
SUBACK_REFUSED = 0x80


# -- helpers --------------------------------------------------------------------------------


def wait_until(what: str, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("device_id,region\n" + "".join(f"{d},{r}\n" for d, r in rows))
    return path


def bundle(out: Path, device: str) -> dict[str, str]:
    data: dict[str, str] = json.loads((out / "devices" / device / "agent.json").read_text())
    return data


def denied_publish(user: str, topic: str, retain: bool) -> str:
    """Mosquitto's log line (log_type debug) for a PUBLISH its ACL denied, as a regex."""
    return rf"Denied PUBLISH from {user} \(d0, q1, r{int(retain)}, m\d+, '{re.escape(topic)}'"


def telemetry() -> bytes:
    return encode("telemetry", ts=time.time(), metrics={"probe": 1.0})


def online() -> bytes:
    return encode("status", state="online", ts=time.time())


class Watched(Probe):
    """A probe that records when the broker cut its connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dropped = threading.Event()
        self.dropped_at: float | None = None  # wall clock
        self.client.on_disconnect = self._on_disconnect

    def _on_disconnect(self, *_a: Any) -> None:
        self.dropped_at = time.time()
        self.dropped.set()


class Records(logging.Handler):
    """Every WARNING and above logged in this process (broker, controller, combiners)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            self.lines.append(f"{record.name}: {record.getMessage()}")

    def since(self, mark: int) -> str:
        with self._lock2:
            return "\n".join(self.lines[mark:])

    def __len__(self) -> int:
        with self._lock2:
            return len(self.lines)


@dataclass
class World:
    """One broker, a deployment on it, a session in progress, and the matrix's bookkeeping."""

    kind: str  # "embedded" or "mosquitto"
    root: Path
    auth: AuthConfig
    out: Path  # the provisioned fleet folder
    dep: Deployment
    server_url: str
    device_url: str
    records: Records
    ctl: Controller
    combiners: dict[str, Combiner]
    fleet: Fleet
    embedded: EmbeddedBroker | None = None
    mosquitto: MosquittoProcess | None = None
    completed: list[tuple[float, RoundRecord]] = field(default_factory=list)
    attacks: dict[str, tuple[float, float]] = field(default_factory=dict)  # monotonic
    attacks_over: threading.Event = field(default_factory=threading.Event)
    held_at: float | None = None  # when the session reached its last round (monotonic)
    ended: float | None = None
    outcome: SessionRecord | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None
    connects: dict[str, int] = field(default_factory=dict)
    _probes: int = 0

    # identities ----------------------------------------------------------------------
    @property
    def revocations(self) -> Path:
        path = self.auth.revocations_path()
        assert path is not None
        return path

    def issue(self, subject: str, role: Role, region: str | None = None, **kw: Any) -> str:
        return self.auth.issuer().issue(subject, role, P, region=region, **kw)

    def device_password(self, device: str) -> str:
        return bundle(self.out, device)["password"]

    def server_password(self, name: str, role: Role, region: str | None = None) -> str:
        if self.mosquitto is not None:  # Mosquitto knows only the provisioned password
            token = self.dep.credentials.token(name, role, region)
            assert token is not None
            return token
        return self.issue(name, role, region)

    def device_probe(
        self,
        device: str,
        token: str | None = None,
        client_id: str | None = None,
        *,
        clean: bool = True,
        watched: bool = False,
    ) -> Watched:
        cls = Watched if watched else Probe
        return cls(  # type: ignore[return-value]
            self.device_url,
            client_id or f"edgefl-{P}-{device}",
            username=device,
            password=token if token is not None else self.device_password(device),
            clean_session=clean,
        )

    def server_probe(self, name: str, role: Role, region: str | None = None) -> Probe:
        """A service login with a client id of its own (the instance-suffix form)."""
        self._probes += 1
        return Probe(
            self.server_url,
            f"edgefl-{P}-{name}-probe{self._probes}",
            username=name,
            password=self.server_password(name, role, region),
        )

    def observer(self, *filters: str) -> Probe:
        """A legitimate subscriber: a controller-role login reading ``filters``."""
        obs = self.server_probe("controller", Role.controller)
        assert obs.connect() == 0
        assert obs.subscribe(*filters) == [1] * len(filters)
        return obs

    # what the broker logged ------------------------------------------------------------
    def mark(self) -> tuple[int, int]:
        size = 0
        if self.mosquitto is not None:
            assert self.mosquitto.log_path is not None
            size = self.mosquitto.log_path.stat().st_size
        return len(self.records), size

    def edgefl_log(self, mark: tuple[int, int]) -> str:
        """WARNING lines of this process (the embedded broker, controller, combiners)."""
        return self.records.since(mark[0])

    def mosquitto_log(self, mark: tuple[int, int]) -> str:
        assert self.mosquitto is not None and self.mosquitto.log_path is not None
        with self.mosquitto.log_path.open("rb") as f:
            f.seek(mark[1])
            return f.read().decode(errors="replace")

    def stats(self) -> dict[str, int]:
        assert self.embedded is not None
        return self.embedded.stats()

    def delta(self, before: dict[str, int]) -> dict[str, int]:
        """Embedded broker counters that changed since ``before``."""
        now = self.stats()
        return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}

    def rejections(self) -> dict[str, dict[str, int]]:
        """The combiners' refusal counters, per region."""
        return {
            region: {k: v for k, v in c.stats.items() if k.startswith(("rejected", "refused"))}
            for region, c in self.combiners.items()
        }

    def reload(self) -> None:
        """SIGHUP Mosquitto (re-read passwd and acl.conf) and wait until it has."""
        assert self.mosquitto is not None and self.mosquitto.proc is not None
        mark = self.mark()
        self.mosquitto.proc.send_signal(signal.SIGHUP)
        self.wait_reloaded(mark)

    def wait_reloaded(self, mark: tuple[int, int]) -> None:
        wait_until("Mosquitto to reload", lambda: "Reloading config." in self.mosquitto_log(mark))
        settle(0.2)

    @property
    def pid(self) -> int:
        assert self.mosquitto is not None and self.mosquitto.proc is not None
        return self.mosquitto.proc.pid

    # the session -----------------------------------------------------------------------
    def start_session(self) -> None:
        config = SessionConfig(
            session_id=SESSION_ID,
            rounds=ROUNDS,
            min_devices=N,
            round_timeout_s=20,
            max_attempts=1,
            wait_for_devices_s=30,
            train=TRAIN,
        )
        self.ctl.create_session(config, digits.initial_weights())

        def on_round(rec: RoundRecord, _sess: SessionRecord) -> None:
            self.completed.append((time.monotonic(), rec))
            if rec.round == ROUNDS - 1:
                self.held_at = time.monotonic()
                self.attacks_over.wait(300)
            elif not self.attacks_over.is_set():
                time.sleep(PACE_S)

        def run() -> None:
            try:
                self.outcome = self.ctl.run(SESSION_ID, on_round=on_round)
            except BaseException as exc:  # reported by the last test
                self.error = exc
            finally:
                self.ended = time.monotonic()

        self.thread = threading.Thread(target=run, name=f"session-{self.kind}", daemon=True)
        self.thread.start()
        wait_until("the first round", lambda: bool(self.completed) or self.ended is not None, 60)
        assert self.error is None, self.error
        assert self.completed, "the session ended before its first round"
        self.connects = {a.config.device_id: a.conn.connect_count for a in self.fleet.agents}

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self.ended is None

    def rounds_after(self, t0: float, n: int = 1, timeout: float = 20.0) -> list[RoundRecord]:
        """The first ``n`` rounds that started after wall-clock ``t0`` (waiting for them)."""

        def later() -> list[RoundRecord]:
            return [rec for _, rec in list(self.completed) if rec.started > t0]

        wait_until(f"{n} round(s) after the attack", lambda: len(later()) >= n, timeout)
        return later()[:n]

    def agent(self, device: str) -> Any:
        return next(a for a in self.fleet.agents if a.config.device_id == device)


# -- the two worlds -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["embedded", "mosquitto"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    kind: str = request.param
    root = tmp_path_factory.mktemp(kind)
    keys = KeyDir(root / "keys")
    keys.init()
    auth = AuthConfig(keys=str(keys.path))  # revocations: keys/revoked.json
    out = root / "fleet"
    rows = [(d, REGIONS[k % 2]) for k, d in enumerate(EVERYONE)] + list(EXTRA.items())
    provision(write_csv(root / "devices.csv", rows), P, out, auth=auth)
    if kind == "mosquitto":  # expires long before its test runs; Mosquitto never reads exp
        short = write_csv(root / "short.csv", [(EXPIRED_IDLE, "region-0")])
        provision(short, P, out, auth=auth, token_ttl_s=2)
    records = Records()
    logging.getLogger().addHandler(records)
    stack = ExitStack()
    w: World | None = None
    try:
        embedded = mosquitto = None
        if kind == "embedded":
            embedded = EmbeddedBroker(auth=auth, project=P, sweep_s=SWEEP_S, leeway_s=LEEWAY_S)
            stack.enter_context(embedded)
            server_url = device_url = embedded.url
        else:
            device_port = free_port()
            extra = (
                f"password_file {out / 'broker' / 'passwd'}\n"
                f"acl_file {out / 'broker' / 'acl.conf'}\n"
                "log_type all\n"  # denied PUBLISHes and every delivery are logged at debug
                f"listener {device_port} 127.0.0.1\n"
                "use_username_as_clientid true\n"
            )
            mosquitto = MosquittoProcess(
                config_extra=extra, workdir=root / "mq", allow_anonymous=False
            )
            stack.enter_context(mosquitto)
            server_url, device_url = mosquitto.url, f"mqtt://127.0.0.1:{device_port}"
        dep = Deployment(root / "dep", project=P, broker_url=server_url, auth=auth)
        stack.callback(dep.close)
        if mosquitto is not None:
            dep.credentials = ProvisionedLogins(out)
        combiners = dep.start_combiners(REGIONS)
        fleet = dep.start_fleet(N, device_urls=dict.fromkeys(REGIONS, device_url))
        ctl = dep.start_controller(evaluator=digits.evaluator, registry=FleetRegistry(out))
        w = World(
            kind,
            root,
            auth,
            out,
            dep,
            server_url,
            device_url,
            records,
            ctl,
            {c.config.region: c for c in combiners},
            fleet,
            embedded=embedded,
            mosquitto=mosquitto,
        )
        w.start_session()
        yield w
    finally:
        if w is not None:
            w.attacks_over.set()
            if w.thread is not None:
                w.thread.join(60)
        stack.close()
        logging.getLogger().removeHandler(records)


# -- the attacks ------------------------------------------------------------------------------


def _forbidden_publishes(w: World, targets: list[tuple[str, bool]]) -> None:
    """The attacker publishes a marked payload on each (topic, retain); none may arrive."""
    marker = f"forged-{uuid.uuid4().hex}".encode()
    sentinel = T.device("region-0", ATTACKER, "telemetry")  # its own: allowed
    obs = w.observer(*{t for t, _ in targets}, sentinel)
    before = w.stats() if w.embedded else {}
    rejected = w.rejections()
    refused = w.ctl.presence.refused
    mark = w.mark()
    atk = w.device_probe(ATTACKER)
    try:
        assert atk.connect() == 0
        for topic, retain in targets:
            atk.publish(topic, marker, retain=retain)
        atk.publish(sentinel, telemetry())
        wait_until("the sentinel", lambda: sentinel in obs.topics())
        settle()
        leaked = [m.topic for m in obs.messages if m.payload == marker]
        assert leaked == [], f"{w.kind}: forged messages reached a subscriber on {leaked}"
    finally:
        atk.close()
        obs.close()
    # the denial is visible
    if w.embedded is not None:
        assert w.delta(before) == {"denied_publish": len(targets)}
        text = w.edgefl_log(mark)
        for topic, _ in targets:
            assert (
                f"denied client 'edgefl-{P}-{ATTACKER}' ({ATTACKER}, device) publish on "
                f"{topic!r}" in text
            ), text
    else:
        text = w.mosquitto_log(mark)
        for topic, retain in targets:
            pattern = denied_publish(ATTACKER, topic, retain)
            assert re.search(pattern, text), f"no denial logged for {topic}:\n{text[-3000:]}"
    # nothing reached edgefl either: no combiner rejected a bad chunk, no status was refused
    assert w.rejections() == rejected
    assert w.ctl.presence.refused == refused


def attack_publish_to_another_devices_topics(w: World) -> None:
    """1a. dev-0090 publishes on dev-0001's update and status topics."""
    _forbidden_publishes(
        w,
        [
            (T.device("region-1", VICTIM, "update"), False),
            (T.device("region-1", VICTIM, "status"), False),
        ],
    )


def attack_publish_under_another_region(w: World) -> None:
    """1b. dev-0090 publishes as itself, but under region-1 (it lives in region-0)."""
    _forbidden_publishes(
        w,
        [
            (T.device("region-1", ATTACKER, "update"), False),
            (T.device("region-1", ATTACKER, "telemetry"), False),
        ],
    )


def attack_retained_status_under_the_wrong_region(w: World) -> None:
    """2. A retained "online" status under another region: the broker denies it; and should a
    broker let it through, the controller ignores it (the registry pins each device's region)."""
    forged_topic = T.device("region-1", ATTACKER, "status")
    before = w.stats() if w.embedded else {}
    mark = w.mark()
    atk = w.device_probe(ATTACKER)
    try:
        assert atk.connect() == 0
        atk.publish(forged_topic, online(), retain=True)
    finally:
        atk.close()
    settle()
    # a fresh subscriber gets region-1's retained statuses, but not the forged one
    obs = w.observer(T.device_wildcard("region-1", "status"))
    try:
        wait_until(
            "region-1's genuine retained statuses",
            lambda: (
                {T.device("region-1", d, "status") for d in EVERYONE[1::2]} <= set(obs.topics())
            ),
        )
        settle()
        assert forged_topic not in obs.topics(), f"{w.kind}: the forged retained status was kept"
    finally:
        obs.close()
    if w.embedded is not None:
        assert w.delta(before) == {"denied_publish": 1}
        assert f"publish on {forged_topic!r}" in w.edgefl_log(mark)
    else:
        pattern = denied_publish(ATTACKER, forged_topic, True)
        assert re.search(pattern, w.mosquitto_log(mark))
    assert w.ctl.presence.eligible().get(ATTACKER) is None

    # defence in depth: a login the broker lets through (the controller's) announces dev-0001
    # in region-0, the issue's failing scenario; the controller ignores it and counts it
    wrong = T.device("region-0", VICTIM, "status")
    ignored = w.ctl.presence.ignored["wrong_region"]
    mark = w.mark()
    forger = w.server_probe("controller", Role.controller)
    try:
        assert forger.connect() == 0
        forger.publish(wrong, online(), retain=True)
        wait_until(
            "the controller to ignore the status",
            lambda: w.ctl.presence.ignored["wrong_region"] == ignored + 1,
        )
        forger.publish(wrong, b"", retain=True)  # clear the retained message
    finally:
        forger.close()
    assert w.ctl.presence.eligible()[VICTIM] == "region-1"
    text = w.edgefl_log(mark)
    assert f"device {VICTIM} under region region-0: it is registered in region region-1" in text
    t0 = time.time()
    (rec,) = w.rounds_after(t0)
    assert sorted(rec.devices) == EVERYONE  # still planned in its own region, and only there
    assert {p["region"] for p in rec.participants if p["device"] == VICTIM} == {"region-1"}


def attack_client_id_takeover(w: World) -> None:
    """3. dev-0090 connects with dev-0001's client id (both forms), with its own credentials."""
    agent = w.agent(VICTIM)
    count = agent.conn.connect_count
    assert agent.conn.connected.is_set()
    before = w.stats() if w.embedded else {}
    mark = w.mark()
    t0 = time.time()
    codes = {}
    present = {}
    for cid, clean in ((f"edgefl-{P}-{VICTIM}", False), (VICTIM, True)):
        thief = w.device_probe(ATTACKER, client_id=cid, clean=clean)
        try:
            codes[cid] = thief.connect()
            present[cid] = thief.session_present
        finally:
            thief.close()
    settle()
    if w.embedded is not None:
        assert codes == dict.fromkeys(codes, NOT_AUTHORIZED)
        assert w.delta(before) == {"refused_client_id": 2}
        text = w.edgefl_log(mark)
        for cid in codes:
            assert f"refused CONNECT of client {cid!r} (user {ATTACKER!r})" in text, text
    else:
        # use_username_as_clientid: the thief is connected as itself, never as the victim
        assert codes == dict.fromkeys(codes, 0)
        assert not present[f"edgefl-{P}-{VICTIM}"]  # not the victim's persistent session
        text = w.mosquitto_log(mark)
        assert len(re.findall(rf"New client connected from \S+ as {ATTACKER} \(", text)) == 2
        assert f"as {VICTIM} (" not in text and f"as edgefl-{P}-{VICTIM} (" not in text
        assert f"Client {VICTIM} already connected" not in text, text
    # the victim was never kicked off, and it still gets its tasks
    assert agent.conn.connected.is_set() and agent.conn.connect_count == count
    (rec,) = w.rounds_after(t0)
    assert VICTIM in [p["device"] for p in rec.participants]


def attack_subscribe_to_another_devices_topics(w: World) -> None:
    """4. dev-0090 subscribes to dev-0001's updates and tasks (also with wildcards)."""
    filters = [
        T.device("region-1", VICTIM, "update"),
        T.device("region-1", VICTIM, "task"),
        T.device_wildcard("region-1", "update"),
        T.device_wildcard(None, "task"),
    ]
    _no_reading(w, ATTACKER, Role.device, "region-0", filters)


def _no_reading(w: World, who: str, role: Role, region: str, filters: list[str]) -> None:
    """``who`` subscribes to ``filters``: refused (SUBACK 0x80) or nothing is delivered while
    a legitimate observer sees dev-0001's tasks and updates for two whole rounds."""
    watched = [T.device("region-1", VICTIM, "update"), T.device("region-1", VICTIM, "task")]
    obs = w.observer(*watched)
    before = w.stats() if w.embedded else {}
    mark = w.mark()
    spy = w.device_probe(who) if role is Role.device else w.server_probe(who, role, region)
    try:
        assert spy.connect() == 0
        codes = spy.subscribe(*filters)
        t0 = time.time()
        w.rounds_after(t0, 2)
        settle()
        seen = set(obs.topics())
        assert set(watched) <= seen, f"the observer saw no traffic to compare with: {seen}"
        assert spy.messages == [], f"{w.kind}: {who} read {spy.topics()}"
    finally:
        spy.close()
        obs.close()
    if w.embedded is not None:
        assert codes == [SUBACK_REFUSED] * len(filters)
        assert w.delta(before) == {"denied_subscribe": len(filters)}
        text = w.edgefl_log(mark)
        for f in filters:
            assert f"({who}, {role.value}) subscribe on {f!r}" in text, text
    else:
        # Mosquitto grants the SUBACK and checks read access at delivery, where a denial is
        # silent: its log shows the subscription and deliveries to the observer, none to the spy
        assert codes == [1] * len(filters)
        text = w.mosquitto_log(mark)
        spy_id = who if role is Role.device else spy.client_id
        assert f"Received SUBSCRIBE from {spy_id}" in text
        assert re.search(
            rf"Sending PUBLISH to {re.escape(obs.client_id)} .*'{re.escape(watched[0])}'", text
        )
        assert f"Sending PUBLISH to {spy_id} " not in text, f"{w.kind}: delivered to {spy_id}"


def attack_expired_token_on_connect(w: World) -> None:
    """5a. A token that has expired, at CONNECT."""
    mark = w.mark()
    if w.embedded is not None:
        before = w.stats()
        token = w.issue(ATTACKER, Role.device, "region-0", ttl_s=-60)
        probe = w.device_probe(ATTACKER, token)
        try:
            assert probe.connect() == NOT_AUTHORIZED
        finally:
            probe.close()
        assert w.delta(before) == {"refused_connect": 1}
        assert f"refused client 'edgefl-{P}-{ATTACKER}' (user {ATTACKER!r}): token expired" in (
            w.edgefl_log(mark)
        )
        return
    # Mosquitto never reads exp: `edgefl fleet sync` drops expired accounts and reloads it
    exp = jwt.decode(w.device_password(EXPIRED_IDLE), options={"verify_signature": False})["exp"]
    wait_until("the token to expire", lambda: time.time() > exp, 5)
    passwd = w.out / "broker" / "passwd"
    assert f"{EXPIRED_IDLE}:" in passwd.read_text()  # provisioned, and loaded at start
    report = sync(w.out, revocations=w.revocations, reload_pid=w.pid)
    assert EXPIRED_IDLE in report.expired and report.changed
    w.wait_reloaded(mark)
    assert f"{EXPIRED_IDLE}:" not in passwd.read_text()
    probe = w.device_probe(EXPIRED_IDLE)
    try:
        assert probe.connect() == NOT_AUTHORIZED
    finally:
        probe.close()
    text = w.mosquitto_log(mark)
    assert "Client <unknown> disconnected, not authorised." in text, text


def attack_expired_token_while_connected(w: World) -> None:
    """5b. A token that expires while its connection is open: cut off, and cannot come back."""
    mark = w.mark()
    before = w.stats() if w.embedded else {}
    if w.embedded is not None:
        token = w.issue(EXPIRING_LIVE, Role.device, "region-0", ttl_s=2)
    else:
        csv = write_csv(w.root / "expiring.csv", [(EXPIRING_LIVE, "region-0")])
        provision(csv, P, w.out, auth=w.auth, token_ttl_s=2)
        w.reload()  # the new account
        token = w.device_password(EXPIRING_LIVE)
    exp = float(jwt.decode(token, options={"verify_signature": False})["exp"])
    dev = w.device_probe(EXPIRING_LIVE, token, watched=True)
    assert isinstance(dev, Watched)
    try:
        assert dev.connect() == 0
        if w.embedded is not None:
            bound = exp + LEEWAY_S + SWEEP_S + 2 - time.time()
            assert dev.dropped.wait(bound), "the expired token's connection is still open"
        else:
            wait_until("the token to expire", lambda: time.time() > exp, 5)
            assert not dev.dropped.is_set()  # (Mosquitto itself does not know about exp)
            report = sync(w.out, revocations=w.revocations, reload_pid=w.pid)
            assert EXPIRING_LIVE in report.expired
            assert dev.dropped.wait(5), "the expired account's connection is still open"
        assert dev.dropped_at is not None and dev.dropped_at >= exp
        print(f"{w.kind}: expiry-to-disconnect {dev.dropped_at - exp:.2f} s")
    finally:
        dev.close()
    again = w.device_probe(EXPIRING_LIVE, token)
    try:
        assert again.connect() == NOT_AUTHORIZED
    finally:
        again.close()
    if w.embedded is not None:
        assert w.delta(before) == {"disconnected_expired": 1, "refused_connect": 1}
        text = w.edgefl_log(mark)
        assert (
            f"disconnecting client 'edgefl-{P}-{EXPIRING_LIVE}' (subject {EXPIRING_LIVE!r}, "
            "device): token expired"
        ) in text, text
    else:
        text = w.mosquitto_log(mark)
        assert "Reloading config." in text
        assert re.search(rf"Client {EXPIRING_LIVE} disconnected\.", text), text
        assert "Client <unknown> disconnected, not authorised." in text


def _bad_token(w: World, token: str, reason: str) -> None:
    mark = w.mark()
    before = w.stats() if w.embedded else {}
    probe = w.device_probe(ATTACKER, token)
    try:
        assert probe.connect() == NOT_AUTHORIZED
    finally:
        probe.close()
    if w.embedded is not None:
        assert w.delta(before) == {"refused_connect": 1}
        text = w.edgefl_log(mark)
        assert f"refused client 'edgefl-{P}-{ATTACKER}' (user {ATTACKER!r}): " in text
        assert reason in text, text
    else:
        # on Mosquitto a token is just a password: anything but the provisioned one is refused
        assert w.mosquitto_log(mark).count("Client <unknown> disconnected, not authorised.") == 1


def _claims(project: str = P) -> dict[str, object]:
    now = time.time()
    return {
        "iss": "edgefl",
        "sub": ATTACKER,
        "role": "device",
        "project": project,
        "region": "region-0",
        "jti": uuid.uuid4().hex,
        "iat": now,
        "exp": int(now) + 600,
    }


def attack_wrong_signature(w: World) -> None:
    """6a. Our key id, but signed with someone else's Ed25519 key."""
    kid = KeyDir(Path(w.auth.keys or "")).active_kid()
    stranger = ed25519.Ed25519PrivateKey.generate()
    token = jwt.encode(_claims(), stranger, algorithm="EdDSA", headers={"kid": kid})
    _bad_token(w, token, "bad token signature")


def attack_alg_none(w: World) -> None:
    """6b. An unsigned token (alg=none) with our key id."""
    kid = KeyDir(Path(w.auth.keys or "")).active_kid()
    token = jwt.encode(_claims(), None, algorithm="none", headers={"kid": kid})
    _bad_token(w, token, "token alg 'none' does not match key")


def attack_token_for_another_project(w: World) -> None:
    """6c. A genuine token from our own issuer, for another project."""
    token = w.auth.issuer().issue(ATTACKER, Role.device, "other", region="region-0")
    _bad_token(w, token, f"token is for project 'other', not {P!r}")


def attack_revoked_while_connected(w: World) -> None:
    """7a. `edgefl fleet revoke` on a connected device: cut off, and cannot come back."""
    mark = w.mark()
    before = w.stats() if w.embedded else {}
    token = w.device_password(REVOKED_LIVE)  # revoke deletes the bundle
    dev = w.device_probe(REVOKED_LIVE, token, watched=True)
    assert isinstance(dev, Watched)
    try:
        assert dev.connect() == 0
        settle()
        start = time.time()
        if w.embedded is not None:
            revoke(w.out, REVOKED_LIVE, revocations=w.revocations)
        else:
            revoke(w.out, REVOKED_LIVE, revocations=w.revocations, reload_pid=w.pid)
        assert dev.dropped.wait(SWEEP_S + 3), "the revoked device is still connected"
        assert dev.dropped_at is not None
        print(f"{w.kind}: revoke-to-disconnect {dev.dropped_at - start:.2f} s")
    finally:
        dev.close()
    again = w.device_probe(REVOKED_LIVE, token)
    try:
        assert again.connect() == NOT_AUTHORIZED
    finally:
        again.close()
    wait_until("the controller's registry", lambda: w.ctl.presence.registry is not None
               and w.ctl.presence.registry.is_revoked(REVOKED_LIVE), 5)  # fmt: skip
    if w.embedded is not None:
        assert w.delta(before) == {"disconnected_revoked": 1, "refused_connect": 1}
        text = w.edgefl_log(mark)
        assert (
            f"disconnecting client 'edgefl-{P}-{REVOKED_LIVE}' (subject {REVOKED_LIVE!r}, "
            "device): token revoked"
        ) in text, text
        assert (
            f"refused client 'edgefl-{P}-{REVOKED_LIVE}' (user {REVOKED_LIVE!r}): token revoked"
            in text
        )
    else:
        text = w.mosquitto_log(mark)
        assert "Reloading config." in text
        assert re.search(rf"Client {REVOKED_LIVE} disconnected\.", text), text
        assert "Client <unknown> disconnected, not authorised." in text


def attack_revoked_on_connect(w: World) -> None:
    """7b. A device revoked while offline cannot connect (it could just before)."""
    token = w.device_password(REVOKED_IDLE)  # revoke deletes the bundle
    ok = w.device_probe(REVOKED_IDLE, token)
    try:
        assert ok.connect() == 0
    finally:
        ok.close()
    settle()
    mark = w.mark()
    before = w.stats() if w.embedded else {}
    if w.embedded is not None:
        revoke(w.out, REVOKED_IDLE, revocations=w.revocations)
    else:
        revoke(w.out, REVOKED_IDLE, revocations=w.revocations, reload_pid=w.pid)
        w.wait_reloaded(mark)
    record = json.loads((w.out / "fleet.json").read_text())["devices"][REVOKED_IDLE]
    assert record["status"] == "revoked"
    probe = w.device_probe(REVOKED_IDLE, token)
    try:
        assert probe.connect() == NOT_AUTHORIZED
    finally:
        probe.close()
    if w.embedded is not None:
        assert w.delta(before) == {"refused_connect": 1}
        text = w.edgefl_log(mark)
        assert f"(user {REVOKED_IDLE!r}): token revoked" in text, text
    else:
        assert "Client <unknown> disconnected, not authorised." in w.mosquitto_log(mark)


def attack_replayed_chunk(w: World) -> None:
    """8. dev-0001 republishes, on its own topic with its own connection, an update chunk it
    sent in an earlier round (captured by a controller-role observer).

    The combiner refuses it whenever it arrives; it is recorded in a round only if that round
    is still open when it lands. Under load a round can close between the plan and the replay,
    so the replay is tried in up to three rounds until one records it.
    """
    update = T.device("region-1", VICTIM, "update")
    plans = T.combiner("region-1", "round")
    obs = w.observer(update, plans)
    comb = w.combiners["region-1"]
    mark = w.mark()
    want = ""
    recorded: list[tuple[int, str]] = []
    try:
        wait_until("an update of dev-0001", lambda: update in obs.topics())
        first = next(m for m in obs.messages if m.topic == update)
        captured = bytes(first.payload)
        old_task = str(parse_chunk(captured).meta["task_id"])
        want = f"replayed update: these bytes were accepted for {old_task}"
        for _attempt in range(3):
            seen_plans = len(obs.messages)
            replays = comb.stats["rejected_replayed"]

            def new_plan(seen: int = seen_plans) -> bool:
                for m in obs.messages[seen:]:
                    msg = decode(m.payload, ("round", "close")) if m.topic == plans else {}
                    if msg.get("type") == "round":
                        return bool(msg["task_id"] != old_task)
                return False

            wait_until("a later round's plan", new_plan)
            # the device itself replays: its own agent's connection, its own topic
            w.agent(VICTIM).conn.publish(update, captured, qos=1).wait_for_publish(5)
            wait_until("the combiner to reject the replay",
                       lambda r=replays: comb.stats["rejected_replayed"] == r + 1)  # fmt: skip
            w.rounds_after(time.time())  # the round the replay hit is over and recorded
            recorded = [
                (rec.round, r["reason"])
                for _, rec in list(w.completed)
                for r in rec.rejected
                if r["device"] == VICTIM
            ]
            if any(reason.startswith(want) for _, reason in recorded):
                break
    finally:
        obs.close()
    assert any(reason.startswith(want) for _, reason in recorded), recorded
    text = w.edgefl_log(mark)
    assert f"combiner combiner-region-1: rejected update from {VICTIM}: replayed update" in text


def attack_combiner_reads_another_region(w: World) -> None:
    """9. The region-0 combiner's login subscribes to region-1's device updates and tasks."""
    filters = [
        T.device_wildcard("region-1", "update"),
        T.device("region-1", VICTIM, "update"),
        T.device("region-1", VICTIM, "task"),
    ]
    _no_reading(w, "combiner-region-0", Role.combiner, "region-0", filters)


def attack_rest_roles(w: World) -> None:
    """10. The running deployment's API: one endpoint per class, with every role's token.

    tests/test_api_roles.py covers every role and bad token against every endpoint class in
    depth; here the point is the live deployment: nobody below operator can stop the session.
    """
    store = make_store(w.dep.state_url)
    server = DashboardServer(store, port=0, auth=w.auth, project=P).start()
    tokens = {
        "admin": w.issue("ada", Role.admin),
        "operator": w.issue("olga", Role.operator),
        "viewer": w.issue("vic", Role.viewer),
        "device": w.issue(ATTACKER, Role.device, "region-0"),
        "combiner": w.issue("combiner-region-0", Role.combiner, "region-0"),
        "controller": w.issue("controller", Role.controller),
    }
    live_stop = ("POST", f"/api/sessions/{SESSION_ID}/stop")
    seen: dict[str, dict[str, int]] = {}
    try:
        with httpx.Client(base_url=server.url.rstrip("/"), timeout=10) as http:
            for who, token in tokens.items():
                headers = {"Authorization": f"Bearer {token}"}
                allowed_stop = who in ("admin", "operator")
                calls = {
                    "viewer": ("GET", "/api/sessions"),
                    # allowed roles stop a session that does not exist, never the live one
                    "operator": ("POST", "/api/sessions/no-such-session/stop")
                    if allowed_stop
                    else live_stop,
                    "admin": ("GET", "/api/keys"),
                }
                seen[who] = {}
                for cls, (method, path) in calls.items():
                    res = http.request(method, path, headers=headers)
                    seen[who][cls] = res.status_code
                    if res.status_code == 403:
                        assert f"role '{who}'" in res.json()["detail"], res.text
    finally:
        server.stop()
        store.close()
    people = {"viewer": 200, "operator": 404, "admin": 200}
    assert seen == {
        "admin": people,
        "operator": {**people, "admin": 403},
        "viewer": {"viewer": 200, "operator": 403, "admin": 403},
        **{svc: dict.fromkeys(people, 403) for svc in ("device", "combiner", "controller")},
    }
    assert w.running()
    sess = w.ctl.store.get_session(SESSION_ID)
    assert sess is not None and not sess.stop_requested_by


ATTACKS: dict[str, Callable[[World], None]] = {
    "publish_to_another_devices_topics": attack_publish_to_another_devices_topics,
    "publish_under_another_region": attack_publish_under_another_region,
    "retained_status_under_the_wrong_region": attack_retained_status_under_the_wrong_region,
    "client_id_takeover": attack_client_id_takeover,
    "subscribe_to_another_devices_topics": attack_subscribe_to_another_devices_topics,
    "expired_token_on_connect": attack_expired_token_on_connect,
    "expired_token_while_connected": attack_expired_token_while_connected,
    "wrong_signature": attack_wrong_signature,
    "alg_none": attack_alg_none,
    "token_for_another_project": attack_token_for_another_project,
    "revoked_while_connected": attack_revoked_while_connected,
    "revoked_on_connect": attack_revoked_on_connect,
    "replayed_chunk": attack_replayed_chunk,
    "combiner_reads_another_region": attack_combiner_reads_another_region,
    "rest_roles": attack_rest_roles,
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack(world: World, attack: str) -> None:
    assert world.running(), f"the session is not running: {world.error or world.outcome}"
    start = time.monotonic()
    ATTACKS[attack](world)
    world.attacks[attack] = (start, time.monotonic())
    assert world.running(), f"the session ended during {attack}: {world.error or world.outcome}"


def test_the_session_completed_undisturbed(world: World) -> None:
    w = world
    last_attack = max((end for _, end in w.attacks.values()), default=None)
    first_attack = min((start for start, _ in w.attacks.values()), default=None)
    assert w.running()
    w.attacks_over.set()
    assert w.thread is not None
    w.thread.join(120)
    assert not w.thread.is_alive()
    assert w.error is None, f"{w.kind}: the session failed: {w.error}"
    assert w.outcome is not None and w.outcome.status == "completed"
    rounds = w.ctl.store.list_rounds(SESSION_ID)
    assert [(r.round, r.attempt, r.status) for r in rounds] == [
        (k, 0, "completed") for k in range(1, ROUNDS + 1)
    ]
    assert all(sorted(r.devices) == EVERYONE for r in rounds)  # nobody else was planned
    assert all(sorted(p["device"] for p in r.participants) == EVERYONE for r in rounds)
    # the only rejections are the replays, each recorded against the round it hit
    rejected = [(x["device"], x["reason"].split(":")[0]) for r in rounds for x in r.rejected]
    assert set(rejected) <= {(VICTIM, "replayed update")}, rejected
    accs = completed_accuracies(rounds)
    assert accs == pytest.approx(digits.reference_run(N, ROUNDS), abs=1e-9)
    # no device of the session was ever kicked off or had to reconnect
    assert {a.config.device_id: a.conn.connect_count for a in w.fleet.agents} == w.connects
    # the combiners refused nothing but the replays, the controller nothing but the forgery
    for comb in w.combiners.values():
        assert comb.stats["rejected"] == comb.stats["rejected_replayed"], dict(comb.stats)
    assert w.ctl.presence.refused == 0
    assert w.ctl.presence.ignored["unregistered"] == 0 and w.ctl.presence.ignored["revoked"] == 0
    # the attacks overlapped running rounds: rounds completed all through the matrix, and the
    # session reached its last round only after the last attack
    if last_attack is not None and first_attack is not None:
        assert w.held_at is not None and w.held_at > last_attack, (
            "rounds stopped before the attacks did"
        )
        during = [rec.round for t, rec in w.completed if first_attack <= t <= last_attack]
        print(
            f"{w.kind}: {len(w.attacks)} attacks over {last_attack - first_attack:.1f} s, "
            f"{len(during)} rounds completed meanwhile"
        )
        assert len(during) >= 10
