"""InfluxDB backends: 1.x over its v1 HTTP API, and 2.x/3.x through ``influxdb-client``.

Both send line protocol from the ``BufferedSink`` flusher thread, so batching, retries, the
outage buffer and its counters are the same for both (docs/telemetry.md).
"""

from __future__ import annotations

import base64
import logging
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from edgefl.telemetry.base import Point
from edgefl.telemetry.buffered import BufferedSink, WriteRejected
from edgefl.telemetry.lineprotocol import body

log = logging.getLogger(__name__)

# HTTP answers that say "this data is wrong": retrying the same batch cannot succeed. Anything
# else (401/403 while a token is rotated, 404 while a database is created, 5xx, timeouts,
# refused connections) keeps the points buffered and retries.
_REFUSED = (400, 413, 422)


class InfluxV1Sink(BufferedSink):
    """Writes to InfluxDB 1.x (``POST /write?db=...``): plain HTTP with urllib, no client lib.

    ``base_url`` is ``http(s)://host:port``. With ``create_db`` the database is created
    (``CREATE DATABASE`` is idempotent) before the first write and whenever a write answers
    "database not found", so a fresh server needs no manual step.
    """

    def __init__(
        self,
        base_url: str,
        database: str,
        *,
        username: str | None = None,
        password: str | None = None,
        retention_policy: str | None = None,
        create_db: bool = True,
        timeout_s: float = 5.0,
        **buffering: Any,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.database = database
        self.timeout_s = timeout_s
        self.create_db = create_db
        self._db_ready = not create_db
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if username:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        params = {"db": database, "precision": "ns"}
        if retention_policy:
            params["rp"] = retention_policy
        self._write_url = f"{self.base_url}/write?{urllib.parse.urlencode(params)}"
        super().__init__(name=f"influxdb {self.base_url}/{database}", **buffering)

    def _post(self, url: str, data: bytes, headers: dict[str, str]) -> None:
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300].strip()
            if exc.code in _REFUSED:
                raise WriteRejected(f"HTTP {exc.code}: {detail}") from None
            raise OSError(f"HTTP {exc.code}: {detail}") from None

    def _ensure_db(self) -> None:
        q = urllib.parse.urlencode({"q": f'CREATE DATABASE "{self.database}"'})
        headers = {**self._headers, "Content-Type": "application/x-www-form-urlencoded"}
        self._post(f"{self.base_url}/query", q.encode(), headers)
        self._db_ready = True

    def _send(self, points: list[Point]) -> None:
        data = body(points)
        if not data:
            return
        if not self._db_ready:
            self._ensure_db()
        try:
            self._post(self._write_url, data, self._headers)
        except OSError as exc:
            if self.create_db and "database not found" in str(exc):
                self._db_ready = False  # dropped while we ran: create it on the retry
            raise


class Influx2Sink(BufferedSink):
    """Writes to InfluxDB 2.x or 3.x with ``influxdb-client`` (the v2 write API).

    Thin on purpose: the client only carries the HTTP write (``/api/v2/write``, token auth);
    batching, retries and the outage buffer are ``BufferedSink``'s. InfluxDB 3 takes the
    database name as ``bucket`` and ignores ``org``. Not tested against a 2.x/3.x server here
    (Debian ships only 1.6.7, which answers 404 to the v2 API: then points stay buffered).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str,
        org: str,
        bucket: str,
        timeout_s: float = 5.0,
        **buffering: Any,
    ) -> None:
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        self.url, self.org, self.bucket = url.rstrip("/"), org, bucket
        self._client = InfluxDBClient(
            url=self.url, token=token, org=org, timeout=int(timeout_s * 1000)
        )
        self._api = self._client.write_api(write_options=SYNCHRONOUS)
        super().__init__(name=f"influxdb2 {self.url}/{bucket}", **buffering)

    def _send(self, points: list[Point]) -> None:
        from influxdb_client import WritePrecision
        from influxdb_client.rest import ApiException

        data = body(points)
        if not data:
            return
        try:
            self._api.write(
                bucket=self.bucket,
                org=self.org,
                record=data.decode(),
                write_precision=WritePrecision.NS,  # type: ignore[arg-type]
            )
        except ApiException as exc:
            detail = f"HTTP {exc.status}: {str(exc.body or exc.reason)[:300]}"
            if exc.status in _REFUSED:
                raise WriteRejected(detail) from None
            raise OSError(detail) from None

    def _close_backend(self) -> None:
        self._api.close()
        self._client.close()
