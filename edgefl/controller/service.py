"""The controller as a service: runs the sessions operators queue through the REST API.

``edgefl controller --serve`` keeps one ``Controller`` connected and polls the store for its
project's work, oldest first:

1. ``queued`` sessions (``POST /api/sessions/{id}/start`` or ``/resume``): claimed under the
   session lease, queued -> running, so of several serving controllers on one store exactly
   one runs each session (the lease, then a compare-and-set on the status);
2. ``running`` sessions whose lease has expired: their controller died (or was interrupted),
   so this one takes over, as ``edgefl controller --resume`` would, from the last completed
   round with the fence raised.

It runs one session at a time, and so does a project: a device trains one task at a time
(protocol v1), so two sessions of one project running together would fight over the devices
and combiners. Serving controllers therefore also hold a project lease (``project_lease_key``,
in the same leases table) while they run a session; of several serving one project, one runs
a session while the others wait, ready to take the next one, or to take over. Stop
requests are honoured by the session loop (``edgefl.controller.stop_requests``).
Stopping the service stops the session it runs (``stopped``, resumable through the API).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable

from edgefl.controller.config import SessionConfig
from edgefl.controller.controller import Controller, RoundCallback
from edgefl.controller.errors import SessionBusy, SessionFailed
from edgefl.controller.lease import SessionLease
from edgefl.controller.rounds import Evaluator
from edgefl.store.base import SessionRecord

log = logging.getLogger(__name__)

EvaluatorFor = Callable[[SessionConfig], Evaluator | None]


def project_lease_key(project: str) -> str:
    """The leases-table key of a project's serving slot: never a session id (those have no
    '/'), and short enough for the column whatever the project's name."""
    return f"project/{hashlib.sha256(project.encode()).hexdigest()[:32]}"


class ControllerService:
    """Runs a project's queued (and orphaned) sessions on ``controller``, one at a time.

    ``evaluator_for`` picks the server-side evaluator per session (e.g. the digits test split
    for the built-in models, none for a package); without it the controller's own is kept.
    ``adopt=False`` leaves orphaned running sessions alone.
    """

    def __init__(
        self,
        controller: Controller,
        *,
        poll_s: float = 1.0,
        evaluator_for: EvaluatorFor | None = None,
        adopt: bool = True,
        on_round: RoundCallback | None = None,
        on_session: Callable[[SessionRecord], None] | None = None,
    ) -> None:
        self.ctl = controller
        self.store = controller.store
        self.poll_s = poll_s
        self.evaluator_for = evaluator_for
        self.adopt = adopt
        self.on_round = on_round
        self.on_session = on_session
        # never wait for a lease here: a busy session is someone else's, the next poll retries
        controller.lease_wait_s = 0.0
        self.ran: list[str] = []  # sessions this service ran to an end, in order
        self.current: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # choosing work ---------------------------------------------------------------------
    def next_session(self) -> tuple[str, bool] | None:
        """The next session to run and whether it comes from the queue, or None."""
        project = self.ctl.project
        queued = self.store.list_sessions(project, status="queued", limit=1)
        if queued:
            return queued[0].session_id, True
        if not self.adopt:
            return None
        now = time.time()
        for sess in self.store.list_sessions(project, status="running"):
            lease = self.store.get_lease(sess.session_id)
            if lease is not None and lease.expires < now and lease.holder != self.ctl.instance_id:
                return sess.session_id, False
        return None

    def run_once(self) -> SessionRecord | None:
        """Run the next session to its end; None when there was nothing (or it was taken)."""
        picked = self.next_session()
        if picked is None:
            return None
        session_id, queued = picked
        sess = self.store.get_session(session_id)
        if sess is None:
            return None
        if self.evaluator_for is not None:
            self.ctl.rounds.evaluator = self.evaluator_for(SessionConfig(**sess.config))
        self.current = session_id
        slot = SessionLease(
            self.store,
            project_lease_key(self.ctl.project),
            self.ctl.instance_id,
            ttl_s=self.ctl.lease_ttl_s,
            wait_s=0.0,
        )
        log.info("serving: %s session %s", "running" if queued else "taking over", session_id)
        try:
            with slot:
                done = self.ctl.run(session_id, self.on_round, claim=queued, retry_failed=queued)
        except SessionBusy as exc:  # another controller's, or stopped before it was claimed
            log.info("serving: session %s not taken: %s", session_id, exc)
            return None
        except SessionFailed as exc:
            log.warning("serving: %s", exc)
            done = self.store.get_session(session_id) or sess
        except Exception as exc:  # a session that cannot run must not stop the service
            log.exception("serving: session %s crashed", session_id)
            self._fail(session_id, f"the serving controller could not run it: {exc}")
            done = self.store.get_session(session_id) or sess
        finally:
            self.current = None
        self.ran.append(session_id)
        if self.on_session is not None:
            self.on_session(done)
        return done

    def _fail(self, session_id: str, reason: str) -> None:
        """Mark a session this service was running as failed (resumable through the API)."""
        with contextlib.suppress(KeyError, ValueError):
            self.store.transition_session(session_id, ("running",), "failed", reason)

    # serving ---------------------------------------------------------------------------
    def serve(self) -> None:
        """Run sessions as they are queued until ``stop`` (blocks the calling thread)."""
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # the store is unreachable, say: try again at the next poll
                log.exception("serving: looking for work failed")
                ran = None
            if ran is None:
                self._stop.wait(self.poll_s)

    def start(self) -> ControllerService:
        """Serve from a background thread."""
        self._thread = threading.Thread(target=self.serve, name="controller-service", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving; a session in progress is stopped (resumable) at its next step."""
        self._stop.set()
        self.ctl.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> ControllerService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
