"""Model versions: blobs in the blob store, records with lineage in the state store."""

from __future__ import annotations

import hashlib
import time

from edgefl.protocol.tensors import dumps_tensors, loads_tensors
from edgefl.protocol.types import Weights
from edgefl.store.base import BlobStore, ModelRecord, StorageError, Store


def version_name(session_id: str, round_: int, digest_hex: str) -> str:
    """``{session}-r{round:04d}-{digest[:8]}``: content-addressed, so a round retried after a
    crash can never overwrite an already recorded version with different bytes."""
    return f"{session_id}-r{round_:04d}-{digest_hex[:8]}"


class ModelRepository:
    """Saves and loads model versions: blob first, record last, digest checked on load."""

    def __init__(self, store: Store, blobs: BlobStore) -> None:
        self.store = store
        self.blobs = blobs

    def save(
        self,
        weights: Weights,
        *,
        parent: str | None,
        session_id: str,
        round_: int,
        optimizer_state: Weights | None = None,
        meta: dict | None = None,
    ) -> tuple[ModelRecord, bytes]:
        """Write blob(s) first and the record last, so a record never points at nothing."""
        return self.save_blob(
            dumps_tensors(weights),
            parent=parent,
            session_id=session_id,
            round_=round_,
            optimizer_state=optimizer_state,
            meta=meta,
        )

    def save_blob(
        self,
        blob: bytes,
        *,
        parent: str | None,
        session_id: str,
        round_: int,
        optimizer_state: Weights | None = None,
        meta: dict | None = None,
    ) -> tuple[ModelRecord, bytes]:
        """``save`` for bytes already encoded: a session started from another version keeps
        that version's exact bytes (and so its digest), never a re-encoding of them."""
        digest = hashlib.sha256(blob).hexdigest()
        version = version_name(session_id, round_, digest)
        existing = self.store.get_model(version)
        if existing is not None:  # the same bytes again (a retried round): nothing to write
            return existing, blob
        try:
            self.blobs.put(version, blob)
            if optimizer_state:
                self.blobs.put(f"{version}.opt", dumps_tensors(optimizer_state))
        except OSError as exc:  # the record is never written: no version points at nothing
            raise StorageError(
                f"cannot store model version {version} ({len(blob)} bytes): "
                f"{exc.strerror or exc}"
            ) from exc
        record = ModelRecord(
            version=version,
            parent=parent,
            session_id=session_id,
            round=round_,
            digest=digest,
            size=len(blob),
            created=time.time(),
            meta=dict(meta or {}),
        )
        self.store.add_model(record)
        return record, blob

    def load(self, version: str) -> tuple[Weights, bytes]:
        record = self.store.get_model(version)
        if record is None:
            raise KeyError(f"unknown model version {version!r}")
        blob = self.blobs.get(version)
        if hashlib.sha256(blob).hexdigest() != record.digest:
            raise ValueError(f"model blob {version!r} is corrupt (digest mismatch)")
        return loads_tensors(blob), blob

    def load_optimizer_state(self, version: str) -> Weights:
        key = f"{version}.opt"
        return loads_tensors(self.blobs.get(key)) if self.blobs.exists(key) else {}
