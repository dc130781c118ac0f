"""One controller per session: a lease in the store, renewed in the background.

The lease's fence token grows whenever another controller takes a session over, and travels
in every round plan and task, so combiners and devices can drop what a stale controller sends
(for example one that was partitioned away and has not noticed yet).
"""

from __future__ import annotations

import logging
import threading
import time

from edgefl.controller.errors import SessionBusy
from edgefl.store.base import Store

log = logging.getLogger(__name__)


class SessionLease:
    """Holds a session's lease for a ``with`` block; ``lost`` is set if it is taken over.

    Entering waits up to ``wait_s`` for a lease held by someone else to expire (a crashed
    controller stops renewing it), then raises ``SessionBusy``. While held, a background
    thread renews it every ``ttl_s / 3``. Leaving releases it at once.
    """

    def __init__(
        self,
        store: Store,
        session_id: str,
        holder: str,
        *,
        ttl_s: float,
        wait_s: float,
        cancelled: threading.Event | None = None,
    ) -> None:
        self.store = store
        self.session_id = session_id
        self.holder = holder
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.fence = 0
        self.lost = threading.Event()
        self._cancelled = cancelled or threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SessionLease:
        self.fence = self._acquire()
        self._thread = threading.Thread(target=self._renew, name="lease-renewer", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.store.release_lease(self.session_id, self.holder, self.fence)

    def _acquire(self) -> int:
        give_up = time.time() + self.wait_s
        while True:
            fence = self.store.acquire_lease(self.session_id, self.holder, self.ttl_s)
            if fence is not None:
                return fence
            if time.time() >= give_up or self._cancelled.is_set():
                lease = self.store.get_lease(self.session_id)
                holder = lease.holder if lease else "another controller"
                raise SessionBusy(
                    f"session {self.session_id} is run by {holder}; stop that controller, or "
                    f"wait for its lease to expire ({self.ttl_s:.0f}s after it stops renewing)"
                )
            time.sleep(min(0.5, self.ttl_s / 4))

    def _renew(self) -> None:
        while not self._done.wait(self.ttl_s / 3):
            try:
                if self.store.renew_lease(self.session_id, self.holder, self.fence, self.ttl_s):
                    continue
            except Exception:  # a store hiccup: try again before the lease runs out
                log.exception("renewing the lease of %s failed", self.session_id)
                continue
            log.error(
                "session %s: lease lost to another controller (fence %d)",
                self.session_id,
                self.fence,
            )
            self.lost.set()
            return
