"""The controller's side of asynchronous (FedBuff) sessions: who is idle, and the audit trail.

In an async session every round makes one model version from the first ``K`` updates the
combiners accept, whichever version each was trained on (``edgefl.aggregation.fedbuff``).
``RoundRunner`` calls the hooks here:

- ``select``: tasks go to IDLE online devices only. A device is busy from the round that
  dispatched its task until its update (or its rejection or decline) shows up in a partial,
  or until the task is ``max_staleness`` rounds old: an answer to it would be refused anyway.
- ``busy_regions``: regions with busy devices still get the round's plan (maybe with no new
  device), so their combiner folds the stale updates that arrive into this round.
- ``refuse_partial``: a partial that does not echo the plan's ``async`` field comes from a
  combiner that does not know FedBuff; it would have folded as a synchronous round, so it
  is refused whole, with the reason.
- ``seen`` / ``metrics`` / ``meta``: every participant carries ``staleness`` and
  ``base_round`` (set by the combiner); the round record's metrics summarise them and the
  model version's ``meta["async"]`` lists each update with the version it was trained on.

State lives in memory for one session; a restarted controller rebuilds it from the
session's round records (``restore``): who was selected in each attempt, and who answered.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from edgefl.aggregation.fedbuff import AsyncSettings

if TYPE_CHECKING:
    from edgefl.controller.config import SessionConfig
    from edgefl.controller.inbox import Partial
    from edgefl.controller.presence import Presence
    from edgefl.controller.records import RoundAttempt
    from edgefl.protocol.types import Participant, Rejection
    from edgefl.store.base import RoundRecord

__all__ = ["AsyncTracker", "async_options", "check_async"]


def async_options(buffer: int | None, max_staleness: int, exponent: float) -> dict[str, Any]:
    """SessionConfig fields for the CLI's ``--async-buffer`` (none without it: sync)."""
    if buffer is None:
        return {}
    settings = {"buffer": buffer, "max_staleness": max_staleness, "staleness_exponent": exponent}
    return {"mode": "async", "asynchronous": settings}


def check_async(config: SessionConfig, robust: bool) -> AsyncSettings:
    """The session's FedBuff settings (defaults if none); ValueError for a combination that
    would silently compute something else, with what to change."""
    settings = config.asynchronous or AsyncSettings()
    if robust:
        raise ValueError(
            f"aggregator {config.aggregator!r} holds whole updates of one version: async "
            "sessions fold deltas of several versions; use fedavg, fedavgm or a FedOpt rule"
        )
    if config.dp is not None:
        raise ValueError(
            "dp is not available in async sessions: its accountant assumes one release per "
            "synchronous round of sampled devices"
        )
    if config.buffer_size is not None:
        raise ValueError("async sessions close a round at asynchronous.buffer; unset buffer_size")
    if config.max_devices is not None:
        raise ValueError(
            "async sessions cap devices training at once with "
            "asynchronous.concurrency; unset max_devices"
        )
    if settings.buffer < config.min_devices:
        raise ValueError(
            f"asynchronous.buffer ({settings.buffer}) must be at least min_devices "
            f"({config.min_devices}): a version never has fewer updates than the quorum"
        )
    if settings.concurrency is not None and settings.concurrency < settings.buffer:
        raise ValueError(
            f"asynchronous.concurrency ({settings.concurrency}) must be at least the buffer "
            f"({settings.buffer}): fewer devices in training can never fill it"
        )
    return settings


