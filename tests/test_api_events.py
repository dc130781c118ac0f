"""The Server-Sent Events streams, read over real HTTP (uvicorn on loopback) with httpx.

A second store on the same SQLite file plays the controller: the API only learns of changes
by reading the store, as it does when the controller is another process.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from edgefl.api.auth import ApiAuth, install_problem_handlers
from edgefl.api.events import LiveEvents
from edgefl.api.server import DashboardServer
from edgefl.auth.revocation import revoke_subject
from edgefl.auth.tokens import AuthConfig, Role, generate_secret
from edgefl.store import make_store
from edgefl.store.base import (
    CombinerChange,
    DeviceChange,
    ModelRecord,
    RoundRecord,
    SessionRecord,
    Store,
)

PROBLEM = "application/problem+json"


@dataclass
class Event:
    name: str  # "comment" for a `: ...` line
    data: Any = None


@dataclass
class Reader:
    """Parses an SSE response line by line; ``closed`` once the server ended the stream."""

    response: httpx.Response
    lines: Iterator[str] = field(init=False)
    closed: bool = False

    def __post_init__(self) -> None:
        self.lines = self.response.iter_lines()

    def next(self) -> Event:
        name, data = "message", None
        for line in self.lines:
            if line.startswith(":"):
                return Event("comment", line[1:].strip())
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
            elif line == "" and data is not None:
                return Event(name, data)
        self.closed = True
        raise EOFError("the server ended the stream")

    def until(self, pred, timeout: float = 10.0) -> list[Event]:
        """Events up to and including the first one ``pred`` accepts."""
        seen: list[Event] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev = self.next()
            seen.append(ev)
            if pred(ev):
                return seen
        raise AssertionError(f"no matching event within {timeout}s: {seen}")


@pytest.fixture
def auth(tmp_path) -> AuthConfig:
    return AuthConfig(secret=generate_secret(), revocations=str(tmp_path / "revoked.json"))


@pytest.fixture
def stores(tmp_path) -> Iterator[tuple[Store, Store]]:
    """(writer, reader) on one SQLite file: the controller's and the API's connections."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    writer, reader = make_store(url), make_store(url)
    yield writer, reader
    writer.close()
    reader.close()


def _bearer(auth: AuthConfig, role: Role | str = Role.viewer, who: str = "vic") -> dict[str, str]:
    return {"Authorization": f"Bearer {auth.issuer().issue(who, role, 'p', region='region-0')}"}


def _round(store: Store, sid: str, r: int, acc: float, *, finish: bool = True) -> None:
    store.start_round(
        RoundRecord(f"{sid}:{r}:0", sid, r, 0, "running", f"v{r - 1}", None, ["d1", "d2"])
    )
    if not finish:
        return
    store.finish_round(
        f"{sid}:{r}:0",
        status="completed",
        model_out=f"v{r}",
        participants=[{"device": "d1", "region": "region-0", "n": 10, "metrics": {}}],
        metrics={"accuracy": acc, "loss": 1 - acc},
        finished=time.time(),
    )
    store.add_model(ModelRecord(f"v{r}", f"v{r - 1}", sid, r, "ab" * 32, 10, time.time()))
    store.update_session(sid, current_round=r, model_version=f"v{r}")


