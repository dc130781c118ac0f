"""The spans and log contexts of each tier, so that the tiers' own code needs one line each.

Span names and attributes (docs/observability.md):

- ``edgefl.controller.round`` (controller, one per round attempt; the trace's root):
  ``edgefl.session``, ``edgefl.round``, ``edgefl.attempt``, ``edgefl.task_id``,
  ``edgefl.devices`` (selected), ``edgefl.regions``, ``edgefl.outcome``.
- ``edgefl.combiner.region`` (combiner, one per region round, child of the plan's context):
  ``edgefl.region``, ``edgefl.combiner``, ``edgefl.task_id``, ``edgefl.devices``,
  ``edgefl.accepted``, ``edgefl.rejected``, ``edgefl.close_reason``.
- ``edgefl.combiner.update`` (combiner, one per completed update transfer, child of the
  region span): ``edgefl.device``, ``edgefl.transfer``, ``edgefl.outcome``.
- ``edgefl.device.task`` (device, one per task, child of the region span through the task's
  context), with children ``edgefl.device.download`` (model or package transfer),
  ``edgefl.device.train`` and ``edgefl.device.upload`` (the update transfer).

Imports nothing of the tiers: what it needs of a round attempt, a plan or a task is read
from them (duck-typed), so the device agent can use it on its base install.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol, TypeVar, cast

from edgefl.observability.logs import log_context
from edgefl.observability.tracing import NULL_SPAN, end_span, span, start_span

__all__ = [
    "RoundScope",
    "end_region_span",
    "region_context",
    "round_scope",
    "session_scope",
    "start_region_span",
    "task_scope",
    "transfer_scope",
]


class _Attempt(Protocol):
    @property
    def session_id(self) -> str: ...

    @property
    def round(self) -> int: ...

    @property
    def attempt(self) -> int: ...

    @property
    def task_id(self) -> str: ...


F = TypeVar("F", bound=Callable[..., Any])


def session_scope(method: F) -> F:
    """Decorates a method ``(self, session_id, ...)`` of an object with a ``project``: every
    record logged while it runs names the session, so the session's log file also holds
    what happens between rounds (resuming, stopping, failing)."""

    @functools.wraps(method)
    def scoped(self: Any, session_id: str, *args: Any, **kwargs: Any) -> Any:
        with log_context(project=getattr(self, "project", None), session=session_id):
            return method(self, session_id, *args, **kwargs)

    return cast(F, scoped)


class RoundScope:
    """The controller's handle on its round span while the round runs."""

    def __init__(self, current: Any) -> None:
        self.span = current

    def done(self, completed: bool) -> None:
        """Record how the attempt ended (``completed`` or ``failed``)."""
        self.span.set_attribute("edgefl.outcome", "completed" if completed else "failed")


@contextmanager
def round_scope(project: str, attempt: _Attempt) -> Iterator[RoundScope]:
    """Around one round attempt at the controller: its log context and its (root) span."""
    ids = {"session": attempt.session_id, "round": attempt.round, "task_id": attempt.task_id}
    with (
        log_context(project=project, **ids),
        span(
            "edgefl.controller.round",
            {
                "edgefl.project": project,
                "edgefl.session": attempt.session_id,
                "edgefl.round": attempt.round,
                "edgefl.attempt": attempt.attempt,
                "edgefl.task_id": attempt.task_id,
            },
        ) as current,
    ):
        yield RoundScope(current)


def region_context(
    project: str, region: str, combiner: str, plan: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The log context of a combiner handling a message while ``plan`` is its open round."""
    fields: dict[str, Any] = {"project": project, "region": region, "combiner": combiner}
    if plan is not None:
        fields.update(session=plan["session"], round=plan["round"], task_id=plan["task_id"])
    return fields


def start_region_span(
    plan: Mapping[str, Any], region: str, combiner: str, devices: int | None = None
) -> Any:
    """The combiner's span of one region round, child of the plan's trace context; it lasts
    until the partial is sent (``end_region_span``). ``devices``: how many this combiner
    serves (a pool member's share), by default all the plan's."""
    return start_span(
        "edgefl.combiner.region",
        {
            "edgefl.session": plan["session"],
            "edgefl.round": plan["round"],
            "edgefl.task_id": plan["task_id"],
            "edgefl.region": region,
            "edgefl.combiner": combiner,
            "edgefl.devices": len(plan["devices"]) if devices is None else devices,
        },
        parent=plan.get("trace"),
    )


def end_region_span(current: Any, accepted: int, rejected: int, why: str) -> None:
    """End a region span with the round's counts and why it closed."""
    end_span(
        current,
        **{"edgefl.accepted": accepted, "edgefl.rejected": rejected, "edgefl.close_reason": why},
    )


@contextmanager
def update_scope(region_span: Any, device: str, transfer: str | None) -> Iterator[Any]:
    """The combiner's handling of one complete update transfer: a child of the region span
    (or of nothing, when no round is open), and the device in the log context."""
    with ExitStack() as stack:
        stack.enter_context(log_context(device=device, transfer=transfer))
        if region_span is NULL_SPAN or region_span is None:
            yield NULL_SPAN
            return
        from opentelemetry import trace

        stack.enter_context(trace.use_span(region_span, end_on_exit=False))
        yield stack.enter_context(
            span("edgefl.combiner.update", {"edgefl.device": device, "edgefl.transfer": transfer})
        )


@contextmanager
def task_scope(task: Mapping[str, Any], project: str, region: str, device: str) -> Iterator[Any]:
    """Around one task on a device: its log context and its span, child of the task's trace
    context (the combiner's region span)."""
    with (
        log_context(
            project=project,
            session=task.get("session"),
            round=task.get("round"),
            task_id=task.get("task_id"),
            region=region,
            device=device,
        ),
        span(
            "edgefl.device.task",
            {
                "edgefl.session": task.get("session"),
                "edgefl.round": task.get("round"),
                "edgefl.task_id": task.get("task_id"),
                "edgefl.region": region,
                "edgefl.device": device,
            },
            parent=task.get("trace"),
        ) as current,
    ):
        yield current


@contextmanager
def transfer_scope(name: str, transfer: str, **attributes: Any) -> Iterator[Any]:
    """One transfer (``download`` or ``upload``) on a device: span ``edgefl.device.{name}``,
    a child of the current span, and the transfer id in the log context."""
    extra = {f"edgefl.{k}": v for k, v in attributes.items()}
    with (
        log_context(transfer=transfer),
        span(f"edgefl.device.{name}", {"edgefl.transfer": transfer, **extra}) as current,
    ):
        yield current
