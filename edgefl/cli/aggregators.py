"""``edgefl aggregators``: every aggregator, its tier kind and its parameters with defaults;
and the ``--aggregator-param KEY=VALUE`` parsing the session commands share."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from edgefl.aggregation.base import describe_aggregators

AggregatorParam = typer.Option(
    None,
    "--aggregator-param",
    help="an aggregator parameter as KEY=VALUE (repeatable; VALUE is JSON, else a string); "
    "see `edgefl aggregators`",
)


def aggregators() -> None:
    """List the aggregators: name, tier kind, parameters with defaults and allowed ranges."""
    table = Table(title="edgefl aggregators (docs/algorithms.md)")
    for col in ("aggregator", "kind", "parameters (default; allowed)", "what it is"):
        table.add_column(col)
    for info in describe_aggregators():
        kind = "splittable (sums)" if info.splittable else "robust (two-level)"
        if info.params is None:
            params = "(plug-in: no schema)"
        else:
            params = "\n".join(f"{p.name} = {p.default!r}; {p.allowed}" for p in info.params) or "-"
        table.add_row(info.name, kind, params, info.summary)
    Console().print(table)


def parse_params(pairs: list[str] | None) -> dict[str, Any]:
    """``["lr=0.05", "m=3"]`` -> ``{"lr": 0.05, "m": 3}``; BadParameter for a malformed pair.
    Values are read as JSON (numbers, true/false, null), anything else as a string; the
    aggregator's schema checks them when the session is made."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--aggregator-param {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def config_error(exc: ValueError) -> str:
    """A session setting's error in one line per problem (pydantic's text, minus its URLs)."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    lines = []
    for e in errors():
        where = ".".join(str(p) for p in e.get("loc", ()))
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return "; ".join(lines)
