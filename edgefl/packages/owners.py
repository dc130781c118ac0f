"""Which projects added a model package: a JSON sidecar blob next to the package.

Packages are content-addressed (``pkg-<sha256>``) and shared by digest, so two projects
uploading the same bytes store them once. Who may *see* a package is a per-project fact,
kept without a schema change in a sidecar blob ``pkg-<sha256>.owners`` beside it
(docs/storage.md 4.1)::

    {"format": 1, "projects": ["alpha", "beta"]}

``projects`` is sorted and has no duplicates. A package without a sidecar (stored before
owners existed) is owned by no project: the REST API then shows it only to the projects
whose sessions train it (docs/security.md 4a).

Adding an owner is a read-modify-write. It runs under a lock shared by every
``PackageOwners`` of this process (the controller and the API may share one process); on a
filesystem blob store (``FileBlobStore``, POSIX) it also holds an exclusive ``flock`` on the
store's folder, so processes on the same host that share the model folder serialise too.
Other stores (S3-compatible ones) have no lock across processes: two processes adding
*different* projects to one package in the same instant may keep only one of them. The
loser's operator sees the package missing and uploads it again (200), which adds it back.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgefl.store.base import BlobStore

__all__ = ["FORMAT", "OwnersError", "PackageOwners", "owners_key"]

log = logging.getLogger(__name__)

FORMAT = 1
# one lock for the whole process: owner writes are rare (uploads), and every instance over
# the same folder must exclude the others, whichever object it was built from
_WRITE_LOCK = threading.Lock()


class OwnersError(ValueError):
    """A sidecar that is not a format-1 owners document (damaged, or from a newer edgefl)."""


def owners_key(digest: str) -> str:
    """The sidecar's blob key: beside ``pkg-<digest>``, and ignored by package listings
    (its name is not ``pkg-`` followed by exactly 64 hex digits)."""
    return f"pkg-{digest}.owners"


def _decode(data: bytes, digest: str) -> frozenset[str]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise OwnersError(f"owners of package {digest[:16]}... are not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise OwnersError(
            f"owners of package {digest[:16]}... are format {got!r}; this edgefl reads {FORMAT}"
        )
    projects = doc.get("projects")
    if not isinstance(projects, list) or not all(isinstance(p, str) for p in projects):
        raise OwnersError(f"owners of package {digest[:16]}...: 'projects' is not a name list")
    return frozenset(projects)


def _encode(projects: frozenset[str]) -> bytes:
    return json.dumps({"format": FORMAT, "projects": sorted(projects)}).encode()


class PackageOwners:
    """The owner projects of the packages in one blob store (which it does not own or close).

    ``get`` is a plain read. ``add`` is safe from any thread of the process and, on a
    filesystem store, from other processes of the host (module docstring).
    """

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs

    def get(self, digest: str) -> frozenset[str]:
        """The projects that added the package; empty when it has no sidecar (an older
        package) or the sidecar is unreadable (logged: nobody is shown what is in doubt)."""
        try:
            return _decode(self.blobs.get(owners_key(digest)), digest)
        except KeyError:
            return frozenset()
        except OwnersError as exc:
            log.error("%s", exc)
            return frozenset()

    def add(self, digest: str, project: str) -> bool:
        """Record ``project`` as an owner; True if it was not one yet. Raises OwnersError
        rather than overwrite a sidecar it cannot read (other projects would lose it)."""
        key = owners_key(digest)
        with self._locked():
            try:
                current = _decode(self.blobs.get(key), digest)
            except KeyError:
                current = frozenset()
            if project in current:
                return False
            self.blobs.put(key, _encode(current | {project}))
        log.info("package %s: project %s added as an owner", digest[:16], project)
        return True

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with _WRITE_LOCK:
            root = getattr(self.blobs, "root", None)
            if not isinstance(root, Path) or os.name != "posix":
                yield
                return
            import fcntl  # POSIX only

            fd = os.open(root, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
                yield
            finally:
                os.close(fd)
