"""The combiner's side of asynchronous (FedBuff) rounds: a bounded window of recent plans.

In an async session (the plan carries ``async: {"max_staleness": S, "exponent": a}``) the
open round accepts an update for any round of the session's last ``S + 1``: one trained on
the plan of round ``b`` while round ``r`` is open has staleness ``tau = r - b`` and is folded
as ``s(tau) * n * delta`` (``edgefl.aggregation.fedbuff``). Anything older is refused with
the reason ``stale: ...``, recorded in the partial, and never folded.

Between the controller's close of round ``r`` and its plan for ``r + 1`` the combiner keeps
folding into a *carry* round numbered ``r + 1``: the plan adopts it when it comes. If the
next plan is not ``r + 1`` (the controller retried a round, or restarted) the carried
updates are dropped, each with a rejection in the next partial, so nothing is applied with
a staleness it was not weighed for.

Memory: the plans' device lists and per-round reported sets, ``S + 1`` rounds (at most
``MAX_PLANS`` plans); the sums stay one model's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgefl.aggregation.fedbuff import parse_async_plan, staleness_weight

__all__ = ["MAX_PLANS", "Base", "Window", "round_of"]

MAX_PLANS = 256  # plans kept, whatever S and the number of retried attempts


@dataclass
class Base:
    """The round an update was trained on, as the open round sees it."""

    task_id: str
    round: int
    model_version: str
    devices: set[str]
    reported: set[str] = field(default_factory=set)
    tau: int = 0
    scale: float = 1.0


def round_of(task_id: str) -> tuple[str, int] | None:
    """``(session, round)`` from a task id ``"{session}:{round}:{attempt}"``."""
    parts = task_id.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


class Window:
    """The plans of one async session's recent rounds; used on the combiner's worker only."""

    def __init__(self) -> None:
        self.session: str | None = None
        self.open_round = 0  # the round whose sums the combiner is folding into
        self.max_staleness = 0
        self.exponent = 0.0
        self._plans: dict[str, Base] = {}

    def add(self, plan: dict[str, Any], devices: set[str]) -> None:
        """Register an async plan (ValueError if its ``async`` field is malformed)."""
        s, a = parse_async_plan(plan["async"])
        if plan["session"] != self.session:
            self._plans.clear()
        self.session, self.max_staleness, self.exponent = plan["session"], s, a
        self.open_round = int(plan["round"])
        self._plans[plan["task_id"]] = Base(
            plan["task_id"], int(plan["round"]), str(plan["model_version"]), set(devices)
        )
        low = self.open_round - s
        for tid in [t for t, b in self._plans.items() if b.round < low]:
            del self._plans[tid]
        while len(self._plans) > MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))

    def knows(self, task_id: str) -> bool:
        return task_id in self._plans

    def answered(self, task_id: str, device: str) -> bool:
        """Note a device's final answer (a decline) to a task of the window; True if it is
        the first answer of a device that task selected, to be recorded in the open round
        (so the controller knows the device is idle again)."""
        base = self._plans.get(task_id)
        if base is None or device not in base.devices or device in base.reported:
            return False
        base.reported.add(device)
        return True

    def resolve(self, task_id: str) -> Base | str | None:
        """The base round of an update for ``task_id``, weighted for the open round; a
        ``"stale: ..."`` reason if it is too old; None if it is no round of this window."""
        where = round_of(task_id)
        if where is None or where[0] != self.session:
            return None
        base = self._plans.get(task_id)
        trained = base.round if base is not None else where[1]
        tau = self.open_round - trained
        if tau > self.max_staleness:
            return (
                f"stale: trained on round {trained}, {tau} versions before round "
                f"{self.open_round} (max_staleness {self.max_staleness}); not applied"
            )
        if base is None or tau < 0:
            return None
        base.tau, base.scale = tau, staleness_weight(tau, self.exponent)
        return base
