"""Creating a session: the initial model version and the session record, in that order.

One implementation for every way a session is made: ``Controller.create_session`` (the
``edgefl controller`` command, the demo, tests) and the REST API's ``POST /api/sessions``,
which creates sessions for a serving controller to run later. Neither needs a broker.
"""

from __future__ import annotations

import logging
import time

from edgefl.aggregation import make_aggregator
from edgefl.controller.config import SessionConfig
from edgefl.controller.model_versions import ModelRepository
from edgefl.packages.format import ModelPackage
from edgefl.protocol.types import SessionStatus, Weights
from edgefl.store.base import BlobStore, SessionRecord, Store

log = logging.getLogger(__name__)


def package_blob_key(digest: str) -> str:
    """Where a package lives in the blob store: content-addressed, beside the models."""
    return f"pkg-{digest}"


def load_package(blobs: BlobStore, digest: str) -> tuple[ModelPackage, bytes]:
    """A stored package and its bytes; KeyError if it was never added."""
    key = package_blob_key(digest)
    if not blobs.exists(key):
        raise KeyError(f"no model package {digest[:16]}... in the store; add it first")
    blob = blobs.get(key)
    return ModelPackage.loads(blob), blob


def new_session(
    store: Store,
    blobs: BlobStore,
    project: str,
    config: SessionConfig,
    initial_weights: Weights | None = None,
    *,
    status: SessionStatus = "running",
    start_from: str | None = None,
) -> SessionRecord:
    """Store the initial model (blob, then record) and then the session; ValueError if the
    id is taken or the aggregator unknown, KeyError if the named package is not stored.

    With a package and no ``initial_weights``, the package's own weights start the session.
    ``status`` is ``running`` for a controller that runs it next, ``created`` for the API.

    ``start_from`` names a stored model version (a project's active model, say) whose exact
    bytes become the session's round-0 version, with that version as its parent, so the
    lineage runs on across sessions. Its tensors must match the model the session trains
    (``initial_weights`` or the package's): ValueError otherwise, KeyError if unknown.
    """
    if store.get_session(config.session_id) is not None:
        raise ValueError(f"session {config.session_id!r} exists; resume it or pick another id")
    make_aggregator(config.aggregator, **config.aggregator_params)  # fail early on typos
    if config.package is not None:
        package, _ = load_package(blobs, config.package)
        if initial_weights is None:
            initial_weights = package.initial_weights()
    if initial_weights is None:
        raise ValueError("a session needs initial weights, or a package that carries them")
    repo = ModelRepository(store, blobs)
    if start_from is not None:
        weights, blob = repo.load(start_from)  # KeyError if unknown; digest checked
        _check_fits(start_from, weights, initial_weights)
        record, _ = repo.save_blob(
            blob,
            parent=start_from,
            session_id=config.session_id,
            round_=0,
            meta={"started_from": start_from},
        )
    else:
        record, _ = repo.save(initial_weights, parent=None, session_id=config.session_id, round_=0)
    now = time.time()
    session = SessionRecord(
        session_id=config.session_id,
        project=project,
        config=config.model_dump(),
        status=status,
        current_round=0,
        model_version=record.version,
        created=now,
        updated=now,
    )
    store.create_session(session)
    log.info(
        "session %s created (%s): %d rounds, aggregator %s",
        config.session_id,
        status,
        config.rounds,
        config.aggregator,
    )
    return session


def _check_fits(version: str, weights: Weights, model: Weights) -> None:
    """Refuse a starting version whose tensors the session's model cannot take: devices
    would fail every task (names, shapes and dtypes must be the model's own)."""

    def shape(w: Weights) -> dict[str, tuple[tuple[int, ...], str]]:
        return {k: (tuple(v.shape), str(v.dtype)) for k, v in w.items()}

    have, want = shape(weights), shape(model)
    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        shown = ", ".join(
            f"{k}: {have.get(k, 'missing')} vs {want.get(k, 'missing')}" for k in diff[:4]
        )
        raise ValueError(f"model version {version!r} does not fit the session's model ({shown})")
