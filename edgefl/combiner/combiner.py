"""The regional combiner.

It subscribes to its region's topic tree, dispatches round tasks to the region's selected
devices, reassembles chunked updates, validates each one and folds it into a running weighted
sum the moment it is complete. When every assigned device has reported — or the controller
closes the round (deadline or buffer full) — it sends the sufficient statistics upward.

The network thread only queues messages; one worker thread handles them in arrival order
(hashing, decoding and folding release the GIL, so the network keeps reading meanwhile). The
deadline timer queues onto the same worker, the periodic sweep of idle transfers runs on it
between messages, and ``stop`` takes the lock, so the round state is never touched by two
threads at once.

One device cannot take the region down: its transfers in flight are capped (a new one evicts
its own oldest), its rejections are logged at most once per ``warn_interval_s`` and then
summarised, and a replayed or stale round plan (a lower ``(fence, round, attempt)`` than one
already accepted for its session) is dropped.

Every update is bound to its sender, round and transfer: it must name the topic's device,
its transfer's ``meta.task_id`` must be its own ``task_id``, and bytes the combiner already
accepted for another round (a replay: caught by digest at the first chunk) are refused. These
provenance rejections are recorded in the round's partial even when the device's genuine
update is accepted too, so the controller's round record shows them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefl.aggregation import UpdateRejected, WeightedSum, validate_update
from edgefl.aggregation.compressed import check_update, fold_delta
from edgefl.aggregation.weighted_sum import axpy_inplace
from edgefl.combiner import fedbuff
from edgefl.combiner.held import HeldFull, HeldUpdates, rule_from_plan
from edgefl.observability import hooks
from edgefl.observability.logs import log_context
from edgefl.observability.tracing import trace_field
from edgefl.protocol import ChunkError, CodecError, MessageError, Topics, decode, encode
from edgefl.protocol.chunking import (
    DEFAULT_CHUNK_SIZE,
    ChunkWriter,
    DigestMismatch,
    Reassembler,
    ReceiverFull,
    TransferRefused,
    parse_chunk,
    release_array,
    trim_heap,
    tune_allocator,
)
from edgefl.protocol.compression import tensor_bytes
from edgefl.protocol.messages import OPTIONAL, SCHEMAS, clean_metrics, encode_payload
from edgefl.protocol.tensors import decode_tensors
from edgefl.protocol.types import Participant, Rejection, Spec, spec_from_wire
from edgefl.transport import MqttConnection
from edgefl.transport.compat import announce_on_hello
from edgefl.transport.mqtt import stream_window

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]

INBOX_MESSAGES = 16  # at most 16 chunks (4 MiB at the default chunk size) wait for the worker
INBOX_BYTES = 4 * 1024 * 1024  # ... and at most 4 MiB of them (or one), whatever the chunk size
REMEMBERED_SESSIONS = 64  # sessions whose newest accepted plan is remembered (stale-plan check)
ACCEPTED_DIGESTS = 16_384  # digests of accepted updates remembered to catch their replays
PROVENANCE_RECORDS = 64  # provenance rejections listed in one partial (all are counted)
PROGRESS_EVERY_S = 0.05  # during a burst of updates, a progress report at most this often


# The task a device gets is the round plan minus what only the combiner needs.
TASK_FIELDS = tuple(SCHEMAS["task"])
TASK_OPTIONAL_FIELDS = tuple(OPTIONAL["task"])


@dataclass
class CombinerConfig:
    """Where a combiner connects, which region it serves, and its limits against bad input."""

    broker_url: str
    project: str = "default"
    region: str = "region-0"
    combiner_id: str | None = None
    username: str | None = None
    password: str | None = None
    max_update_bytes: int = 256 * 1024 * 1024
    memory_budget_bytes: int = 64 * 1024 * 1024
    max_examples: int = 10**9  # an update claiming more examples is rejected
    transfer_ttl_s: float = 600.0
    partial_chunk_size: int = DEFAULT_CHUNK_SIZE
    # per device: one upload per round task plus one overlapping resend
    max_transfers_per_device: int = 2
    max_spill_files: int = 64  # transfers spilled to temporary files at once
    # updates larger than this are reassembled in temporary files (the page cache), not in
    # this process's memory, and read through a mapping one tensor at a time
    spill_above_bytes: int = 16 * 1024 * 1024
    warn_interval_s: float = 10.0  # one warning per device and kind of rejection per interval
    # a member of the region's combiner pool: it announces itself on its own status topic,
    # serves the devices the controller assigns it in each plan, and receives only their
    # updates (docs/scaling.md, Combiner pools); every member needs its own combiner_id
    pool: bool = False
    # robust aggregators (plan field "aggregate") hold the round's updates: at most this many
    max_held_updates: int = 1000
    max_held_bytes: int = 1024 * 1024 * 1024

    @property
    def name(self) -> str:
        return self.combiner_id or f"combiner-{self.region}"


@dataclass
class _Round:
    task_id: str
    plan: dict[str, Any]
    devices: set[str]
    spec: Spec
    acc: WeightedSum
    reported: set[str] = field(default_factory=set)
    participants: list[Participant] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    rejected_devices: set[str] = field(default_factory=set)  # the devices in ``rejected``
    declines: Counter[str] = field(default_factory=Counter)  # decline reasons, for one log line
    # replays and forgeries: kept even if the device's genuine update is accepted later
    provenance: list[Rejection] = field(default_factory=list)
    provenance_seen: set[tuple[str, str]] = field(default_factory=set)
    flushed: bool = False
    timer: threading.Timer | None = None
    update_bytes: int = 0  # payload bytes of the updates folded (reported in the partial)
    tensor_bytes: int = 0  # ... of which tensor data
    held: HeldUpdates | None = None  # robust aggregation: the updates themselves (held.py)
    span: Any = None  # the region round's span while tracing is on (edgefl.observability)
    carry: bool = False  # async: folds stale updates until the next plan adopts it (fedbuff.py)


class Combiner:
    """Aggregates one region's updates as they stream in and sends sums to the controller.

    Owns its MQTT connection and its worker thread; ``stop`` announces it offline, closes the
    connection and joins the worker. Memory is O(model size) whatever the number of devices:
    the inbox is bounded and each update is folded as soon as it is complete, and each device
    has a fixed share of the reassembly state (``max_transfers_per_device``), so one device
    cannot crowd out the others. Every refused update is counted in ``stats``, logged with a
    reason (at most one warning per device and kind per ``warn_interval_s``, then a summary)
    and reported to the controller in the partial.
    """

    def __init__(self, config: CombinerConfig) -> None:
        tune_allocator()  # large blocks go back to the OS when freed (memory ~ model size)
        self.config = config
        self.topics = Topics(config.project)
        self._lock = threading.RLock()
        # Everything the combiner does runs on one worker, fed in arrival order: the network
        # thread keeps reading while the worker hashes, decodes and folds (those release the
        # GIL), and a close can never overtake chunks that arrived before it.
        # The inbox is bounded: when the worker falls behind, the network thread blocks, TCP
        # pushes back on the broker, and memory stays O(model size) however many devices send.
        self._inbox: queue.Queue[tuple | None] = queue.Queue(maxsize=INBOX_MESSAGES)
        self._inbox_bytes = 0  # payload bytes queued in the inbox
        self._room = threading.Condition()
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._round: _Round | None = None
        self._progress_due = False  # the open round's counts changed since the last report
        self._progress_at = 0.0
        self._closed_ids: list[str] = []
        self._window = fedbuff.Window()  # async sessions: the plans of the recent rounds
        # per session, the newest (fence, round, attempt) accepted; least recently used first
        self._plan_keys: dict[str, tuple[int, int, int]] = {}
        self._stale_logged: dict[str, None] = {}
        # SHA-256 of every update accepted (most recent last) -> its task_id: a later copy of
        # the same bytes for another round is a replay
        self._accepted_digests: dict[bytes, str] = {}
        # replays already counted: (open task_id or "", device, digest), most recent last
        self._replays_seen: dict[tuple[str, str, bytes], None] = {}
        self.reassembler = Reassembler(
            max_payload=config.max_update_bytes,
            memory_budget=config.memory_budget_bytes,
            ttl_s=config.transfer_ttl_s,
            max_transfers_per_source=config.max_transfers_per_device,
            max_bytes_per_source=config.max_update_bytes,
            max_spill_files=config.max_spill_files,
            zero_copy=True,
            spill_above=config.spill_above_bytes,
        )
        self.sweep_interval_s = min(1.0, config.transfer_ttl_s / 10)
        self._warnings = _WarningLimiter(config.name, config.warn_interval_s)
        # counters for operators and tests: "rejected" is the total, "rejected_<kind>" per
        # kind of rejection; "refused_transfers" counts transfers refused whole at their
        # first chunk (too large, or no room)
        self.stats: Counter[str] = Counter(
            accepted=0,
            rejected=0,
            partials=0,
            evicted=0,
            expired=0,
            refused_transfers=0,
            stale_plans=0,
            redelivered_plans=0,
            rejected_replayed=0,
            rejected_wrong_sender=0,
            rejected_unbound=0,
        )
        self._status_topic = (
            self.topics.pool_member_status(config.region, config.name)
            if config.pool
            else self.topics.combiner(config.region, "status")
        )
        self._update_topics: list[str] = []  # a pool member's exact update subscriptions
        status = self._status_topic
        self.conn = MqttConnection(
            config.broker_url,
            client_id=f"edgefl-{config.project}-{config.name}",
            username=config.username,
            password=config.password,
            # a region's only combiner keeps its session: the updates that arrive while it
            # restarts wait for it. A pool member is written off when it goes, so a session
            # kept for it would only queue updates nobody folds (and keep its last round's
            # subscriptions into the next life)
            clean_session=not config.pool,
            will=(
                status,
                encode("status", state="offline", ts=time.time(), combiner=config.name),
                1,
                True,
            ),
            on_connect=self._announce,
        )

    # lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> Combiner:
        c, t = self.config, self.topics
        self._worker = threading.Thread(target=self._work, name=f"combiner-{c.region}", daemon=True)
        self._worker.start()
        self.conn.subscribe(t.combiner(c.region, "round"), self._enqueue(self._on_round))
        self._on_update = self._enqueue(self._on_update_chunk)
        if not c.pool:  # a pool member subscribes to its assigned devices' topics per round
            self.conn.subscribe(t.device_wildcard(c.region, "update"), self._on_update)
        # brokers without retained delivery to wildcards: announce again on a controller's hello
        announce_on_hello(self.conn, t.controller_status(), self._announce)
        self.conn.start(timeout)
        log.info(
            "combiner %s serving region %s%s on %s",
            c.name,
            c.region,
            " as a pool member" if c.pool else "",
            self.conn.address.url,
        )
        return self

    def stop(self) -> None:
        self._stopping.set()  # unblocks a network thread waiting on a full inbox
        with self._lock:
            if self._round and self._round.timer:
                self._round.timer.cancel()
            rnd = self._round
            if rnd and not rnd.flushed:  # its span is exported, not lost
                rejected = len(rnd.rejected) + len(rnd.provenance)
                hooks.end_region_span(rnd.span, len(rnd.participants), rejected, "stopped")
        offline = encode("status", state="offline", ts=time.time(), combiner=self.config.name)
        self.conn.stop(publish_first=(self._status_topic, offline, 1, True))
        self._put(None)
        if self._worker is not None:
            self._worker.join(timeout=10)

    def _put(self, item: tuple | None) -> None:
        """Block while the worker is behind (backpressure), but never past stop()."""
        while True:
            try:
                self._inbox.put(item, timeout=0.2)
                return
            except queue.Full:
                if self._stopping.is_set() and item is not None:
                    return  # shutting down: drop it
                if self._stopping.is_set() and not (self._worker and self._worker.is_alive()):
                    return

    def _enqueue(self, handler: Handler) -> Handler:
        def put(topic: str, payload: bytes) -> None:
            self._reserve(len(payload))
            self._put((handler, topic, payload))

        return put

    def _reserve(self, size: int) -> None:
        """Wait until the inbox has room for ``size`` more bytes (it always takes one
        message): 16 chunks of 1 MiB would otherwise cost the combiner 16 MiB of backlog."""
        with self._room:
            while (
                self._inbox_bytes
                and self._inbox_bytes + size > INBOX_BYTES
                and not self._stopping.is_set()
            ):
                self._room.wait(0.2)  # woken by the worker taking a message
            self._inbox_bytes += size

    def _taken(self, item: tuple) -> None:
        """The worker took ``item`` from the inbox: free its bytes for the network thread."""
        if len(item) == 3 and isinstance(item[2], (bytes, bytearray)):
            with self._room:
                self._inbox_bytes = max(0, self._inbox_bytes - len(item[2]))
                self._room.notify()

    def _work(self) -> None:
        next_sweep = time.monotonic() + self.sweep_interval_s
        while True:
            try:
                item = self._inbox.get(timeout=max(0.0, next_sweep - time.monotonic()))
            except queue.Empty:
                item = ()  # a quiet link: time to sweep
            if item is None:
                return
            if self._stopping.is_set():
                if item:
                    self._taken(item)
                continue  # drain quickly to the sentinel
            if item:
                self._taken(item)
                handler, *args = item
                try:
                    with log_context(**self._log_fields()):
                        handler(*args)
                except Exception:  # one bad message must not stop the combiner
                    log.exception("combiner %s: handling %s failed", self.config.name, args[:1])
            if self._progress_due and (
                self._inbox.empty() or time.monotonic() - self._progress_at >= PROGRESS_EVERY_S
            ):
                self._send_progress()
            if time.monotonic() >= next_sweep:
                try:
                    self._sweep()
                except Exception:
                    log.exception("combiner %s: sweep failed", self.config.name)
                next_sweep = time.monotonic() + self.sweep_interval_s

    def _log_fields(self) -> dict[str, Any]:
        """The ids every log line of this combiner carries (and its open round's)."""
        c, rnd = self.config, self._round
        plan = rnd.plan if rnd is not None else None
        return hooks.region_context(c.project, c.region, c.name, plan)

    def _sweep(self) -> None:
        """Expire idle transfers even when nothing arrives; emit due warning summaries."""
        with self._lock:
            self.reassembler.expire()
            self.stats["expired"] = self.reassembler.expirations
            self._warnings.flush()

    def _announce(self) -> None:
        online = encode("status", state="online", ts=time.time(), combiner=self.config.name)
        self.conn.publish(self._status_topic, online, qos=1, retain=True)

    # round control ---------------------------------------------------------------------
    def _on_round(self, _topic: str, payload: bytes) -> None:
        try:
            msg = decode(payload, ("round", "close"))
        except MessageError as exc:
            log.error("combiner %s: bad control message: %s", self.config.name, exc)
            return
        if msg["type"] == "close":
            with self._lock:
                if self._round and self._round.task_id == msg["task_id"]:
                    self._flush("closed by controller")
            return
        self._start_round(msg)

    def _start_round(self, plan: dict) -> None:
        with self._lock:
            if plan["task_id"] in self._closed_ids or (
                self._round and self._round.task_id == plan["task_id"]
            ):
                self.stats["redelivered_plans"] += 1
                return  # a redelivered plan (QoS 1 is at-least-once)
            session, key = plan["session"], _plan_key(plan)
            newest = self._plan_keys.get(session)
            if newest is not None and key <= newest:
                self._drop_stale_plan(plan, key, newest)
                return
            try:
                assigned = _assigned_devices(plan, self.config.name)
            except ValueError as exc:
                log.error("combiner %s: round %s: %s", self.config.name, plan["task_id"], exc)
                return
            if assigned is None:  # a pool round without this member (it joined late)
                log.info(
                    "combiner %s: round %s assigns this member no devices",
                    self.config.name,
                    plan["task_id"],
                )
                return
            if self._round and not self._round.flushed and not self._round.carry:
                log.warning(
                    "combiner %s: round %s superseded by %s",
                    self.config.name,
                    self._round.task_id,
                    plan["task_id"],
                )
                if self._round.timer:
                    self._round.timer.cancel()
                hooks.end_region_span(self._round.span, 0, 0, "superseded")
            old = self._round.task_id if self._round else None
            if old and "async" not in plan:  # async: uploads for older rounds still count
                self.reassembler.discard(_for_task(old))
            try:
                spec = spec_from_wire(plan.get("spec"))
            except (ValueError, TypeError) as exc:
                log.error(
                    "combiner %s: round %s has a bad model spec: %s",
                    self.config.name,
                    plan["task_id"],
                    exc,
                )
                return
            self._plan_keys.pop(session, None)
            self._plan_keys[session] = key  # the most recently used session goes last
            while len(self._plan_keys) > REMEMBERED_SESSIONS:
                self._plan_keys.pop(next(iter(self._plan_keys)))
            devices = assigned
            trim_heap()  # the last round's messages are freed: give their memory back first
            rnd = _Round(plan["task_id"], plan, devices, spec, WeightedSum(spec))
            rnd.span = hooks.start_region_span(
                plan, self.config.region, self.config.name, len(devices)
            )
            refusal = self._hold_for(rnd) or self._async_for(rnd, self._round)
            delay = max(0.0, float(plan["deadline"]) - time.time())
            rnd.timer = threading.Timer(
                delay, lambda tid=plan["task_id"]: self._put((self._deadline, tid))
            )
            rnd.timer.daemon = True
            self._round = rnd
            rnd.timer.start()
            if refusal is not None:  # no device trains for a round this combiner cannot merge
                rnd.rejected.append(Rejection(device="", reason=refusal))
                self._flush("plan refused")
                return
        fields = {k: plan[k] for k in TASK_FIELDS}
        fields.update({k: plan[k] for k in TASK_OPTIONAL_FIELDS if k in plan})
        fields.update(trace_field(rnd.span))  # devices' task spans: children of the region's
        task = encode("task", **fields)
        if self.config.pool:
            self._follow_updates(devices)
        for dev in sorted(devices):
            self.conn.publish(self.topics.device(self.config.region, dev, "task"), task, qos=1)
        log.debug(
            "combiner %s: round %s dispatched to %d devices",
            self.config.name,
            plan["task_id"],
            len(devices),
        )
        if not devices and "async" not in plan:  # async: it still folds stale updates
            with self._lock:
                self._flush("no devices assigned")

    def _follow_updates(self, devices: set[str]) -> None:
        """Receive the updates of exactly ``devices``: a pool member subscribes to their
        update topics (before their tasks go out, so none is missed) and drops the last
        round's. Each update then reaches one member, whole: a shared subscription would
        hand out each chunk of a transfer to any member (docs/scaling.md)."""
        region = self.config.region
        wanted = [self.topics.device(region, d, "update") for d in sorted(devices)]
        keep = set(wanted)
        gone = [t for t in self._update_topics if t not in keep]
        new = [t for t in wanted if t not in set(self._update_topics)]
        if gone:
            self.conn.unsubscribe_many(gone)
        if new:
            self.conn.subscribe_many(new, self._on_update)
        self._update_topics = wanted

    def _hold_for(self, rnd: _Round) -> str | None:
        """Set up the held-updates path if the plan names a robust rule (``aggregate``);
        the reason it is refused if this combiner cannot run that rule."""
        if "aggregate" not in rnd.plan:
            return None
        c = self.config
        try:
            rule = rule_from_plan(rnd.plan["aggregate"])
        except (ValueError, TypeError) as exc:
            self.stats["refused_plans"] += 1
            why = f"combiner {c.name} cannot aggregate round {rnd.task_id} as asked: {exc}"
            log.error("%s", why)
            return why
        rnd.held = HeldUpdates(rule, c.max_held_updates, c.max_held_bytes)
        return None

    def _async_for(self, rnd: _Round, previous: _Round | None) -> str | None:
        """Register an async plan in the window and adopt the carried updates; the reason
        it is refused if its ``async`` field is malformed or asks for a robust rule."""
        if "async" not in rnd.plan:
            return None
        try:
            if rnd.held is not None:
                raise ValueError("a robust rule cannot fold updates of several versions")
            self._window.add(rnd.plan, rnd.devices)
        except ValueError as exc:
            self.stats["refused_plans"] += 1
            why = f"combiner {self.config.name} cannot run async round {rnd.task_id}: {exc}"
            log.error("%s", why)
            return why
        if previous is None or not previous.carry:
            return None
        if (
            previous.plan["session"] == rnd.plan["session"]
            and previous.spec == rnd.spec
            and (int(previous.plan["round"]) + 1 == int(rnd.plan["round"]))
        ):
            rnd.acc, rnd.participants = previous.acc, previous.participants
            rnd.update_bytes, rnd.tensor_bytes = previous.update_bytes, previous.tensor_bytes
            rnd.rejected = previous.rejected
            rnd.provenance, rnd.provenance_seen = previous.provenance, previous.provenance_seen
            if rnd.participants or rnd.rejected:
                self._progress()
        else:  # weighed for a round that did not follow: drop them, saying so
            why = f"folded for the round after {previous.plan['task_id']}, which did not follow"
            rnd.rejected += [
                Rejection(device=p["device"], reason=why) for p in previous.participants
            ]
        return None

    def _carry(self, rnd: _Round) -> None:
        """Async: after a flush, fold what still arrives into the next round (fedbuff.py)."""
        self._window.open_round = int(rnd.plan["round"]) + 1
        self._round = _Round(
            f"{rnd.task_id}+carry", rnd.plan, set(), rnd.spec, WeightedSum(rnd.spec), carry=True
        )

    def _refuse_stale(self, rnd: _Round, device: str, reason: str) -> None:
        """Count, log and record an update too old for the open round (never folded)."""
        self.stats["rejected"] += 1
        self.stats["rejected_stale"] += 1
        self._warnings.warn(
            device,
            "stale",
            "rejections",
            f"combiner {self.config.name}: rejected update from {device}: {reason}",
            reason,
        )
        if len(rnd.rejected) < PROVENANCE_RECORDS * 16:
            rnd.rejected.append(Rejection(device=device, reason=reason))
            self._progress()

    def _drop_stale_plan(
        self, plan: dict, key: tuple[int, int, int], newest: tuple[int, int, int]
    ) -> None:
        """Count a replayed or superseded plan; warn once per plan (redeliveries are quiet)."""
        self.stats["stale_plans"] += 1
        first = plan["task_id"] not in self._stale_logged
        self._stale_logged[plan["task_id"]] = None
        while len(self._stale_logged) > REMEMBERED_SESSIONS:
            self._stale_logged.pop(next(iter(self._stale_logged)))
        (log.warning if first else log.debug)(
            "combiner %s: dropped stale plan %s of session %s: (fence, round, attempt) %s is "
            "not newer than %s, already accepted",
            self.config.name,
            plan["task_id"],
            plan["session"],
            key,
            newest,
        )

    def _deadline(self, task_id: str) -> None:
        with self._lock:
            if self._round and self._round.task_id == task_id:
                self._flush("deadline")

    # updates ---------------------------------------------------------------------------
    def _on_update_chunk(self, topic: str, payload: bytes) -> None:
        try:
            _region, device, _ = self.topics.parse_device_topic(topic)
        except ValueError as exc:
            log.warning("combiner %s: %s", self.config.name, exc)
            return
        with self._lock:
            evictions = self.reassembler.evictions
            try:
                chunk = parse_chunk(payload, self.reassembler.max_chunk_size)
                if self._is_replay(device, chunk.digest):
                    return
                done = self.reassembler.feed_chunk(device, chunk)
            except TransferRefused as exc:
                self.stats["refused_transfers"] += 1
                self._reject(
                    device, f"transfer refused: {exc}", "transfer_refused", final_for=exc.meta
                )
                return
            except DigestMismatch as exc:  # a complete answer that is junk: final, like one
                self._reject(  # that does not decode (no resend is coming: none is asked)
                    device, f"update refused: {exc}", "digest_mismatch", final_for=exc.meta
                )
                return
            except ReceiverFull as exc:  # the combiner's fault, not the device's: not final
                self.stats["refused_transfers"] += 1
                self._reject(device, f"combiner full: {exc}", "combiner_full")
                return
            except ChunkError as exc:  # maybe line noise: a clean resend may still succeed
                self._reject(device, f"bad chunk: {exc}", "bad_chunk")
                return
            finally:
                self._count_evictions(device, self.reassembler.evictions - evictions)
            if done is not None:
                body, done.payload = done.payload, b""
                rnd, accepted = self._round, self.stats["accepted"]
                with hooks.update_scope(rnd and rnd.span, device, chunk.transfer) as sp:
                    self._accept(device, body, done.meta, chunk.digest)
                    sp.set_attribute(
                        "edgefl.outcome",
                        "accepted" if self.stats["accepted"] > accepted else "rejected",
                    )
                del body
                if done.release is not None:
                    done.release()  # nothing reads the update now: its spill file is reused

    def _is_replay(self, device: str, digest: bytes) -> bool:
        """A chunk of an update already accepted for another round: refuse it, count it once.

        Updates name their ``task_id`` (so their bytes differ per round and attempt); the same
        bytes again for another round can only be a copy. Chunks of it are never reassembled.
        """
        accepted_for = self._accepted_digests.get(digest)
        rnd = self._round
        if accepted_for is None or (rnd is not None and accepted_for == rnd.task_id):
            return False  # unknown bytes, or a redelivery within the round it was taken in
        if self._window.knows(accepted_for):
            return False  # async: a redelivery, refused as a duplicate of its own round
        key = (rnd.task_id if rnd else "", device, digest)
        if key not in self._replays_seen:  # the transfer's first chunk here: count it
            self._replays_seen[key] = None
            while len(self._replays_seen) > ACCEPTED_DIGESTS:
                self._replays_seen.pop(next(iter(self._replays_seen)))
            self._provenance(
                device,
                f"replayed update: these bytes were accepted for {accepted_for}",
                "replayed",
            )
        return True

    def _count_evictions(self, device: str, n: int) -> None:
        """A device that started more transfers than its share lost its oldest: say so."""
        if n <= 0:
            return
        self.stats["evicted"] += n
        self._warnings.warn(
            device,
            "evicted",
            "evicted transfers",
            f"combiner {self.config.name}: evicted an incomplete transfer from {device}: it "
            f"started more than {self.reassembler.max_transfers_per_source} at once",
            "a new transfer evicted the oldest",
        )

    def _accept(
        self, device: str, payload: bytes | memoryview, meta: dict[str, Any], digest: bytes
    ) -> None:
        rnd = self._round
        try:
            msg = decode(payload, ("update", "decline"))
        except MessageError as exc:  # a complete, intact transfer of junk: the device's answer
            self._reject(device, f"bad update message: {exc}", "bad_update", final_for=meta)
            return
        if msg["type"] == "decline":  # the device cannot take part: do not wait for it
            current = rnd is not None and msg["task_id"] == rnd.task_id
            reason = msg["reason"][:512]
            if current and rnd is not None and device in rnd.devices:
                rnd.declines[reason] += 1
            elif (  # async: an older round's task, recorded so the controller frees the device
                rnd is not None
                and "async" in rnd.plan
                and not rnd.flushed
                and self._window.answered(msg["task_id"], device)
            ):
                rnd.rejected.append(Rejection(device=device, reason=f"device declined: {reason}"))
            self._reject(
                device,
                f"device declined: {reason}",
                "declined",
                quiet=not current,
                final_for={"task_id": msg["task_id"]},
                log_each=False,  # expected in a large fleet: summarised when the round closes
            )
            return
        if msg["device"] != device:  # a replay or a forgery on this device's topic
            named = msg["device"][:64]
            self._provenance(
                device, f"update names device {named!r}, not the sender", "wrong_sender"
            )
            return
        if meta.get("task_id") != msg["task_id"]:  # re-wrapped: the transfer is not this task's
            self._provenance(
                device,
                f"update for {msg['task_id'][:64]} sent in a transfer for "
                f"{str(meta.get('task_id'))[:64]}",
                "unbound",
            )
            return
        base: fedbuff.Base | None = None  # async: the round the update was trained on
        if rnd is not None and "async" in rnd.plan and not rnd.flushed:
            found = self._window.resolve(msg["task_id"])
            if isinstance(found, str):
                self._refuse_stale(rnd, device, found)
                return
            base = found
        if rnd is None or (msg["task_id"] != rnd.task_id and base is None):
            self._reject(
                device,
                f"update for {msg['task_id']}, which is not the open round",
                "other_round",
                quiet=True,
            )
            return
        if rnd.flushed:
            self._reject(device, "update arrived after the round closed", "late")
            return
        devices, reported = (
            (rnd.devices, rnd.reported) if base is None else (base.devices, base.reported)
        )
        if device not in devices:
            self._reject(device, "device was not selected for this round", "not_selected")
            return
        if device in reported:
            self._reject(device, "duplicate update for this round", "duplicate", quiet=True)
            return
        n = msg["num_examples"]
        tensors: dict[str, Any] = {}
        version = rnd.plan["model_version"] if base is None else base.model_version
        try:
            if msg["model_version"] != version:
                raise UpdateRejected(
                    f"trained on model {msg['model_version']}, round uses {version}"
                )
            if not 0 < n <= self.config.max_examples:
                raise UpdateRejected(f"num_examples {n} outside 1..{self.config.max_examples}")
            delta = check_update(msg, rnd.spec, rnd.plan)  # None: plain weights
            if delta is not None and rnd.held is not None:
                raise UpdateRejected("a robust round takes the trained weights, not a delta")
            if delta is None:
                tensors = decode_tensors(msg["tensors"])
                _validate_streaming(tensors, rnd.spec)
                if rnd.held is not None:
                    rnd.held.check_room(tensors)
        except HeldFull as exc:
            rnd.reported.add(device)
            self._reject(device, str(exc), "held_full")
            self._maybe_complete()
            return
        except (UpdateRejected, CodecError) as exc:
            rnd.reported.add(device)
            self._reject(device, str(exc), "invalid_update")
            self._maybe_complete()
            return
        rnd.update_bytes += len(payload)
        rnd.tensor_bytes += tensor_bytes(tensors if delta is None else delta)
        if delta is not None:
            fold_delta(rnd.acc, delta, float(n), rnd.plan, 1.0 if base is None else base.scale)
        elif rnd.held is not None:
            rnd.held.add(tensors)
        else:
            _fold_streaming(rnd.acc, tensors, float(n))
        metrics = clean_metrics(msg["metrics"])
        if base is not None:  # the audit trail: which version it was trained on, how old
            metrics.update(staleness=float(base.tau), base_round=float(base.round))
        del tensors, delta, msg, payload
        self._accepted_digests[digest] = rnd.task_id if base is None else base.task_id
        while len(self._accepted_digests) > ACCEPTED_DIGESTS:
            self._accepted_digests.pop(next(iter(self._accepted_digests)))
        rnd.reported.add(device)
        reported.add(device)
        # an earlier bad chunk from this device was transient: it is a participant now
        if device in rnd.rejected_devices:
            rnd.rejected_devices.discard(device)
            rnd.rejected = [r for r in rnd.rejected if r["device"] != device]
        rnd.participants.append(
            Participant(
                device=device,
                region=self.config.region,
                n=int(n),
                metrics=metrics,
            )
        )
        self.stats["accepted"] += 1
        self._progress()
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        rnd = self._round
        if rnd and not rnd.flushed and rnd.reported >= rnd.devices and "async" not in rnd.plan:
            self._flush("all devices reported")  # async rounds close at the buffer (K)

    def _reject(
        self,
        device: str,
        reason: str,
        kind: str,
        quiet: bool = False,
        final_for: dict[str, Any] | None = None,
        log_each: bool = True,
    ) -> None:
        """Count and log a refused update; record it against the open round.

        ``kind`` names the rejection for the counters (``stats["rejected_<kind>"]``) and the
        warning limiter: one warning per device and kind per ``warn_interval_s``, then a
        summary. ``final_for`` is the transfer meta of a refusal that no resend can fix: when
        it names the open round, the device counts as reported, so the round need not wait.
        ``log_each=False`` logs at debug only (declines: the round's log line counts them).
        """
        self.stats["rejected"] += 1
        self.stats[f"rejected_{kind}"] += 1
        text = f"combiner {self.config.name}: rejected update from {device}: {reason}"
        if quiet or not log_each:
            log.debug("%s", text)
        else:
            self._warnings.warn(device, kind, "rejections", text, reason)
        rnd = self._round
        if (
            rnd is not None
            and not rnd.flushed
            and not quiet
            and device in rnd.devices
            and device not in rnd.rejected_devices
        ):
            rnd.rejected.append(Rejection(device=device, reason=reason))
            rnd.rejected_devices.add(device)
            self._progress()
        if (
            final_for is not None
            and rnd is not None
            and final_for.get("task_id") == rnd.task_id
            and device in rnd.devices
        ):
            rnd.reported.add(device)
            self._maybe_complete()

    def _provenance(self, device: str, reason: str, kind: str) -> None:
        """Count, log and record an update refused for its origin (replay, forgery).

        Unlike other rejections it is listed in the open round's partial whether or not the
        topic's device was selected or reports a genuine update too: it is evidence of an
        attack or a misconfiguration, not a verdict on the device's answer. One record per
        device and kind per round, at most ``PROVENANCE_RECORDS``; ``stats`` counts them all.
        """
        self.stats["rejected"] += 1
        self.stats[f"rejected_{kind}"] += 1
        text = f"combiner {self.config.name}: rejected update from {device}: {reason}"
        self._warnings.warn(device, kind, "rejections", text, reason)
        rnd = self._round
        if rnd is None or rnd.flushed or (device, kind) in rnd.provenance_seen:
            return
        if len(rnd.provenance) >= PROVENANCE_RECORDS:
            return
        rnd.provenance_seen.add((device, kind))
        rnd.provenance.append(Rejection(device=device, reason=reason))
        self._progress()

    def _progress(self) -> None:
        """Note that the open round's counts changed; the worker reports them once it has
        caught up with its inbox (or every ``PROGRESS_EVERY_S`` during a burst): one message
        per batch of updates, not one per update, which at 1,000 devices a round cost the
        combiner, the broker and the controller a message each per device."""
        self._progress_due = True

    def _send_progress(self) -> None:
        with self._lock:
            self._progress_due = False
            self._progress_at = time.monotonic()
            rnd = self._round
            if rnd is None or rnd.carry:  # a carry's counts go out with the plan adopting it
                return
            msg = encode(
                "progress",
                task_id=rnd.task_id,
                region=self.config.region,
                accepted=len(rnd.participants),
                rejected=len(rnd.rejected) + len(rnd.provenance),
                **({"combiner": self.config.name} if self.config.pool else {}),
            )
        self.conn.publish(self.topics.combiner(self.config.region, "progress"), msg, qos=1)

    def _flush(self, why: str) -> None:
        rnd = self._round
        if rnd is None or rnd.flushed:
            return
        rnd.flushed = True
        if rnd.timer:
            rnd.timer.cancel()
        self._closed_ids = ([*self._closed_ids, rnd.task_id])[-16:]
        sums, count, weight = rnd.acc.sums, rnd.acc.count, rnd.acc.weight
        extra: dict[str, Any] = {}
        if rnd.held is not None:
            sums, count, weight = self._held_estimate(rnd)
            extra["aggregate"] = rnd.held.rule.name
        # streamed: chunks are cut from the float64 sums themselves, a window at a time, as
        # the broker acknowledges them; the sums are freed when the last one is
        payload = encode_payload(
            "partial",
            "sums",
            sums,
            **extra,
            task_id=rnd.task_id,
            region=self.config.region,
            combiner=self.config.name,
            count=count,
            weight=weight,
            devices=rnd.participants,
            rejected=rnd.rejected + rnd.provenance,
            update_bytes=rnd.update_bytes,
            tensor_bytes=rnd.tensor_bytes,
            **({"sums_of": "delta"} if "compression" in rnd.plan else {}),
            **({"async": rnd.plan["async"]} if "async" in rnd.plan else {}),
        )
        topic = self.topics.combiner(self.config.region, "partial")
        writer = ChunkWriter(payload, self.config.partial_chunk_size, meta={"task_id": rnd.task_id})
        self.conn.publish_stream(
            range(writer.count),
            lambda i: (topic, writer.message(i)),
            window=stream_window(self.config.partial_chunk_size, self.conn.max_inflight),
        )
        self.stats["partials"] += 1
        if "async" not in rnd.plan:  # async: an upload still running counts next round
            self.reassembler.discard(_for_task(rnd.task_id))
        declined = ""
        if rnd.declines:
            top = ", ".join(f"{n} {r!r}" for r, n in rnd.declines.most_common(3))
            declined = f", {sum(rnd.declines.values())} of them declined: {top}"
        log.info(
            "combiner %s: round %s partial sent (%d updates, %d rejected%s; %s)",
            self.config.name,
            rnd.task_id,
            count,
            len(rnd.rejected) + len(rnd.provenance),
            declined,
            why,
        )
        hooks.end_region_span(rnd.span, rnd.acc.count, len(rnd.rejected) + len(rnd.provenance), why)
        # free the model-sized sums now; the round record stays for late-update diagnostics
        rnd.acc = WeightedSum({})
        if rnd.held is not None:
            rnd.held.clear()
        if "async" in rnd.plan and why != "plan refused":
            self._carry(rnd)

    def _held_estimate(self, rnd: _Round) -> tuple[dict[str, np.ndarray], int, float]:
        """The robust rule over the round's held updates: (estimate, count, weight = count).

        A rule that cannot run (Krum with too few updates) rejects every held update with
        the reason, so the controller's round record says why, and nothing else is sent.
        """
        assert rnd.held is not None
        n = len(rnd.held.updates)
        if n == 0:
            return rnd.acc.sums, 0, 0.0
        try:
            return rnd.held.estimate(), n, float(n)
        except ValueError as exc:
            why = f"{rnd.held.rule.name} could not run in region {self.config.region}: {exc}"
            log.error("combiner %s: round %s: %s", self.config.name, rnd.task_id, why)
            rnd.rejected += [Rejection(device=p["device"], reason=why) for p in rnd.participants]
            rnd.participants = []
            return rnd.acc.sums, 0, 0.0


def _validate_streaming(tensors: dict[str, Any], spec: Spec) -> None:
    """``validate_update`` one tensor at a time, letting each one's mapped pages go once
    checked: a large update read from its spill file never sits whole in this process."""
    missing = sorted(set(spec) - set(tensors))
    extra = sorted(set(tensors) - set(spec))
    if missing or extra:
        raise UpdateRejected(
            f"tensor names differ from the model: missing {missing}, unexpected {extra}"
        )
    for name, arr in tensors.items():
        validate_update({name: arr}, {name: spec[name]})
        release_array(arr)


_SCRATCH = 1 << 15


def _fold_streaming(acc: WeightedSum, tensors: dict[str, Any], weight: float) -> None:
    """``acc.fold`` one tensor at a time (the same float64 arithmetic, into the same running
    sums), letting each tensor's mapped pages go as soon as it is folded."""
    scratch = np.empty(_SCRATCH, dtype=np.float64)
    for name, total in acc.sums.items():
        arr = tensors[name]
        axpy_inplace(total, np.asarray(arr), weight, scratch)
        release_array(arr)
    acc.weight += weight
    acc.count += 1


def _assigned_devices(plan: dict[str, Any], member: str) -> set[str] | None:
    """The devices this combiner serves in ``plan``: all of them, or in a pool round the
    member's share (None: no share). ValueError for an assignment that names devices not
    in the plan or is not a map of lists of names."""
    devices = {str(d) for d in plan["devices"]}
    assign = plan.get("assign")
    if assign is None:
        return devices
    share = assign.get(member)
    if share is None:
        return None
    if not isinstance(share, list) or not all(isinstance(d, str) for d in share):
        raise ValueError(f"assignment for {member} is not a list of device names")
    mine = set(share)
    if not mine <= devices:
        raise ValueError(f"assignment names devices not in the plan: {sorted(mine - devices)[:5]}")
    return mine


def _for_task(task_id: str) -> Callable[[dict[str, Any]], bool]:
    """A reassembler filter matching the transfers of one round."""
    return lambda meta: meta.get("task_id") == task_id


def _plan_key(plan: dict[str, Any]) -> tuple[int, int, int]:
    """How new a plan is within its session: ``(fence, round, attempt)``.

    The fence (the controller's lease token, 0 when absent) comes first, so a stale
    controller's plan loses even for a later round; the attempt is the last part of
    ``task_id`` (``"{session}:{round}:{attempt}"``), 0 if it is not a number.
    """
    attempt = plan["task_id"].rsplit(":", 1)[-1]
    return (
        int(plan.get("fence", 0)),
        int(plan["round"]),
        int(attempt) if attempt.isdigit() else 0,
    )


@dataclass
class _Burst:
    started: float
    noun: str
    last: str
    more: int = 0


class _WarningLimiter:
    """At most one warning per (device, kind) per ``interval_s``; the rest become a summary.

    A device that sends 20,000 bad chunks costs two log lines per interval, not 20,000. The
    summary of an interval is logged by the next warning of that kind or by ``flush`` (the
    combiner's periodic sweep), whichever comes first. State is bounded: at most ``max_keys``
    open intervals (the oldest is summarised early to make room).
    """

    def __init__(
        self,
        who: str,
        interval_s: float,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.who = who
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._clock = clock
        self._open: dict[tuple[str, str], _Burst] = {}

    def warn(self, device: str, kind: str, noun: str, text: str, reason: str) -> None:
        """Log ``text`` unless this device had a warning of this kind within the interval.

        ``noun`` and ``reason`` describe the event in the summary ("12 more rejections from
        device d in the last 10 s (bad_chunk; the last: ...)").
        """
        now = self._clock()
        key = (device, kind)
        burst = self._open.get(key)
        if burst is not None and now - burst.started < self.interval_s:
            burst.more += 1
            burst.last = reason
            return
        if burst is not None:
            self._summarise(key, self._open.pop(key), now)
        log.warning("%s", text)
        self._open[key] = _Burst(now, noun, reason)
        while len(self._open) > self.max_keys:
            oldest = next(iter(self._open))
            self._summarise(oldest, self._open.pop(oldest), now)

    def flush(self) -> None:
        """Summarise and forget every interval that has ended."""
        now = self._clock()
        for key in [k for k, b in self._open.items() if now - b.started >= self.interval_s]:
            self._summarise(key, self._open.pop(key), now)

    def _summarise(self, key: tuple[str, str], burst: _Burst, now: float) -> None:
        if burst.more:
            log.warning(
                "combiner %s: %d more %s from device %s in the last %.0f s (%s; the last: %s)",
                self.who,
                burst.more,
                burst.noun,
                key[0],
                now - burst.started,
                key[1],
                burst.last,
            )