class AsyncTracker:
    """Busy devices and base versions of one async session; used by the session loop only
    (not thread-safe)."""

    def __init__(self, session_id: str, settings: AsyncSettings) -> None:
        self.session_id = session_id
        self.settings = settings
        self.busy: dict[str, int] = {}  # device -> the round of its outstanding task
        self.regions: dict[str, str] = {}  # device -> region, as presence last saw it
        self.versions: dict[int, str] = {}  # round -> the model version it trained on
        self.stale_refused = 0  # rejections for staleness seen in partials, in this session

    def refusal(self, online: dict[str, str], presence: Presence) -> str | None:
        """Why this round cannot run (None: it can)."""
        k = self.settings.buffer
        if len(online) < k:
            return (
                f"asynchronous.buffer K={k} exceeds the {len(online)} devices online: no "
                "version could fill"
            )
        pooled = sorted({reg for reg in online.values() if presence.pool_members(reg)})
        if pooled:
            return (
                f"async sessions do not run on combiner pools (regions {pooled}): a stale "
                "update must reach the combiner that holds its round's plan"
            )
        return None

    def select(self, online: dict[str, str], attempt: RoundAttempt) -> list[str]:
        """The idle online devices this round dispatches to (write-offs first)."""
        r, s = attempt.round, self.settings.max_staleness
        self.regions.update(online)
        for dev, since in list(self.busy.items()):
            if since < r - s:  # its answer would be older than S versions: refused anyway
                del self.busy[dev]
        idle = sorted(d for d in online if d not in self.busy)
        room = self.settings.concurrency
        if room is not None:
            room = max(0, room - len(self.busy))
            if len(idle) > room:
                rng = random.Random(f"{attempt.session_id}:{r}:{attempt.attempt}")
                idle = sorted(rng.sample(idle, room))
        return idle

    def dispatched(self, devices: list[str], r: int, model_in: str) -> None:
        """Round ``r`` (trained on ``model_in``) sent tasks to ``devices``: busy now."""
        self.versions[r] = model_in
        for dev in devices:
            self.busy[dev] = r
        for old in [k for k in self.versions if k < r - self.settings.max_staleness]:
            del self.versions[old]

    def restore(self, records: list[RoundRecord]) -> None:
        """Rebuild who is busy from the session's round records (a restarted controller):
        each attempt's selected devices, then who answered in it. Without this, a partial
        crediting a task from before the restart would be refused whole as unplanned."""
        for rec in sorted(records, key=lambda rec: (rec.round, rec.attempt)):
            self.dispatched(rec.devices, rec.round, rec.model_in)
            self.seen(rec.participants, rec.rejected)

    def busy_regions(self) -> set[str]:
        return {self.regions[d] for d in self.busy if d in self.regions}

    def widen(self, slots: dict[Any, list[str]]) -> None:
        """Let each region's partial credit its busy devices too (stale answers)."""
        for (region, member), devs in slots.items():
            if member is None:
                extra = {d for d in self.busy if self.regions.get(d) == region}
                slots[(region, member)] = sorted(set(devs) | extra)

    def refuse_partial(self, partial: Partial, plan: dict[str, Any]) -> list[Rejection]:
        """The partial of a combiner that did not weigh by staleness: refused whole."""
        if partial.asynchronous == plan or partial.count == 0:
            return []
        return [
            {
                "device": "",
                "reason": f"partial of {partial.region} ({partial.combiner}) does not confirm "
                "async aggregation: its combiner does not know FedBuff, refused",
            }
        ]

    def seen(self, participants: list[Participant], rejected: list[Rejection]) -> None:
        """Devices answered: idle again (their task is done, folded or refused)."""
        for p in participants:
            base = int(p["metrics"].get("base_round", -1))
            held = self.busy.get(p["device"])
            if held is not None and held <= base:
                del self.busy[p["device"]]
        for rej in rejected:
            if rej["reason"].startswith("stale"):
                # its task was written off before: a busy entry now is a newer task
                self.stale_refused += 1
                continue
            self.busy.pop(rej["device"], None)

    def metrics(self, participants: list[Participant]) -> dict[str, float]:
        """Round metrics: how stale this version's updates were."""
        taus = [p["metrics"].get("staleness", 0.0) for p in participants]
        if not taus:
            return {}
        return {
            "async_buffer": float(self.settings.buffer),
            "stale_updates": float(sum(1 for t in taus if t > 0)),
            "staleness_mean": float(sum(taus) / len(taus)),
            "staleness_max": float(max(taus)),
            "stale_refused_total": float(self.stale_refused),
        }

    def meta(self, participants: list[Participant]) -> dict[str, Any]:
        """``meta["async"]`` of the version: the settings and each update's base version."""
        return {
            **self.settings.model_dump(),
            "updates": [
                {
                    "device": p["device"],
                    "staleness": int(p["metrics"].get("staleness", 0)),
                    "base_round": int(p["metrics"].get("base_round", -1)),
                    "base_version": self.versions.get(int(p["metrics"].get("base_round", -1))),
                }
                for p in participants
            ],
        }
