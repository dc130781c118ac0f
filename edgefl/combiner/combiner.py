"""The regional combiner.

It subscribes to its region's topic tree, dispatches round tasks to the region's selected
devices, reassembles chunked updates, validates each one and folds it into a running weighted
sum the moment it is complete. When every assigned device has reported — or the controller
closes the round (deadline or buffer full) — it sends the sufficient statistics upward.

The network thread only queues messages; one worker thread handles them in arrival order
(hashing, decoding and folding release the GIL, so the network keeps reading meanwhile). The
deadline timer queues onto the same worker, and ``stop`` takes the lock, so the round state
is never touched by two threads at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgefl.aggregation import UpdateRejected, WeightedSum, validate_update
from edgefl.protocol import ChunkError, CodecError, MessageError, Topics, decode, encode
from edgefl.protocol.chunking import (
    DEFAULT_CHUNK_SIZE,
    Reassembler,
    TransferRefused,
    split_payload,
)
from edgefl.protocol.messages import OPTIONAL, SCHEMAS, clean_metrics
from edgefl.protocol.tensors import decode_tensors, encode_tensors
from edgefl.protocol.types import Participant, Rejection, Spec, spec_from_wire
from edgefl.transport import MqttConnection

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]

INBOX_MESSAGES = 16  # at most 16 chunks (4 MiB at the default chunk size) wait for the worker


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
    flushed: bool = False
    timer: threading.Timer | None = None


class Combiner:
    """Aggregates one region's updates as they stream in and sends sums to the controller.

    Owns its MQTT connection and its worker thread; ``stop`` announces it offline, closes the
    connection and joins the worker. Memory is O(model size) whatever the number of devices:
    the inbox is bounded and each update is folded as soon as it is complete. Every refused
    update is logged with a reason and reported to the controller in the partial.
    """

    def __init__(self, config: CombinerConfig) -> None:
        self.config = config
        self.topics = Topics(config.project)
        self._lock = threading.RLock()
        # Everything the combiner does runs on one worker, fed in arrival order: the network
        # thread keeps reading while the worker hashes, decodes and folds (those release the
        # GIL), and a close can never overtake chunks that arrived before it.
        # The inbox is bounded: when the worker falls behind, the network thread blocks, TCP
        # pushes back on the broker, and memory stays O(model size) however many devices send.
        self._inbox: queue.Queue[tuple | None] = queue.Queue(maxsize=INBOX_MESSAGES)
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._round: _Round | None = None
        self._closed_ids: list[str] = []
        self.reassembler = Reassembler(
            max_payload=config.max_update_bytes,
            memory_budget=config.memory_budget_bytes,
            ttl_s=config.transfer_ttl_s,
        )
        self.stats = {"accepted": 0, "rejected": 0, "partials": 0}
        status = self.topics.combiner(config.region, "status")
        self.conn = MqttConnection(
            config.broker_url,
            client_id=f"edgefl-{config.project}-{config.name}",
            username=config.username,
            password=config.password,
            clean_session=False,
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
        self.conn.subscribe(
            t.device_wildcard(c.region, "update"), self._enqueue(self._on_update_chunk)
        )
        self.conn.start(timeout)
        log.info("combiner %s serving region %s on %s", c.name, c.region, self.conn.address.url)
        return self

    def stop(self) -> None:
        self._stopping.set()  # unblocks a network thread waiting on a full inbox
        with self._lock:
            if self._round and self._round.timer:
                self._round.timer.cancel()
        status = self.topics.combiner(self.config.region, "status")
        offline = encode("status", state="offline", ts=time.time(), combiner=self.config.name)
        self.conn.stop(publish_first=(status, offline, 1, True))
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
        return lambda topic, payload: self._put((handler, topic, payload))

    def _work(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            if self._stopping.is_set():
                continue  # drain quickly to the sentinel
            handler, *args = item
            try:
                handler(*args)
            except Exception:  # one bad message must not stop the combiner
                log.exception("combiner %s: handling %s failed", self.config.name, args[:1])

    def _announce(self) -> None:
        status = self.topics.combiner(self.config.region, "status")
        online = encode("status", state="online", ts=time.time(), combiner=self.config.name)
        self.conn.publish(status, online, qos=1, retain=True)

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
                return  # a redelivered plan (QoS 1 is at-least-once)
            if self._round and not self._round.flushed:
                log.warning(
                    "combiner %s: round %s superseded by %s",
                    self.config.name,
                    self._round.task_id,
                    plan["task_id"],
                )
                if self._round.timer:
                    self._round.timer.cancel()
            old = self._round.task_id if self._round else None
            if old:
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
            devices = {str(d) for d in plan["devices"]}
            rnd = _Round(plan["task_id"], plan, devices, spec, WeightedSum(spec))
            delay = max(0.0, float(plan["deadline"]) - time.time())
            rnd.timer = threading.Timer(
                delay, lambda tid=plan["task_id"]: self._put((self._deadline, tid))
            )
            rnd.timer.daemon = True
            self._round = rnd
            rnd.timer.start()
        fields = {k: plan[k] for k in TASK_FIELDS}
        fields.update({k: plan[k] for k in TASK_OPTIONAL_FIELDS if k in plan})
        task = encode("task", **fields)
        for dev in sorted(devices):
            self.conn.publish(self.topics.device(self.config.region, dev, "task"), task, qos=1)
        log.debug(
            "combiner %s: round %s dispatched to %d devices",
            self.config.name,
            plan["task_id"],
            len(devices),
        )
        if not devices:
            with self._lock:
                self._flush("no devices assigned")

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
            try:
                done = self.reassembler.feed(device, payload)
            except TransferRefused as exc:
                self._reject(device, f"transfer refused: {exc}", final_for=exc.meta)
                return
            except ChunkError as exc:  # maybe line noise: a clean resend may still succeed
                self._reject(device, f"bad chunk: {exc}")
                return
            if done is not None:
                self._accept(device, done.payload, done.meta)

    def _accept(self, device: str, payload: bytes, meta: dict[str, Any]) -> None:
        rnd = self._round
        try:
            msg = decode(payload, ("update", "decline"))
        except MessageError as exc:  # a complete, intact transfer of junk: the device's answer
            self._reject(device, f"bad update message: {exc}", final_for=meta)
            return
        if msg["type"] == "decline":  # the device cannot take part: do not wait for it
            current = rnd is not None and msg["task_id"] == rnd.task_id
            self._reject(
                device,
                f"device declined: {msg['reason'][:512]}",
                quiet=not current,
                final_for={"task_id": msg["task_id"]},
            )
            return
        if rnd is None or msg["task_id"] != rnd.task_id:
            self._reject(
                device, f"update for {msg['task_id']}, which is not the open round", quiet=True
            )
            return
        if rnd.flushed:
            self._reject(device, "update arrived after the round closed")
            return
        if device not in rnd.devices:
            self._reject(device, "device was not selected for this round")
            return
        if device in rnd.reported:
            self._reject(device, "duplicate update for this round", quiet=True)
            return
        n = msg["num_examples"]
        try:
            if msg["model_version"] != rnd.plan["model_version"]:
                raise UpdateRejected(
                    f"trained on model {msg['model_version']}, round uses "
                    f"{rnd.plan['model_version']}"
                )
            if not 0 < n <= self.config.max_examples:
                raise UpdateRejected(f"num_examples {n} outside 1..{self.config.max_examples}")
            tensors = decode_tensors(msg["tensors"])
            validate_update(tensors, rnd.spec)
        except (UpdateRejected, CodecError) as exc:
            rnd.reported.add(device)
            self._reject(device, str(exc))
            self._maybe_complete()
            return
        rnd.acc.fold(tensors, float(n))
        rnd.reported.add(device)
        # an earlier bad chunk from this device was transient: it is a participant now
        rnd.rejected = [r for r in rnd.rejected if r["device"] != device]
        rnd.participants.append(
            Participant(
                device=device,
                region=self.config.region,
                n=int(n),
                metrics=clean_metrics(msg["metrics"]),
            )
        )
        self.stats["accepted"] += 1
        self._progress()
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        rnd = self._round
        if rnd and not rnd.flushed and rnd.reported >= rnd.devices:
            self._flush("all devices reported")

    def _reject(
        self,
        device: str,
        reason: str,
        quiet: bool = False,
        final_for: dict[str, Any] | None = None,
    ) -> None:
        """Count and log a refused update; record it against the open round.

        ``final_for`` is the transfer meta of a refusal that no resend can fix: when it names
        the open round, the device counts as reported, so the round need not wait for it.
        """
        self.stats["rejected"] += 1
        (log.debug if quiet else log.warning)(
            "combiner %s: rejected update from %s: %s", self.config.name, device, reason
        )
        rnd = self._round
        if (
            rnd is not None
            and not rnd.flushed
            and not quiet
            and device in rnd.devices
            and all(r["device"] != device for r in rnd.rejected)
        ):
            rnd.rejected.append(Rejection(device=device, reason=reason))
            self._progress()
        if (
            final_for is not None
            and rnd is not None
            and final_for.get("task_id") == rnd.task_id
            and device in rnd.devices
        ):
            rnd.reported.add(device)
            self._maybe_complete()

    def _progress(self) -> None:
        rnd = self._round
        if rnd is None:
            return
        msg = encode(
            "progress",
            task_id=rnd.task_id,
            region=self.config.region,
            accepted=len(rnd.participants),
            rejected=len(rnd.rejected),
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
        payload = encode(
            "partial",
            task_id=rnd.task_id,
            region=self.config.region,
            combiner=self.config.name,
            count=rnd.acc.count,
            weight=rnd.acc.weight,
            devices=rnd.participants,
            rejected=rnd.rejected,
            sums=encode_tensors(rnd.acc.sums),
        )
        topic = self.topics.combiner(self.config.region, "partial")
        for chunk in split_payload(
            payload, self.config.partial_chunk_size, meta={"task_id": rnd.task_id}
        ):
            self.conn.publish(topic, chunk.to_bytes(), qos=1)
        self.stats["partials"] += 1
        self.reassembler.discard(_for_task(rnd.task_id))
        log.info(
            "combiner %s: round %s partial sent (%d updates, %d rejected; %s)",
            self.config.name,
            rnd.task_id,
            rnd.acc.count,
            len(rnd.rejected),
            why,
        )
        # free the model-sized sums now; the round record stays for late-update diagnostics
        rnd.acc = WeightedSum({})


def _for_task(task_id: str) -> Callable[[dict[str, Any]], bool]:
    """A reassembler filter matching the transfers of one round."""
    return lambda meta: meta.get("task_id") == task_id
