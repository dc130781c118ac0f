"""The revocation list every verifier checks: revoked subjects and revoked token ids.

One JSON file (``revoked.json``), written by ``edgefl fleet revoke`` and ``edgefl token
revoke``, read by the broker, the combiners, the controller and the API:

    {"version": 1,
     "subjects": {"dev-0001": 1764400000.0},   # tokens of this subject issued at or before
     "tokens": {"<jti>": 1796000000.0}}        # this token id, until its expiry

Revoking a *subject* refuses every token of that subject issued at or before the revocation
time, so a compromised device is cut off, and re-provisioning it later (a new token, issued
after) lets it back in. Revoking a *token id* refuses just that token; the entry can be
pruned once the token has expired anyway. Verifiers reload the file when it changes, so a
revocation reaches them without a restart; a live connection is cut by the broker's sweep.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class RevocationError(Exception):
    """An unreadable or malformed revocation list; the message names the file."""


def _parse(path: Path, text: str) -> tuple[dict[str, float], dict[str, float]]:
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise RevocationError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RevocationError(f"{path} must hold a JSON object")
    if data and data.get("version") != FORMAT_VERSION:
        raise RevocationError(f"{path}: unsupported version {data.get('version')!r}")
    out = []
    for field in ("subjects", "tokens"):
        entries = data.get(field, {})
        if not isinstance(entries, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) for k, v in entries.items()
        ):
            raise RevocationError(f"{path}: {field!r} must map names to Unix times")
        out.append({k: float(v) for k, v in entries.items()})
    return out[0], out[1]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _update(path: Path | str, field: str, name: str, when: float) -> None:
    path = Path(path)
    with _locked(path):
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        subjects, tokens = _parse(path, text)
        target = subjects if field == "subjects" else tokens
        target[name] = when
        now = time.time()
        tokens = {jti: exp for jti, exp in tokens.items() if exp > now - 86400}  # prune
        body = {"version": FORMAT_VERSION, "subjects": subjects, "tokens": tokens}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(body, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)


def revoke_subject(path: Path | str, subject: str, at: float | None = None) -> float:
    """Refuse every token of ``subject`` issued up to now (or ``at``); returns that time."""
    when = time.time() if at is None else at
    _update(path, "subjects", subject, when)
    return when


def revoke_token(path: Path | str, token_id: str, expires: float) -> None:
    """Refuse one token id; ``expires`` lets the entry be pruned a day after it lapses."""
    _update(path, "tokens", token_id, expires)


class RevocationList:
    """A verifier's cached view of ``revoked.json``, reloaded at most every ``reload_s``.

    A missing file means nothing is revoked (a fresh deployment). A file that turns malformed
    keeps the last good list and logs an error: failing open to "nothing revoked" would
    re-admit every revoked device.
    """

    def __init__(self, path: Path | str, reload_s: float = 1.0) -> None:
        self.path = Path(path)
        self.reload_s = reload_s
        self._lock = threading.Lock()
        self._subjects: dict[str, float] = {}
        self._tokens: dict[str, float] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._load(strict=True)

    def _load(self, strict: bool = False) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._subjects, self._tokens, self._mtime = {}, {}, None
            return
        if mtime == self._mtime:
            return
        try:
            subjects, tokens = _parse(self.path, self.path.read_text(encoding="utf-8"))
        except (OSError, RevocationError) as exc:
            if strict:
                raise RevocationError(str(exc)) from exc
            log.error("keeping the previous revocation list: %s", exc)
            return
        self._subjects, self._tokens, self._mtime = subjects, tokens, mtime

    def refresh(self) -> None:
        """Reload now if the file changed (the sweep calls this before checking sessions)."""
        with self._lock:
            self._checked = time.monotonic()
            self._load()

    def revoked(self, subject: str, token_id: str | None, issued_at: float | None) -> bool:
        """Whether a token with these claims is revoked (a token without iat counts as old)."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self.reload_s:
                self._checked = now
                self._load()
            if token_id is not None and token_id in self._tokens:
                return True
            cutoff = self._subjects.get(subject)
            return cutoff is not None and (issued_at is None or issued_at <= cutoff)

    def subjects(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._subjects)
