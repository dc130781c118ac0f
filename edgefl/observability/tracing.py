"""Optional OpenTelemetry traces: one round followed from the controller to every device.

Off by default. ``configure_tracing`` switches it on (``EDGEFL_TRACING=otlp|console|none``,
the OTLP endpoint from the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``). The trace context
crosses tiers inside the protocol's messages: a ``trace`` map holding the W3C
``traceparent`` (and ``tracestate``) on round plans, tasks and updates (docs/protocol.md).

While tracing is off, or when ``opentelemetry`` is not installed (the device agent's base
install: paho-mqtt, cbor2 and numpy only), every helper here is a cheap no-op that never
imports it: ``span`` yields a null span, ``trace_field`` returns ``{}``, so messages carry
no ``trace`` field.

The configuration is process-wide, as ``logging``'s is: the components of a process (a
demo, a simulated fleet, the tests' deployments) share one tracer provider. It is this
module's own provider, not OpenTelemetry's global one (which can be set only once per
process), unless ``set_global=True`` asks to also serve other instrumented libraries.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TRACING_ENV",
    "NullSpan",
    "configure_tracing",
    "current_ids",
    "enabled",
    "end_span",
    "set_attributes",
    "shutdown_tracing",
    "span",
    "start_span",
    "trace_field",
]

TRACING_ENV = "EDGEFL_TRACING"
MODES = ("none", "console", "otlp")
TRACER_NAME = "edgefl"
MAX_CARRIER = 512  # longest traceparent/tracestate value taken from a message

log = logging.getLogger(__name__)


class NullSpan:
    """What the helpers hand out while tracing is off: accepts everything, records nothing."""

    def set_attribute(self, key: str, value: Any) -> None:
        """Ignored."""

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        """Ignored."""

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        """Ignored."""

    def end(self) -> None:
        """Ignored."""

    def is_recording(self) -> bool:
        return False


NULL_SPAN = NullSpan()


@dataclass
class _State:
    tracer: Any = None  # an opentelemetry Tracer while tracing is on
    provider: Any = None  # the TracerProvider this module made (shut down on reconfigure)
    mode: str = "none"


# Process-wide on purpose (see the module docstring); only configure_tracing writes it.
_STATE = _State()


def enabled() -> bool:
    """Whether spans are being recorded in this process."""
    return _STATE.tracer is not None


def configure_tracing(
    mode: str | None = None,
    *,
    service_name: str = "edgefl",
    endpoint: str | None = None,
    exporter: Any = None,
    attributes: Mapping[str, Any] | None = None,
    set_global: bool = False,
    batch: bool = False,
) -> bool:
    """Switch tracing on (or off) for this process; True when spans will be recorded.

    ``mode``: ``otlp`` (OTLP over HTTP/protobuf to ``endpoint``, else the
    ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` environment, else ``http://localhost:4318``),
    ``console`` (spans printed as JSON on stderr), ``none``; ``None`` reads ``EDGEFL_TRACING``
    (``none`` when unset). ``exporter`` (any SDK ``SpanExporter``, e.g. the tests'
    ``InMemorySpanExporter``) overrides the mode and exports each span as it ends (or,
    with ``batch``, in batches from a background thread, as the OTLP and console modes do).
    ``service_name`` becomes the ``service.name`` resource attribute unless
    ``OTEL_SERVICE_NAME`` is set. Raises ValueError for an unknown mode. When the
    OpenTelemetry SDK is not installed, logs a warning naming the extra to install and
    returns False: observability never stops a device from training.
    """
    chosen = (mode if mode is not None else os.environ.get(TRACING_ENV, "none")).strip().lower()
    if chosen in ("", "off", "false", "0"):
        chosen = "none"
    if exporter is None and chosen not in MODES:
        raise ValueError(f"tracing must be one of {', '.join(MODES)}, got {chosen!r}")
    shutdown_tracing()
    if exporter is None and chosen == "none":
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        log.warning(
            "tracing %r asked for, but the OpenTelemetry SDK is not installed "
            "(pip install 'edgefl[tracing]'); tracing stays off",
            chosen,
        )
        return False
    resource = Resource.create({"service.name": service_name, **(attributes or {})})
    if os.environ.get("OTEL_SERVICE_NAME"):  # the standard variable wins, as everywhere
        resource = resource.merge(Resource({"service.name": os.environ["OTEL_SERVICE_NAME"]}))
    provider = TracerProvider(resource=resource)
    where = "an in-process exporter"
    if exporter is not None:
        processor = BatchSpanProcessor if batch else SimpleSpanProcessor
        provider.add_span_processor(processor(exporter))
        chosen = "exporter"
    elif chosen == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # stderr: commands print their results on stdout (the demo's JSON line)
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        where = "stderr"
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning(
                "tracing 'otlp' needs opentelemetry-exporter-otlp-proto-http "
                "(pip install 'edgefl[tracing]'); tracing stays off"
            )
            return False
        url = endpoint
        if url is not None and not url.rstrip("/").endswith("/v1/traces"):
            url = url.rstrip("/") + "/v1/traces"  # as OTEL_EXPORTER_OTLP_ENDPOINT is read
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        where = url or (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
        )
    if set_global:
        trace.set_tracer_provider(provider)
    _STATE.provider = provider
    _STATE.tracer = provider.get_tracer(TRACER_NAME)
    _STATE.mode = chosen
    log.info("tracing: on (%s), spans of %s go to %s", chosen, service_name, where)
    return True


def shutdown_tracing() -> None:
    """Flush and stop this module's provider (if any); tracing is off afterwards."""
    provider = _STATE.provider
    _STATE.tracer = _STATE.provider = None
    _STATE.mode = "none"
    if provider is not None:
        provider.shutdown()


def _parent(carrier: Mapping[str, Any] | None) -> Any:
    """The OpenTelemetry context a message's ``trace`` map names (None: the current one).

    Only short string values are read: a malformed map from the network is ignored, never
    an error (the span then starts a trace of its own).
    """
    if not carrier or not isinstance(carrier, Mapping):
        return None
    from opentelemetry.context import Context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    clean = {
        k: v
        for k, v in carrier.items()
        if k in ("traceparent", "tracestate") and isinstance(v, str) and len(v) <= MAX_CARRIER
    }
    if "traceparent" not in clean:
        return None
    ctx = TraceContextTextMapPropagator().extract(clean, context=Context())
    from opentelemetry import trace

    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def start_span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    parent: Mapping[str, Any] | None = None,
) -> Any:
    """Start a span that outlives a block (end it with ``end_span``); NULL_SPAN when off.

    ``parent`` is a message's ``trace`` map; without one the span is a child of the current
    span, or a root.
    """
    tracer = _STATE.tracer
    if tracer is None:
        return NULL_SPAN
    return tracer.start_span(name, context=_parent(parent), attributes=_clean(attributes))


def end_span(span: Any, **attributes: Any) -> None:
    """Set ``attributes`` on ``span`` and end it (a no-op on None or a null span)."""
    if span is None or span is NULL_SPAN:
        return
    span.set_attributes(_clean(attributes))
    span.end()


@contextmanager
def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    parent: Mapping[str, Any] | None = None,
) -> Iterator[Any]:
    """A span around a block, current inside it (so nested spans and ``trace_field`` see
    it); an exception leaving the block is recorded on it and marks it as an error."""
    tracer = _STATE.tracer
    if tracer is None:
        yield NULL_SPAN
        return
    with tracer.start_as_current_span(
        name, context=_parent(parent), attributes=_clean(attributes)
    ) as current:
        yield current


def set_attributes(**attributes: Any) -> None:
    """Add attributes to the current span (when tracing is on and one is current)."""
    if _STATE.tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(_clean(attributes))


def trace_field(of: Any = None) -> dict[str, dict[str, str]]:
    """``{"trace": {"traceparent": ..., "tracestate"?: ...}}`` naming ``of`` (a span; the
    current one by default), to put in a message; ``{}`` when there is nothing to carry."""
    if _STATE.tracer is None or of is NULL_SPAN:
        return {}
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    target = of if of is not None else trace.get_current_span()
    if not target.get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(target))
    return {"trace": carrier} if "traceparent" in carrier else {}


def current_ids() -> tuple[str, str] | None:
    """The current span's (trace id, span id) in hex, for log lines; None when off or none."""
    if _STATE.tracer is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """Attributes OpenTelemetry accepts: None dropped, lists of plain values kept."""
    out: dict[str, Any] = {}
    for key, value in (attributes or {}).items():
        if value is None:
            continue
        if isinstance(value, (str, bool, int, float)):
            out[key] = value
        elif isinstance(value, (list, tuple, set, frozenset)):
            out[key] = [str(v) for v in value]
        else:
            out[key] = str(value)
    return out
