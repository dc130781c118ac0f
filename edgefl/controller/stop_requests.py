"""Stop requests from the REST API, honoured by the session loop between rounds and mid-round.

An operator's ``POST /api/sessions/{id}/stop`` only writes to the store
(``Store.request_stop``): the API never talks to a controller, which may run on another host.
The session loop asks ``StopWatch.check`` before every round; meanwhile a background thread
polls the store, and when a request appears it closes the round in flight early (the
protocol's ``close``, as a full buffer would), so the loop reaches that check within the
round's close grace instead of at its deadline. A wait for a device quorum is not cut short.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from edgefl.protocol import encode

if TYPE_CHECKING:
    from edgefl.controller.controller import Controller

log = logging.getLogger(__name__)


class StopWatch:
    """Watches one session for a stop request while ``ctl`` holds its lease.

    The thread ends by itself once the session leaves ``running`` or the lease is no longer
    this controller's, so the loop needs no cleanup on any of its exits.
    """

    def __init__(self, ctl: Controller, session_id: str, poll_s: float = 0.5) -> None:
        self.ctl = ctl
        self.session_id = session_id
        self.poll_s = poll_s
        self._closed: set[str] = set()
        self._thread = threading.Thread(
            target=self._watch, name=f"stop-watch-{session_id}", daemon=True
        )

    def start(self) -> StopWatch:
        self._thread.start()
        return self

    def check(self) -> str | None:
        """Who asked to stop the session (``subject (role)``), or None if nobody did."""
        sess = self.ctl.store.get_session(self.session_id)
        return (sess.stop_requested_by or None) if sess is not None else None

    def _ours(self) -> bool:
        sess = self.ctl.store.get_session(self.session_id)
        lease = self.ctl.store.get_lease(self.session_id)
        return (
            sess is not None
            and sess.status == "running"
            and lease is not None
            and lease.holder == self.ctl.instance_id
            and lease.expires > time.time()
        )

    def _watch(self) -> None:
        while True:
            time.sleep(self.poll_s)
            try:
                if not self._ours():
                    return
                by = self.check()
                if by:
                    self._close_rounds(by)
            except Exception:  # a store hiccup: the loop's own check still stops the session
                log.exception("session %s: checking for a stop request failed", self.session_id)

    def _close_rounds(self, by: str) -> None:
        """Close every in-flight attempt once, in every region with an online combiner."""
        running = [
            r.task_id
            for r in self.ctl.store.list_rounds(self.session_id)
            if r.status == "running" and r.task_id not in self._closed
        ]
        combiners = self.ctl.presence.snapshot()["combiners"]
        regions = sorted(combiners) if isinstance(combiners, dict) else []
        for task_id in running:
            self._closed.add(task_id)
            log.warning(
                "session %s: stop requested by %s; closing %s", self.session_id, by, task_id
            )
            msg = encode("close", task_id=task_id)
            for region in regions:
                self.ctl.conn.publish(self.ctl.topics.combiner(region, "round"), msg, qos=1)
