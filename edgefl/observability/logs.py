"""Structured JSON logs on the stdlib ``logging``, with the ids of the work being done.

Every component keeps logging through ``logging.getLogger(__name__)``. What this module adds:

- a *log context* (a ``contextvars.ContextVar``): the session, round, task id, region,
  combiner, device and transfer that the current thread is working on. Components set it
  around a unit of work (``log_context(...)``); every record logged inside carries it, so a
  line like "rejected update" is findable by session and round without parsing its text.
  A context variable, not a ``threading.local``: a simulated fleet runs many agents' tasks
  on one thread pool, and each task's fields must end with the task.
- ``JsonFormatter``: one JSON object per line (``ts``, ``level``, ``logger``, ``msg``, the
  context's fields, ``trace_id``/``span_id`` when a span is current, ``exc`` on errors).
- ``configure_logging``: text (the default) or JSON on stderr or a file, switched by
  ``EDGEFL_LOG_FORMAT=json``.
- ``SessionLogWriter``: appends the records of each session to ``{dir}/{session}.jsonl``,
  the per-session file the REST API exports (``GET /api/sessions/{id}/logs``).

Standard library only: the device agent uses it too.
"""

from __future__ import annotations

import json as _json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, TextIO

from edgefl.observability import tracing

__all__ = [
    "FIELDS",
    "LOG_FILE_ENV",
    "LOG_FORMAT_ENV",
    "SESSION_LOGS_ENV",
    "ContextFilter",
    "JsonFormatter",
    "SessionLogWriter",
    "configure_logging",
    "current_context",
    "log_context",
    "read_session_log",
    "session_log_path",
]

LOG_FORMAT_ENV = "EDGEFL_LOG_FORMAT"  # "json" or "text" (the default)
LOG_FILE_ENV = "EDGEFL_LOG_FILE"  # append logs to this file instead of stderr
SESSION_LOGS_ENV = "EDGEFL_SESSION_LOGS"  # "off" stops the controller's per-session files

# The context fields, in the order a JSON line lists them.
FIELDS = ("project", "session", "round", "task_id", "region", "combiner", "device", "transfer")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: ContextVar[Mapping[str, Any]] = ContextVar("edgefl_log_context", default=_EMPTY)
# the same characters as a session id (SessionConfig): a file name that cannot leave the folder
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (``None`` values are left out) to every record logged inside.

    Nests: inner fields add to (or override) outer ones, and all are restored on exit.
    """
    merged = {**_context.get(), **{k: v for k, v in fields.items() if v is not None}}
    token = _context.set(MappingProxyType(merged))
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> Mapping[str, Any]:
    """The fields ``log_context`` set in this thread (or task), read-only."""
    return _context.get()


class ContextFilter(logging.Filter):
    """Copies the log context (and the current span's ids) onto each record it passes.

    Filters on a handler run in the thread that logs, so the context is the logger's own,
    even if the handler writes elsewhere later. Always passes the record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "edgefl_context"):
            ctx = dict(_context.get())
            for name in FIELDS:  # ``extra={"device": ...}`` on a call works too
                value = record.__dict__.get(name)
                if value is not None:
                    ctx[name] = value
            ids = tracing.current_ids()
            if ids is not None:
                ctx["trace_id"], ctx["span_id"] = ids
            record.edgefl_context = ctx
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: what log pipelines (Loki, Elastic, Cloud
    Logging) ingest without a parser of their own. Needs ``ContextFilter`` on the handler
    for the context fields (without it a record still formats, with fewer fields)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx: Mapping[str, Any] = getattr(record, "edgefl_context", _EMPTY)
        for name in (*FIELDS, "trace_id", "span_id"):
            if name in ctx:
                out[name] = ctx[name]
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _json.dumps(out, default=str, ensure_ascii=False)


def _json_wanted(json: bool | None) -> bool:
    if json is not None:
        return json
    value = os.environ.get(LOG_FORMAT_ENV, "text").strip().lower()
    if value not in ("json", "text", ""):
        raise ValueError(f"{LOG_FORMAT_ENV} must be json or text, got {value!r}")
    return value == "json"


