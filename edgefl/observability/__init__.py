"""Observability: structured JSON logs with work ids, and optional OpenTelemetry traces.

Both are off (text logs, no spans) unless configured: ``EDGEFL_LOG_FORMAT=json``,
``EDGEFL_TRACING=otlp|console``; docs/observability.md. Standard library only until
tracing is switched on, so the device agent imports it on its base install.
"""

from __future__ import annotations

from edgefl.observability.logs import (
    SessionLogWriter,
    configure_logging,
    current_context,
    log_context,
    read_session_log,
)
from edgefl.observability.tracing import (
    configure_tracing,
    end_span,
    set_attributes,
    shutdown_tracing,
    span,
    start_span,
    trace_field,
)

__all__ = [
    "SessionLogWriter",
    "configure_logging",
    "configure_tracing",
    "current_context",
    "end_span",
    "log_context",
    "read_session_log",
    "set_attributes",
    "shutdown_tracing",
    "span",
    "start_span",
    "trace_field",
]
