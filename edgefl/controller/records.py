"""Round records: one attempt at one round, written to the store by field name."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from edgefl.protocol.types import Participant, Rejection
from edgefl.store.base import RoundRecord, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundAttempt:
    """Identifies one try at a round; ``task_id`` is what devices and combiners see.

    A retried round keeps its number and bumps ``attempt``, so records never collide and a
    device's deterministic shuffling (seeded by the round) retrains it bit-identically.
    """

    session_id: str
    round: int
    attempt: int
    model_in: str

    @property
    def task_id(self) -> str:
        return f"{self.session_id}:{self.round}:{self.attempt}"

    def start(self, store: Store, devices: list[str], started: float) -> None:
        """Record the attempt as running with its selected devices."""
        store.start_round(
            RoundRecord(
                task_id=self.task_id,
                session_id=self.session_id,
                round=self.round,
                attempt=self.attempt,
                status="running",
                model_in=self.model_in,
                model_out=None,
                devices=devices,
                started=started,
            )
        )

    def fail(
        self,
        store: Store,
        reason: str,
        *,
        participants: list[Participant] | None = None,
        rejected: list[Rejection] | None = None,
        started: float | None = None,
    ) -> None:
        """Record the attempt as failed (creating its record first if it never started)."""
        log.warning("round %s failed: %s", self.task_id, reason)
        if store.get_round(self.task_id) is None:
            self.start(store, [], time.time() if started is None else started)
        store.finish_round(
            self.task_id,
            status="failed",
            model_out=None,
            participants=list(participants or []),
            rejected=list(rejected or []),
            metrics={},
            reason=reason,
            finished=time.time(),
        )

    def complete(
        self,
        store: Store,
        *,
        model_out: str,
        participants: list[Participant],
        rejected: list[Rejection],
        metrics: dict[str, float],
    ) -> None:
        """Record the attempt as completed with the model version it produced."""
        store.finish_round(
            self.task_id,
            status="completed",
            model_out=model_out,
            participants=participants,
            rejected=rejected,
            metrics=metrics,
            finished=time.time(),
        )
