"""What the controller sees of the fleet, written to the store for the REST API: throttled.

Presence, combiner progress, the tasks devices were given and their last telemetry arrive on
the MQTT network thread, up to thousands a second. Writing each would make the store the
bottleneck (and SQLite has one writer), so ``FleetRecorder`` only merges them into pending
changes, per device and per combiner, and a background thread writes the dirty ones in one
transaction every ``flush_s`` (``Store.record_fleet``). Counts are written as increments, so
controllers sharing a store add up rather than overwrite each other.

Which devices a round tasked and how each answered is read from the round's own record
(selected devices, participants, rejections with their reasons) on the flush thread, when
the session loop says a round started or ended: the round runner itself is not touched.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from edgefl.protocol import MessageError, Topics, decode
from edgefl.store.base import CombinerChange, DeviceChange, Store
from edgefl.telemetry import Point

log = logging.getLogger(__name__)

MAX_ATTRIBUTES = 16  # status fields kept as a device's attributes
MAX_ATTRIBUTE_TEXT = 128
# status fields that are not attributes: the message's own, and what the topic says
STATUS_FIELDS = frozenset({"v", "type", "state", "ts", "device", "region", "combiner"})
DECLINED = "device declined"  # how a combiner words a decline (edgefl.combiner)

C = TypeVar("C", DeviceChange, CombinerChange)
COUNTS = frozenset({"accepted", "declined", "rejected"})


def _merge(old: C | None, new: C) -> C:
    """``new`` on top of ``old``: set fields replace, counts add up."""
    if old is None:
        return new
    for f in dataclasses.fields(new):
        value = getattr(new, f.name)
        if f.name in COUNTS:
            setattr(old, f.name, getattr(old, f.name) + value)
        elif value is not None:
            setattr(old, f.name, value)
    return old


def attributes(msg: dict[str, Any]) -> dict[str, Any]:
    """A status message's extra fields (agent version, board...), scalars only, bounded."""
    out: dict[str, Any] = {}
    for key, value in msg.items():
        if key in STATUS_FIELDS or not isinstance(key, str) or len(key) > 64:
            continue
        if isinstance(value, str):
            value = value[:MAX_ATTRIBUTE_TEXT]
        elif not isinstance(value, (bool, int, float)):
            continue
        out[key] = value
        if len(out) >= MAX_ATTRIBUTES:
            break
    return out


