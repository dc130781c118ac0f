"""The embedded default sink: one JSON object per line, appended to a file."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from edgefl.telemetry.base import Point

log = logging.getLogger(__name__)


class JsonLinesSink:
    """Appends points as JSON lines to ``path`` (parent folders are created).

    Thread-safe: each ``write`` appends its lines under a lock and flushes them to the OS
    (no fsync). Points that cannot be written (full disk, a non-JSON value, a closed sink)
    are logged and dropped, never raised. Owns the file; ``close`` closes it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, points: list[Point]) -> None:
        """Append ``points`` as one line each, or log and drop them on failure."""
        try:
            lines = "".join(
                json.dumps({"m": p.measurement, "ts": p.ts, "tags": p.tags, "fields": p.fields})
                + "\n"
                for p in points
            )
            with self._lock:
                self._file.write(lines)
                self._file.flush()
        except (OSError, TypeError, ValueError) as exc:
            log.warning("telemetry: dropped %d points: %s", len(points), exc)

    def close(self) -> None:
        """Close the file; later writes are dropped with a warning."""
        with self._lock:
            try:
                self._file.close()
            except OSError as exc:
                # a full disk already dropped these points at write; shutdown must not fail
                log.error("telemetry: could not flush %s on close: %s", self.path, exc)
