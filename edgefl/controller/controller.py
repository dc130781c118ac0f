"""The controller: runs sessions round by round and keeps every step durable.

A round: wait for a quorum online, select devices, publish the global model (retained
chunks), send a round plan to each region's combiner, then collect the combiners' partial
sums until all arrive, the buffer fills, or the deadline passes. The exact merge of the
partials gives the weighted mean; the server aggregator turns it into the next model, which
is stored (blob, then record) before the session pointer moves. A restarted controller
therefore resumes from the last completed round; a round that was in flight is retried under
a new attempt id, and devices retrain it deterministically.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgefl.aggregation import WeightedSum, make_aggregator, spec_of
from edgefl.aggregation.spec import spec_to_wire
from edgefl.controller.config import SessionConfig
from edgefl.controller.models import ModelRepository
from edgefl.controller.presence import Presence
from edgefl.protocol import ChunkError, CodecError, MessageError, Topics, decode, encode
from edgefl.protocol.chunking import Reassembler, split_payload
from edgefl.protocol.messages import clean_metrics
from edgefl.protocol.tensors import decode_tensors
from edgefl.store.base import BlobStore, RoundRecord, SessionRecord, Store
from edgefl.telemetry import NullSink, Point, TelemetrySink
from edgefl.transport import MqttConnection

log = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]
Evaluator = Callable[[Weights], dict[str, float]]
RoundCallback = Callable[[RoundRecord, SessionRecord], None]


class SessionFailed(RuntimeError):
    """A session that cannot go on (no quorum after all attempts, stopped, ...)."""


@dataclass
class _Event:
    kind: str  # "partial" | "progress"
    region: str
    msg: dict


class Controller:
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
    ) -> None:
        self.store = store
        self.models = ModelRepository(store, blobs)
        self.project = project
        self.topics = Topics(project)
        self.evaluator = evaluator
        self.sink: TelemetrySink = sink or NullSink()
        self.presence = Presence(self.topics)
        self._events: queue.Queue[_Event] = queue.Queue()
        self._partials = Reassembler(ttl_s=600)
        self._stop = threading.Event()
        self._published: list[tuple[str, int]] = []  # (version, chunk count) on the broker
        self.conn = MqttConnection(
            broker_url,
            client_id=f"edgefl-{project}-{controller_id}",
            username=username,
            password=password,
            clean_session=False,
        )

    # lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> Controller:
        t = self.topics
        self.conn.subscribe(t.device_wildcard(None, "status"), self.presence.on_device_status)
        self.conn.subscribe(t.combiner_wildcard("status"), self.presence.on_combiner_status)
        self.conn.subscribe(t.combiner_wildcard("partial"), self._on_partial_chunk)
        self.conn.subscribe(t.combiner_wildcard("progress"), self._on_progress)
        self.conn.subscribe(t.device_wildcard(None, "telemetry"), self._on_telemetry)
        self.conn.start(timeout)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.conn.stop()

    def request_stop(self) -> None:
        """Ask a running session to stop after the current step (it stays resumable)."""
        self._stop.set()

    # network thread --------------------------------------------------------------------
    def _on_partial_chunk(self, topic: str, payload: bytes) -> None:
        try:
            region, _ = self.topics.parse_combiner_topic(topic)
            done = self._partials.feed(region, payload)
            if done is None:
                return
            msg = decode(done.payload, "partial")
        except (ChunkError, MessageError, ValueError) as exc:
            log.error("controller: rejected partial on %s: %s", topic, exc)
            return
        self._events.put(_Event("partial", region, msg))

    def _on_progress(self, topic: str, payload: bytes) -> None:
        try:
            region, _ = self.topics.parse_combiner_topic(topic)
            msg = decode(payload, "progress")
        except (MessageError, ValueError) as exc:
            log.warning("controller: bad progress on %s: %s", topic, exc)
            return
        self._events.put(_Event("progress", region, msg))

    def _on_telemetry(self, topic: str, payload: bytes) -> None:
        try:
            region, device, _ = self.topics.parse_device_topic(topic)
            msg = decode(payload, "telemetry")
        except (MessageError, ValueError) as exc:
            log.debug("controller: bad telemetry on %s: %s", topic, exc)
            return
        fields = clean_metrics(msg["metrics"])
        if fields:
            tags = {"project": self.project, "region": region, "device": device}
            self.sink.write([Point("device", fields, tags, float(msg["ts"]))])

    # sessions --------------------------------------------------------------------------
    def create_session(self, config: SessionConfig, initial_weights: Weights) -> SessionRecord:
        if self.store.get_session(config.session_id) is not None:
            raise ValueError(f"session {config.session_id!r} exists; resume it or pick another id")
        make_aggregator(config.aggregator, **config.aggregator_params)  # fail early on typos
        record, _ = self.models.save(
            initial_weights, parent=None, session_id=config.session_id, round_=0
        )
        version = record.version
        now = time.time()
        record = SessionRecord(
            session_id=config.session_id,
            project=self.project,
            config=config.model_dump(),
            status="running",
            current_round=0,
            model_version=version,
            created=now,
            updated=now,
        )
        self.store.create_session(record)
        log.info(
            "session %s created: %d rounds, aggregator %s",
            config.session_id,
            config.rounds,
            config.aggregator,
        )
        return record

    def run(self, session_id: str, on_round: RoundCallback | None = None) -> SessionRecord:
        """Run a session to the end, resuming from its stored state."""
        sess = self.store.get_session(session_id)
        if sess is None:
            raise KeyError(f"unknown session {session_id!r}")
        if sess.status == "completed":
            return sess
        config = SessionConfig(**sess.config)
        for rec in self.store.list_rounds(session_id):
            if rec.status == "running":  # left behind by a controller that died
                self.store.finish_round(
                    rec.task_id,
                    status="failed",
                    model_out=None,
                    participants=[],
                    metrics={},
                    reason="controller restarted",
                    finished=time.time(),
                )
        if sess.status != "running":
            self.store.update_session(session_id, status="running")
        aggregator = make_aggregator(config.aggregator, **config.aggregator_params)
        weights, blob = self.models.load(sess.model_version)
        aggregator.load_state_dict(self.models.load_optimizer_state(sess.model_version))
        version = sess.model_version
        if sess.current_round > 0:
            log.info(
                "session %s: resuming after round %d (model %s)",
                session_id,
                sess.current_round,
                version,
            )
        self._forget_stale_models(session_id, version, config.chunk_size)
        self._publish_model(version, blob, config.chunk_size)
        attempts = self._attempts_so_far(session_id)
        r = sess.current_round + 1
        while r <= config.rounds:
            if self._stop.is_set():
                self.store.update_session(session_id, status="stopped")
                raise SessionFailed(f"session {session_id} stopped by request after round {r - 1}")
            attempt = attempts.get(r, 0)
            if attempt >= config.max_attempts:
                self.store.update_session(session_id, status="failed")
                raise SessionFailed(
                    f"round {r} failed {attempt} times; session {session_id} failed"
                )
            attempts[r] = attempt + 1
            outcome = self._run_round(config, r, attempt, weights, version, blob, aggregator)
            if outcome is None:
                continue
            rec, weights, version, blob = outcome
            sess = self.store.get_session(session_id)
            if on_round is not None:
                on_round(rec, sess)
            r += 1
        self.store.update_session(session_id, status="completed")
        return self.store.get_session(session_id)

    def _attempts_so_far(self, session_id: str) -> dict[int, int]:
        out: dict[int, int] = {}
        for rec in self.store.list_rounds(session_id):
            out[rec.round] = max(out.get(rec.round, 0), rec.attempt + 1)
        return out

    # rounds ----------------------------------------------------------------------------
    def _run_round(
        self,
        config: SessionConfig,
        r: int,
        attempt: int,
        weights: Weights,
        version: str,
        blob: bytes,
        aggregator: object,
    ) -> tuple[RoundRecord, Weights, str, bytes] | None:
        sid = config.session_id
        task_id = f"{sid}:{r}:{attempt}"
        online = self.presence.wait_for(config.min_devices, config.wait_for_devices_s)
        if len(online) < config.min_devices:
            self._record_failure(
                task_id,
                sid,
                r,
                attempt,
                version,
                [],
                time.time(),
                f"only {len(online)} of {config.min_devices} devices online",
            )
            return None
        selected = self._select(online, config, r, attempt)
        by_region: dict[str, list[str]] = {}
        for dev in selected:
            by_region.setdefault(online[dev], []).append(dev)
        started = time.time()
        deadline = started + config.round_timeout_s
        self._start_record(task_id, sid, r, attempt, version, selected, started)
        digest = self.store.get_model(version).digest
        spec = spec_of(weights)
        self._drain_events()
        for region, devs in sorted(by_region.items()):
            plan = encode(
                "round",
                task_id=task_id,
                session=sid,
                round=r,
                model_version=version,
                model_digest=bytes.fromhex(digest),
                devices=sorted(devs),
                deadline=deadline,
                train=config.train,
                chunk_size=config.chunk_size,
                spec=spec_to_wire(spec),
            )
            self.conn.publish(self.topics.combiner(region, "round"), plan, qos=1)
        partials = self._collect(task_id, by_region, config, deadline)
        merged = WeightedSum(spec)
        participants: list[dict] = []
        rejected: list[dict] = []
        for region, msg in partials.items():
            try:
                sums = decode_tensors(msg["sums"])
                merged.merge(sums, msg["weight"], msg["count"])
            except (CodecError, KeyError, ValueError) as exc:
                log.error("round %s: partial from %s unusable: %s", task_id, region, exc)
                continue
            participants.extend(msg["devices"])
            rejected.extend(msg["rejected"])
        if merged.count < config.min_devices or merged.weight <= 0:
            self._record_failure(
                task_id,
                sid,
                r,
                attempt,
                version,
                participants,
                started,
                f"quorum not met: {merged.count} accepted updates, "
                f"{config.min_devices} needed ({len(rejected)} rejected)",
            )
            return None
        new_weights = aggregator.step(weights, merged.mean({k: d for k, (d, _) in spec.items()}))
        metrics = self._round_metrics(new_weights, participants)
        metrics["rejected"] = float(len(rejected))
        new_record, new_blob = self.models.save(
            new_weights,
            parent=version,
            session_id=sid,
            round_=r,
            optimizer_state=aggregator.state_dict(),
            meta={"metrics": metrics},
        )
        new_version = new_record.version
        self.store.finish_round(
            task_id,
            status="completed",
            model_out=new_version,
            participants=participants,
            metrics=metrics,
            finished=time.time(),
        )
        self.store.update_session(sid, current_round=r, model_version=new_version)
        tags = {"project": self.project, "session": sid}
        self.sink.write([Point("round", {"round": float(r), **metrics}, tags)])
        self._publish_model(new_version, new_blob, config.chunk_size)
        log.info(
            "round %s done: %d updates, metrics %s",
            task_id,
            merged.count,
            {k: round(v, 4) for k, v in metrics.items()},
        )
        return self.store.get_round(task_id), new_weights, new_version, new_blob

    def _select(
        self, online: dict[str, str], config: SessionConfig, r: int, attempt: int
    ) -> list[str]:
        devices = sorted(online)
        if config.max_devices is not None and len(devices) > config.max_devices:
            rng = random.Random(f"{config.seed}:{r}:{attempt}")
            devices = sorted(rng.sample(devices, config.max_devices))
        return devices

    def _collect(
        self, task_id: str, by_region: dict[str, list[str]], config: SessionConfig, deadline: float
    ) -> dict[str, dict]:
        partials: dict[str, dict] = {}
        accepted: dict[str, int] = {}
        closed_at: float | None = None
        while len(partials) < len(by_region):
            limit = deadline if closed_at is None else closed_at + config.close_grace_s
            try:
                ev = self._events.get(timeout=max(0.0, limit - time.time()))
            except queue.Empty:
                if closed_at is not None:
                    missing = sorted(set(by_region) - set(partials))
                    log.warning("round %s: no partial from %s; going on without", task_id, missing)
                    break
                closed_at = self._close(task_id, by_region, partials, "deadline")
                continue
            if ev.msg.get("task_id") != task_id or ev.region not in by_region:
                continue
            if ev.kind == "partial":
                partials[ev.region] = ev.msg
            else:
                accepted[ev.region] = max(accepted.get(ev.region, 0), ev.msg["accepted"])
                if (
                    closed_at is None
                    and config.buffer_size is not None
                    and sum(accepted.values()) >= config.buffer_size
                ):
                    closed_at = self._close(task_id, by_region, partials, "buffer full")
        return partials

    def _close(self, task_id: str, by_region: dict, partials: dict, why: str) -> float:
        log.info("round %s: closing (%s)", task_id, why)
        msg = encode("close", task_id=task_id)
        for region in by_region:
            if region not in partials:
                self.conn.publish(self.topics.combiner(region, "round"), msg, qos=1)
        return time.time()

    def _drain_events(self) -> None:
        while True:
            try:
                self._events.get_nowait()
            except queue.Empty:
                return

    def _round_metrics(self, weights: Weights, participants: list[dict]) -> dict[str, float]:
        metrics: dict[str, float] = {"updates": float(len(participants))}
        total = sum(p["n"] for p in participants)
        if total:
            metrics["examples"] = float(total)
            keys = set().union(*(p["metrics"].keys() for p in participants))
            for k in sorted(keys):
                vals = [(p["n"], p["metrics"][k]) for p in participants if k in p["metrics"]]
                n = sum(w for w, _ in vals)
                if n:
                    metrics[f"devices_{k}"] = sum(w * v for w, v in vals) / n
        if self.evaluator is not None:
            metrics.update(self.evaluator(weights))
        return metrics

    def _start_record(
        self,
        task_id: str,
        sid: str,
        r: int,
        attempt: int,
        version: str,
        devices: list[str],
        started: float,
    ) -> None:
        self.store.start_round(
            RoundRecord(
                task_id=task_id,
                session_id=sid,
                round=r,
                attempt=attempt,
                status="running",
                model_in=version,
                model_out=None,
                devices=devices,
                started=started,
            )
        )

    def _record_failure(
        self,
        task_id: str,
        sid: str,
        r: int,
        attempt: int,
        version: str,
        participants: list[dict],
        started: float,
        reason: str,
    ) -> None:
        log.warning("round %s failed: %s", task_id, reason)
        if self.store.get_round(task_id) is None:
            self._start_record(task_id, sid, r, attempt, version, [], started)
        self.store.finish_round(
            task_id,
            status="failed",
            model_out=None,
            participants=participants,
            metrics={},
            reason=reason,
            finished=time.time(),
        )

    # model distribution ----------------------------------------------------------------
    def _forget_stale_models(self, session_id: str, current: str, chunk_size: int) -> None:
        """A resumed controller does not know what its predecessor left retained on the
        broker: clear the session's recent versions other than the current one."""
        recent = [m for m in self.store.list_models(session_id) if m.version != current][-3:]
        for m in recent:
            for i in range(max(1, -(-m.size // chunk_size))):
                self.conn.publish(self.topics.model_chunk(m.version, i), b"", qos=1, retain=True)

    def _publish_model(self, version: str, blob: bytes, chunk_size: int) -> None:
        """Publish a model as retained chunks, and clear versions older than the previous one."""
        if self._published and self._published[-1][0] == version:
            return
        chunks = split_payload(blob, chunk_size, transfer=version, meta={"version": version})
        infos = [
            self.conn.publish(
                self.topics.model_chunk(version, c.index), c.to_bytes(), qos=1, retain=True
            )
            for c in chunks
        ]
        for info in infos:
            info.wait_for_publish(timeout=30)
        self._published.append((version, len(chunks)))
        while len(self._published) > 2:
            old, n = self._published.pop(0)
            for i in range(n):
                self.conn.publish(self.topics.model_chunk(old, i), b"", qos=1, retain=True)
