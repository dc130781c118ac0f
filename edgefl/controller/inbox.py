"""What combiners send the controller: partial sums and progress, queued for the session loop."""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from typing import Any, Literal

from edgefl.protocol import ChunkError, MessageError, Topics, decode
from edgefl.protocol.chunking import Reassembler
from edgefl.protocol.types import (
    Participant,
    Rejection,
    participants_from_wire,
    rejections_from_wire,
)

log = logging.getLogger(__name__)

MAX_POOL_MEMBERS = 16  # partials one region's combiners may send at once


@dataclass(frozen=True)
class Partial:
    """A region's sufficient statistics for one round, checked field by field."""

    task_id: str
    region: str
    combiner: str
    count: int
    weight: float
    participants: list[Participant]
    rejected: list[Rejection]
    sums: dict[str, Any]  # still wire-encoded tensors: decoded on the session loop
    release: Any = None  # call once merged: the partial's spill file is reused
    delta: bool = False  # sums of w * delta (compressed updates): the merge adds W * global
    update_bytes: int = 0  # payload bytes of the region's folded updates
    tensor_bytes: int = 0  # ... of which tensor data
    aggregate: str | None = None  # a robust rule's name: ``sums`` is its regional estimate
    asynchronous: dict[str, Any] | None = None  # the plan's ``async`` echoed: FedBuff folds


@dataclass(frozen=True)
class Progress:
    """A combiner's running count of accepted and rejected updates (for ``buffer_size``)."""

    task_id: str
    region: str
    accepted: int
    rejected: int
    combiner: str | None = None  # the pool member reporting; None for a region's only one


Event = Partial | Progress


class CombinerInbox:
    """Receives combiner messages on the network thread and hands them to the session loop.

    Malformed messages are logged, counted in ``refused`` and dropped: a broken or hostile
    combiner can cost its region's partial, never the controller.
    """

    def __init__(self, topics: Topics, ttl_s: float = 600) -> None:
        self.topics = topics
        self._events: queue.Queue[Event] = queue.Queue()
        # partials are float64 sums (2x the model): reassembled in temporary files and
        # decoded as views of them, merged one tensor at a time (RoundRunner). The members of
        # a region's combiner pool all send on the region's topic: room for each one's
        self._partials = Reassembler(
            ttl_s=ttl_s,
            zero_copy=True,
            spill_above=16 * 1024 * 1024,
            max_transfers_per_source=MAX_POOL_MEMBERS,
            max_bytes_per_source=MAX_POOL_MEMBERS * 256 * 1024 * 1024,
        )
        self.refused: dict[Literal["partial", "progress"], int] = {"partial": 0, "progress": 0}

    def on_partial_chunk(self, topic: str, payload: bytes) -> None:
        try:
            region, _ = self.topics.parse_combiner_topic(topic)
            done = self._partials.feed(region, payload)
            if done is None:
                return
            msg = decode(done.payload, "partial")
            event = Partial(
                task_id=msg["task_id"],
                region=region,
                combiner=msg["combiner"],
                count=msg["count"],
                weight=float(msg["weight"]),
                participants=participants_from_wire(msg["devices"]),
                rejected=rejections_from_wire(msg["rejected"]),
                sums=msg["sums"],
                release=done.release,
                delta=msg.get("sums_of") == "delta",
                update_bytes=int(msg.get("update_bytes", 0)),
                tensor_bytes=int(msg.get("tensor_bytes", 0)),
                aggregate=msg.get("aggregate"),
                asynchronous=msg.get("async"),
            )
        except (ChunkError, MessageError, ValueError) as exc:
            self.refused["partial"] += 1
            log.error("controller: rejected partial on %s: %s", topic, exc)
            return
        self._events.put(event)

    def on_progress(self, topic: str, payload: bytes) -> None:
        try:
            region, _ = self.topics.parse_combiner_topic(topic)
            msg = decode(payload, "progress")
        except (MessageError, ValueError) as exc:
            self.refused["progress"] += 1
            log.warning("controller: bad progress on %s: %s", topic, exc)
            return
        self._events.put(
            Progress(msg["task_id"], region, msg["accepted"], msg["rejected"], msg.get("combiner"))
        )

    def get(self, timeout: float) -> Event | None:
        """The next event, or None when ``timeout`` seconds pass without one."""
        try:
            return self._events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def drain(self) -> None:
        """Forget events left over from an earlier round."""
        while True:
            try:
                self._events.get_nowait()
            except queue.Empty:
                return