@contextmanager
def _serve(app: FastAPI) -> Iterator[str]:
    """``app`` in uvicorn on a free loopback port, as `DashboardServer` serves the real one."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)


def _ticket(http: httpx.Client, headers: dict[str, str]) -> str:
    res = http.post("/api/sse-ticket", headers=headers)
    assert res.status_code == 201, res.text
    assert res.json()["expires_in"] == 30
    return res.json()["ticket"]


def test_a_ticket_opens_one_stream_that_follows_a_session_to_its_end(stores, auth) -> None:
    writer, reader = stores
    writer.create_session(SessionRecord("s1", "p", {"rounds": 3}, "running", 0, "v0", 1, 1))
    writer.create_session(SessionRecord("x", "q", {"rounds": 3}, "running", 0, "v0", 1, 1))
    _round(writer, "s1", 1, 0.5)
    server = DashboardServer(reader, port=0, auth=auth, project="p").start()
    try:
        with httpx.Client(base_url=server.url.rstrip("/"), timeout=10) as http:
            assert http.post("/api/sse-ticket").status_code == 401
            refused = http.post("/api/sse-ticket", headers=_bearer(auth, Role.device, "dev-1"))
            assert refused.status_code == 403 and "'device'" in refused.json()["detail"]
            no_ticket = http.get("/api/sessions/s1/events")
            assert no_ticket.status_code == 401
            assert no_ticket.headers["content-type"] == PROBLEM
            bogus = http.get("/api/sessions/s1/events", params={"ticket": "made-up"})
            assert bogus.status_code == 401 and "ticket" in bogus.json()["detail"]

            viewer = _bearer(auth)
            other = http.get("/api/sessions/x/events", params={"ticket": _ticket(http, viewer)})
            assert other.status_code == 404  # another project's session is not there at all

            ticket = _ticket(http, viewer)
            with http.stream("GET", "/api/sessions/s1/events", params={"ticket": ticket}) as res:
                assert res.status_code == 200
                assert res.headers["content-type"].startswith("text/event-stream")
                assert res.headers["cache-control"] == "no-store"
                events = Reader(res)
                first = events.until(lambda e: e.name == "session")
                # the whole state first: the round, its model (with lineage), the session last
                assert [e.name for e in first] == ["round", "model", "session"]
                assert first[0].data["round"] == 1 and first[0].data["metrics"]["accuracy"] == 0.5
                assert first[1].data["version"] == "v1" and first[1].data["parent"] == "v0"
                assert first[2].data["current_round"] == 1 and first[2].data["rounds"] == 3

                _round(writer, "s1", 2, 0.0, finish=False)  # a round starts ...
                started = events.until(lambda e: e.name == "round")[-1]
                assert (started.data["round"], started.data["status"]) == (2, "running")
                writer.finish_round(
                    "s1:2:0",
                    status="completed",
                    model_out="v2",
                    participants=[],
                    metrics={"accuracy": 0.75, "loss": 0.3},
                    finished=time.time(),
                )
                writer.update_session("s1", current_round=2, model_version="v2")
                # ... and ends: only what changed comes, the round and then the session
                changed = events.until(lambda e: e.name == "session")
                assert [e.name for e in changed] == ["round", "session"]
                assert changed[0].data["status"] == "completed"
                assert changed[0].data["metrics"]["accuracy"] == 0.75
                assert changed[1].data["current_round"] == 2

                writer.update_session("s1", status="stopped", reason="stopped by olga")
                tail = events.until(lambda e: e.name == "end")
                assert [e.name for e in tail] == ["session", "end"]
                assert tail[0].data["status"] == "stopped"
                with pytest.raises(EOFError):  # a terminal session closes its stream
                    events.next()
            spent = http.get("/api/sessions/s1/events", params={"ticket": ticket})
            assert spent.status_code == 401 and "spent" in spent.json()["detail"]
    finally:
        server.stop()


def test_the_sessions_stream_takes_a_bearer_header_and_sends_only_changes(stores, auth) -> None:
    writer, reader = stores
    writer.create_session(SessionRecord("s1", "p", {"rounds": 3}, "running", 0, "v0", 1, 1))
    server = DashboardServer(reader, port=0, auth=auth, project="p").start()
    try:
        with (
            httpx.Client(base_url=server.url.rstrip("/"), timeout=10) as http,
            http.stream("GET", "/api/events", headers=_bearer(auth)) as res,
        ):
            assert res.status_code == 200
            events = Reader(res)
            first = events.next()
            assert first.name == "sessions"
            assert [(s["session_id"], s["status"]) for s in first.data] == [("s1", "running")]
            writer.create_session(SessionRecord("s2", "p", {"rounds": 5}, "running", 0, "", 2, 2))
            writer.create_session(SessionRecord("y", "q", {"rounds": 5}, "running", 0, "", 3, 3))
            nxt = events.next()
            assert nxt.name == "sessions"
            assert [s["session_id"] for s in nxt.data] == ["s2", "s1"]  # newest first, p only
            writer.update_session("s1", status="failed", reason="round 1 failed 3 times")
            last = events.next()
            assert [(s["session_id"], s["status"]) for s in last.data] == [
                ("s2", "running"),
                ("s1", "failed"),
            ]
    finally:
        server.stop()


def test_heartbeats_revocation_expiry_and_a_departing_client(stores, auth) -> None:
    """On a fast clock: heartbeat 0.3 s, tokens re-checked every 0.2 s, tickets live 0.3 s."""
    writer, reader = stores
    writer.create_session(SessionRecord("s1", "p", {"rounds": 3}, "running", 0, "v0", 1, 1))
    live = LiveEvents(
        reader,
        ApiAuth(auth, "p"),
        "p",
        poll_s=0.05,
        heartbeat_s=0.3,
        recheck_s=0.2,
        ticket_ttl_s=0.3,
    )
    app = FastAPI()
    install_problem_handlers(app)
    app.include_router(live.router)
    with _serve(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        late = http.post("/api/sse-ticket", headers=_bearer(auth)).json()["ticket"]
        time.sleep(0.5)
        expired = http.get("/api/sessions/s1/events", params={"ticket": late})
        assert expired.status_code == 401 and "expired" in expired.json()["detail"]

        ticket = http.post("/api/sse-ticket", headers=_bearer(auth, who="eve")).json()["ticket"]
        with http.stream("GET", "/api/sessions/s1/events", params={"ticket": ticket}) as res:
            events = Reader(res)
            assert events.next().name == "session"
            assert live.active == 1
            t0 = time.monotonic()
            beat = events.next()  # nothing changes: a heartbeat comment keeps the line alive
            assert beat == Event("comment", "heartbeat")
            assert 0.2 < time.monotonic() - t0 < 2
            revoke_subject(auth.revocations_path() or "", "eve")
            gone = events.until(lambda e: e.name == "auth", timeout=5)[-1]
            assert gone.data["status"] == 401 and "revoked" in gone.data["detail"]
            with pytest.raises(EOFError):
                events.next()

        with http.stream("GET", "/api/sessions/s1/events", headers=_bearer(auth)) as res:
            events = Reader(res)  # (held: a collected reader would close the response)
            assert events.next().name == "session"
            time.sleep(0.3)
            assert live.active == 1
        # the client left mid-stream: the server notices and stops reading the store for it
        deadline = time.monotonic() + 5
        while live.active:
            assert time.monotonic() < deadline, "the stream outlived its client"
            time.sleep(0.05)


def test_stopping_the_server_ends_open_streams_promptly(stores, auth) -> None:
    """A dashboard tab left open must not hold `make demo`'s Ctrl-C for uvicorn's timeout."""
    writer, reader = stores
    writer.create_session(SessionRecord("s1", "p", {"rounds": 3}, "running", 0, "v0", 1, 1))
    server = DashboardServer(reader, port=0, auth=auth, project="p").start()
    took: list[float] = []
    try:
        with (
            httpx.Client(base_url=server.url.rstrip("/"), timeout=10) as http,
            http.stream("GET", "/api/events", headers=_bearer(auth)) as res,
        ):
            events = Reader(res)
            assert events.next().name == "sessions"

            def stop() -> None:
                t0 = time.monotonic()
                server.stop()
                took.append(time.monotonic() - t0)

            stopper = threading.Thread(target=stop)
            stopper.start()
            assert events.next().name == "shutdown"
            stopper.join(10)
    finally:
        server.stop()
    assert took and took[0] < 2.0, f"stop() took {took}"


def _fleet(
    store: Store, *changes: DeviceChange, combiners: tuple[CombinerChange, ...] = ()
) -> None:
    store.record_fleet(list(changes), list(combiners))


def test_the_fleet_stream_sends_devices_and_combiners_then_only_what_changed(stores, auth) -> None:
    writer, reader = stores
    now = time.time()
    _fleet(
        writer,
        DeviceChange("p", "d1", "region-0", "online", now, telemetry={"cpu_percent": 5.0},
                     telemetry_at=now),
        DeviceChange("p", "d2", "region-1", "online", now),
        DeviceChange("p", "d3", "region-1", "offline", now - 60),
        DeviceChange("q", "other", "region-0", "online", now),  # another project's
        combiners=(CombinerChange("p", "region-0", "combiner-region-0", "online", now),),
    )  # fmt: skip
    live = LiveEvents(reader, ApiAuth(auth, "p"), "p", poll_s=0.05, fleet_poll_s=0.05)
    app = FastAPI()
    install_problem_handlers(app)
    app.include_router(live.router)
    with _serve(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        assert http.get("/api/fleet/events").status_code == 401
        asleep = http.get("/api/fleet/events", params={"state": "asleep"}, headers=_bearer(auth))
        assert asleep.status_code == 422
        ticket = _ticket(http, _bearer(auth))
        with http.stream("GET", "/api/fleet/events", params={"ticket": ticket}) as res:
            assert res.status_code == 200
            events = Reader(res)
            first = events.until(lambda e: e.name == "fleet")
            assert [e.name for e in first] == ["device"] * 3 + ["combiner", "fleet"]
            d1 = first[0].data  # the shape of GET /api/devices/{device}
            assert (d1["device"], d1["state"], d1["telemetry"]) == (
                "d1",
                "online",
                {"cpu_percent": 5.0},
            )
            assert [e.data["device"] for e in first[:3]] == ["d1", "d2", "d3"]  # p's only
            assert first[3].data["combiner"] == "combiner-region-0"
            assert first[4].data == {"matching": 3, "listed": 3, "devices": 3, "online": 2}

            # d2 trains: one device event, nothing about the rest
            trained = DeviceChange(
                "p", "d2", current_task="s1:1:0", accepted=1, telemetry={"train_loss": 0.5}
            )
            _fleet(writer, trained)
            changed = events.until(lambda e: e.name == "device")
            assert [e.data["device"] for e in changed if e.name == "device"] == ["d2"]
            assert changed[-1].data["accepted"] == 1
            assert changed[-1].data["current_task"] == "s1:1:0"
            assert changed[-1].data["telemetry"] == {"train_loss": 0.5}
            # a combiner's progress, and then d1 leaving: its state changes, the counts too
            _fleet(
                writer, combiners=(CombinerChange("p", "region-0", current_round=1, accepted=2),)
            )
            combiner = events.until(lambda e: e.name == "combiner")[-1]
            assert (combiner.data["current_round"], combiner.data["accepted"]) == (1, 2)
            _fleet(writer, DeviceChange("p", "d1", state="offline"))
            tail = events.until(lambda e: e.name == "fleet")
            assert [(e.name, e.data.get("device")) for e in tail] == [
                ("device", "d1"),
                ("fleet", None),
            ]
            assert tail[-1].data["online"] == 1

        # filtered like GET /api/devices: a device leaving the filter is removed
        ticket = _ticket(http, _bearer(auth))
        params = {"ticket": ticket, "region": "region-1", "state": "online", "limit": "5"}
        with http.stream("GET", "/api/fleet/events", params=params) as res:
            events = Reader(res)
            first = events.until(lambda e: e.name == "fleet")
            assert [e.data["device"] for e in first if e.name == "device"] == ["d2"]
            assert first[-1].data == {"matching": 1, "listed": 1, "devices": 3, "online": 1}
            _fleet(writer, DeviceChange("p", "d2", state="offline"))
            gone = events.until(lambda e: e.name == "fleet")
            assert [(e.name, e.data.get("device")) for e in gone] == [
                ("device_removed", "d2"),
                ("fleet", None),
            ]
            assert gone[0].data == {"project": "p", "device": "d2"}
            assert gone[-1].data["matching"] == 0
