"""Telemetry sinks: one interface, pluggable backends, chosen by URL (``open_sink``).

- ``jsonl://PATH`` or a plain path: JSON lines (the embedded default, needs nothing outside);
- ``influxdb://[user:pass@]host:8086/DB``: InfluxDB 1.x over its v1 HTTP API
  (``influxdbs://`` for HTTPS);
- ``influxdb2://host:8086/BUCKET``: InfluxDB 2.x/3.x with ``influxdb-client``
  (``influxdb2s://`` for HTTPS); token, org and bucket may come from the environment;
- ``none``: discard.

Query parameters tune the InfluxDB backends' buffering: ``batch_size``, ``flush_interval``
(s), ``max_buffer`` (points), ``retry_max`` (s), ``close_timeout`` (s), ``timeout`` (s), and
``rp`` (1.x retention policy). docs/telemetry.md has the details.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefl.telemetry.base import NullSink, Point, TelemetrySink
from edgefl.telemetry.buffered import BufferedSink
from edgefl.telemetry.jsonl import JsonLinesSink

if TYPE_CHECKING:
    from edgefl.telemetry.influxql import InfluxV1Reader

__all__ = [
    "BufferedSink",
    "JsonLinesSink",
    "NullSink",
    "Point",
    "TelemetrySink",
    "open_history",
    "open_sink",
]

_BUFFERING = {
    "batch_size": ("batch_size", int),
    "flush_interval": ("flush_interval_s", float),
    "max_buffer": ("max_buffer", int),
    "retry_max": ("retry_max_s", float),
    "close_timeout": ("close_timeout_s", float),
    "timeout": ("timeout_s", float),
}


def _env(*names: str) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _options(query: dict[str, str], allowed: set[str]) -> dict[str, Any]:
    unknown = set(query) - set(_BUFFERING) - allowed
    if unknown:
        raise ValueError(f"unknown telemetry URL parameter(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for key, (arg, kind) in _BUFFERING.items():
        if key in query:
            try:
                out[arg] = kind(query[key])
            except ValueError:
                raise ValueError(f"telemetry URL parameter {key}={query[key]!r}") from None
    return out


def _influx_v1(
    text: str, parts: urllib.parse.SplitResult, query: dict[str, str]
) -> tuple[str, str, str | None, str | None]:
    """An ``influxdb(s)://`` URL's base URL, database and credentials (URL, then env)."""
    database = parts.path.strip("/") or query.pop("db", "")
    if not database:
        raise ValueError(f"telemetry URL {text!r}: name the database (influxdb://host/DB)")
    scheme = "https" if parts.scheme.lower() == "influxdbs" else "http"
    base = f"{scheme}://{parts.hostname}:{parts.port or 8086}"
    username = urllib.parse.unquote(parts.username or "") or _env("EDGEFL_INFLUX_USER")
    password = urllib.parse.unquote(parts.password or "") or _env("EDGEFL_INFLUX_PASSWORD")
    return base, database, username, password


def open_history(url: str) -> InfluxV1Reader:
    """A reader of the telemetry history that ``open_sink(url)`` writes, for the REST API.

    Only InfluxDB 1.x (``influxdb://`` / ``influxdbs://``, the same URL and credentials as
    the sink; buffering parameters are accepted and ignored, ``rp`` is honoured). Other
    sinks cannot answer queries: ValueError, naming what would.
    """
    parts = urllib.parse.urlsplit(str(url))
    scheme = parts.scheme.lower()
    if scheme not in ("influxdb", "influxdbs"):
        raise ValueError(
            f"telemetry history needs an InfluxDB 1.x URL (influxdb://host:8086/DB), not "
            f"{str(url)[:80]!r}; without one the API answers from the state store"
        )
    if not parts.hostname:
        raise ValueError(f"telemetry URL {url!r} has no host")
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    base, database, username, password = _influx_v1(str(url), parts, query)
    opts = _options(query, {"rp", "db"})
    from edgefl.telemetry.influxql import InfluxV1Reader

    return InfluxV1Reader(
        base,
        database,
        retention_policy=query.get("rp") or None,
        timeout_s=opts.get("timeout_s", 5.0),
        username=username,
        password=password,
    )


def open_sink(url: str | Path | None) -> TelemetrySink:
    """The sink a telemetry URL names (see the module docstring); ValueError if malformed.

    Credentials are better kept out of command lines: the 1.x sink reads
    ``EDGEFL_INFLUX_USER``/``EDGEFL_INFLUX_PASSWORD``, the 2.x/3.x sink ``EDGEFL_INFLUX_TOKEN``
    (or ``INFLUX_TOKEN``), ``EDGEFL_INFLUX_ORG`` and ``EDGEFL_INFLUX_BUCKET`` when the URL
    does not give them.
    """
    if url is None or str(url) in ("", "none", "null"):
        return NullSink()
    text = str(url)
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in ("", "file", "jsonl"):
        path = text.split("://", 1)[1] if "://" in text else text
        if not path:
            raise ValueError(f"telemetry URL {text!r} names no file")
        return JsonLinesSink(path)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    if not parts.hostname:
        raise ValueError(f"telemetry URL {text!r} has no host")
    port = parts.port or 8086
    if scheme in ("influxdb", "influxdbs"):
        base, database, username, password = _influx_v1(text, parts, query)
        opts = _options(query, {"rp", "db"})
        from edgefl.telemetry.influx import InfluxV1Sink

        return InfluxV1Sink(
            base,
            database,
            username=username,
            password=password,
            retention_policy=query.get("rp") or None,
            **opts,
        )
    if scheme in ("influxdb2", "influxdb2s"):
        opts = _options(query, {"org", "bucket"})
        bucket = parts.path.strip("/") or query.get("bucket") or _env("EDGEFL_INFLUX_BUCKET")
        token = _env("EDGEFL_INFLUX_TOKEN", "INFLUX_TOKEN")
        org = query.get("org") or _env("EDGEFL_INFLUX_ORG", "INFLUX_ORG") or ""
        if not bucket or not token:
            raise ValueError(
                f"telemetry URL {text!r}: InfluxDB 2.x/3.x needs a bucket (in the URL path or "
                "EDGEFL_INFLUX_BUCKET) and a token (EDGEFL_INFLUX_TOKEN)"
            )
        from edgefl.telemetry.influx import Influx2Sink

        base = f"{'https' if scheme == 'influxdb2s' else 'http'}://{parts.hostname}:{port}"
        return Influx2Sink(base, token=token, org=org, bucket=bucket, **opts)
    raise ValueError(
        f"unknown telemetry URL scheme {scheme!r}: use a path, jsonl://, influxdb:// or "
        "influxdb2://"
    )