def make_handler(
    json: bool, file: str | Path | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """A handler writing text or JSON lines to ``file`` (appended) or ``stream`` (stderr)."""
    handler: logging.Handler
    if file is not None:
        handler = logging.FileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(
    json: bool | None = None,
    level: str | int = "info",
    file: str | Path | None = None,
    *,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Replace the root logger's handlers with one that writes text or JSON lines.

    ``json=None`` reads ``EDGEFL_LOG_FORMAT`` (``json`` or ``text``; text by default), and
    ``file=None`` reads ``EDGEFL_LOG_FILE`` (stderr by default). Raises ValueError for an
    unknown format or level. Returns the handler installed.
    """
    as_json = _json_wanted(json)
    file = file if file is not None else (os.environ.get(LOG_FILE_ENV) or None)
    numeric = level if isinstance(level, int) else logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}: debug, info, warning or error")
    handler = make_handler(as_json, file, stream)
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
    if as_json or file is not None:
        logging.getLogger("edgefl.observability").info(
            "logging: %s lines to %s at %s",
            "JSON" if as_json else "text",
            file or ("stderr" if stream is None else "a stream"),
            logging.getLevelName(numeric).lower(),
        )
    return handler


def session_log_path(directory: str | Path, session_id: str) -> Path:
    """``{directory}/{session_id}.jsonl``; ValueError for an id that is no safe file name."""
    if not _SAFE_ID.match(session_id) or session_id in (".", ".."):
        raise ValueError(f"session id {session_id!r} cannot name a log file")
    return Path(directory) / f"{session_id}.jsonl"


class SessionLogWriter(logging.Handler):
    """Appends every record that carries a session id to that session's JSONL file.

    Attached to the root logger by ``attach`` (the deployment's controller does), it keeps
    what this process logs at its log level (info for ``edgefl controller``) about each
    session, whichever component logged it: in one process (the demo, tests) that includes
    the combiners and simulated devices. With ``project``, only records whose context names
    that project (or names none) are kept: two controllers of different projects in one
    process each keep their own. Opens, appends and closes per record, under a lock: a few
    lines per round, and a file never left half-open by a crash. Thread-safe.
    """

    def __init__(
        self, directory: str | Path, project: str | None = None, level: int = logging.INFO
    ) -> None:
        super().__init__(level)
        self.directory = Path(directory)
        self.project = project
        self.addFilter(ContextFilter())
        self.setFormatter(JsonFormatter())
        self._write_lock = threading.Lock()
        self._attached_to: logging.Logger | None = None

    def emit(self, record: logging.LogRecord) -> None:
        ctx: Mapping[str, Any] = getattr(record, "edgefl_context", _EMPTY)
        session = ctx.get("session")
        if not isinstance(session, str):
            return
        if self.project is not None and ctx.get("project", self.project) != self.project:
            return
        try:
            path = session_log_path(self.directory, session)
            line = self.format(record) + "\n"
            with self._write_lock:
                self.directory.mkdir(parents=True, exist_ok=True)
                with path.open("a", encoding="utf-8") as f:
                    f.write(line)
        except Exception:
            self.handleError(record)

    def attach(self, logger: logging.Logger | None = None) -> SessionLogWriter:
        """Start receiving ``logger``'s records (the root logger's by default)."""
        self._attached_to = logger or logging.getLogger()
        self._attached_to.addHandler(self)
        return self

    def close(self) -> None:
        """Detach from the logger ``attach`` chose; safe to call twice."""
        if self._attached_to is not None:
            self._attached_to.removeHandler(self)
            self._attached_to = None
        super().close()


def session_logs_enabled() -> bool:
    """Whether controllers keep per-session log files (``EDGEFL_SESSION_LOGS``, on by default)."""
    value = os.environ.get(SESSION_LOGS_ENV, "on").strip().lower()
    return value not in ("0", "off", "false", "no", "none")


def read_session_log(directory: str | Path, session_id: str) -> Iterator[str]:
    """The JSON lines logged for ``session_id``, oldest first (none if there is no file).

    Each line is checked to parse and to name this session: a torn last line (a crash mid
    write) is skipped, and nothing of another session can leak through a mislabelled file.
    """
    path = session_log_path(directory, session_id)
    try:
        f = path.open(encoding="utf-8")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            try:
                rec = _json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("session") == session_id:
                yield line if line.endswith("\n") else line + "\n"
