"""Server-side aggregator interface, registry and parameter validation.

Aggregation is split in two. Splittable aggregators (FedAvg, FedAvgM, FedProx, the FedOpt
family) need only the weighted mean of the updates: combiners compute sufficient statistics
(``WeightedSum``) and the controller runs the aggregator once on the merged mean, exactly, with
any number of combiners. Robust aggregators (median, trimmed mean, Krum) need the updates
themselves; they declare ``splittable = False`` and run as a two-level estimator
(``edgefl.aggregation.robust``, docs/algorithms.md).

Each aggregator class may declare ``Params``, a pydantic model (``extra="forbid"``) of its
keyword arguments: ``make_aggregator`` validates them against it, so a bad parameter fails
when the session is created, not in round 7. Plug-ins (entry-point group
``edgefl.aggregators``) without ``Params`` still work: their constructor checks what it gets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from edgefl.protocol.types import Weights


class ServerAggregator(Protocol):
    """The controller's optimizer: turns the round's aggregate into the next model.

    For a splittable aggregator the aggregate is the fleet's exact weighted mean, merged from
    every region; for a robust one, its two-level robust estimate. It runs once per round, at
    the controller. Its state (e.g. FedAdam's moments) must round-trip through
    ``state_dict``/``load_state_dict``: it is stored with each model version, and a restarted
    controller resumes with it. Not called concurrently.

    Optional attributes, read with ``getattr`` so that plug-ins need none of them:
    ``Params`` (pydantic schema of the constructor's keywords), ``splittable`` (default
    True) and ``task_settings()`` (extra ``train`` settings sent to devices, e.g. FedProx's
    ``mu``).
    """

    name: str

    def step(self, global_weights: Weights, mean: Weights) -> Weights:
        """Return the next global model from the current one and the round's aggregate."""

    def state_dict(self) -> Weights:
        """Optimizer state to persist with each model version (restart safety)."""

    def load_state_dict(self, state: Weights) -> None:
        """Restore what ``state_dict`` returned (``{}`` before the first round)."""


class StrictParams(BaseModel):
    """Base of every built-in ``Params``: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


def _builtin() -> dict[str, type]:
    from edgefl.aggregation.fedavg import FedAvg
    from edgefl.aggregation.fedavgm import FedAvgM
    from edgefl.aggregation.fedmedian import FedMedian
    from edgefl.aggregation.fedopt import FedAdaGrad, FedAdam, FedYogi
    from edgefl.aggregation.fedprox import FedProx
    from edgefl.aggregation.krum import Krum, MultiKrum
    from edgefl.aggregation.trimmed_mean import TrimmedMean

    classes: list[type] = [FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdaGrad]
    classes += [FedMedian, TrimmedMean, Krum, MultiKrum]
    return {cls.name: cls for cls in classes}  # type: ignore[attr-defined]


def available_aggregators() -> list[str]:
    """Built-in names plus those registered under the ``edgefl.aggregators`` entry point."""
    names = set(_builtin())
    names.update(ep.name for ep in entry_points(group="edgefl.aggregators"))
    return sorted(names)


def aggregator_class(name: str) -> type:
    """The class registered as ``name``; ValueError lists the available names for a typo."""
    builtin = _builtin()
    if name in builtin:
        return builtin[name]
    for ep in entry_points(group="edgefl.aggregators"):
        if ep.name == name:
            cls: type = ep.load()
            return cls
    raise ValueError(
        f"unknown aggregator {name!r}; available: {', '.join(available_aggregators())}"
    )


def validate_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` checked against the aggregator's ``Params``, with defaults filled in.

    ValueError names the aggregator, each bad field and its allowed range. An aggregator
    without ``Params`` (a plug-in) gets ``params`` unchanged.
    """
    schema = getattr(aggregator_class(name), "Params", None)
    if schema is None:
        return dict(params)
    try:
        checked: BaseModel = schema(**params)
    except ValidationError as exc:
        raise ValueError(_explain(name, schema, exc)) from None
    return checked.model_dump()


def make_aggregator(name: str, **params: Any) -> ServerAggregator:
    """A fresh aggregator by name, its parameters validated (ValueError says what is wrong)."""
    cls = aggregator_class(name)
    made: ServerAggregator = cls(**validate_params(name, params))
    return made


def is_splittable(aggregator: Any) -> bool:
    """Whether the aggregator needs only the weighted mean (sufficient statistics)."""
    return bool(getattr(aggregator, "splittable", True))


def task_settings(aggregator: Any) -> dict[str, Any]:
    """Extra ``train`` settings the aggregator sends to devices (FedProx's ``mu``)."""
    hook = getattr(aggregator, "task_settings", None)
    return dict(hook()) if hook is not None else {}


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of an aggregator, for ``edgefl aggregators`` and the docs."""

    name: str
    default: Any
    allowed: str
    description: str


@dataclass(frozen=True)
class AggregatorInfo:
    """What an operator needs to pick an aggregator: its tier kind and parameters."""

    name: str
    splittable: bool
    summary: str
    params: list[ParamInfo] | None  # None: a plug-in that declares no schema


def describe_aggregators() -> list[AggregatorInfo]:
    """Every available aggregator, its kind and its parameters with defaults."""
    out = []
    for name in available_aggregators():
        cls = aggregator_class(name)
        schema = getattr(cls, "Params", None)
        params = None
        if schema is not None:
            params = [
                ParamInfo(
                    field,
                    info.default,
                    allowed_range(info.metadata) or "any",
                    info.description or "",
                )
                for field, info in schema.model_fields.items()
            ]
        doc = [" ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())]
        out.append(
            AggregatorInfo(
                name, bool(getattr(cls, "splittable", True)), doc[0] if doc else "", params
            )
        )
    return out


def allowed_range(metadata: list[Any]) -> str:
    """A field's bounds as text (``> 0``, ``>= 0, < 1``) from its pydantic metadata."""
    parts = []
    for m in metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(m, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    return ", ".join(parts)


def _explain(name: str, schema: type[BaseModel], exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "params"
        if err["type"] == "extra_forbidden":
            known = ", ".join(schema.model_fields) or "none"
            problems.append(f"unknown parameter {field!r} (it takes: {known})")
            continue
        info = schema.model_fields.get(str(err["loc"][0])) if err["loc"] else None
        bounds = allowed_range(info.metadata) if info is not None else ""
        allowed = f"; allowed: {field} {bounds}" if bounds else ""
        problems.append(f"parameter {field!r}: {err['msg']} (got {err.get('input')!r}){allowed}")
    return f"aggregator {name!r}: " + "; ".join(problems)
