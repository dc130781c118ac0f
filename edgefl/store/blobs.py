"""Filesystem blob store: atomic writes, content stays put under a validated key."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class FileBlobStore:
    """One file per key directly under ``root``; keys double as MQTT topic segments.

    Readers never see half a blob: ``put`` replaces a file atomically, and the last of two
    concurrent ``put`` calls on one key wins. Invalid keys raise ``ValueError`` before any
    file is touched, so no key can reach outside ``root``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        # A strict alphabet and no leading dot: no "..", no "/", no clash with ".tmp-" files.
        if not isinstance(key, str) or not _KEY.match(key) or key.startswith("."):
            raise ValueError(f"invalid blob key {key!r}: use A-Z a-z 0-9 _ . - (no leading dot)")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        """Write to a temp file, fsync, then rename: a crash never leaves half a model."""
        path = self._path(key)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._sync_dir()

    def _sync_dir(self) -> None:
        """Persist the rename itself, so the blob survives a power cut, not just a crash."""
        if os.name != "posix":
            return
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def get(self, key: str) -> bytes:
        """The whole blob; ``KeyError`` when absent."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        """Whether a blob is stored under ``key``."""
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        """Idempotent: deleting an absent key is not an error."""
        self._path(key).unlink(missing_ok=True)
