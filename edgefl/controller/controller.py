"""The controller: runs sessions round by round and keeps every step durable.

A round: wait for a quorum online, select devices, publish the global model (retained
chunks), send a round plan to each region's combiner, then collect the combiners' partial
sums until all arrive, the buffer fills, or the deadline passes (``rounds.py``). The exact
merge of the partials gives the weighted mean; the server aggregator turns it into the next
model, which is stored (blob, then record) before the session pointer moves. A restarted
controller therefore resumes from the last completed round; a round that was in flight is
retried under a new attempt id, and devices retrain it deterministically.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from edgefl.aggregation import make_aggregator
from edgefl.controller.config import SessionConfig
from edgefl.controller.distribution import ModelDistributor
from edgefl.controller.errors import SessionBusy, SessionFailed
from edgefl.controller.fleet_state import FleetRecorder
from edgefl.controller.inbox import CombinerInbox
from edgefl.controller.lease import SessionLease
from edgefl.controller.model_versions import ModelRepository
from edgefl.controller.presence import Presence
from edgefl.controller.records import RoundAttempt
from edgefl.controller.registry import DeviceRegistry
from edgefl.controller.rounds import Evaluator, RoundRunner
from edgefl.controller.session_setup import load_package, new_session, package_blob_key
from edgefl.controller.stop_requests import StopWatch
from edgefl.controller.telemetry_forward import TelemetryForwarder
from edgefl.observability.hooks import session_scope
from edgefl.packages.format import ModelPackage
from edgefl.packages.owners import PackageOwners
from edgefl.protocol import MessageError, Topics, decode, encode
from edgefl.protocol.messages import package_ref
from edgefl.protocol.types import Weights
from edgefl.store.base import BlobStore, RoundRecord, SessionRecord, StorageError, Store
from edgefl.telemetry import NullSink, Point, TelemetrySink
from edgefl.transport import MqttConnection
from edgefl.transport.compat import say_hello

log = logging.getLogger(__name__)

RoundCallback = Callable[[RoundRecord, SessionRecord], None]


__all__ = ["Controller", "RoundCallback", "package_blob_key"]


class Controller:
    """Owns one MQTT connection and runs sessions of one project, one at a time.

    ``run`` blocks the calling thread until the session ends; ``request_stop`` may be called
    from any thread and leaves the session resumable. The store and blob store are borrowed,
    not closed by ``stop``. ``registry`` (e.g. ``FleetRegistry(fleet_dir)``) is the device
    registry that presence and the merge check identities against; without one, a device
    is pinned to the first region it is seen online in.
    """

    def __init__(
        self,
        broker_url: str,
        store: Store,
        blobs: BlobStore,
        *,
        project: str = "default",
        username: str | None = None,
        password: str | None = None,
        evaluator: Evaluator | None = None,
        controller_id: str = "controller",
        sink: TelemetrySink | None = None,
        lease_ttl_s: float = 10.0,
        lease_wait_s: float | None = None,
        registry: DeviceRegistry | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.models = ModelRepository(store, blobs)
        self.project = project
        self.topics = Topics(project)
        self.sink: TelemetrySink = sink or NullSink()
        # with a registry, presence trusts a status only under the device's registered region
        self.presence = Presence(self.topics, registry)
        self.inbox = CombinerInbox(self.topics)
        self.telemetry = TelemetryForwarder(self.topics, self.sink)
        # what it sees of the fleet, written to the store in batches for the REST API
        self.fleet = FleetRecorder(store, self.topics)
        self.presence.on_change = self.fleet.on_presence
        self.telemetry.on_point = self.fleet.on_telemetry
        self._stop = threading.Event()
        self.lease_ttl_s = lease_ttl_s
        # by default a controller waits out a crashed predecessor's lease, then takes over
        self.lease_wait_s = lease_ttl_s + 2.0 if lease_wait_s is None else lease_wait_s
        self.instance_id = (
            f"{controller_id}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        # A client id of its own and a clean session: a second controller must never kick the
        # first off the broker, and a resumed controller retries its round anyway, so it needs
        # nothing the broker queued while it was down.
        self.conn = MqttConnection(
            broker_url,
            client_id=f"edgefl-{project}-{controller_id}-{self.instance_id[-8:]}",
            username=username,
            password=password,
            clean_session=True,
            on_connect=self._on_connect,
        )
        self.distributor = ModelDistributor(self.conn, self.topics)
        self.rounds = RoundRunner(
            self.conn, self.topics, store, self.models, self.presence, self.inbox, evaluator
        )

    # lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> Controller:
        """Subscribe and connect; returns once the broker accepted the connection."""
        t = self.topics
        self.conn.subscribe(t.device_wildcard(None, "status"), self.presence.on_device_status)
        self.conn.subscribe(t.combiner_wildcard("status"), self.presence.on_combiner_status)
        self.conn.subscribe(t.pool_status_wildcard(), self.presence.on_pool_member_status)
        self.conn.subscribe(t.combiner_wildcard("partial"), self.inbox.on_partial_chunk)
        self.conn.subscribe(t.combiner_wildcard("progress"), self._on_progress)
        self.conn.subscribe(t.device_wildcard(None, "telemetry"), self.telemetry.on_telemetry)
        self.conn.subscribe(t.device_wildcard(None, "request"), self._on_request)
        self.conn.start(timeout)
        self.fleet.start()
        return self

    def _on_progress(self, topic: str, payload: bytes) -> None:
        self.inbox.on_progress(topic, payload)
        self.fleet.on_progress(topic, payload)

    def _on_connect(self) -> None:
        """After a reconnect, publish the retained model again: the broker may have lost it.

        On a broker whose retained messages miss wildcard subscriptions (RabbitMQ), say hello
        on ``ctl/status`` so devices and combiners announce themselves again (protocol 7.1).
        """
        hello = encode("status", state="online", ts=time.time(), controller=self.instance_id)
        say_hello(self.conn, self.topics.controller_status(), hello)
        if self.conn.connect_count > 1:
            self.distributor.republish()

    def _on_request(self, topic: str, payload: bytes) -> None:
        """A device cannot find a retained model or package: republish it (rate-limited)."""
        try:
            self.topics.parse_device_topic(topic)
            msg = decode(payload, "fetch")
        except (MessageError, ValueError) as exc:
            log.debug("controller: bad request on %s: %s", topic, exc)
            return
        self.distributor.republish(msg["version"])

    def stop(self) -> None:
        """End a running session's loop at its next step, stop republishing, disconnect."""
        self._stop.set()
        self.distributor.stop()
        self.conn.stop()
        self.fleet.close()

    def request_stop(self) -> None:
        """Ask a running session to stop after the current step (it stays resumable)."""
        self._stop.set()

    # packages --------------------------------------------------------------------------
    def add_package(self, data: bytes) -> ModelPackage:
        """Validate a model package and keep it (content-addressed); a session names its digest.

        Raises PackageError naming what is wrong: the controller never hands devices a
        package that its own checks refuse. Its project is recorded as an owner, so the
        REST API shows the package to that project's members (``packages.owners``).
        """
        package = ModelPackage.loads(data)
        key = package_blob_key(package.digest)
        if not self.blobs.exists(key):
            self.blobs.put(key, data)
        PackageOwners(self.blobs).add(package.digest, self.project)
        return package

    def load_package(self, digest: str) -> tuple[ModelPackage, bytes]:
        """A stored package and its bytes; KeyError if it was never added."""
        return load_package(self.blobs, digest)

    # sessions --------------------------------------------------------------------------
    def create_session(
        self, config: SessionConfig, initial_weights: Weights | None = None
    ) -> SessionRecord:
        """Store the initial model and the session; raise ValueError if the id is taken.

        With a package and no ``initial_weights``, the package's own weights start the session.
        """
        return new_session(self.store, self.blobs, self.project, config, initial_weights)

    @session_scope  # its log lines name the session (and land in its log file)
    def run(
        self,
        session_id: str,
        on_round: RoundCallback | None = None,
        *,
        retry_failed: bool = False,
        claim: bool = False,
    ) -> SessionRecord:
        """Run a session to the end, resuming from its stored state.

        Only one controller runs a session: this one takes the session's lease first (waiting
        up to ``lease_wait_s`` for a crashed holder's lease to expire) and raises
        ``SessionBusy`` if another live controller holds it. A failed session runs again only
        with ``retry_failed``, which gives the failed round a fresh attempt budget. A
        ``queued`` session (from the REST API) is claimed under the lease, queued -> running,
        and gets a fresh budget too; ``claim`` (a serving controller) insists on that and
        raises ``SessionBusy`` if it is no longer queued (an operator stopped it meanwhile).
        """
        sess = self._get_session(session_id)
        if sess.status == "completed":
            return sess
        if sess.status == "failed" and not retry_failed:
            raise SessionFailed(
                f"session {session_id} failed: {sess.reason or 'no reason recorded'}. "
                "Run it again with retry_failed (edgefl controller --resume ID --retry) to give "
                "the failed round a fresh attempt budget"
            )
        with SessionLease(
            self.store,
            session_id,
            self.instance_id,
            ttl_s=self.lease_ttl_s,
            wait_s=self.lease_wait_s,
            cancelled=self._stop,
        ) as lease:
            # the state read before the lease may be stale: whoever held it may have run on
            sess = self._get_session(session_id)
            if sess.status == "completed":
                return sess
            if sess.status == "failed" and not retry_failed:
                raise SessionFailed(f"session {session_id} failed: {sess.reason}")
            fresh = sess.status == "failed" and retry_failed
            if claim or sess.status == "queued":  # from the queue, with a fresh attempt budget
                try:
                    sess = self.store.transition_session(session_id, ("queued",), "running")
                except ValueError as exc:  # stopped, or claimed, meanwhile: not ours to run
                    raise SessionBusy(str(exc)) from None
                fresh = True
            return self._run_leased(sess, lease, on_round, fresh)

    def _run_leased(
        self,
        sess: SessionRecord,
        lease: SessionLease,
        on_round: RoundCallback | None,
        fresh_budget: bool,
    ) -> SessionRecord:
        session_id = sess.session_id
        config = SessionConfig(**sess.config)
        self._fail_orphaned_rounds(session_id)
        attempts = self._attempts_so_far(session_id)
        # a retried failed session starts its attempt budget afresh from what was used
        spent = dict(attempts) if fresh_budget else {}
        if sess.status != "running":
            self.store.update_session(session_id, status="running", reason="")
        aggregator = make_aggregator(config.aggregator, **config.aggregator_params)
        weights, blob = self.models.load(sess.model_version)
        aggregator.load_state_dict(self.models.load_optimizer_state(sess.model_version))
        version = sess.model_version
        if sess.current_round > 0:
            log.info(
                "session %s: resuming after round %d (model %s, fence %d)",
                session_id,
                sess.current_round,
                version,
                lease.fence,
            )
        self.distributor.forget_stale(self.store, session_id, version, config.chunk_size)
        package = None
        if config.package is not None:
            _, package_blob = self.load_package(config.package)
            package = package_ref(config.package, len(package_blob))
            self.distributor.publish_package(package["id"], package_blob, config.chunk_size)
        self.distributor.publish(version, blob, config.chunk_size)
        del blob  # the weights view it until the first round replaces them; then it is garbage
        stops = StopWatch(self, session_id).start()  # the REST API's stop requests
        r = sess.current_round + 1
        while r <= config.rounds:
            if lease.lost.is_set():  # another controller took over: touch nothing more
                raise SessionBusy(f"session {session_id}: this controller lost its lease")
            by = stops.check()
            if self._stop.is_set() or by:
                why = f"stopped by request{f' of {by}' if by else ''} after round {r - 1}"
                self.store.update_session(session_id, status="stopped", reason=why)
                raise SessionFailed(f"session {session_id} {why}")
            attempt = attempts.get(r, 0)
            if attempt - spent.get(r, 0) >= config.max_attempts:
                last = self.store.list_rounds(session_id)[-1].reason if attempt else ""
                why = f"round {r} failed {config.max_attempts} times (last: {last})"
                self.store.update_session(session_id, status="failed", reason=why)
                raise SessionFailed(f"session {session_id} failed: {why}")
            attempts[r] = attempt + 1
            task_id = RoundAttempt(session_id, r, attempt, version).task_id
            self.fleet.round_started(task_id)
            try:
                outcome = self.rounds.run(
                    config,
                    RoundAttempt(session_id, r, attempt, version),
                    weights,
                    aggregator,
                    package,
                    fence=lease.fence,
                )
            except StorageError as exc:
                why = f"round {r}: {exc}"
                self._fail_orphaned_rounds(session_id, reason=str(exc))
                self.store.update_session(session_id, status="failed", reason=why)
                raise SessionFailed(
                    f"session {session_id} failed: {why}. Free space, then run it again "
                    "with retry_failed (--retry)"
                ) from exc
            finally:
                self.fleet.round_ended(task_id)
            if outcome is None:
                continue
            weights, version = outcome.weights, outcome.version
            self.store.update_session(session_id, current_round=r, model_version=version)
            rec = self.store.get_round(outcome.task_id)
            if rec is not None:
                tags = {"project": self.project, "session": session_id}
                self.sink.write([Point("round", {"round": float(r), **rec.metrics}, tags)])
            self.distributor.publish(version, outcome.blob, config.chunk_size)
            if on_round is not None and rec is not None:
                on_round(rec, self._get_session(session_id))
            r += 1
        self.store.update_session(session_id, status="completed")
        return self._get_session(session_id)

    def _get_session(self, session_id: str) -> SessionRecord:
        sess = self.store.get_session(session_id)
        if sess is None:
            raise KeyError(f"unknown session {session_id!r}")
        return sess

    def _fail_orphaned_rounds(self, session_id: str, reason: str = "controller restarted") -> None:
        """Mark rounds left 'running' (by a dead predecessor, or a failed write) as failed."""
        for rec in self.store.list_rounds(session_id):
            if rec.status == "running":
                self.store.finish_round(
                    rec.task_id,
                    status="failed",
                    model_out=None,
                    participants=[],
                    metrics={},
                    reason=reason,
                    finished=time.time(),
                )

    def _attempts_so_far(self, session_id: str) -> dict[int, int]:
        out: dict[int, int] = {}
        for rec in self.store.list_rounds(session_id):
            out[rec.round] = max(out.get(rec.round, 0), rec.attempt + 1)
        return out