def round_of(task_id: str) -> int | None:
    """The round number in a task id (``<session>:<round>:<attempt>``), or None."""
    parts = task_id.rsplit(":", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


class FleetRecorder:
    """Collects fleet changes from the network thread and flushes them every ``flush_s``."""

    def __init__(
        self,
        store: Store,
        topics: Topics,
        *,
        flush_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.topics = topics
        self.project = topics.project
        self.flush_s = flush_s
        self._clock = clock
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceChange] = {}
        # keyed by (region, combiner name): a region's pool has several; "" is the progress
        # of a region's only combiner, which does not name itself (the store finds its row)
        self._combiners: dict[tuple[str, str], CombinerChange] = {}
        self._progress: dict[tuple[str, str], tuple[str, int, int]] = {}  # -> (task, acc, rej)
        self._rounds: dict[str, bool] = {}  # task id -> ended (read from the store at flush)
        self._tasked: set[str] = set()  # task ids whose devices were marked as given it
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.flushes = 0  # transactions written (for tests and metrics)
        self.failures = 0

    # hooks (network thread) -------------------------------------------------------------
    def on_presence(self, kind: str, region: str, name: str, msg: dict[str, Any]) -> None:
        """A status that ``Presence`` accepted: a device's or a combiner's state."""
        now = self._clock()
        state = str(msg.get("state"))
        seen = now if state == "online" else None
        with self._lock:
            if kind == "device":
                change = DeviceChange(
                    self.project, name, region, state, seen, attributes(msg) or None
                )
                self._devices[name] = _merge(self._devices.get(name), change)
            else:
                named = msg.get("combiner")
                comb_name = named[:128] if isinstance(named, str) and named else name
                comb_name = comb_name or f"combiner-{region}"
                comb = CombinerChange(self.project, region, comb_name, state, seen)
                key = (region, comb_name)
                self._combiners[key] = _merge(self._combiners.get(key), comb)

    def on_progress(self, topic: str, payload: bytes) -> None:
        """A combiner's running counts for a round: the increments since its last report."""
        try:
            region, _ = self.topics.parse_combiner_topic(topic)
            msg = decode(payload, "progress")
        except (MessageError, ValueError):
            return  # the inbox counts and logs it
        task, acc, rej = msg["task_id"], max(0, msg["accepted"]), max(0, msg["rejected"])
        with self._lock:
            member = msg.get("combiner")  # a pool member names itself
            name = member[:128] if member else None
            key = (region, name or "")
            last = self._progress.get(key)
            base = (last[1], last[2]) if last is not None and last[0] == task else (0, 0)
            self._progress[key] = (task, max(acc, base[0]), max(rej, base[1]))
            change = CombinerChange(
                self.project,
                region,
                name,
                last_seen=self._clock(),
                current_task=task,
                current_round=round_of(task),
                accepted=max(0, acc - base[0]),
                rejected=max(0, rej - base[1]),
            )
            self._combiners[key] = _merge(self._combiners.get(key), change)

    def on_telemetry(self, point: Point) -> None:
        """An accepted telemetry point: the device's last metrics."""
        device = point.tags.get("device")
        if not device:
            return
        change = DeviceChange(
            self.project,
            device,
            last_seen=self._clock(),
            telemetry=dict(point.fields),
            telemetry_at=point.ts if point.ts is not None else self._clock(),
        )
        with self._lock:
            self._devices[device] = _merge(self._devices.get(device), change)

    # hooks (session loop) ---------------------------------------------------------------
    def round_started(self, task_id: str) -> None:
        """A round attempt is about to run: its devices get their task at the next flush."""
        with self._lock:
            self._rounds.setdefault(task_id, False)

    def round_ended(self, task_id: str) -> None:
        """A round attempt ended: count its answers per device, clear its tasks."""
        with self._lock:
            self._rounds[task_id] = True

    # flushing ---------------------------------------------------------------------------
    def start(self) -> FleetRecorder:
        self._thread = threading.Thread(target=self._loop, name="fleet-recorder", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread and write what is pending (a last flush)."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()

    def _loop(self) -> None:
        while not self._done.wait(self.flush_s):
            self.flush()

    def flush(self) -> None:
        """Write the pending changes in one transaction; kept for the next flush on error."""
        with self._lock:
            rounds = dict(self._rounds)
        try:
            self._read_rounds(rounds)
        except Exception:
            log.warning("fleet state: reading rounds failed; retrying", exc_info=True)
        with self._lock:
            devices, self._devices = self._devices, {}
            combiners, self._combiners = self._combiners, {}
        if not devices and not combiners:
            return
        try:
            self.store.record_fleet(list(devices.values()), list(combiners.values()))
            self.flushes += 1
        except Exception:
            self.failures += 1
            log.warning("fleet state: writing %d devices failed; retrying", len(devices))
            with self._lock:  # put them back under what arrived meanwhile
                for name, dev in devices.items():
                    newer = self._devices.get(name)
                    self._devices[name] = dev if newer is None else _merge(dev, newer)
                for key, comb in combiners.items():
                    later = self._combiners.get(key)
                    self._combiners[key] = comb if later is None else _merge(comb, later)

    def _read_rounds(self, rounds: dict[str, bool]) -> None:
        """Tasks and answers from the round records (selected, participants, rejections)."""
        for task_id, ended in rounds.items():
            rec = self.store.get_round(task_id)
            if rec is None:
                if ended:  # failed before it was recorded: nothing to count
                    with self._lock:
                        self._rounds.pop(task_id, None)
                continue
            changes: list[DeviceChange] = []
            finished = rec.status != "running"
            if task_id not in self._tasked and not finished:
                self._tasked.add(task_id)
                changes += [
                    DeviceChange(self.project, d, current_task=task_id) for d in rec.devices
                ]
            if finished:
                changes += [DeviceChange(self.project, d, current_task="") for d in rec.devices]
                for p in rec.participants:
                    changes.append(DeviceChange(self.project, p["device"], accepted=1))
                for j in rec.rejected:
                    if not j["device"]:
                        continue
                    declined = j["reason"].startswith(DECLINED)
                    changes.append(
                        DeviceChange(
                            self.project,
                            j["device"],
                            declined=int(declined),
                            rejected=int(not declined),
                        )
                    )
            with self._lock:
                for change in changes:
                    self._devices[change.device] = _merge(self._devices.get(change.device), change)
                if finished:
                    self._rounds.pop(task_id, None)
                    self._tasked.discard(task_id)
